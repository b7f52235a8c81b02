//! PCI bus 0 behind configuration mechanism #1 (ports 0xCF8/0xCFC), with a
//! host bridge at 00:00.0 and up to 31 endpoints; each endpoint's memory BARs
//! are mapped on the VM's MMIO bus where the guest (or the firmware's initial
//! assignment) puts them, while memory decoding is on.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::config::{ConfigState, PciConfig, PciIdentity, COMMAND_MEMORY};
use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::state::{from_json, to_json, StateError};

/// The configuration mechanism's ports: address at 0xCF8, data at 0xCFC.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// Address and data, 4 bytes each.
pub const PCI_CONFIG_PORT_LEN: u16 = 8;
/// The window BARs are placed in (below the I/O APIC), also in the DSDT's _CRS.
pub const PCI_MMIO_WINDOW: (u64, u64) = (0xd000_0000, 0xfec0_0000);
/// Devices per bus.
const SLOTS: usize = 32;
/// Config address: the enable bit.
const ENABLE: u32 = 1 << 31;

/// A function on the bus.
pub trait PciDevice: Send {
    /// Its configuration space.
    fn config(&self) -> &PciConfig;
    /// Its configuration space, to write.
    fn config_mut(&mut self) -> &mut PciConfig;
    /// Called after the guest wrote `len` bytes of configuration at `offset`.
    fn config_written(&mut self, _offset: usize, _len: usize) {}
    /// A guest read in BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A guest write in BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// BAR `bar` is now decoded at `address` (`None`: not decoded).
    fn bar_mapped(&mut self, _bar: usize, _address: Option<u64>) {}
    /// What the device is, for listings (`serde_json` value).
    fn describe(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// The function's state as plain data (for snapshots); by default its
    /// configuration space ([`ConfigState`]).
    fn save_state(&self) -> serde_json::Value {
        to_json(self.config().state())
    }
    /// Restores what [`PciDevice::save_state`] gave, checked field by field; a
    /// refused state changes nothing.
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), StateError> {
        let config: ConfigState = from_json("PCI function", state)?;
        self.config_mut().restore(&config)
    }
}

/// Why a function cannot be added.
#[derive(Debug, Error)]
pub enum PciError {
    /// Every slot is taken.
    #[error("the PCI bus is full ({SLOTS} slots)")]
    BusFull,
    /// The MMIO window has no room for a BAR.
    #[error("no room for a BAR of {0:#x} bytes in the PCI MMIO window")]
    NoBarSpace(u64),
    /// The configuration space could not be built.
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    /// A BAR could not be mapped.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The host bridge at 00:00.0: identity only (QEMU's generic PCIe host's IDs).
struct HostBridge(PciConfig);

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.0
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.0
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// A BAR as seen from the MMIO bus.
struct BarRegion {
    device: Arc<Mutex<dyn PciDevice>>,
    bar: usize,
}

fn lock(device: &Arc<Mutex<dyn PciDevice>>) -> MutexGuard<'_, dyn PciDevice + 'static> {
    // A device that panicked mid-access is memory-safe to keep using.
    device.lock().unwrap_or_else(|p| p.into_inner())
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).bar_read(self.bar, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).bar_write(self.bar, offset, data);
    }
}

struct Slot {
    name: String,
    device: Arc<Mutex<dyn PciDevice>>,
    /// Where each BAR is mapped on the MMIO bus now.
    mapped: [Option<u64>; 6],
}

/// A function in a listing.
#[derive(Clone, Debug, Serialize)]
pub struct PciFunctionInfo {
    /// `00:SS.0`.
    pub address: String,
    pub name: String,
    pub vendor: u16,
    pub device: u16,
    /// Class, subclass, programming interface as one number.
    pub class: u32,
    pub bars: Vec<PciBarInfo>,
    /// Device details (what `describe` gave).
    pub details: serde_json::Value,
}

