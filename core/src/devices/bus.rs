//! The address-space bus: maps guest port or MMIO ranges to devices.
//!
//! In the shape of Firecracker's `vstate/bus.rs`: ranges live in an ordered
//! map keyed by their base, a device sees offsets relative to its base, and
//! errors are typed. One [`Bus`] serves port I/O and another MMIO. A device
//! that ends the VM (the debug-exit port, the i8042's reset line, ACPI S5, the
//! hypercall port's EXIT) raises a [`VmEvent`] on the VM's [`VmEvents`] out of
//! band; the exit loop checks for it after every access, so adding an event
//! does not grow every device's return type. Each range counts its reads and
//! writes, which is how exit metrics are attributed to the device that claimed
//! the access.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use serde::Serialize;
use thiserror::Error;

use crate::hypercall::GuestFault;

/// A device on a [`Bus`].
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `base + offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `base + offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a range cannot be attached to a bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of zero length.
    #[error("{name}: empty range at {base:#x}")]
    Empty { name: String, base: u64 },
    /// A range that runs past the end of the address space.
    #[error("{name}: range {base:#x}+{len:#x} runs past the end of the {space} space")]
    Overflow {
        name: String,
        base: u64,
        len: u64,
        space: Space,
    },
    /// A range that overlaps one already attached.
    #[error("{name}: range {base:#x}+{len:#x} overlaps {other} at {other_base:#x}+{other_len:#x}")]
    Overlap {
        name: String,
        base: u64,
        len: u64,
        other: String,
        other_base: u64,
        other_len: u64,
    },
    /// No range starts at this base (on removal).
    #[error("no device is attached at {base:#x}")]
    NotFound { base: u64 },
}

/// Which address space a bus serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Space {
    /// Port I/O: 64 KiB of ports.
    Pio,
    /// Memory-mapped I/O: the 64-bit guest-physical space.
    Mmio,
}

impl std::fmt::Display for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Space::Pio => "port",
            Space::Mmio => "MMIO",
        })
    }
}

impl Space {
    /// The last address of the space.
    fn last(self) -> u64 {
        match self {
            Space::Pio => u16::MAX as u64,
            Space::Mmio => u64::MAX,
        }
    }
}

/// Something the guest did that ends the VM, raised by a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest wrote this QEMU-style code to the debug-exit port.
    DebugExit(u32),
    /// The guest made the EXIT hypercall with this status.
    GuestExit(u32),
    /// The guest reported an exception it could not handle.
    GuestFault(GuestFault),
    /// The guest made a malformed hypercall.
    BadHypercall(String),
    /// The guest reset the machine.
    Reset,
    /// The guest powered the machine off.
    PowerOff,
}

#[derive(Default)]
struct EventSlot {
    raised: AtomicBool,
    event: Mutex<Option<VmEvent>>,
}

/// The VM's event line: devices hold a clone and [`VmEvents::raise`] on it; the
/// exit loop [`VmEvents::take`]s the event after the access. The first event
/// raised wins until it is taken.
#[derive(Clone, Default)]
pub struct VmEvents(Arc<EventSlot>);

impl VmEvents {
    fn slot(&self) -> MutexGuard<'_, Option<VmEvent>> {
        // The slot holds a plain value replaced whole: a poisoned lock is consistent.
        self.0.event.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Raises `event` unless one is already pending.
    pub fn raise(&self, event: VmEvent) {
        let mut slot = self.slot();
        if slot.is_none() {
            *slot = Some(event);
            self.0.raised.store(true, Ordering::Release);
        }
    }

    /// Whether an event is pending (one atomic load: cheap on every exit).
    pub fn pending(&self) -> bool {
        self.0.raised.load(Ordering::Acquire)
    }

    /// Takes the pending event, if any.
    pub fn take(&self) -> Option<VmEvent> {
        if !self.pending() {
            return None;
        }
        let mut slot = self.slot();
        self.0.raised.store(false, Ordering::Release);
        slot.take()
    }
}

/// One attached range and its access counters.
struct BusRange {
    name: String,
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
    reads: AtomicU64,
    writes: AtomicU64,
}

/// Accesses one device claimed, for the metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceAccesses {
    /// The name the device was attached with.
    pub name: String,
    /// Port I/O or MMIO.
    pub space: Space,
    /// The first address of its range.
    pub base: u64,
    /// The range's length in bytes.
    pub len: u64,
    /// Guest reads (exits) it handled.
    pub reads: u64,
    /// Guest writes (exits) it handled.
    pub writes: u64,
}

/// The devices of one address space of one VM, shared by its vCPU threads.
/// Devices can be attached, moved and removed while vCPUs run (a guest
/// programming a PCI BAR moves one); an access takes the read side of the
/// lock only long enough to find its range.
pub struct Bus {
    space: Space,
    ranges: RwLock<BTreeMap<u64, Arc<BusRange>>>,
    unclaimed_reads: AtomicU64,
    unclaimed_writes: AtomicU64,
}

impl Bus {
    /// An empty bus for `space`.
    pub fn new(space: Space) -> Bus {
        Bus {
            space,
            ranges: RwLock::new(BTreeMap::new()),
            unclaimed_reads: AtomicU64::new(0),
            unclaimed_writes: AtomicU64::new(0),
        }
    }

