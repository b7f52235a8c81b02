//! A minimal virtio-pci driver for unit tests: negotiates features, lays out
//! split queues in guest RAM, posts descriptor chains, kicks and waits for
//! used buffers, through the same BAR accesses a guest makes. Devices' tests
//! drive their real queue handling with it, without KVM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::memory::GuestRam;
use crate::pci::msix::tests::Recorder;
use crate::pci::root::PciDevice;
use crate::state::StateError;
use crate::virtio::pci::{TransportState, VirtioPci};
use crate::virtio::{features, status, VirtioDevice};

/// Where each queue's rings go: queue `q` at `RINGS + q * RING_STRIDE`.
const RINGS: u64 = 0x10_0000;
const RING_STRIDE: u64 = 0x1_0000;
/// Where test buffers start.
pub const BUFFERS: u64 = 0x40_0000;

/// Queue `q`'s used ring.
fn used_ring(q: usize) -> u64 {
    RINGS + q as u64 * RING_STRIDE + 0x8000
}

/// Queue `q`'s used index in `mem` (for threads that hold only the memory).
pub fn used_idx(mem: &GuestRam, q: usize) -> u16 {
    let mut idx = [0u8; 2];
    mem.read(used_ring(q) + 2, &mut idx).unwrap();
    u16::from_le_bytes(idx)
}

/// A descriptor to post: address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Buf {
    /// A buffer the device reads (driver → device).
    pub fn readable(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            write: false,
        }
    }

    /// A buffer the device writes (device → driver).
    pub fn writable(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            write: true,
        }
    }
}

/// A driver bound to one device.
pub struct TestDriver {
    pub dev: VirtioPci,
    pub mem: GuestRam,
    pub irqs: Arc<Recorder>,
    sizes: Vec<u16>,
    /// Per queue: next free descriptor, the avail index.
    next_desc: Vec<u16>,
    avail_idx: Vec<u16>,
    used_seen: Vec<u16>,
}

impl TestDriver {
    /// Binds to `device` on a fresh 16 MiB guest.
    pub fn new(device: Box<dyn VirtioDevice>) -> TestDriver {
        let mem = GuestRam::new(16 << 20).unwrap();
        let irqs = Arc::new(Recorder::default());
        let sizes = device.queue_sizes();
        let dev = VirtioPci::new(device, mem.clone(), None, irqs.clone(), 0xd000_0000).unwrap();
        let n = sizes.len();
        TestDriver {
            dev,
            mem,
            irqs,
            sizes,
            next_desc: vec![0; n],
            avail_idx: vec![0; n],
            used_seen: vec![0; n],
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.dev.bar_write(0, offset, data);
    }

    pub fn read32(&mut self, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        self.dev.bar_read(0, offset, &mut d);
        u32::from_le_bytes(d)
    }

    pub fn read8(&mut self, offset: u64) -> u8 {
        let mut d = [0u8; 1];
        self.dev.bar_read(0, offset, &mut d);
        d[0]
    }

    /// The device's offered features.
    pub fn device_features(&mut self) -> u64 {
        self.write(0, &0u32.to_le_bytes());
        let lo = self.read32(4) as u64;
        self.write(0, &1u32.to_le_bytes());
        let hi = self.read32(4) as u64;
        lo | hi << 32
    }

    /// Resets, negotiates `wanted` (plus VERSION_1), sets up every queue at
    /// its maximum size with vector q, config vector = queues, enables MSI-X,
    /// and sets DRIVER_OK. Returns the status read back.
    pub fn start(&mut self, wanted: u64) -> u8 {
        self.write(0x14, &[0]);
        // Fresh rings, as a driver sets up after a reset.
        for q in 0..self.sizes.len() {
            self.mem
                .zero(RINGS + q as u64 * RING_STRIDE, RING_STRIDE)
                .unwrap();
            (self.next_desc[q], self.avail_idx[q], self.used_seen[q]) = (0, 0, 0);
        }
        self.write(0x14, &[status::ACKNOWLEDGE | status::DRIVER]);
        let f = (wanted | features::VERSION_1) & self.device_features();
        self.write(8, &0u32.to_le_bytes());
        self.write(12, &(f as u32).to_le_bytes());
        self.write(8, &1u32.to_le_bytes());
        self.write(12, &((f >> 32) as u32).to_le_bytes());
        self.write(
            0x14,
            &[status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK],
        );
        // MSI-X on, every vector unmasked with a distinct data value.
        let cap = self.msix_cap();
        self.dev
            .config_mut()
            .write(cap + 2, &0x8000u16.to_le_bytes());
        self.dev.config_written(cap + 2, 2);
        for v in 0..=self.sizes.len() as u64 {
            let e = 0x4000 + v * 16;
            self.write(e, &0xfee0_0000u32.to_le_bytes());
            self.write(e + 4, &0u32.to_le_bytes());
            self.write(e + 8, &(0x30 + v as u32).to_le_bytes());
            self.write(e + 12, &0u32.to_le_bytes());
        }
        self.write(0x10, &(self.sizes.len() as u16).to_le_bytes());
        for q in 0..self.sizes.len() {
            let base = RINGS + q as u64 * RING_STRIDE;
            let size = self.sizes[q] as u64;
            self.write(0x16, &(q as u16).to_le_bytes());
            self.write(0x1a, &(q as u16).to_le_bytes());
            self.write(0x20, &base.to_le_bytes());
            self.write(0x28, &(base + 16 * size).to_le_bytes());
            self.write(0x30, &used_ring(q).to_le_bytes());
            self.write(0x1c, &1u16.to_le_bytes());
        }
        self.write(
            0x14,
            &[status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK],
        );
        self.read8(0x14)
    }

    fn msix_cap(&self) -> usize {
        let c = self.dev.config();
        let mut at = c.state().regs[0x34] as usize;
        while at != 0 {
            if c.state().regs[at] == 0x11 {
                return at;
            }
            at = c.state().regs[at + 1] as usize;
        }
        panic!("no MSI-X capability");
    }

    /// Writes a raw descriptor `i` of queue `q`.
    pub fn set_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = RINGS + q as u64 * RING_STRIDE + 16 * i as u64;
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write(at, &d).unwrap();
    }

