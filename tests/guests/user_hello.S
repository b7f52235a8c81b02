/*
 * user_hello.S: prints "user\n" to COM1 and exits with value 4 (exit code 9).
 * Entry mode: user (64-bit, CPL3, IOPL=3). Built as an ELF at 0x100000.
 * No hlt: it is privileged and would fault at CPL3.
 */
	.text
	.globl _start
_start:
	lea	msg(%rip), %rsi
	mov	$0x3f8, %dx
1:	lodsb
	test	%al, %al
	jz	2f
	out	%al, %dx
	jmp	1b
2:	mov	$4, %al
	out	%al, $0xf4
3:	pause
	jmp	3b

	.section .rodata
msg:	.asciz	"user\n"
