/*
 * fault_gp.c: writes at CPL3 to the non-canonical address 0x8000000000000000:
 * a general protection fault. Built with the guest runtime (buildRuntimeGuest),
 * entry mode long. The host sees FAULT: vector 13, error code 0, address 0,
 * rip = the symbol `fault_rip`. Exits with status 99 if the write does not fault.
 */
#include "dv_guest.h"

int main(uint64_t arg)
{
	(void)arg;
	__asm__ volatile(".globl fault_rip\n"
			 "fault_rip:\n\t"
			 "movq $1, (%0)"
			 :
			 : "r"(0x8000000000000000ull)
			 : "memory");
	return 99;
}
