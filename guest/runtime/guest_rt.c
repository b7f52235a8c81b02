/*
 * guest_rt.c: the user-mode (CPL3) support code of the guest runtime: the
 * memory functions gcc may call even in freestanding code, the bump allocator and
 * the exit path crt0.S takes when main returns.
 *
 * Built with -fno-tree-loop-distribute-patterns so gcc does not turn the loops
 * below back into calls to themselves.
 */
#include "dv_guest.h"

uint64_t dv_ram_bytes;
uint64_t dv_stack_top;

/* The end of the loaded image (guest/link.ld): the heap starts at the next page. */
extern char __image_end[];

/* The room kept for the user stack under its initial pointer. */
#define STACK_RESERVE (1u << 20)
#define PAGE 4096u

static uintptr_t heap_next;

void *dv_alloc(size_t bytes)
{
	if (heap_next == 0)
		heap_next = ((uintptr_t)__image_end + PAGE - 1) & ~(uintptr_t)(PAGE - 1);
	/* rsi = 0 at entry (a host that does not pass the RAM size): trust the stack. */
	uintptr_t top = dv_ram_bytes && dv_ram_bytes < dv_stack_top ? dv_ram_bytes : dv_stack_top;
	uintptr_t limit = top > STACK_RESERVE ? top - STACK_RESERVE : 0;
	uintptr_t align = bytes >= PAGE ? PAGE : 64;
	uintptr_t start = (heap_next + align - 1) & ~(align - 1);
	if (start > limit || bytes > limit - start)
		return NULL;
	heap_next = start + bytes;
	return (void *)start;
}

__attribute__((noreturn)) void dv_exit_status(int status);
__attribute__((noreturn)) void dv_exit_status(int status)
{
	dv_exit(status);
}

void *memset(void *dst, int c, size_t n)
{
	unsigned char *d = dst;
	while (n--)
		*d++ = (unsigned char)c;
	return dst;
}

void *memcpy(void *restrict dst, const void *restrict src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;
	if (d < s) {
		while (n--)
			*d++ = *s++;
	} else {
		while (n--)
			d[n] = s[n];
	}
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}
