/*
 * io.c: `arg` x 1000 WRITE hypercalls of 16 bytes each ("io 0123456789ab\n", the
 * call's index in hex). In a guest every call is a VM exit whose cost dominates;
 * natively each is a write(2) to /dev/null.
 *
 * checksum: FNV-1a over every byte written.   ops: writes.
 */
#include "dv_guest.h"

#define DEFAULT_THOUSANDS 20
#define LINE 16

int main(uint64_t arg)
{
	if (arg == 0)
		arg = DEFAULT_THOUSANDS;
	uint64_t n = arg * 1000;
	static const char hex[] = "0123456789abcdef";
	char line[LINE] = "io 000000000000\n";
	uint64_t sum = 0xcbf29ce484222325ull;

	uint64_t t0 = dv_clock_ns();
	for (uint64_t i = 0; i < n; i++) {
		for (int d = 0; d < 12; d++)
			line[14 - d] = hex[(i >> (4 * d)) & 15];
		int64_t written = dv_io_write(line, LINE);
		if (written != LINE) {
			dv_printf("io: write %llu returned %lld\n", (unsigned long long)i,
				  (long long)written);
			return 1;
		}
		for (int b = 0; b < LINE; b++)
			sum = (sum ^ (uint8_t)line[b]) * 0x100000001b3ull;
	}
	uint64_t t1 = dv_clock_ns();

	dv_report_result("io", arg, sum, t1 - t0, n);
	return 0;
}
