/*
 * mem_echo.S: reads the u64 at guest-physical 0x200000, adds 1 and stores the sum
 * at 0x200008, then hlt: a check that host writes to guest RAM are seen by the
 * guest and the guest's writes by the host. Needs more than 2 MiB + 16 bytes of
 * RAM. Entry mode: long (64-bit, CPL0; the VMM's identity map makes virtual and
 * physical addresses equal). Built flat or as an ELF at 0x100000.
 */
	.text
	.globl _start
_start:
	mov	$0x200000, %edi
	mov	(%rdi), %rax
	inc	%rax
	mov	%rax, 8(%rdi)
	hlt
	jmp	_start		/* not reached: the VMM stops on HLT */
