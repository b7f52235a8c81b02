/*
 * virtio.c: the modern virtio-pci init sequence and split virtqueues for
 * runtime guests (see dv_virtio.h). Queues are polled; MSI-X interrupts are
 * optional (dv_virtq_use_msix).
 *
 * x86 keeps stores in order and loads in order, so the ring protocol needs only
 * compiler barriers between writing a descriptor and publishing it; the kick is
 * preceded by a full fence so the avail index is visible before the device
 * looks (the notify write itself traps to KVM).
 */
#include "dv_guest.h"
#include "dv_virtio.h"

#define barrier() __asm__ volatile("" : : : "memory")

void *memset(void *dst, int c, size_t n); /* guest_rt.c */

/* The smallest access width each structure allows is what we use. */
static inline uint8_t r8(volatile uint8_t *base, uint32_t off)
{
	return *(volatile uint8_t *)(base + off);
}
static inline uint16_t r16(volatile uint8_t *base, uint32_t off)
{
	return *(volatile uint16_t *)(base + off);
}
static inline uint32_t r32(volatile uint8_t *base, uint32_t off)
{
	return *(volatile uint32_t *)(base + off);
}
static inline void w8(volatile uint8_t *base, uint32_t off, uint8_t v)
{
	*(volatile uint8_t *)(base + off) = v;
}
static inline void w16(volatile uint8_t *base, uint32_t off, uint16_t v)
{
	*(volatile uint16_t *)(base + off) = v;
}
static inline void w32(volatile uint8_t *base, uint32_t off, uint32_t v)
{
	*(volatile uint32_t *)(base + off) = v;
}
/* 64-bit fields of the common configuration, as two 32-bit writes (spec 4.1.3.1). */
static inline void w64(volatile uint8_t *base, uint32_t off, uint64_t v)
{
	w32(base, off, (uint32_t)v);
	w32(base, off + 4, (uint32_t)(v >> 32));
}

int dv_virtio_find(uint16_t pci_device, int after)
{
	for (int dev = after >= 0 ? ((after >> 3) & 31) + 1 : 0; dev < 32; dev++) {
		uint16_t bdf = DV_PCI_BDF(0, dev, 0);
		uint32_t id = dv_pci_read32(bdf, DV_PCI_VENDOR);
		if ((id & 0xffff) == DV_VIRTIO_VENDOR && (id >> 16) == pci_device)
			return bdf;
	}
	return -1;
}

/* The address of BAR `bar` of `bdf` (memory BARs only), 0 when unusable. */
static uint64_t bar_address(uint16_t bdf, uint8_t bar)
{
	if (bar > 5)
		return 0;
	uint32_t low = dv_pci_read32(bdf, DV_PCI_BAR0 + 4 * bar);
	if (low & 1)
		return 0; /* I/O BARs are not used here */
	uint64_t address = low & ~0xfu;
	if ((low & 6) == 4 && bar < 5)
		address |= (uint64_t)dv_pci_read32(bdf, DV_PCI_BAR0 + 4 * bar + 4) << 32;
	return address;
}

