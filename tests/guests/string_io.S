/*
 * string_io.S: port I/O with string instructions on COM1 (0x3f8), one access
 * per byte, several per VM exit (KVM hands them over together).
 *   rdi = 0: `rep outsb` of a message to COM1, then EXIT(0).
 *   rdi = 1: waits for the line status register's data-ready bit, then
 *            `rep insb` of rsi bytes (at most 4096) from COM1 into a buffer,
 *            echoes them with one `out` per byte, then EXIT(0).
 * Entry mode: long (64-bit, CPL0). Built as an ELF at 0x100000.
 */
#include "hypercall.inc"

#define COM1 0x3f8
#define COM1_LSR 0x3fd

	.text
	.globl _start
_start:
	test	%rdi, %rdi
	jnz	read_typed
	lea	message(%rip), %rsi
	mov	$message_end - message, %ecx
	mov	$COM1, %dx
	cld
	rep outsb
	hc_exit 0

read_typed:
	mov	%rsi, %rbx		/* byte count */
	cmp	$4096, %rbx
	jbe	1f
	mov	$4096, %ebx
1:	mov	$COM1_LSR, %dx		/* wait until the first byte is there */
2:	in	%dx, %al
	test	$1, %al
	jz	2b
	lea	buffer(%rip), %rdi
	mov	%rbx, %rcx
	mov	$COM1, %dx
	cld
	rep insb
	lea	buffer(%rip), %rsi	/* echo, one `out` per byte */
	mov	%rbx, %rcx
3:	test	%rcx, %rcx
	jz	4f
	lodsb
	out	%al, %dx
	dec	%rcx
	jmp	3b
4:	hc_exit 0
5:	pause			/* not reached: EXIT stops the VM */
	jmp	5b

	.data
message:
	.ascii	"rep outsb: every byte of this string reaches COM1, in order.\n"
message_end:
	.balign	8
block:	.space	48
	.balign	4096
buffer:	.space	4096
