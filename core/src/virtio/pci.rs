//! The virtio-pci (modern, VIRTIO 1.x) transport.
//!
//! One 64-bit memory BAR of 32 KiB holds every structure the capabilities
//! point at:
//!
//! | offset | structure |
//! | --- | --- |
//! | 0x0000 | common configuration (features, status, queue setup) |
//! | 0x1000 | ISR status (read clears) |
//! | 0x2000 | device-specific configuration |
//! | 0x3000 | queue notify: queue `q` at `0x3000 + 4 q` (an ioeventfd each) |
//! | 0x4000 | MSI-X table |
//! | 0x6000 | MSI-X pending bits |

use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{features, status, Activation, Interrupt, VirtioDevice, VirtioError, NO_VECTOR};
use crate::memory::GuestRam;
use crate::pci::config::{ConfigState, PciConfig, PciIdentity};
use crate::pci::msix::{MsiSink, Msix, MSIX_CAPABILITY_ID};
use crate::pci::root::PciDevice;

/// The BAR's size.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u64 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
/// The vendor-specific capability virtio structures use.
const VENDOR_CAPABILITY: u8 = 0x09;
/// The virtio vendor ID, and the first modern device ID (0x1040 + type).
const VIRTIO_VENDOR: u16 = 0x1af4;
const MODERN_DEVICE_BASE: u16 = 0x1040;
/// The most queues a device here has.
const MAX_QUEUES: usize = 64;

/// The setup of one queue, as the driver wrote it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub enabled: bool,
    pub vector: u16,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// The transport's state as plain data (snapshots write it out).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub pci: ConfigState,
    pub msix: crate::pci::msix::MsixState,
    pub status: u8,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub config_vector: u16,
    pub queue_select: u16,
    pub queues: Vec<QueueConfig>,
    pub config_generation: u8,
}

/// A virtio device behind its PCI function.
pub struct VirtioPci {
    config: PciConfig,
    msix_capability: usize,
    msix: Arc<Msix>,
    device: Box<dyn VirtioDevice>,
    mem: GuestRam,
    vm: Option<Arc<VmFd>>,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueConfig>,
    queue_vectors: Arc<[AtomicU16]>,
    config_vector: Arc<AtomicU16>,
    isr: Arc<AtomicU8>,
    needs_reset: Arc<AtomicU8>,
    kicks: Vec<EventFd>,
    /// Where the BAR is decoded (and the ioeventfds registered).
    bar: Option<u64>,
    active: bool,
}

fn pci_class(device_type: u16) -> [u8; 3] {
    match device_type {
        super::device_type::NET => [0x02, 0x00, 0x00],
        super::device_type::BLOCK => [0x01, 0x80, 0x00],
        _ => [0xff, 0x00, 0x00],
    }
}

