/*
 * migrate_dirty.S: a guest that dirties memory continuously, for the live
 * migration tests. For each of SWEEPS sweeps it writes a running hash into
 * two words of every page of a 4 MiB buffer (1024 pages), spinning a little
 * between pages, and writes one character of the hash to COM1 per sweep. At
 * the end it REPORTs an 8-byte digest of the buffer and EXITs 0. Its console
 * and digest depend on every sweep and every page, so a migration that loses
 * a page, a register or a step shows. Entry mode: user (64-bit, CPL3, port
 * I/O allowed). ELF at 0x100000; needs 8 MiB of RAM.
 */
#include "hypercall.inc"

#define SWEEPS	400
#define PAGES	1024
#define SPIN	3000

	.text
	.globl _start
_start:
	xor	%r8, %r8			/* sweep */
	mov	$0x9e3779b97f4a7c15, %r9	/* hash */
	mov	$0x5851f42d4c957f2d, %r11	/* multiplier */
	lea	buf(%rip), %r10
1:	mov	%r10, %rdi
	mov	$PAGES, %esi
2:	imul	%r11, %r9
	add	%r8, %r9
	ror	$17, %r9
	mov	%r9, (%rdi)
	xor	%r8, 2048(%rdi)
	add	%r9, 2048(%rdi)
	add	$4096, %rdi
	mov	$SPIN, %ecx
3:	dec	%ecx
	jnz	3b
	dec	%esi
	jnz	2b
	mov	%r9, %rax
	shr	$7, %rax
	and	$63, %eax
	add	$'0', %eax
	mov	$0x3f8, %dx
	out	%al, %dx
	inc	%r8
	cmp	$SWEEPS, %r8
	jb	1b
	/* The digest: both words of every page, rotated in. */
	xor	%eax, %eax
	mov	%r10, %rdi
	mov	$PAGES, %ecx
4:	rol	$5, %rax
	xor	(%rdi), %rax
	rol	$7, %rax
	xor	2048(%rdi), %rax
	add	$4096, %rdi
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
buf:	.space	PAGES * 4096
