/*
 * smp_runtime.c: the guest runtime on several vCPUs. Every vCPU sums its share
 * of 1..arg; the last one to finish adds the shares up, REPORTs the total (8
 * bytes) and returns 0, which EXITs the VM; the others wait for that. Built with
 * buildRuntimeGuest, entry mode long, r8 = vCPU index and r9 = vCPU count.
 */
#include "dv_guest.h"

#define MAX_VCPUS 64

static volatile uint64_t partial[MAX_VCPUS];
static uint32_t finished;

int dv_vcpu_main(uint64_t arg, uint64_t vcpu, uint64_t vcpus)
{
	if (vcpus == 0 || vcpus > MAX_VCPUS || vcpu >= vcpus)
		return 2;
	uint64_t lo = vcpu * arg / vcpus, hi = (vcpu + 1) * arg / vcpus, sum = 0;
	for (uint64_t i = lo + 1; i <= hi; i++)
		sum += i;
	partial[vcpu] = sum;
	if (__atomic_add_fetch(&finished, 1, __ATOMIC_SEQ_CST) != vcpus)
		for (;;)
			__builtin_ia32_pause();
	uint64_t total = 0;
	for (uint64_t i = 0; i < vcpus; i++)
		total += partial[i];
	dv_report(&total, sizeof total);
	return 0;
}
