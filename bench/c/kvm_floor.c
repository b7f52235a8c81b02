/*
 * kvm_floor.c: the host floor for denovisor's benchmarks.
 *
 * The smallest C program that does what the Rust core does on its hot and cold
 * paths: create a VM with 2 MiB of RAM and one vCPU, enter a flat guest image in
 * 64-bit user mode (CPL3, IOPL=3) with the same boot structures as
 * core/src/boot/layout.rs, and handle port-I/O exits in a plain KVM_RUN loop. No
 * threads, no locks, no device model: whatever the Rust core costs beyond these
 * numbers is overhead of its own.
 *
 * Built as a shared library by bench/_floor.ts (gcc -O2 -shared -fPIC) and called
 * through Deno.dlopen. Every function returns 0 or a negative errno; the failing
 * step is described by floor_last_error().
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* Guest layout, the same as core/src/boot/layout.rs. */
#define RAM_SIZE (2u << 20)
#define GDT_ADDR 0x500
#define PML4_ADDR 0x1000
#define PDPT_ADDR 0x2000
#define PD_ADDR 0x3000
#define PD_COUNT 4 /* identity map of the first 4 GiB */
#define TSS_ADDR 0x7000
#define TSS_SIZE 104
#define IO_BITMAP_SIZE (65536 / 8 + 1) /* one bit per port + the closing 0xff */
#define KERNEL_STACK_TOP 0x10000      /* TSS.rsp0 */
#define LOAD_ADDR 0x100000
#define STACK_TOP RAM_SIZE
#define KVM_TSS_ADDRESS 0xfffbd000 /* as the Rust core: a 3-page hole below 4 GiB */

#define USER_DS (0x20 | 3)
#define USER_CS (0x28 | 3)
#define TSS_SEL 0x30

#define PTE_PRESENT (1ull << 0)
#define PTE_WRITE (1ull << 1)
#define PTE_USER (1ull << 2)
#define PTE_HUGE (1ull << 7)

#define CR0_VALUE 0x80050033ull /* PG | WP | NE | ET | MP | PE */
#define CR4_VALUE 0x620ull      /* OSXMMEXCPT | OSFXSR | PAE */
#define EFER_VALUE 0x501ull     /* LMA | LME | SCE */
#define RFLAGS_VALUE 0x3002ull  /* IOPL=3 | reserved bit 1 */

#define PORT_COUNTED 0x80
#define PORT_DEBUG_EXIT 0xf4

static char last_error[256];

static int vfail(int err, int syscall, const char *fmt, va_list ap) {
  int n = vsnprintf(last_error, sizeof last_error, fmt, ap);
  if (syscall && n >= 0 && (size_t)n < sizeof last_error - 2) {
    snprintf(last_error + n, sizeof last_error - (size_t)n, ": %s", strerror(err));
  }
  return -err;
}

/* Records that a system call failed with errno `err`; returns -err. */
static int fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(int err, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int rc = vfail(err, 1, fmt, ap);
  va_end(ap);
  return rc;
}

/* Records a failure of the floor's own (message says it all); returns -err. */
static int refuse(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int refuse(int err, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int rc = vfail(err, 0, fmt, ap);
  va_end(ap);
  return rc;
}

/* The description of the last failure ("" if none). Valid until the next call. */
const char *floor_last_error(void) { return last_error; }

static int kvm_fd = -1;

/* The process-wide /dev/kvm fd, opened on first use (like the Rust core, so the
 * cold-start numbers do not include an open per VM). Not thread-safe: the Deno
 * side calls this library from one thread. */
static int kvm(void) {
  if (kvm_fd >= 0) return kvm_fd;
  int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) return fail(errno, "open /dev/kvm");
  int version = ioctl(fd, KVM_GET_API_VERSION, 0);
  if (version < 0) {
    int err = errno;
    close(fd);
    return fail(err, "KVM_GET_API_VERSION");
  }
  if (version != KVM_API_VERSION) {
    close(fd);
    return refuse(ENOTSUP, "KVM API version %d is not %d", version, KVM_API_VERSION);
  }
  kvm_fd = fd;
  return kvm_fd;
}

