//! The bzImage format of x86 Linux kernels (Documentation/arch/x86/boot.rst): a
//! boot sector and `setup_sects` sectors of real-mode setup code carrying the boot
//! protocol's setup header at 0x1f1, then the protected-mode kernel (the
//! decompressor and its compressed payload), whose 64-bit entry `startup_64` sits
//! 0x200 bytes into it.
//!
//! [`read_header`] decodes the header as it is (for `inspect`), [`parse`] also
//! validates everything the 64-bit boot protocol relies on and refuses anything
//! else with a message that names the field. Neither touches guest memory; placing
//! the kernel is `boot::linux`'s job.

use serde::Serialize;
use thiserror::Error;

use super::bytes::{u16_at, u32_at, u64_at, u8_at};

/// Where the setup header starts in the file (and in `boot_params`).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// `boot_params` has room for the setup header up to here (`edd_mbr_sig_buffer`
/// follows), so no header is copied beyond it.
pub const SETUP_HEADER_MAX_END: usize = 0x290;
/// `"HdrS"`, little-endian, at 0x202.
pub const HEADER_MAGIC: u32 = 0x5372_6448;
/// The boot sector signature at 0x1fe.
pub const BOOT_FLAG: u16 = 0xaa55;
/// The oldest protocol with `xloadflags` (and so a declared 64-bit entry): 2.12.
pub const MIN_PROTOCOL_VERSION: u16 = 0x020c;
/// The first protocol with `kernel_info_offset`: 2.15.
const KERNEL_INFO_PROTOCOL_VERSION: u16 = 0x020f;
/// Offset of `startup_64` from the start of the protected-mode kernel.
pub const STARTUP_64_OFFSET: u64 = 0x200;
/// Where a bzImage's protected-mode kernel goes when it is not relocatable.
pub const DEFAULT_LOAD_ADDRESS: u64 = 0x10_0000;

/// `loadflags`: the protected-mode code is loaded at 0x100000 (a bzImage).
pub const LOADED_HIGH: u8 = 1 << 0;
/// `loadflags`: set by the kernel itself when KASLR chose its address.
pub const KASLR_FLAG: u8 = 1 << 1;
/// `loadflags`: suppress early messages.
pub const QUIET_FLAG: u8 = 1 << 5;
/// `loadflags`: obsolete (32-bit entry only: do not reload segment registers).
pub const KEEP_SEGMENTS: u8 = 1 << 6;
/// `loadflags`: `heap_end_ptr` is valid (the real-mode setup code's heap).
pub const CAN_USE_HEAP: u8 = 1 << 7;

/// `xloadflags`: the kernel has the 64-bit entry point at +0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// `xloadflags`: kernel, initrd and boot data may sit above 4 GiB.
pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
/// `xloadflags`: 32-bit EFI handover entry at `handover_offset`.
pub const XLF_EFI_HANDOVER_32: u16 = 1 << 2;
/// `xloadflags`: 64-bit EFI handover entry at `handover_offset + 0x200`.
pub const XLF_EFI_HANDOVER_64: u16 = 1 << 3;

/// The file must hold at least the protocol 2.12 header (through `handover_offset`).
const MIN_HEADER_END: usize = 0x268;
/// ... and, for 2.15 and later, `kernel_info_offset` too.
const HEADER_END_2_15: usize = 0x26c;
const SECTOR: u64 = 512;

