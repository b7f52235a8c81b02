/*
 * fn_libc.c: a static glibc program for the function runtime tests
 * (tests/fn_runtime_test.ts), run in the runtime and natively; its output must
 * be the same. The first argument picks what it does:
 *   report FILE   stdin and FILE summarized, malloc, qsort, printf of doubles,
 *                 getrandom, clock_gettime: a deterministic report
 *   hog           mallocs and touches 1 MiB blocks until it is stopped
 *   null          writes through a NULL pointer
 *   enosys        calls system call 500 (there is none) and prints the result
 *   abort         abort()
 *   exit N        exits with N
 *   syscalls N    makes N getppid system calls (bench/fn_runtime_bench.ts)
 *   zero          memory it gets back after munmap, mremap and brk is zero
 *   spin          loops forever
 *   leak          prints a static counter and a heap byte, then changes both:
 *                 a request that sees another's changes prints other numbers
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static uint64_t fnv(const unsigned char *p, size_t n, uint64_t h) {
	for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
	return h;
}

static int cmp(const void *a, const void *b) {
	int x = *(const int *)a, y = *(const int *)b;
	return (x > y) - (x < y);
}

static int report(const char *path) {
	/* stdin */
	unsigned char buf[4096];
	size_t in = 0;
	uint64_t h = 1469598103934665603ull;
	ssize_t n;
	while ((n = read(0, buf, sizeof buf)) > 0) in += (size_t)n, h = fnv(buf, (size_t)n, h);
	printf("stdin %zu bytes fnv %016llx\n", in, (unsigned long long)h);
	/* a file of the file set, through stdio */
	FILE *f = fopen(path, "r");
	if (!f) {
		printf("fopen %s: %s\n", path, strerror(errno));
		return 1;
	}
	size_t lines = 0, bytes = 0;
	char line[1024];
	h = 1469598103934665603ull;
	while (fgets(line, sizeof line, f)) lines++, bytes += strlen(line), h = fnv((unsigned char *)line, strlen(line), h);
	fclose(f);
	printf("file %zu lines %zu bytes fnv %016llx\n", lines, bytes, (unsigned long long)h);
	/* malloc, big and small, and qsort */
	int count = 100000;
	int *v = malloc(sizeof *v * (size_t)count);
	unsigned x = 12345;
	for (int i = 0; i < count; i++) x = x * 1103515245u + 12345u, v[i] = (int)(x >> 8);
	qsort(v, (size_t)count, sizeof *v, cmp);
	long long sum = 0;
	for (int i = 0; i < count; i += 1000) sum += v[i];
	char *small[1000];
	for (int i = 0; i < 1000; i++) small[i] = malloc((size_t)(i % 200) + 1), memset(small[i], i, (size_t)(i % 200) + 1);
	for (int i = 0; i < 1000; i += 2) free(small[i]);
	char *big = realloc(malloc(300000), 900000);
	memset(big, 7, 900000);
	printf("qsort sample sum %lld, big[899999] %d\n", sum, big[899999]);
	free(big);
	printf("pi %.6f e %.3e\n", 3.14159265358979, 2.718281828e-3);
	/* getrandom and the clocks: properties only (the values differ run to run) */
	unsigned char r[32];
	printf("getrandom %zd\n", getrandom(r, sizeof r, 0));
	struct timespec a, b, rt;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (volatile int i = 0; i < 1000000; i++) {}
	clock_gettime(CLOCK_MONOTONIC, &b);
	clock_gettime(CLOCK_REALTIME, &rt);
	int ordered = b.tv_sec > a.tv_sec || (b.tv_sec == a.tv_sec && b.tv_nsec >= a.tv_nsec);
	printf("monotonic ordered %d, realtime after 2024 %d\n", ordered, rt.tv_sec > 1704067200);
	return 0;
}

int main(int argc, char **argv) {
	const char *mode = argc > 1 ? argv[1] : "report";
	if (!strcmp(mode, "report")) return report(argc > 2 ? argv[2] : "/data/in.txt");
	if (!strcmp(mode, "hog")) {
		for (int i = 1; i <= 4096; i++) {
			char *p = malloc(1 << 20);
			if (!p) {
				printf("malloc failed after %d MiB\n", i - 1);
				return 3;
			}
			memset(p, 1, 1 << 20);
		}
		printf("allocated 4 GiB\n");
		return 0;
	}
	if (!strcmp(mode, "null")) {
		*(volatile int *)(uintptr_t)(argc - argc) = 1;
		return 0;
	}
	if (!strcmp(mode, "enosys")) {
		long r = syscall(500, 1, 2, 3);
		printf("syscall 500: %ld errno %d\n", r, errno);
		r = syscall(500);
		return r == -1 ? 0 : 1;
	}
	if (!strcmp(mode, "abort")) abort();
	if (!strcmp(mode, "exit")) return atoi(argc > 2 ? argv[2] : "0");
	if (!strcmp(mode, "zero")) {
		size_t len = 4 << 20, bad = 0;
		for (int round = 0; round < 3; round++) {
			unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (p == MAP_FAILED) return 4;
			for (size_t i = 0; i < len; i++) bad += p[i] != 0;
			memset(p, 0xa5, len);
			p = mremap(p, len, 2 * len, MREMAP_MAYMOVE);
			if (p == MAP_FAILED) return 5;
			for (size_t i = len; i < 2 * len; i++) bad += p[i] != 0;
			memset(p, 0x5a, 2 * len);
			munmap(p, 2 * len);
		}
		unsigned char *b = sbrk(0);
		sbrk(1 << 20);
		memset(b, 0xee, 1 << 20);
		sbrk(-(1 << 20));
		sbrk(1 << 20);
		for (size_t i = 0; i < 1 << 20; i++) bad += b[i] != 0;
		printf("nonzero bytes: %zu\n", bad);
		return 0;
	}
	if (!strcmp(mode, "leak")) {
		static int calls;
		unsigned char *p = malloc(4000);
		printf("calls %d heap %d\n", ++calls, p[3000]);
		p[3000] = 99;
		return 0;
	}
	if (!strcmp(mode, "spin"))
		for (;;) __asm__ volatile("");
	if (!strcmp(mode, "syscalls")) {
		long n = atol(argc > 2 ? argv[2] : "1000"), sum = 0;
		for (long i = 0; i < n; i++) sum += syscall(SYS_getppid);
		printf("%d\n", sum > 0);
		return 0;
	}
	return 2;
}