struct vm {
  int vm_fd;
  int vcpu_fd;
  uint8_t *ram;
  struct kvm_run *run;
  size_t run_size;
};

static void vm_destroy(struct vm *vm) {
  if (vm->run != NULL && vm->run != MAP_FAILED) munmap(vm->run, vm->run_size);
  if (vm->vcpu_fd >= 0) close(vm->vcpu_fd);
  /* The VM fd goes before the RAM it maps, so KVM never sees a dangling slot. */
  if (vm->vm_fd >= 0) close(vm->vm_fd);
  if (vm->ram != NULL && vm->ram != MAP_FAILED) munmap(vm->ram, RAM_SIZE);
  vm->run = NULL;
  vm->vcpu_fd = -1;
  vm->vm_fd = -1;
  vm->ram = NULL;
}

/* Packs a GDT descriptor. */
static uint64_t descriptor(uint32_t base, uint32_t limit, uint8_t access, uint8_t flags) {
  return (limit & 0xffffull) | ((base & 0xffffffull) << 16) | ((uint64_t)access << 40) |
         (((limit >> 16) & 0xfull) << 48) | (((uint64_t)flags & 0xf) << 52) |
         (((uint64_t)base >> 24 & 0xff) << 56);
}

static void write_u64(uint8_t *ram, uint64_t addr, uint64_t value) {
  memcpy(ram + addr, &value, sizeof value);
}

/* GDT, TSS with its I/O bitmap, identity page tables: core/src/boot/x86_64.rs.
 * The page tables map 4 GiB although RAM is 2 MiB, as the Rust core's do, so both
 * sides give KVM the same work. */
static void write_boot_structures(uint8_t *ram) {
  const uint32_t tss_limit = TSS_SIZE + IO_BITMAP_SIZE - 1;
  const uint64_t gdt[8] = {
      0,
      descriptor(0, 0xfffff, 0x9b, 0xa), /* 0x08 kernel code64 */
      descriptor(0, 0xfffff, 0x93, 0xc), /* 0x10 kernel data */
      descriptor(0, 0xfffff, 0xfb, 0xc), /* 0x18 user code32 */
      descriptor(0, 0xfffff, 0xf3, 0xc), /* 0x20 user data */
      descriptor(0, 0xfffff, 0xfb, 0xa), /* 0x28 user code64 */
      descriptor(TSS_ADDR, tss_limit, 0x8b, 0x0), /* 0x30 busy TSS (low half) */
      0,                                          /* TSS high half: base >> 32 */
  };
  memcpy(ram + GDT_ADDR, gdt, sizeof gdt);

  uint8_t *tss = ram + TSS_ADDR;
  memset(tss, 0, TSS_SIZE + IO_BITMAP_SIZE); /* bitmap of zeros: every port allowed */
  write_u64(tss, 4, KERNEL_STACK_TOP);       /* rsp0 */
  const uint16_t iomap_base = TSS_SIZE;
  memcpy(tss + 102, &iomap_base, sizeof iomap_base);
  tss[TSS_SIZE + IO_BITMAP_SIZE - 1] = 0xff;

  const uint64_t table = PTE_PRESENT | PTE_WRITE | PTE_USER;
  write_u64(ram, PML4_ADDR, PDPT_ADDR | table);
  for (uint64_t i = 0; i < PD_COUNT; i++) {
    write_u64(ram, PDPT_ADDR + i * 8, (PD_ADDR + i * 4096) | table);
  }
  for (uint64_t i = 0; i < PD_COUNT * 512; i++) {
    write_u64(ram, PD_ADDR + i * 8, (i << 21) | table | PTE_HUGE);
  }
}

