/*
 * snapshot_count.S: counts rounds for ever, printing each round's number on
 * COM1 as a line of 8 hex digits ("00000001\n", "00000002\n", ...) and
 * spinning a while between rounds. The count lives both in RAM and in r12;
 * if they ever disagree the guest prints "MISMATCH\n" and stops counting. So
 * its output names the point it has reached, and a VM restored from a
 * snapshot prints exactly the lines that follow the snapshot's point, with
 * its registers and RAM consistent (the control API's snapshot/load tests).
 * Entry mode: user (64-bit, CPL3, port I/O allowed). ELF at 0x100000.
 */
#define SPIN	0x200000

	.text
	.globl _start
_start:
	xor	%r12, %r12
	mov	$0x3f8, %dx
1:	incq	count(%rip)
	inc	%r12
	cmp	count(%rip), %r12
	jne	9f
	mov	%r12d, %ebx
	mov	$8, %ecx
2:	rol	$4, %ebx
	mov	%ebx, %eax
	and	$15, %eax
	cmp	$10, %eax
	jb	3f
	add	$('a' - '0' - 10), %eax
3:	add	$'0', %eax
	out	%al, %dx
	dec	%ecx
	jnz	2b
	mov	$'\n', %al
	out	%al, %dx
	mov	$SPIN, %ecx
4:	dec	%ecx
	jnz	4b
	jmp	1b
9:	lea	mismatch(%rip), %rsi
	mov	$9, %ecx
	rep outsb
5:	pause
	jmp	5b

	.data
mismatch:
	.ascii	"MISMATCH\n"
	.balign	8
count:
	.quad	0
