/*
 * The boot-protocol conformance report: everything the 64-bit entry received,
 * printed on COM1 (port 0x3f8) in `key=value` lines, then a debug-exit.
 *
 * It follows the zero page's pointers the way a kernel does (the command line
 * through cmd_line_ptr | ext_cmd_line_ptr << 32, the initrd through
 * ramdisk_image/size and their ext_ halves, the e820 table by e820_entries), so
 * the report proves the pointers are usable, not just set. This code runs at
 * CPL0, which a software KVM backend emulates instruction by instruction, so it
 * stays small: hex output, one FNV-1a pass over the initrd.
 *
 * Lines (hex is lowercase, fixed width):
 *   protocol=<version of the header at 0x206>
 *   entry rsi=<16> load=<16> rsp=<16> rflags=<16> cr0=<16> cr3=<16> cr4=<16>
 *         efer=<16> cs=<4> ds=<4> es=<4> ss=<4> fs=<4> gs=<4>   (one line)
 *   hdr=<bytes 0x1f1..0x26c of the zero page, two hex digits each>
 *   ext ramdisk_image=<8> ramdisk_size=<8> cmd_line_ptr=<8> acpi_rsdp_addr=<16>
 *   e820_entries=<2>
 *   e820 addr=<16> size=<16> type=<8>                        (one per entry)
 *   cmdline=<the bytes up to the NUL>
 *   initrd addr=<16> size=<16> fnv=<16>
 *   other_nonzero=<8>   (nonzero bytes outside every field above)
 *   end
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

struct entry_state {
	u64 rsi, load, rsp, rflags, cr0, cr3, cr4, efer;
	u16 cs, ds, es, ss, fs, gs;
};

#define COM1 0x3f8
#define DEBUG_EXIT 0xf4
#define CONFORMANCE_DONE 0x2a

#define HDR_START 0x1f1
#define HDR_END 0x26c
#define E820_TABLE 0x2d0
#define E820_ENTRY 20
#define E820_MAX 128

static inline void outb(u16 port, u8 value)
{
	__asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static void put(char c)
{
	outb(COM1, (u8)c);
}

static void puts_(const char *s)
{
	while (*s)
		put(*s++);
}

static void hex(u64 v, int digits)
{
	for (int i = digits - 1; i >= 0; i--)
		put("0123456789abcdef"[(v >> (i * 4)) & 0xf]);
}

static void field(const char *name, u64 v, int digits)
{
	put(' ');
	puts_(name);
	put('=');
	hex(v, digits);
}

static u64 rd(const u8 *p, int bytes)
{
	u64 v = 0;
	for (int i = bytes - 1; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

/* Whether zero page byte `at` belongs to a field the report prints. */
static int reported(u32 at, u32 e820_entries)
{
	if (at >= 0x0c0 && at < 0x0cc)	/* ext_ramdisk_image/size, ext_cmd_line_ptr */
		return 1;
	if (at >= 0x070 && at < 0x078)	/* acpi_rsdp_addr */
		return 1;
	if (at == 0x1e8)		/* e820_entries */
		return 1;
	if (at >= HDR_START && at < HDR_END)
		return 1;
	return at >= E820_TABLE && at < E820_TABLE + e820_entries * E820_ENTRY;
}

void report(const struct entry_state *s)
{
	const u8 *bp = (const u8 *)s->rsi;

	puts_("protocol=");
	hex(rd(bp + 0x206, 2), 4);
	puts_("\nentry");
	field("rsi", s->rsi, 16);
	field("load", s->load, 16);
	field("rsp", s->rsp, 16);
	field("rflags", s->rflags, 16);
	field("cr0", s->cr0, 16);
	field("cr3", s->cr3, 16);
	field("cr4", s->cr4, 16);
	field("efer", s->efer, 16);
	field("cs", s->cs, 4);
	field("ds", s->ds, 4);
	field("es", s->es, 4);
	field("ss", s->ss, 4);
	field("fs", s->fs, 4);
	field("gs", s->gs, 4);

	puts_("\nhdr=");
	for (u32 at = HDR_START; at < HDR_END; at++)
		hex(bp[at], 2);

	puts_("\next");
	field("ramdisk_image", rd(bp + 0x0c0, 4), 8);
	field("ramdisk_size", rd(bp + 0x0c4, 4), 8);
	field("cmd_line_ptr", rd(bp + 0x0c8, 4), 8);
	field("acpi_rsdp_addr", rd(bp + 0x070, 8), 16);

	u32 entries = bp[0x1e8];
	puts_("\ne820_entries=");
	hex(entries, 2);
	if (entries > E820_MAX)
		entries = E820_MAX;
	for (u32 i = 0; i < entries; i++) {
		const u8 *e = bp + E820_TABLE + i * E820_ENTRY;
		puts_("\ne820");
		field("addr", rd(e, 8), 16);
		field("size", rd(e + 8, 8), 16);
		field("type", rd(e + 16, 4), 8);
	}

	u64 cmdline = rd(bp + 0x228, 4) | rd(bp + 0x0c8, 4) << 32;
	puts_("\ncmdline=");
	if (cmdline)
		puts_((const char *)cmdline);

	u64 image = rd(bp + 0x218, 4) | rd(bp + 0x0c0, 4) << 32;
	u64 size = rd(bp + 0x21c, 4) | rd(bp + 0x0c4, 4) << 32;
	u64 fnv = 0xcbf29ce484222325ull;
	for (u64 i = 0; i < size; i++) {
		fnv ^= ((const u8 *)image)[i];
		fnv *= 0x100000001b3ull;
	}
	puts_("\ninitrd");
	field("addr", image, 16);
	field("size", size, 16);
	field("fnv", fnv, 16);

	u32 other = 0;
	for (u32 at = 0; at < 4096; at++)
		if (bp[at] && !reported(at, entries))
			other++;
	puts_("\nother_nonzero=");
	hex(other, 8);
	puts_("\nend\n");
	outb(DEBUG_EXIT, CONFORMANCE_DONE);
}
