/*
 * smp_sum.S: every vCPU sums its share of 1..N, the last one to finish adds the
 * shares up, REPORTs the total (8 bytes) and EXITs; the others spin until the
 * EXIT stops the VM. At entry: rdi = N, rsi = this vCPU's index, rdx = vCPU count
 * (at most 64). Entry mode: user (64-bit, CPL3). Built as an ELF at 0x100000.
 * Each vCPU's share is [index*N/count + 1, (index+1)*N/count].
 */
#include "hypercall.inc"

	.text
	.globl _start
_start:
	mov	%rdx, %r8		/* count */
	mov	%rsi, %r9		/* index */
	/* lo = index * N / count */
	mov	%rdi, %rax
	mul	%r9
	div	%r8
	mov	%rax, %r10
	/* hi = (index + 1) * N / count */
	lea	1(%r9), %rax
	mul	%rdi
	div	%r8
	mov	%rax, %r11
	xor	%ecx, %ecx		/* sum */
1:	cmp	%r11, %r10
	jae	2f
	inc	%r10
	add	%r10, %rcx
	jmp	1b
2:	lea	partial(%rip), %rax
	mov	%rcx, (%rax,%r9,8)
	mov	$1, %eax
	lock xadd %eax, done(%rip)
	inc	%eax
	cmp	%r8d, %eax
	jne	4f			/* not the last one */
	/* the last vCPU: add up every share */
	xor	%ecx, %ecx
	xor	%eax, %eax
	lea	partial(%rip), %rsi
3:	add	(%rsi,%rax,8), %rcx
	inc	%rax
	cmp	%r8, %rax
	jb	3b
	mov	%rcx, total(%rip)
	hc_report total, 8
	hc_exit 0
4:	pause
	jmp	4b

	.data
	.balign	64
done:	.long	0
	.balign	8
total:	.quad	0
block:	.space	48
partial: .space	64 * 8
