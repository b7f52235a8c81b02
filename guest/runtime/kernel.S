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
 *   irq      3 instructions: count, EOI, iretq (vectors 32-254; 255 is 1, iretq)
 *   trap     9 to 14 instructions: a user-mode hlt turns interrupts on or off, or
 *            halts until one arrives (see dv_fault_13)
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
/* The interrupt trap: a `hlt` at CPL3 (which takes #GP) with eax = */
#define TRAP_IRQ_ON	0	/* return with interrupts enabled */
#define TRAP_IRQ_OFF	1	/* return with interrupts disabled */
#define TRAP_IRQ_WAIT	2	/* rdi = &counter, rsi = target: halt unless reached */
#define HLT_OPCODE	0xf4
#define RFLAGS_IF_BIT	9
/* The local APIC's EOI register (identity-mapped, in the MMIO hole). */
#define LAPIC_EOI	0xfee000b0
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

	.irp	v, 0,1,2,3,4,5,6,7,8,9,10,11,12,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	fault_stub \v
	.endr

/*
 * A kernel that includes this file with DV_KERNEL_OWN_ENTRY defined (the function
 * runtime's, guest/fn/runtime/fn_kernel.S) keeps the exception stubs, the
 * interrupt stubs and the IDT, and brings its own `fault_common`, `_start` and
 * system-call entry; #GP is then a plain fault (no interrupt trap).
 */
#ifdef DV_KERNEL_OWN_ENTRY
	fault_stub 13
#else

/*
 * #GP, which is also the interrupt trap: user code controls interrupts by
 * executing `hlt` (privileged, so it takes #GP) with an operation in eax. This
 * handler is real CPL0 code on every host, so it can do what user mode cannot:
 * PVM refuses `sti`, `cli` and `popf`'s IF at CPL3 (even with IOPL = 3), and does
 * not apply IF from the iretq frame on the system call path; the iretq of an
 * exception handler it does apply. On hardware virtualization the same trap works
 * unchanged.
 *   eax 0  return with interrupts enabled (IF set in the frame)
 *   eax 1  return with interrupts disabled
 *   eax 2  rdi = &counter, rsi = target: unless *counter >= target, sti; hlt
 *          (sleep until an interrupt has been handled); return enabled
 * With interrupts off while it checks the counter (this is an interrupt gate),
 * and sti's one-instruction shadow before the hlt, an interrupt that arrives
 * after the check wakes the hlt instead of being slept through. rcx is
 * preserved, every other register too; any other #GP is reported as a fault.
 *   frame: rsp+0 saved rcx  +8 error code  +16 RIP  +24 CS  +32 RFLAGS
 */
dv_fault_13:
	push	%rcx
	mov	16(%rsp), %rcx
	cmpb	$HLT_OPCODE, (%rcx)
	jne	3f
	incq	16(%rsp)			/* resume after the hlt */
	btsq	$RFLAGS_IF_BIT, 32(%rsp)
	cmp	$TRAP_IRQ_OFF, %eax
	jne	1f
	btrq	$RFLAGS_IF_BIT, 32(%rsp)
1:	cmp	$TRAP_IRQ_WAIT, %eax
	jne	2f
	cmp	%rsi, (%rdi)
	jae	2f
	sti
	hlt
2:	pop	%rcx
	add	$8, %rsp			/* the error code */
	iretq
3:	pop	%rcx
	push	$13
	jmp	fault_common
#endif

/*
 * Interrupt entry points for vectors 32-254: count the interrupt in
 * dv_irq_counts[vector], signal end-of-interrupt to the local APIC (the value
 * written is ignored: `movabs` stores eax without needing a free register) and
 * return. Three instructions, because on PVM each one at CPL0 is emulated. No
 * register is touched, so nothing is saved. Interrupts from the PIC (ExtINT)
 * would need a PIC EOI instead; dv_irq_init() masks the PIC.
 */
#define IRQ_FIRST	32
#define IRQ_COUNT	223	/* vectors 32..254 */
#define IRQ_STUB_SIZE	19	/* 8 + 9 + 2 bytes: the gates below rely on it */
dv_irq_stubs:
	.set	vector, IRQ_FIRST
	.rept	IRQ_COUNT
	lock incq dv_irq_counts + 8 * vector(%rip)
	movabs	%eax, LAPIC_EOI
	iretq
	.set	vector, vector + 1
	.endr
dv_irq_stubs_end:
	.if	dv_irq_stubs_end - dv_irq_stubs - IRQ_COUNT * IRQ_STUB_SIZE
	.error	"an interrupt stub is not IRQ_STUB_SIZE bytes long"
	.endif

/* The local APIC's spurious vector: no count, no EOI (the APIC expects none). */
dv_irq_spurious:
	iretq

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
#ifndef DV_KERNEL_OWN_ENTRY
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
#endif

/*
 * The ELF entry: install the IDT and the SYSCALL MSRs, then drop to CPL3 at
 * dv_user_start (crt0.S) on the same stack with rdi and rsi as the host set them.
 */
#ifndef DV_KERNEL_OWN_ENTRY
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
 *
 * A system call leaves interrupts disabled for user mode: SFMASK clears IF, and
 * USER_RFLAGS has IF = 0 (on PVM this iretq would not restore IF anyway, see the
 * interrupt trap below). dv_irq_enable() turns them back on.
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
#endif

/* Interrupts counted by vector; published to the host by dv_irq_init(). */
	.bss
	.balign	64
	.globl	dv_irq_counts
dv_irq_counts:
	.skip	256 * 8

/* Interrupt gates (IF stays 0): DPL 0, except #BP and #OF, which `int3` and
 * `into` raise from CPL3 and which would otherwise turn into #GP. */
	.macro	gate vec, dpl=0
	gate_at	dv_fault_\vec, \dpl
	.endm

	.macro	gate_at handler, dpl=0
	.word	\handler - HANDLER_WINDOW
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
	.set	vector, IRQ_FIRST
	.rept	IRQ_COUNT
	gate_at	dv_irq_stubs+(vector-IRQ_FIRST)*IRQ_STUB_SIZE	/* one argument: no spaces */
	.set	vector, vector + 1
	.endr
	gate_at	dv_irq_spurious
idt_end:

	.balign	8
	.word	0, 0, 0				/* aligns the base below */
idtr:
	.word	idt_end - idt - 1
	.quad	idt
