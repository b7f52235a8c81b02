/*
 * spin.S: loops forever without a single exit, for tests of timeouts and of
 * kicking a running vCPU. Entry mode: long or user (64-bit); any load address.
 * In user mode it runs at native speed on PVM hosts too.
 */
	.text
	.globl _start
_start:
	jmp	.