/// A BAR in a listing.
#[derive(Clone, Debug, Serialize)]
pub struct PciBarInfo {
    pub index: usize,
    pub size: u64,
    /// Where it is decoded now (`None`: memory decoding off).
    pub address: Option<u64>,
}

/// One function's saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciFunctionState {
    /// Its slot (device number) on bus 0.
    pub slot: u8,
    /// The name it was added with.
    pub name: String,
    /// What its [`PciDevice::save_state`] gave.
    pub state: serde_json::Value,
}

/// Bus 0's state as plain data (for snapshots): the configuration address
/// register and every function's state, host bridge included.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciRootState {
    /// The value at 0xCF8.
    pub address: u32,
    /// The functions, by slot.
    pub functions: Vec<PciFunctionState>,
}

/// Bus 0 and the configuration mechanism.
pub struct PciRoot {
    address: u32,
    slots: Vec<Option<Slot>>,
    mmio: Arc<Bus>,
    next_bar: u64,
}

impl PciRoot {
    /// A bus with only the host bridge, mapping BARs on `mmio`.
    pub fn new(mmio: Arc<Bus>) -> PciRoot {
        let bridge = PciConfig::new(PciIdentity {
            vendor: 0x1b36,
            device: 0x0008,
            class: [0x06, 0x00, 0x00],
            revision: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        let mut slots: Vec<Option<Slot>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            name: "host-bridge".into(),
            device: Arc::new(Mutex::new(HostBridge(bridge))),
            mapped: [None; 6],
        });
        PciRoot {
            address: 0,
            slots,
            mmio,
            next_bar: PCI_MMIO_WINDOW.0,
        }
    }

    /// Reserves a size-aligned range for a BAR of `size` bytes in the window.
    pub fn allocate_bar(&mut self, size: u64) -> Result<u64, PciError> {
        let start = self.next_bar.next_multiple_of(size);
        match start.checked_add(size) {
            Some(end) if end <= PCI_MMIO_WINDOW.1 => {
                self.next_bar = end;
                Ok(start)
            }
            _ => Err(PciError::NoBarSpace(size)),
        }
    }

