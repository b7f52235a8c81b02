/*
 * virtio_vsock.c: drives virtio-vsock with the runtime's virtio driver and raw
 * virtio_vsock_hdr packets (virtio spec 5.10.6), for
 * tests/guest_blk_vsock_test.ts. The guest is CID 3 (read from the config).
 *
 * arg bits 0-31: the host port P, bits 32-63: the guest port Q it listens on.
 *
 * 1. Guest -> host: REQUEST to CID 2 port P (the device connects to the test's
 *    Unix listener PATH_P) and RESPONSE back; G2H_BYTES of guest_byte(i) as RW
 *    packets within the device's credit (its CREDIT_UPDATEs open more); then
 *    the host's reply, REPLY_BYTES of reply_byte(i), received with a buf_alloc
 *    of GUEST_BUF: the device runs out of credit, asks with CREDIT_REQUEST
 *    and gets this guest's CREDIT_UPDATE, never sending past it; the host's
 *    SHUTDOWN (it closed its side), our SHUTDOWN, the device's RST.
 * 2. Host -> guest: the test connects to PATH with `CONNECT Q+1` (refused:
 *    this guest answers the REQUEST with RST) and `CONNECT Q` (accepted with
 *    RESPONSE); every byte the host sends comes back xor ECHO_XOR; after the
 *    host's SHUTDOWN, our SHUTDOWN and the device's RST.
 *
 * rx buffers are two-descriptor chains (header, payload: both device-written);
 * tx packets are a header descriptor and the payload over two descriptors.
 * REPORTs one JSON object with what each step saw.
 *
 * arg bit 63 set: hostile packets instead (see `hostile`), with port P for
 * the connection that must work after each reset.
 */
#include "dv_guest.h"
#include "dv_virtio.h"

#define TIMEOUT_NS 10000000000ull /* 10 s: kvmbox runs ~8x slower than hardware */
#define WAIT_CONNECT_NS 60000000000ull /* how long the guest listens for the host */

#define HOST_CID 2
#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define SHUTDOWN_RCV 1
#define SHUTDOWN_SEND 2

#define RX_BUFFERS 16
#define RX_PAYLOAD 4096
#define TX_CHUNK 8192
/*
 * This guest's receive buffer per connection: small, so credit matters, and
 * not a multiple of RX_PAYLOAD, so the device must cut a packet to the credit
 * left rather than fill the rx buffer.
 */
#define GUEST_BUF 15000u
#define G2H_BYTES (320u << 10) /* more than the device's 256 KiB credit */
#define REPLY_BYTES (48u << 10)
#define ECHO_XOR 0x3c
#define GUEST_PORT 1234

struct hdr {
	uint64_t src_cid;
	uint64_t dst_cid;
	uint32_t src_port;
	uint32_t dst_port;
	uint32_t len;
	uint16_t type;
	uint16_t op;
	uint32_t flags;
	uint32_t buf_alloc;
	uint32_t fwd_cnt;
} __attribute__((packed));
_Static_assert(sizeof(struct hdr) == 44, "virtio_vsock_hdr is 44 bytes");

/* A connection, as this guest keeps it. */
struct conn {
	uint32_t local_port, peer_port;
	uint32_t tx_cnt;              /* bytes sent */
	uint32_t fwd_cnt;             /* bytes received and consumed */
	uint32_t fwd_sent;            /* fwd_cnt as last told to the peer */
	uint32_t peer_buf_alloc, peer_fwd_cnt;
	uint32_t peer_shutdown;       /* the peer's SHUTDOWN flags */
	int reset;                    /* an RST arrived */
};

static char out[4096];
static size_t len;
#define PUT(...) \
	(len += dv_format(out + (len < sizeof out ? len : sizeof out), \
			  len < sizeof out ? sizeof out - len : 0, __VA_ARGS__))

static struct dv_virtio dev;
static struct dv_virtq rxq, txq, evq;
static uint64_t guest_cid;

static struct {
	struct hdr h;
	uint8_t pad[20];
	uint8_t payload[RX_PAYLOAD];
} rx_slots[RX_BUFFERS] __attribute__((aligned(64)));
static int16_t slot_of_head[DV_VIRTQ_MAX_SIZE];

