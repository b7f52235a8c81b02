/*
 * fn_hostile.c: an SDK function that breaks the function ABI on purpose, for
 * tests/fn_runtime_test.ts. It overwrites the runtime's mailbox (the program
 * and the runtime share the address space) and makes the EXIT hypercall
 * itself, so the host must catch every bad value. argv[1] picks the lie:
 *   stdout_len   DONE with stdout_len beyond the stdout buffer
 *   outcome      DONE with an outcome that does not exist
 *   enosys       DONE with more ENOSYS entries than the table has
 *   state        EXIT while the state still says READY
 *   magic        DONE with a broken magic
 */
#include <stdint.h>

#include "../../guest/fn/abi.h"
#include "dv_fn.h"

#define MB(off) ((volatile void *)(uintptr_t)(DV_FN_MAILBOX_ADDR + (off)))
#define MB32(off) (*(volatile uint32_t *)MB(off))
#define MB64(off) (*(volatile uint64_t *)MB(off))

static int eq(const char *a, const char *b) {
	while (*a && *a == *b) a++, b++;
	return *a == *b;
}

int main(int argc, char **argv) {
	const char *lie = argc > 1 ? argv[1] : "stdout_len";
	MB32(DV_FN_MB_OUTCOME) = DV_FN_OUTCOME_EXITED;
	MB32(DV_FN_MB_STATE) = DV_FN_STATE_DONE;
	if (eq(lie, "stdout_len")) MB64(DV_FN_MB_STDOUT_LEN) = 1ull << 40;
	else if (eq(lie, "outcome")) MB32(DV_FN_MB_OUTCOME) = 77;
	else if (eq(lie, "enosys")) MB32(DV_FN_MB_ENOSYS_COUNT) = DV_FN_ENOSYS_MAX + 1;
	else if (eq(lie, "state")) MB32(DV_FN_MB_STATE) = DV_FN_STATE_READY;
	else if (eq(lie, "magic")) MB32(DV_FN_MB_MAGIC) = 0;
	/* The EXIT hypercall (nr 2) through port 0x510, as the runtime makes it. */
	static volatile struct {
		uint32_t nr;
		int32_t status;
		uint64_t arg[4], ret;
	} block = {.nr = 2};
	__asm__ volatile("outl %0, %w1" ::"a"((uint32_t)(uintptr_t)&block), "Nd"(0x510) : "memory");
	return 0;
}
