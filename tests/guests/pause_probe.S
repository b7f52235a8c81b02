/*
 * pause_probe.S: counts in rbx until the host sets r12 to 1 (which it can only
 * do while the vCPU is paused), then EXITs with status 0. Entry mode: user
 * (64-bit, CPL3). ELF at 0x100000.
 */
#include "hypercall.inc"

	.text
	.globl _start
_start:
	xor	%ebx, %ebx
1:	inc	%rbx
	cmp	$1, %r12
	jne	1b
	hc_exit 0
2:	pause
	jmp	2b

	.data
	.balign	8
block:	.space	48