static struct hdr tx_hdr;
static uint8_t tx_payload[TX_CHUNK];

/* Counters for the report. */
static unsigned credit_updates_in, credit_requests_in, credit_updates_out, credit_requests_out,
	credit_waits;
static unsigned stray; /* packets for no connection this guest knows */
/* Milliseconds since start at each step, for the report (where time goes). */
static uint64_t t0, marks[16];
static unsigned nmarks;
static void mark(void)
{
	if (nmarks < 16)
		marks[nmarks++] = (dv_clock_ns() - t0) / 1000000;
}

static uint8_t guest_byte(uint32_t i)
{
	return (uint8_t)(i * 7 + (i >> 10));
}
static uint8_t reply_byte(uint32_t i)
{
	return (uint8_t)(i * 11 + 3);
}

/* Posts rx slot `s` (header and payload as one device-writable chain). */
static int post_rx(int s)
{
	struct dv_virtq_buf b[2] = {
		{ (uintptr_t)&rx_slots[s].h, sizeof(struct hdr), 1 },
		{ (uintptr_t)rx_slots[s].payload, RX_PAYLOAD, 1 },
	};
	int head = dv_virtq_add(&rxq, b, 2);
	if (head < 0)
		return head;
	slot_of_head[head] = (int16_t)s;
	return 0;
}

/* Sends one packet for `c` (its credit fields filled in); waits until the device used it. */
static int send_pkt(struct conn *c, uint16_t op, uint32_t flags, const uint8_t *data, uint32_t n)
{
	tx_hdr = (struct hdr){
		.src_cid = guest_cid,
		.dst_cid = HOST_CID,
		.src_port = c->local_port,
		.dst_port = c->peer_port,
		.len = n,
		.type = TYPE_STREAM,
		.op = op,
		.flags = flags,
		.buf_alloc = GUEST_BUF,
		.fwd_cnt = c->fwd_cnt,
	};
	c->fwd_sent = c->fwd_cnt;
	for (uint32_t i = 0; i < n; i++)
		tx_payload[i] = data[i];
	struct dv_virtq_buf b[3] = { { (uintptr_t)&tx_hdr, sizeof tx_hdr, 0 } };
	unsigned k = 1;
	if (n > 0) {
		uint32_t first = n / 2 ? n / 2 : n;
		b[k++] = (struct dv_virtq_buf){ (uintptr_t)tx_payload, first, 0 };
		if (n > first)
			b[k++] = (struct dv_virtq_buf){ (uintptr_t)tx_payload + first, n - first, 0 };
	}
	int head = dv_virtq_add(&txq, b, k);
	if (head < 0)
		return head;
	dv_virtq_kick(&txq);
	uint32_t used;
	int got = dv_virtq_wait(&txq, &used, TIMEOUT_NS);
	if (got < 0)
		return got;
	if (op == OP_RW)
		c->tx_cnt += n;
	return got == head ? 0 : -100;
}

/* A packet taken from rx: its header and payload (valid until the slot is reposted). */
struct pkt {
	struct hdr h;
	const uint8_t *data;
	int slot;
};

/* The next rx packet within `timeout_ns`: 0, or a negative driver error. */
static int recv_pkt(struct pkt *p, uint64_t timeout_ns)
{
	uint32_t used;
	int head = dv_virtq_wait(&rxq, &used, timeout_ns);
	if (head < 0)
		return head;
	int s = slot_of_head[head];
	if (s < 0 || s >= RX_BUFFERS || used < sizeof(struct hdr))
		return -101;
	p->h = rx_slots[s].h;
	if (p->h.len > RX_PAYLOAD || used != sizeof(struct hdr) + p->h.len)
		return -102;
	p->data = rx_slots[s].payload;
	p->slot = s;
	return 0;
}

/* Gives a packet's slot back to the device. */
static void done_pkt(struct pkt *p)
{
	post_rx(p->slot);
	dv_virtq_kick(&rxq);
}

