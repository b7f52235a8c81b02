//! Static ELF64 x86-64 images: parsed by their file header and program headers,
//! validated against guest RAM, then copied segment by segment.
//!
//! Parsing is separate from loading so that every check runs (and is unit-tested)
//! before a single byte of guest memory is written: a refused image leaves the VM
//! untouched.

use thiserror::Error;

use super::bytes::{u16_at, u32_at, u64_at};
use super::layout::RESERVED_END;
use super::BootError;
use crate::memory::GuestRam;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
/// More program headers than this is not a plausible static image.
const MAX_PHDRS: usize = 256;

/// Why an ELF image is refused (displayed after `image: `).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ElfError {
    /// Shorter than the ELF header
    #[error("ELF file is truncated: {0} bytes, the ELF64 header alone is {EHDR_SIZE}")]
    Truncated(usize),
    /// No ELF magic
    #[error("not an ELF file (bad magic)")]
    BadMagic,
    /// Not ELF64
    #[error("ELF class {0} is not ELF64")]
    Class(u8),
    /// Not little-endian
    #[error("ELF data encoding is not little-endian")]
    BigEndian,
    /// Not a static executable
    #[error("ELF type {0} is not a static executable (ET_EXEC); relocatable and PIE images are not supported")]
    Type(u16),
    /// Not x86-64
    #[error("ELF machine {0} is not x86-64 ({EM_X86_64})")]
    Machine(u16),
    /// Program headers of another size
    #[error("ELF program header size {0} is not {PHDR_SIZE}")]
    PhdrSize(usize),
    /// No or too many program headers
    #[error("ELF has {0} program headers (expected 1..={MAX_PHDRS})")]
    PhdrCount(usize),
    /// The program headers run past the file
    #[error("ELF is truncated: {count} program headers at offset {offset:#x} run past the end of the {len}-byte file")]
    PhdrsTruncated {
        /// How many.
        count: usize,
        /// Where they start.
        offset: u64,
        /// The file's size.
        len: usize,
    },
    /// A segment's file part is larger than its memory part
    #[error("segment {index}: file size {filesz:#x} exceeds memory size {memsz:#x}")]
    FileSize {
        /// Which segment.
        index: usize,
        /// Bytes in the file.
        filesz: u64,
        /// Bytes in memory.
        memsz: u64,
    },
    /// A segment's bytes run past the file
    #[error("ELF is truncated: segment {index} needs file bytes {start:#x}..{end:#x} but the file has {len}")]
    SegmentTruncated {
        /// Which segment.
        index: usize,
        /// First file byte.
        start: u64,
        /// End of its bytes.
        end: u64,
        /// The file's size.
        len: usize,
    },
    /// A segment's end overflows
    #[error("segment {0}: address + size overflows")]
    AddressOverflow(usize),
    /// Nothing to load
    #[error("ELF has no loadable (PT_LOAD) segments")]
    NoSegments,
    /// The entry point is in no segment
    #[error("entry point {0:#x} is outside every loadable segment")]
    EntryOutsideSegments(u64),
    /// Something would overwrite the VMM's boot structures
    #[error("{what} at {addr:#x} overlaps the VMM's reserved boot area 0x0..{RESERVED_END:#x}")]
    Reserved {
        /// `"the image"` or `"segment N"`.
        what: String,
        /// Where it starts.
        addr: u64,
    },
    /// Something does not fit in guest RAM
    #[error("{what} at {addr:#x}..{end:#x} does not fit in guest RAM ({ram_size} bytes)")]
    DoesNotFit {
        /// `"the image"` or `"segment N"`.
        what: String,
        /// Where it starts.
        addr: u64,
        /// Where it ends (saturated).
        end: u64,
        /// The RAM size.
        ram_size: u64,
    },
    /// A parsed segment is not in these bytes
    #[error("ELF segment runs past the end of the file")]
    SegmentPastFile,
}

/// The result of parsing or placing an ELF image.
pub type Result<T> = std::result::Result<T, ElfError>;

/// One `PT_LOAD` segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Where it goes in guest-physical memory (`p_paddr`).
    pub paddr: u64,
    /// Its virtual address (`p_vaddr`); the VMM's identity map makes them equal
    /// in practice, but the entry point is checked against virtual addresses.
    pub vaddr: u64,
    /// File offset of its bytes.
    pub offset: u64,
    /// Bytes in the file.
    pub filesz: u64,
    /// Bytes in memory (the rest is zero-filled).
    pub memsz: u64,
    /// `p_flags` (1 = X, 2 = W, 4 = R).
    pub flags: u32,
}

