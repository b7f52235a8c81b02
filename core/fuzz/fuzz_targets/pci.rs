//! The PCI configuration space and the virtio-pci transport behind it: the
//! guest's 0xCF8/0xCFC accesses (command register, BAR sizing and moves,
//! capabilities, MSI-X control), then its BAR accesses through the MMIO bus
//! (common configuration, feature negotiation, queue setup with ring
//! addresses, notify, ISR, device configuration, the MSI-X table and PBA),
//! on an rng or a balloon device over an arbitrary guest RAM image.
#![no_main]

use std::sync::{Arc, Mutex};

use denovisor_core::devices::bus::{Bus, BusDevice, Space, VmEvents};
use denovisor_core::pci::msix::MsiSink;
use denovisor_core::pci::root::PciRoot;
use denovisor_core::virtio::balloon::{Balloon, BalloonConfig};
use denovisor_core::virtio::pci::VirtioPci;
use denovisor_core::virtio::rng::Rng;
use denovisor_core::virtio::VirtioDevice;
use denovisor_fuzz::{fuzz_target, load_image, ram, Input};

struct Nowhere;
impl MsiSink for Nowhere {
    fn set_route(&self, _vector: u16, _message: Option<(u64, u32)>) {}
    fn fire(&self, _vector: u16) {}
}

/// Accesses are 1, 2, 4 or 8 bytes wide.
fn width(b: u8) -> usize {
    1 << (b & 3)
}

fuzz_target!(|data| {
    let mut input = Input::new(data);
    let kind = input.u8();
    let ops = input.u8() as usize % 64;
    let script = input.bytes(ops * 12);
    let mem = ram();
    load_image(&mem, input.rest());
    let device: Box<dyn VirtioDevice> = if kind & 1 == 0 {
        Box::new(Rng::default())
    } else {
        Box::new(Balloon::new(BalloonConfig {
            stats_interval_ms: 0,
            ..BalloonConfig::default()
        }))
    };
    let mmio = Arc::new(Bus::new(Space::Mmio));
    let mut root = PciRoot::new(mmio.clone());
    let Ok(bar) = root.allocate_bar(0x8000) else {
        return;
    };
    let Ok(transport) = VirtioPci::new(device, mem.clone(), None, Arc::new(Nowhere), bar) else {
        return;
    };
    if root.add("fuzz", Arc::new(Mutex::new(transport))).is_err() {
        return;
    }
    let events = VmEvents::default();
    let mut script = Input::new(script);
    while !script.is_empty() {
        let op = script.u8();
        let w = width(script.u8());
        let offset = script.u16() as u64;
        let value = script.u64().to_le_bytes();
        let mut buf = [0u8; 8];
        match op % 6 {
            // Select a register of device 1 (bus 0), or anything.
            0 => root.write(0, &(0x8000_0800u32 | (offset as u32 & 0xfc)).to_le_bytes()),
            1 => root.write(0, &value[..4]),
            2 => root.write(4 + (offset & 3), &value[..w.min(4 - (offset as usize & 3))]),
            3 => root.read(
                4 + (offset & 3),
                &mut buf[..w.min(4 - (offset as usize & 3))],
            ),
            4 => {
                let at = bar + (offset % 0x8000);
                let _ = mmio.write(at, w, &value[..w], &events);
            }
            _ => {
                let at = bar + (offset % 0x8000);
                let _ = mmio.read(at, w, &mut buf[..w]);
            }
        }
    }
    let _ = root.state();
});
