/*
 * hypercalls.S: makes exactly N NOP hypercalls (N in rdi at entry), then the
 * EXIT hypercall with status 0, all from user mode: the metrics test counts them.
 * Entry mode: user (64-bit, CPL3). Built as an ELF at 0x100000.
 * The hypercall ABI (port 0x510, a 48-byte request block) is in guest/README.md.
 */
#include "hypercall.inc"

	.text
	.globl _start
_start:
	mov	%rdi, %rbx		/* N */
	lea	block(%rip), %rax	/* eax = the block's guest-physical address */
	mov	$HYPERCALL_PORT, %dx
	movl	$HC_NOP, block(%rip)
1:	test	%rbx, %rbx
	jz	2f
	out	%eax, %dx
	dec	%rbx
	jmp	1b
2:	hc_exit 0
3:	pause			/* not reached: EXIT stops the VM */
	jmp	3b

	.data
	.balign	8
block:	.space	48
