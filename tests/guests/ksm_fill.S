/*
 * ksm_fill.S: fills guest RAM from rdi for rsi bytes (multiples of 4 KiB) so
 * that every page differs from every other page of the guest but is the same
 * in every VM running this image: each 8-byte word holds its own address XOR a
 * constant (never zero). Then prints "filled\n" on COM1 and halts for good
 * with interrupts off: with the in-kernel irqchip the vCPU sleeps in KVM and
 * the guest stays idle until the host stops it. KSM can then merge its pages
 * only with other VMs' pages, never inside one guest.
 * Entry mode: long (64-bit, CPL0), interrupts: true. Built flat at 0x100000.
 */
#define PATTERN	0x5a5aa5a5c3c33c3c

	.text
	.globl _start
_start:
	cli
	mov	$PATTERN, %rax
	lea	(%rdi,%rsi), %rcx	/* end */
1:	cmp	%rcx, %rdi
	jae	2f
	mov	%rdi, %rdx
	xor	%rax, %rdx
	mov	%rdx, (%rdi)
	add	$8, %rdi
	jmp	1b
2:	lea	msg(%rip), %rsi
	mov	$0x3f8, %dx
3:	lodsb
	test	%al, %al
	jz	4f
	out	%al, %dx
	jmp	3b
4:	hlt
	jmp	4b

msg:	.asciz	"filled\n"
