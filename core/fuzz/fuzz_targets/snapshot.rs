//! Snapshot state files: the header, each section's framing and checksum,
//! and the JSON of every section (host CPU, config, vCPU and device state,
//! memory manifest) with their consistency checks. Half of the inputs are
//! taken raw; the other half are cut into five sections and framed with
//! valid checksums so the parsers behind the checksum are reached.
#![no_main]

use denovisor_core::snapshot::file::{decode_state, encode_state, Snapshot, SECTIONS};
use denovisor_fuzz::{fuzz_target, Input};

fuzz_target!(|data| {
    let mut input = Input::new(data);
    if input.u8() & 1 == 0 {
        let raw = input.rest();
        let _ = decode_state(raw);
        let _ = Snapshot::parse(raw);
        return;
    }
    let lens: [u16; 5] = [
        input.u16(),
        input.u16(),
        input.u16(),
        input.u16(),
        input.u16(),
    ];
    let payloads: Vec<&[u8]> = lens.iter().map(|&l| input.bytes(l as usize)).collect();
    let sections: Vec<(&str, &[u8])> = SECTIONS.iter().copied().zip(payloads).collect();
    let bytes = encode_state(&sections);
    let _ = Snapshot::parse(&bytes);
});
