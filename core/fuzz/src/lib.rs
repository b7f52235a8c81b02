//! What the fuzz targets share: the libFuzzer entry point macro, a reader
//! that turns the input into numbers, and a small guest (RAM image and split
//! virtqueues) laid out from the input.
//!
//! A virtio target's input is a fixed-size header (features, per queue: its
//! size, where its rings are, its positions) followed by the guest RAM image,
//! copied at guest-physical 0. With the default layout queue `q`'s rings sit
//! at `q * QUEUE_STRIDE` inside that image, so the fuzzer writes descriptors,
//! avail entries and the buffers they point at directly.

use std::sync::OnceLock;

use denovisor_core::memory::GuestRam;
use denovisor_core::virtio::used_ring_overlaps_avail_ring;
use virtio_queue::{Queue, QueueT};

/// Defines `LLVMFuzzerTestOneInput` around `|data: &[u8]| body`.
#[macro_export]
macro_rules! fuzz_target {
    (|$data:ident| $body:block) => {
        /// libFuzzer's entry point: one input.
        ///
        /// # Safety
        /// `ptr` points at `len` readable bytes (libFuzzer's input) for the call.
        #[no_mangle]
        pub unsafe extern "C" fn LLVMFuzzerTestOneInput(ptr: *const u8, len: usize) -> i32 {
            let input: &[u8] = if len == 0 {
                &[]
            } else {
                // SAFETY: libFuzzer passes a buffer of `len` readable bytes that
                // stays valid for this call.
                unsafe { std::slice::from_raw_parts(ptr, len) }
            };
            let run = |$data: &[u8]| $body;
            run(input);
            0
        }
    };
}

/// Reads little-endian numbers and byte runs off the input; past its end,
/// zeros (so every input is a valid case).
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// Exactly `N` bytes, zero-padded.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }

    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The fuzzed guest's RAM size.
pub const RAM_BYTES: u64 = 64 << 10;
/// Queue `q`'s rings start at `q * QUEUE_STRIDE` in the default layout.
pub const QUEUE_STRIDE: u64 = 0x200;
/// The largest queue size in the default layout (its rings fit the stride).
pub const LAYOUT_MAX_SIZE: u16 = 16;
/// The header bytes each queue takes (see [`queue`]).
pub const QUEUE_HEADER: usize = 12;

/// The guest RAM every target shares (mapped once per process).
pub fn ram() -> GuestRam {
    static RAM: OnceLock<GuestRam> = OnceLock::new();
    RAM.get_or_init(|| GuestRam::new(RAM_BYTES).expect("mapping the fuzz guest's RAM"))
        .clone()
}

/// Zeroes `ram` and copies `image` to guest-physical 0.
pub fn load_image(ram: &GuestRam, image: &[u8]) {
    // One plain write of the whole image, zero-padded: cheaper than
    // dropping the pages and faulting them back in on every run.
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> =
            std::cell::RefCell::new(vec![0u8; RAM_BYTES as usize]);
    }
    BUF.with_borrow_mut(|buf| {
        let n = image.len().min(buf.len());
        buf[..n].copy_from_slice(&image[..n]);
        buf[n..].fill(0);
        ram.write(0, buf).expect("writing the fuzz guest's RAM");
    });
}

/// Queue `index` of a device whose queues hold at most `max` entries, from
/// [`QUEUE_HEADER`] bytes of header: flags (bit 0: ring addresses from the
/// header instead of the default layout, bit 1: EVENT_IDX, bit 2: start at
/// the positions in the header, as a restored queue does), the size (a power
/// of two chosen by the low bits), next avail, next used, and the three ring
/// addresses (guest-physical, below 64 KiB). `None` when the transport would
/// refuse it (its rings outside RAM, misaligned, or its used ring over its
/// avail ring), as DRIVER_OK then fails.
pub fn queue(header: &mut Input, index: usize, max: u16) -> Option<Queue> {
    let flags = header.u8();
    let size_sel = header.u8();
    let next_avail = header.u16();
    let next_used = header.u16();
    let (desc, avail, used) = (header.u16(), header.u16(), header.u16());
    let mut q = Queue::new(max).ok()?;
    let custom = flags & 1 != 0;
    let limit = if custom {
        max
    } else {
        max.min(LAYOUT_MAX_SIZE)
    };
    let size = (1u16 << (size_sel % 16)).min(limit);
    q.set_size(size);
    let base = index as u64 * QUEUE_STRIDE;
    let (d, a, u) = if custom {
        (desc as u64, avail as u64, used as u64)
    } else {
        (base, base + 0x100, base + 0x140)
    };
    q.set_desc_table_address(Some(d as u32), Some(0));
    q.set_avail_ring_address(Some(a as u32), Some(0));
    q.set_used_ring_address(Some(u as u32), Some(0));
    q.set_event_idx(flags & 2 != 0);
    if flags & 4 != 0 {
        q.set_next_avail(next_avail);
        q.set_next_used(next_used);
    }
    q.set_ready(true);
    (q.is_valid(ram().mmap()) && used_ring_overlaps_avail_ring(&[&q]).is_none()).then_some(q)
}

/// Whether the transport accepts these queues together (no used ring over
/// any avail ring), as DRIVER_OK checks.
pub fn acceptable(queues: &[&Queue]) -> bool {
    used_ring_overlaps_avail_ring(queues).is_none()
}