/// The setup header's fields, as stored in the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SetupHeader {
    /// Setup sectors after the boot sector (0 means 4).
    pub setup_sects: u8,
    /// Protected-mode code size in 16-byte paragraphs.
    pub syssize: u32,
    /// 0xaa55.
    pub boot_flag: u16,
    /// The x86 jump at 0x200 (`0xeb`, then the header's length - 0x202 + 0x200).
    pub jump: u16,
    /// `"HdrS"` as a little-endian u32.
    pub header: u32,
    /// Boot protocol version (major << 8 | minor).
    pub version: u16,
    /// Offset of the kernel version string, minus 0x200.
    pub kernel_version_offset: u16,
    /// `loadflags`.
    pub loadflags: u8,
    /// The 32-bit entry's address as linked.
    pub code32_start: u32,
    /// The highest address the initrd may occupy (inclusive).
    pub initrd_addr_max: u32,
    /// Alignment a relocatable kernel needs.
    pub kernel_alignment: u32,
    /// Nonzero when the kernel may be loaded anywhere `kernel_alignment` allows.
    pub relocatable_kernel: u8,
    /// log2 of the smallest alignment the kernel tolerates.
    pub min_alignment: u8,
    /// `xloadflags`.
    pub xloadflags: u16,
    /// The longest command line, not counting the NUL.
    pub cmdline_size: u32,
    /// The hardware subarchitecture (0 for a PC).
    pub hardware_subarch: u32,
    /// Offset of the compressed payload from the protected-mode kernel's start.
    pub payload_offset: u32,
    /// Length of the compressed payload.
    pub payload_length: u32,
    /// The preferred load address of a relocatable kernel (where a
    /// non-relocatable one moves itself).
    pub pref_address: u64,
    /// Bytes of contiguous memory the kernel needs from its runtime start.
    pub init_size: u32,
    /// Offset of the EFI handover entry.
    pub handover_offset: u32,
    /// Offset of `kernel_info` (2.15 and later; 0 before).
    pub kernel_info_offset: u32,
}

/// A validated bzImage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BzImage {
    /// Its setup header.
    pub header: SetupHeader,
    /// File offset of the protected-mode kernel: the boot sector and the setup
    /// sectors come before it.
    pub kernel_offset: u64,
    /// Bytes of protected-mode kernel (to the end of the file).
    pub kernel_size: u64,
    /// Where the setup header ends in the file (0x202 + the jump's offset byte,
    /// at most [`SETUP_HEADER_MAX_END`]): the bytes `0x1f1..header_end` are
    /// copied into `boot_params`.
    pub header_end: usize,
    /// The kernel's version string, when it has a readable one.
    pub kernel_version: Option<String>,
}

/// Whether `bytes` carry a boot protocol setup header (the `"HdrS"` magic).
pub fn is_bzimage(bytes: &[u8]) -> bool {
    bytes.len() >= 0x206 && u32_at(bytes, 0x202) == HEADER_MAGIC
}

