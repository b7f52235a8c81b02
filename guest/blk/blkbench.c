/*
 * The guest side of bench/blk_bench.ts (busybox's dd prints no rate and its
 * date has no nanoseconds):
 *
 *   blkbench now                              CLOCK_MONOTONIC in ns
 *   blkbench randread DEVICE SECONDS [SEED]   4 KiB random-read IOPS
 *
 * randread reads one 4 KiB block at a time at uniformly random 4 KiB-aligned offsets
 * (xorshift64, so both VMMs read the same sequence) for SECONDS seconds, and
 * prints one line: "RANDREAD ops=N ns=T iops=I". Exit status 1 on any error
 * (with the reason on stderr). Built with `gcc -static -O2` on the host and
 * put into the guest's initramfs.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv) {
  if (argc == 2 && strcmp(argv[1], "now") == 0) {
    printf("%llu\n", (unsigned long long)now_ns());
    return 0;
  }
  if (argc < 4 || strcmp(argv[1], "randread") != 0) {
    fprintf(stderr, "usage: blkbench now | blkbench randread DEVICE SECONDS [SEED]\n");
    return 2;
  }
  const char *device = argv[2];
  double seconds = atof(argv[3]);
  uint64_t x = argc > 4 ? strtoull(argv[4], NULL, 0) : 0x9e3779b97f4a7c15ull;
  if (x == 0) x = 1;
  int fd = open(device, O_RDONLY | O_DIRECT);
  if (fd < 0) {
    perror(device);
    return 1;
  }
  uint64_t size = 0;
  if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
    off_t end = lseek(fd, 0, SEEK_END);
    if (end < 0) {
      perror("size");
      return 1;
    }
    size = (uint64_t)end;
  }
  uint64_t blocks = size / BLOCK;
  if (blocks == 0) {
    fprintf(stderr, "%s: smaller than one block\n", device);
    return 1;
  }
  void *buf;
  if (posix_memalign(&buf, BLOCK, BLOCK) != 0) {
    fprintf(stderr, "out of memory\n");
    return 1;
  }
  uint64_t start = now_ns(), limit = (uint64_t)(seconds * 1e9), ops = 0, t;
  do {
    for (int i = 0; i < 64; i++) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      off_t at = (off_t)((x % blocks) * BLOCK);
      if (pread(fd, buf, BLOCK, at) != BLOCK) {
        perror("pread");
        return 1;
      }
      ops++;
    }
    t = now_ns() - start;
  } while (t < limit);
  printf("RANDREAD ops=%llu ns=%llu iops=%.0f\n", (unsigned long long)ops,
         (unsigned long long)t, (double)ops * 1e9 / (double)t);
  return 0;
}
