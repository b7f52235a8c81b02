//! Loading a Linux kernel the way Firecracker and Cloud Hypervisor do, without
//! firmware: the 64-bit boot protocol of Documentation/arch/x86/boot.rst.
//!
//! A bzImage's protected-mode kernel goes to `pref_address` (relocatable) or 1 MiB,
//! and is entered at `startup_64` (+0x200); a `vmlinux` ELF loads by its program
//! headers and is entered at its physical entry point. Either way the vCPU starts in
//! 64-bit mode with the VMM's identity page tables (the first 4 GiB), the boot GDT
//! (`__BOOT_CS` 0x10, `__BOOT_DS` 0x18), interrupts off and RSI = the zero page.
//!
//! Every check runs before the first byte is written, so a refused kernel leaves the
//! VM untouched. Only the pages that receive data are written: the kernel's file
//! bytes (not its `init_size`), the initrd, the command line, the zero page and the
//! boot structures; the rest of guest RAM stays untouched anonymous memory.

use kvm_bindings::{kvm_regs, kvm_sregs};
use serde::Serialize;
use thiserror::Error;

use super::acpi;
use super::bzimage::{self, BzImage, SetupHeader, DEFAULT_LOAD_ADDRESS, STARTUP_64_OFFSET};
use super::elf::{self, ElfImage};
use super::layout::{
    BOOT_KERNEL_STACK_TOP, CMDLINE_ADDR, CMDLINE_MAX, IO_BITMAP_SIZE, LINUX_GDT_ADDR,
    LINUX_KERNEL_MIN_ADDR, TSS_ADDR, TSS_SIZE, ZERO_PAGE_ADDR,
};
use super::mptable::{self, MAX_MPTABLE_CPUS};
use super::x86_64::{self, descriptor};
use super::zero_page::{self, E820Entry, ZeroPage};
use super::{BootError, EntryMode, Result};
use crate::memory::{GuestRam, MMIO_GAP_START};

/// `__BOOT_CS`: the 64-bit code selector the boot protocol enters with.
pub const BOOT_CS: u16 = 0x10;
/// `__BOOT_DS`: the data selector for DS, ES, SS (and FS, GS).
pub const BOOT_DS: u16 = 0x18;
/// The TSS selector of the boot GDT (KVM needs a valid TR; Linux loads its own).
const BOOT_TSS: u16 = 0x20;
/// The initrd limit assumed for an ELF kernel, which has no setup header (the
/// value every 64-bit bzImage declares).
const ELF_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

/// Why a Linux kernel cannot boot in this VM as asked. A malformed kernel's
/// message starts with `image: `; one that needs more RAM, a command line too
/// long and an initrd that does not fit have their own ABI statuses (see
/// `abi::status`).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LinuxError {
    /// Neither a bzImage nor an ELF file
    #[error(
        "image: not a Linux kernel: neither a bzImage (no \"HdrS\" magic at 0x202) nor an ELF file"
    )]
    NotAKernel,
    /// An ELF kernel's entry point is in no segment
    #[error("image: entry point {0:#x} is outside every loadable segment (by physical and by virtual address)")]
    ElfEntry(u64),
    /// `pref_address + init_size` overflows
    #[error("image: pref_address {pref_address:#x} + init_size {init_size:#x} overflows the address space")]
    Overflow {
        /// `pref_address`.
        pref_address: u64,
        /// `init_size`.
        init_size: u32,
    },
    /// The kernel would occupy memory below 1 MiB
    #[error("image: the kernel would occupy {start:#x}..{end:#x} ({what}), below 1 MiB where the boot data and the legacy area are")]
    BelowOneMib {
        /// Its footprint's first byte.
        start: u64,
        /// Its footprint's end.
        end: u64,
        /// Where the footprint comes from.
        what: String,
    },
    /// The kernel needs more RAM than the VM has
    #[error("the kernel does not fit in guest RAM: it needs {start:#x}..{end:#x} ({what}) but RAM below 4 GiB ends at {low_end:#x}; give the VM at least {} MiB", end.div_ceil(MIB))]
    DoesNotFit {
        /// Its footprint's first byte.
        start: u64,
        /// Its footprint's end.
        end: u64,
        /// Where the footprint comes from.
        what: String,
        /// The end of RAM below the MMIO gap.
        low_end: u64,
    },
    /// The kernel reaches into the MMIO gap: no RAM size fits it
    #[error("image: the kernel does not fit in guest RAM: it needs {start:#x}..{end:#x} ({what}) but RAM below 4 GiB ends at {low_end:#x}, past the MMIO gap at {MMIO_GAP_START:#x}: no RAM size fits it")]
    PastMmioGap {
        /// Its footprint's first byte.
        start: u64,
        /// Its footprint's end.
        end: u64,
        /// Where the footprint comes from.
        what: String,
        /// The end of RAM below the MMIO gap.
        low_end: u64,
    },
    /// A NUL inside the command line
    #[error("image: the command line contains a NUL byte")]
    CmdlineNul,
    /// Longer than the kernel's `cmdline_size`
    #[error(
        "the command line is {len} bytes, longer than the kernel's cmdline_size ({cmdline_size})"
    )]
    CmdlineTooLong {
        /// Its length.
        len: u64,
        /// The kernel's limit.
        cmdline_size: u32,
    },
    /// Longer than the command line's place in guest RAM
    #[error("the command line is {0} bytes; at most {} fit at {CMDLINE_ADDR:#x}", CMDLINE_MAX - 1)]
    CmdlineArea(u64),
    /// An initrd larger than guest RAM
    #[error("the initrd is {len} bytes, larger than guest RAM ({ram_size} bytes)")]
    InitrdLargerThanRam {
        /// Its length.
        len: u64,
        /// The RAM size.
        ram_size: u64,
    },
    /// No room for the initrd above the kernel
    #[error("the initrd ({len} bytes) does not fit between the kernel's end {kernel_end:#x} and {top:#x} (the lower of initrd_addr_max + 1 and the top of RAM below 4 GiB)")]
    InitrdDoesNotFit {
        /// Its length.
        len: u64,
        /// The end of the kernel's footprint.
        kernel_end: u64,
        /// The highest end it may have.
        top: u64,
    },
    /// RAM ends below the ACPI tables' area
    #[error("image: guest RAM ({ram_size} bytes) does not reach the ACPI tables at {address:#x}")]
    NoRoomForAcpi {
        /// The RAM size.
        ram_size: u64,
        /// Where a table goes.
        address: u64,
    },
}