static struct kvm_segment segment(uint16_t selector, uint8_t type, uint8_t dpl, uint8_t l,
                                  uint8_t db) {
  struct kvm_segment s = {
      .base = 0,
      .limit = 0xffffffff,
      .selector = selector,
      .type = type,
      .present = 1,
      .dpl = dpl,
      .db = db,
      .s = 1,
      .l = l,
      .g = 1,
  };
  return s;
}

/* Registers for a 64-bit CPL3 entry at LOAD_ADDR with rdi = arg. */
static int enter_user_mode(struct vm *vm, uint64_t arg) {
  struct kvm_sregs sregs;
  if (ioctl(vm->vcpu_fd, KVM_GET_SREGS, &sregs) < 0) return fail(errno, "KVM_GET_SREGS");
  sregs.cs = segment(USER_CS, 0xb, 3, 1, 0);
  struct kvm_segment data = segment(USER_DS, 0x3, 3, 0, 1);
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
  sregs.tr = (struct kvm_segment){
      .base = TSS_ADDR,
      .limit = TSS_SIZE + IO_BITMAP_SIZE - 1,
      .selector = TSS_SEL,
      .type = 0x9, /* 64-bit TSS, available; KVM marks it busy */
      .present = 1,
  };
  sregs.gdt.base = GDT_ADDR;
  sregs.gdt.limit = 8 * 8 - 1;
  sregs.idt.base = 0;
  sregs.idt.limit = 0;
  sregs.cr0 = CR0_VALUE;
  sregs.cr3 = PML4_ADDR;
  sregs.cr4 = CR4_VALUE;
  sregs.efer = EFER_VALUE;
  if (ioctl(vm->vcpu_fd, KVM_SET_SREGS, &sregs) < 0) return fail(errno, "KVM_SET_SREGS");

  struct kvm_regs regs;
  memset(&regs, 0, sizeof regs);
  regs.rip = LOAD_ADDR;
  regs.rsp = STACK_TOP;
  regs.rflags = RFLAGS_VALUE;
  regs.rdi = arg;
  if (ioctl(vm->vcpu_fd, KVM_SET_REGS, &regs) < 0) return fail(errno, "KVM_SET_REGS");
  return 0;
}

/* Everything up to the first KVM_RUN. On failure, vm is left for vm_destroy. */
static int vm_create(struct vm *vm, const uint8_t *code, size_t len, uint64_t arg) {
  vm->vm_fd = vm->vcpu_fd = -1;
  vm->ram = NULL;
  vm->run = NULL;
  vm->run_size = 0;
  if (code == NULL || len == 0 || len > STACK_TOP - LOAD_ADDR) {
    return refuse(EINVAL, "guest image of %zu bytes does not fit 0x%x..0x%x", len, LOAD_ADDR,
                STACK_TOP);
  }
  int system_fd = kvm();
  if (system_fd < 0) return system_fd;

  vm->vm_fd = ioctl(system_fd, KVM_CREATE_VM, 0);
  if (vm->vm_fd < 0) return fail(errno, "KVM_CREATE_VM");
  if (ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, KVM_TSS_ADDRESS) < 0) {
    return fail(errno, "KVM_SET_TSS_ADDR");
  }

  vm->ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (vm->ram == MAP_FAILED) return fail(errno, "mmap guest RAM");
  struct kvm_userspace_memory_region region = {
      .slot = 0,
      .guest_phys_addr = 0,
      .memory_size = RAM_SIZE,
      .userspace_addr = (uint64_t)(uintptr_t)vm->ram,
  };
  if (ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0) {
    return fail(errno, "KVM_SET_USER_MEMORY_REGION");
  }
  write_boot_structures(vm->ram);
  memcpy(vm->ram + LOAD_ADDR, code, len);

  vm->vcpu_fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, 0);
  if (vm->vcpu_fd < 0) return fail(errno, "KVM_CREATE_VCPU");
  int run_size = ioctl(system_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
  if (run_size < (int)sizeof(struct kvm_run)) {
    return fail(run_size < 0 ? errno : EPROTO, "KVM_GET_VCPU_MMAP_SIZE");
  }
  vm->run_size = (size_t)run_size;
  vm->run = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu_fd, 0);
  if (vm->run == MAP_FAILED) return fail(errno, "mmap kvm_run");
  return enter_user_mode(vm, arg);
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static const char *exit_name(uint32_t reason) {
  switch (reason) {
  case KVM_EXIT_HLT: return "hlt";
  case KVM_EXIT_MMIO: return "mmio";
  case KVM_EXIT_SHUTDOWN: return "shutdown (triple fault)";
  case KVM_EXIT_FAIL_ENTRY: return "entry failure";
  case KVM_EXIT_INTERNAL_ERROR: return "internal error";
  default: return "unexpected";
  }
}

