/*
 * dv_fn.c: the function SDK's runtime (see dv_fn.h): the entry point and the
 * system-call wrappers. No C library: every call is a raw Linux system call.
 */
#include "dv_fn.h"

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

void *memmove(void *d, const void *s, size_t n) {
	unsigned char *p = d;
	const unsigned char *q = s;
	if (p < q)
		while (n--) *p++ = *q++;
	else
		while (n--) p[n] = q[n];
	return d;
}

int memcmp(const void *a, const void *b, size_t n) {
	const unsigned char *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q) return *p - *q;
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

const void *dv_fn_input(size_t *len) {
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

int dv_fn_printf(const char *fmt, ...) {
	char out[1024];
	size_t n = 0;
	va_list ap;
	va_start(ap, fmt);
#define PUT(ch) do { if (n < sizeof out) out[n++] = (char)(ch); } while (0)
	for (const char *f = fmt; *f; f++) {
		if (*f != '%') {
			PUT(*f);
			continue;
		}
		int longs = 0;
		f++;
		while (*f == 'l' || *f == 'z') longs++, f++;
		if (*f == 's') {
			const char *s = va_arg(ap, const char *);
			if (!s) s = "(null)";
			while (*s) PUT(*s++);
		} else if (*f == 'c') {
			PUT(va_arg(ap, int));
		} else if (*f == 'd' || *f == 'i' || *f == 'u' || *f == 'x' || *f == 'p') {
			unsigned long long v;
			int neg = 0, base = *f == 'x' || *f == 'p' ? 16 : 10;
			if (*f == 'p') {
				v = (uintptr_t)va_arg(ap, void *);
				PUT('0');
				PUT('x');
			} else if (*f == 'd' || *f == 'i') {
				long long s = longs ? va_arg(ap, long long) : va_arg(ap, int);
				neg = s < 0;
				v = neg ? -(unsigned long long)s : (unsigned long long)s;
			} else v = longs ? va_arg(ap, unsigned long long) : va_arg(ap, unsigned);
			char digits[24];
			int i = 0;
			do digits[i++] = "0123456789abcdef"[v % base], v /= base;
			while (v);
			if (neg) PUT('-');
			while (i) PUT(digits[--i]);
		} else if (*f == '%') {
			PUT('%');
		} else {
			if (!*f) break;
			PUT('%');
			PUT(*f);
		}
	}
#undef PUT
	va_end(ap);
	long r = dv_fn_output(out, n);
	return r < 0 ? (int)r : (int)n;
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
