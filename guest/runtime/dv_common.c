/*
 * dv_common.c: runtime code shared by the guest and the native build, so both
 * format numbers and reports byte for byte alike.
 */
#include <stdarg.h>

#include "dv_guest.h"

/* Appends one character if there is room; counts it either way. */
struct out {
	char *buf;
	size_t cap;
	size_t len;
};

static void put(struct out *o, char c)
{
	if (o->len + 1 < o->cap)
		o->buf[o->len] = c;
	o->len++;
}

static void put_number(struct out *o, uint64_t value, unsigned base, int upper, int negative,
		       unsigned width, char pad)
{
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	char tmp[24];
	unsigned n = 0;
	do {
		tmp[n++] = digits[value % base];
		value /= base;
	} while (value);
	unsigned total = n + (negative ? 1 : 0);
	if (negative && pad == '0')
		put(o, '-');
	for (; total < width; total++)
		put(o, pad);
	if (negative && pad != '0')
		put(o, '-');
	while (n)
		put(o, tmp[--n]);
}

static size_t vformat(char *buf, size_t cap, const char *fmt, va_list ap)
{
	struct out o = { buf, cap, 0 };
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			put(&o, *fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		unsigned width = 0;
		int size = 0; /* 0 int, 1 long, 2 long long / size_t / intmax_t */
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (unsigned)(*fmt++ - '0');
		for (;; fmt++) {
			if (*fmt == 'l')
				size++;
			else if (*fmt == 'z' || *fmt == 'j')
				size = 2;
			else
				break;
		}
		switch (*fmt) {
		case 'd':
		case 'i': {
			int64_t v = size == 0 ? va_arg(ap, int) :
				    size == 1 ? va_arg(ap, long) : va_arg(ap, long long);
			uint64_t magnitude = v < 0 ? -(uint64_t)v : (uint64_t)v;
			put_number(&o, magnitude, 10, 0, v < 0, width, pad);
			break;
		}
		case 'u':
		case 'x':
		case 'X': {
			uint64_t v = size == 0 ? va_arg(ap, unsigned) :
				     size == 1 ? va_arg(ap, unsigned long) :
						 va_arg(ap, unsigned long long);
			put_number(&o, v, *fmt == 'u' ? 10 : 16, *fmt == 'X', 0, width, pad);
			break;
		}
		case 'p':
			put(&o, '0');
			put(&o, 'x');
			put_number(&o, (uintptr_t)va_arg(ap, void *), 16, 0, 0, width, pad);
			break;
		case 'c':
			put(&o, (char)va_arg(ap, int));
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			unsigned n = 0;
			while (s[n])
				n++;
			for (; n < width; width--)
				put(&o, ' ');
			while (*s)
				put(&o, *s++);
			break;
		}
		case '%':
			put(&o, '%');
			break;
		case '\0':
			fmt--; /* a lone % at the end */
			break;
		default:
			put(&o, '%');
			put(&o, *fmt);
			break;
		}
	}
	if (cap > 0)
		buf[o.len < cap ? o.len : cap - 1] = '\0';
	return o.len;
}

size_t dv_format(char *buf, size_t cap, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	size_t n = vformat(buf, cap, fmt, ap);
	va_end(ap);
	return n;
}

int64_t dv_printf(const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	va_start(ap, fmt);
	size_t n = vformat(buf, sizeof buf, fmt, ap);
	va_end(ap);
	return dv_write(buf, n < sizeof buf ? n : sizeof buf - 1);
}

int64_t dv_report_result(const char *workload, uint64_t arg, uint64_t checksum, uint64_t ns,
			 uint64_t ops)
{
	char buf[256];
	size_t n = dv_format(buf, sizeof buf,
			     "{\"workload\":\"%s\",\"arg\":%llu,\"checksum\":\"%016llx\","
			     "\"ns\":%llu,\"ops\":%llu}",
			     workload, (unsigned long long)arg, (unsigned long long)checksum,
			     (unsigned long long)ns, (unsigned long long)ops);
	return dv_report(buf, n < sizeof buf ? n : sizeof buf - 1);
}
