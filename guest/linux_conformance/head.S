/*
 * The protected-mode part's entry points. A bzImage's 32-bit entry is its first
 * byte and its 64-bit entry (startup_64) is 0x200 bytes in; denovisor uses the
 * latter. startup_64 records the CPU state the loader left before it changes
 * anything (no instruction before the stores depends on a stack), switches to
 * its own stack inside the image (the protocol promises none), and calls the C
 * report with the recorded state. Everything is RIP-relative: the image runs
 * wherever a loader puts it.
 */

	.section .head.text, "ax"
	.code32
	.globl	startup_32
startup_32:
	/* The 32-bit entry is not part of this test: stop with debug-exit 0x7f. */
	movb	$0x7f, %al
	outb	%al, $0xf4
1:	hlt
	jmp	1b

	.code64
	.org	0x200
	.globl	startup_64
startup_64:
	movq	%rsi, entry_state + 0(%rip)
	movq	%rsp, entry_state + 16(%rip)
	leaq	startup_32(%rip), %rax
	movq	%rax, entry_state + 8(%rip)
	movw	%cs, entry_state + 64(%rip)
	movw	%ds, entry_state + 66(%rip)
	movw	%es, entry_state + 68(%rip)
	movw	%ss, entry_state + 70(%rip)
	movw	%fs, entry_state + 72(%rip)
	movw	%gs, entry_state + 74(%rip)
	leaq	boot_stack_top(%rip), %rsp
	pushfq
	popq	entry_state + 24(%rip)
	movq	%cr0, %rax
	movq	%rax, entry_state + 32(%rip)
	movq	%cr3, %rax
	movq	%rax, entry_state + 40(%rip)
	movq	%cr4, %rax
	movq	%rax, entry_state + 48(%rip)
	movl	$0xc0000080, %ecx		/* IA32_EFER */
	rdmsr
	shlq	$32, %rdx
	orq	%rdx, %rax
	movq	%rax, entry_state + 56(%rip)
	leaq	entry_state(%rip), %rdi
	call	report
2:	hlt
	jmp	2b

	.section .bss
	.balign	16
	.globl	entry_state
entry_state:
	.skip	80
	.balign	16
boot_stack:
	.skip	8192
boot_stack_top:

	/* A stand-in for a compressed kernel, so payload_offset/length point at bytes. */
	.section .rodata.payload, "a"
	.globl	payload
payload:
	.ascii	"denovisor-payload"
payload_end:
	.globl	payload_end
