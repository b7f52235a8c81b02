/*
 * msr_probe.S: reads the MSR whose index is in rdi at entry (RDMSR is
 * privileged, so this runs in long mode at CPL0), then EXITs with status 0.
 * A #GP (a denied MSR) goes through a one-entry IDT to a handler that reports
 * FAULT(13, error code, 0, rip), so the host sees a typed guest fault.
 * Entry mode: long (64-bit, CPL0). ELF at 0x100000.
 */
#include "hypercall.inc"

	.text
	.globl _start
_start:
	/* Gate 13 -> gp_handler: offset split over three fields, selector 0x08,
	 * present 64-bit interrupt gate. */
	lea	gp_handler(%rip), %rax
	lea	idt+13*16(%rip), %rbx
	mov	%ax, 0(%rbx)
	movw	$0x08, 2(%rbx)
	movw	$0x8e00, 4(%rbx)
	shr	$16, %rax
	mov	%ax, 6(%rbx)
	shr	$16, %rax
	mov	%eax, 8(%rbx)
	lidt	idtr(%rip)

	mov	%rdi, %rcx
	rdmsr

	hc_exit 0
1:	hlt
	jmp	1b

gp_handler:
	pop	%rcx			/* error code */
	pop	%rsi			/* faulting rip */
	movl	$HC_FAULT, block(%rip)
	movq	$13, block+8(%rip)
	mov	%rcx, block+16(%rip)
	movq	$0, block+24(%rip)
	mov	%rsi, block+32(%rip)
	mov	$HYPERCALL_PORT, %dx
	lea	block(%rip), %rax
	out	%eax, %dx
2:	hlt
	jmp	2b

	.data
	.balign	16
idt:	.space	14 * 16
idtr:	.word	14 * 16 - 1
	.quad	idt
	.balign	8
block:	.space	48
