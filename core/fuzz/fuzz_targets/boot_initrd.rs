//! initrd checks (cpio newc/odc, compressed formats) and its placement next
//! to a fixed small kernel in a RAM size the input picks.
#![no_main]

use std::sync::OnceLock;

use denovisor_core::boot::linux;
use denovisor_fuzz::{fuzz_target, Input};

/// A minimal valid vmlinux-style ELF: one segment at 16 MiB.
fn kernel() -> &'static [u8] {
    static K: OnceLock<Vec<u8>> = OnceLock::new();
    K.get_or_init(|| {
        let mut b = vec![0u8; 0x78 + 16];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // 64-bit
        b[5] = 1; // little-endian
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // entry
        b[32..40].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 0x40;
        b[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        b[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes()); // offset
        b[ph + 16..ph + 24].copy_from_slice(&0x100_0000u64.to_le_bytes()); // vaddr
        b[ph + 24..ph + 32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // paddr
        b[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes()); // filesz
        b[ph + 40..ph + 48].copy_from_slice(&16u64.to_le_bytes()); // memsz
        b
    })
}

fuzz_target!(|data| {
    let mut input = Input::new(data);
    let ram_mib = input.u16() as u64 % 4096 + 1;
    let cmdline_len = input.u16() as usize % 4096;
    let initrd = input.rest();
    let cmdline = vec![b'x'; cmdline_len];
    let _ = linux::check(kernel(), ram_mib << 20, initrd, &cmdline);
});
