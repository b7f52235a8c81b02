//! The function mailbox page a guest writes: READY (its input and output
//! buffers, checked against guest RAM), DONE (outcome, exit status, output
//! lengths checked against READY's capacities) and its message.
#![no_main]

use denovisor_core::function::mailbox::{message, parse_done, parse_ready, state_of, Page};
use denovisor_fuzz::{fuzz_target, Input};

fuzz_target!(|data| {
    let mut input = Input::new(data);
    let ram_bytes = input.u32() as u64;
    let mut page: Page = [0u8; 4096];
    let b = input.rest();
    let n = b.len().min(page.len());
    page[..n].copy_from_slice(&b[..n]);
    let _ = state_of(&page);
    let _ = message(&page);
    let in_ram = |addr: u64, len: u64| addr.checked_add(len).is_some_and(|end| end <= ram_bytes);
    if let Ok(ready) = parse_ready(&page, in_ram) {
        // The same page read again as DONE, as the guest rewrites it.
        let _ = parse_done(&page, &ready);
    }
});