/// A kernel image the loader understands.
#[derive(Clone, Debug)]
pub enum Kernel {
    /// A bzImage.
    BzImage(BzImage),
    /// An ELF `vmlinux`, with its entry point translated to a physical address.
    Elf {
        /// The parsed headers.
        image: ElfImage,
        /// The physical entry point.
        entry: u64,
    },
}

/// A range of guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Region {
    /// First byte.
    pub address: u64,
    /// Length in bytes.
    pub size: u64,
}

impl Region {
    fn end(&self) -> u64 {
        self.address + self.size
    }
}

/// Where a kernel goes and what memory it claims before it reads the e820 map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Where its bytes are copied (the protected-mode kernel, or the lowest ELF
    /// segment) and how many bytes that is (for ELF: the segments' span).
    pub kernel: Region,
    /// The 64-bit entry point.
    pub entry: u64,
    /// Everything the kernel may use before it reads the memory map: the loaded
    /// bytes and, for a bzImage, `init_size` bytes from where it decompresses.
    pub footprint: Region,
}

/// Parses a bzImage or `vmlinux` ELF.
pub fn parse(bytes: &[u8]) -> Result<Kernel> {
    if bzimage::is_bzimage(bytes) {
        return Ok(Kernel::BzImage(bzimage::parse(bytes)?));
    }
    if elf::is_elf(bytes) {
        let image = elf::parse_segments(bytes)?;
        let entry = elf_physical_entry(&image)?;
        return Ok(Kernel::Elf { image, entry });
    }
    Err(LinuxError::NotAKernel.into())
}

/// A `vmlinux`'s entry point is physical (`phys_startup_64`); other ELF kernels
/// may give a virtual one, translated here through its segment.
fn elf_physical_entry(image: &ElfImage) -> Result<u64> {
    let e = image.entry;
    if image
        .segments
        .iter()
        .any(|s| e >= s.paddr && e - s.paddr < s.memsz)
    {
        return Ok(e);
    }
    image
        .segments
        .iter()
        .find(|s| e >= s.vaddr && e - s.vaddr < s.memsz)
        .map(|s| e - s.vaddr + s.paddr)
        .ok_or(LinuxError::ElfEntry(e).into())
}

/// Where `kernel` goes, independent of the RAM size (see [`check_fits`]).
pub fn place(kernel: &Kernel) -> Result<Placement> {
    match kernel {
        Kernel::BzImage(z) => {
            let h = &z.header;
            // A relocatable kernel loads where it prefers to run (it would move
            // there anyway: startup_64 never decompresses below pref_address).
            // A fixed one loads at 1 MiB and moves itself to pref_address.
            let load = if h.relocatable_kernel != 0 {
                h.pref_address
            } else {
                DEFAULT_LOAD_ADDRESS
            };
            let overflow = || LinuxError::Overflow {
                pref_address: h.pref_address,
                init_size: h.init_size,
            };
            let load_end = load.checked_add(z.kernel_size).ok_or_else(overflow)?;
            let runtime_end = h
                .pref_address
                .checked_add(h.init_size as u64)
                .ok_or_else(overflow)?;
            let start = load.min(h.pref_address);
            Ok(Placement {
                kernel: Region {
                    address: load,
                    size: z.kernel_size,
                },
                entry: load + STARTUP_64_OFFSET,
                footprint: Region {
                    address: start,
                    size: load_end.max(runtime_end) - start,
                },
            })
        }
        Kernel::Elf { image, entry } => {
            let start = image.segments.iter().map(|s| s.paddr).min().unwrap_or(0);
            let end = image
                .segments
                .iter()
                .map(|s| s.paddr + s.memsz)
                .max()
                .unwrap_or(0);
            let span = Region {
                address: start,
                size: end - start,
            };
            Ok(Placement {
                kernel: span,
                entry: *entry,
                footprint: span,
            })
        }
    }
}

