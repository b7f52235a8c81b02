/*
 * machine_stop.S: ends the run the way an OS without ACPI does.
 * rdi = 0: resets the machine through the i8042 (command 0xFE to port 0x64,
 *          after waiting for its input buffer, as Linux's reboot=k does);
 * rdi = 1: powers off through port 0x604 (QEMU's PM1a control, SLP_EN | S5).
 * Entry mode: user (CPL3, IOPL=3). Prints "stopping\n" first.
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
2:	test	%rdi, %rdi
	jnz	power_off
3:	in	$0x64, %al		/* i8042 status: wait until bit 1 (input full) clears */
	test	$0x02, %al
	jnz	3b
	mov	$0xfe, %al
	out	%al, $0x64
	jmp	hang
power_off:
	mov	$0x2000, %ax
	mov	$0x604, %dx
	out	%ax, %dx
hang:	pause
	jmp	hang

	.section .rodata
msg:	.asciz	"stopping\n"
