/*
 * virtio_blk.c: drives virtio-blk with the runtime's virtio driver for
 * tests/guest_blk_vsock_test.ts. Every request is one chain: a 16-byte header
 * the device reads, the data buffers, and a status byte the device writes.
 *
 * The disk's bytes follow two patterns the test computes too: the host fills
 * the image with host_byte(offset) and the guest writes guest_byte(offset).
 *
 * arg 0 (a writable disk): negotiates VERSION_1 and the features it uses,
 * reads the capacity and GET_ID's serial, writes three regions (sectors 3-10
 * over three data descriptors, 64 KiB at sector 64 over sixteen, the last
 * sector with its header and data in one descriptor), reads them back through
 * other splits, reads an untouched region (host pattern), FLUSHes, and sends
 * the requests that must fail: reads past the end, a write that is not whole
 * sectors, an unknown type.
 * arg 1 (a read-only disk): a write (IOERR expected), a read, a FLUSH.
 * arg 2 (a writable disk): hostile chains, each followed by a reset and a read
 * that must work again (see `hostile`).
 * arg 3 (any disk): reads the first 64 KiB into `data` again and again, until
 * the host stops the VM (tests/dirty_pages_test.ts: only the device writes
 * `data`).
 * REPORTs one JSON object; the status of each request is the byte the device
 * wrote (0 OK, 1 IOERR, 2 UNSUPP) or a negative driver error.
 *
 * One hostile case hands the device a buffer that straddles the end of RAM,
 * so load this guest with its stack below the last page of RAM.
 */
#include "dv_guest.h"
#include "dv_virtio.h"

#define TIMEOUT_NS 10000000000ull /* 10 s: kvmbox runs ~8x slower than hardware */
#define SECTOR 512u

/* virtio spec 5.2: feature bits, request types, status values, config layout. */
#define BLK_F_SIZE_MAX (1ull << 1)
#define BLK_F_SEG_MAX (1ull << 2)
#define BLK_F_RO (1ull << 5)
#define BLK_F_BLK_SIZE (1ull << 6)
#define BLK_F_FLUSH (1ull << 9)
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_ID_BYTES 20
#define CFG_CAPACITY 0
#define CFG_SEG_MAX 12
#define CFG_BLK_SIZE 20

static char out[8192];
static size_t len;
#define PUT(...) \
	(len += dv_format(out + (len < sizeof out ? len : sizeof out), \
			  len < sizeof out ? sizeof out - len : 0, __VA_ARGS__))

static struct dv_virtio dev;
static struct dv_virtq queue;

static struct {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
} header __attribute__((aligned(16)));
static volatile uint8_t status_byte;
static uint8_t data[64 << 10] __attribute__((aligned(4096)));
static uint8_t check[64 << 10] __attribute__((aligned(4096)));
static char serial[BLK_ID_BYTES + 1];

/* The patterns; tests/guest_blk_vsock_test.ts has the same two functions. */
static uint8_t host_byte(uint64_t o)
{
	return (uint8_t)(o * 13 + (o >> 9) + 1);
}
static uint8_t guest_byte(uint64_t o)
{
	return (uint8_t)((o * 7) ^ (o >> 9) ^ 0xa5);
}

static void fill(uint8_t *p, uint64_t offset, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		p[i] = guest_byte(offset + i);
}

/* Bytes of `p` that differ from `pattern` at disk offset `offset`. */
static uint32_t mismatches(const uint8_t *p, uint64_t offset, uint32_t n,
			   uint8_t (*pattern)(uint64_t))
{
	uint32_t bad = 0;
	for (uint32_t i = 0; i < n; i++)
		bad += p[i] != pattern(offset + i);
	return bad;
}

/* reset, features, queue 0 at its maximum size, DRIVER_OK: the status or an error. */
static int start(uint64_t wanted)
{
	int e = dv_virtio_init(&dev, wanted);
	if (e < 0)
		return e;
	e = dv_virtq_setup(&dev, &queue, 0, 0);
	if (e < 0)
		return e;
	return dv_virtio_driver_ok(&dev);
}

/*
 * One request: header (type, sector), `n` data buffers, the status byte.
 * Returns the status the device wrote, or a negative error; `*used` gets the
 * used element's length.
 */