/// The top of RAM below the MMIO gap, which everything the loader places must
/// stay under (the VMM's page tables map only the first 4 GiB).
fn low_ram_end(ram_size: u64) -> u64 {
    ram_size.min(MMIO_GAP_START)
}

/// Checks that the kernel's footprint lies in RAM between 1 MiB and the MMIO gap.
pub fn check_fits(kernel: &Kernel, placement: &Placement, ram_size: u64) -> Result<()> {
    let f = placement.footprint;
    let low_end = low_ram_end(ram_size);
    if f.address >= LINUX_KERNEL_MIN_ADDR && f.end() <= low_end {
        return Ok(());
    }
    let what = match kernel {
        Kernel::BzImage(z) => format!(
            "loaded at {:#x}, pref_address {:#x} + init_size {:#x}",
            placement.kernel.address, z.header.pref_address, z.header.init_size
        ),
        Kernel::Elf { .. } => "its ELF segments".to_string(),
    };
    let (start, end) = (f.address, f.end());
    if start < LINUX_KERNEL_MIN_ADDR {
        return Err(LinuxError::BelowOneMib { start, end, what }.into());
    }
    if end <= MMIO_GAP_START {
        Err(LinuxError::DoesNotFit {
            start,
            end,
            what,
            low_end,
        }
        .into())
    } else {
        // No RAM size fits it: the image itself is at fault.
        Err(LinuxError::PastMmioGap {
            start,
            end,
            what,
            low_end,
        }
        .into())
    }
}

/// Where everything went: the `dv_vm_load_linux` result.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinuxLayout {
    /// `"bzImage"` or `"elf"`.
    pub format: &'static str,
    /// The boot protocol version of a bzImage (`"2.15"`).
    pub protocol_version: Option<String>,
    /// The first instruction (RIP).
    pub entry: u64,
    /// The zero page (RSI).
    pub zero_page: u64,
    /// The initial stack pointer.
    pub stack: u64,
    /// The boot GDT.
    pub gdt: u64,
    /// The kernel's bytes as copied.
    pub kernel: Region,
    /// What the kernel may use before it reads the e820 map.
    pub footprint: Region,
    /// The command line, its NUL included.
    pub cmdline: Region,
    /// The initrd, if one was given.
    pub initrd: Option<Region>,
    /// The e820 map in the zero page.
    pub e820: Vec<E820Entry>,
}

fn check_cmdline(kernel: &Kernel, cmdline: &[u8]) -> Result<()> {
    if cmdline.contains(&0) {
        return Err(LinuxError::CmdlineNul.into());
    }
    let len = cmdline.len() as u64;
    if let Kernel::BzImage(z) = kernel {
        if len > z.header.cmdline_size as u64 {
            return Err(LinuxError::CmdlineTooLong {
                len,
                cmdline_size: z.header.cmdline_size,
            }
            .into());
        }
    }
    if len >= CMDLINE_MAX {
        return Err(LinuxError::CmdlineArea(len).into());
    }
    Ok(())
}

/// The initrd goes as high as it can: page-aligned, below the lower of
/// `initrd_addr_max` and the top of RAM under the MMIO gap, above the kernel.
fn place_initrd(
    kernel: &Kernel,
    footprint: &Region,
    ram_size: u64,
    len: u64,
) -> Result<Option<Region>> {
    if len == 0 {
        return Ok(None);
    }
    if len > ram_size {
        return Err(LinuxError::InitrdLargerThanRam { len, ram_size }.into());
    }
    let max = match kernel {
        Kernel::BzImage(z) => z.header.initrd_addr_max as u64,
        Kernel::Elf { .. } => ELF_INITRD_ADDR_MAX,
    };
    let top = (max + 1).min(low_ram_end(ram_size));
    match top.checked_sub(len).map(|a| a & !(PAGE - 1)) {
        Some(address) if address >= footprint.end() => Ok(Some(Region { address, size: len })),
        _ => Err(LinuxError::InitrdDoesNotFit {
            len,
            kernel_end: footprint.end(),
            top,
        }
        .into()),
    }
}

/// Computes every placement for a kernel in `ram_size` bytes of RAM; fails
/// with the reason when anything does not fit.
pub fn plan(
    kernel: &Kernel,
    ram_size: u64,
    initrd_len: u64,
    cmdline: &[u8],
) -> Result<LinuxLayout> {
    let placement = place(kernel)?;
    check_fits(kernel, &placement, ram_size)?;
    check_cmdline(kernel, cmdline)?;
    let initrd = place_initrd(kernel, &placement.footprint, ram_size, initrd_len)?;
    let (format, protocol_version) = match kernel {
        Kernel::BzImage(z) => ("bzImage", Some(bzimage::version_string(z.header.version))),
        Kernel::Elf { .. } => ("elf", None),
    };
    Ok(LinuxLayout {
        format,
        protocol_version,
        entry: placement.entry,
        zero_page: ZERO_PAGE_ADDR,
        stack: BOOT_KERNEL_STACK_TOP,
        gdt: LINUX_GDT_ADDR,
        kernel: placement.kernel,
        footprint: placement.footprint,
        cmdline: Region {
            address: CMDLINE_ADDR,
            size: cmdline.len() as u64 + 1,
        },
        initrd,
        e820: zero_page::e820_map(ram_size),
    })
}

