# compute.s: a 64-bit CPL0 guest (flat, loaded at 0x100000) for the snapshot
# tests. It runs ITERATIONS rounds of a floating-point recurrence under a
# non-default MXCSR (round toward zero) in SSE registers low and high, folds
# every round into general registers, then prints the hash as 16 hex digits
# and a newline on COM1 and writes 5 to port 0xf4. Any register the restore
# loses (a GPR, an XMM register, MXCSR, the MSR it wrote at the start)
# changes the printed hash.
# Every 65536 rounds it stores the rounds left at offset 8 (`progress`), so a
# host can pause it mid-loop.
	.code64
	.equ	ITERATIONS, 1 << 24
_start:
	jmp	main
	.balign	8
progress:
	.quad	ITERATIONS
mxcsr_rz:
	.long	0x7f80			# every exception masked, round toward zero
	.balign	8
x0:	.double	1.0
factor:	.double	0.9999997
addend:	.double	0.1
hex:	.ascii	"0123456789abcdef"
started:
	.byte	0
main:
	# Entered twice (a restore that lost RIP can slide back here through
	# zeroed memory): end with 7 instead of computing again.
	cmpb	$0, started(%rip)
	jne	again
	movb	$1, started(%rip)
	# A value in an MSR, read back at the end: a restore must carry MSRs.
	mov	$0xc0000102, %ecx	# IA32_KERNEL_GS_BASE
	mov	$0x89abcdef, %eax
	mov	$0x00001234, %edx
	wrmsr
	ldmxcsr	mxcsr_rz(%rip)
	movsd	x0(%rip), %xmm0
	movsd	factor(%rip), %xmm1
	movsd	addend(%rip), %xmm2
	movsd	x0(%rip), %xmm9
	mov	$ITERATIONS, %ecx
	movabs	$0x243f6a8885a308d3, %rbx
	movabs	$0x9e3779b97f4a7c15, %r12
	xor	%r13d, %r13d
1:	mulsd	%xmm1, %xmm0
	addsd	%xmm2, %xmm0
	addsd	%xmm0, %xmm9
	mulsd	%xmm1, %xmm9
	movq	%xmm0, %rax
	add	%rax, %rbx
	rol	$13, %rbx
	imul	%r12, %rbx
	movq	%xmm9, %rdx
	xor	%rdx, %r13
	add	%rcx, %r13
	test	$0xffff, %ecx
	jnz	2f
	mov	%rcx, progress(%rip)
2:	dec	%rcx
	jnz	1b
	xor	%r13, %rbx
	mov	$0xc0000102, %ecx
	rdmsr
	shl	$32, %rdx
	or	%rdx, %rax
	add	%rax, %rbx
	lea	hex(%rip), %rsi
	mov	$16, %ecx
	mov	$0x3f8, %dx
3:	rol	$4, %rbx
	mov	%ebx, %eax
	and	$15, %eax
	movzbl	(%rsi,%rax), %eax
	out	%al, %dx
	dec	%ecx
	jnz	3b
	mov	$10, %al
	out	%al, %dx
	mov	$5, %al
	out	%al, $0xf4
	hlt
again:
	mov	$7, %al
	out	%al, $0xf4
	hlt
