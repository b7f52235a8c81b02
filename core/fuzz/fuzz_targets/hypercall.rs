//! The hypercall port: a 4-byte out names a request block in guest RAM
//! whose number, arguments and buffers (console writes, reports, counters)
//! come from an arbitrary guest RAM image.
#![no_main]

use std::sync::OnceLock;

use denovisor_core::devices::serial::ConsoleSink;
use denovisor_core::hypercall::Hypercalls;
use denovisor_fuzz::{fuzz_target, load_image, ram, Input};

fuzz_target!(|data| {
    static CALLS: OnceLock<Hypercalls> = OnceLock::new();
    let calls = CALLS.get_or_init(|| Hypercalls::new(ConsoleSink::default()));
    let mut input = Input::new(data);
    let width = input.u8() as usize % 6;
    let out = input.array::<4>();
    let mem = ram();
    load_image(&mem, input.rest());
    let _ = calls.handle(&mem, &out[..width.min(4)]);
    let _ = calls.report();
    calls.clear_report();
    let _ = calls.irq_counters(&mem);
});
