/*
 * crt0.S: the first user-mode (CPL3) code of every runtime guest. kernel.S
 * enters it with iretq, with the registers the host set at entry:
 * rdi = the workload's argument, rsi = guest RAM in bytes, RSP = the top of guest
 * RAM below 4 GiB. It records the RAM size and stack top for dv_alloc, calls
 * `int main(uint64_t arg)` and hands its result to EXIT.
 *
 * A program that runs on several vCPUs defines `int dv_vcpu_main(uint64_t arg,
 * uint64_t vcpu, uint64_t vcpus)` instead: every vCPU enters here on its own
 * stack, and the host puts the vCPU's index in r8 and the vCPU count in r9
 * (kernel.S leaves both alone). Both entry points are weak, so a program
 * defines one or the other.
 */
	.weak	main
	.weak	dv_vcpu_main

	.text
	.globl	dv_user_start
	.type	dv_user_start, @function
dv_user_start:
	mov	%rsi, dv_ram_bytes(%rip)
	mov	%rsp, dv_stack_top(%rip)
	and	$-16, %rsp		/* the SysV ABI's alignment at a call */
	xor	%ebp, %ebp		/* end of the frame chain */
	lea	dv_vcpu_main(%rip), %rax	/* 0 unless the program defines it */
	test	%rax, %rax
	jz	1f
	mov	%r8, %rsi
	mov	%r9, %rdx
	call	*%rax			/* dv_vcpu_main(rdi, r8, r9) */
	jmp	2f
1:	call	main			/* main(rdi) */
2:	mov	%eax, %edi
	call	dv_exit_status		/* does not return */
	ud2
	.size	dv_user_start, . - dv_user_start
