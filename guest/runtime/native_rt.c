/*
 * native_rt.c: the guest runtime's API on Linux, so a workload's C source also
 * builds as a native program (with -DDV_NATIVE) whose results match the guest's
 * byte for byte.
 *
 * Usage: <program> [ARG]   ARG (decimal or 0x hex, default 0) is main's argument.
 * The report goes to stdout as one line; the exit status is main's return value.
 */
#define _GNU_SOURCE
#define DV_NATIVE_RT
#include "dv_guest.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int dv_main(uint64_t arg);

/* Where dv_io_write goes: /dev/null, so the io workload costs a write(2) each. */
static int io_fd = -1;

static int64_t write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;
	size_t left = len;
	while (left > 0) {
		ssize_t n = write(fd, p, left);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += n;
		left -= (size_t)n;
	}
	return (int64_t)len;
}

int64_t dv_write(const void *buf, size_t len)
{
	if (len > DV_TRANSFER_MAX)
		return DV_HC_EINVAL;
	return write_all(STDOUT_FILENO, buf, len);
}

int64_t dv_io_write(const void *buf, size_t len)
{
	if (len > DV_TRANSFER_MAX)
		return DV_HC_EINVAL;
	return write_all(io_fd, buf, len);
}

int64_t dv_report(const void *buf, size_t len)
{
	if (len > DV_TRANSFER_MAX)
		return DV_HC_EINVAL;
	int64_t n = write_all(STDOUT_FILENO, buf, len);
	if (n < 0)
		return n;
	n = write_all(STDOUT_FILENO, "\n", 1);
	return n < 0 ? n : (int64_t)len;
}

uint64_t dv_clock_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int64_t dv_nop(void)
{
	return 0;
}

/* A real, cheap Linux system call, with the guest kernel's result. */
int64_t dv_syscall0(uint64_t nr)
{
	(void)syscall(SYS_getppid);
	return nr == 0 ? 1 : -DV_ENOSYS;
}

void dv_exit(int status)
{
	exit(status);
}

/* Fresh pages straight from the kernel, like the guest's untouched RAM. */
void *dv_alloc(size_t bytes)
{
	if (bytes == 0)
		bytes = 1;
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

int main(int argc, char **argv)
{
	uint64_t arg = 0;
	if (argc > 2) {
		fprintf(stderr, "usage: %s [ARG]\n", argv[0]);
		return 2;
	}
	if (argc == 2) {
		char *end;
		errno = 0;
		arg = strtoull(argv[1], &end, 0);
		if (errno || end == argv[1] || *end || argv[1][0] == '-') {
			fprintf(stderr, "%s: ARG must be a non-negative integer, got %s\n", argv[0],
				argv[1]);
			return 2;
		}
	}
	io_fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
	if (io_fd < 0) {
		perror("/dev/null");
		return 2;
	}
	return dv_main(arg);
}