    fn ranges(&self) -> RwLockReadGuard<'_, BTreeMap<u64, Arc<BusRange>>> {
        // Ranges are only ever inserted or removed whole: a poisoned lock is consistent.
        self.ranges.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches `device` as `name` at `[base, base + len)`. Overlapping ranges
    /// are refused.
    pub fn insert(
        &self,
        name: &str,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty {
                name: name.into(),
                base,
            });
        }
        match base.checked_add(len - 1) {
            Some(last) if last <= self.space.last() => {}
            _ => {
                return Err(BusError::Overflow {
                    name: name.into(),
                    base,
                    len,
                    space: self.space,
                })
            }
        }
        let mut ranges = self.ranges.write().unwrap_or_else(|p| p.into_inner());
        let before = ranges.range(..=base).next_back().map(|(_, r)| r);
        let after = ranges.range(base..).next().map(|(_, r)| r);
        for other in [before, after].into_iter().flatten() {
            let disjoint = other.base + (other.len - 1) < base || base + (len - 1) < other.base;
            if !disjoint {
                return Err(BusError::Overlap {
                    name: name.into(),
                    base,
                    len,
                    other: other.name.clone(),
                    other_base: other.base,
                    other_len: other.len,
                });
            }
        }
        ranges.insert(
            base,
            Arc::new(BusRange {
                name: name.into(),
                base,
                len,
                device,
                reads: AtomicU64::new(0),
                writes: AtomicU64::new(0),
            }),
        );
        Ok(())
    }

    /// Detaches the range that starts at `base`.
    pub fn remove(&self, base: u64) -> Result<(), BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(|p| p.into_inner());
        ranges
            .remove(&base)
            .map(|_| ())
            .ok_or(BusError::NotFound { base })
    }

    /// The range claiming `addr` and `addr`'s offset in it. The lock is
    /// released before the device runs, so a device may change the bus.
    fn find(&self, addr: u64) -> Option<(Arc<BusRange>, u64)> {
        let ranges = self.ranges();
        let (_, range) = ranges.range(..=addr).next_back()?;
        let offset = addr - range.base;
        (offset < range.len).then(|| (range.clone(), offset))
    }

    /// Whether a device claims `addr`.
    pub fn claims(&self, addr: u64) -> bool {
        self.find(addr).is_some()
    }

    fn lock(device: &Arc<Mutex<dyn BusDevice>>) -> MutexGuard<'_, dyn BusDevice + 'static> {
        // A device that panicked mid-access is still memory-safe to use; the panic
        // itself was already reported by the vCPU thread that hit it.
        device.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Dispatches a guest read of `data.len() / width` accesses of `width`
    /// bytes each (a string instruction, `rep insb`, hands over several), in
    /// order. Returns false when no device claims `addr`.
    pub fn read(&self, addr: u64, width: usize, data: &mut [u8]) -> bool {
        let Some((range, offset)) = self.find(addr) else {
            self.unclaimed_reads.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        range.reads.fetch_add(1, Ordering::Relaxed);
        let mut device = Self::lock(&range.device);
        for access in data.chunks_mut(width.max(1)) {
            device.read(offset, access);
        }
        true
    }

    /// Dispatches a guest write of `data.len() / width` accesses of `width`
    /// bytes each (a string instruction, `rep outsb`, hands over several), in
    /// order, until one raises a VM event on `events`. Returns false when no
    /// device claims `addr`.
    pub fn write(&self, addr: u64, width: usize, data: &[u8], events: &VmEvents) -> bool {
        let Some((range, offset)) = self.find(addr) else {
            self.unclaimed_writes.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        range.writes.fetch_add(1, Ordering::Relaxed);
        let mut device = Self::lock(&range.device);
        for access in data.chunks(width.max(1)) {
            device.write(offset, access);
            if events.pending() {
                break;
            }
        }
        true
    }

    /// The accesses each device claimed, in address order, then the ones no
    /// device claimed as `(reads, writes)`.
    pub fn accesses(&self) -> (Vec<DeviceAccesses>, (u64, u64)) {
        let devices = self
            .ranges()
            .values()
            .map(|r| DeviceAccesses {
                name: r.name.clone(),
                space: self.space,
                base: r.base,
                len: r.len,
                reads: r.reads.load(Ordering::Relaxed),
                writes: r.writes.load(Ordering::Relaxed),
            })
            .collect();
        let unclaimed = (
            self.unclaimed_reads.load(Ordering::Relaxed),
            self.unclaimed_writes.load(Ordering::Relaxed),
        );
        (devices, unclaimed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Latch(Vec<u8>);
    impl BusDevice for Latch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    fn latch() -> Arc<Mutex<Latch>> {
        Arc::new(Mutex::new(Latch(vec![])))
    }

    #[test]
    fn dispatches_by_address_with_relative_offsets_and_counts() {
        let bus = Bus::new(Space::Pio);
        let events = VmEvents::default();
        let dev = latch();
        bus.insert("com1", 0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, 1, &mut b));
        assert_eq!(b[0], 2);
        assert!(bus.write(0x3f8, 1, b"x", &events));
        assert_eq!(dev.lock().unwrap().0, b"x");
        assert!(!bus.read(0x400, 1, &mut b));
        assert!(!bus.write(0x3f7, 1, b"x", &events));
        let (devices, unclaimed) = bus.accesses();
        assert_eq!(
            devices,
            vec![DeviceAccesses {
                name: "com1".into(),
                space: Space::Pio,
                base: 0x3f8,
                len: 8,
                reads: 1,
                writes: 1
            }]
        );
        assert_eq!(unclaimed, (1, 1));
    }

    /// Feeds each access of a string instruction separately, in order.
    struct Accesses(Vec<Vec<u8>>, u8, VmEvents);
    impl BusDevice for Accesses {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            self.1 += 1;
            data.fill(self.1);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.push(data.to_vec());
            if data[0] == b'!' {
                self.2.raise(VmEvent::DebugExit(1));
            }
        }
    }

    #[test]
    fn string_io_reaches_the_device_one_access_at_a_time() {
        let bus = Bus::new(Space::Pio);
        let events = VmEvents::default();
        let dev = Arc::new(Mutex::new(Accesses(vec![], 0, events.clone())));
        bus.insert("dev", 0x3f8, 8, dev.clone()).unwrap();
        assert!(bus.write(0x3f8, 1, b"abc", &events));
        assert!(bus.write(0x3f8, 2, b"dexy", &events));
        assert!(!events.pending());
        assert!(bus.write(0x3f8, 1, b"g!h", &events));
        assert_eq!(events.take(), Some(VmEvent::DebugExit(1)));
        assert_eq!(events.take(), None, "taken once");
        let expected: Vec<Vec<u8>> = ["a", "b", "c", "de", "xy", "g", "!"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        assert_eq!(
            dev.lock().unwrap().0,
            expected,
            "stops at the access that ends the VM"
        );
        let mut data = [0u8; 6];
        assert!(bus.read(0x3f8, 1, &mut data));
        assert_eq!(data, [1, 2, 3, 4, 5, 6]);
        assert!(bus.read(0x3f8, 4, &mut data[..4]));
        assert_eq!(data[..4], [7; 4]);
    }

    #[test]
    fn the_first_event_wins_until_taken() {
        let events = VmEvents::default();
        events.raise(VmEvent::PowerOff);
        events.raise(VmEvent::Reset);
        assert_eq!(events.take(), Some(VmEvent::PowerOff));
        events.raise(VmEvent::Reset);
        assert_eq!(events.take(), Some(VmEvent::Reset));
    }

    #[test]
    fn refuses_overlaps_empty_and_overflowing_ranges() {
        let bus = Bus::new(Space::Pio);
        bus.insert("a", 0x10, 4, latch()).unwrap();
        assert!(matches!(
            bus.insert("b", 0x13, 2, latch()),
            Err(BusError::Overlap { ref other, other_base: 0x10, .. }) if other == "a"
        ));
        assert!(matches!(
            bus.insert("b", 0x0f, 2, latch()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert("b", 0x20, 0, latch()),
            Err(BusError::Empty { .. })
        ));
        assert!(matches!(
            bus.insert("b", 0xffff, 2, latch()),
            Err(BusError::Overflow { .. })
        ));
        bus.insert("b", 0x14, 2, latch()).unwrap();
        bus.insert("c", 0x0c, 4, latch()).unwrap();
        let mmio = Bus::new(Space::Mmio);
        mmio.insert("top", u64::MAX - 0xfff, 0x1000, latch())
            .unwrap();
        assert!(matches!(
            mmio.insert("past", u64::MAX - 0xfff, 0x1001, latch()),
            Err(BusError::Overflow { .. })
        ));
    }

    #[test]
    fn ranges_move_by_remove_and_insert() {
        let bus = Bus::new(Space::Mmio);
        bus.insert("bar", 0xd000_0000, 0x1000, latch()).unwrap();
        assert!(bus.claims(0xd000_0fff));
        bus.remove(0xd000_0000).unwrap();
        assert!(!bus.claims(0xd000_0000));
        assert_eq!(
            bus.remove(0xd000_0000),
            Err(BusError::NotFound { base: 0xd000_0000 })
        );
        bus.insert("bar", 0xe000_0000, 0x1000, latch()).unwrap();
        assert!(bus.claims(0xe000_0800));
    }

    /// A device that changes its own bus from inside an access does not deadlock.
    struct Mover(Arc<Bus>);
    impl BusDevice for Mover {
        fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
        fn write(&mut self, _offset: u64, _data: &[u8]) {
            self.0.insert("late", 0x100, 1, latch()).unwrap();
        }
    }

    #[test]
    fn a_device_may_change_the_bus_it_sits_on() {
        let bus = Arc::new(Bus::new(Space::Pio));
        bus.insert("mover", 0x10, 1, Arc::new(Mutex::new(Mover(bus.clone()))))
            .unwrap();
        assert!(bus.write(0x10, 1, &[0], &VmEvents::default()));
        assert!(bus.claims(0x100));
    }
}