/// What the loader needs from an ELF image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfImage {
    /// The entry point (`e_entry`).
    pub entry: u64,
    /// The loadable segments.
    pub segments: Vec<Segment>,
}

/// Whether `bytes` start with the ELF magic.
pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

/// Parses and validates the headers of a static ELF64 x86-64 executable.
pub fn parse(bytes: &[u8]) -> Result<ElfImage> {
    let image = parse_segments(bytes)?;
    let entry = image.entry;
    let in_segment = image
        .segments
        .iter()
        .any(|s| entry >= s.vaddr && entry < s.vaddr + s.memsz);
    if !in_segment {
        return Err(ElfError::EntryOutsideSegments(entry));
    }
    Ok(image)
}

/// Like [`parse`], without checking the entry point against the segments'
/// virtual addresses: a Linux `vmlinux` links its segments at virtual addresses
/// but its entry point (`phys_startup_64`) is physical.
pub fn parse_segments(bytes: &[u8]) -> Result<ElfImage> {
    if bytes.len() < EHDR_SIZE {
        return Err(ElfError::Truncated(bytes.len()));
    }
    if !is_elf(bytes) {
        return Err(ElfError::BadMagic);
    }
    if bytes[4] != 2 {
        return Err(ElfError::Class(bytes[4]));
    }
    if bytes[5] != 1 {
        return Err(ElfError::BigEndian);
    }
    let e_type = u16_at(bytes, 16);
    if e_type != ET_EXEC {
        return Err(ElfError::Type(e_type));
    }
    let machine = u16_at(bytes, 18);
    if machine != EM_X86_64 {
        return Err(ElfError::Machine(machine));
    }
    let entry = u64_at(bytes, 24);
    let phoff = u64_at(bytes, 32);
    let phentsize = u16_at(bytes, 54) as usize;
    let phnum = u16_at(bytes, 56) as usize;
    if phentsize != PHDR_SIZE {
        return Err(ElfError::PhdrSize(phentsize));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return Err(ElfError::PhdrCount(phnum));
    }
    let table_end = phoff
        .checked_add((phnum * PHDR_SIZE) as u64)
        .filter(|&end| end <= bytes.len() as u64)
        .ok_or(ElfError::PhdrsTruncated {
            count: phnum,
            offset: phoff,
            len: bytes.len(),
        })?;
    let _ = table_end;
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = &bytes[phoff as usize + i * PHDR_SIZE..phoff as usize + (i + 1) * PHDR_SIZE];
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let seg = Segment {
            flags: u32_at(ph, 4),
            offset: u64_at(ph, 8),
            vaddr: u64_at(ph, 16),
            paddr: u64_at(ph, 24),
            filesz: u64_at(ph, 32),
            memsz: u64_at(ph, 40),
        };
        if seg.filesz > seg.memsz {
            return Err(ElfError::FileSize {
                index: i,
                filesz: seg.filesz,
                memsz: seg.memsz,
            });
        }
        match seg.offset.checked_add(seg.filesz) {
            Some(end) if end <= bytes.len() as u64 => {}
            _ => {
                return Err(ElfError::SegmentTruncated {
                    index: i,
                    start: seg.offset,
                    end: seg.offset.saturating_add(seg.filesz),
                    len: bytes.len(),
                })
            }
        }
        if seg.paddr.checked_add(seg.memsz).is_none() || seg.vaddr.checked_add(seg.memsz).is_none()
        {
            return Err(ElfError::AddressOverflow(i));
        }
        if seg.memsz > 0 {
            segments.push(seg);
        }
    }
    if segments.is_empty() {
        return Err(ElfError::NoSegments);
    }
    Ok(ElfImage { entry, segments })
}

/// Checks that `[addr, addr + len)` fits guest RAM and, when `reserve_low` is set,
/// stays clear of the VMM's boot structures.
pub fn check_placement(
    ram: &GuestRam,
    what: &str,
    addr: u64,
    len: u64,
    reserve_low: bool,
) -> Result<()> {
    if reserve_low && addr < RESERVED_END {
        return Err(ElfError::Reserved {
            what: what.to_string(),
            addr,
        });
    }
    if !ram.contains(addr, len) {
        return Err(ElfError::DoesNotFit {
            what: what.to_string(),
            addr,
            end: addr.saturating_add(len),
            ram_size: ram.size(),
        });
    }
    Ok(())
}

