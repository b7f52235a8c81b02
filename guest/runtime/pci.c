/*
 * pci.c: PCI configuration mechanism #1, a bus-0 scan, BAR sizing and
 * capability walks for runtime guests (see dv_pci.h). Runs at CPL3: IOPL = 3
 * lets user mode use the ports.
 */
#include "dv_pci.h"

static inline void outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outw(uint16_t port, uint16_t v)
{
	__asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint32_t inl(uint16_t port)
{
	uint32_t v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline uint16_t inw(uint16_t port)
{
	uint16_t v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/* Selects the dword holding `reg`: enable bit, bus, device, function, register. */
static void select(uint16_t bdf, uint8_t reg)
{
	outl(DV_PCI_CONFIG_ADDRESS, 0x80000000u | (uint32_t)bdf << 8 | (reg & 0xfc));
}

uint32_t dv_pci_read32(uint16_t bdf, uint8_t reg)
{
	select(bdf, reg);
	return inl(DV_PCI_CONFIG_DATA);
}

uint16_t dv_pci_read16(uint16_t bdf, uint8_t reg)
{
	select(bdf, reg);
	return inw(DV_PCI_CONFIG_DATA + (reg & 2));
}

uint8_t dv_pci_read8(uint16_t bdf, uint8_t reg)
{
	select(bdf, reg);
	return inb(DV_PCI_CONFIG_DATA + (reg & 3));
}

void dv_pci_write32(uint16_t bdf, uint8_t reg, uint32_t value)
{
	select(bdf, reg);
	outl(DV_PCI_CONFIG_DATA, value);
}

void dv_pci_write16(uint16_t bdf, uint8_t reg, uint16_t value)
{
	select(bdf, reg);
	outw(DV_PCI_CONFIG_DATA + (reg & 2), value);
}

void dv_pci_write8(uint16_t bdf, uint8_t reg, uint8_t value)
{
	select(bdf, reg);
	outb(DV_PCI_CONFIG_DATA + (reg & 3), value);
}

int dv_pci_probe(uint16_t bdf, struct dv_pci_function *f)
{
	uint32_t id = dv_pci_read32(bdf, DV_PCI_VENDOR);
	if ((id & 0xffff) == 0xffff)
		return -1;
	uint32_t rev_class = dv_pci_read32(bdf, DV_PCI_REVISION);
	*f = (struct dv_pci_function){
		.bdf = bdf,
		.vendor = (uint16_t)id,
		.device = (uint16_t)(id >> 16),
		.revision = (uint8_t)rev_class,
		.class_code = rev_class >> 8,
		.header_type = dv_pci_read8(bdf, DV_PCI_HEADER_TYPE),
	};
	/* Bridges (type 1) have two BARs, type-0 endpoints six. */
	int bars = (f->header_type & 0x7f) == 0 ? 6 : (f->header_type & 0x7f) == 1 ? 2 : 0;
	/* Decoding off while a BAR holds all-ones, so it never claims that range. */
	uint16_t command = dv_pci_read16(bdf, DV_PCI_COMMAND);
	dv_pci_write16(bdf, DV_PCI_COMMAND,
		       command & ~(DV_PCI_COMMAND_IO | DV_PCI_COMMAND_MEMORY));
	for (int i = 0; i < bars; i++) {
		uint8_t reg = DV_PCI_BAR0 + 4 * i;
		struct dv_pci_bar *b = &f->bars[i];
		uint32_t low = dv_pci_read32(bdf, reg);
		b->raw = low;
		dv_pci_write32(bdf, reg, 0xffffffffu);
		uint32_t mask_low = dv_pci_read32(bdf, reg);
		dv_pci_write32(bdf, reg, low);
		if (low & 1) {
			b->is_io = 1;
			b->address = low & ~3u;
			uint32_t mask = mask_low & ~3u & 0xffff;
			b->size = mask ? (~mask & 0xffff) + 1 : 0;
			continue;
		}
		uint64_t mask = mask_low & ~0xfu;
		b->address = low & ~0xfu;
		if ((low & 6) == 4 && i + 1 < bars) {
			b->is_64 = 1;
			uint32_t high = dv_pci_read32(bdf, reg + 4);
			dv_pci_write32(bdf, reg + 4, 0xffffffffu);
			mask |= (uint64_t)dv_pci_read32(bdf, reg + 4) << 32;
			dv_pci_write32(bdf, reg + 4, high);
			b->address |= (uint64_t)high << 32;
			i++; /* the upper half is not a BAR of its own */
		} else {
			mask |= 0xffffffff00000000ull;
		}
		b->size = mask_low & ~0xfu ? ~mask + 1 : 0;
	}
	dv_pci_write16(bdf, DV_PCI_COMMAND, command);
	return 0;
}

int dv_pci_scan(struct dv_pci_function *out, int max)
{
	int found = 0;
	for (int dev = 0; dev < 32; dev++) {
		for (int fn = 0; fn < 8; fn++) {
			struct dv_pci_function f;
			if (dv_pci_probe(DV_PCI_BDF(0, dev, fn), &f) != 0) {
				if (fn == 0)
					break;
				continue;
			}
			if (found < max)
				out[found] = f;
			found++;
			if (fn == 0 && !(f.header_type & 0x80))
				break; /* not multi-function */
		}
	}
	return found;
}

uint8_t dv_pci_next_capability(uint16_t bdf, uint8_t at)
{
	if (at == 0) {
		if (!(dv_pci_read16(bdf, DV_PCI_STATUS) & DV_PCI_STATUS_CAPABILITIES))
			return 0;
		at = dv_pci_read8(bdf, DV_PCI_CAPABILITIES);
	} else {
		at = dv_pci_read8(bdf, at + 1);
	}
	at &= 0xfc;
	return at >= 0x40 ? at : 0;
}

uint8_t dv_pci_find_capability(uint16_t bdf, uint8_t id, uint8_t after)
{
	uint8_t at = dv_pci_next_capability(bdf, 0);
	int skipping = after != 0;
	for (int n = 0; at != 0 && n < DV_PCI_MAX_CAPS; n++) {
		if (!skipping && dv_pci_read8(bdf, at) == id)
			return at;
		if (at == after)
			skipping = 0;
		at = dv_pci_next_capability(bdf, at);
	}
	return 0;
}