/// Why a file is not a bzImage the 64-bit boot protocol can load. Each
/// message names the header field at fault (displayed after `image: `).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BzImageError {
    /// No setup header magic
    #[error("not a bzImage: no \"HdrS\" setup header magic at offset 0x202")]
    NoMagic,
    /// Too short for the 2.12 header
    #[error("bzImage is truncated: {0} bytes, the protocol 2.12 setup header alone needs {MIN_HEADER_END:#x}")]
    Truncated(usize),
    /// The boot sector signature is wrong
    #[error("boot_flag at 0x1fe is {0:#06x}, not {BOOT_FLAG:#06x}")]
    BootFlag(u16),
    /// The protocol is older than 2.12 or not 2.x
    #[error("boot protocol version {} ({0:#06x}) is not supported: the 64-bit entry needs 2.12 or later (2.x)", version_string(*.0))]
    Version(u16),
    /// The jump at 0x200 is not a short jmp
    #[error(
        "jump at 0x200 is {0:#04x}, not a short jmp (0xeb), so the setup header's end is unknown"
    )]
    JumpOpcode(u8),
    /// The jump ends the header before the protocol's fields
    #[error("jump at 0x200 ends the setup header at {end:#x}, before the protocol {} fields end at {needed:#x}", version_string(*.version))]
    HeaderEnd {
        /// Where the jump says the header ends.
        end: usize,
        /// Where the protocol's fields end.
        needed: usize,
        /// The protocol version.
        version: u16,
    },
    /// The setup sectors reach the end of the file
    #[error("setup_sects {setup_sects} puts the protected-mode kernel at {offset:#x}, at or past the end of the {len}-byte file (truncated?)")]
    SetupSects {
        /// `setup_sects` as stored.
        setup_sects: u8,
        /// Where the protected-mode kernel would start.
        offset: u64,
        /// The file's size.
        len: u64,
    },
    /// A zImage
    #[error("loadflags {0:#04x} lacks LOADED_HIGH: a zImage (loaded at 0x10000) is not supported")]
    NotLoadedHigh(u8),
    /// No 64-bit entry point
    #[error("xloadflags {0:#06x} lacks XLF_KERNEL_64: the kernel has no 64-bit entry point")]
    No64BitEntry(u16),
    /// `syssize` is 0
    #[error("syssize is 0: the header declares no protected-mode kernel")]
    SyssizeZero,
    /// `syssize` claims more than the file holds
    #[error("syssize {syssize:#x} declares {claimed} bytes of protected-mode kernel, but only {available} follow the setup sectors (truncated?)")]
    Syssize {
        /// `syssize` as stored.
        syssize: u32,
        /// The bytes it declares.
        claimed: u64,
        /// The bytes after the setup sectors.
        available: u64,
    },
    /// The protected-mode kernel is too short for `startup_64`
    #[error("the protected-mode kernel is {0} bytes, too short to hold the 64-bit entry at +{STARTUP_64_OFFSET:#x}")]
    TooShort(u64),
    /// A relocatable kernel's alignment is not a power of two of at least 4 KiB
    #[error("kernel_alignment {0:#x} is not a power of two of at least 4 KiB")]
    KernelAlignment(u32),
    /// `pref_address` is not aligned to `kernel_alignment`
    #[error("pref_address {pref_address:#x} is not a multiple of kernel_alignment {alignment:#x}")]
    PrefAddressAlignment {
        /// `pref_address`.
        pref_address: u64,
        /// `kernel_alignment`.
        alignment: u32,
    },
    /// `pref_address` is below 1 MiB
    #[error("pref_address {0:#x} is below 1 MiB, where the protected-mode kernel cannot run")]
    PrefAddressLow(u64),
    /// `init_size` is 0
    #[error("init_size is 0: the kernel declares no memory to decompress into")]
    InitSizeZero,
    /// `init_size` cannot hold the protected-mode kernel
    #[error("init_size {init_size:#x} is smaller than the protected-mode kernel it must hold ({claimed:#x} bytes)")]
    InitSizeSmall {
        /// `init_size`.
        init_size: u32,
        /// The protected-mode kernel's declared size.
        claimed: u64,
    },
    /// The payload runs past the kernel
    #[error("payload_offset {offset:#x} + payload_length {length:#x} run past the {kernel_size}-byte protected-mode kernel")]
    Payload {
        /// `payload_offset`.
        offset: u32,
        /// `payload_length`.
        length: u32,
        /// The protected-mode kernel's size.
        kernel_size: u64,
    },
    /// The EFI handover entry is past the kernel
    #[error(
        "handover_offset {offset:#x} points past the {kernel_size}-byte protected-mode kernel"
    )]
    HandoverOffset {
        /// `handover_offset`.
        offset: u32,
        /// The protected-mode kernel's size.
        kernel_size: u64,
    },
    /// `kernel_info` is past the kernel
    #[error(
        "kernel_info_offset {offset:#x} points past the {kernel_size}-byte protected-mode kernel"
    )]
    KernelInfoOffset {
        /// `kernel_info_offset`.
        offset: u32,
        /// The protected-mode kernel's size.
        kernel_size: u64,
    },
}

/// The result of decoding a bzImage.
pub type Result<T> = std::result::Result<T, BzImageError>;

/// Formats a protocol version the way boot.rst writes it (`2.15`).
pub fn version_string(version: u16) -> String {
    format!("{}.{:02}", version >> 8, version & 0xff)
}

