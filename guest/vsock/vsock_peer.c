/*
 * vsock_peer: the guest side of denovisor's vsock tests (busybox has no
 * AF_VSOCK). Built on the host with `gcc -static` by the test and put in the
 * test initramfs. The host is CID 2.
 *
 *   vsock_peer send PORT          connect to the host's PORT, copy stdin to it,
 *                                 shut down writing, copy its answer to stdout
 *   vsock_peer recv PORT          listen on PORT, take one connection, copy it
 *                                 to stdout until EOF
 *   vsock_peer echo PORT N        listen on PORT, echo N connections at once
 *   vsock_peer multi PORT N SIZE  N connections at once to the host's PORT, each
 *                                 sends SIZE bytes of its own pattern and checks
 *                                 the echo
 *   vsock_peer partial PORT K     connect, read K bytes, close (mid-stream)
 *   vsock_peer flood PORT         connect, write until the host goes away
 *   vsock_peer source PORT BYTES RUNS
 *                                 RUNS times: connect to the host's PORT, send
 *                                 BYTES, shut down writing, wait for its answer;
 *                                 prints "BENCH g2h BYTES NS" for each (the bench)
 *   vsock_peer whoami PORT        connect to the host's PORT, send "cid=N\n" (N: this
 *                                 guest's CID, from /dev/vsock), shut down
 *                                 writing, copy the answer to stdout after
 *                                 that same line
 *   vsock_peer sink PORT RUNS     listen on PORT; RUNS connections one after the
 *                                 other, each read to EOF: "BENCH h2g BYTES NS"
 *
 * A listener prints "VSOCK-READY PORT" on stderr once it listens. Failures
 * print "vsock_peer: what: why" on stderr and exit 1.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define BUF (64 * 1024)
#define HOST_CID 2

static void die(const char *what) {
  fprintf(stderr, "vsock_peer: %s: %s\n", what, strerror(errno));
  exit(1);
}

static unsigned port_arg(const char *s) {
  char *end;
  unsigned long v = strtoul(s, &end, 10);
  if (*s == 0 || *end != 0 || v > 0xffffffffUL) {
    fprintf(stderr, "vsock_peer: bad port %s\n", s);
    exit(2);
  }
  return (unsigned)v;
}

static int connect_host(unsigned port) {
  int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
  if (fd < 0) die("socket");
  struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = HOST_CID, .svm_port = port};
  if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
  return fd;
}

static int listen_on(unsigned port, int backlog) {
  int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
  if (fd < 0) die("socket");
  struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
  if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
  if (listen(fd, backlog) < 0) die("listen");
  fprintf(stderr, "VSOCK-READY %u\n", port);
  return fd;
}

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Copies from `in` to `out` until EOF; the bytes copied, or -1. */
static long long copy(int in, int out) {
  static char buf[BUF];
  long long total = 0;
  for (;;) {
    ssize_t r = read(in, buf, sizeof buf);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -1;
    if (r == 0) return total;
    if (write_all(out, buf, (size_t)r) < 0) return -1;
    total += r;
  }
}

static int cmd_send(unsigned port) {
  int fd = connect_host(port);
  if (copy(0, fd) < 0) die("sending");
  if (shutdown(fd, SHUT_WR) < 0) die("shutdown");
  if (copy(fd, 1) < 0) die("receiving");
  close(fd);
  return 0;
}

static int cmd_whoami(unsigned port) {
  /* A connected socket's own address keeps VMADDR_CID_ANY: the CID is the
   * transport's, which /dev/vsock reports (and the host's device drops a
   * packet from any other CID). */
  int dev = open("/dev/vsock", O_RDONLY | O_CLOEXEC);
  if (dev < 0) die("opening /dev/vsock");
  unsigned cid;
  if (ioctl(dev, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0) die("IOCTL_VM_SOCKETS_GET_LOCAL_CID");
  close(dev);
  int fd = connect_host(port);
  char line[32];
  int n = snprintf(line, sizeof line, "cid=%u\n", cid);
  fputs(line, stdout);
  fflush(stdout);
  if (write_all(fd, line, (size_t)n) < 0) die("write");
  if (shutdown(fd, SHUT_WR) < 0) die("shutdown");
  return copy(fd, 1) < 0;
}

static int cmd_recv(unsigned port) {
  int l = listen_on(port, 1);
  int fd = accept(l, NULL, NULL);
  if (fd < 0) die("accept");
  long long n = copy(fd, 1);
  if (n < 0) die("receiving");
  close(fd);
  fprintf(stderr, "VSOCK-RECEIVED %lld\n", n);
  return 0;
}

static int cmd_echo(unsigned port, int n) {
  int l = listen_on(port, n);
  for (int i = 0; i < n; i++) {
    int fd = accept(l, NULL, NULL);
    if (fd < 0) die("accept");
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
      close(l);
      _exit(copy(fd, fd) < 0 ? 1 : 0);
    }
    close(fd);
  }
  int failed = 0, status;
  while (wait(&status) > 0)
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failed++;
  printf("ECHO DONE %d FAILED %d\n", n, failed);
  return failed != 0;
}

static unsigned char pattern(int conn, long long at) {
  return (unsigned char)(conn * 131 + at * 7 + (at >> 9));
}

struct conn {
  int fd;
  long long sent, got;
};