int dv_virtio_open(struct dv_virtio *v, uint16_t bdf)
{
	*v = (struct dv_virtio){ .bdf = bdf };
	if (dv_pci_read16(bdf, DV_PCI_VENDOR) != DV_VIRTIO_VENDOR)
		return DV_VIRTIO_ENODEV;
	struct dv_pci_function f;
	if (dv_pci_probe(bdf, &f) != 0)
		return DV_VIRTIO_ENODEV;
	uint8_t at = 0;
	for (int n = 0; n < DV_PCI_MAX_CAPS && (at = dv_pci_next_capability(bdf, at)) != 0; n++) {
		uint8_t id = dv_pci_read8(bdf, at);
		if (id == DV_PCI_CAP_MSIX) {
			v->msix_capability = at;
			v->msix_vectors = (dv_pci_read16(bdf, at + 2) & 0x7ff) + 1;
			uint32_t table = dv_pci_read32(bdf, at + 4);
			uint64_t base = bar_address(bdf, table & 7);
			uint64_t end = (uint64_t)(table & ~7u) + 16u * v->msix_vectors;
			if (base != 0 && end <= f.bars[table & 7].size && base + end <= (1ull << 32))
				v->msix_table = (volatile uint8_t *)(uintptr_t)(base + (table & ~7u));
			continue;
		}
		if (id != DV_PCI_CAP_VENDOR)
			continue;
		uint8_t type = dv_pci_read8(bdf, at + 3);
		uint8_t bar = dv_pci_read8(bdf, at + 4);
		uint32_t offset = dv_pci_read32(bdf, at + 8);
		uint32_t length = dv_pci_read32(bdf, at + 12);
		uint64_t base = bar_address(bdf, bar);
		/* The structure must lie inside the BAR, and the BAR below 4 GiB. */
		if (base == 0 || bar > 5 || (uint64_t)offset + length > f.bars[bar].size ||
		    base + f.bars[bar].size > (1ull << 32))
			continue;
		volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)(base + offset);
		switch (type) {
		case DV_VIRTIO_CAP_COMMON:
			if (!v->common && length >= 0x38)
				v->common = p;
			break;
		case DV_VIRTIO_CAP_NOTIFY:
			if (!v->notify) {
				v->notify = p;
				v->notify_length = length;
				v->notify_multiplier = dv_pci_read32(bdf, at + 16);
			}
			break;
		case DV_VIRTIO_CAP_ISR:
			if (!v->isr)
				v->isr = p;
			break;
		case DV_VIRTIO_CAP_DEVICE:
			if (!v->device) {
				v->device = p;
				v->device_length = length;
			}
			break;
		}
	}
	if (!v->common || !v->notify || !v->isr)
		return DV_VIRTIO_ENODEV;
	uint16_t command = dv_pci_read16(bdf, DV_PCI_COMMAND);
	dv_pci_write16(bdf, DV_PCI_COMMAND,
		       command | DV_PCI_COMMAND_MEMORY | DV_PCI_COMMAND_MASTER);
	v->num_queues = r16(v->common, DV_VIRTIO_COMMON_NUMQ);
	return 0;
}

uint8_t dv_virtio_status(struct dv_virtio *v)
{
	return r8(v->common, DV_VIRTIO_COMMON_STATUS);
}

void dv_virtio_set_status(struct dv_virtio *v, uint8_t status)
{
	w8(v->common, DV_VIRTIO_COMMON_STATUS, status);
}

void dv_virtio_reset(struct dv_virtio *v)
{
	dv_virtio_set_status(v, 0);
	/* The reset is complete when the status reads 0 (spec 4.1.4.3.2). */
	for (int i = 0; i < 1000000 && dv_virtio_status(v) != 0; i++)
		__asm__ volatile("pause");
}

int dv_virtio_init(struct dv_virtio *v, uint64_t wanted)
{
	dv_virtio_reset(v);
	dv_virtio_set_status(v, DV_VIRTIO_ACKNOWLEDGE);
	dv_virtio_set_status(v, DV_VIRTIO_ACKNOWLEDGE | DV_VIRTIO_DRIVER);
	w32(v->common, DV_VIRTIO_COMMON_DFSELECT, 0);
	uint64_t offered = r32(v->common, DV_VIRTIO_COMMON_DF);
	w32(v->common, DV_VIRTIO_COMMON_DFSELECT, 1);
	offered |= (uint64_t)r32(v->common, DV_VIRTIO_COMMON_DF) << 32;
	v->device_features = offered;
	if (!(offered & DV_VIRTIO_F_VERSION_1)) {
		dv_virtio_set_status(v, DV_VIRTIO_FAILED);
		return DV_VIRTIO_ENODEV; /* a legacy-only device */
	}
	v->features = (wanted & offered) | DV_VIRTIO_F_VERSION_1;
	w32(v->common, DV_VIRTIO_COMMON_GFSELECT, 0);
	w32(v->common, DV_VIRTIO_COMMON_GF, (uint32_t)v->features);
	w32(v->common, DV_VIRTIO_COMMON_GFSELECT, 1);
	w32(v->common, DV_VIRTIO_COMMON_GF, (uint32_t)(v->features >> 32));
	uint8_t s = DV_VIRTIO_ACKNOWLEDGE | DV_VIRTIO_DRIVER | DV_VIRTIO_FEATURES_OK;
	dv_virtio_set_status(v, s);
	if (!(dv_virtio_status(v) & DV_VIRTIO_FEATURES_OK)) {
		dv_virtio_set_status(v, s | DV_VIRTIO_FAILED);
		return DV_VIRTIO_EFEATURES;
	}
	w16(v->common, DV_VIRTIO_COMMON_MSIX, DV_VIRTIO_NO_VECTOR);
	return 0;
}

/* Ring sizes in bytes (spec 2.7): descriptors, avail (with used_event), used (with avail_event). */
static size_t desc_bytes(uint16_t n)
{
	return 16u * n;
}
static size_t avail_bytes(uint16_t n)
{
	return 6u + 2u * n;
}
static size_t used_bytes(uint16_t n)
{
	return 6u + 8u * n;
}

