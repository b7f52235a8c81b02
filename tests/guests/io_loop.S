/*
 * io_loop.S: performs exactly N `out` instructions to port 0x80 (the POST-code
 * port, which no device claims), N taken from rdi at entry, then exits through
 * the debug-exit port with value 0. Every `out` is one VM exit, so the time per
 * iteration is the cost of an exit round trip: the exit-cost benchmark
 * (bench/, bench/c/kvm_floor.c) runs it.
 * Entry mode: user (64-bit, CPL3, IOPL=3), so the loop itself runs at native
 * speed on PVM hosts too. Built flat or as an ELF at 0x100000.
 */
	.text
	.globl _start
_start:
	test	%rdi, %rdi
	jz	2f		/* N = 0: no out at all (dec would wrap to 2^64 - 1) */
	xor	%eax, %eax
1:	out	%al, $0x80
	dec	%rdi
	jnz	1b
2:	xor	%eax, %eax
	out	%al, $0xf4
3:	pause
	jmp	3b
