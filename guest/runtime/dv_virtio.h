/*
 * dv_virtio.h: a minimal modern (VIRTIO 1.x) virtio-pci driver for runtime
 * guests (guest only), enough to drive any device's split queues by polling.
 *
 *   struct dv_virtio v;
 *   dv_virtio_open(&v, bdf);                 // capabilities -> BAR pointers
 *   dv_virtio_init(&v, wanted_features);     // reset, ACK, DRIVER, FEATURES_OK
 *   dv_virtq_setup(&v, &q, 0, 0);            // queue 0 at its maximum size
 *   dv_virtio_driver_ok(&v);                 // the device runs
 *   int head = dv_virtq_add(&q, bufs, n);    // a chain in the descriptor table
 *   dv_virtq_kick(&q);                       // write the queue's notify address
 *   dv_virtq_wait(&q, &len, timeout_ns);     // poll the used ring
 *
 * Queues run without interrupts unless dv_virtq_use_msix asks for them (MSI-X
 * vectors stay VIRTIO_MSI_NO_VECTOR and the avail ring asks for none); a kick is one MMIO write that KVM turns into an
 * ioeventfd signal without leaving the kernel. The structures are reached through
 * the identity map of the first 4 GiB, so BARs must lie below 4 GiB.
 */
#ifndef DV_VIRTIO_H
#define DV_VIRTIO_H

#include <stddef.h>
#include <stdint.h>

#include "dv_pci.h"

#define DV_VIRTIO_VENDOR 0x1af4
/* A modern device's PCI device ID: 0x1040 + the virtio device type. */
#define DV_VIRTIO_PCI_DEVICE(type) (0x1040 + (type))
#define DV_VIRTIO_TYPE_NET 1
#define DV_VIRTIO_TYPE_BLOCK 2
#define DV_VIRTIO_TYPE_RNG 4
#define DV_VIRTIO_TYPE_BALLOON 5
#define DV_VIRTIO_TYPE_VSOCK 19

/* Device status bits. */
#define DV_VIRTIO_ACKNOWLEDGE 1
#define DV_VIRTIO_DRIVER 2
#define DV_VIRTIO_DRIVER_OK 4
#define DV_VIRTIO_FEATURES_OK 8
#define DV_VIRTIO_NEEDS_RESET 0x40
#define DV_VIRTIO_FAILED 0x80

#define DV_VIRTIO_F_VERSION_1 (1ull << 32)
#define DV_VIRTIO_NO_VECTOR 0xffff

/* The virtio vendor capabilities' cfg_type. */
#define DV_VIRTIO_CAP_COMMON 1
#define DV_VIRTIO_CAP_NOTIFY 2
#define DV_VIRTIO_CAP_ISR 3
#define DV_VIRTIO_CAP_DEVICE 4

/* The common configuration structure's registers. */
#define DV_VIRTIO_COMMON_DFSELECT 0x00
#define DV_VIRTIO_COMMON_DF 0x04
#define DV_VIRTIO_COMMON_GFSELECT 0x08
#define DV_VIRTIO_COMMON_GF 0x0c
#define DV_VIRTIO_COMMON_MSIX 0x10
#define DV_VIRTIO_COMMON_NUMQ 0x12
#define DV_VIRTIO_COMMON_STATUS 0x14
#define DV_VIRTIO_COMMON_CFGGENERATION 0x15
#define DV_VIRTIO_COMMON_Q_SELECT 0x16
#define DV_VIRTIO_COMMON_Q_SIZE 0x18
#define DV_VIRTIO_COMMON_Q_MSIX 0x1a
#define DV_VIRTIO_COMMON_Q_ENABLE 0x1c
#define DV_VIRTIO_COMMON_Q_NOFF 0x1e
#define DV_VIRTIO_COMMON_Q_DESC 0x20
#define DV_VIRTIO_COMMON_Q_AVAIL 0x28
#define DV_VIRTIO_COMMON_Q_USED 0x30

/* Descriptor flags. */
#define DV_VIRTQ_DESC_F_NEXT 1
#define DV_VIRTQ_DESC_F_WRITE 2
/* Avail ring flag: the driver wants no interrupts. */
#define DV_VIRTQ_AVAIL_F_NO_INTERRUPT 1

/* The most descriptors a queue here has (the spec allows 32768). */
#define DV_VIRTQ_MAX_SIZE 1024

/* Errors (negative returns). */
#define DV_VIRTIO_ENODEV (-1)    /* no such function or structure */
#define DV_VIRTIO_EFEATURES (-2) /* the device refused FEATURES_OK */
#define DV_VIRTIO_EQUEUE (-3)    /* no such queue, or a bad size */
#define DV_VIRTIO_ENOMEM (-4)    /* dv_alloc ran out */
#define DV_VIRTIO_EFULL (-5)     /* not enough free descriptors */
#define DV_VIRTIO_ETIMEDOUT (-6) /* nothing used before the deadline */
#define DV_VIRTIO_ERESET (-7)    /* the device set NEEDS_RESET */

/* A split queue's descriptor. */
struct dv_virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

/* One buffer of a chain: guest-physical address (= virtual, identity map). */
struct dv_virtq_buf {
	uint64_t addr;
	uint32_t len;
	int device_writes; /* 1: the device writes it (VIRTQ_DESC_F_WRITE) */
};

