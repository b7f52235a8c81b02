/*
 * real_hello.S: prints "real\n" to COM1 and exits with value 2 (exit code 5).
 * Entry mode: real (16-bit). Built flat at 0x7c00 (a boot sector: < 512 bytes).
 * The VMM leaves DS = 0, so absolute addresses linked at 0x7c00 work as offsets.
 */
	.code16
	.text
	.globl _start
_start:
	cld
	mov	$msg, %si
	mov	$0x3f8, %dx
1:	lodsb
	test	%al, %al
	jz	2f
	out	%al, %dx
	jmp	1b
2:	mov	$2, %al
	out	%al, $0xf4
3:	hlt
	jmp	3b

msg:	.asciz	"real\n"