/* Whether `p` belongs to `c`. */
static int for_conn(const struct pkt *p, const struct conn *c)
{
	return p->h.src_cid == HOST_CID && p->h.dst_cid == guest_cid &&
	       p->h.dst_port == c->local_port && p->h.src_port == c->peer_port &&
	       p->h.type == TYPE_STREAM;
}

/* The bytes the peer can still take from us. */
static uint32_t peer_credit(const struct conn *c)
{
	uint32_t in_flight = c->tx_cnt - c->peer_fwd_cnt;
	return in_flight >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
}

/*
 * Updates `c` from a packet's header (credit, SHUTDOWN, RST) and answers
 * CREDIT_REQUEST. Data (RW) is left to the caller, which consumes it and then
 * calls consumed().
 */
static void track(struct conn *c, const struct pkt *p)
{
	/* An RST carries no credit (the device sends zeros). */
	if (p->h.op != OP_RST) {
		c->peer_buf_alloc = p->h.buf_alloc;
		c->peer_fwd_cnt = p->h.fwd_cnt;
	}
	switch (p->h.op) {
	case OP_CREDIT_UPDATE:
		credit_updates_in++;
		break;
	case OP_CREDIT_REQUEST:
		credit_requests_in++;
		credit_updates_out++;
		send_pkt(c, OP_CREDIT_UPDATE, 0, 0, 0);
		break;
	case OP_SHUTDOWN:
		c->peer_shutdown |= p->h.flags;
		break;
	case OP_RST:
		c->reset = 1;
		break;
	default:
		break;
	}
}

/*
 * Counts a data packet of `n` bytes that the device sent beyond the credit
 * this guest had given it: more than GUEST_BUF past the fwd_cnt last sent
 * (the device can only have known an older, smaller one).
 */
static unsigned over_credit;
static void check_credit(const struct conn *c, uint32_t n)
{
	if (c->fwd_cnt + n - c->fwd_sent > GUEST_BUF)
		over_credit++;
}

/*
 * After consuming `n` bytes. No CREDIT_UPDATE goes out on its own: the device
 * must run the credit down and ask (CREDIT_REQUEST), so check_credit sees
 * exactly the credit the device had. Packets this guest sends carry fwd_cnt too.
 */
static void consumed(struct conn *c, uint32_t n)
{
	c->fwd_cnt += n;
}

/*
 * Sends `n` bytes of data as RW packets within the peer's credit. Out of
 * credit, it asks once (CREDIT_REQUEST) and takes packets until one opens
 * credit; data from the peer cannot arrive then in this program's exchanges
 * (-104 if it does).
 */
static int send_data(struct conn *c, const uint8_t *data, uint32_t n, uint32_t chunk)
{
	uint32_t done = 0;
	int asked = 0;
	uint64_t deadline = dv_clock_ns() + TIMEOUT_NS;
	while (done < n) {
		uint32_t credit = peer_credit(c);
		if (credit == 0) {
			if (!asked) {
				credit_waits++;
				credit_requests_out++;
				asked = 1;
				int e = send_pkt(c, OP_CREDIT_REQUEST, 0, 0, 0);
				if (e < 0)
					return e;
			}
			struct pkt p;
			int e = recv_pkt(&p, TIMEOUT_NS);
			if (e < 0)
				return e;
			int data_lost = 0;
			if (for_conn(&p, c)) {
				track(c, &p);
				data_lost = p.h.op == OP_RW;
			} else {
				stray++;
			}
			done_pkt(&p);
			if (data_lost)
				return -104;
			if (c->reset || dv_clock_ns() > deadline)
				return -103;
			continue;
		}
		asked = 0;
		uint32_t k = n - done < chunk ? n - done : chunk;
		if (k > credit)
			k = credit;
		int e = send_pkt(c, OP_RW, 0, data + done, k);
		if (e < 0)
			return e;
		done += k;
	}
	return 0;
}

static uint8_t g2h_data[G2H_BYTES];