/* A device, once dv_virtio_open found its structures. */
struct dv_virtio {
	uint16_t bdf;
	volatile uint8_t *common;
	volatile uint8_t *isr;
	volatile uint8_t *device; /* device-specific configuration (NULL: none) */
	uint32_t device_length;
	volatile uint8_t *notify;
	uint32_t notify_multiplier;
	uint32_t notify_length;
	uint16_t num_queues;
	uint8_t msix_capability; /* 0: none */
	uint16_t msix_vectors;   /* the MSI-X table's size */
	volatile uint8_t *msix_table;
	uint64_t device_features;
	uint64_t features; /* negotiated */
};

/* A split queue. The rings stay in place across resets of the device. */
struct dv_virtq {
	struct dv_virtio *dev;
	uint16_t index;
	uint16_t size;
	volatile struct dv_virtq_desc *desc;
	volatile uint16_t *avail; /* flags, idx, ring[size], used_event */
	volatile uint8_t *used;   /* flags, idx, ring[size] of {u32 id, u32 len} */
	volatile uint16_t *notify_address;
	uint16_t free_head;
	uint16_t num_free;
	uint16_t avail_idx;
	uint16_t last_used;
	void *memory; /* the rings, allocated once */
	uint16_t capacity;
};

/*
 * Finds the first function with vendor 0x1af4 and `pci_device` on bus 0 in a
 * slot after the one of `after` (a bdf found before; -1: from slot 0); returns
 * its bdf, or -1.
 */
int dv_virtio_find(uint16_t pci_device, int after);

/*
 * Reads `bdf`'s capabilities and points `v` at the common, notify, ISR and
 * device structures in its BARs (which must be 64-bit or 32-bit memory BARs
 * below 4 GiB, with the structure inside the BAR). Turns on memory decoding
 * and bus mastering. Returns 0 or DV_VIRTIO_ENODEV.
 */
int dv_virtio_open(struct dv_virtio *v, uint16_t bdf);

/* The device status register; NEEDS_RESET shows here. */
uint8_t dv_virtio_status(struct dv_virtio *v);
/* Writes the status register. */
void dv_virtio_set_status(struct dv_virtio *v, uint8_t status);
/* Resets the device: status 0, then waits until it reads 0. */
void dv_virtio_reset(struct dv_virtio *v);

/*
 * Reset, ACKNOWLEDGE, DRIVER, features (`wanted` & offered | VERSION_1),
 * FEATURES_OK, and reads FEATURES_OK back. Returns 0, DV_VIRTIO_EFEATURES
 * (status then has FAILED) or DV_VIRTIO_ENODEV (VERSION_1 not offered).
 */
int dv_virtio_init(struct dv_virtio *v, uint64_t wanted);

/*
 * Sets up queue `index` with `size` descriptors (0: the device's maximum),
 * rings zeroed, no MSI-X vector, and enables it. Returns 0, DV_VIRTIO_EQUEUE
 * or DV_VIRTIO_ENOMEM. A size that is not a power of two is written as asked
 * (the device must refuse it), so tests can use it.
 */
int dv_virtq_setup(struct dv_virtio *v, struct dv_virtq *q, uint16_t index, uint16_t size);

/*
 * Optional interrupts: turns MSI-X on (function unmasked), points table entry
 * `entry` at this CPU's local APIC with `cpu_vector` (fixed, edge), unmasks it,
 * assigns it to the queue and asks for interrupts in the avail ring. Returns
 * the vector the device read back: `entry`, or DV_VIRTIO_NO_VECTOR when it
 * refused it (an entry past the table), or DV_VIRTIO_ENODEV without MSI-X.
 * The program counts the interrupts with dv_irq_init()'s dv_irq_counts.
 */
int dv_virtq_use_msix(struct dv_virtq *q, uint16_t entry, uint8_t cpu_vector);

/* Sets DRIVER_OK; returns the status read back. */
uint8_t dv_virtio_driver_ok(struct dv_virtio *v);

/*
 * Puts `n` buffers as one chain in the descriptor table and its head in the
 * avail ring (no kick). Returns the head, or DV_VIRTIO_EFULL.
 */
int dv_virtq_add(struct dv_virtq *q, const struct dv_virtq_buf *bufs, unsigned n);

/* Publishes an already written chain's head in the avail ring (no kick). */
void dv_virtq_publish(struct dv_virtq *q, uint16_t head);

/* Notifies the device of new buffers in the queue. */
void dv_virtq_kick(struct dv_virtq *q);

/*
 * The next used element: returns its head and stores the length the device
 * wrote in `*len`; the chain's descriptors are free again. -1 when there is
 * none yet, DV_VIRTIO_EQUEUE when the device returned a head past the queue.
 */
int dv_virtq_used(struct dv_virtq *q, uint32_t *len);

/*
 * Polls dv_virtq_used until an element arrives (or a bad one: DV_VIRTIO_EQUEUE),
 * the device sets NEEDS_RESET
 * (DV_VIRTIO_ERESET) or `timeout_ns` passes (DV_VIRTIO_ETIMEDOUT).
 */
int dv_virtq_wait(struct dv_virtq *q, uint32_t *len, uint64_t timeout_ns);

/* Waits until the status has one of `bits` or `timeout_ns` passes; returns the status. */
uint8_t dv_virtio_wait_status(struct dv_virtio *v, uint8_t bits, uint64_t timeout_ns);

/* Device-specific configuration accessors (bounded by its length: 0 past the end). */
uint32_t dv_virtio_config32(struct dv_virtio *v, uint32_t offset);
uint64_t dv_virtio_config64(struct dv_virtio *v, uint32_t offset);

#endif /* DV_VIRTIO_H */
