/*
 * syscall.c: `arg` x 1000 system calls into the guest kernel (CPL3 -> CPL0 ->
 * CPL3 through SYSCALL/SYSRET; call 0 returns 1). No VM exit is involved unless
 * the host's KVM backend makes one of the mode switch. Natively each call is a
 * getppid(2).
 *
 * checksum: the sum of the calls' results.   ops: system calls.
 */
#include "dv_guest.h"

#define DEFAULT_THOUSANDS 200

int main(uint64_t arg)
{
	if (arg == 0)
		arg = DEFAULT_THOUSANDS;
	uint64_t n = arg * 1000;

	/* An unknown call must fail the same way in both builds. */
	if (dv_syscall0(12345) != -DV_ENOSYS) {
		dv_printf("syscall: unknown call did not return -ENOSYS\n");
		return 1;
	}

	uint64_t sum = 0;
	uint64_t t0 = dv_clock_ns();
	for (uint64_t i = 0; i < n; i++)
		sum += (uint64_t)dv_syscall0(0);
	uint64_t t1 = dv_clock_ns();

	dv_report_result("syscall", arg, sum, t1 - t0, n);
	return 0;
}
