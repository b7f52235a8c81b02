/*
 * snapshot_walk.S: a deterministic guest for the snapshot file tests. For
 * each of ROUNDS rounds it fills one 4 KiB page of a 1 MiB buffer from a
 * running hash, spins a while (so a pause lands mid-run), and writes one
 * character of the hash to COM1. At the end it REPORTs an 8-byte digest of
 * the whole buffer and EXITs 0. Its console and report depend on every round
 * before them and on the buffer in guest RAM, so a restore that loses or
 * repeats a step, a register or a page shows. Entry mode: user (64-bit, CPL3,
 * port I/O allowed). ELF at 0x100000; needs 4 MiB of RAM.
 */
#include "hypercall.inc"

#define ROUNDS	256
#define SPIN	1000000

	.text
	.globl _start
_start:
	xor	%r8, %r8			/* round */
	mov	$0x9e3779b97f4a7c15, %r9	/* hash */
	mov	$0x5851f42d4c957f2d, %r11	/* multiplier */
	lea	buf(%rip), %r10
1:	mov	%r8, %rax
	and	$255, %rax
	shl	$12, %rax
	lea	(%r10,%rax), %rdi
	mov	$512, %ecx
2:	imul	%r11, %r9
	add	%r8, %r9
	ror	$17, %r9
	mov	%r9, (%rdi)
	add	$8, %rdi
	dec	%ecx
	jnz	2b
	mov	$SPIN, %ecx
3:	dec	%ecx
	jnz	3b
	mov	%r9, %rax
	shr	$7, %rax
	and	$63, %eax
	add	$'0', %eax
	mov	$0x3f8, %dx
	out	%al, %dx
	inc	%r8
	cmp	$ROUNDS, %r8
	jb	1b
	/* The digest: every word of the buffer, rotated in. */
	xor	%eax, %eax
	mov	%r10, %rdi
	mov	$(1 << 17), %ecx
4:	rol	$5, %rax
	xor	(%rdi), %rax
	add	$8, %rdi
	dec	%ecx
	jnz	4b
	mov	%rax, digest(%rip)
	hc_report digest, 8
	hc_exit 0
5:	pause
	jmp	5b

	.data
	.balign	8
block:	.space	48
digest:	.quad	0

	.bss
	.balign	4096
buf:	.space	1 << 20
