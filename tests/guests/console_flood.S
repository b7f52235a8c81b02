/*
 * console_flood.S: writes N chunks of 4096 bytes to the console with the WRITE
 * hypercall (N in rdi at entry; 0: forever), chunk i filled with the letter
 * 'A' + i % 26, then makes the EXIT hypercall with status 0. Floods the
 * console's capture and a streamed stdout that does not drain.
 * Entry mode: long (64-bit, CPL0). Built as an ELF at 0x100000.
 */
#include "hypercall.inc"

#define CHUNK 4096

	.text
	.globl _start
_start:
	mov	%rdi, %r12		/* chunks to write; 0: forever */
	xor	%r13, %r13		/* chunk index */
1:	mov	%r13, %rax		/* the chunk's letter: 'A' + index % 26 */
	xor	%edx, %edx
	mov	$26, %ecx
	div	%rcx
	lea	'A'(%rdx), %eax
	lea	buffer(%rip), %rdi
	mov	$CHUNK, %ecx
	rep stosb
	movl	$HC_WRITE, block(%rip)	/* WRITE(buffer, CHUNK) */
	lea	buffer(%rip), %rcx
	mov	%rcx, block+8(%rip)
	movq	$CHUNK, block+16(%rip)
	lea	block(%rip), %rax
	mov	$HYPERCALL_PORT, %dx
	out	%eax, %dx
	inc	%r13
	test	%r12, %r12
	jz	1b
	cmp	%r12, %r13
	jb	1b
	hc_exit 0
2:	pause			/* not reached: EXIT stops the VM */
	jmp	2b

	.data
	.balign	8
block:	.space	48
buffer:	.space	CHUNK
