/*
 * irq_count.c: counts interrupts for tests/irq_test.ts and bench/irq_bench.ts.
 *
 * arg bits 0-31: how many interrupts of vector `arg >> 40 & 0xff` to wait for
 * (0 = vector 0x25, line 5); bit 32: wait halted (dv_irq_wait_count) instead of
 * spinning at CPL3 on the counter. Reports
 * {"vector":V,"count":N,"total":T,"exits":0} where total counts every vector.
 */
#include "dv_guest.h"

int main(uint64_t arg)
{
	uint32_t want = (uint32_t)arg;
	int halt = (arg >> 32) & 1;
	uint32_t vector = (arg >> 40) & 0xff;
	if (vector == 0)
		vector = DV_IRQ_VECTOR_BASE + 5;
	if (dv_irq_init() != 0)
		return 3;
	uint64_t count;
	if (halt) {
		count = dv_irq_wait_count(vector, want);
	} else {
		while ((count = dv_irq_counts[vector]) < want)
			__asm__ volatile("pause");
	}
	uint64_t total = 0;
	for (int v = 0; v < 256; v++)
		total += dv_irq_counts[v];
	char buf[128];
	size_t n = dv_format(buf, sizeof buf, "{\"vector\":%u,\"count\":%llu,\"total\":%llu}", vector,
			     (unsigned long long)count, (unsigned long long)total);
	dv_report(buf, n);
	return 0;
}
