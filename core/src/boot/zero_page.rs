//! The zero page (`struct boot_params`, Documentation/arch/x86/zero-page.rst): the
//! 4 KiB the loader hands a Linux kernel in RSI. It carries the kernel's own setup
//! header back (with the loader's fields filled in), the command line and initrd
//! locations, and the e820 memory map.
//!
//! Built as plain bytes (unit-tested without KVM); `boot::linux` writes it.

use serde::Serialize;

use super::bzimage::{HEADER_MAGIC, SETUP_HEADER_MAX_END, SETUP_HEADER_OFFSET};
use super::layout::RESERVED_END;
use crate::memory::{MMIO_GAP_END, MMIO_GAP_START};

/// Size of `struct boot_params`.
pub const BOOT_PARAMS_SIZE: usize = 4096;
/// `type_of_loader` for a loader without an assigned id.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// How many e820 entries the zero page holds.
pub const E820_MAX_ENTRIES: usize = 128;
/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;
/// Start of the legacy area every PC keeps reserved: the EBDA (640 KiB minus
/// 1 KiB), VGA memory, option and BIOS ROMs, up to 1 MiB.
pub const EBDA_START: u64 = 0x9_fc00;
/// End of the legacy area.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// Offsets inside `boot_params`.
mod off {
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    pub const EXT_RAMDISK_IMAGE: usize = 0x0c0;
    pub const EXT_RAMDISK_SIZE: usize = 0x0c4;
    pub const EXT_CMD_LINE_PTR: usize = 0x0c8;
    pub const E820_ENTRIES: usize = 0x1e8;
    pub const BOOT_FLAG: usize = 0x1fe;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const CODE32_START: usize = 0x214;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const HEAP_END_PTR: usize = 0x224;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const E820_TABLE: usize = 0x2d0;
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    #[serde(rename = "type")]
    pub kind: u32,
}

/// The e820 map of a guest with `ram_size` bytes of RAM laid out as
/// `memory::ram_ranges` does: the VMM's boot structures and the legacy area
/// below 1 MiB reserved, the MMIO gap below 4 GiB reserved, the rest RAM.
pub fn e820_map(ram_size: u64) -> Vec<E820Entry> {
    let mut map = Vec::new();
    let mut push = |addr: u64, end: u64, kind: u32| {
        if end > addr {
            map.push(E820Entry {
                addr,
                size: end - addr,
                kind,
            });
        }
    };
    let low_end = ram_size.min(MMIO_GAP_START);
    push(0, RESERVED_END.min(low_end), E820_RESERVED);
    push(RESERVED_END, EBDA_START.min(low_end), E820_RAM);
    push(EBDA_START, HIGH_MEMORY_START.min(low_end), E820_RESERVED);
    push(HIGH_MEMORY_START, low_end, E820_RAM);
    push(MMIO_GAP_START, MMIO_GAP_END, E820_RESERVED);
    if ram_size > MMIO_GAP_START {
        push(
            MMIO_GAP_END,
            MMIO_GAP_END + (ram_size - MMIO_GAP_START),
            E820_RAM,
        );
    }
    map
}

/// What goes into a zero page besides the kernel's header.
pub struct ZeroPage<'a> {
    /// The kernel's setup header, `0x1f1..end` of its file; empty for an ELF
    /// kernel, which has none (a minimal one is synthesized).
    pub header: &'a [u8],
    /// Where the protected-mode kernel was loaded (`code32_start`).
    pub kernel_address: u64,
    /// Address of the NUL-terminated command line.
    pub cmdline_address: u64,
    /// Its length without the NUL (for an ELF kernel's synthesized `cmdline_size`).
    pub cmdline_len: u64,
    /// `(address, size)` of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    /// The memory map.
    pub e820: &'a [E820Entry],
    /// Where the ACPI RSDP is (`acpi_rsdp_addr`, boot protocol 2.14+), 0 for
    /// none: the kernel then scans the BIOS area for it.
    pub acpi_rsdp_addr: u64,
}

fn put(page: &mut [u8], at: usize, value: &[u8]) {
    page[at..at + value.len()].copy_from_slice(value);
}

/// The protocol version a zero page built for an ELF kernel claims: 2.12, the
/// oldest this loader speaks (fields like `ext_ramdisk_image` are read from it).
const ELF_PROTOCOL_VERSION: u16 = 0x020c;

