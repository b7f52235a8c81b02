//! Getting a guest started without firmware: the guest-physical layout the VMM
//! reserves for its boot structures, the x86 CPU state for each entry mode, and the
//! image loaders (flat binaries, static ELF64 and Linux kernels by the 64-bit boot
//! protocol).

pub mod acpi;
mod bytes;
pub mod bzimage;
pub mod elf;
pub mod initrd;
pub mod layout;
pub mod linux;
pub mod mptable;
pub mod x86_64;
pub mod zero_page;

use thiserror::Error;

use crate::memory::{GuestRam, MemoryError};

/// What can go wrong getting a guest started: each loader's own error, and the
/// few checks of this module. Messages of malformed images start with
/// `image: `, as they always have at the CLI.
#[derive(Debug, Error)]
pub enum BootError {
    /// An entry mode the ABI does not define
    #[error("entry mode {0} is not one of 0 (real), 1 (long), 2 (user)")]
    EntryMode(u32),
    /// A flat image of no bytes
    #[error("image: the image is empty")]
    EmptyImage,
    /// RAM too small for the VMM's GDT, TSS and page tables
    #[error("image: the 64-bit entry modes need at least {:#x} bytes of RAM for the VMM's boot structures", layout::RESERVED_END)]
    NoRoomForBootStructures,
    /// A real-mode entry point above 1 MiB
    #[error("image: real-mode entry {0:#x} is above the 1 MiB real-mode address space")]
    RealModeEntry(u64),
    /// A malformed or misplaced ELF image
    #[error("image: {0}")]
    Elf(#[from] elf::ElfError),
    /// A malformed bzImage
    #[error("image: {0}")]
    BzImage(#[from] bzimage::BzImageError),
    /// An initrd the kernel would not accept
    #[error(transparent)]
    Initrd(#[from] initrd::InitrdError),
    /// A Linux kernel that cannot boot in this VM as asked
    #[error(transparent)]
    Linux(#[from] linux::LinuxError),
    /// ACPI tables that cannot be built or written
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// An MP table that cannot be built
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// Guest RAM refused a write
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// The result of a boot step.
pub type Result<T> = std::result::Result<T, BootError>;

/// Loads a flat binary at guest-physical `addr` after checking it fits (and,
/// with `reserve_low`, stays clear of the VMM's boot structures).
pub fn load_flat(ram: &GuestRam, image: &[u8], addr: u64, reserve_low: bool) -> Result<()> {
    if image.is_empty() {
        return Err(BootError::EmptyImage);
    }
    elf::check_placement(ram, "the image", addr, image.len() as u64, reserve_low)?;
    ram.write(addr, image)?;
    Ok(())
}

/// How the vCPU is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 16-bit real mode, as the CPU comes out of reset (CS:IP derived from the entry).
    Real,
    /// 64-bit long mode at CPL0, identity-mapped paging set up by the VMM.
    Long,
    /// 64-bit long mode at CPL3 with IOPL=3, so the program may use port I/O.
    User,
}

impl EntryMode {
    /// Decodes the ABI's numeric mode (0 real, 1 long, 2 user).
    pub fn from_abi(value: u32) -> Result<EntryMode> {
        match value {
            0 => Ok(EntryMode::Real),
            1 => Ok(EntryMode::Long),
            2 => Ok(EntryMode::User),
            _ => Err(BootError::EntryMode(value)),
        }
    }

    /// Whether this mode runs with the VMM's boot structures in low memory.
    pub fn uses_boot_structures(self) -> bool {
        !matches!(self, EntryMode::Real)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_images_are_checked_before_they_are_written() {
        let ram = GuestRam::new(2 << 20).unwrap();
        assert!(matches!(
            load_flat(&ram, &[], 0x10_0000, true),
            Err(BootError::EmptyImage)
        ));
        assert!(matches!(
            load_flat(&ram, &[0xf4], 0x1000, true),
            Err(BootError::Elf(elf::ElfError::Reserved { addr: 0x1000, .. }))
        ));
        assert!(matches!(
            load_flat(&ram, &[0xf4; 2], (2 << 20) - 1, false),
            Err(BootError::Elf(elf::ElfError::DoesNotFit { .. }))
        ));
        load_flat(&ram, &[0xf4], 0x1000, false).unwrap();
        assert!(matches!(
            EntryMode::from_abi(3),
            Err(BootError::EntryMode(3))
        ));
    }
}
