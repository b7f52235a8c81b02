/*
 * dv_guest.h: the API of the denovisor guest runtime, for C programs that run
 * as user-mode (CPL3) guests and, unchanged, as native Linux programs.
 *
 * A program defines `int main(uint64_t arg)`. In a guest, `arg` is the value the
 * host put in rdi at entry and main's return value becomes the EXIT hypercall's
 * status. Built natively (with -DDV_NATIVE and native_rt.c), `arg` is the first
 * command-line argument (0 when absent) and the return value is the process's
 * exit status.
 *
 * In a guest every dv_* call that talks to the host is one hypercall: one VM
 * exit, which costs ~50 us on a PVM host. dv_syscall0 is a system call into the
 * guest kernel (kernel.S), which does not reach the host.
 *
 * The hypercall ABI (v1) is documented in guest/README.md.
 */
#ifndef DV_GUEST_H
#define DV_GUEST_H

#include <stddef.h>
#include <stdint.h>

/* The hypercall port: `out %eax, %dx` with eax = the request block's address. */
#define DV_HC_PORT 0x510

/* Call numbers. */
#define DV_HC_WRITE 1  /* (ptr, len) console bytes; ret = len */
#define DV_HC_EXIT 2   /* (status) stop the VM; does not return */
#define DV_HC_CLOCK 3  /* () ret = host CLOCK_MONOTONIC in ns */
#define DV_HC_REPORT 4 /* (ptr, len) store these bytes as the run's result; ret = len */
#define DV_HC_FAULT 5  /* (vector, error code, address, rip) the guest faulted */
#define DV_HC_NOP 6    /* () ret = 0 */
#define DV_HC_IRQ_COUNTERS 7 /* (ptr, count) publish count u64 interrupt counters; ret = 0 */

/* Status codes the host writes to a request block. */
#define DV_HC_ENOCALL (-1) /* unknown call number */
#define DV_HC_EFAULT (-2)  /* pointer/length outside guest RAM */
#define DV_HC_EINVAL (-3)  /* invalid length (overflow or above the limit) */

/* The most bytes one WRITE or REPORT may carry. */
#define DV_TRANSFER_MAX (1u << 20)

/* What dv_syscall0 returns for an unknown system call number: -DV_ENOSYS. */
#define DV_ENOSYS 38

/* Interrupt vectors of the runtime (guest only): interrupt line n arrives as
 * vector DV_IRQ_VECTOR_BASE + n (dv_irq_init routes the IOAPIC so), the local
 * APIC timer as DV_TIMER_VECTOR; every vector from 32 to 254 is counted in
 * dv_irq_counts. */
#define DV_IRQ_VECTOR_BASE 0x20
#define DV_TIMER_VECTOR 0xf0
#define DV_SPURIOUS_VECTOR 0xff
/* KVM's local APIC timer counts at its 1 GHz APIC bus clock (divide by 1). */
#define DV_LAPIC_TIMER_HZ 1000000000u

/* A hypercall request block: 48 bytes, little-endian, below 4 GiB. */
struct dv_hc_request {
	uint32_t nr;
	int32_t status;
	uint64_t arg[4];
	uint64_t ret;
};
_Static_assert(sizeof(struct dv_hc_request) == 48, "request block is 48 bytes");

#if defined(DV_NATIVE) && !defined(DV_NATIVE_RT)
/* Natively the C library owns main; native_rt.c calls the program's as dv_main. */
#define main dv_main
#endif
#ifndef DV_NATIVE_RT
int main(uint64_t arg);
/* The entry of a program that runs on several vCPUs (guest only): every vCPU
 * calls it on its own stack with its index and the vCPU count, which the host
 * passes in r8 and r9 (Vm.load's `arguments`). The first vCPU to return ends
 * the VM with its status, so the others should wait for it rather than return.
 * dv_alloc is for single-vCPU programs. */
int dv_vcpu_main(uint64_t arg, uint64_t vcpu, uint64_t vcpus);
#endif

/* Allocates `bytes` of fresh (zeroed, never touched) memory, NULL when none is
 * left. Guest: a bump allocator from the end of the image, 4 KiB-aligned for
 * sizes of 4 KiB and up, 64-byte-aligned below, up to 1 MiB under the initial
 * stack pointer. Never freed. */
void *dv_alloc(size_t bytes);

/* Formats like a small printf: %d %i %u %x %X %s %c %p %%, with an optional '0'
 * flag, a width and the l/ll/z/j length modifiers. Always NUL-terminates (when
 * cap > 0) and returns the length the full output would have. */
