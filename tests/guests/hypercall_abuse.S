/*
 * hypercall_abuse.S: feeds the hypercall port garbage and reports what the VMM
 * answered. Entry mode: user (64-bit, CPL3). Built as an ELF at 0x100000.
 *
 * It makes three bad calls, storing each returned status (i32) in `results`:
 *   an unknown call number (999), a WRITE whose buffer lies outside guest RAM,
 *   and a WRITE whose length overflows the address space;
 * then REPORTs the 12 bytes of `results`. How it ends depends on rdi at entry:
 *   0: EXIT(0); 1: a 1-byte out to the port; 2: a request block outside RAM.
 */
#include "hypercall.inc"

	.text
	.globl _start
_start:
	mov	$HYPERCALL_PORT, %dx
	lea	block(%rip), %rax

	movl	$999, block(%rip)
	out	%eax, %dx
	mov	block+4(%rip), %ecx
	mov	%ecx, results(%rip)

	movl	$HC_WRITE, block(%rip)
	movq	$0x40000000, block+8(%rip)	/* 1 GiB: far beyond RAM */
	movq	$16, block+16(%rip)
	out	%eax, %dx
	mov	block+4(%rip), %ecx
	mov	%ecx, results+4(%rip)

	movq	$0x100000, block+8(%rip)
	movq	$-1, block+16(%rip)		/* ptr + len wraps */
	out	%eax, %dx
	mov	block+4(%rip), %ecx
	mov	%ecx, results+8(%rip)

	hc_report results, 12

	cmp	$1, %rdi
	je	1f
	cmp	$2, %rdi
	je	2f
	hc_exit 0
	jmp	3f
1:	out	%al, %dx			/* a 1-byte hypercall */
	jmp	3f
2:	mov	$0xf0000000, %eax		/* a block outside guest RAM */
	out	%eax, %dx
3:	pause
	jmp	3b

	.data
	.balign	8
block:	.space	48
results: .space	12