int dv_virtq_setup(struct dv_virtio *v, struct dv_virtq *q, uint16_t index, uint16_t size)
{
	if (index >= v->num_queues)
		return DV_VIRTIO_EQUEUE;
	w16(v->common, DV_VIRTIO_COMMON_Q_SELECT, index);
	uint16_t max = r16(v->common, DV_VIRTIO_COMMON_Q_SIZE);
	if (size == 0)
		size = max;
	if (size == 0 || size > max || size > DV_VIRTQ_MAX_SIZE)
		return DV_VIRTIO_EQUEUE;
	/* The rings of a queue set up before (a reset) are reused. */
	if (q->dev != v || q->index != index || !q->memory || q->capacity < size) {
		/* Descriptors at 0, avail after them, used on the next 4 KiB page. */
		size_t used_at = (desc_bytes(size) + avail_bytes(size) + 4095) & ~(size_t)4095;
		void *memory = dv_alloc(used_at + used_bytes(size));
		if (!memory)
			return DV_VIRTIO_ENOMEM;
		*q = (struct dv_virtq){ .memory = memory, .capacity = size };
	}
	size_t used_at = (desc_bytes(q->capacity) + avail_bytes(q->capacity) + 4095) & ~(size_t)4095;
	uint8_t *m = q->memory;
	memset(m, 0, used_at + used_bytes(q->capacity));
	q->dev = v;
	q->index = index;
	q->size = size;
	q->desc = (volatile struct dv_virtq_desc *)m;
	q->avail = (volatile uint16_t *)(m + desc_bytes(q->capacity));
	q->used = m + used_at;
	q->avail_idx = 0;
	q->last_used = 0;
	q->free_head = 0;
	q->num_free = size;
	for (uint16_t i = 0; i < size; i++)
		q->desc[i].next = (uint16_t)(i + 1);
	q->avail[0] = DV_VIRTQ_AVAIL_F_NO_INTERRUPT;

	w16(v->common, DV_VIRTIO_COMMON_Q_SIZE, size);
	w16(v->common, DV_VIRTIO_COMMON_Q_MSIX, DV_VIRTIO_NO_VECTOR);
	w64(v->common, DV_VIRTIO_COMMON_Q_DESC, (uintptr_t)q->desc);
	w64(v->common, DV_VIRTIO_COMMON_Q_AVAIL, (uintptr_t)q->avail);
	w64(v->common, DV_VIRTIO_COMMON_Q_USED, (uintptr_t)q->used);
	uint32_t notify_at = (uint32_t)r16(v->common, DV_VIRTIO_COMMON_Q_NOFF) * v->notify_multiplier;
	if (notify_at + 2 > v->notify_length)
		return DV_VIRTIO_EQUEUE;
	q->notify_address = (volatile uint16_t *)(v->notify + notify_at);
	w16(v->common, DV_VIRTIO_COMMON_Q_ENABLE, 1);
	return 0;
}

int dv_virtq_use_msix(struct dv_virtq *q, uint16_t entry, uint8_t cpu_vector)
{
	struct dv_virtio *v = q->dev;
	if (!v->msix_capability || !v->msix_table)
		return DV_VIRTIO_ENODEV;
	uint8_t control = (uint8_t)(v->msix_capability + 2);
	/* Enable on, function mask off (bits 15 and 14 of message control). */
	dv_pci_write16(v->bdf, control, (dv_pci_read16(v->bdf, control) | 0x8000) & ~0x4000);
	if (entry < v->msix_vectors) {
		volatile uint8_t *e = v->msix_table + 16u * entry;
		uint32_t apic_id;
		__asm__ volatile("cpuid" : "=b"(apic_id) : "a"(1), "c"(0) : "edx");
		w32(e, 0, 0xfee00000u | (apic_id >> 24) << 12); /* physical destination */
		w32(e, 4, 0);
		w32(e, 8, cpu_vector); /* fixed delivery, edge */
		w32(e, 12, 0);         /* unmasked */
	}
	w16(v->common, DV_VIRTIO_COMMON_Q_SELECT, q->index);
	w16(v->common, DV_VIRTIO_COMMON_Q_MSIX, entry);
	q->avail[0] = 0; /* interrupts wanted */
	return r16(v->common, DV_VIRTIO_COMMON_Q_MSIX);
}

