//! The live-migration stream: frame headers (kind, length, CRC-32), pages
//! frames written into guest RAM, and the frame that ends a receive. Half
//! of the inputs are a raw stream; the other half are cut into frames with
//! valid checksums so the page batches behind them are reached.
#![no_main]

use std::io::Cursor;

use denovisor_core::migration::wire::{write_frame, FrameKind};
use denovisor_core::migration::{receive, write_batch};
use denovisor_fuzz::{fuzz_target, load_image, ram, Input};

fuzz_target!(|data| {
    let mut input = Input::new(data);
    let mode = input.u8();
    let mem = ram();
    load_image(&mem, &[]);
    if mode & 1 == 0 {
        let raw = input.rest();
        let _ = receive(&mut Cursor::new(raw), Some(&mem));
        let _ = write_batch(&mem, raw);
        return;
    }
    let mut stream = Vec::new();
    while !input.is_empty() {
        let kind = FrameKind::of(input.u8()).unwrap_or(FrameKind::Pages);
        let len = input.u16() as usize;
        let payload = input.bytes(len);
        if write_frame(&mut stream, kind, payload).is_err() {
            return;
        }
    }
    let _ = receive(&mut Cursor::new(&stream), Some(&mem));
    let _ = receive(&mut Cursor::new(&stream), None);
});