size_t dv_format(char *buf, size_t cap, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Formats (up to 255 bytes) and writes the result with one dv_write. */
int64_t dv_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Reports the one-line JSON result every workload ends with:
 * {"workload":"<name>","arg":N,"checksum":"<16 hex digits>","ns":N,"ops":N} */
int64_t dv_report_result(const char *workload, uint64_t arg, uint64_t checksum, uint64_t ns,
			 uint64_t ops);

#ifdef DV_NATIVE

int64_t dv_write(const void *buf, size_t len);
int64_t dv_io_write(const void *buf, size_t len);
int64_t dv_report(const void *buf, size_t len);
uint64_t dv_clock_ns(void);
int64_t dv_nop(void);
int64_t dv_syscall0(uint64_t nr);
__attribute__((noreturn)) void dv_exit(int status);

#else /* the guest */

/* Set by crt0.S: guest RAM in bytes (rsi at entry) and the initial stack pointer. */
extern uint64_t dv_ram_bytes;
extern uint64_t dv_stack_top;

/*
 * Interrupts (irq.c; kernel.S counts them). Needs a VM created with interrupts.
 *
 * dv_irq_init() masks the PIC, enables the local APIC, routes every IOAPIC line n
 * to vector DV_IRQ_VECTOR_BASE + n on this CPU, publishes dv_irq_counts to the
 * host (the IRQ_COUNTERS hypercall: one exit) and enables interrupts. Returns the
 * hypercall's status (0).
 *
 * dv_irq_counts[v] counts the interrupts of vector v handled so far; the handler
 * is three instructions at CPL0 (count, EOI, iretq). Read it through a volatile
 * access, or use dv_irq_wait_count().
 */
extern volatile uint64_t dv_irq_counts[256];

int64_t dv_irq_init(void);
/* Interrupts on / off for user mode, through the kernel's interrupt trap (a hlt
 * at CPL3; PVM refuses sti and cli there). A system call turns them off. */
void dv_irq_enable(void);
void dv_irq_disable(void);
/* Sleeps (hlt in the guest kernel, no spinning) until dv_irq_counts[vector]
 * reaches target; returns the count. Interrupts stay as they were. */
uint64_t dv_irq_wait_count(uint32_t vector, uint64_t target);
/* The local APIC timer: periodic at hz (at most DV_LAPIC_TIMER_HZ), vector
 * DV_TIMER_VECTOR. Returns the initial count programmed (0: bad hz). */
uint32_t dv_timer_start(uint32_t hz);
void dv_timer_stop(void);
/* The timer's current count (counts down from the initial count). */
uint32_t dv_timer_current(void);
/* This CPU's local APIC id. */
uint32_t dv_apic_id(void);

/*
 * One hypercall. Returns `ret`, or the negative status the host wrote. The block
 * lives on the stack, which is guest RAM below 4 GiB. The "memory" clobber makes
 * the buffers a call points to complete before the exit, and lets the host's
 * writes be seen after it.
 */
static inline int64_t dv_hypercall(uint32_t nr, uint64_t a0, uint64_t a1, uint64_t a2,
				   uint64_t a3)
{
	struct dv_hc_request req = { nr, 0, { a0, a1, a2, a3 }, 0 };
	__asm__ volatile("outl %%eax, %%dx"
			 : "+m"(req)
			 : "a"((uint32_t)(uintptr_t)&req), "d"((uint16_t)DV_HC_PORT)
			 : "memory");
	return req.status < 0 ? (int64_t)req.status : (int64_t)req.ret;
}

/* Writes bytes to the console. Returns len or a negative status. */
static inline int64_t dv_write(const void *buf, size_t len)
{
	return dv_hypercall(DV_HC_WRITE, (uintptr_t)buf, len, 0, 0);
}

/* The io workload's write: the console in a guest, /dev/null natively. */
static inline int64_t dv_io_write(const void *buf, size_t len)
{
	return dv_write(buf, len);
}

/* Hands the host the run's result (replacing an earlier one). Returns len or a
 * negative status. */
static inline int64_t dv_report(const void *buf, size_t len)
{
	return dv_hypercall(DV_HC_REPORT, (uintptr_t)buf, len, 0, 0);
}

/* The host's CLOCK_MONOTONIC in nanoseconds. */
static inline uint64_t dv_clock_ns(void)
{
	return (uint64_t)dv_hypercall(DV_HC_CLOCK, 0, 0, 0, 0);
}

/* A hypercall that does nothing: one exit round trip. Returns 0. */
static inline int64_t dv_nop(void)
{
	return dv_hypercall(DV_HC_NOP, 0, 0, 0, 0);
}

/* System call `nr` (no arguments) into the guest kernel: 0 returns 1, anything
 * else -DV_ENOSYS. */
static inline int64_t dv_syscall0(uint64_t nr)
{
	int64_t ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(nr) : "rcx", "r11", "memory");
	return ret;
}

/* Stops the VM with `status`. On a host without the hypercall device, falls back
 * to the debug-exit port (exit code ((status & 0xff) << 1) | 1). */
__attribute__((noreturn)) static inline void dv_exit(int status)
{
	dv_hypercall(DV_HC_EXIT, (uint64_t)(int64_t)status, 0, 0, 0);
	__asm__ volatile("outb %%al, $0xf4" : : "a"((uint8_t)status));
	for (;;)
		__asm__ volatile("pause");
}

#endif /* DV_NATIVE */

#endif /* DV_GUEST_H */
