/*
 * irq_timer.c: the local APIC timer's rate, for tests/irq_test.ts and
 * bench/irq_bench.ts.
 *
 * arg bits 0-31: the rate in Hz; bits 32-47: how long to measure, in ms;
 * bit 48: wait halted (dv_irq_wait_count) instead of spinning at CPL3.
 * Synchronizes on one tick, then measures the host clock over the next
 * hz * ms / 1000 ticks and reports
 * {"hz":H,"ticks":N,"ns":T,"initialCount":C}.
 */
#include "dv_guest.h"

static uint64_t wait_ticks(uint64_t target, int halt)
{
	if (halt)
		return dv_irq_wait_count(DV_TIMER_VECTOR, target);
	uint64_t n;
	while ((n = dv_irq_counts[DV_TIMER_VECTOR]) < target)
		__asm__ volatile("pause");
	return n;
}

int main(uint64_t arg)
{
	uint32_t hz = (uint32_t)arg;
	uint64_t ms = (arg >> 32) & 0xffff;
	int halt = (arg >> 48) & 1;
	uint64_t ticks = hz * ms / 1000;
	if (hz == 0 || ticks == 0)
		return 2;
	if (dv_irq_init() != 0)
		return 3;
	uint32_t initial = dv_timer_start(hz);
	uint64_t first = wait_ticks(1, halt);
	uint64_t t0 = dv_clock_ns();
	uint64_t last = wait_ticks(first + ticks, halt);
	uint64_t t1 = dv_clock_ns();
	dv_timer_stop();
	char buf[160];
	size_t n = dv_format(buf, sizeof buf, "{\"hz\":%u,\"ticks\":%llu,\"ns\":%llu,\"initialCount\":%u}",
			     hz, (unsigned long long)(last - first), (unsigned long long)(t1 - t0),
			     initial);
	dv_report(buf, n);
	return 0;
}