    /// The same guest and driver on a new transport for `device` restored
    /// from `state` (this transport is dropped first: its worker stops), as a
    /// VM restored from a snapshot would have it.
    pub fn restored(
        self,
        device: Box<dyn VirtioDevice>,
        state: &TransportState,
    ) -> Result<TestDriver, StateError> {
        let TestDriver {
            dev,
            mem,
            sizes,
            next_desc,
            avail_idx,
            used_seen,
            ..
        } = self;
        drop(dev);
        let irqs = Arc::new(Recorder::default());
        let mut dev = VirtioPci::new(device, mem.clone(), None, irqs.clone(), 0xd000_0000).unwrap();
        dev.restore(state)?;
        Ok(TestDriver {
            dev,
            mem,
            irqs,
            sizes,
            next_desc,
            avail_idx,
            used_seen,
        })
    }

    /// Posts `bufs` as one chain on queue `q` without kicking; returns the head.
    pub fn post_quietly(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        self.post_inner(q, bufs, false)
    }

    /// Publishes head `head` in queue `q`'s avail ring and kicks.
    pub fn publish(&mut self, q: usize, head: u16) {
        self.publish_inner(q, head, true)
    }

    fn publish_inner(&mut self, q: usize, head: u16, kick: bool) {
        let size = self.sizes[q] as u64;
        let avail = RINGS + q as u64 * RING_STRIDE + 16 * size;
        let slot = self.avail_idx[q] as u64 % size;
        self.mem
            .write(avail + 4 + 2 * slot, &head.to_le_bytes())
            .unwrap();
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem
            .write(avail + 2, &self.avail_idx[q].to_le_bytes())
            .unwrap();
        if kick {
            self.write(0x3000 + 4 * q as u64, &(q as u16).to_le_bytes());
        }
    }

    /// Posts `bufs` as one chain on queue `q` and kicks; returns the head.
    pub fn post(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        self.post_inner(q, bufs, true)
    }

    fn post_inner(&mut self, q: usize, bufs: &[Buf], kick: bool) -> u16 {
        let size = self.sizes[q];
        let head = self.next_desc[q];
        for (i, b) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % size;
            let last = i + 1 == bufs.len();
            let flags = (if last { 0 } else { 1 }) | (if b.write { 2 } else { 0 });
            self.set_desc(q, idx, b.addr, b.len, flags, (idx + 1) % size);
        }
        self.next_desc[q] = (head + bufs.len() as u16) % size;
        self.publish_inner(q, head, kick);
        head
    }

    /// Queue `q`'s used index: how many chains the device has used.
    pub fn used_idx(&self, q: usize) -> u16 {
        used_idx(&self.mem, q)
    }

    /// Waits for the next used element of queue `q`: (id, len).
    pub fn wait_used(&mut self, q: usize) -> Option<(u32, u32)> {
        let size = self.sizes[q] as u64;
        let used = used_ring(q);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.used_idx(q) != self.used_seen[q] {
                break;
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let slot = self.used_seen[q] as u64 % size;
        let mut e = [0u8; 8];
        self.mem.read(used + 4 + 8 * slot, &mut e).unwrap();
        self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        Some((
            u32::from_le_bytes(e[..4].try_into().unwrap()),
            u32::from_le_bytes(e[4..].try_into().unwrap()),
        ))
    }

    /// Waits for whichever comes first on queue `q`: a used element
    /// (`Some(Ok((id, len)))`) or NEEDS_RESET (`Some(Err(()))`); `None` when
    /// neither comes within 5 s (the device hung).
    pub fn wait_used_or_reset(&mut self, q: usize) -> Option<Result<(u32, u32), ()>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.used_idx(q) != self.used_seen[q] {
                return self.wait_used(q).map(Ok);
            }
            if self.read8(0x14) & status::NEEDS_RESET != 0 {
                return Some(Err(()));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Waits until the device sets NEEDS_RESET.
    pub fn wait_needs_reset(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.read8(0x14) & status::NEEDS_RESET != 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}
