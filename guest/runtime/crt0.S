/*
 * crt0.S: the first user-mode (CPL3) code of every runtime guest. kernel.S
 * enters it with iretq, with the registers the host set at entry:
 * rdi = the workload's argument, rsi = guest RAM in bytes, RSP = the top of guest
 * RAM below 4 GiB. It records the RAM size and stack top for dv_alloc, calls
 * `int main(uint64_t arg)` and hands its result to EXIT.
 */
	.text
	.globl	dv_user_start
	.type	dv_user_start, @function
dv_user_start:
	mov	%rsi, dv_ram_bytes(%rip)
	mov	%rsp, dv_stack_top(%rip)
	and	$-16, %rsp		/* the SysV ABI's alignment at a call */
	xor	%ebp, %ebp		/* end of the frame chain */
	call	main			/* main(rdi) */
	mov	%eax, %edi
	call	dv_exit_status		/* does not return */
	ud2
	.size	dv_user_start, . - dv_user_start
