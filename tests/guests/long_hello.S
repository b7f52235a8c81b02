/*
 * long_hello.S: prints "long\n" to COM1 and exits with value 3 (exit code 7).
 * Entry mode: long (64-bit, CPL0). Built flat at 0x100000 (position-independent).
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
2:	mov	$3, %al
	out	%al, $0xf4
3:	hlt
	jmp	3b

msg:	.asciz	"long\n"
