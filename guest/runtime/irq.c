/*
 * irq.c: interrupts for runtime guests, from user mode (CPL3 with IOPL = 3, so
 * `cli`, `sti` and port I/O work; the local APIC and the IOAPIC are reached
 * through the VMM's identity map, which covers the MMIO hole).
 *
 * The CPL0 side is in kernel.S: a 3-instruction handler per vector 32-254 that
 * counts into dv_irq_counts[vector] and signals EOI to the local APIC, and the
 * interrupt trap. Everything that needs no CPL0 privilege is here, at native speed
 * on PVM hosts.
 *
 * User code cannot use `sti` and `cli` itself: PVM raises #GP for them at CPL3
 * even with IOPL = 3. Instead it executes `hlt`, which is privileged everywhere
 * and so always takes #GP, with an operation in eax; the kernel's #GP handler
 * recognizes the hlt and turns interrupts on or off for user mode, or halts until
 * one arrives (kernel.S, dv_fault_13). A system call leaves interrupts off.
 *
 * Needs a VM created with interrupts (the in-kernel irqchip); without one the
 * APIC accesses read all-ones, the counters never move and dv_irq_wait_count()
 * would sleep forever.
 */
#include "dv_guest.h"

/* Local APIC registers (byte offsets in its page). */
#define LAPIC_BASE 0xfee00000u
#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080
#define LAPIC_SVR 0x0f0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_CURRENT 0x390
#define LAPIC_TIMER_DIVIDE 0x3e0
#define LAPIC_SVR_ENABLE 0x100
#define LVT_MASKED (1u << 16)
#define LVT_TIMER_PERIODIC (1u << 17)
#define TIMER_DIVIDE_BY_1 0xb

/* The IOAPIC: an index register and a data window. */
#define IOAPIC_BASE 0xfec00000u
#define IOAPIC_REDIRECTION(pin) (0x10 + 2 * (pin))
#define IOAPIC_PINS 24

/* The 8259 PIC pair's data (mask) ports. */
#define PIC1_DATA 0x21
#define PIC2_DATA 0xa1

static inline void lapic_write(uint32_t reg, uint32_t value)
{
	*(volatile uint32_t *)(uintptr_t)(LAPIC_BASE + reg) = value;
}

static inline uint32_t lapic_read(uint32_t reg)
{
	return *(volatile uint32_t *)(uintptr_t)(LAPIC_BASE + reg);
}

static inline void ioapic_write(uint32_t index, uint32_t value)
{
	*(volatile uint32_t *)(uintptr_t)IOAPIC_BASE = index;
	*(volatile uint32_t *)(uintptr_t)(IOAPIC_BASE + 0x10) = value;
}

static inline void outb(uint16_t port, uint8_t value)
{
	__asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

/* The interrupt trap's operations (kernel.S). */
#define TRAP_IRQ_ON 0
#define TRAP_IRQ_OFF 1
#define TRAP_IRQ_WAIT 2

void dv_irq_enable(void)
{
	__asm__ volatile("hlt" : : "a"(TRAP_IRQ_ON) : "memory");
}

void dv_irq_disable(void)
{
	__asm__ volatile("hlt" : : "a"(TRAP_IRQ_OFF) : "memory");
}

uint32_t dv_apic_id(void)
{
	return lapic_read(LAPIC_ID) >> 24;
}

int64_t dv_irq_init(void)
{
	/* The PIC's interrupts arrive as ExtINT, which the kernel's handlers would
	 * have to acknowledge at the PIC: keep it masked and use the IOAPIC. */
	outb(PIC1_DATA, 0xff);
	outb(PIC2_DATA, 0xff);
	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_SVR, LAPIC_SVR_ENABLE | DV_SPURIOUS_VECTOR);
	/* Line n -> vector 0x20 + n on this CPU: fixed delivery, physical
	 * destination, active high, edge-triggered, unmasked. */
	uint32_t apic_id = dv_apic_id();
	for (uint32_t pin = 0; pin < IOAPIC_PINS; pin++) {
		ioapic_write(IOAPIC_REDIRECTION(pin) + 1, apic_id << 24);
		ioapic_write(IOAPIC_REDIRECTION(pin), DV_IRQ_VECTOR_BASE + pin);
	}
	int64_t status = dv_hypercall(DV_HC_IRQ_COUNTERS, (uintptr_t)dv_irq_counts, 256, 0, 0);
	dv_irq_enable();
	return status;
}

uint64_t dv_irq_wait_count(uint32_t vector, uint64_t target)
{
	volatile uint64_t *counter = &dv_irq_counts[vector & 0xff];
	uint64_t count;
	/* The kernel re-checks the counter with interrupts off before it halts, so
	 * an interrupt between this check and the hlt is not slept through. */
	while ((count = *counter) < target)
		__asm__ volatile("hlt"
				 : : "a"(TRAP_IRQ_WAIT), "D"(counter), "S"(target)
				 : "memory");
	return count;
}

uint32_t dv_timer_start(uint32_t hz)
{
	if (hz == 0 || hz > DV_LAPIC_TIMER_HZ)
		return 0;
	uint32_t initial = DV_LAPIC_TIMER_HZ / hz;
	lapic_write(LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_BY_1);
	lapic_write(LAPIC_LVT_TIMER, DV_TIMER_VECTOR | LVT_TIMER_PERIODIC);
	lapic_write(LAPIC_TIMER_INITIAL, initial);
	return initial;
}

void dv_timer_stop(void)
{
	lapic_write(LAPIC_TIMER_INITIAL, 0);
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | DV_TIMER_VECTOR);
}

uint32_t dv_timer_current(void)
{
	return lapic_read(LAPIC_TIMER_CURRENT);
}
