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

use crate::error::{Error, Result};

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
            _ => Err(Error::arg(format!(
                "entry mode {value} is not one of 0 (real), 1 (long), 2 (user)"
            ))),
        }
    }

    /// Whether this mode runs with the VMM's boot structures in low memory.
    pub fn uses_boot_structures(self) -> bool {
        !matches!(self, EntryMode::Real)
    }
}
