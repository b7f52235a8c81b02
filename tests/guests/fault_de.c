/*
 * fault_de.c: divides by zero at CPL3: a divide error. Built with the guest
 * runtime (buildRuntimeGuest), entry mode long. The host sees FAULT: vector 0,
 * error code 0, address 0, rip = the symbol `fault_rip` (the div instruction).
 * Exits with status 99 if the division does not fault.
 */
#include "dv_guest.h"

int main(uint64_t arg)
{
	uint32_t quotient;
	__asm__ volatile(".globl fault_rip\n"
			 "fault_rip:\n\t"
			 "divl %2"
			 : "=a"(quotient)
			 : "a"(1u), "r"((uint32_t)arg * 0), "d"(0u));
	return (int)quotient + 99;
}