static int request(uint32_t type, uint64_t sector, const struct dv_virtq_buf *bufs, unsigned n,
		   uint32_t *used)
{
	struct dv_virtq_buf chain[24];
	if (n + 2 > sizeof chain / sizeof chain[0])
		return -100;
	header.type = type;
	header.reserved = 0;
	header.sector = sector;
	status_byte = 0xff;
	chain[0] = (struct dv_virtq_buf){ (uintptr_t)&header, sizeof header, 0 };
	for (unsigned i = 0; i < n; i++)
		chain[i + 1] = bufs[i];
	chain[n + 1] = (struct dv_virtq_buf){ (uintptr_t)&status_byte, 1, 1 };
	int head = dv_virtq_add(&queue, chain, n + 2);
	if (head < 0)
		return head;
	dv_virtq_kick(&queue);
	*used = 0;
	int got = dv_virtq_wait(&queue, used, TIMEOUT_NS);
	if (got < 0)
		return got;
	return got == head ? status_byte : -101;
}

/* `n` bytes of `p` as `parts` equal buffers (the last takes the rest). */
static unsigned split(struct dv_virtq_buf *bufs, uint8_t *p, uint32_t n, unsigned parts,
		      int device_writes)
{
	uint32_t each = n / parts;
	for (unsigned i = 0; i < parts; i++)
		bufs[i] = (struct dv_virtq_buf){ (uintptr_t)(p + i * each),
						 i + 1 < parts ? each : n - i * each,
						 device_writes };
	return parts;
}

/*
 * PUTs `"name":{"status":S,"used":U}` with `*used` read after `status` was
 * computed (a function's arguments are evaluated in no set order).
 */
static void put_request(const char *name, int status, const uint32_t *used)
{
	PUT(",\"%s\":{\"status\":%d,\"used\":%u}", name, status, *used);
}

/* Reads `sectors` from `sector` into `check` through `parts` buffers. */
static int read_into_check(uint64_t sector, uint32_t sectors, unsigned parts, uint32_t *used)
{
	struct dv_virtq_buf b[16];
	split(b, check, sectors * SECTOR, parts, 1);
	for (uint32_t i = 0; i < sectors * SECTOR; i++)
		check[i] = 0;
	return request(BLK_T_IN, sector, b, parts, used);
}

