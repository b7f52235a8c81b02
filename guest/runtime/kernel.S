/*
 * kernel.S: the CPL0 part of the denovisor guest runtime.
 *
 * Entry mode: long (64-bit, CPL0, the VMM's GDT and TSS, the first 4 GiB
 * identity-mapped). `_start` is the image's ELF entry. The host sets
 * rdi = the workload's argument and rsi = guest RAM in bytes; RSP is the top of
 * guest RAM below 4 GiB.
 *
 * On PVM hosts CPL0 code is emulated (~1 us per instruction) while CPL3 code runs
 * natively, so this file does as little as possible at CPL0 and has no loops:
 *
 *   boot     lidt, three wrmsr (STAR, LSTAR, SFMASK), iretq to CPL3: 19 instructions
 *   syscall  11 instructions from `syscall` to `iretq`
 *   fault    14 or 15 instructions from the exception to the FAULT hypercall
 *
 * The IDT is laid out by the assembler and linker, not by code. A gate splits its
 * handler's address into 16-bit halves, which no x86-64 relocation can express
 * for an arbitrary symbol; but every handler lies in the same 64 KiB window as the
 * load address, so a gate holds `.word handler - WINDOW` (an R_X86_64_16
 * relocation, which the linker checks for overflow) and the constant
 * `WINDOW >> 16`. A handler that ever ends up outside the window breaks the link
 * with "relocation truncated to fit", not the guest.
 */

#ifndef GUEST_LOAD_ADDRESS
#define GUEST_LOAD_ADDRESS 0x100000
#endif
/* The 64 KiB-aligned window every exception handler must lie in. */
#define HANDLER_WINDOW (GUEST_LOAD_ADDRESS & ~0xffff)

#define KERNEL_CS	0x08
#define USER_CS32	0x18	/* STAR's SYSRET base: CS = base + 16, SS = base + 8 */
#define USER_SS		0x23	/* 0x20 | RPL 3 */
#define USER_CS		0x2b	/* 0x28 | RPL 3 */
#define USER_RFLAGS	0x3002	/* IOPL = 3 (port I/O at CPL3), IF = 0, bit 1 */

#define MSR_STAR	0xc0000081
#define MSR_LSTAR	0xc0000082
#define MSR_SFMASK	0xc0000084
/* SYSCALL clears these RFLAGS bits: TF, IF, DF, AC. */
#define SYSCALL_RFLAGS_MASK 0x40700

#define HC_PORT		0x510	/* hypercall: out %eax, %dx with eax = request block */
#define HC_FAULT	5
#define DEBUG_EXIT	0xf4

#define ENOSYS		38
/* The stack the syscall path builds its iretq frame on: the top of the VMM's
 * exception stack (TSS rsp0, 0xa000..0x10000), idle while no exception runs. */
#define SYSCALL_STACK	0x10000

	.section .text.entry, "ax"
	.code64

/*
 * Exception entry points, one per vector. Vectors without a CPU-pushed error
 * code push a 0 so every frame looks alike: vector, error code, RIP, CS, RFLAGS,
 * RSP, SS.
 */
	.macro	fault_stub vec
dv_fault_\vec:
	.if !((\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30))
	push	$0
	.endif
	push	$\vec
	jmp	fault_common
	.endm

	.irp	v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	fault_stub \v
	.endr

/*
 * Reports the exception with the FAULT hypercall and never returns. The request
 * block is built in place over the exception frame (the frame is not needed
 * again): one push adds the header below the vector, and the RIP moves one slot up
 * to make room for the faulting address.
 *
 *   before:  rsp+0 vector  +8 error  +16 RIP  +24 CS   +32 RFLAGS
 *   block:   rsp+0 nr = 5, status = 0  +8 arg0 vector  +16 arg1 error
 *            +24 arg2 CR2 (#PF) or 0   +32 arg3 RIP    +40 ret
 *
 * Exceptions from CPL3 run on the TSS's rsp0 stack (0x10000), exceptions from
 * CPL0 on the entry stack: both are guest RAM below 4 GiB, as the ABI requires.
 */