    /// Adds `device` as `name` in the first free slot, maps its BARs (it comes
    /// with memory decoding on at the addresses its BARs hold, as firmware
    /// leaves devices) and returns the slot.
    pub fn add(&mut self, name: &str, device: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciError> {
        let slot = (1..SLOTS)
            .find(|&s| self.slots[s].is_none())
            .ok_or(PciError::BusFull)?;
        {
            let mut d = lock(&device);
            let command = d.config().command() | COMMAND_MEMORY;
            d.config_mut().write(4, &command.to_le_bytes());
        }
        self.slots[slot] = Some(Slot {
            name: name.into(),
            device,
            mapped: [None; 6],
        });
        if let Err(e) = self.remap(slot) {
            self.slots[slot] = None;
            return Err(e.into());
        }
        Ok(slot as u8)
    }

    /// Maps or unmaps slot `slot`'s BARs to match its registers.
    fn remap(&mut self, slot: usize) -> Result<(), BusError> {
        let Some(s) = self.slots[slot].as_mut() else {
            return Ok(());
        };
        let mut d = lock(&s.device);
        let decoding = d.config().command() & COMMAND_MEMORY != 0;
        let bars: Vec<(usize, u64)> = d.config().bars().collect();
        let mut first_error = None;
        for (bar, size) in bars {
            let address = d.config().bar_address(bar);
            let want = (decoding && address != 0 && address.checked_add(size).is_some())
                .then_some(address);
            if want == s.mapped[bar] {
                continue;
            }
            if let Some(old) = s.mapped[bar].take() {
                // It was inserted at exactly this base.
                let _ = self.mmio.remove(old);
            }
            if let Some(new) = want {
                let region = BarRegion {
                    device: s.device.clone(),
                    bar,
                };
                let name = format!("{}-bar{bar}", s.name);
                match self
                    .mmio
                    .insert(&name, new, size, Arc::new(Mutex::new(region)))
                {
                    Ok(()) => s.mapped[bar] = Some(new),
                    // A guest that overlaps two BARs loses the second one.
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            d.bar_mapped(bar, s.mapped[bar]);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The function the address register selects, and the register offset.
    fn selected(&self) -> Option<(usize, usize)> {
        if self.address & ENABLE == 0 {
            return None;
        }
        let bus = (self.address >> 16) & 0xff;
        let device = ((self.address >> 11) & 0x1f) as usize;
        let function = (self.address >> 8) & 0x7;
        if bus != 0 || function != 0 || self.slots[device].is_none() {
            return None;
        }
        Some((device, (self.address & 0xfc) as usize))
    }

    /// The bus's state.
    pub fn state(&self) -> PciRootState {
        let functions = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
            .map(|(i, s)| PciFunctionState {
                slot: i as u8,
                name: s.name.clone(),
                state: lock(&s.device).save_state(),
            })
            .collect();
        PciRootState {
            address: self.address,
            functions,
        }
    }

    /// Restores a saved state onto a bus with the same functions in the same
    /// slots (a VM rebuilt from the same configuration), then maps the BARs
    /// where the restored registers put them. Refused when the functions
    /// differ; when one function refuses its state, the ones already restored
    /// get their previous state back, so a refused state changes nothing.
    pub fn restore(&mut self, state: &PciRootState) -> Result<(), StateError> {
        let present: Vec<(usize, &str)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s.name.as_str())))
            .collect();
        let saved: Vec<(usize, &str)> = state
            .functions
            .iter()
            .map(|f| (f.slot as usize, f.name.as_str()))
            .collect();
        if present != saved {
            return Err(StateError::mismatch(
                "PCI bus",
                format!("the bus has {present:?}, the state {saved:?}"),
            ));
        }
        let mut done: Vec<(usize, serde_json::Value)> = Vec::new();
        for f in &state.functions {
            let slot = f.slot as usize;
            let Some(s) = self.slots[slot].as_ref() else {
                continue;
            };
            let mut d = lock(&s.device);
            let before = d.save_state();
            if let Err(e) = d.restore_state(&f.state) {
                drop(d);
                for (slot, previous) in done.into_iter().rev() {
                    if let Some(s) = self.slots[slot].as_ref() {
                        // A state the function itself gave: it takes it back.
                        let _ = lock(&s.device).restore_state(&previous);
                    }
                }
                return Err(e);
            }
            done.push((slot, before));
        }
        self.address = state.address;
        for slot in 0..SLOTS {
            // Overlapping BARs leave the later one unmapped, as when a guest
            // programs them so.
            let _ = self.remap(slot);
        }
        Ok(())
    }

    /// The functions on the bus, for listings.
    pub fn list(&self) -> Vec<PciFunctionInfo> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
            .map(|(i, s)| {
                let d = lock(&s.device);
                let c = d.config();
                PciFunctionInfo {
                    address: format!("00:{i:02x}.0"),
                    name: s.name.clone(),
                    vendor: c.u16_at(0),
                    device: c.u16_at(2),
                    class: c.u32_at(8) >> 8,
                    bars: c
                        .bars()
                        .map(|(index, size)| PciBarInfo {
                            index,
                            size,
                            address: s.mapped[index],
                        })
                        .collect(),
                    details: d.describe(),
                }
            })
            .collect()
    }
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match offset {
            0..=3 => {
                let bytes = self.address.to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    if let Some(v) = bytes.get(offset as usize + i) {
                        *b = *v;
                    }
                }
            }
            _ => {
                let Some((slot, reg)) = self.selected() else {
                    return;
                };
                if let Some(s) = &self.slots[slot] {
                    lock(&s.device)
                        .config()
                        .read(reg + (offset as usize - 4), data);
                }
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            // Only a full dword write sets the address (a byte write to 0xCFB
            // is how Linux probes for mechanism #2: ignore it).
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            4..=7 => {
                let Some((slot, reg)) = self.selected() else {
                    return;
                };
                let at = reg + (offset as usize - 4);
                if let Some(s) = &self.slots[slot] {
                    let mut d = lock(&s.device);
                    d.config_mut().write(at, data);
                    d.config_written(at, data.len());
                }
                // A write to the command register or a BAR may move a BAR.
                if at < 0x28 {
                    let _ = self.remap(slot);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::{Space, VmEvents};

    struct Dummy(PciConfig, Vec<(usize, u64, Vec<u8>)>);
    impl PciDevice for Dummy {
        fn config(&self) -> &PciConfig {
            &self.0
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.0
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) << 4 | offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.1.push((bar, offset, data.to_vec()));
        }
    }

    fn cfg_read(root: &mut PciRoot, dev: u32, reg: u32) -> u32 {
        root.write(0, &(ENABLE | dev << 11 | reg).to_le_bytes());
        let mut d = [0u8; 4];
        root.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    fn cfg_write(root: &mut PciRoot, dev: u32, reg: u32, v: u32) {
        root.write(0, &(ENABLE | dev << 11 | reg).to_le_bytes());
        root.write(4, &v.to_le_bytes());
    }

    fn setup() -> (PciRoot, Arc<Bus>, Arc<Mutex<Dummy>>) {
        let mmio = Arc::new(Bus::new(Space::Mmio));
        let mut root = PciRoot::new(mmio.clone());
        let mut c = PciConfig::new(PciIdentity {
            vendor: 0x1af4,
            device: 0x1044,
            class: [0xff, 0, 0],
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        let at = root.allocate_bar(0x4000).unwrap();
        c.add_bar64(0, 0x4000, at).unwrap();
        let dev = Arc::new(Mutex::new(Dummy(c, vec![])));
        assert_eq!(root.add("rng", dev.clone()).unwrap(), 1);
        (root, mmio, dev)
    }

    #[test]
    fn linux_finds_mechanism_1_and_the_host_bridge() {
        let (mut root, _, _) = setup();
        // pci_check_type1: the address register reads back.
        root.write(0, &0x8000_0000u32.to_le_bytes());
        let mut d = [0u8; 4];
        root.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        root.write(3, &[1]);
        root.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000, "byte writes ignored");
        // pci_sanity_check: a host bridge on bus 0.
        assert_eq!(cfg_read(&mut root, 0, 8) >> 16, 0x0600);
        assert_eq!(cfg_read(&mut root, 1, 0), 0x1044_1af4);
        assert_eq!(cfg_read(&mut root, 2, 0), 0xffff_ffff, "empty slot");
        // Another function or bus, or the enable bit clear: nothing there.
        root.write(0, &(ENABLE | 1 << 11 | 1 << 8).to_le_bytes());
        root.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        root.write(0, &(1u32 << 11).to_le_bytes());
        root.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Sub-dword reads at 0xCFE.
        root.write(0, &(ENABLE | 1 << 11).to_le_bytes());
        let mut w = [0u8; 2];
        root.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1044);
    }

    #[test]
    fn bars_map_on_the_mmio_bus_and_follow_the_guest() {
        let (mut root, mmio, dev) = setup();
        let bar = PCI_MMIO_WINDOW.0;
        let mut d = [0u8; 1];
        assert!(mmio.read(bar + 3, 1, &mut d));
        assert_eq!(d[0], 0x03);
        assert!(mmio.write(bar + 8, 1, &[9], &VmEvents::default()));
        assert_eq!(dev.lock().unwrap().1, vec![(0, 8, vec![9])]);
        // Sizing with decoding off unmaps; the new address maps.
        cfg_write(&mut root, 1, 4, 0);
        assert!(!mmio.claims(bar));
        cfg_write(&mut root, 1, 0x10, 0xffff_ffff);
        assert_eq!(cfg_read(&mut root, 1, 0x10), 0xffff_c004);
        cfg_write(&mut root, 1, 0x10, 0xe000_0000);
        cfg_write(&mut root, 1, 0x14, 0);
        cfg_write(&mut root, 1, 4, COMMAND_MEMORY as u32);
        assert!(mmio.claims(0xe000_0000) && !mmio.claims(bar));
        let listed = root.list();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[1].address, "00:01.0");
        assert_eq!(listed[1].bars[0].address, Some(0xe000_0000));
        // A BAR moved onto another device's range is left unmapped.
        struct Blank;
        impl BusDevice for Blank {
            fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
            fn write(&mut self, _offset: u64, _data: &[u8]) {}
        }
        mmio.insert("other", 0xf000_0000, 0x1000, Arc::new(Mutex::new(Blank)))
            .unwrap();
        cfg_write(&mut root, 1, 0x10, 0xf000_0000);
        assert!(!mmio.claims(0xe000_0000));
        assert_eq!(root.list()[1].bars[0].address, None);
    }

    #[test]
    fn the_window_runs_out() {
        let mmio = Arc::new(Bus::new(Space::Mmio));
        let mut root = PciRoot::new(mmio);
        let window = PCI_MMIO_WINDOW.1 - PCI_MMIO_WINDOW.0;
        assert!(root.allocate_bar(0x1000_0000).is_ok());
        assert!(matches!(
            root.allocate_bar(window.next_power_of_two()),
            Err(PciError::NoBarSpace(_))
        ));
    }

    #[test]
    fn bus_state_round_trips_and_restored_bars_map_where_the_guest_put_them() {
        let (mut root, _, _) = setup();
        cfg_write(&mut root, 1, 0x10, 0xe000_0000);
        cfg_write(&mut root, 1, 0x3c, 9);
        root.write(0, &(ENABLE | 1 << 11 | 0x3c).to_le_bytes());
        let json = serde_json::to_string(&root.state()).unwrap();
        let state: PciRootState = serde_json::from_str(&json).unwrap();
        let (mut back, mmio, dev) = setup();
        back.restore(&state).unwrap();
        assert_eq!(back.state(), root.state());
        // The address register survived: a data read needs no new address.
        let mut d = [0u8; 4];
        back.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d) & 0xff, 9);
        assert_eq!(cfg_read(&mut back, 1, 0x10), cfg_read(&mut root, 1, 0x10));
        assert!(mmio.claims(0xe000_0000) && !mmio.claims(PCI_MMIO_WINDOW.0));
        assert!(mmio.write(0xe000_0004, 1, &[7], &VmEvents::default()));
        assert_eq!(dev.lock().unwrap().1, vec![(0, 4, vec![7])]);
    }

    #[test]
    fn hostile_bus_states_are_refused_and_change_nothing() {
        let (mut root, mmio, _) = setup();
        let good = root.state();
        let mut bad = good.clone();
        bad.functions.pop();
        assert!(matches!(
            root.restore(&bad),
            Err(StateError::Mismatch { .. })
        ));
        let mut bad = good.clone();
        bad.functions[1].slot = 2;
        assert!(matches!(
            root.restore(&bad),
            Err(StateError::Mismatch { .. })
        ));
        let mut bad = good.clone();
        bad.functions[1].name = "other".into();
        assert!(root.restore(&bad).is_err());
        // The first function restores, the second refuses: the first is rolled back.
        let mut bad = good.clone();
        let mut bridge: ConfigState = from_json("x", &bad.functions[0].state).unwrap();
        bridge.regs[0x3c] = 5;
        bad.functions[0].state = to_json(&bridge);
        bad.functions[1].state = serde_json::json!({"regs": [1, 2]});
        assert!(matches!(root.restore(&bad), Err(StateError::Json { .. })));
        assert_eq!(root.state(), good);
        assert!(mmio.claims(PCI_MMIO_WINDOW.0));
    }
}