/// Every check [`load`] makes, without guest RAM (and so without KVM): the kernel
/// parses, the initrd is an initramfs the kernel accepts, the command line is
/// short enough, and everything fits in `ram_size` bytes. Each failure has its
/// own error: `Image` (a malformed kernel), `Initrd`, `CmdlineTooLong`,
/// `DoesNotFit`.
pub fn check(
    bytes: &[u8],
    ram_size: u64,
    initrd: &[u8],
    cmdline: &[u8],
) -> Result<(Kernel, LinuxLayout)> {
    let kernel = parse(bytes)?;
    if !initrd.is_empty() {
        super::initrd::check(initrd)?;
    }
    let layout = plan(&kernel, ram_size, initrd.len() as u64, cmdline)?;
    Ok((kernel, layout))
}

/// Loads a kernel, its initrd and command line into `ram`, with the zero page,
/// the boot GDT, the VMM's page tables and the tables describing `cpus` CPUs:
/// ACPI's (in the BIOS area, pointed at by the zero page, with code at the reset
/// vector for the kernel's reboot through the BIOS) and, for `acpi=off`,
/// the MP table (up to [`MAX_MPTABLE_CPUS`]; beyond, ACPI alone describes them).
/// Nothing is written unless everything fits. The vCPU is set up separately
/// ([`linux_sregs`], [`linux_regs`]).
pub fn load(
    ram: &GuestRam,
    bytes: &[u8],
    initrd: &[u8],
    cmdline: &[u8],
    cpus: u32,
) -> Result<LinuxLayout> {
    let (kernel, layout) = check(bytes, ram.size(), initrd, cmdline)?;
    let acpi_tables = acpi::build_with_reset_vector(cpus)?;
    let mp_table = match cpus {
        0..=MAX_MPTABLE_CPUS => Some(mptable::build(cpus)?),
        _ => None,
    };
    for (address, table) in &acpi_tables {
        if address + table.len() as u64 > ram.size() {
            return Err(LinuxError::NoRoomForAcpi {
                ram_size: ram.size(),
                address: *address,
            }
            .into());
        }
    }
    let header = match &kernel {
        Kernel::BzImage(z) => {
            ram.prefault(layout.kernel.address, layout.kernel.size);
            ram.write(layout.kernel.address, z.protected_mode(bytes))?;
            z.header_bytes(bytes)
        }
        Kernel::Elf { image, .. } => {
            elf::write_segments(ram, bytes, image)?;
            &[]
        }
    };
    if let Some(r) = layout.initrd {
        ram.prefault(r.address, r.size);
        ram.write(r.address, initrd)?;
    }
    let mut line = Vec::with_capacity(cmdline.len() + 1);
    line.extend_from_slice(cmdline);
    line.push(0);
    ram.write(CMDLINE_ADDR, &line)?;
    let page = zero_page::build(&ZeroPage {
        header,
        kernel_address: layout.kernel.address,
        cmdline_address: CMDLINE_ADDR,
        cmdline_len: cmdline.len() as u64,
        initrd: layout.initrd.map(|r| (r.address, r.size)),
        e820: &layout.e820,
        acpi_rsdp_addr: acpi::RSDP_ADDR,
    });
    ram.write(ZERO_PAGE_ADDR, &page)?;
    for (address, table) in &acpi_tables {
        ram.write(*address, table)?;
    }
    if let Some(table) = mp_table {
        ram.write(mptable::MPTABLE_START, &table)?;
    }
    let gdt: Vec<u8> = boot_gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
    ram.write(LINUX_GDT_ADDR, &gdt)?;
    x86_64::write_boot_structures(ram)?;
    Ok(layout)
}

/// The boot GDT: null, null, `__BOOT_CS` (64-bit code), `__BOOT_DS` (flat data),
/// then a 16-byte busy TSS descriptor (the VMM's TSS) so TR is valid on entry.
pub fn boot_gdt() -> [u64; 6] {
    let tss_limit = (TSS_SIZE + IO_BITMAP_SIZE - 1) as u32;
    [
        0,
        0,
        descriptor(0, 0xfffff, 0x9b, 0xa), // __BOOT_CS: present, DPL0, exec/read, L, G
        descriptor(0, 0xfffff, 0x93, 0xc), // __BOOT_DS: present, DPL0, read/write, D, G
        descriptor(TSS_ADDR as u32, tss_limit, 0x8b, 0x0), // 64-bit TSS, busy
        TSS_ADDR >> 32,
    ]
}