/* Part 1: connect to the host's port P, send, receive, close. */
static void guest_to_host(uint32_t port)
{
	struct conn c = { .local_port = GUEST_PORT, .peer_port = port };
	int e = send_pkt(&c, OP_REQUEST, 0, 0, 0);
	struct pkt p;
	int answer = -1;
	if (e == 0 && (e = recv_pkt(&p, TIMEOUT_NS)) == 0) {
		answer = for_conn(&p, &c) ? p.h.op : -2;
		track(&c, &p);
		done_pkt(&p);
	}
	PUT("\"g2h\":{\"answer\":%d,\"peerBufAlloc\":%u", answer, c.peer_buf_alloc);
	if (answer != OP_RESPONSE) {
		PUT(",\"error\":%d}", e);
		return;
	}
	mark();
	for (uint32_t i = 0; i < G2H_BYTES; i++)
		g2h_data[i] = guest_byte(i);
	e = send_data(&c, g2h_data, G2H_BYTES, TX_CHUNK);
	uint32_t sent = c.tx_cnt;
	mark();
	/* The reply, until the host's SHUTDOWN (it closed its sending side). */
	uint32_t got = 0, bad = 0, packets = 0;
	while (e == 0 && !c.reset && !(c.peer_shutdown & SHUTDOWN_SEND)) {
		if ((e = recv_pkt(&p, TIMEOUT_NS)) < 0)
			break;
		if (!for_conn(&p, &c)) {
			stray++;
			done_pkt(&p);
			continue;
		}
		track(&c, &p);
		if (p.h.op == OP_RW) {
			packets++;
			check_credit(&c, p.h.len);
			for (uint32_t i = 0; i < p.h.len; i++)
				bad += p.data[i] != reply_byte(got + i);
			got += p.h.len;
			done_pkt(&p);
			consumed(&c, p.h.len);
		} else {
			done_pkt(&p);
		}
	}
	uint32_t host_shutdown = c.peer_shutdown;
	mark();
	/* Our close: SHUTDOWN both ways; the device answers RST. */
	int closed = e == 0 ? send_pkt(&c, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0, 0) : e;
	while (closed == 0 && !c.reset) {
		if ((closed = recv_pkt(&p, TIMEOUT_NS)) < 0)
			break;
		if (for_conn(&p, &c))
			track(&c, &p);
		else
			stray++;
		done_pkt(&p);
	}
	PUT(",\"error\":%d,\"sent\":%u,\"replyBytes\":%u,\"replyPackets\":%u,\"replyBad\":%u,"
	    "\"hostShutdown\":%u,\"closed\":%d,\"rst\":%d,\"peerFwdCnt\":%u}",
	    e, sent, got, packets, bad, host_shutdown, closed, c.reset, c.peer_fwd_cnt);
}

static uint8_t echo[RX_PAYLOAD];

