/*
 * memory.c: `arg` MiB of fresh memory from dv_alloc. Every 4 KiB page is touched
 * once (its first write: a page fault on the host, and shadow or nested paging
 * work in a VM), then the whole buffer is streamed: one write pass, two
 * read-modify-write passes and a read pass that folds the contents into the
 * checksum. All of it inside the measured region.
 *
 * checksum: a fold of the final contents.   ops: bytes read or written.
 */
#include "dv_guest.h"

#define DEFAULT_MIB 128
#define PAGE 4096
#define RMW_PASSES 2

int main(uint64_t arg)
{
	if (arg == 0)
		arg = DEFAULT_MIB;
	uint64_t bytes = arg << 20;
	uint64_t words = bytes / 8, pages = bytes / PAGE;
	uint64_t *mem = dv_alloc(bytes);
	if (!mem) {
		dv_printf("memory: cannot allocate %llu MiB\n", (unsigned long long)arg);
		return 1;
	}

	uint64_t t0 = dv_clock_ns();
	for (uint64_t p = 0; p < pages; p++)
		mem[p * (PAGE / 8)] = p;
	for (uint64_t i = 0; i < words; i++)
		mem[i] = i * 0x9e3779b97f4a7c15ull;
	for (uint64_t pass = 1; pass <= RMW_PASSES; pass++)
		for (uint64_t i = 0; i < words; i++)
			mem[i] = (mem[i] ^ (mem[i] >> 29)) + pass;
	uint64_t sum = 0;
	for (uint64_t i = 0; i < words; i++)
		sum = (sum ^ mem[i]) * 0x100000001b3ull;
	uint64_t t1 = dv_clock_ns();

	uint64_t ops = pages * 8 + bytes * (1 + 2 * RMW_PASSES + 1);
	dv_report_result("memory", arg, sum, t1 - t0, ops);
	return 0;
}