/// Decodes the setup header without judging it. Fails only when there is no
/// header to decode: no `"HdrS"` magic, or a file too short to hold the
/// protocol 2.12 fields.
pub fn read_header(bytes: &[u8]) -> Result<SetupHeader> {
    if !is_bzimage(bytes) {
        return Err(BzImageError::NoMagic);
    }
    if bytes.len() < MIN_HEADER_END {
        return Err(BzImageError::Truncated(bytes.len()));
    }
    let version = u16_at(bytes, 0x206);
    let kernel_info_offset = if version >= KERNEL_INFO_PROTOCOL_VERSION && bytes.len() >= 0x26c {
        u32_at(bytes, 0x268)
    } else {
        0
    };
    Ok(SetupHeader {
        setup_sects: u8_at(bytes, 0x1f1),
        syssize: u32_at(bytes, 0x1f4),
        boot_flag: u16_at(bytes, 0x1fe),
        jump: u16_at(bytes, 0x200),
        header: u32_at(bytes, 0x202),
        version,
        kernel_version_offset: u16_at(bytes, 0x20e),
        loadflags: u8_at(bytes, 0x211),
        code32_start: u32_at(bytes, 0x214),
        initrd_addr_max: u32_at(bytes, 0x22c),
        kernel_alignment: u32_at(bytes, 0x230),
        relocatable_kernel: u8_at(bytes, 0x234),
        min_alignment: u8_at(bytes, 0x235),
        xloadflags: u16_at(bytes, 0x236),
        cmdline_size: u32_at(bytes, 0x238),
        hardware_subarch: u32_at(bytes, 0x23c),
        payload_offset: u32_at(bytes, 0x248),
        payload_length: u32_at(bytes, 0x24c),
        pref_address: u64_at(bytes, 0x258),
        init_size: u32_at(bytes, 0x260),
        handover_offset: u32_at(bytes, 0x264),
        kernel_info_offset,
    })
}

/// The version string the header points at (NUL-terminated, inside the setup
/// sectors), when it is printable ASCII.
fn kernel_version(bytes: &[u8], h: &SetupHeader, setup_size: u64) -> Option<String> {
    if h.kernel_version_offset == 0 {
        return None;
    }
    let start = 0x200 + h.kernel_version_offset as usize;
    let end = (setup_size as usize).min(bytes.len());
    let text = bytes.get(start..end)?;
    let len = text.iter().take(256).position(|&c| c == 0)?;
    let text = &text[..len];
    (!text.is_empty() && text.iter().all(|&c| (0x20..0x7f).contains(&c)))
        .then(|| String::from_utf8_lossy(text).into_owned())
}

