//! virtio-blk: request parsing (header, data segments, status byte) and
//! execution against a small disk image, over an arbitrary guest RAM image
//! and queue state, plus configuration space reads.
#![no_main]

use std::sync::OnceLock;

use denovisor_core::virtio::block::{Block, BlockConfig, QUEUE_SIZE};
use denovisor_core::virtio::{Interrupt, VirtioDevice};
use denovisor_fuzz::{fuzz_target, load_image, queue, ram, Input, QUEUE_HEADER};

/// The disk: 64 KiB in a temporary file, opened once per process.
fn disk() -> &'static (Block, Interrupt) {
    static DISK: OnceLock<(Block, Interrupt)> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("denovisor-fuzz-{}.img", std::process::id()));
        let file = std::fs::File::create(&path).expect("creating the fuzz disk");
        file.set_len(64 << 10).expect("sizing the fuzz disk");
        let block = Block::open(BlockConfig {
            path: path.display().to_string(),
            readonly: false,
            serial: "fuzz".into(),
            rate_limiter: None,
        })
        .expect("opening the fuzz disk");
        // The open file keeps the image; the name is not needed any more.
        let _ = std::fs::remove_file(&path);
        (block, Interrupt::detached(1))
    })
}

fuzz_target!(|data| {
    let (block, interrupt) = disk();
    let mut input = Input::new(data);
    let features = input.u64();
    let config_at = input.u16();
    let mut header = Input::new(input.bytes(QUEUE_HEADER));
    let mem = ram();
    load_image(&mem, input.rest());
    let mut config = [0u8; 8];
    block.read_config(config_at as u64, &mut config[..(config_at as usize % 9)]);
    if let Some(mut q) = queue(&mut header, 0, QUEUE_SIZE) {
        block.serve_for_fuzz(&mem, &mut q, features & block.features(), interrupt);
    }
});
