//! The port-I/O bus: maps guest port ranges to devices.
//!
//! A device sees offsets relative to its base port, like Firecracker's `BusDevice`.
//! A write may ask the vCPU loop to stop the VM (the debug-exit port does); that is
//! returned as a [`DeviceAction`] instead of being a side channel, so the exit loop
//! stays a pure function of (exit, bus) that unit tests can drive.

use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use crate::error::{Error, Result};

/// What the exit loop should do after a device handled an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceAction {
    /// Keep running the guest.
    Continue,
    /// Stop the whole VM: the guest asked to exit with this code.
    Exit(u32),
    /// Stop the whole VM: the guest reset the machine (the i8042's reset line).
    Reset,
    /// Stop the whole VM: the guest powered the machine off.
    PowerOff,
}

/// A device on the port-I/O bus.
pub trait PioDevice: Send {
    /// A guest `in` of `data.len()` bytes at `base + offset`; fill `data`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// A guest `out` of `data` at `base + offset`.
    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction;
}

struct Range {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

/// The set of devices of one VM, shared by its vCPU threads. Devices can be
/// attached after the vCPUs exist (the Linux loader adds the ACPI PM device);
/// an access takes the read side of the lock, uncontended but for attaches.
#[derive(Default)]
pub struct PioBus {
    ranges: RwLock<Vec<Range>>,
}

impl PioBus {
    /// Attaches `device` at ports `[base, base + len)`. Overlapping ranges are refused.
    pub fn insert(&self, base: u16, len: u16, device: Arc<Mutex<dyn PioDevice>>) -> Result<()> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(Error::arg(format!("bad port range {base:#x}+{len}")));
        }
        let end = base as u32 + len as u32;
        let mut ranges = self.ranges.write().unwrap_or_else(|p| p.into_inner());
        if let Some(other) = ranges
            .iter()
            .find(|r| (base as u32) < r.base as u32 + r.len as u32 && (r.base as u32) < end)
        {
            return Err(Error::arg(format!(
                "port range {base:#x}+{len} overlaps a device at {:#x}+{}",
                other.base, other.len
            )));
        }
        ranges.push(Range { base, len, device });
        ranges.sort_by_key(|r| r.base);
        Ok(())
    }

    /// Whether a device claims `port`.
    pub fn claims(&self, port: u16) -> bool {
        Self::find(&self.ranges(), port).is_some()
    }

    fn ranges(&self) -> RwLockReadGuard<'_, Vec<Range>> {
        // Ranges are only ever pushed whole, so a poisoned lock is consistent.
        self.ranges.read().unwrap_or_else(|p| p.into_inner())
    }

    fn find(ranges: &[Range], port: u16) -> Option<(&Range, u16)> {
        // Few devices: a linear scan over a sorted Vec beats a tree here.
        ranges
            .iter()
            .find(|r| port >= r.base && (port - r.base) < r.len)
            .map(|r| (r, port - r.base))
    }

    fn lock(
        device: &Arc<Mutex<dyn PioDevice>>,
    ) -> std::sync::MutexGuard<'_, dyn PioDevice + 'static> {
        // A device that panicked mid-access is still memory-safe to use; the panic
        // itself was already reported by the vCPU thread that hit it.
        device.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Dispatches a guest `in` of `data.len() / width` accesses of `width`
    /// bytes each (a string instruction, `rep insb`, hands over several), in
    /// order. Returns false when no device claims the port.
    pub fn read(&self, port: u16, width: usize, data: &mut [u8]) -> bool {
        match Self::find(&self.ranges(), port) {
            Some((range, offset)) => {
                let mut device = Self::lock(&range.device);
                for access in data.chunks_mut(width.max(1)) {
                    device.read(offset, access);
                }
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest `out` of `data.len() / width` accesses of `width`
    /// bytes each (a string instruction, `rep outsb`, hands over several), in
    /// order, until one asks for more than [`DeviceAction::Continue`]. Returns
    /// `None` when no device claims the port.
    pub fn write(&self, port: u16, width: usize, data: &[u8]) -> Option<DeviceAction> {
        let ranges = self.ranges();
        let (range, offset) = Self::find(&ranges, port)?;
        let mut device = Self::lock(&range.device);
        for access in data.chunks(width.max(1)) {
            let action = device.write(offset, access);
            if action != DeviceAction::Continue {
                return Some(action);
            }
        }
        Some(DeviceAction::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Latch(Vec<u8>);
    impl PioDevice for Latch {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, _offset: u16, data: &[u8]) -> DeviceAction {
            self.0.extend_from_slice(data);
            DeviceAction::Continue
        }
    }

    #[test]
    fn dispatches_by_port_with_relative_offsets() {
        let bus = PioBus::default();
        let dev = Arc::new(Mutex::new(Latch(vec![])));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, 1, &mut b));
        assert_eq!(b[0], 2);
        assert_eq!(bus.write(0x3f8, 1, b"x"), Some(DeviceAction::Continue));
        assert_eq!(dev.lock().unwrap().0, b"x");
        assert!(!bus.read(0x400, 1, &mut b));
        assert_eq!(bus.write(0x3f7, 1, b"x"), None);
    }

    /// Feeds each access of a string instruction separately, in order.
    struct Accesses(Vec<Vec<u8>>, u8);
    impl PioDevice for Accesses {
        fn read(&mut self, _offset: u16, data: &mut [u8]) {
            self.1 += 1;
            data.fill(self.1);
        }
        fn write(&mut self, _offset: u16, data: &[u8]) -> DeviceAction {
            self.0.push(data.to_vec());
            if data[0] == b'!' {
                DeviceAction::Exit(1)
            } else {
                DeviceAction::Continue
            }
        }
    }

    #[test]
    fn string_io_reaches_the_device_one_access_at_a_time() {
        let bus = PioBus::default();
        let dev = Arc::new(Mutex::new(Accesses(vec![], 0)));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        assert_eq!(bus.write(0x3f8, 1, b"abc"), Some(DeviceAction::Continue));
        assert_eq!(bus.write(0x3f8, 2, b"dexy"), Some(DeviceAction::Continue));
        assert_eq!(bus.write(0x3f8, 1, b"g!h"), Some(DeviceAction::Exit(1)));
        let expected: Vec<Vec<u8>> = vec![
            b"a".to_vec(),
            b"b".to_vec(),
            b"c".to_vec(),
            b"de".to_vec(),
            b"xy".to_vec(),
            b"g".to_vec(),
            b"!".to_vec(),
        ];
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
    fn refuses_overlaps_and_empty_ranges() {
        let bus = PioBus::default();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Latch(vec![]))))
            .unwrap();
        assert!(bus
            .insert(0x13, 2, Arc::new(Mutex::new(Latch(vec![]))))
            .is_err());
        assert!(bus
            .insert(0x20, 0, Arc::new(Mutex::new(Latch(vec![]))))
            .is_err());
        assert!(bus
            .insert(0xffff, 2, Arc::new(Mutex::new(Latch(vec![]))))
            .is_err());
        assert!(bus
            .insert(0x14, 2, Arc::new(Mutex::new(Latch(vec![]))))
            .is_ok());
    }
}