/// A virtio capability's body: cfg_type, BAR, offset, length (+ extra).
fn virtio_capability(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let cap_len = 16 + extra.len() as u8;
    let mut body = vec![cap_len, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

impl VirtioPci {
    /// Wraps `device` in a function whose BAR sits at `bar_address`, with
    /// interrupts through `sink` and ioeventfds on `vm` (none in unit tests:
    /// notify writes then reach the transport).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestRam,
        vm: Option<Arc<VmFd>>,
        sink: Arc<dyn MsiSink>,
        bar_address: u64,
    ) -> Result<VirtioPci, VirtioError> {
        let sizes = device.queue_sizes();
        if sizes.is_empty() || sizes.len() > MAX_QUEUES {
            return Err(VirtioError::Malformed(format!(
                "a device needs 1 to {MAX_QUEUES} queues, this one has {}",
                sizes.len()
            )));
        }
        let device_type = device.device_type();
        let mut config = PciConfig::new(PciIdentity {
            vendor: VIRTIO_VENDOR,
            device: MODERN_DEVICE_BASE + device_type,
            class: pci_class(device_type),
            revision: 1,
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: 0x40,
        });
        let bad = |e: crate::pci::config::ConfigError| VirtioError::Malformed(e.to_string());
        config.add_bar64(0, BAR_SIZE, bar_address).map_err(bad)?;
        let msix = Arc::new(Msix::new(sizes.len() as u16 + 1, sink));
        let (body, mask) = msix.capability(0, MSIX_TABLE as u32, MSIX_PBA as u32);
        let msix_capability = config
            .add_capability(MSIX_CAPABILITY_ID, &body, &mask)
            .map_err(bad)?;
        let caps: [(u8, u64, u64, Vec<u8>); 4] = [
            (1, COMMON, COMMON_LEN, vec![]),
            (3, ISR, 1, vec![]),
            (4, DEVICE, DEVICE_LEN, vec![]),
            (
                2,
                NOTIFY,
                NOTIFY_MULTIPLIER * sizes.len() as u64,
                (NOTIFY_MULTIPLIER as u32).to_le_bytes().to_vec(),
            ),
        ];
        for (cfg_type, offset, length, extra) in caps {
            let body = virtio_capability(cfg_type, offset, length, &extra);
            config
                .add_capability(VENDOR_CAPABILITY, &body, &[])
                .map_err(bad)?;
        }
        let mut kicks = Vec::with_capacity(sizes.len());
        for _ in &sizes {
            kicks.push(
                EventFd::new(EFD_NONBLOCK).map_err(|source| VirtioError::Io {
                    op: "creating a queue kick eventfd",
                    source,
                })?,
            );
        }
        let queues = sizes
            .iter()
            .map(|&max| QueueConfig {
                max_size: max,
                size: max,
                vector: NO_VECTOR,
                ..Default::default()
            })
            .collect();
        Ok(VirtioPci {
            config,
            msix_capability,
            msix,
            device,
            mem,
            vm,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
            queue_vectors: sizes.iter().map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            config_vector: Arc::new(AtomicU16::new(NO_VECTOR)),
            isr: Arc::new(AtomicU8::new(0)),
            needs_reset: Arc::new(AtomicU8::new(0)),
            kicks,
            bar: None,
            active: false,
        })
    }

    /// Every feature offered.
    fn offered(&self) -> u64 {
        self.device.features()
            | features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
    }

    /// The status the driver reads.
    fn status(&self) -> u8 {
        if self.needs_reset.load(Ordering::Acquire) != 0 {
            self.status | status::NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The common configuration as the driver sees it now.
    fn common_image(&self) -> [u8; COMMON_LEN as usize] {
        let mut b = [0u8; COMMON_LEN as usize];
        let feature_word = |select: u32, features: u64| match select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        b[0..4].copy_from_slice(&self.device_feature_select.to_le_bytes());
        b[4..8].copy_from_slice(
            &feature_word(self.device_feature_select, self.offered()).to_le_bytes(),
        );
        b[8..12].copy_from_slice(&self.driver_feature_select.to_le_bytes());
        b[12..16].copy_from_slice(
            &feature_word(self.driver_feature_select, self.driver_features).to_le_bytes(),
        );
        b[0x10..0x12].copy_from_slice(&self.config_vector.load(Ordering::Acquire).to_le_bytes());
        b[0x12..0x14].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        b[0x14] = self.status();
        b[0x15] = self.config_generation;
        b[0x16..0x18].copy_from_slice(&self.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(self.queue_select as usize) {
            b[0x18..0x1a].copy_from_slice(&q.size.to_le_bytes());
            b[0x1a..0x1c].copy_from_slice(&q.vector.to_le_bytes());
            b[0x1c..0x1e].copy_from_slice(&(q.enabled as u16).to_le_bytes());
            b[0x1e..0x20].copy_from_slice(&self.queue_select.to_le_bytes());
            b[0x20..0x28].copy_from_slice(&q.desc.to_le_bytes());
            b[0x28..0x30].copy_from_slice(&q.driver.to_le_bytes());
            b[0x30..0x38].copy_from_slice(&q.device.to_le_bytes());
        }
        b
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let start = offset as usize;
        let Some(end) = start
            .checked_add(data.len())
            .filter(|&e| e <= COMMON_LEN as usize)
        else {
            return;
        };
        let mut b = self.common_image();
        b[start..end].copy_from_slice(data);
        let touched = |at: usize, len: usize| start < at + len && at < end;
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| (u32_at(at) as u64) | ((u32_at(at + 4) as u64) << 32);
        if touched(0, 4) {
            self.device_feature_select = u32_at(0);
        }
        if touched(8, 4) {
            self.driver_feature_select = u32_at(8);
        }
        if touched(12, 4) && self.status & status::FEATURES_OK == 0 {
            let word = u32_at(12) as u64;
            match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | word,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (word << 32),
                _ => {}
            }
        }
        if touched(0x10, 2) {
            let v = self.checked_vector(u16_at(0x10));
            self.config_vector.store(v, Ordering::Release);
        }
        if touched(0x14, 1) {
            self.write_status(b[0x14]);
        }
        if touched(0x16, 2) {
            self.queue_select = u16_at(0x16);
        }
        let q = self.queue_select as usize;
        if q >= self.queues.len() {
            return;
        }
        if touched(0x1a, 2) {
            let v = self.checked_vector(u16_at(0x1a));
            self.queues[q].vector = v;
            self.queue_vectors[q].store(v, Ordering::Release);
        }
        let setup = touched(0x18, 2) || touched(0x1c, 2) || touched(0x20, 0x18);
        if setup && self.active {
            // The driver rewrote a queue under a running device: stop it.
            self.device.reset();
            self.active = false;
            self.needs_reset.store(1, Ordering::Release);
            return;
        }
        let queue = &mut self.queues[q];
        if touched(0x18, 2) {
            queue.size = u16_at(0x18);
        }
        if touched(0x1c, 2) {
            queue.enabled = u16_at(0x1c) == 1;
        }
        if touched(0x20, 8) {
            queue.desc = u64_at(0x20);
        }
        if touched(0x28, 8) {
            queue.driver = u64_at(0x28);
        }
        if touched(0x30, 8) {
            queue.device = u64_at(0x30);
        }
    }

    /// A vector the MSI-X table has, or NO_VECTOR (what the driver reads back
    /// to learn the assignment failed).
    fn checked_vector(&self, v: u16) -> u16 {
        if v < self.msix.vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for (q, v) in self.queues.iter_mut().zip(self.queue_vectors.iter()) {
            *q = QueueConfig {
                max_size: q.max_size,
                size: q.max_size,
                vector: NO_VECTOR,
                ..Default::default()
            };
            v.store(NO_VECTOR, Ordering::Release);
        }
        self.isr.store(0, Ordering::Release);
        self.needs_reset.store(0, Ordering::Release);
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value & !status::NEEDS_RESET;
        if value & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let acceptable = self.driver_features & !self.offered() == 0
                && self.driver_features & features::VERSION_1 != 0;
            if !acceptable {
                // The driver reads FEATURES_OK back and gives up.
                value &= !status::FEATURES_OK;
            }
        }
        self.status = value;
        if value & status::DRIVER_OK != 0 && !self.active && value & status::FAILED == 0 {
            if let Err(_e) = self.activate() {
                self.needs_reset.store(1, Ordering::Release);
            }
        }
    }

    fn activate(&mut self) -> Result<(), VirtioError> {
        if self.status & status::FEATURES_OK == 0 {
            return Err(VirtioError::Malformed(
                "DRIVER_OK without FEATURES_OK".into(),
            ));
        }
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, c) in self.queues.iter().enumerate() {
            if !c.enabled {
                queues.push(None);
                continue;
            }
            let mut q = Queue::new(c.max_size).map_err(|_| VirtioError::BadQueue(i))?;
            q.try_set_size(c.size)
                .map_err(|_| VirtioError::BadQueue(i))?;
            q.set_desc_table_address(Some(c.desc as u32), Some((c.desc >> 32) as u32));
            q.set_avail_ring_address(Some(c.driver as u32), Some((c.driver >> 32) as u32));
            q.set_used_ring_address(Some(c.device as u32), Some((c.device >> 32) as u32));
            q.set_event_idx(event_idx);
            q.set_ready(true);
            if !q.is_valid(self.mem.mmap()) {
                return Err(VirtioError::BadQueue(i));
            }
            queues.push(Some(q));
        }
        let mut kicks = Vec::with_capacity(self.kicks.len());
        for k in &self.kicks {
            kicks.push(k.try_clone().map_err(|source| VirtioError::Io {
                op: "duplicating a kick eventfd",
                source,
            })?);
        }
        self.device.activate(Activation {
            mem: self.mem.clone(),
            queues,
            kicks,
            interrupt: Interrupt {
                msix: self.msix.clone(),
                queue_vectors: self.queue_vectors.clone(),
                config_vector: self.config_vector.clone(),
                isr: self.isr.clone(),
            },
            features: self.driver_features,
            needs_reset: self.needs_reset.clone(),
        })?;
        self.active = true;
        Ok(())
    }

    /// Registers (or removes) the queues' ioeventfds at the BAR's address.
    fn set_ioeventfds(&mut self, address: Option<u64>) {
        let Some(vm) = self.vm.clone() else {
            self.bar = address;
            return;
        };
        if let Some(old) = self.bar.take() {
            for (q, kick) in self.kicks.iter().enumerate() {
                let at = IoEventAddress::Mmio(old + NOTIFY + NOTIFY_MULTIPLIER * q as u64);
                let _ = vm.unregister_ioevent(kick, &at, NoDatamatch);
            }
        }
        if let Some(new) = address {
            for (q, kick) in self.kicks.iter().enumerate() {
                let at = IoEventAddress::Mmio(new + NOTIFY + NOTIFY_MULTIPLIER * q as u64);
                // Without the ioeventfd the write exits and `bar_write` kicks.
                let _ = vm.register_ioevent(kick, &at, NoDatamatch);
            }
        }
        self.bar = address;
    }

    /// The transport's state as plain data.
    pub fn state(&self) -> TransportState {
        TransportState {
            pci: self.config.state().clone(),
            msix: self.msix.state(),
            status: self.status(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            config_vector: self.config_vector.load(Ordering::Acquire),
            queue_select: self.queue_select,
            queues: self.queues.clone(),
            config_generation: self.config_generation,
        }
    }

    /// Passes a runtime request to the device.
    pub fn control(
        &mut self,
        request: &serde_json::Value,
    ) -> Result<serde_json::Value, super::VirtioError> {
        self.device.control(request)
    }

    /// How many kick eventfds are live (for leak checks).
    pub fn kick_fds(&self) -> Vec<i32> {
        self.kicks.iter().map(|k| k.as_raw_fd()).collect()
    }
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_written(&mut self, offset: usize, len: usize) {
        let control = self.msix_capability + 2;
        if offset < control + 2 && control < offset + len {
            self.msix.set_control(self.config.u16_at(control));
        }
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < COMMON + COMMON_LEN => {
                let image = self.common_image();
                super::read_config_bytes(&image, o, data);
            }
            ISR => {
                if let Some(b) = data.first_mut() {
                    *b = self.isr.swap(0, Ordering::AcqRel);
                }
            }
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE, data);
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.table_len()).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE, data);
            }
            o if (MSIX_PBA..MSIX_PBA + self.msix.pba_len()).contains(&o) => {
                self.msix.read_pba(o - MSIX_PBA, data);
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON + COMMON_LEN => self.write_common(o, data),
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE, data);
            }
            o if (NOTIFY..NOTIFY + NOTIFY_MULTIPLIER * self.kicks.len() as u64).contains(&o) => {
                let q = ((o - NOTIFY) / NOTIFY_MULTIPLIER) as usize;
                if let Some(kick) = self.kicks.get(q) {
                    let _ = kick.write(1);
                }
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.table_len()).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE, data);
            }
            _ => {}
        }
    }

    fn bar_mapped(&mut self, _bar: usize, address: Option<u64>) {
        self.set_ioeventfds(address);
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "virtioType": self.device.device_type(),
            "status": self.status(),
            "driverFeatures": format!("{:#x}", self.driver_features),
            "active": self.active,
            "queues": self.queues.iter().map(|q| serde_json::json!({
                "size": q.size, "maxSize": q.max_size, "enabled": q.enabled,
            })).collect::<Vec<_>>(),
            "msixEnabled": self.msix.enabled(),
            "device": self.device.describe(),
        })
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.set_ioeventfds(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::rng::Rng;
    use crate::virtio::test_driver::{Buf, TestDriver, BUFFERS};

    #[test]
    fn capabilities_describe_a_modern_device() {
        let d = TestDriver::new(Box::new(Rng::default()));
        let c = d.dev.config();
        assert_eq!(c.u32_at(0), 0x1044_1af4);
        let regs = &c.state().regs;
        let mut at = regs[0x34] as usize;
        let mut found = vec![];
        while at != 0 {
            if regs[at] == VENDOR_CAPABILITY {
                found.push((regs[at + 3], c.u32_at(at + 8), c.u32_at(at + 12)));
            } else {
                found.push((regs[at], 0, 0));
            }
            at = regs[at + 1] as usize;
        }
        assert_eq!(
            found,
            vec![
                (0x11, 0, 0),
                (1, 0, 0x38),
                (3, 0x1000, 1),
                (4, 0x2000, 0x1000),
                (2, 0x3000, 4)
            ]
        );
    }

    #[test]
    fn features_must_include_version_1_and_only_offered_bits() {
        let mut d = TestDriver::new(Box::new(Rng::default()));
        let offered = d.device_features();
        assert_ne!(offered & features::VERSION_1, 0);
        d.write(0x14, &[status::ACKNOWLEDGE | status::DRIVER]);
        d.write(8, &0u32.to_le_bytes());
        d.write(12, &0u32.to_le_bytes());
        d.write(0x14, &[status::FEATURES_OK | 3]);
        assert_eq!(
            d.read8(0x14) & status::FEATURES_OK,
            0,
            "no VERSION_1: refused"
        );
        d.write(0x14, &[0]);
        d.write(0x14, &[3]);
        d.write(8, &1u32.to_le_bytes());
        d.write(12, &(1u32 | 1 << 7).to_le_bytes());
        d.write(0x14, &[status::FEATURES_OK | 3]);
        assert_eq!(
            d.read8(0x14) & status::FEATURES_OK,
            0,
            "unoffered bit: refused"
        );
    }

    #[test]
    fn hostile_queue_setups_give_device_errors() {
        // A queue size that is not a power of two fails DRIVER_OK with NEEDS_RESET.
        let mut d = TestDriver::new(Box::new(Rng::default()));
        d.write(0x16, &0u16.to_le_bytes());
        d.write(0x18, &3u16.to_le_bytes());
        d.start(0);
        // `start` rewrites the size? No: it resets first, so set it after.
        d.write(0x14, &[0]);
        let mut d = TestDriver::new(Box::new(Rng::default()));
        d.start(0);
        d.write(0x14, &[0]);
        d.write(0x14, &[3]);
        d.write(12, &0u32.to_le_bytes());
        d.write(8, &1u32.to_le_bytes());
        d.write(12, &1u32.to_le_bytes());
        d.write(0x14, &[11]);
        d.write(0x16, &0u16.to_le_bytes());
        d.write(0x18, &3u16.to_le_bytes());
        d.write(0x20, &0x10_0000u64.to_le_bytes());
        d.write(0x1c, &1u16.to_le_bytes());
        d.write(0x14, &[15]);
        assert_ne!(d.read8(0x14) & status::NEEDS_RESET, 0, "bad size");
        // Rings outside guest RAM.
        d.write(0x14, &[0]);
        d.write(0x14, &[3]);
        d.write(8, &1u32.to_le_bytes());
        d.write(12, &1u32.to_le_bytes());
        d.write(0x14, &[11]);
        d.write(0x20, &(1u64 << 40).to_le_bytes());
        d.write(0x1c, &1u16.to_le_bytes());
        d.write(0x14, &[15]);
        assert_ne!(d.read8(0x14) & status::NEEDS_RESET, 0, "rings outside RAM");
        // A descriptor chain that loops: the device stops, nothing hangs.
        let mut d = TestDriver::new(Box::new(Rng::default()));
        d.start(0);
        d.set_desc(0, 0, BUFFERS, 16, 1 | 2, 1);
        d.set_desc(0, 1, BUFFERS, 16, 1 | 2, 0);
        d.publish(0, 0);
        // A chain that never ends is a broken queue, not a bounded request.
        assert!(d.wait_needs_reset());
        // Rewriting a queue while the device runs stops it.
        let mut d = TestDriver::new(Box::new(Rng::default()));
        d.start(0);
        d.write(0x20, &0x20_0000u64.to_le_bytes());
        assert_ne!(d.read8(0x14) & status::NEEDS_RESET, 0);
        // Vectors past the table read back as NO_VECTOR.
        d.write(0x1a, &7u16.to_le_bytes());
        let mut v = [0u8; 2];
        d.dev.bar_read(0, 0x1a, &mut v);
        assert_eq!(u16::from_le_bytes(v), NO_VECTOR);
        // Accesses past every structure are ignored.
        d.write(0x7ff0, &[1, 2, 3, 4]);
        d.write(0x37, &[1, 2, 3, 4]);
        let _ = d.post(
            0,
            &[Buf {
                addr: BUFFERS,
                len: 4,
                write: true,
            }],
        );
    }

    #[test]
    fn state_is_plain_data() {
        let mut d = TestDriver::new(Box::new(Rng::default()));
        d.start(0);
        let state = d.dev.state();
        let json = serde_json::to_string(&state).unwrap();
        let back: TransportState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.queues[0].vector, 0);
        assert!(back.msix.enabled);
    }
}
