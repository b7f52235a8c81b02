/*
 * pci_scan.c: scans PCI bus 0 through configuration mechanism #1 for
 * tests/guest_virtio_test.ts and REPORTs, as one JSON object, every function's
 * IDs, class, BARs (sized with the all-ones protocol and restored), capability
 * list and MSI-X table size; then what bad accesses read back: functions that
 * do not exist, the enable bit clear, and writes to read-only registers.
 */
#include "dv_guest.h"
#include "dv_pci.h"

static char out[32768];
static size_t len;
#define PUT(...) \
	(len += dv_format(out + (len < sizeof out ? len : sizeof out), \
			  len < sizeof out ? sizeof out - len : 0, __VA_ARGS__))

static void put_caps(uint16_t bdf)
{
	PUT("\"caps\":[");
	uint8_t at = 0;
	for (int n = 0; n < DV_PCI_MAX_CAPS && (at = dv_pci_next_capability(bdf, at)) != 0; n++) {
		uint8_t id = dv_pci_read8(bdf, at);
		PUT("%s{\"at\":%u,\"id\":%u", n ? "," : "", at, id);
		if (id == DV_PCI_CAP_MSIX) {
			uint16_t control = dv_pci_read16(bdf, at + 2);
			uint32_t table = dv_pci_read32(bdf, at + 4);
			uint32_t pba = dv_pci_read32(bdf, at + 8);
			PUT(",\"tableSize\":%u,\"enabled\":%u,\"tableBar\":%u,\"tableOffset\":%u,"
			    "\"pbaBar\":%u,\"pbaOffset\":%u",
			    (control & 0x7ff) + 1, control >> 15, table & 7, table & ~7u, pba & 7,
			    pba & ~7u);
		} else if (id == DV_PCI_CAP_VENDOR) {
			uint8_t type = dv_pci_read8(bdf, at + 3);
			PUT(",\"length\":%u,\"cfgType\":%u,\"bar\":%u,\"offset\":%u,\"size\":%u",
			    dv_pci_read8(bdf, at + 2), type, dv_pci_read8(bdf, at + 4),
			    dv_pci_read32(bdf, at + 8), dv_pci_read32(bdf, at + 12));
			if (type == 2)
				PUT(",\"multiplier\":%u", dv_pci_read32(bdf, at + 16));
		}
		PUT("}");
	}
	PUT("]");
}

static void put_function(const struct dv_pci_function *f)
{
	PUT("{\"address\":\"%02x:%02x.%x\",\"vendor\":%u,\"device\":%u,\"class\":%u,"
	    "\"revision\":%u,\"headerType\":%u,\"command\":%u,\"bars\":[",
	    f->bdf >> 8, (f->bdf >> 3) & 31, f->bdf & 7, f->vendor, f->device, f->class_code,
	    f->revision, f->header_type, dv_pci_read16(f->bdf, DV_PCI_COMMAND));
	int first = 1;
	for (int i = 0; i < 6; i++) {
		const struct dv_pci_bar *b = &f->bars[i];
		if (b->size == 0)
			continue;
		PUT("%s{\"index\":%d,\"type\":\"%s\",\"size\":%llu,\"address\":%llu,\"raw\":%u}",
		    first ? "" : ",", i, b->is_io ? "io" : b->is_64 ? "mem64" : "mem32",
		    (unsigned long long)b->size, (unsigned long long)b->address, b->raw);
		first = 0;
	}
	PUT("],");
	put_caps(f->bdf);
	PUT("}");
}

static inline void outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint32_t inl(uint16_t port)
{
	uint32_t v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/* Writes `value` to `reg` of `bdf` (`size` bytes) and reads the dword back, then restores it. */
static uint32_t write_back(uint16_t bdf, uint8_t reg, int size, uint32_t value)
{
	uint32_t before = dv_pci_read32(bdf, reg);
	if (size == 1)
		dv_pci_write8(bdf, reg, (uint8_t)value);
	else if (size == 2)
		dv_pci_write16(bdf, reg, (uint16_t)value);
	else
		dv_pci_write32(bdf, reg, value);
	uint32_t after = dv_pci_read32(bdf, reg & 0xfc);
	dv_pci_write32(bdf, reg & 0xfc, before);
	return after;
}

int main(uint64_t arg)
{
	(void)arg;
	static struct dv_pci_function functions[32];
	int n = dv_pci_scan(functions, 32);
	PUT("{\"functions\":[");
	for (int i = 0; i < n && i < 32; i++) {
		if (i)
			PUT(",");
		put_function(&functions[i]);
	}
	/* Nothing answers where no function is: all-ones. */
	outl(DV_PCI_CONFIG_ADDRESS, (uint32_t)DV_PCI_BDF(0, 1, 0) << 8); /* enable bit clear */
	uint32_t disabled = inl(DV_PCI_CONFIG_DATA);
	PUT("],\"absent\":{\"slot31\":%u,\"function1\":%u,\"bus1\":%u,\"disabled\":%u}",
	    dv_pci_read32(DV_PCI_BDF(0, 31, 0), 0), dv_pci_read32(DV_PCI_BDF(0, 1, 1), 0),
	    dv_pci_read32(DV_PCI_BDF(1, 1, 0), 0), disabled);
	/* Read-only registers of the first device after the host bridge keep their values. */
	uint16_t bdf = DV_PCI_BDF(0, 1, 0);
	uint8_t msix = dv_pci_find_capability(bdf, DV_PCI_CAP_MSIX, 0);
	PUT(",\"readOnly\":{\"ids\":[%u,%u],\"class\":[%u,%u],\"header\":[%u,%u],"
	    "\"capPointer\":[%u,%u],\"msixControl\":[%u,%u],\"msixTable\":[%u,%u]}}",
	    dv_pci_read32(bdf, 0x00), write_back(bdf, 0x00, 4, 0x12345678),
	    dv_pci_read32(bdf, 0x08), write_back(bdf, 0x08, 4, 0xffffffff),
	    dv_pci_read32(bdf, 0x0c), write_back(bdf, 0x0e, 1, 0x7f),
	    dv_pci_read32(bdf, 0x34), write_back(bdf, 0x34, 1, 0x80),
	    /* The table size (bits 0-10) is read-only; enable and mask stay clear here. */
	    dv_pci_read32(bdf, msix), write_back(bdf, msix + 2, 2, 0x3000 | 0x7ff),
	    dv_pci_read32(bdf, msix + 4), write_back(bdf, msix + 4, 4, 0x5a5a5a5a));
	dv_report(out, len);
	return len < sizeof out ? 0 : 1;
}
