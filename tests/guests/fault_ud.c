/*
 * fault_ud.c: executes ud2 at CPL3: an invalid opcode fault. Built with the guest
 * runtime (buildRuntimeGuest), entry mode long. The host sees FAULT: vector 6,
 * error code 0, address 0, rip = the symbol `fault_rip`.
 * Exits with status 99 if ud2 does not fault.
 */
#include "dv_guest.h"

int main(uint64_t arg)
{
	(void)arg;
	__asm__ volatile(".globl fault_rip\n"
			 "fault_rip:\n\t"
			 "ud2");
	return 99;
}