/* Runs until a 1-byte out to the debug-exit port. Outs to PORT_COUNTED are counted
 * in *exits when exits is not NULL; anything else is an error (EPROTO). */
static int run_until_debug_exit(struct vm *vm, uint64_t *exits) {
  struct kvm_run *run = vm->run;
  for (;;) {
    if (ioctl(vm->vcpu_fd, KVM_RUN, 0) < 0) {
      if (errno == EINTR || errno == EAGAIN) continue; /* a signal: not a guest exit */
      return fail(errno, "KVM_RUN");
    }
    if (run->exit_reason != KVM_EXIT_IO) {
      struct kvm_regs regs;
      unsigned long long rip = ioctl(vm->vcpu_fd, KVM_GET_REGS, &regs) == 0 ? regs.rip : 0;
      return refuse(EPROTO, "guest stopped with exit %u (%s) at rip 0x%llx", run->exit_reason,
                  exit_name(run->exit_reason), rip);
    }
    if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == PORT_DEBUG_EXIT) return 0;
    if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == PORT_COUNTED) {
      if (exits != NULL) *exits += 1; /* exits, not bytes: a rep outs is one exit */
      continue;
    }
    return refuse(EPROTO, "guest used port 0x%x (%s, size %u), which the floor does not handle",
                run->io.port, run->io.direction == KVM_EXIT_IO_OUT ? "out" : "in",
                run->io.size);
  }
}

/*
 * Runs `code` (a flat 64-bit user-mode image, linked at 0x100000) with
 * rdi = iterations until it writes to the debug-exit port. *out_ns is the wall time
 * from the first KVM_RUN to that exit, *out_exits the number of outs to port 0x80.
 * Returns 0 or a negative errno (see floor_last_error).
 */
int floor_exit_loop(const uint8_t *code, size_t len, uint64_t iterations, uint64_t *out_ns,
                    uint64_t *out_exits) {
  if (out_ns == NULL || out_exits == NULL) return refuse(EINVAL, "null output pointer");
  last_error[0] = '\0';
  struct vm vm;
  int rc = vm_create(&vm, code, len, iterations);
  if (rc == 0) {
    uint64_t exits = 0;
    uint64_t start = now_ns();
    rc = run_until_debug_exit(&vm, &exits);
    uint64_t end = now_ns();
    if (rc == 0) {
      *out_ns = end - start;
      *out_exits = exits;
    }
  }
  vm_destroy(&vm);
  return rc;
}

/*
 * The whole cold path for one guest: create the VM (2 MiB RAM, one vCPU, 64-bit
 * user mode), run `code` until it writes to the debug-exit port, tear it all down.
 * *out_ns covers all of it except the process-wide /dev/kvm open, done once.
 * Returns 0 or a negative errno (see floor_last_error).
 */
int floor_cold_start(const uint8_t *code, size_t len, uint64_t *out_ns) {
  if (out_ns == NULL) return refuse(EINVAL, "null output pointer");
  last_error[0] = '\0';
  int fd = kvm();
  if (fd < 0) return fd;
  uint64_t start = now_ns();
  struct vm vm;
  int rc = vm_create(&vm, code, len, 0);
  if (rc == 0) rc = run_until_debug_exit(&vm, NULL);
  vm_destroy(&vm);
  uint64_t end = now_ns();
  if (rc == 0) *out_ns = end - start;
  return rc;
}