/// Validates every segment's placement, then copies the image into guest RAM.
/// Returns the entry point.
pub fn load(
    ram: &GuestRam,
    bytes: &[u8],
    reserve_low: bool,
) -> std::result::Result<u64, BootError> {
    let image = parse(bytes)?;
    for (i, s) in image.segments.iter().enumerate() {
        check_placement(ram, &format!("segment {i}"), s.paddr, s.memsz, reserve_low)?;
    }
    write_segments(ram, bytes, &image)?;
    Ok(image.entry)
}

/// Copies the segments of a parsed image into guest RAM at their physical
/// addresses. Each segment's whole `[paddr, paddr + memsz)` is checked against
/// guest RAM first (overflow-safe), so nothing is written for an image that does
/// not fit.
///
/// Only the `filesz` bytes are copied, straight from the file. The BSS (`memsz -
/// filesz`) is never allocated on the host: [`GuestRam::zero`] drops its whole
/// pages (fresh RAM is untouched, so this costs nothing) and writes zeros only
/// into the partial pages at its ends. So a re-load into a used VM does zero the
/// BSS again, in guest memory, page-wise, whatever `memsz` the file claims.
pub fn write_segments(
    ram: &GuestRam,
    bytes: &[u8],
    image: &ElfImage,
) -> std::result::Result<(), BootError> {
    for (i, s) in image.segments.iter().enumerate() {
        check_placement(ram, &format!("segment {i}"), s.paddr, s.memsz, false)?;
    }
    for s in &image.segments {
        let data = usize::try_from(s.offset)
            .ok()
            .zip(usize::try_from(s.offset.saturating_add(s.filesz)).ok())
            .and_then(|(start, end)| bytes.get(start..end))
            .ok_or(ElfError::SegmentPastFile)?;
        ram.write(s.paddr, data)?;
        ram.zero(s.paddr + s.filesz, s.memsz - s.filesz)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid image: one R+X segment at `addr` holding `code`.
    pub fn tiny_elf(addr: u64, code: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; EHDR_SIZE + PHDR_SIZE];
        b[0..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[24..32].copy_from_slice(&addr.to_le_bytes());
        b[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        b[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = EHDR_SIZE;
        b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
        let off = (EHDR_SIZE + PHDR_SIZE) as u64;
        b[ph + 8..ph + 16].copy_from_slice(&off.to_le_bytes());
        b[ph + 16..ph + 24].copy_from_slice(&addr.to_le_bytes());
        b[ph + 24..ph + 32].copy_from_slice(&addr.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        b[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + 16).to_le_bytes());
        b.extend_from_slice(code);
        b
    }

    #[test]
    fn parses_and_loads_a_valid_image() {
        let img = tiny_elf(0x10_0000, &[0xf4]);
        let parsed = parse(&img).unwrap();
        assert_eq!(parsed.entry, 0x10_0000);
        assert_eq!(parsed.segments[0].memsz, 17);
        let ram = GuestRam::new(2 << 20).unwrap();
        assert_eq!(load(&ram, &img, true).unwrap(), 0x10_0000);
        let mut b = [0u8; 1];
        ram.read(0x10_0000, &mut b).unwrap();
        assert_eq!(b[0], 0xf4);
    }

    #[test]
    fn refuses_truncated_and_foreign_images() {
        let img = tiny_elf(0x10_0000, &[0xf4; 32]);
        for cut in [0, 10, 63] {
            assert_eq!(parse(&img[..cut]).unwrap_err(), ElfError::Truncated(cut));
        }
        assert!(matches!(
            parse(&img[..80]),
            Err(ElfError::PhdrsTruncated { count: 1, .. })
        ));
        assert!(matches!(
            parse(&img[..img.len() - 1]),
            Err(ElfError::SegmentTruncated { index: 0, .. })
        ));
        let mut other = img.clone();
        other[18] = 3; // EM_386
        assert_eq!(parse(&other).unwrap_err(), ElfError::Machine(3));
        let mut class32 = img.clone();
        class32[4] = 1;
        assert_eq!(parse(&class32).unwrap_err(), ElfError::Class(1));
        assert_eq!(parse(b"MZ\0\0").unwrap_err(), ElfError::Truncated(4));
        let mut mz = img.clone();
        mz[..2].copy_from_slice(b"MZ");
        assert_eq!(parse(&mz).unwrap_err(), ElfError::BadMagic);
    }

    #[test]
    fn refuses_entry_outside_segments_and_bad_placement() {
        let mut img = tiny_elf(0x10_0000, &[0xf4]);
        img[24..32].copy_from_slice(&0x90_0000u64.to_le_bytes());
        assert_eq!(
            parse(&img).unwrap_err(),
            ElfError::EntryOutsideSegments(0x90_0000)
        );
        let ram = GuestRam::new(1 << 20).unwrap();
        let e = load(&ram, &tiny_elf(0x10_0000, &[0xf4]), true).unwrap_err();
        assert!(
            matches!(
                &e,
                BootError::Elf(ElfError::DoesNotFit {
                    addr: 0x10_0000,
                    ..
                })
            ),
            "{e}"
        );
        let ram = GuestRam::new(2 << 20).unwrap();
        let e = load(&ram, &tiny_elf(0x1000, &[0xf4]), true).unwrap_err();
        assert!(
            matches!(&e, BootError::Elf(ElfError::Reserved { addr: 0x1000, .. })),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "image: segment 0 at 0x1000 overlaps the VMM's reserved boot area 0x0..0x10000"
        );
    }

    /// Resident set size of this process in bytes (`VmRSS`).
    fn rss_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    #[test]
    fn a_huge_bss_costs_neither_host_memory_nor_time() {
        // 120 bytes of ELF whose one segment is 1 byte in the file and 1.5 GiB in memory.
        let mut img = tiny_elf(0x10_0000, &[0xf4]);
        let memsz: u64 = 3 << 29;
        img[EHDR_SIZE + 40..EHDR_SIZE + 48].copy_from_slice(&memsz.to_le_bytes());
        assert_eq!(img.len(), 121);
        let ram = GuestRam::new(2 << 30).unwrap();
        let rss = rss_bytes();
        let started = std::time::Instant::now();
        assert_eq!(load(&ram, &img, true).unwrap(), 0x10_0000);
        let elapsed = started.elapsed();
        let grown = rss_bytes().saturating_sub(rss);
        assert!(elapsed.as_millis() < 500, "loading took {elapsed:?}");
        assert!(grown < 256 << 20, "RSS grew by {grown} bytes");
        let mut b = [0xaau8; 2];
        ram.read(0x10_0000, &mut b).unwrap();
        assert_eq!(b, [0xf4, 0]);
        ram.read(0x10_0000 + memsz - 2, &mut b).unwrap();
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn a_reload_zeroes_the_bss_in_guest_memory() {
        let mut img = tiny_elf(0x10_0800, &[0xf4]);
        let memsz: u64 = 3 << 20; // starts mid-page, ends mid-page
        img[EHDR_SIZE + 40..EHDR_SIZE + 48].copy_from_slice(&(memsz + 0x123).to_le_bytes());
        let ram = GuestRam::new(8 << 20).unwrap();
        ram.write(0x10_0000, &vec![0x55; 5 << 20]).unwrap();
        load(&ram, &img, true).unwrap();
        let mut all = vec![0u8; (6 << 20) - 0x10_0000];
        ram.read(0x10_0000, &mut all).unwrap();
        let bss_start = 0x801; // offsets from 0x100000
        let bss_end = 0x800 + memsz as usize + 0x123;
        assert!(
            all[..0x800].iter().all(|&b| b == 0x55),
            "before the segment"
        );
        assert_eq!(all[0x800], 0xf4);
        assert!(all[bss_start..bss_end].iter().all(|&b| b == 0), "the BSS");
        assert!(all[bss_end..].iter().all(|&b| b == 0x55), "after the BSS");
    }

    #[test]
    fn never_panics_on_random_bytes() {
        // A cheap deterministic fuzz: xorshift bytes spliced over a valid header.
        let base = tiny_elf(0x10_0000, &[0xf4; 8]);
        let mut rng = crate::test_rng::XorShift::new(0x9e37_79b9_7f4a_7c15);
        let mut x = 0;
        for _ in 0..20_000 {
            let mut img = base.clone();
            for _ in 0..4 {
                x = rng.next_u64();
                let pos = (x as usize) % img.len();
                img[pos] = (x >> 32) as u8;
            }
            let len = (x >> 40) as usize % (img.len() + 1);
            let _ = parse(&img[..len]);
        }
    }
}