/* Part 2: listen on port Q; refuse other ports; echo what the host sends. */
static void host_to_guest(uint32_t port)
{
	struct conn c = { 0 };
	struct pkt p;
	unsigned refused = 0;
	int e = 0;
	uint32_t refused_port = 0;
	uint64_t deadline = dv_clock_ns() + WAIT_CONNECT_NS;
	/* Wait for the REQUEST to port Q; RST every other one. */
	while (!c.local_port) {
		if (dv_clock_ns() > deadline) {
			e = DV_VIRTIO_ETIMEDOUT;
			break;
		}
		if ((e = recv_pkt(&p, TIMEOUT_NS)) == DV_VIRTIO_ETIMEDOUT) {
			e = 0;
			continue;
		}
		if (e < 0)
			break;
		struct hdr h = p.h;
		done_pkt(&p);
		if (h.op != OP_REQUEST || h.src_cid != HOST_CID || h.dst_cid != guest_cid) {
			stray++;
			continue;
		}
		struct conn peer = { .local_port = h.dst_port, .peer_port = h.src_port };
		if (h.dst_port != port) {
			refused++;
			refused_port = h.dst_port;
			send_pkt(&peer, OP_RST, 0, 0, 0);
			continue;
		}
		c = peer;
		c.peer_buf_alloc = h.buf_alloc;
		c.peer_fwd_cnt = h.fwd_cnt;
		e = send_pkt(&c, OP_RESPONSE, 0, 0, 0);
	}
	mark();
	PUT(",\"h2g\":{\"refused\":%u,\"refusedPort\":%u,\"hostPort\":%u", refused, refused_port,
	    c.peer_port);
	/* Echo every byte back until the host's SHUTDOWN. */
	uint32_t got = 0, packets = 0;
	while (e == 0 && !c.reset && !(c.peer_shutdown & SHUTDOWN_SEND)) {
		if ((e = recv_pkt(&p, TIMEOUT_NS)) < 0)
			break;
		if (!for_conn(&p, &c)) {
			stray++;
			done_pkt(&p);
			continue;
		}
		track(&c, &p);
		if (p.h.op != OP_RW) {
			done_pkt(&p);
			continue;
		}
		uint32_t n = p.h.len;
		for (uint32_t i = 0; i < n; i++)
			echo[i] = p.data[i] ^ ECHO_XOR;
		done_pkt(&p);
		packets++;
		check_credit(&c, n);
		got += n;
		consumed(&c, n);
		e = send_data(&c, echo, n, n);
	}
	uint32_t host_shutdown = c.peer_shutdown;
	mark();
	int closed = e == 0 ? send_pkt(&c, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0, 0) : e;
	while (closed == 0 && !c.reset) {
		if ((closed = recv_pkt(&p, TIMEOUT_NS)) < 0)
			break;
		if (for_conn(&p, &c))
			track(&c, &p);
		else
			stray++;
		done_pkt(&p);
	}
	PUT(",\"error\":%d,\"received\":%u,\"packets\":%u,\"echoed\":%u,\"hostShutdown\":%u,"
	    "\"closed\":%d,\"rst\":%d}",
	    e, got, packets, c.tx_cnt, host_shutdown, closed, c.reset);
}

/*
 * Reset, features, the three queues (rx, tx, event: Linux sets up all three),
 * `rx_buffers` rx slots posted, DRIVER_OK. Returns the status or an error.
 */
static int start(int rx_buffers)
{
	int e = dv_virtio_init(&dev, 0);
	if (e == 0)
		e = dv_virtq_setup(&dev, &rxq, 0, 64);
	if (e == 0)
		e = dv_virtq_setup(&dev, &txq, 1, 64);
	if (e == 0)
		e = dv_virtq_setup(&dev, &evq, 2, 8);
	if (e < 0)
		return e;
	guest_cid = dv_virtio_config64(&dev, 0);
	for (int i = 0; i < DV_VIRTQ_MAX_SIZE; i++)
		slot_of_head[i] = -1;
	for (int s = 0; s < rx_buffers; s++)
		post_rx(s);
	int status = dv_virtio_driver_ok(&dev);
	dv_virtq_kick(&rxq);
	return status;
}

/*
 * Packets no driver may send, each to stop the device with NEEDS_RESET and no
 * used element for the bad chain; then a reset and a connection to the host's
 * port P that must work again (REQUEST, RESPONSE, RST).
 */
enum hostile { PAYLOAD_PAST_CHAIN, WRITABLE_TX, READABLE_RX, OVERSIZED, CASES };
static const char *const names[CASES] = { "payload-past-chain", "writable-tx", "readable-rx",
					  "oversized" };

