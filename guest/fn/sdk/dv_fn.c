/*
 * dv_fn.c: the function SDK's runtime (see dv_fn.h): the entry point and the
 * system-call wrappers. No C library: every call is a raw Linux system call.
 */
#include "dv_fn.h"

#include <stdarg.h>

int main(int argc, char **argv);

long dv_fn_syscall(long nr, long a0, long a1, long a2, long a3, long a4, long a5) {
	long ret;
	register long r10 __asm__("r10") = a3;
	register long r8 __asm__("r8") = a4;
	register long r9 __asm__("r9") = a5;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a0), "S"(a1), "d"(a2), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

void *memset(void *d, int c, size_t n) {
	unsigned char *p = d;
	while (n--) *p++ = (unsigned char)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n) {
	unsigned char *p = d;
	const unsigned char *q = s;
	while (n--) *p++ = *q++;
	return d;
}

int memcmp(const void *a, const void *b, size_t n) {
	const unsigned char *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q) return *p < *q ? -1 : 1;
	return 0;
}

size_t dv_fn_strlen(const char *s) {
	size_t n = 0;
	while (s[n]) n++;
	return n;
}

void dv_fn_exit(int status) {
	for (;;) dv_fn_syscall(231, status, 0, 0, 0, 0, 0);
}

static uintptr_t heap_end;

void *dv_fn_alloc(size_t len) {
	if (!heap_end) heap_end = (uintptr_t)dv_fn_syscall(12, 0, 0, 0, 0, 0, 0);
	uintptr_t start = (heap_end + 15) & ~(uintptr_t)15;
	if (len > (uintptr_t)-1 - start) return NULL;
	uintptr_t want = start + len;
	if ((uintptr_t)dv_fn_syscall(12, (long)want, 0, 0, 0, 0, 0) < want) return NULL;
	heap_end = want;
	return (void *)start;
}

const uint8_t *dv_fn_input(size_t *len) {
	static uint8_t *data;
	static size_t size, done;
	if (done) {
		*len = size;
		return data;
	}
	size_t cap = 0;
	for (;;) {
		if (size == cap) {
			/* Grow the brk area in 64 KiB steps: each step directly follows the last. */
			uint8_t *more = dv_fn_alloc(65536);
			if (!more) {
				*len = 0;
				return NULL;
			}
			if (!data) data = more;
			cap = (size_t)(more + 65536 - data);
		}
		long n = dv_fn_syscall(0, 0, (long)(data + size), (long)(cap - size), 0, 0, 0);
		if (n == -4) continue; /* EINTR */
		if (n <= 0) break;
		size += (size_t)n;
	}
	done = 1;
	*len = size;
	return data;
}

long dv_fn_output(const void *buf, size_t len) {
	const char *p = buf;
	size_t left = len;
	while (left) {
		long n = dv_fn_syscall(1, 1, (long)p, (long)left, 0, 0, 0);
		if (n == -4) continue;
		if (n < 0) return n;
		p += n, left -= (size_t)n;
	}
	return (long)len;
}

long dv_fn_write(const void *buf, size_t len) {
	return dv_fn_output(buf, len);
}

/* Appends the digits of v in base (10 or 16) to out at *n, bounded by cap. */
static void put_number(char *out, size_t *n, size_t cap, unsigned long v, unsigned base) {
	char digits[24];
	size_t k = 0;
	do {
		digits[k++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	while (k && *n < cap) out[(*n)++] = digits[--k];
}

long dv_fn_printf(const char *fmt, ...) {
	char out[1024];
	size_t n = 0, cap = sizeof out;
	va_list ap;
	va_start(ap, fmt);
	for (const char *f = fmt; *f && n < cap; f++) {
		if (*f != '%') {
			out[n++] = *f;
			continue;
		}
		f++;
		int is_long = 0;
		while (*f == 'l' || *f == 'z') is_long = 1, f++;
		switch (*f) {
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s) s = "(null)";
			while (*s && n < cap) out[n++] = *s++;
			break;
		}
		case 'c':
			out[n++] = (char)va_arg(ap, int);
			break;
		case 'd': {
			long v = is_long ? va_arg(ap, long) : va_arg(ap, int);
			unsigned long m = (unsigned long)v;
			if (v < 0) {
				out[n++] = '-';
				m = 0 - m;
			}
			put_number(out, &n, cap, m, 10);
			break;
		}
		case 'u':
		case 'x':
			put_number(out, &n, cap,
				   is_long ? va_arg(ap, unsigned long) : va_arg(ap, unsigned),
				   *f == 'x' ? 16 : 10);
			break;
		case 'p':
			if (n + 2 <= cap) out[n++] = '0', out[n++] = 'x';
			put_number(out, &n, cap, (unsigned long)va_arg(ap, void *), 16);
			break;
		case '%':
			out[n++] = '%';
			break;
		case '\0':
			f--;
			break;
		default:
			out[n++] = '%';
			if (n < cap) out[n++] = *f;
		}
	}
	va_end(ap);
	return dv_fn_output(out, n);
}

long dv_fn_puts(const char *s) {
	return dv_fn_output(s, dv_fn_strlen(s));
}

void dv_fn_error(const char *msg) {
	dv_fn_syscall(1, 2, (long)"error: ", 7, 0, 0, 0);
	dv_fn_syscall(1, 2, (long)msg, (long)dv_fn_strlen(msg), 0, 0, 0);
	dv_fn_syscall(1, 2, (long)"\n", 1, 0, 0, 0);
}

/* The entry point: rsp = argc, argv..., as Linux starts a process. */
__attribute__((used)) static void dv_fn_start_c(long *sp) {
	int argc = (int)sp[0];
	dv_fn_exit(main(argc, (char **)(sp + 1)));
}

__asm__(".text\n"
	".globl _start\n"
	"_start:\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	xor %ebp, %ebp\n"
	"	call dv_fn_start_c\n"
	"	ud2\n");
