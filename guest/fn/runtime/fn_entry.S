/*
 * fn_entry.S: the runtime's CPL3 entry points, reached from fn_kernel.S by
 * iretq on the runtime's own stack (fn_rt_stack_top).
 */
	.text
	.code64

/* Init: rdi = bundle address, rsi = RAM bytes. fn_init does not return. */
	.globl	fn_init_user
fn_init_user:
	xor	%ebp, %ebp
	call	fn_init
	ud2

/*
 * A system call of the program: rax = number, rcx = its return RIP, arguments
 * in rdi, rsi, rdx, r10, r8, r9, its RSP in fn_user_rsp. Every register but
 * rax, rcx and r11 is given back unchanged (the C code is general-registers
 * only, so the vector state is untouched too), then the program continues at
 * its RIP on its own stack: no CPL0 instruction on the way back.
 */
	.globl	fn_syscall_user
fn_syscall_user:
	push	%rcx
	push	%rdi
	push	%rsi
	push	%rdx
	push	%r10
	push	%r8
	push	%r9
	push	%rax			/* the 7th argument: nr */
	mov	%r10, %rcx
	call	fn_syscall
	pop	%r9			/* nr: dropped */
	pop	%r9
	pop	%r8
	pop	%r10
	pop	%rdx
	pop	%rsi
	pop	%rdi
	pop	%rcx
	mov	fn_user_rsp(%rip), %rsp
	jmp	*%rcx

/* An exception: rdi = vector, rsi = error code, rdx = CR2, rcx = RIP. */
	.globl	fn_fault_user
fn_fault_user:
	xor	%ebp, %ebp
	call	fn_fault
	ud2

/* fn_enter_program(entry, sp): jumps to the program with the registers a
 * Linux process starts with (all zero; rdx = 0: no exit handler to register). */
	.globl	fn_enter_program
fn_enter_program:
	mov	%rsi, %rsp
	mov	%rdi, %rcx
	xor	%eax, %eax
	xor	%ebx, %ebx
	xor	%edx, %edx
	xor	%esi, %esi
	xor	%edi, %edi
	xor	%ebp, %ebp
	xor	%r8d, %r8d
	xor	%r9d, %r9d
	xor	%r10d, %r10d
	xor	%r11d, %r11d
	xor	%r12d, %r12d
	xor	%r13d, %r13d
	xor	%r14d, %r14d
	xor	%r15d, %r15d
	jmp	*%rcx
