/*
 * ticker.S: forever writes one '.' to COM1 (port 0x3f8, one VM exit), then
 * spins about 2^20 iterations without an exit: a guest whose exits and console
 * bytes keep moving at a modest rate while it runs and stop while it is paused
 * (the control API's tests). Entry mode: user (64-bit, CPL3, IOPL=3) or long;
 * any load address, flat or ELF.
 */
	.text
	.globl _start
_start:
	mov	$0x3f8, %dx
1:	mov	$'.', %al
	out	%al, %dx
	mov	$0x100000, %ecx
2:	dec	%ecx
	jnz	2b
	jmp	1b
