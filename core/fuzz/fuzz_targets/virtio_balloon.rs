//! virtio-balloon: inflate/deflate page frame lists, statistics and free
//! page reports, over an arbitrary guest RAM image and queue state.
#![no_main]

use denovisor_core::virtio::balloon;
use denovisor_fuzz::{acceptable, fuzz_target, load_image, queue, ram, Input, QUEUE_HEADER};

fuzz_target!(|data| {
    let mut input = Input::new(data);
    let features = input.u64() & (balloon::feature::STATS_VQ | balloon::feature::REPORTING);
    let kicks: [u8; 4] = input.array();
    let mut header = Input::new(input.bytes(4 * QUEUE_HEADER));
    let mem = ram();
    load_image(&mem, input.rest());
    let mut queues = Vec::new();
    for i in 0..4 {
        match queue(&mut header, i, 256) {
            Some(q) => queues.push(q),
            None => return,
        }
    }
    if !acceptable(&queues.iter().collect::<Vec<_>>()) {
        return;
    }
    let kicks: Vec<usize> = kicks
        .iter()
        .map(|&k| {
            if k == 0xff {
                usize::MAX
            } else {
                k as usize % 4
            }
        })
        .collect();
    let _ = balloon::serve_for_fuzz(&mem, queues, features, &kicks);
});
