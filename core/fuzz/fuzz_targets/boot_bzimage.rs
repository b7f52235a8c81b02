//! bzImage (and vmlinux ELF) parsing and placement: the setup header's
//! fields, the protected-mode part, where the kernel, the initrd and the
//! command line go in a RAM size the input picks.
#![no_main]

use denovisor_core::boot::linux;
use denovisor_fuzz::{fuzz_target, Input};

fuzz_target!(|data| {
    let mut input = Input::new(data);
    let ram_mib = input.u16() as u64 % 4096 + 1;
    let initrd_len = input.u32() as u64;
    let cmdline_len = input.u16() as usize % 4096;
    let kernel = input.rest();
    if let Ok(k) = linux::parse(kernel) {
        let cmdline = vec![b'a'; cmdline_len];
        let _ = linux::plan(&k, ram_mib << 20, initrd_len, &cmdline);
    }
    let _ = linux::inspect(kernel);
});
