/*
 * cpuid_probe.S: executes CPUID for leaves 0x40000000, 1 and 7 (sub-leaf 0) and
 * REPORTs the twelve output registers (EAX, EBX, ECX, EDX of each, as u32s, 48
 * bytes), then EXITs with status 0. Entry mode: long (64-bit, CPL0: PVM does not
 * intercept CPUID at CPL3, so user mode there sees the host's CPUID). ELF at
 * 0x100000. The CPUID policy test compares them with what the host set.
 */
#include "hypercall.inc"

	.text
	.globl _start
_start:
	lea	out(%rip), %rdi
	mov	$0x40000000, %eax
	call	probe
	mov	$1, %eax
	call	probe
	mov	$7, %eax
	call	probe

	hc_report out, 48
	hc_exit 0
1:	pause
	jmp	1b

/* probe: CPUID leaf %eax, sub-leaf 0; stores EAX..EDX at (%rdi), advances %rdi. */
probe:
	xor	%ecx, %ecx
	cpuid
	mov	%eax, 0(%rdi)
	mov	%ebx, 4(%rdi)
	mov	%ecx, 8(%rdi)
	mov	%edx, 12(%rdi)
	add	$16, %rdi
	ret

	.data
	.balign	8
out:	.space	48
block:	.space	48