uint8_t dv_virtio_driver_ok(struct dv_virtio *v)
{
	dv_virtio_set_status(v, DV_VIRTIO_ACKNOWLEDGE | DV_VIRTIO_DRIVER | DV_VIRTIO_FEATURES_OK |
					DV_VIRTIO_DRIVER_OK);
	return dv_virtio_status(v);
}

int dv_virtq_add(struct dv_virtq *q, const struct dv_virtq_buf *bufs, unsigned n)
{
	if (n == 0 || n > q->num_free)
		return DV_VIRTIO_EFULL;
	uint16_t head = q->free_head, i = head, last = head;
	for (unsigned k = 0; k < n; k++) {
		last = i;
		q->desc[i].addr = bufs[k].addr;
		q->desc[i].len = bufs[k].len;
		q->desc[i].flags = (uint16_t)((k + 1 < n ? DV_VIRTQ_DESC_F_NEXT : 0) |
					      (bufs[k].device_writes ? DV_VIRTQ_DESC_F_WRITE : 0));
		i = q->desc[i].next;
	}
	q->free_head = q->desc[last].next;
	q->num_free = (uint16_t)(q->num_free - n);
	dv_virtq_publish(q, head);
	return head;
}

void dv_virtq_publish(struct dv_virtq *q, uint16_t head)
{
	q->avail[2 + q->avail_idx % q->size] = head;
	barrier(); /* the ring entry before the index */
	q->avail_idx++;
	q->avail[1] = q->avail_idx;
}

void dv_virtq_kick(struct dv_virtq *q)
{
	__sync_synchronize();
	*q->notify_address = q->index;
}

int dv_virtq_used(struct dv_virtq *q, uint32_t *len)
{
	volatile uint16_t *used_idx = (volatile uint16_t *)(q->used + 2);
	if (*used_idx == q->last_used)
		return -1;
	barrier(); /* the index before the element */
	volatile uint32_t *elem = (volatile uint32_t *)(q->used + 4 + 8 * (q->last_used % q->size));
	uint32_t id = elem[0];
	if (len)
		*len = elem[1];
	q->last_used++;
	if (id >= q->size)
		return DV_VIRTIO_EQUEUE; /* a device bug: leave the free list alone */
	/* Give the chain back: walk it (at most size links) to its end. */
	uint16_t i = (uint16_t)id, n = 1;
	while ((q->desc[i].flags & DV_VIRTQ_DESC_F_NEXT) && n < q->size) {
		i = q->desc[i].next % q->size;
		n++;
	}
	q->desc[i].next = q->free_head;
	q->free_head = (uint16_t)id;
	q->num_free = (uint16_t)(q->num_free + n > q->size ? q->size : q->num_free + n);
	return (int)id;
}

int dv_virtq_wait(struct dv_virtq *q, uint32_t *len, uint64_t timeout_ns)
{
	uint64_t deadline = dv_clock_ns() + timeout_ns;
	for (;;) {
		/* Poll a while between the clock's and the status's exits. */
		for (int i = 0; i < 20000; i++) {
			int head = dv_virtq_used(q, len);
			if (head != -1)
				return head;
			__asm__ volatile("pause");
		}
		if (dv_virtio_status(q->dev) & DV_VIRTIO_NEEDS_RESET)
			return DV_VIRTIO_ERESET;
		if (dv_clock_ns() > deadline)
			return DV_VIRTIO_ETIMEDOUT;
	}
}

uint8_t dv_virtio_wait_status(struct dv_virtio *v, uint8_t bits, uint64_t timeout_ns)
{
	uint64_t deadline = dv_clock_ns() + timeout_ns;
	for (;;) {
		uint8_t s = dv_virtio_status(v);
		if ((s & bits) || dv_clock_ns() > deadline)
			return s;
		for (int i = 0; i < 1000; i++)
			__asm__ volatile("pause");
	}
}

uint32_t dv_virtio_config32(struct dv_virtio *v, uint32_t offset)
{
	if (!v->device || offset + 4 > v->device_length)
		return 0;
	return r32(v->device, offset);
}

uint64_t dv_virtio_config64(struct dv_virtio *v, uint32_t offset)
{
	/* Read until the generation is stable (spec 4.1.4.3.1). */
	for (int tries = 0; tries < 16; tries++) {
		uint8_t gen = r8(v->common, DV_VIRTIO_COMMON_CFGGENERATION);
		uint64_t value = dv_virtio_config32(v, offset) |
				 (uint64_t)dv_virtio_config32(v, offset + 4) << 32;
		if (r8(v->common, DV_VIRTIO_COMMON_CFGGENERATION) == gen)
			return value;
	}
	return 0;
}