static int cmd_multi(unsigned port, int n, long long size) {
  struct conn *c = calloc((size_t)n, sizeof *c);
  struct pollfd *p = calloc((size_t)n, sizeof *p);
  if (!c || !p) die("calloc");
  for (int i = 0; i < n; i++) c[i].fd = connect_host(port);
  static char buf[BUF];
  int done = 0;
  while (done < n) {
    for (int i = 0; i < n; i++) {
      p[i].fd = c[i].got < size ? c[i].fd : -1;
      p[i].events = POLLIN | (c[i].sent < size ? POLLOUT : 0);
      p[i].revents = 0;
    }
    if (poll(p, (nfds_t)n, 30000) <= 0) die("poll (stalled)");
    for (int i = 0; i < n; i++) {
      if (p[i].revents & POLLOUT) {
        long long k = size - c[i].sent < BUF ? size - c[i].sent : BUF;
        for (long long j = 0; j < k; j++) buf[j] = (char)pattern(i, c[i].sent + j);
        ssize_t w = send(c[i].fd, buf, (size_t)k, MSG_DONTWAIT);
        if (w < 0 && errno != EAGAIN && errno != EINTR) die("send");
        if (w > 0) c[i].sent += w;
      }
      if (p[i].revents & (POLLIN | POLLHUP | POLLERR)) {
        ssize_t r = recv(c[i].fd, buf, BUF, MSG_DONTWAIT);
        if (r < 0 && errno != EAGAIN && errno != EINTR) die("recv");
        if (r == 0) {
          fprintf(stderr, "vsock_peer: connection %d ended after %lld bytes\n", i, c[i].got);
          return 1;
        }
        for (ssize_t j = 0; j < r; j++) {
          if ((unsigned char)buf[j] != pattern(i, c[i].got + j)) {
            printf("MULTI FAIL connection %d byte %lld\n", i, c[i].got + j);
            return 1;
          }
        }
        if (r > 0) {
          c[i].got += r;
          if (c[i].got == size) {
            close(c[i].fd);
            done++;
          }
        }
      }
    }
  }
  printf("MULTI OK %d %lld\n", n, size);
  return 0;
}

static int cmd_partial(unsigned port, long long k) {
  int fd = connect_host(port);
  static char buf[BUF];
  long long got = 0;
  while (got < k) {
    ssize_t r = read(fd, buf, (size_t)(k - got < BUF ? k - got : BUF));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) die("read");
    got += r;
  }
  close(fd);
  printf("PARTIAL READ %lld\n", got);
  return 0;
}

static int cmd_flood(unsigned port) {
  int fd = connect_host(port);
  static char buf[BUF];
  memset(buf, 'f', sizeof buf);
  long long sent = 0;
  for (;;) {
    ssize_t w = send(fd, buf, sizeof buf, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) break;
    sent += w;
  }
  int e = errno;
  printf("FLOOD STOPPED %lld %s\n", sent, e == EPIPE ? "EPIPE" : e == ECONNRESET ? "ECONNRESET" : strerror(e));
  close(fd);
  return 0;
}

static long long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int cmd_source(unsigned port, long long bytes, int runs) {
  static char buf[BUF];
  memset(buf, 's', sizeof buf);
  for (int run = 0; run < runs; run++) {
    long long start = now_ns();
    int fd = connect_host(port);
    for (long long left = bytes; left > 0;) {
      ssize_t w = write(fd, buf, (size_t)(left < BUF ? left : BUF));
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) die("write");
      left -= w;
    }
    if (shutdown(fd, SHUT_WR) < 0) die("shutdown");
    while (read(fd, buf, sizeof buf) > 0) {
    }
    close(fd);
    printf("BENCH g2h %lld %lld\n", bytes, now_ns() - start);
  }
  return 0;
}

static int cmd_sink(unsigned port, int runs) {
  int l = listen_on(port, 1);
  static char buf[BUF];
  for (int run = 0; run < runs; run++) {
    int fd = accept(l, NULL, NULL);
    if (fd < 0) die("accept");
    long long start = now_ns(), got = 0;
    for (;;) {
      ssize_t r = read(fd, buf, sizeof buf);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;
      got += r;
    }
    long long ns = now_ns() - start;
    close(fd);
    printf("BENCH h2g %lld %lld\n", got, ns);
  }
  return 0;
}

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc == 3 && !strcmp(argv[1], "send")) return cmd_send(port_arg(argv[2]));
  if (argc == 3 && !strcmp(argv[1], "whoami")) return cmd_whoami(port_arg(argv[2]));
  if (argc == 3 && !strcmp(argv[1], "recv")) return cmd_recv(port_arg(argv[2]));
  if (argc == 4 && !strcmp(argv[1], "echo")) return cmd_echo(port_arg(argv[2]), atoi(argv[3]));
  if (argc == 5 && !strcmp(argv[1], "multi"))
    return cmd_multi(port_arg(argv[2]), atoi(argv[3]), atoll(argv[4]));
  if (argc == 4 && !strcmp(argv[1], "partial")) return cmd_partial(port_arg(argv[2]), atoll(argv[3]));
  if (argc == 3 && !strcmp(argv[1], "flood")) return cmd_flood(port_arg(argv[2]));
  if (argc == 5 && !strcmp(argv[1], "source"))
    return cmd_source(port_arg(argv[2]), atoll(argv[3]), atoi(argv[4]));
  if (argc == 4 && !strcmp(argv[1], "sink")) return cmd_sink(port_arg(argv[2]), atoi(argv[3]));
  fprintf(stderr, "usage: vsock_peer send|whoami|recv|echo|multi|partial|flood|source|sink PORT ...\n");
  return 2;
}
