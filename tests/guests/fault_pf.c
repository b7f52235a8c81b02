/*
 * fault_pf.c: writes at CPL3 to 0x100000000, just past the 4 GiB the VMM's page
 * tables map: a page fault. Built with the guest runtime (buildRuntimeGuest),
 * entry mode long. The host sees FAULT: vector 14, error code 6 (not present,
 * write, user mode), address 0x100000000, rip = the symbol `fault_rip`.
 * Exits with status 99 if the write does not fault.
 */
#include "dv_guest.h"

int main(uint64_t arg)
{
	(void)arg;
	__asm__ volatile(".globl fault_rip\n"
			 "fault_rip:\n\t"
			 "movq $1, (%0)"
			 :
			 : "r"(0x100000000ull)
			 : "memory");
	return 99;
}