static int writable_disk(void)
{
	const uint64_t wanted = BLK_F_SIZE_MAX | BLK_F_SEG_MAX | BLK_F_BLK_SIZE | BLK_F_FLUSH;
	int s = start(wanted);
	uint64_t capacity = dv_virtio_config64(&dev, CFG_CAPACITY);
	PUT("{\"status\":%d,\"offered\":%llu,\"features\":%llu,\"capacity\":%llu,\"segMax\":%u,"
	    "\"blkSize\":%u",
	    s, (unsigned long long)dev.device_features, (unsigned long long)dev.features,
	    (unsigned long long)capacity, dv_virtio_config32(&dev, CFG_SEG_MAX),
	    dv_virtio_config32(&dev, CFG_BLK_SIZE));
	if (s < 0 || capacity < 256)
		return 1;
	uint32_t used;
	struct dv_virtq_buf b[16];

	/* GET_ID: 20 bytes, NUL-padded when shorter. */
	for (unsigned i = 0; i <= BLK_ID_BYTES; i++)
		serial[i] = 0;
	b[0] = (struct dv_virtq_buf){ (uintptr_t)serial, BLK_ID_BYTES, 1 };
	put_request("getId", request(BLK_T_GET_ID, 0, b, 1, &used), &used);
	PUT(",\"serial\":\"%s\"", serial);

	/* Writes. Sectors 3-10 over three odd-sized buffers (whole sectors only in total). */
	fill(data, 3 * SECTOR, 4096);
	b[0] = (struct dv_virtq_buf){ (uintptr_t)data, 1000, 0 };
	b[1] = (struct dv_virtq_buf){ (uintptr_t)data + 1000, 2072, 0 };
	b[2] = (struct dv_virtq_buf){ (uintptr_t)data + 3072, 1024, 0 };
	put_request("write3", request(BLK_T_OUT, 3, b, 3, &used), &used);
	/* 64 KiB at sector 64 over sixteen 4 KiB buffers. */
	fill(data, 64 * SECTOR, sizeof data);
	put_request("write64",
		    request(BLK_T_OUT, 64, b, split(b, data, sizeof data, 16, 0), &used), &used);
	/* The last sector, its data in the header's descriptor (any layout, VERSION_1). */
	static struct {
		uint32_t type, reserved;
		uint64_t sector;
		uint8_t bytes[SECTOR];
	} whole;
	whole.type = BLK_T_OUT;
	whole.reserved = 0;
	whole.sector = capacity - 1;
	fill(whole.bytes, (capacity - 1) * SECTOR, SECTOR);
	status_byte = 0xff;
	struct dv_virtq_buf one[2] = { { (uintptr_t)&whole, sizeof whole, 0 },
				       { (uintptr_t)&status_byte, 1, 1 } };
	int head = dv_virtq_add(&queue, one, 2);
	dv_virtq_kick(&queue);
	int got = dv_virtq_wait(&queue, &used, TIMEOUT_NS);
	put_request("writeLast", head < 0 ? head : got < 0 ? got : got == head ? status_byte : -101,
		    &used);

	/* Read everything back through other splits and compare. */
	int r = read_into_check(3, 8, 2, &used);
	PUT(",\"read3\":{\"status\":%d,\"used\":%u,\"bad\":%u}", r, used,
	    mismatches(check, 3 * SECTOR, 4096, guest_byte));
	r = read_into_check(64, 128, 1, &used);
	PUT(",\"read64\":{\"status\":%d,\"used\":%u,\"bad\":%u}", r, used,
	    mismatches(check, 64 * SECTOR, sizeof check, guest_byte));
	r = read_into_check(capacity - 1, 1, 3, &used);
	PUT(",\"readLast\":{\"status\":%d,\"used\":%u,\"bad\":%u}", r, used,
	    mismatches(check, (capacity - 1) * SECTOR, SECTOR, guest_byte));
	/* An untouched region holds what the host wrote. */
	r = read_into_check(200, 8, 4, &used);
	PUT(",\"readHost\":{\"status\":%d,\"used\":%u,\"bad\":%u,\"hex\":\"", r, used,
	    mismatches(check, 200 * SECTOR, 4096, host_byte));
	for (int i = 0; i < 16; i++)
		PUT("%02x", check[i]);
	PUT("\"}");

	put_request("flush", request(BLK_T_FLUSH, 0, b, 0, &used), &used);

	/* What must fail: past the end (straddling, and wholly), half a sector, an unknown type. */
	put_request("readStraddlesEnd", read_into_check(capacity - 1, 2, 1, &used), &used);
	put_request("readPastEnd", read_into_check(capacity, 1, 1, &used), &used);
	b[0] = (struct dv_virtq_buf){ (uintptr_t)data, 100, 0 };
	put_request("writePartial", request(BLK_T_OUT, 20, b, 1, &used), &used);
	put_request("unknownType", request(99, 0, b, 0, &used), &used);
	PUT(",\"final\":%u}", dv_virtio_status(&dev));
	return 0;
}

static int readonly_disk(void)
{
	/* RO is wanted: a driver must accept it to use the disk at all. */
	int s = start(BLK_F_RO | BLK_F_FLUSH);
	PUT("{\"status\":%d,\"offered\":%llu,\"features\":%llu", s,
	    (unsigned long long)dev.device_features, (unsigned long long)dev.features);
	if (s < 0)
		return 1;
	uint32_t used;
	struct dv_virtq_buf b[1];
	fill(data, 3 * SECTOR, 4096);
	b[0] = (struct dv_virtq_buf){ (uintptr_t)data, 4096, 0 };
	put_request("write", request(BLK_T_OUT, 3, b, 1, &used), &used);
	int r = read_into_check(0, 16, 2, &used);
	PUT(",\"read\":{\"status\":%d,\"used\":%u,\"bad\":%u}", r, used,
	    mismatches(check, 0, 16 * SECTOR, host_byte));
	put_request("flush", request(BLK_T_FLUSH, 0, b, 0, &used), &used);
	PUT(",\"final\":%u}", dv_virtio_status(&dev));
	return 0;
}

/*
 * Chains no driver may send. Each must stop the device with NEEDS_RESET and no
 * used element, and none may change the disk: the written data (0xee) would
 * land at sector 20.
 */
