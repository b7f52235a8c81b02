//! ELF loading: program headers checked against guest RAM (and the VMM's
//! reserved low area), segments copied, the BSS left zero.
#![no_main]

use std::sync::OnceLock;

use denovisor_core::boot::elf;
use denovisor_core::memory::GuestRam;
use denovisor_fuzz::{fuzz_target, Input};

fuzz_target!(|data| {
    static RAM: OnceLock<GuestRam> = OnceLock::new();
    let ram = RAM.get_or_init(|| GuestRam::new(2 << 20).expect("mapping 2 MiB"));
    let mut input = Input::new(data);
    let reserve_low = input.u8() & 1 != 0;
    let bytes = input.rest();
    let _ = elf::load(ram, bytes, reserve_low);
});