/// Parses and validates a bzImage for the 64-bit boot protocol.
pub fn parse(bytes: &[u8]) -> Result<BzImage> {
    let h = read_header(bytes)?;
    let len = bytes.len() as u64;
    if h.boot_flag != BOOT_FLAG {
        return Err(BzImageError::BootFlag(h.boot_flag));
    }
    if h.version < MIN_PROTOCOL_VERSION || h.version >> 8 != 2 {
        return Err(BzImageError::Version(h.version));
    }
    // The jump at 0x200 skips the header; its target is where the header ends.
    let [opcode, displacement] = h.jump.to_le_bytes();
    if opcode != 0xeb {
        return Err(BzImageError::JumpOpcode(opcode));
    }
    let header_end = 0x202 + displacement as usize;
    let needed = if h.version >= KERNEL_INFO_PROTOCOL_VERSION {
        HEADER_END_2_15
    } else {
        MIN_HEADER_END
    };
    if header_end < needed {
        return Err(BzImageError::HeaderEnd {
            end: header_end,
            needed,
            version: h.version,
        });
    }
    let header_end = header_end.min(SETUP_HEADER_MAX_END);
    let sects = if h.setup_sects == 0 {
        4
    } else {
        h.setup_sects as u64
    };
    let kernel_offset = (sects + 1) * SECTOR;
    if kernel_offset >= len {
        return Err(BzImageError::SetupSects {
            setup_sects: h.setup_sects,
            offset: kernel_offset,
            len,
        });
    }
    let kernel_size = len - kernel_offset;
    if h.loadflags & LOADED_HIGH == 0 {
        return Err(BzImageError::NotLoadedHigh(h.loadflags));
    }
    if h.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BzImageError::No64BitEntry(h.xloadflags));
    }
    let claimed = h.syssize as u64 * 16;
    if h.syssize == 0 {
        return Err(BzImageError::SyssizeZero);
    }
    if claimed > kernel_size {
        return Err(BzImageError::Syssize {
            syssize: h.syssize,
            claimed,
            available: kernel_size,
        });
    }
    if kernel_size <= STARTUP_64_OFFSET {
        return Err(BzImageError::TooShort(kernel_size));
    }
    if h.relocatable_kernel != 0 {
        if !h.kernel_alignment.is_power_of_two() || h.kernel_alignment < 4096 {
            return Err(BzImageError::KernelAlignment(h.kernel_alignment));
        }
        if !h.pref_address.is_multiple_of(h.kernel_alignment as u64) {
            return Err(BzImageError::PrefAddressAlignment {
                pref_address: h.pref_address,
                alignment: h.kernel_alignment,
            });
        }
    }
    if h.pref_address < DEFAULT_LOAD_ADDRESS {
        return Err(BzImageError::PrefAddressLow(h.pref_address));
    }
    if h.init_size == 0 {
        return Err(BzImageError::InitSizeZero);
    }
    if (h.init_size as u64) < claimed {
        return Err(BzImageError::InitSizeSmall {
            init_size: h.init_size,
            claimed,
        });
    }
    if h.payload_length != 0 && h.payload_offset as u64 + h.payload_length as u64 > kernel_size {
        return Err(BzImageError::Payload {
            offset: h.payload_offset,
            length: h.payload_length,
            kernel_size,
        });
    }
    let handover = h.xloadflags & (XLF_EFI_HANDOVER_32 | XLF_EFI_HANDOVER_64) != 0;
    if handover && h.handover_offset as u64 + STARTUP_64_OFFSET >= kernel_size {
        return Err(BzImageError::HandoverOffset {
            offset: h.handover_offset,
            kernel_size,
        });
    }
    if h.kernel_info_offset as u64 >= kernel_size {
        return Err(BzImageError::KernelInfoOffset {
            offset: h.kernel_info_offset,
            kernel_size,
        });
    }
    let kernel_version = kernel_version(bytes, &h, kernel_offset);
    Ok(BzImage {
        header: h,
        kernel_offset,
        kernel_size,
        header_end,
        kernel_version,
    })
}