enum hostile { OUTSIDE_RAM, STRADDLES_RAM, NO_STATUS, READABLE_AFTER_WRITABLE, CASES };
static const char *const names[CASES] = { "data-outside-ram", "data-straddles-ram",
					  "no-status", "readable-after-writable" };

static uint16_t used_index(void)
{
	return *(volatile uint16_t *)(queue.used + 2);
}

static void hostile(enum hostile c)
{
	const uint64_t wanted = BLK_F_FLUSH;
	int status = start(wanted);
	uint16_t used_before = used_index();
	for (uint32_t i = 0; i < SECTOR; i++)
		data[i] = 0xee;
	header.type = c == STRADDLES_RAM ? BLK_T_IN : BLK_T_OUT;
	header.reserved = 0;
	header.sector = 20;
	struct dv_virtq_buf h = { (uintptr_t)&header, sizeof header, 0 };
	struct dv_virtq_buf st = { (uintptr_t)&status_byte, 1, 1 };
	struct dv_virtq_buf chain[4];
	unsigned n = 0;
	switch (c) {
	case OUTSIDE_RAM: /* a good first data buffer, then one at 1 TiB */
		chain[n++] = h;
		chain[n++] = (struct dv_virtq_buf){ (uintptr_t)data, SECTOR, 0 };
		chain[n++] = (struct dv_virtq_buf){ 1ull << 40, SECTOR, 0 };
		chain[n++] = st;
		break;
	case STRADDLES_RAM: /* a read into the last 256 bytes of RAM and 256 past it */
		chain[n++] = h;
		chain[n++] = (struct dv_virtq_buf){ dv_ram_bytes - 256, SECTOR, 1 };
		chain[n++] = st;
		break;
	case NO_STATUS: /* nothing the device may write */
		chain[n++] = h;
		chain[n++] = (struct dv_virtq_buf){ (uintptr_t)data, SECTOR, 0 };
		break;
	case READABLE_AFTER_WRITABLE:
		chain[n++] = h;
		chain[n++] = st;
		chain[n++] = (struct dv_virtq_buf){ (uintptr_t)data, SECTOR, 0 };
		break;
	default:
		break;
	}
	if (status >= 0 && dv_virtq_add(&queue, chain, n) >= 0) {
		dv_virtq_kick(&queue);
		status = dv_virtio_wait_status(&dev, DV_VIRTIO_NEEDS_RESET, TIMEOUT_NS);
	}
	uint16_t used = (uint16_t)(used_index() - used_before);
	/* Recovery: a reset (start begins with one) and an ordinary read. */
	int recovered = start(wanted);
	uint32_t read_used = 0;
	int read = recovered >= 0 ? read_into_check(16, 8, 1, &read_used) : recovered;
	PUT("%s{\"name\":\"%s\",\"status\":%d,\"used\":%u,\"recovered\":%d,\"read\":%d,"
	    "\"readUsed\":%u,\"bad\":%u}",
	    c ? "," : "", names[c], status, used, recovered, read, read_used,
	    mismatches(check, 16 * SECTOR, 4096, host_byte));
}

/* arg 3: one 64 KiB read of sector 0 into `data` after another; returns only on an error. */
static int read_forever(void)
{
	if (start(0) < 0)
		return 4;
	struct dv_virtq_buf b = { (uintptr_t)data, sizeof data, 1 };
	for (;;) {
		uint32_t used;
		if (request(BLK_T_IN, 0, &b, 1, &used) != 0)
			return 5;
	}
}

int main(uint64_t arg)
{
	int bdf = dv_virtio_find(DV_VIRTIO_PCI_DEVICE(DV_VIRTIO_TYPE_BLOCK), -1);
	if (bdf < 0 || dv_virtio_open(&dev, (uint16_t)bdf) != 0) {
		dv_printf("no virtio-blk device\n");
		return 2;
	}
	int e = 0;
	switch (arg) {
	case 0:
		e = writable_disk();
		break;
	case 1:
		e = readonly_disk();
		break;
	case 2:
		PUT("{\"cases\":[");
		for (int c = 0; c < CASES; c++)
			hostile((enum hostile)c);
		PUT("],\"final\":%u}", dv_virtio_status(&dev));
		break;
	case 3:
		return read_forever();
	default:
		return 3;
	}
	dv_report(out, len);
	return e;
}
