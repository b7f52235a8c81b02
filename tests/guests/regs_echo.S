/*
 * regs_echo.S: rcx = rax + rbx, then hlt, so the host can set rax and rbx before
 * the run and read rcx after the VM stops on HLT. Nothing else is touched.
 * Entry mode: long (64-bit, CPL0): hlt is privileged and faults at CPL3.
 * Built flat or as an ELF at 0x100000.
 */
	.text
	.globl _start
_start:
	mov	%rax, %rcx
	add	%rbx, %rcx
	hlt
	jmp	_start		/* not reached: the VMM stops on HLT */
