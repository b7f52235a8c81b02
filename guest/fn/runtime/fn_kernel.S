/*
 * fn_kernel.S: the CPL0 part of the function runtime (the Linux personality).
 *
 * It includes the guest runtime's kernel.S for its exception stubs, interrupt
 * stubs and IDT (DV_KERNEL_OWN_ENTRY), and adds the three CPL0 paths this
 * runtime needs, each a handful of straight-line instructions (on PVM hosts
 * every CPL0 instruction is emulated, ~3000x slower than CPL3):
 *
 *   _start        CR4 (OSFXSR, OSXMMEXCPT, FSGSBASE, OSXSAVE) and XCR0 as CPUID
 *                 allows, EFER.SCE, STAR/LSTAR/SFMASK, the IDT, the runtime's
 *                 page tables, then iretq to fn_init_user (CPL3, fn_runtime.c)
 *   syscall       saves the user RSP and iretqs to fn_syscall_user (CPL3,
 *                 fn_entry.S): 9 instructions; arch_prctl(ARCH_SET_FS) alone is
 *                 served here (wrmsr FS_BASE needs CPL0)
 *   fault_common  an exception: iretq to fn_fault_user (CPL3) with
 *                 rdi = vector, rsi = error code, rdx = CR2 (#PF), rcx = RIP
 */
#define DV_KERNEL_OWN_ENTRY 1
#include "../../runtime/kernel.S"

#define MSR_EFER	0xc0000080
#define MSR_FS_BASE	0xc0000100
#define ARCH_SET_FS	0x1002
#define NR_ARCH_PRCTL	158
#define CR4_FSGSBASE	(1 << 16)
#define CR4_OSXSAVE	(1 << 18)
#define CR4_OSFXSR_XMM	0x600
#define FN_RT_STACK_BYTES 0x10000

	.section .text.entry, "ax"
	.code64

fault_common:
	mov	(%rsp), %rdi			/* vector */
	mov	8(%rsp), %rsi			/* error code */
	xor	%edx, %edx
	cmp	$14, %edi
	jne	1f
	mov	%cr2, %rdx
1:	mov	16(%rsp), %rcx			/* the faulting RIP */
	add	$16, %rsp
	movq	$fn_fault_user, (%rsp)
	movq	$USER_CS, 8(%rsp)
	movq	$USER_RFLAGS, 16(%rsp)
	movq	$fn_rt_stack_top, 24(%rsp)
	movq	$USER_SS, 32(%rsp)
	iretq

	.globl	_start
	.type	_start, @function
_start:
	mov	%rdi, %r8			/* cpuid clobbers rbx, rcx, rdx */
	mov	%rsi, %r9
	lidt	idtr(%rip)
	mov	$MSR_STAR, %ecx
	xor	%eax, %eax
	mov	$((USER_CS32 << 16) | KERNEL_CS), %edx
	wrmsr
	mov	$MSR_LSTAR, %ecx
	lea	fn_syscall_entry(%rip), %eax
	xor	%edx, %edx
	wrmsr
	mov	$MSR_SFMASK, %ecx
	mov	$SYSCALL_RFLAGS_MASK, %eax
	wrmsr
	mov	$MSR_EFER, %ecx
	rdmsr
	or	$1, %eax			/* SCE */
	wrmsr
	mov	%cr4, %r10
	or	$CR4_OSFXSR_XMM, %r10
	mov	$7, %eax
	xor	%ecx, %ecx
	cpuid
	test	$1, %bl				/* FSGSBASE */
	jz	1f
	or	$CR4_FSGSBASE, %r10
1:	mov	$1, %eax
	cpuid
	bt	$26, %ecx			/* XSAVE */
	jnc	2f
	or	$CR4_OSXSAVE, %r10
	mov	%r10, %cr4
	mov	$0xd, %eax
	xor	%ecx, %ecx
	cpuid					/* eax: the XCR0 bits the CPU supports */
	and	$7, %eax			/* x87 | SSE | AVX, no more */
	xor	%edx, %edx
	xor	%ecx, %ecx
	xsetbv
2:	mov	%r10, %cr4
	lea	fn_pml4(%rip), %rax
	mov	%rax, %cr3
	mov	%r8, %rdi
	mov	%r9, %rsi
	push	$USER_SS
	push	$fn_rt_stack_top
	push	$USER_RFLAGS
	push	$USER_CS
	push	$fn_init_user
	iretq
	.size	_start, . - _start

/*
 * SYSCALL from the program: rcx = its RIP, r11 = its RFLAGS, rax = the number,
 * arguments in rdi, rsi, rdx, r10, r8, r9. Nothing is touched but rsp (saved)
 * and, for ARCH_SET_FS, rax (the result) and rcx.
 */
	.globl	fn_syscall_entry
	.type	fn_syscall_entry, @function
fn_syscall_entry:
	cmp	$NR_ARCH_PRCTL, %eax
	je	2f
1:	mov	%rsp, fn_user_rsp
	mov	$SYSCALL_STACK, %esp
	push	$USER_SS
	push	$fn_rt_stack_top
	push	$USER_RFLAGS
	push	$USER_CS
	push	$fn_syscall_user
	iretq
2:	cmp	$ARCH_SET_FS, %edi
	jne	1b
	mov	%rsp, %r11
	mov	$SYSCALL_STACK, %esp
	push	$USER_SS
	push	%r11
	push	$USER_RFLAGS
	push	$USER_CS
	push	%rcx
	push	%rdx
	mov	%rsi, fn_fs_base
	mov	$MSR_FS_BASE, %ecx
	mov	%esi, %eax
	mov	%rsi, %rdx
	shr	$32, %rdx
	wrmsr
	pop	%rdx
	incq	fn_fs_calls
	xor	%eax, %eax
	iretq
	.size	fn_syscall_entry, . - fn_syscall_entry

/*
 * The runtime's page tables: the first 4 GiB identity-mapped like the VMM's,
 * but the VMM's low 64 KiB (GDT, page tables, TSS, exception stack) is
 * supervisor-only, so a NULL (or other low) pointer faults at CPL3. fn_init_user
 * clears the entries beyond guest RAM before anything touches them.
 */
	.data
	.balign	4096
	.globl	fn_pml4, fn_pd
fn_pml4:
	.quad	fn_pdpt + 7
	.fill	511, 8, 0
fn_pdpt:
	.quad	fn_pd + 7, fn_pd + 0x1007, fn_pd + 0x2007, fn_pd + 0x3007
	.fill	508, 8, 0
fn_pd:
	.quad	fn_pt0 + 7
	.set	page, 1
	.rept	2047
	.quad	(page << 21) | 0x87
	.set	page, page + 1
	.endr
fn_pt0:
	.set	page, 0
	.rept	16				/* 0..0x10000: supervisor only */
	.quad	(page << 12) | 0x3
	.set	page, page + 1
	.endr
	.rept	496
	.quad	(page << 12) | 0x7
	.set	page, page + 1
	.endr

	.bss
	.balign	16
	.globl	fn_user_rsp, fn_fs_base, fn_fs_calls, fn_rt_stack_top
fn_user_rsp:	.quad	0
fn_fs_base:	.quad	0
fn_fs_calls:	.quad	0
	.balign	4096
	.skip	FN_RT_STACK_BYTES
fn_rt_stack_top:
