/*
 * console_echo.c: reads the serial console (COM1's receive side) and echoes each
 * line back as "echo: <line>", until it receives EOT (0x04, Ctrl-D). For
 * tests/console_test.ts.
 *
 * arg 0: poll the line-status register; arg 1: sleep until IRQ 4 (vector
 * DV_IRQ_VECTOR_BASE + 4) and drain the FIFO on each interrupt. Reports
 * {"bytes":N,"lines":L,"irqs":I,"fnv":"<16 hex digits>"} over everything received
 * before the EOT.
 */
#include "dv_guest.h"

void *memcpy(void *dst, const void *src, size_t n);

#define COM1 0x3f8
#define COM1_IER (COM1 + 1)
#define COM1_MCR (COM1 + 4)
#define COM1_LSR (COM1 + 5)
#define IER_RECEIVED_DATA 0x01
#define MCR_OUT2 0x08 /* gates the UART's interrupt line on a PC */
#define LSR_DATA_READY 0x01
#define EOT 0x04
#define SERIAL_VECTOR (DV_IRQ_VECTOR_BASE + 4)

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static char line[256];
static size_t line_len;
static uint64_t bytes, lines, fnv = 0xcbf29ce484222325ull;

static void flush_line(void)
{
	char out[sizeof line + 8];
	memcpy(out, "echo: ", 6);
	memcpy(out + 6, line, line_len);
	out[6 + line_len] = '\n';
	dv_write(out, line_len + 7);
	line_len = 0;
	lines++;
}

/* Takes one received byte; returns 0 at the EOT. */
static int take(uint8_t b)
{
	if (b == EOT)
		return 0;
	bytes++;
	fnv = (fnv ^ b) * 0x100000001b3ull;
	if (b == '\n' || b == '\r') {
		flush_line();
	} else {
		if (line_len == sizeof line)
			flush_line();
		line[line_len++] = (char)b;
	}
	return 1;
}

int main(uint64_t arg)
{
	int by_interrupt = arg & 1;
	if (by_interrupt) {
		if (dv_irq_init() != 0)
			return 3;
		outb(COM1_MCR, MCR_OUT2);
		outb(COM1_IER, IER_RECEIVED_DATA);
	}
	dv_write("ready\n", 6);
	for (;;) {
		/* Note the interrupt count before draining: an interrupt raised while
		 * draining makes the wait below return at once. */
		uint64_t seen = dv_irq_counts[SERIAL_VECTOR];
		while (inb(COM1_LSR) & LSR_DATA_READY) {
			if (!take(inb(COM1)))
				goto done;
		}
		/* Sleep until the UART raises IRQ 4 again, or poll. */
		if (by_interrupt)
			dv_irq_wait_count(SERIAL_VECTOR, seen + 1);
	}
done:
	if (line_len)
		flush_line();
	char buf[160];
	size_t n = dv_format(buf, sizeof buf,
			     "{\"bytes\":%llu,\"lines\":%llu,\"irqs\":%llu,\"fnv\":\"%016llx\"}",
			     (unsigned long long)bytes, (unsigned long long)lines,
			     (unsigned long long)dv_irq_counts[SERIAL_VECTOR],
			     (unsigned long long)fnv);
	dv_report(buf, n);
	return 0;
}