/// Special registers for the 64-bit boot protocol: the VMM's long-mode state
/// (paging, CR0/CR4/EFER) with the boot GDT's segments.
pub fn linux_sregs(sregs: kvm_sregs) -> kvm_sregs {
    let mut s = x86_64::long_mode_sregs(sregs, EntryMode::Long);
    x86_64::load_gdt_segments(
        &mut s,
        &boot_gdt(),
        LINUX_GDT_ADDR,
        BOOT_CS,
        BOOT_DS,
        BOOT_TSS,
    );
    s
}

/// General-purpose registers at the 64-bit entry: RIP = `entry`, RSI = the zero
/// page, interrupts off, everything else zero.
pub fn linux_regs(entry: u64, zero_page: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsi: zero_page,
        rsp: BOOT_KERNEL_STACK_TOP,
        rflags: 1 << 1,
        ..Default::default()
    }
}

/// What `inspect` reports about a bzImage.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BzImageInfo {
    /// The raw setup header.
    pub header: SetupHeader,
    /// `header.version` as `"2.15"`.
    pub protocol_version: String,
    /// The names of the set `loadflags` bits.
    pub loadflags: Vec<&'static str>,
    /// The names of the set `xloadflags` bits.
    pub xloadflags: Vec<&'static str>,
    /// The kernel's version string.
    pub kernel_version: Option<String>,
    /// File offset of the protected-mode kernel (when the header is valid).
    pub kernel_offset: Option<u64>,
    /// Its size.
    pub kernel_size: Option<u64>,
}

/// One ELF segment as `inspect` reports it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SegmentInfo {
    /// Physical address.
    pub paddr: u64,
    /// Virtual address.
    pub vaddr: u64,
    /// File offset.
    pub offset: u64,
    /// Bytes in the file.
    pub filesz: u64,
    /// Bytes in memory.
    pub memsz: u64,
    /// `"RWX"`-style permissions.
    pub flags: String,
}

/// What `inspect` reports about an ELF image.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ElfInfo {
    /// `e_entry` as stored.
    pub entry: u64,
    /// The loadable segments.
    pub segments: Vec<SegmentInfo>,
}

/// What the loader sees in an image: the `dv_inspect_image` result.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    /// `"bzImage"`, `"elf"` or `"unknown"`.
    pub format: &'static str,
    /// File size in bytes.
    pub size: u64,
    /// Whether the Linux loader accepts it (RAM permitting).
    pub loadable: bool,
    /// Why it is not loadable.
    pub problem: Option<String>,
    /// Where it would go (when loadable).
    pub placement: Option<Placement>,
    /// The smallest guest RAM in bytes its footprint fits in (when loadable).
    pub min_memory_bytes: Option<u64>,
    /// bzImage details.
    pub bz_image: Option<BzImageInfo>,
    /// ELF details.
    pub elf: Option<ElfInfo>,
}

