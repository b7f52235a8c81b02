/*
 * vsock_host: the host side of bench/vsock_bench.ts, the same code for both
 * VMMs, so only the VMM differs: denovisor's Unix sockets (Firecracker's
 * convention) or QEMU's vhost-vsock (AF_VSOCK on the host).
 *
 *   vsock_host sink unix PATH             accept forever on the Unix socket PATH
 *   vsock_host sink vsock PORT            accept forever on AF_VSOCK PORT
 *       each connection is read to EOF, answered "DONE\n" and closed
 *   vsock_host source unix PATH PORT BYTES RUNS
 *   vsock_host source vsock CID PORT BYTES RUNS
 *       RUNS times: connect to the guest's PORT (through PATH with
 *       "CONNECT PORT\n" and its "OK", or to CID:PORT), retrying until the
 *       guest listens; send BYTES, shut down writing, read to EOF
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define BUF (256 * 1024)

static void die(const char *what) {
  fprintf(stderr, "vsock_host: %s: %s\n", what, strerror(errno));
  exit(1);
}

static int unix_addr(const char *path, struct sockaddr_un *a) {
  memset(a, 0, sizeof *a);
  a->sun_family = AF_UNIX;
  if (strlen(path) >= sizeof a->sun_path) {
    errno = ENAMETOOLONG;
    return -1;
  }
  strcpy(a->sun_path, path);
  return 0;
}

static void serve(int l) {
  static char buf[BUF];
  for (;;) {
    int fd = accept(l, NULL, NULL);
    if (fd < 0) {
      if (errno == EINTR) continue;
      die("accept");
    }
    for (;;) {
      ssize_t r = read(fd, buf, sizeof buf);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;
    }
    (void)!write(fd, "DONE\n", 5);
    close(fd);
  }
}

static int write_all(int fd, const char *p, long long n) {
  while (n > 0) {
    ssize_t w = send(fd, p, (size_t)(n < BUF ? n : BUF), MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return -1;
    n -= w;
  }
  return 0;
}

/* A connection to the guest's port, or -1 (not listening yet). */
static int connect_guest(int argc, char **argv) {
  if (!strcmp(argv[2], "unix")) {
    struct sockaddr_un a;
    if (unix_addr(argv[3], &a) < 0) die("path");
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
      close(fd);
      return -1;
    }
    char line[64];
    int n = snprintf(line, sizeof line, "CONNECT %s\n", argv[4]);
    if (write_all(fd, line, n) < 0) {
      close(fd);
      return -1;
    }
    size_t got = 0;
    while (got < sizeof line - 1) {
      ssize_t r = read(fd, line + got, 1);
      if (r <= 0) break;
      if (line[got++] == '\n') break;
    }
    line[got] = 0;
    if (strncmp(line, "OK ", 3) != 0) {
      close(fd);
      return -1;
    }
    return fd;
  }
  (void)argc;
  int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
  if (fd < 0) die("socket");
  struct sockaddr_vm a = {.svm_family = AF_VSOCK,
                          .svm_cid = (unsigned)strtoul(argv[3], NULL, 10),
                          .svm_port = (unsigned)strtoul(argv[4], NULL, 10)};
  if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
    close(fd);
    return -1;
  }
  return fd;
}

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  if (argc == 4 && !strcmp(argv[1], "sink")) {
    int l;
    if (!strcmp(argv[2], "unix")) {
      struct sockaddr_un a;
      if (unix_addr(argv[3], &a) < 0) die("path");
      l = socket(AF_UNIX, SOCK_STREAM, 0);
      if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    } else {
      l = socket(AF_VSOCK, SOCK_STREAM, 0);
      struct sockaddr_vm a = {.svm_family = AF_VSOCK,
                              .svm_cid = VMADDR_CID_ANY,
                              .svm_port = (unsigned)strtoul(argv[3], NULL, 10)};
      if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    }
    if (listen(l, 16) < 0) die("listen");
    fprintf(stderr, "SINK-READY\n");
    serve(l);
  }
  if (argc == 7 && !strcmp(argv[1], "source")) {
    long long bytes = atoll(argv[5]);
    int runs = atoi(argv[6]);
    static char buf[BUF];
    memset(buf, 'h', sizeof buf);
    for (int run = 0; run < runs;) {
      int fd = connect_guest(argc, argv);
      if (fd < 0) {
        usleep(20000);
        continue;
      }
      if (write_all(fd, buf, bytes) < 0 || shutdown(fd, SHUT_WR) < 0) {
        close(fd);
        continue;
      }
      while (read(fd, buf, sizeof buf) > 0) {
      }
      close(fd);
      run++;
    }
    return 0;
  }
  fprintf(stderr, "usage: vsock_host sink unix PATH | sink vsock PORT | "
                  "source unix PATH PORT BYTES RUNS | source vsock CID PORT BYTES RUNS\n");
  return 2;
}