fault_common:
	xor	%eax, %eax
	cmpq	$14, (%rsp)
	jne	1f
	mov	%cr2, %rax
1:	mov	16(%rsp), %rcx
	mov	%rcx, 24(%rsp)
	mov	%rax, 16(%rsp)
	push	$HC_FAULT
	mov	%esp, %eax
	mov	$HC_PORT, %edx
	out	%eax, %dx
	/*
	 * Only reached on a host without the hypercall device: stop through the
	 * debug-exit port with 0x80 | vector, exit code ((0x80 | vector) << 1) | 1.
	 */
	mov	8(%rsp), %eax
	or	$0x80, %eax
	out	%al, $DEBUG_EXIT
2:	hlt
	jmp	2b

/*
 * The ELF entry: install the IDT and the SYSCALL MSRs, then drop to CPL3 at
 * dv_user_start (crt0.S) on the same stack with rdi and rsi as the host set them.
 */
	.globl	_start
	.type	_start, @function
_start:
	lidt	idtr(%rip)

	mov	$MSR_STAR, %ecx
	xor	%eax, %eax
	mov	$((USER_CS32 << 16) | KERNEL_CS), %edx
	wrmsr
	mov	$MSR_LSTAR, %ecx
	lea	dv_syscall_entry(%rip), %eax	/* the image lies below 4 GiB */
	xor	%edx, %edx
	wrmsr
	mov	$MSR_SFMASK, %ecx
	mov	$SYSCALL_RFLAGS_MASK, %eax
	wrmsr

	mov	%rsp, %rax
	push	$USER_SS
	push	%rax
	push	$USER_RFLAGS
	push	$USER_CS
	push	$dv_user_start
	iretq
	.size	_start, . - _start

/*
 * The guest kernel's system calls: rax = number, result in rax; rcx and r11 are
 * clobbered, as with any SYSCALL ABI. The user stack is not touched (the code
 * there may keep data in its red zone).
 *   0        returns 1 (a getpid-like call: the cheapest round trip)
 *   other    returns -ENOSYS (-38)
 *
 * It returns with iretq rather than sysretq: PVM runs CPL0 code in KVM's
 * instruction emulator, which has no SYSRET (the guest gets a #GP at the
 * sysretq). The RFLAGS pushed are USER_RFLAGS, not r11: under PVM, SYSCALL saved
 * 0x202 in r11 (IF = 1, IOPL = 0) although iretq had set USER_RFLAGS.
 */
	.globl	dv_syscall_entry
	.type	dv_syscall_entry, @function
dv_syscall_entry:
	mov	%rsp, %r11
	mov	$SYSCALL_STACK, %esp
	push	$USER_SS
	push	%r11
	push	$USER_RFLAGS
	push	$USER_CS
	push	%rcx
	test	%rax, %rax
	jnz	1f
	mov	$1, %eax
	iretq
1:	mov	$-ENOSYS, %rax
	iretq
	.size	dv_syscall_entry, . - dv_syscall_entry

/* Interrupt gates (IF stays 0): DPL 0, except #BP and #OF, which `int3` and
 * `into` raise from CPL3 and which would otherwise turn into #GP. */
	.macro	gate vec, dpl=0
	.word	dv_fault_\vec - HANDLER_WINDOW
	.word	KERNEL_CS
	.byte	0				/* no IST */
	.byte	0x8e | (\dpl << 5)		/* present, 64-bit interrupt gate */
	.word	HANDLER_WINDOW >> 16
	.long	0				/* bits 63..32 of the address */
	.long	0
	.endm

	.section .rodata
	.balign	16
idt:
	.irp	v, 0,1,2
	gate	\v
	.endr
	gate	3, 3
	gate	4, 3
	.irp	v, 5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	gate	\v
	.endr
idt_end:

	.balign	8
	.word	0, 0, 0				/* aligns the base below */
idtr:
	.word	idt_end - idt - 1
	.quad	idt