fn flag_names<T: Copy + Into<u32>>(value: T, names: &[(T, &'static str)]) -> Vec<&'static str> {
    names
        .iter()
        .filter(|(bit, _)| {
            let (value, bit): (u32, u32) = (value.into(), (*bit).into());
            value & bit != 0
        })
        .map(|(_, name)| *name)
        .collect()
}

/// Describes an image without loading it: never fails, reports its problem.
pub fn inspect(bytes: &[u8]) -> Inspection {
    let mut out = Inspection {
        format: "unknown",
        size: bytes.len() as u64,
        loadable: false,
        problem: None,
        placement: None,
        min_memory_bytes: None,
        bz_image: None,
        elf: None,
    };
    if bzimage::is_bzimage(bytes) {
        out.format = "bzImage";
        if let Ok(h) = bzimage::read_header(bytes) {
            out.bz_image = Some(BzImageInfo {
                protocol_version: bzimage::version_string(h.version),
                loadflags: flag_names(
                    h.loadflags,
                    &[
                        (bzimage::LOADED_HIGH, "LOADED_HIGH"),
                        (bzimage::KASLR_FLAG, "KASLR_FLAG"),
                        (bzimage::QUIET_FLAG, "QUIET_FLAG"),
                        (bzimage::KEEP_SEGMENTS, "KEEP_SEGMENTS"),
                        (bzimage::CAN_USE_HEAP, "CAN_USE_HEAP"),
                    ],
                ),
                xloadflags: flag_names(
                    h.xloadflags,
                    &[
                        (bzimage::XLF_KERNEL_64, "XLF_KERNEL_64"),
                        (
                            bzimage::XLF_CAN_BE_LOADED_ABOVE_4G,
                            "XLF_CAN_BE_LOADED_ABOVE_4G",
                        ),
                        (bzimage::XLF_EFI_HANDOVER_32, "XLF_EFI_HANDOVER_32"),
                        (bzimage::XLF_EFI_HANDOVER_64, "XLF_EFI_HANDOVER_64"),
                        (1 << 4, "XLF_EFI_KEXEC"),
                        (1 << 5, "XLF_5LEVEL"),
                        (1 << 6, "XLF_5LEVEL_ENABLED"),
                    ],
                ),
                header: h,
                kernel_version: None,
                kernel_offset: None,
                kernel_size: None,
            });
        }
    } else if elf::is_elf(bytes) {
        out.format = "elf";
        if let Ok(image) = elf::parse_segments(bytes) {
            out.elf = Some(ElfInfo {
                entry: image.entry,
                segments: image
                    .segments
                    .iter()
                    .map(|s| SegmentInfo {
                        paddr: s.paddr,
                        vaddr: s.vaddr,
                        offset: s.offset,
                        filesz: s.filesz,
                        memsz: s.memsz,
                        flags: [(4, 'R'), (2, 'W'), (1, 'X')]
                            .iter()
                            .map(|&(bit, c)| if s.flags & bit != 0 { c } else { '-' })
                            .collect(),
                    })
                    .collect(),
            });
        }
    }
    match parse(bytes).and_then(|k| place(&k).map(|p| (k, p))) {
        Ok((kernel, placement)) => {
            if let (Kernel::BzImage(z), Some(info)) = (&kernel, out.bz_image.as_mut()) {
                info.kernel_version = z.kernel_version.clone();
                info.kernel_offset = Some(z.kernel_offset);
                info.kernel_size = Some(z.kernel_size);
            }
            match check_fits(&kernel, &placement, MMIO_GAP_START) {
                Ok(()) => {
                    out.loadable = true;
                    out.min_memory_bytes = Some(placement.footprint.end().next_multiple_of(MIB));
                }
                Err(e) => out.problem = Some(message(e)),
            }
            out.placement = Some(placement);
        }
        Err(e) => out.problem = Some(message(e)),
    }
    out
}

/// An error's message without the `image: ` prefix a malformed image's has.
fn message(e: BootError) -> String {
    let text = e.to_string();
    match text.strip_prefix("image: ") {
        Some(rest) => rest.to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::bzimage::tests::{put, tiny_bzimage};
    use crate::boot::elf::tests::tiny_elf;
    use crate::boot::initrd::InitrdError;

    fn read_u32(ram: &GuestRam, at: u64) -> u32 {
        let mut b = [0u8; 4];
        ram.read(at, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    /// `len` bytes that pass as a gzip'd initramfs.
    fn gzip_initrd(len: usize) -> Vec<u8> {
        let mut v = vec![0xab; len];
        v[..3].copy_from_slice(&[0x1f, 0x8b, 8]);
        v
    }

    #[test]
    fn loads_a_bzimage_with_initrd_and_cmdline() {
        let img = tiny_bzimage(&[0xf4; 0x400]);
        let ram = GuestRam::new(64 << 20).unwrap();
        let initrd = gzip_initrd(5000);
        let layout = load(&ram, &img, &initrd, b"console=ttyS0", 1).unwrap();
        assert_eq!(layout.format, "bzImage");
        assert_eq!(layout.protocol_version.as_deref(), Some("2.15"));
        assert_eq!(
            layout.kernel,
            Region {
                address: 0x20_0000,
                size: 0x400
            }
        );
        assert_eq!(layout.entry, 0x20_0200);
        assert_eq!(
            layout.footprint,
            Region {
                address: 0x20_0000,
                size: 0x10_0000
            }
        );
        let r = layout.initrd.unwrap();
        assert_eq!(r.address, ((64 << 20) - 5000) & !0xfff);
        assert_eq!(r.size, 5000);
        assert_eq!(layout.cmdline.size, 14);
        assert_eq!(read_u32(&ram, ZERO_PAGE_ADDR + 0x228), CMDLINE_ADDR as u32);
        assert_eq!(read_u32(&ram, ZERO_PAGE_ADDR + 0x218), r.address as u32);
        assert_eq!(read_u32(&ram, ZERO_PAGE_ADDR + 0x21c), 5000);
        let mut line = [0u8; 14];
        ram.read(CMDLINE_ADDR, &mut line).unwrap();
        assert_eq!(&line, b"console=ttyS0\0");
        let mut first = [0u8; 1];
        ram.read(0x20_0000, &mut first).unwrap();
        assert_eq!(first[0], 0xf4);
        ram.read(r.address + 4999, &mut first).unwrap();
        assert_eq!(first[0], 0xab);
    }

    #[test]
    fn writes_the_acpi_tables_and_the_mp_table_for_every_cpu() {
        let img = tiny_bzimage(&[0xf4; 0x400]);
        let ram = GuestRam::new(64 << 20).unwrap();
        load(&ram, &img, &[], b"", 3).unwrap();
        let mut rsdp_addr = [0u8; 8];
        ram.read(ZERO_PAGE_ADDR + 0x070, &mut rsdp_addr).unwrap();
        let rsdp_addr = u64::from_le_bytes(rsdp_addr);
        assert_eq!(rsdp_addr, acpi::RSDP_ADDR);
        for (address, table) in acpi::build_with_reset_vector(3).unwrap() {
            let mut got = vec![0u8; table.len()];
            ram.read(address, &mut got).unwrap();
            assert_eq!(got, table, "table at {address:#x}");
        }
        let mut mp = [0u8; 4];
        ram.read(mptable::MPTABLE_START, &mut mp).unwrap();
        assert_eq!(&mp, b"_MP_");
        // Both tables are in memory the e820 map reserves.
        let e820 = zero_page::e820_map(64 << 20);
        for at in [
            acpi::RSDP_ADDR,
            acpi::ACPI_AREA_END - 1,
            mptable::MPTABLE_START,
        ] {
            let e = e820.iter().find(|e| at >= e.addr && at < e.addr + e.size);
            assert_eq!(e.map(|e| e.kind), Some(zero_page::E820_RESERVED), "{at:#x}");
        }

        // More CPUs than an MP table holds: ACPI alone describes them.
        let ram = GuestRam::new(64 << 20).unwrap();
        load(&ram, &img, &[], b"", MAX_MPTABLE_CPUS + 1).unwrap();
        ram.read(mptable::MPTABLE_START, &mut mp).unwrap();
        assert_eq!(mp, [0; 4]);
        // Too many for ACPI: refused before anything is written.
        let ram = GuestRam::new(64 << 20).unwrap();
        let e = load(&ram, &img, &[], b"", acpi::MAX_ACPI_CPUS + 1).unwrap_err();
        assert!(
            matches!(e, BootError::Acpi(acpi::AcpiError::CpuCount(255))),
            "{e}"
        );
        assert_eq!(read_u32(&ram, ZERO_PAGE_ADDR + 0x202), 0);
    }

    #[test]
    fn a_fixed_kernel_loads_at_1mib_and_claims_its_runtime_area() {
        let mut img = tiny_bzimage(&[0xf4; 0x400]);
        img[0x234] = 0;
        put(&mut img, 0x258, &0x100_0000u64.to_le_bytes());
        let k = parse(&img).unwrap();
        let p = place(&k).unwrap();
        assert_eq!(p.kernel.address, 0x10_0000);
        assert_eq!(p.entry, 0x10_0200);
        assert_eq!(
            p.footprint,
            Region {
                address: 0x10_0000,
                size: 0x100_0000
            }
        );
    }

    #[test]
    fn refuses_what_does_not_fit_with_the_reason() {
        let img = tiny_bzimage(&[0xf4; 0x400]);
        let ram = GuestRam::new(2 << 20).unwrap();
        let e = load(&ram, &img, &[], b"", 1).unwrap_err();
        assert!(
            matches!(
                &e,
                BootError::Linux(LinuxError::DoesNotFit {
                    start: 0x20_0000,
                    end: 0x30_0000,
                    low_end: 0x20_0000,
                    ..
                })
            ),
            "{e}"
        );
        assert!(e.to_string().ends_with("give the VM at least 3 MiB"), "{e}");
        // Nothing was written.
        assert_eq!(read_u32(&ram, ZERO_PAGE_ADDR + 0x202), 0);

        let mut huge = img.clone();
        put(&mut huge, 0x260, &0xffff_f000u32.to_le_bytes());
        let e = load(&GuestRam::new(64 << 20).unwrap(), &huge, &[], b"", 1).unwrap_err();
        assert!(
            matches!(e, BootError::Linux(LinuxError::PastMmioGap { .. })),
            "{e}"
        );

        let ram = GuestRam::new(8 << 20).unwrap();
        let e = load(&ram, &img, &gzip_initrd(9 << 20), b"", 1).unwrap_err();
        assert!(
            matches!(
                e,
                BootError::Linux(LinuxError::InitrdLargerThanRam {
                    len: 0x90_0000,
                    ram_size: 0x80_0000
                })
            ),
            "{e}"
        );
        let e = load(&ram, &img, &gzip_initrd(6 << 20), b"", 1).unwrap_err();
        assert!(
            matches!(
                e,
                BootError::Linux(LinuxError::InitrdDoesNotFit {
                    kernel_end: 0x30_0000,
                    top: 0x80_0000,
                    ..
                })
            ),
            "{e}"
        );
        let e = load(&ram, &img, &vec![0; 6 << 20], b"", 1).unwrap_err();
        assert!(
            matches!(e, BootError::Initrd(InitrdError::AllZero(_))),
            "{e}"
        );
        let e = load(
            &ram,
            &img,
            &crate::boot::initrd::tests::tiny_cpio()[..200],
            b"",
            1,
        );
        assert!(matches!(e, Err(BootError::Initrd(_))), "{e:?}");

        let e = load(&ram, &img, &[], &[b'x'; 256], 1).unwrap_err();
        assert!(
            matches!(
                e,
                BootError::Linux(LinuxError::CmdlineTooLong {
                    len: 256,
                    cmdline_size: 255
                })
            ),
            "{e}"
        );
        assert!(load(&ram, &img, &[], &[b'x'; 255], 1).is_ok());
        let e = load(&ram, &img, &[], b"a\0b", 1).unwrap_err();
        assert!(matches!(e, BootError::Linux(LinuxError::CmdlineNul)), "{e}");
    }

    #[test]
    fn initrd_stays_below_initrd_addr_max() {
        let mut img = tiny_bzimage(&[0xf4; 0x400]);
        put(&mut img, 0x22c, &0x0200_0fffu32.to_le_bytes());
        let k = parse(&img).unwrap();
        let layout = plan(&k, 256 << 20, 0x1800, b"").unwrap();
        let r = layout.initrd.unwrap();
        assert_eq!(r.address, 0x0200_1000 - 0x2000);
        assert!(r.address + r.size <= 0x0200_1000);
    }

    #[test]
    fn loads_a_vmlinux_style_elf_with_a_physical_entry() {
        // Segments linked at a high virtual address, entry given physically.
        let mut img = tiny_elf(0x100_0000, &[0xf4; 16]);
        let ph = 64;
        img[ph + 16..ph + 24].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
        let ram = GuestRam::new(32 << 20).unwrap();
        let layout = load(&ram, &img, &gzip_initrd(30), b"root=/dev/vda", 1).unwrap();
        assert_eq!(layout.format, "elf");
        assert_eq!(layout.entry, 0x100_0000);
        assert_eq!(read_u32(&ram, ZERO_PAGE_ADDR + 0x238), 13);
        // A virtual entry is translated through its segment.
        img[24..32].copy_from_slice(&0xffff_ffff_8100_0004u64.to_le_bytes());
        assert_eq!(
            plan(&parse(&img).unwrap(), 32 << 20, 0, b"").unwrap().entry,
            0x100_0004
        );
        // Segments in low memory are refused.
        let low = tiny_elf(0x8_0000, &[0xf4]);
        let e = load(&ram, &low, &[], b"", 1).unwrap_err();
        assert!(
            matches!(
                e,
                BootError::Linux(LinuxError::BelowOneMib {
                    start: 0x8_0000,
                    ..
                })
            ),
            "{e}"
        );
    }

    #[test]
    fn boot_segments_are_what_the_protocol_asks() {
        let s = linux_sregs(kvm_sregs::default());
        assert_eq!(
            (s.cs.selector, s.cs.l, s.cs.type_, s.cs.dpl),
            (0x10, 1, 0xb, 0)
        );
        assert_eq!(
            (s.ds.selector, s.ss.selector, s.es.selector),
            (0x18, 0x18, 0x18)
        );
        assert_eq!((s.ds.type_, s.ds.limit, s.ds.base), (3, 0xffff_ffff, 0));
        assert_eq!((s.tr.type_, s.tr.base), (0xb, TSS_ADDR));
        assert_eq!(s.gdt.base, LINUX_GDT_ADDR);
        assert_ne!(s.efer & (1 << 10), 0, "long mode active");
        let r = linux_regs(0x20_0200, ZERO_PAGE_ADDR);
        assert_eq!(
            (r.rip, r.rsi, r.rflags & (1 << 9)),
            (0x20_0200, ZERO_PAGE_ADDR, 0)
        );
    }

    #[test]
    fn inspect_explains_bad_and_good_images() {
        let good = inspect(&tiny_bzimage(&[0xf4; 0x400]));
        assert!(good.loadable, "{:?}", good.problem);
        assert_eq!(good.min_memory_bytes, Some(3 << 20));
        let info = good.bz_image.unwrap();
        assert_eq!(
            info.xloadflags,
            ["XLF_KERNEL_64", "XLF_CAN_BE_LOADED_ABOVE_4G"]
        );
        assert_eq!(info.kernel_version.as_deref(), Some("tiny"));
        let mut img = tiny_bzimage(&[0xf4; 0x400]);
        put(&mut img, 0x236, &[0, 0]);
        let bad = inspect(&img);
        assert!(!bad.loadable);
        assert!(bad.problem.unwrap().contains("XLF_KERNEL_64"));
        assert_eq!(bad.bz_image.unwrap().header.xloadflags, 0);
        let elf = inspect(&tiny_elf(0x10_0000, &[0xf4]));
        assert_eq!(elf.format, "elf");
        assert_eq!(elf.elf.unwrap().segments[0].flags, "R-X");
        let junk = inspect(b"hello");
        assert_eq!((junk.format, junk.loadable), ("unknown", false));
    }

    #[test]
    fn never_panics_on_mutated_kernels() {
        let base = tiny_bzimage(&[0xf4; 0x400]);
        let mut rng = crate::test_rng::XorShift::new(0x1234_5678_9abc_def1);
        let mut next = || rng.next_u64();
        for _ in 0..20_000 {
            let mut img = base.clone();
            for _ in 0..1 + next() % 4 {
                let r = next();
                let pos = 0x1f1 + (r as usize % (0x270 - 0x1f1));
                img[pos] = (r >> 32) as u8;
            }
            let _ = inspect(&img);
            if let Ok(k) = parse(&img) {
                let _ = plan(&k, 64 << 20, next() % (80 << 20), b"console=ttyS0");
            }
        }
    }
}