static void hostile(enum hostile k, uint32_t port)
{
	int status = start(k == READABLE_RX ? 0 : RX_BUFFERS);
	uint16_t tx_used = *(volatile uint16_t *)(txq.used + 2);
	struct conn c = { .local_port = GUEST_PORT + 1 + k, .peer_port = port };
	tx_hdr = (struct hdr){ .src_cid = guest_cid, .dst_cid = HOST_CID,
			       .src_port = c.local_port, .dst_port = port,
			       .type = TYPE_STREAM, .op = OP_REQUEST, .buf_alloc = GUEST_BUF };
	struct dv_virtq_buf b[2] = { { (uintptr_t)&tx_hdr, sizeof tx_hdr, 0 },
				     { (uintptr_t)tx_payload, 100, 0 } };
	switch (k) {
	case PAYLOAD_PAST_CHAIN: /* the header claims 1000 bytes, the chain has 100 */
		tx_hdr.op = OP_RW;
		tx_hdr.len = 1000;
		break;
	case WRITABLE_TX: /* a payload the device would write */
		tx_hdr.op = OP_RW;
		tx_hdr.len = 100;
		b[1].device_writes = 1;
		break;
	case READABLE_RX: { /* the only rx buffer is device-readable: the RESPONSE has nowhere to go */
		struct dv_virtq_buf r = { (uintptr_t)&rx_slots[0].h, sizeof(struct hdr) + 64, 0 };
		dv_virtq_add(&rxq, &r, 1);
		dv_virtq_kick(&rxq);
		break;
	}
	case OVERSIZED: /* 64 KiB + 1 payload bytes claimed */
		tx_hdr.op = OP_RW;
		tx_hdr.len = (64u << 10) + 1;
		break;
	default:
		break;
	}
	if (status >= 0 && dv_virtq_add(&txq, b, k == READABLE_RX ? 1 : 2) >= 0) {
		dv_virtq_kick(&txq);
		status = dv_virtio_wait_status(&dev, DV_VIRTIO_NEEDS_RESET, TIMEOUT_NS);
	}
	uint16_t used = (uint16_t)(*(volatile uint16_t *)(txq.used + 2) - tx_used);
	if (k == READABLE_RX)
		used = 0; /* the REQUEST itself was fine and used; what counts is rx */
	/* Recovery: a reset (start begins with one) and a connection that works. */
	int recovered = start(RX_BUFFERS);
	int answer = -1;
	struct pkt p;
	if (recovered >= 0 && send_pkt(&c, OP_REQUEST, 0, 0, 0) == 0 &&
	    recv_pkt(&p, TIMEOUT_NS) == 0) {
		answer = for_conn(&p, &c) ? p.h.op : -2;
		done_pkt(&p);
		send_pkt(&c, OP_RST, 0, 0, 0);
	}
	PUT("%s{\"name\":\"%s\",\"status\":%d,\"used\":%u,\"recovered\":%d,\"answer\":%d}",
	    k ? "," : "", names[k], status, used, recovered, answer);
}

int main(uint64_t arg)
{
	int bdf = dv_virtio_find(DV_VIRTIO_PCI_DEVICE(DV_VIRTIO_TYPE_VSOCK), -1);
	if (bdf < 0 || dv_virtio_open(&dev, (uint16_t)bdf) != 0) {
		dv_printf("no virtio-vsock device\n");
		return 2;
	}
	if (arg >> 63) {
		PUT("{\"cases\":[");
		for (int k = 0; k < CASES; k++)
			hostile((enum hostile)k, (uint32_t)arg);
		PUT("],\"final\":%u}", dv_virtio_status(&dev));
		dv_report(out, len);
		return 0;
	}
	int status = start(RX_BUFFERS);
	if (status < 0) {
		dv_printf("vsock setup failed: %d\n", status);
		return 3;
	}
	PUT("{\"status\":%d,\"features\":%llu,\"cid\":%llu,\"queues\":%u,", status,
	    (unsigned long long)dev.features, (unsigned long long)guest_cid, dev.num_queues);
	t0 = dv_clock_ns();
	guest_to_host((uint32_t)arg);
	host_to_guest((uint32_t)(arg >> 32));
	mark();
	PUT(",\"ms\":[");
	for (unsigned i = 0; i < nmarks; i++)
		PUT("%s%llu", i ? "," : "", (unsigned long long)marks[i]);
	PUT("]");
	PUT(",\"creditUpdatesIn\":%u,\"creditRequestsIn\":%u,\"creditUpdatesOut\":%u,"
	    "\"creditRequestsOut\":%u,\"creditWaits\":%u,\"overCredit\":%u,\"stray\":%u,"
	    "\"final\":%u}",
	    credit_updates_in, credit_requests_in, credit_updates_out, credit_requests_out,
	    credit_waits, over_credit, stray, dv_virtio_status(&dev));
	dv_report(out, len);
	return 0;
}
