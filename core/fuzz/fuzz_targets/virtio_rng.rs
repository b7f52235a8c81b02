//! virtio-rng: the request queue served over an arbitrary guest RAM image.
#![no_main]

use std::sync::OnceLock;

use denovisor_core::virtio::{rng, Interrupt};
use denovisor_fuzz::{fuzz_target, load_image, queue, ram, Input, QUEUE_HEADER};

fuzz_target!(|data| {
    static IRQ: OnceLock<Interrupt> = OnceLock::new();
    let interrupt = IRQ.get_or_init(|| Interrupt::detached(1));
    let mut input = Input::new(data);
    let mut header = Input::new(input.bytes(QUEUE_HEADER));
    let mem = ram();
    load_image(&mem, input.rest());
    if let Some(mut q) = queue(&mut header, 0, 256) {
        rng::serve_for_fuzz(&mut q, &mem, interrupt);
    }
});
