/*
 * virtio_rng.c: drives virtio-rng with the runtime's virtio driver for
 * tests/guest_virtio_test.ts.
 *
 * arg bits 0-31: bytes to read (at most 4096); bit 32 clear: read them in one
 * request and REPORT {"status":S,"features":F,"queueSize":Q,"len":L,"hex":"..."}.
 * Bit 32 set: the hostile-driver cases, each followed by a reset and a read that
 * must work again; REPORT {"cases":[{"name":..,"status":S,"used":U,
 * "recovered":S2,"len":L,"distinct":D},...]} where S is the status read after
 * the bad act (NEEDS_RESET expected), U how many used elements the device
 * posted for it, S2 the status after the reset and re-initialization, L the
 * bytes the next read got and D how many distinct byte values they held.
 * Bit 33 set: with MSI-X: a queue vector past the table (read back), then
 * entry 0 to vector 0x40, a read, and its interrupt counted; REPORT
 * {"badEntry":B,"entry":E,"len":L,"irqs":N,"distinct":D}.
 * One case hands the device the last 8 bytes of RAM (and 56 past it), so load
 * this guest with its stack below the last page of RAM.
 */
#include "dv_guest.h"
#include "dv_virtio.h"

#define TIMEOUT_NS 10000000000ull /* 10 s: kvmbox runs ~8x slower than hardware */
#define MAX_BYTES 4096

static char out[16384];
static size_t len;
#define PUT(...) \
	(len += dv_format(out + (len < sizeof out ? len : sizeof out), \
			  len < sizeof out ? sizeof out - len : 0, __VA_ARGS__))

static struct dv_virtio dev;
static struct dv_virtq queue;
static uint8_t buffer[MAX_BYTES] __attribute__((aligned(4096)));

/* init, queue 0 of `size` (0: the maximum), DRIVER_OK; returns the status or an error. */
static int start(uint16_t size)
{
	int e = dv_virtio_init(&dev, 0);
	if (e < 0)
		return e;
	e = dv_virtq_setup(&dev, &queue, 0, size);
	if (e < 0)
		return e;
	return dv_virtio_driver_ok(&dev);
}

/* One request for `n` random bytes into buffer; returns the length written or an error. */
static int64_t read_random(uint32_t n)
{
	struct dv_virtq_buf b = { (uintptr_t)buffer, n, 1 };
	int head = dv_virtq_add(&queue, &b, 1);
	if (head < 0)
		return head;
	dv_virtq_kick(&queue);
	uint32_t written = 0;
	int got = dv_virtq_wait(&queue, &written, TIMEOUT_NS);
	if (got < 0)
		return got;
	return got == head ? (int64_t)written : -100;
}

static int distinct(const uint8_t *p, uint32_t n)
{
	uint8_t seen[256] = { 0 };
	int count = 0;
	for (uint32_t i = 0; i < n; i++)
		if (!seen[p[i]]++)
			count++;
	return count;
}

static uint16_t used_index(void)
{
	return *(volatile uint16_t *)(queue.used + 2);
}

/* A raw descriptor, as a hostile driver writes it. */
static void raw_desc(uint16_t i, uint64_t addr, uint32_t n, uint16_t flags, uint16_t next)
{
	queue.desc[i].addr = addr;
	queue.desc[i].len = n;
	queue.desc[i].flags = flags;
	queue.desc[i].next = next;
}

enum hostile { LOOP, OUTSIDE_RAM, STRADDLES_RAM, QUEUE_SIZE_3, REWRITE_QUEUE, CASES };
static const char *const names[CASES] = { "loop", "outside-ram", "straddles-ram",
					  "queue-size-3", "rewrite-queue" };