/// Builds the zero page.
///
/// `loadflags` keeps only `LOADED_HIGH`: `CAN_USE_HEAP`/`heap_end_ptr` describe the
/// real-mode setup code's heap and `KEEP_SEGMENTS` the 32-bit entry, and the 64-bit
/// entry runs neither; `KASLR_FLAG` is the kernel's own output.
pub fn build(z: &ZeroPage) -> Vec<u8> {
    let mut page = vec![0u8; BOOT_PARAMS_SIZE];
    let header_len = z
        .header
        .len()
        .min(SETUP_HEADER_MAX_END - SETUP_HEADER_OFFSET);
    put(&mut page, SETUP_HEADER_OFFSET, &z.header[..header_len]);
    if header_len == 0 {
        put(&mut page, off::BOOT_FLAG, &0xaa55u16.to_le_bytes());
        put(&mut page, off::HEADER, &HEADER_MAGIC.to_le_bytes());
        put(&mut page, off::VERSION, &ELF_PROTOCOL_VERSION.to_le_bytes());
        put(
            &mut page,
            off::CMDLINE_SIZE,
            &(z.cmdline_len as u32).to_le_bytes(),
        );
    }
    page[off::TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED;
    page[off::LOADFLAGS] &= super::bzimage::LOADED_HIGH;
    put(&mut page, off::HEAP_END_PTR, &[0, 0]);
    put(
        &mut page,
        off::CODE32_START,
        &(z.kernel_address as u32).to_le_bytes(),
    );
    let split = |v: u64| ((v as u32).to_le_bytes(), ((v >> 32) as u32).to_le_bytes());
    let (lo, hi) = split(z.cmdline_address);
    put(&mut page, off::CMD_LINE_PTR, &lo);
    put(&mut page, off::EXT_CMD_LINE_PTR, &hi);
    let (image, size) = z.initrd.unwrap_or((0, 0));
    let (lo, hi) = split(image);
    put(&mut page, off::RAMDISK_IMAGE, &lo);
    put(&mut page, off::EXT_RAMDISK_IMAGE, &hi);
    let (lo, hi) = split(size);
    put(&mut page, off::RAMDISK_SIZE, &lo);
    put(&mut page, off::EXT_RAMDISK_SIZE, &hi);
    put(
        &mut page,
        off::ACPI_RSDP_ADDR,
        &z.acpi_rsdp_addr.to_le_bytes(),
    );
    let entries = &z.e820[..z.e820.len().min(E820_MAX_ENTRIES)];
    page[off::E820_ENTRIES] = entries.len() as u8;
    for (i, e) in entries.iter().enumerate() {
        let at = off::E820_TABLE + i * 20;
        put(&mut page, at, &e.addr.to_le_bytes());
        put(&mut page, at + 8, &e.size.to_le_bytes());
        put(&mut page, at + 16, &e.kind.to_le_bytes());
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::bzimage::{self, tests::tiny_bzimage, CAN_USE_HEAP, LOADED_HIGH};

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn e820_of_a_small_guest() {
        let map = e820_map(256 << 20);
        let want = [
            (0, RESERVED_END, E820_RESERVED),
            (RESERVED_END, EBDA_START - RESERVED_END, E820_RAM),
            (EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
            (HIGH_MEMORY_START, (256 << 20) - HIGH_MEMORY_START, E820_RAM),
            (MMIO_GAP_START, MMIO_GAP_END - MMIO_GAP_START, E820_RESERVED),
        ];
        let got: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.kind)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn e820_of_a_large_guest_puts_the_rest_above_4g() {
        let map = e820_map(4 << 30);
        let last = map.last().unwrap();
        assert_eq!(
            (last.addr, last.size, last.kind),
            (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START, E820_RAM)
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // Everything but the reserved low areas is usable.
        assert_eq!(
            ram,
            (4 << 30) - RESERVED_END - (HIGH_MEMORY_START - EBDA_START)
        );
    }

    #[test]
    fn zero_page_carries_header_and_loader_fields() {
        let mut img = tiny_bzimage(&[0x90; 0x400]);
        img[0x211] |= CAN_USE_HEAP;
        let z = bzimage::parse(&img).unwrap();
        let e820 = e820_map(64 << 20);
        let page = build(&ZeroPage {
            header: z.header_bytes(&img),
            kernel_address: 0x20_0000,
            cmdline_address: 0x2_0000,
            cmdline_len: 5,
            initrd: Some((0x1_2345_6000, 0x1000)),
            e820: &e820,
            acpi_rsdp_addr: 0xe_0000,
        });
        assert_eq!(page.len(), BOOT_PARAMS_SIZE);
        assert_eq!(&page[0x202..0x206], b"HdrS");
        assert_eq!(page[0x1f1], 1);
        assert_eq!(page[0x210], 0xff);
        assert_eq!(page[0x211], LOADED_HIGH);
        assert_eq!(u32_at(&page, 0x228), 0x2_0000);
        assert_eq!(u32_at(&page, 0x0c8), 0);
        assert_eq!(u32_at(&page, 0x218), 0x2345_6000);
        assert_eq!(u32_at(&page, 0x0c0), 1);
        assert_eq!(u32_at(&page, 0x21c), 0x1000);
        assert_eq!(u32_at(&page, 0x214), 0x20_0000);
        assert_eq!(u32_at(&page, 0x070), 0xe_0000, "acpi_rsdp_addr");
        assert_eq!(u32_at(&page, 0x074), 0);
        assert_eq!(page[0x1e8] as usize, e820.len());
        assert_eq!(u32_at(&page, 0x2d0 + 20 + 16), E820_RAM);
        // Nothing past the header's end was copied.
        assert!(page[0x26c..0x290].iter().all(|&b| b == 0));
    }

    #[test]
    fn elf_kernels_get_a_synthesized_header() {
        let page = build(&ZeroPage {
            header: &[],
            kernel_address: 0x100_0000,
            cmdline_address: 0x2_0000,
            cmdline_len: 9,
            initrd: None,
            e820: &e820_map(64 << 20),
            acpi_rsdp_addr: 0,
        });
        assert_eq!(&page[0x1fe..0x200], &[0x55, 0xaa]);
        assert_eq!(&page[0x202..0x206], b"HdrS");
        assert_eq!(u32_at(&page, 0x238), 9);
        assert_eq!(u32_at(&page, 0x218), 0);
    }
}