impl BzImage {
    /// The protected-mode kernel's bytes.
    pub fn protected_mode<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        &bytes[self.kernel_offset as usize..]
    }

    /// The setup header's bytes as `boot_params` takes them (`0x1f1..header_end`).
    pub fn header_bytes<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        &bytes[SETUP_HEADER_OFFSET..self.header_end]
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid bzImage: protocol 2.15, one setup sector, `pm` as the
    /// protected-mode kernel, relocatable at 2 MiB.
    pub fn tiny_bzimage(pm: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[0x1f1] = 1;
        b[0x1f4..0x1f8].copy_from_slice(&(pm.len() as u32 / 16).to_le_bytes());
        b[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        b[0x200] = 0xeb;
        b[0x201] = 0x6a; // header ends at 0x26c
        b[0x202..0x206].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes()); // version text at 0x300
        b[0x300..0x305].copy_from_slice(b"tiny\0");
        b[0x211] = LOADED_HIGH;
        b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        b[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
        b[0x234] = 1;
        b[0x235] = 21;
        b[0x236..0x238]
            .copy_from_slice(&(XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G).to_le_bytes());
        b[0x238..0x23c].copy_from_slice(&255u32.to_le_bytes());
        b[0x258..0x260].copy_from_slice(&0x20_0000u64.to_le_bytes());
        b[0x260..0x264].copy_from_slice(&0x10_0000u32.to_le_bytes());
        b.extend_from_slice(pm);
        b
    }

    pub fn put(b: &mut [u8], off: usize, value: &[u8]) {
        b[off..off + value.len()].copy_from_slice(value);
    }

    #[test]
    fn parses_a_valid_image() {
        let img = tiny_bzimage(&[0x90; 0x400]);
        let z = parse(&img).unwrap();
        assert_eq!(z.kernel_offset, 1024);
        assert_eq!(z.kernel_size, 0x400);
        assert_eq!(z.header_end, 0x26c);
        assert_eq!(z.header.version, 0x020f);
        assert_eq!(z.header.pref_address, 0x20_0000);
        assert_eq!(z.kernel_version.as_deref(), Some("tiny"));
        assert_eq!(z.header_bytes(&img).len(), 0x26c - 0x1f1);
        assert_eq!(version_string(0x020c), "2.12");
    }

    #[test]
    fn setup_sects_zero_means_four() {
        let mut img = tiny_bzimage(&[0x90; 0x400]);
        img[0x1f1] = 0;
        // Five sectors of setup, then the kernel: pad the setup part to 0xa00.
        let pm = img.split_off(1024);
        img.resize(5 * 512, 0);
        img.extend_from_slice(&pm);
        assert_eq!(parse(&img).unwrap().kernel_offset, 5 * 512);
    }

    /// Each mutation must be refused with its variant, whose message names `field`.
    #[test]
    fn refuses_bad_fields_by_name() {
        let good = tiny_bzimage(&[0x90; 0x400]);
        type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
        type Is = fn(&BzImageError) -> bool;
        let cases: Vec<(&str, Is, Mutation)> = vec![
            (
                "boot_flag",
                |e| matches!(e, BzImageError::BootFlag(0)),
                Box::new(|b| put(b, 0x1fe, &[0, 0])),
            ),
            (
                "version",
                |e| matches!(e, BzImageError::Version(_)),
                Box::new(|b| put(b, 0x206, &0x020bu16.to_le_bytes())),
            ),
            (
                "version",
                |e| matches!(e, BzImageError::Version(_)),
                Box::new(|b| put(b, 0x206, &0x0300u16.to_le_bytes())),
            ),
            (
                "jump",
                |e| {
                    matches!(
                        e,
                        BzImageError::JumpOpcode(_) | BzImageError::HeaderEnd { .. }
                    )
                },
                Box::new(|b| b[0x200] = 0xe9),
            ),
            (
                "jump",
                |e| {
                    matches!(
                        e,
                        BzImageError::JumpOpcode(_) | BzImageError::HeaderEnd { .. }
                    )
                },
                Box::new(|b| b[0x201] = 0x10),
            ),
            (
                "loadflags",
                |e| matches!(e, BzImageError::NotLoadedHigh(0)),
                Box::new(|b| b[0x211] = 0),
            ),
            (
                "xloadflags",
                |e| matches!(e, BzImageError::No64BitEntry(2)),
                Box::new(|b| put(b, 0x236, &[2, 0])),
            ),
            (
                "setup_sects",
                |e| {
                    matches!(
                        e,
                        BzImageError::SetupSects {
                            setup_sects: 200,
                            ..
                        }
                    )
                },
                Box::new(|b| b[0x1f1] = 200),
            ),
            (
                "syssize",
                |e| matches!(e, BzImageError::Syssize { .. } | BzImageError::SyssizeZero),
                Box::new(|b| put(b, 0x1f4, &0x1000u32.to_le_bytes())),
            ),
            (
                "syssize",
                |e| matches!(e, BzImageError::Syssize { .. } | BzImageError::SyssizeZero),
                Box::new(|b| put(b, 0x1f4, &[0, 0, 0, 0])),
            ),
            (
                "kernel_alignment",
                |e| matches!(e, BzImageError::KernelAlignment(0x30_0000)),
                Box::new(|b| put(b, 0x230, &0x30_0000u32.to_le_bytes())),
            ),
            (
                "pref_address",
                |e| {
                    matches!(
                        e,
                        BzImageError::PrefAddressAlignment { .. }
                            | BzImageError::PrefAddressLow(0x1000)
                    )
                },
                Box::new(|b| put(b, 0x258, &0x20_1000u64.to_le_bytes())),
            ),
            (
                "pref_address",
                |e| {
                    matches!(
                        e,
                        BzImageError::PrefAddressAlignment { .. }
                            | BzImageError::PrefAddressLow(0x1000)
                    )
                },
                Box::new(|b| {
                    b[0x234] = 0;
                    put(b, 0x258, &0x1000u64.to_le_bytes())
                }),
            ),
            (
                "init_size",
                |e| {
                    matches!(
                        e,
                        BzImageError::InitSizeZero | BzImageError::InitSizeSmall { .. }
                    )
                },
                Box::new(|b| put(b, 0x260, &[0, 0, 0, 0])),
            ),
            (
                "init_size",
                |e| {
                    matches!(
                        e,
                        BzImageError::InitSizeZero | BzImageError::InitSizeSmall { .. }
                    )
                },
                Box::new(|b| put(b, 0x260, &0x100u32.to_le_bytes())),
            ),
            (
                "payload_offset",
                |e| matches!(e, BzImageError::Payload { offset: 0x300, .. }),
                Box::new(|b| {
                    put(b, 0x248, &0x300u32.to_le_bytes());
                    put(b, 0x24c, &0x200u32.to_le_bytes())
                }),
            ),
            (
                "handover_offset",
                |e| matches!(e, BzImageError::HandoverOffset { offset: 0x300, .. }),
                Box::new(|b| {
                    put(
                        b,
                        0x236,
                        &(XLF_KERNEL_64 | XLF_EFI_HANDOVER_64).to_le_bytes(),
                    );
                    put(b, 0x264, &0x300u32.to_le_bytes())
                }),
            ),
            (
                "kernel_info_offset",
                |e| matches!(e, BzImageError::KernelInfoOffset { offset: 0x400, .. }),
                Box::new(|b| put(b, 0x268, &0x400u32.to_le_bytes())),
            ),
        ];
        for (field, is, mutate) in cases {
            let mut img = good.clone();
            mutate(&mut img);
            let e = parse(&img).unwrap_err();
            assert!(is(&e), "{field}: {e:?}");
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn refuses_truncated_and_foreign_files() {
        let img = tiny_bzimage(&[0x90; 0x400]);
        assert_eq!(
            parse(&img[..0x206]).unwrap_err(),
            BzImageError::Truncated(0x206)
        );
        assert_eq!(
            parse(&img[..0x300]).unwrap_err(),
            BzImageError::SetupSects {
                setup_sects: 1,
                offset: 0x400,
                len: 0x300
            }
        );
        assert!(matches!(
            parse(&img[..1024 + 0x100]),
            Err(BzImageError::Syssize {
                claimed: 0x400,
                available: 0x100,
                ..
            })
        ));
        assert_eq!(parse(b"\x7fELF").unwrap_err(), BzImageError::NoMagic);
        assert_eq!(parse(&[]).unwrap_err(), BzImageError::NoMagic);
    }

    #[test]
    fn never_panics_on_mutated_headers() {
        // Deterministic xorshift fuzzing: random bytes over the header, random
        // truncation. Every outcome is Ok or an error; never a panic.
        let base = tiny_bzimage(&[0x90; 0x400]);
        let mut rng = crate::test_rng::XorShift::new(0x2545_f491_4f6c_dd1d);
        let mut next = || rng.next_u64();
        let mut accepted = 0;
        for round in 0..50_000 {
            let mut img = base.clone();
            for _ in 0..1 + next() % 6 {
                let r = next();
                let pos = 0x1f1 + (r as usize % (0x270 - 0x1f1));
                img[pos] = (r >> 32) as u8;
            }
            if round % 4 == 0 {
                let cut = next() as usize % (img.len() + 1);
                img.truncate(cut);
            }
            if let Ok(z) = parse(&img) {
                accepted += 1;
                // What a valid parse promises holds.
                assert!(z.kernel_offset + z.kernel_size == img.len() as u64);
                assert!(z.header_end <= SETUP_HEADER_MAX_END);
                let _ = z.protected_mode(&img);
                let _ = z.header_bytes(&img);
            }
            let _ = read_header(&img);
        }
        assert!(accepted > 0, "the fuzzer never produced a valid image");
    }
}