static void hostile(enum hostile c)
{
	const uint16_t w = DV_VIRTQ_DESC_F_WRITE, next = DV_VIRTQ_DESC_F_NEXT;
	int status = start(c == QUEUE_SIZE_3 ? 3 : 0);
	uint16_t used_before = used_index();
	switch (c) {
	case LOOP: /* 0 -> 1 -> 0 */
		raw_desc(0, (uintptr_t)buffer, 16, w | next, 1);
		raw_desc(1, (uintptr_t)buffer + 16, 16, w | next, 0);
		dv_virtq_publish(&queue, 0);
		dv_virtq_kick(&queue);
		break;
	case OUTSIDE_RAM:
		raw_desc(0, 1ull << 40, 64, w, 0);
		dv_virtq_publish(&queue, 0);
		dv_virtq_kick(&queue);
		break;
	case STRADDLES_RAM:
		raw_desc(0, dv_ram_bytes - 8, 64, w, 0);
		dv_virtq_publish(&queue, 0);
		dv_virtq_kick(&queue);
		break;
	case QUEUE_SIZE_3: /* DRIVER_OK was refused: nothing more to do */
		break;
	case REWRITE_QUEUE: { /* a new descriptor table under the running device */
		volatile uint32_t *desc_low =
			(volatile uint32_t *)(dev.common + DV_VIRTIO_COMMON_Q_DESC);
		*desc_low = (uint32_t)(uintptr_t)buffer;
		break;
	}
	default:
		break;
	}
	if (status >= 0)
		status = dv_virtio_wait_status(&dev, DV_VIRTIO_NEEDS_RESET, TIMEOUT_NS);
	uint16_t used = (uint16_t)(used_index() - used_before);
	/* Recovery: a reset (dv_virtio_init starts with one) and an ordinary read. */
	int recovered = start(0);
	for (uint32_t i = 0; i < 64; i++)
		buffer[i] = 0;
	int64_t got = recovered >= 0 ? read_random(64) : recovered;
	PUT("%s{\"name\":\"%s\",\"status\":%d,\"used\":%u,\"recovered\":%d,\"len\":%lld,"
	    "\"distinct\":%d}",
	    c ? "," : "", names[c], status, used, recovered, (long long)got,
	    got > 0 ? distinct(buffer, (uint32_t)got) : 0);
}

/* The read again, completed by an MSI-X interrupt. */
static int with_msix(void)
{
	const uint8_t vector = 0x40;
	if (dv_irq_init() != 0)
		return 3;
	int e = dv_virtio_init(&dev, 0);
	if (e == 0)
		e = dv_virtq_setup(&dev, &queue, 0, 0);
	if (e < 0)
		return 4;
	/* An entry past the table reads back as NO_VECTOR; then entry 0. */
	int bad = dv_virtq_use_msix(&queue, dev.msix_vectors, vector);
	int entry = dv_virtq_use_msix(&queue, 0, vector);
	int status = dv_virtio_driver_ok(&dev);
	struct dv_virtq_buf b = { (uintptr_t)buffer, 256, 1 };
	int head = dv_virtq_add(&queue, &b, 1);
	dv_virtq_kick(&queue);
	/* Wait for the interrupt, not the used ring (bounded: the clock every 20,000 polls). */
	uint64_t deadline = dv_clock_ns() + TIMEOUT_NS;
	while (dv_irq_counts[vector] == 0 && dv_clock_ns() < deadline)
		for (int i = 0; i < 20000 && dv_irq_counts[vector] == 0; i++)
			__asm__ volatile("pause");
	uint64_t irqs = dv_irq_counts[vector];
	uint32_t got = 0;
	int used = dv_virtq_used(&queue, &got);
	PUT("{\"status\":%d,\"badEntry\":%d,\"entry\":%d,\"head\":%d,\"used\":%d,\"len\":%u,"
	    "\"irqs\":%llu,\"distinct\":%d}",
	    status, bad, entry, head, used, got, (unsigned long long)irqs,
	    distinct(buffer, got <= MAX_BYTES ? got : 0));
	dv_report(out, len);
	return 0;
}

int main(uint64_t arg)
{
	uint32_t n = (uint32_t)arg;
	if (n > MAX_BYTES)
		n = MAX_BYTES;
	int bdf = dv_virtio_find(DV_VIRTIO_PCI_DEVICE(DV_VIRTIO_TYPE_RNG), -1);
	if (bdf < 0 || dv_virtio_open(&dev, (uint16_t)bdf) != 0) {
		dv_printf("no virtio-rng device\n");
		return 2;
	}
	if (arg >> 33 & 1)
		return with_msix();
	if (arg >> 32 & 1) {
		PUT("{\"cases\":[");
		for (int c = 0; c < CASES; c++)
			hostile((enum hostile)c);
		PUT("]}");
		dv_report(out, len);
		return 0;
	}
	int status = start(0);
	int64_t got = status >= 0 ? read_random(n) : status;
	PUT("{\"status\":%d,\"features\":%llu,\"queueSize\":%u,\"len\":%lld,\"hex\":\"", status,
	    (unsigned long long)dev.features, queue.size, (long long)got);
	for (int64_t i = 0; i < got; i++)
		PUT("%02x", buffer[i]);
	PUT("\"}");
	dv_report(out, len);
	return got == (int64_t)n ? 0 : 1;
}
