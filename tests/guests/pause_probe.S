/*
 * pause_probe.S: counts in rbx until the host sets r12 to 1 (which it can only
 * do while the vCPU is paused), then EXITs with status 0. Entry mode: user
 * (64-bit, CPL3). ELF at 0x100000.
 */
#define HYPERCALL_PORT 0x510
#define HC_EXIT 2

	.text
	.globl _start
_start:
	xor	%ebx, %ebx
1:	inc	%rbx
	cmp	$1, %r12
	jne	1b
	mov	$HYPERCALL_PORT, %dx
	lea	block(%rip), %rax
	movl	$HC_EXIT, block(%rip)
	movq	$0, block+8(%rip)
	out	%eax, %dx
2:	pause
	jmp	2b

	.data
	.balign	8
block:	.space	48
