/*
 * dv_pci.h: PCI for runtime guests (guest only): configuration mechanism #1
 * (ports 0xCF8/0xCFC), a scan of bus 0, BAR sizing and the capability list.
 *
 * A function is named by its bus/device/function number, `bdf` =
 * bus << 8 | device << 3 | function, as Linux spells it. Every access is a port
 * I/O pair from user mode (IOPL = 3): two VM exits, one for the address and one
 * for the data. BARs are reached through the VMM's identity map of the first
 * 4 GiB, which covers the PCI MMIO window (0xd0000000..0xfec00000).
 */
#ifndef DV_PCI_H
#define DV_PCI_H

#include <stdint.h>

#define DV_PCI_CONFIG_ADDRESS 0xcf8
#define DV_PCI_CONFIG_DATA 0xcfc

#define DV_PCI_BDF(bus, dev, fn) ((uint16_t)((bus) << 8 | (dev) << 3 | (fn)))

/* Registers of a type-0 header. */
#define DV_PCI_VENDOR 0x00
#define DV_PCI_DEVICE 0x02
#define DV_PCI_COMMAND 0x04
#define DV_PCI_STATUS 0x06
#define DV_PCI_REVISION 0x08 /* revision, then the 24-bit class code */
#define DV_PCI_HEADER_TYPE 0x0e
#define DV_PCI_BAR0 0x10
#define DV_PCI_CAPABILITIES 0x34
#define DV_PCI_COMMAND_IO (1u << 0)
#define DV_PCI_COMMAND_MEMORY (1u << 1)
#define DV_PCI_COMMAND_MASTER (1u << 2)
#define DV_PCI_STATUS_CAPABILITIES (1u << 4)

/* Capability IDs. */
#define DV_PCI_CAP_MSIX 0x11
#define DV_PCI_CAP_VENDOR 0x09

/* The most capabilities a walk follows: a list that loops ends here. */
#define DV_PCI_MAX_CAPS 48

uint32_t dv_pci_read32(uint16_t bdf, uint8_t reg);
uint16_t dv_pci_read16(uint16_t bdf, uint8_t reg);
uint8_t dv_pci_read8(uint16_t bdf, uint8_t reg);
void dv_pci_write32(uint16_t bdf, uint8_t reg, uint32_t value);
void dv_pci_write16(uint16_t bdf, uint8_t reg, uint16_t value);
void dv_pci_write8(uint16_t bdf, uint8_t reg, uint8_t value);

/* A BAR, as sized by dv_pci_probe. */
struct dv_pci_bar {
	uint64_t address; /* what the BAR holds (type bits cleared) */
	uint64_t size;    /* from the sizing protocol; 0: no BAR here */
	uint32_t raw;     /* the register's value before sizing */
	uint8_t is_io;
	uint8_t is_64; /* a 64-bit memory BAR: it takes this slot and the next */
};

/* A function found on the bus. */
struct dv_pci_function {
	uint16_t bdf;
	uint16_t vendor;
	uint16_t device;
	uint8_t revision;
	uint8_t header_type;
	uint32_t class_code; /* class << 16 | subclass << 8 | programming interface */
	struct dv_pci_bar bars[6];
};

/*
 * Scans bus 0 (every device, and functions 1-7 of multi-function devices) and
 * fills up to `max` functions; returns how many exist. Each function's BARs are
 * sized (dv_pci_probe).
 */
int dv_pci_scan(struct dv_pci_function *out, int max);

/*
 * Reads `bdf`'s identity and sizes its BARs: memory and I/O decoding off,
 * all-ones written to each BAR (both halves of a 64-bit one), the size mask
 * read back, the old value and the command register restored. Returns 0, or
 * -1 when no function answers (the vendor ID reads all-ones).
 */
int dv_pci_probe(uint16_t bdf, struct dv_pci_function *f);

/*
 * The offset of the first capability with `id` after the one at `after` (0:
 * from the start of the list), or 0 when there is none. Follows at most
 * DV_PCI_MAX_CAPS entries and only offsets in 0x40..0xfc.
 */
uint8_t dv_pci_find_capability(uint16_t bdf, uint8_t id, uint8_t after);

/* The next capability's offset after the one at `at` (0: the first), or 0. */
uint8_t dv_pci_next_capability(uint16_t bdf, uint8_t at);

#endif /* DV_PCI_H */
