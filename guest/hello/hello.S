/*
 * hello.S: the guest `deno run -A main.ts` runs when no image is given.
 *
 * Entry mode: user (64-bit long mode, CPL3, IOPL=3). Linked as a static ELF64 at
 * 0x100000. The VMM sets RSP near the top of guest RAM; the stack is only used for
 * call/ret and one small buffer.
 *
 * It prints a banner to COM1, proves that it executes code by computing
 * 1 + 2 + ... + 1000 itself and printing the result in decimal, reports its
 * privilege level (the low two bits of CS), then stops the VM through QEMU's
 * isa-debug-exit port with value 0 (exit code (0 << 1) | 1 = 1, which denovisor
 * reports as success).
 *
 * Output goes straight to the UART's transmit register without polling the line
 * status register (0x3fd, bit 5 = transmitter empty) first, as a driver for real
 * hardware would. Denovisor's UART is always ready, and every port access is a VM
 * exit: on PVM hosts an exit costs ~5 us, so polling would double the cost of
 * every byte for nothing.
 */

#define COM1_THR   0x3f8   /* COM1 transmit holding register */
#define DEBUG_EXIT 0xf4    /* isa-debug-exit: out v -> exit code (v << 1) | 1 */

	.text
	.globl _start
_start:
	lea	banner(%rip), %rsi
	call	puts

	/* Privilege level: the RPL bits of CS are the current privilege level. */
	lea	mode_msg(%rip), %rsi
	call	puts
	mov	%cs, %eax
	and	$3, %eax
	mov	%eax, %ebx
	call	put_u64
	lea	kernel_tail(%rip), %rsi
	lea	user_tail(%rip), %rax
	cmp	$3, %ebx
	cmove	%rax, %rsi
	call	puts

	/* Proof of work: the guest adds 1..1000 itself; 500500 is expected. */
	xor	%eax, %eax
	mov	$1000, %ecx
1:	add	%rcx, %rax
	dec	%ecx
	jnz	1b
	mov	%rax, %rbx
	lea	sum_msg(%rip), %rsi
	call	puts
	mov	%rbx, %rax
	call	put_u64
	lea	sum_tail(%rip), %rsi
	call	puts

	lea	bye_msg(%rip), %rsi
	call	puts

	xor	%eax, %eax
	out	%al, $DEBUG_EXIT
	/* Not reached: the debug-exit port stops the VM. If it did not, spin rather
	 * than run into whatever follows (hlt would fault at CPL3). */
2:	pause
	jmp	2b

/* puts: writes the NUL-terminated string at %rsi to COM1. Clobbers %rax, %rsi. */
puts:
	mov	$COM1_THR, %dx
1:	lodsb
	test	%al, %al
	jz	2f
	out	%al, %dx
	jmp	1b
2:	ret

/* put_u64: writes %rax to COM1 in decimal. Clobbers %rax, %rcx, %rdx, %rsi, %rdi. */
put_u64:
	sub	$32, %rsp
	lea	31(%rsp), %rdi		/* digits are produced backwards from here */
	movb	$0, (%rdi)
	mov	$10, %ecx
1:	xor	%edx, %edx
	div	%rcx
	add	$'0', %dl
	dec	%rdi
	mov	%dl, (%rdi)
	test	%rax, %rax
	jnz	1b
	mov	%rdi, %rsi
	call	puts
	add	$32, %rsp
	ret

	.section .rodata
banner:
	.ascii	"\n"
	.ascii	"  Hello from a denovisor guest!\n"
	.ascii	"  -----------------------------\n"
	.asciz	"  The VMM entered this program directly in 64-bit long mode: no firmware, no boot loader.\n"
mode_msg:
	.asciz	"  Privilege level: CPL"
user_tail:
	.asciz	" (user mode; the I/O ports reach the host because IOPL=3).\n"
kernel_tail:
	.asciz	" (kernel mode).\n"
sum_msg:
	.asciz	"  Proof of work: 1 + 2 + ... + 1000 = "
sum_tail:
	.asciz	", computed by the guest.\n"
bye_msg:
	.asciz	"  Leaving through the debug-exit port 0xf4. Bye!\n\n"
