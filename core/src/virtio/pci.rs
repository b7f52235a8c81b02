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
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::{PauseGate, WorkerLink};
use super::{features, status, Activation, Interrupt, VirtioDevice, VirtioError, NO_VECTOR};
use crate::memory::GuestRam;
use crate::pci::config::{ConfigState, PciConfig, PciIdentity};
use crate::pci::msix::{MsiSink, Msix, MSIX_CAPABILITY_ID};
use crate::pci::root::PciDevice;
use crate::state::{check_bits, check_len, check_max, from_json, to_json, StateError};

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

/// Where a running queue stands: virtio-queue's `next_avail` / `next_used`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePosition {
    pub next_avail: u16,
    pub next_used: u16,
}

/// Status bits a driver can set, and NEEDS_RESET, which the device sets.
const STATUS_BITS: u8 = status::ACKNOWLEDGE
    | status::DRIVER
    | status::DRIVER_OK
    | status::FEATURES_OK
    | status::NEEDS_RESET
    | status::FAILED;
/// ISR bits: a queue interrupt and a configuration change.
const ISR_BITS: u8 = 0x3;

/// The transport's state as plain data (snapshots write it out).
///
/// A running device's queue positions are saved as its used ring's index
/// (which the device writes after every used element) for both `next_avail`
/// and `next_used`: the restored device is a fresh one that holds no popped
/// request, so it starts again from the first request not yet answered. That
/// is exact for devices that answer in order (rng); a device that answers out
/// of order must drain before its state is taken, which [`VirtioPci::pause`]
/// (called by `Vm::pause`) guarantees: a paused device holds no popped
/// request but the balloon's statistics buffer, which it keeps by design.
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
    /// The ISR status (read clears it).
    pub isr: u8,
    /// Each queue's position (zero unless the device runs).
    pub positions: Vec<QueuePosition>,
    /// The device's own state ([`VirtioDevice::save_state`]).
    pub device: serde_json::Value,
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
    /// The device's workers' pause gate and dirty-page record.
    link: WorkerLink,
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
            link: WorkerLink {
                gate: Arc::new(PauseGate::default()),
                dirty: Some(mem.dirty_pages().clone()),
            },
            mem,
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
            if let Err(_e) = self.activate(None) {
                self.needs_reset.store(1, Ordering::Release);
            }
        }
    }

    /// Starts the device on the enabled queues, at `positions` when restoring.
    fn activate(&mut self, positions: Option<&[QueuePosition]>) -> Result<(), VirtioError> {
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
            let at = positions
                .and_then(|p| p.get(i))
                .copied()
                .unwrap_or_default();
            let q = Queue::try_from(QueueState {
                max_size: c.max_size,
                next_avail: at.next_avail,
                next_used: at.next_used,
                event_idx_enabled: event_idx,
                size: c.size,
                ready: true,
                desc_table: c.desc,
                avail_ring: c.driver,
                used_ring: c.device,
            })
            .map_err(|_| VirtioError::BadQueue(i))?;
            if !q.is_valid(self.mem.mmap()) {
                return Err(VirtioError::BadQueue(i));
            }
            queues.push(Some(q));
        }
        let enabled: Vec<&Queue> = queues.iter().flatten().collect();
        if let Some(i) = super::used_ring_overlaps_avail_ring(&enabled) {
            return Err(VirtioError::BadQueue(i));
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
            link: self.link.clone(),
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
        let positions = self
            .queues
            .iter()
            .map(|q| {
                if !(self.active && q.enabled) {
                    return QueuePosition::default();
                }
                // The used ring's idx, which the device stores after each
                // used element (the ring was checked inside RAM at DRIVER_OK).
                let idx: u16 = self
                    .mem
                    .mmap()
                    .read_obj(GuestAddress(q.device.wrapping_add(2)))
                    .unwrap_or(0);
                QueuePosition {
                    next_avail: idx,
                    next_used: idx,
                }
            })
            .collect();
        TransportState {
            isr: self.isr.load(Ordering::Acquire),
            positions,
            device: self.device.save_state(),
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

    /// Restores a saved state onto this transport, built for the same kind
    /// of device. Every field is checked before anything changes: queue and
    /// vector counts, maximum sizes, vectors inside the MSI-X table, status,
    /// ISR and feature bits this function offers, the PCI space against the
    /// function as built, and MSI-X's enable bits against it. A device the
    /// state shows running (DRIVER_OK, no FAILED or NEEDS_RESET) is activated
    /// again with its queues at the saved positions and each queue kicked
    /// once, so requests the driver published meanwhile are served. When the
    /// device refuses its own state or its queues cannot start, the function
    /// is left reset (as after a driver's reset) and the error returned.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), StateError> {
        let vectors = self.msix.vectors();
        let vector = |what: &'static str, v: u16| {
            if v == NO_VECTOR {
                Ok(())
            } else {
                check_max(what, v.into(), u64::from(vectors) - 1)
            }
        };
        check_len("virtio queues", state.queues.len(), self.queues.len())?;
        check_len(
            "virtio queue positions",
            state.positions.len(),
            self.queues.len(),
        )?;
        for (saved, built) in state.queues.iter().zip(&self.queues) {
            if saved.max_size != built.max_size {
                return Err(StateError::mismatch(
                    "virtio queue",
                    format!("maximum size {} is not {}", saved.max_size, built.max_size),
                ));
            }
            vector("virtio queue vector", saved.vector)?;
        }
        vector("virtio config vector", state.config_vector)?;
        check_bits("virtio status", state.status.into(), STATUS_BITS.into())?;
        check_bits("virtio ISR", state.isr.into(), ISR_BITS.into())?;
        check_bits(
            "virtio driver features",
            state.driver_features,
            self.offered(),
        )?;
        let features_ok = state.status & status::FEATURES_OK != 0;
        if features_ok && state.driver_features & features::VERSION_1 == 0 {
            return Err(StateError::invalid(
                "virtio status",
                "FEATURES_OK without VERSION_1",
            ));
        }
        let running = state.status & status::DRIVER_OK != 0
            && state.status & (status::FAILED | status::NEEDS_RESET) == 0;
        if running && !features_ok {
            return Err(StateError::invalid(
                "virtio status",
                "DRIVER_OK without FEATURES_OK",
            ));
        }
        for ((q, p), i) in state.queues.iter().zip(&state.positions).zip(0..) {
            if running && q.enabled {
                check_max(
                    "virtio requests in flight",
                    p.next_avail.wrapping_sub(p.next_used).into(),
                    q.size.into(),
                )?;
            } else if *p != QueuePosition::default() {
                return Err(StateError::invalid(
                    "virtio queue position",
                    format!("queue {i} does not run but has a position"),
                ));
            }
        }
        let config = self.config.from_state(&state.pci)?;
        let control = config.u16_at(self.msix_capability + 2);
        if (control & 0x8000 != 0, control & 0x4000 != 0)
            != (state.msix.enabled, state.msix.function_masked)
        {
            return Err(StateError::mismatch(
                "MSI-X",
                "the enable bits differ from the capability's",
            ));
        }
        self.msix.restore(&state.msix)?;
        // Checked: from here on the state is applied.
        self.reset();
        self.config = config;
        let refused = |transport: &mut VirtioPci, e: VirtioError| {
            transport.reset();
            StateError::invalid("virtio device", e.to_string())
        };
        if let Err(e) = self.device.restore_state(&state.device) {
            return Err(refused(self, e));
        }
        self.status = state.status & !status::NEEDS_RESET;
        self.device_feature_select = state.device_feature_select;
        self.driver_feature_select = state.driver_feature_select;
        self.driver_features = state.driver_features;
        self.config_generation = state.config_generation;
        self.queue_select = state.queue_select;
        self.queues.clone_from(&state.queues);
        for (q, v) in self.queues.iter().zip(self.queue_vectors.iter()) {
            v.store(q.vector, Ordering::Release);
        }
        self.config_vector
            .store(state.config_vector, Ordering::Release);
        self.isr.store(state.isr, Ordering::Release);
        self.needs_reset.store(
            u8::from(state.status & status::NEEDS_RESET != 0),
            Ordering::Release,
        );
        if running {
            if let Err(e) = self.activate(Some(&state.positions)) {
                return Err(refused(self, e));
            }
            for (q, kick) in self.queues.iter().zip(&self.kicks) {
                if q.enabled {
                    // A spurious kick is harmless; a lost one would stall.
                    let _ = kick.write(1);
                }
            }
        }
        Ok(())
    }

    /// Passes a runtime request to the device (refused while paused: some
    /// write guest memory, a transport reset its event queue). What it
    /// writes is recorded while dirty pages are tracked.
    pub fn control(
        &mut self,
        request: &serde_json::Value,
    ) -> Result<serde_json::Value, super::VirtioError> {
        if self.link.gate.is_paused() {
            return Err(VirtioError::Paused);
        }
        let device = &mut self.device;
        crate::dirty::with_thread_log(self.link.dirty.clone(), || device.control(request))
    }

    /// Quiesces the device: its workers finish the requests they popped
    /// (answered in the used ring; interrupts may stay pending) and pop no
    /// other until [`VirtioPci::resume`]; host input waits in its TAP or
    /// sockets. Returns once no worker serves anything, or
    /// [`VirtioError::PauseTimeout`] after `timeout` (the gate stays closed:
    /// call [`VirtioPci::resume`] to undo).
    pub fn pause(&self, timeout: std::time::Duration) -> Result<(), VirtioError> {
        if self.link.gate.pause(timeout) {
            Ok(())
        } else {
            Err(VirtioError::PauseTimeout(timeout.as_millis()))
        }
    }

    /// Lets a paused device's workers go on, and kicks each of its running
    /// queues once (a kick the driver made while it was paused was perhaps
    /// already consumed; a spurious one is harmless).
    pub fn resume(&self) {
        let was_paused = self.link.gate.is_paused();
        self.link.gate.resume();
        if was_paused && self.active {
            for (q, kick) in self.queues.iter().zip(&self.kicks) {
                if q.enabled {
                    let _ = kick.write(1);
                }
            }
        }
    }

    /// Hands the device's host resources over (see
    /// [`super::VirtioDevice::hand_over`]); refused while it runs (active and
    /// not paused).
    pub fn hand_over(&mut self) -> Result<(), VirtioError> {
        if self.active && !self.link.gate.is_paused() {
            return Err(VirtioError::Running);
        }
        self.device.hand_over()
    }

    /// Claims the device's host resources (see
    /// [`super::VirtioDevice::take_over`]).
    pub fn take_over(&mut self) -> Result<(), VirtioError> {
        self.device.take_over()
    }

    /// Whether the device is paused.
    pub fn is_paused(&self) -> bool {
        self.link.gate.is_paused()
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

    fn save_state(&self) -> serde_json::Value {
        to_json(&self.state())
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), StateError> {
        let state: TransportState = from_json("virtio-pci function", state)?;
        self.restore(&state)
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

    /// Sets queue 0 up with its rings at `desc`, `avail`, `used` and sets
    /// DRIVER_OK; returns the status read back.
    fn start_with_rings(d: &mut TestDriver, desc: u64, avail: u64, used: u64) -> u8 {
        use status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
        d.write(0x14, &[0]);
        d.write(0x14, &[ACKNOWLEDGE | DRIVER]);
        d.write(8, &1u32.to_le_bytes());
        d.write(12, &1u32.to_le_bytes());
        d.write(0x14, &[ACKNOWLEDGE | DRIVER | FEATURES_OK]);
        d.write(0x16, &0u16.to_le_bytes());
        d.write(0x20, &desc.to_le_bytes());
        d.write(0x28, &avail.to_le_bytes());
        d.write(0x30, &used.to_le_bytes());
        d.write(0x1c, &1u16.to_le_bytes());
        d.write(0x14, &[ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK]);
        d.read8(0x14)
    }

    #[test]
    fn a_used_ring_over_an_avail_ring_is_refused_at_driver_ok() {
        // Found by the fuzz targets: with the used ring on the avail ring,
        // each used element the device adds announced another chain and
        // its worker never left the queue.
        let mut d = TestDriver::new(Box::new(Rng::default()));
        let st = start_with_rings(&mut d, 0x10_0000, 0x10_2000, 0x10_2000);
        assert_ne!(st & status::NEEDS_RESET, 0, "status {st:#x}");
        // Overlapping by the last bytes only is refused too; apart, accepted.
        let st = start_with_rings(&mut d, 0x10_0000, 0x10_2000, 0x10_2000 + 6 + 2 * 256 - 4);
        assert_ne!(st & status::NEEDS_RESET, 0, "status {st:#x}");
        let st = start_with_rings(&mut d, 0x10_0000, 0x10_2000, 0x10_3000);
        assert_eq!(st & status::NEEDS_RESET, 0, "status {st:#x}");
        assert_ne!(st & status::DRIVER_OK, 0, "status {st:#x}");
    }

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
        let _ = d.post(0, &[Buf::writable(BUFFERS, 4)]);
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

    /// Reads the whole common configuration, every queue selected in turn.
    fn common_view(d: &mut TestDriver) -> Vec<u32> {
        let mut view = Vec::new();
        let select = d.read32(0x14) >> 16;
        for q in 0..2u16 {
            d.write(0x16, &q.to_le_bytes());
            for at in (0..COMMON_LEN).step_by(4) {
                view.push(d.read32(at));
            }
        }
        d.write(0x16, &(select as u16).to_le_bytes());
        view
    }

    fn random_buf(d: &mut TestDriver, len: u32) -> (u32, u32) {
        let buf = Buf {
            addr: BUFFERS,
            len,
            write: true,
        };
        let head = d.post(0, &[buf]);
        let (id, n) = d.wait_used(0).expect("the device answers");
        assert_eq!(id, head as u32);
        (id, n)
    }

    #[test]
    fn a_running_rng_restored_from_json_keeps_serving_requests() {
        let mut d = TestDriver::new(Box::new(Rng::default()));
        d.start(0);
        for _ in 0..5 {
            assert_eq!(random_buf(&mut d, 32).1, 32);
        }
        let fired_before = d.irqs.fired.lock().unwrap().len();
        assert!(fired_before > 0);
        // A request published but not kicked when the state is taken.
        let pending = d.post_quietly(0, &[Buf::writable(BUFFERS + 0x1000, 16)]);
        let before = common_view(&mut d);
        let json = serde_json::to_string(&d.dev.state()).unwrap();
        let state: TransportState = serde_json::from_str(&json).unwrap();
        assert_eq!(
            state.positions[0],
            QueuePosition {
                next_avail: 5,
                next_used: 5
            }
        );
        let mut d = d.restored(Box::new(Rng::default()), &state).unwrap();
        assert_eq!(d.dev.state(), state);
        assert_eq!(common_view(&mut d), before);
        assert_eq!(d.read8(0x14), 15, "DRIVER_OK, FEATURES_OK, no NEEDS_RESET");
        // The MSI-X routes are back, and the restore's kick serves the
        // request published before it.
        assert_eq!(d.irqs.routes.lock().unwrap().len(), 2);
        assert_eq!(d.wait_used(0), Some((pending as u32, 16)));
        for _ in 0..300 {
            // Past the ring's size: the indexes wrap as on the original.
            assert_eq!(random_buf(&mut d, 8).1, 8);
        }
        // Every answer raised the queue's vector (0) on the restored MSI-X.
        assert_eq!(d.irqs.fired.lock().unwrap().len(), 301);
        assert!(d.irqs.fired.lock().unwrap().iter().all(|&v| v == 0));
        // The driver can still reset and start it again.
        assert_eq!(d.start(0), 15);
        assert_eq!(random_buf(&mut d, 4).1, 4);
    }

    #[test]
    fn stopped_and_broken_transports_restore_without_running() {
        // Mid-negotiation: features chosen, no DRIVER_OK.
        let mut d = TestDriver::new(Box::new(Rng::default()));
        d.write(0x14, &[status::ACKNOWLEDGE | status::DRIVER]);
        d.write(8, &1u32.to_le_bytes());
        d.write(12, &1u32.to_le_bytes());
        d.write(0x16, &0u16.to_le_bytes());
        d.write(0x18, &64u16.to_le_bytes());
        let state = d.dev.state();
        let before = common_view(&mut d);
        let mut d = d.restored(Box::new(Rng::default()), &state).unwrap();
        assert_eq!(common_view(&mut d), before);
        // A device that asked for a reset still does after the restore.
        let mut d = TestDriver::new(Box::new(Rng::default()));
        d.start(0);
        d.write(0x20, &0x20_0000u64.to_le_bytes()); // rewrites a running queue
        let state = d.dev.state();
        assert_ne!(state.status & status::NEEDS_RESET, 0);
        let mut d = d.restored(Box::new(Rng::default()), &state).unwrap();
        assert_ne!(d.read8(0x14) & status::NEEDS_RESET, 0);
        assert_eq!(d.start(0), 15, "a reset clears it");
        assert_eq!(random_buf(&mut d, 4).1, 4);
    }

    #[test]
    fn hostile_transport_states_are_refused() {
        let mut d = TestDriver::new(Box::new(Rng::default()));
        d.start(0);
        random_buf(&mut d, 8);
        let good = d.dev.state();
        type Spoiler = (&'static str, fn(&mut TransportState));
        let spoilers: Vec<Spoiler> = vec![
            ("a second queue", |s| s.queues.push(s.queues[0])),
            ("no positions", |s| s.positions.clear()),
            ("another maximum size", |s| s.queues[0].max_size = 1024),
            ("a vector past the table", |s| s.queues[0].vector = 2),
            ("a config vector past it", |s| s.config_vector = 0x100),
            ("an unknown status bit", |s| s.status |= 0x10),
            ("an ISR bit", |s| s.isr = 0x80),
            ("an unoffered feature", |s| s.driver_features |= 1 << 40),
            ("FEATURES_OK without VERSION_1", |s| s.driver_features = 0),
            ("DRIVER_OK without FEATURES_OK", |s| s.status = 7),
            ("a queue size that is no power of two", |s| {
                s.queues[0].size = 100
            }),
            ("rings outside RAM", |s| s.queues[0].desc = 1 << 40),
            ("more in flight than the queue holds", |s| {
                s.positions[0].next_avail = s.positions[0].next_used.wrapping_add(300)
            }),
            ("a position on a stopped queue", |s| {
                s.status = 0;
                s.positions[0].next_used = 3;
            }),
            ("MSI-X off in the state, on in the capability", |s| {
                s.msix.enabled = false
            }),
            ("a vendor changed", |s| s.pci.regs[0] = 0),
            ("a device state for a device without one", |s| {
                s.device = serde_json::json!({"x": 1})
            }),
        ];
        for (what, spoil) in spoilers {
            let mut bad = good.clone();
            spoil(&mut bad);
            let mut fresh = TestDriver::new(Box::new(Rng::default()));
            assert!(fresh.dev.restore(&bad).is_err(), "{what}");
            assert!(!fresh.dev.describe()["active"].as_bool().unwrap(), "{what}");
        }
        // JSON of the wrong shape through the PCI device interface.
        let mut fresh = TestDriver::new(Box::new(Rng::default()));
        assert!(matches!(
            fresh.dev.restore_state(&serde_json::json!({"status": 4})),
            Err(StateError::Json { .. })
        ));
        // The good state still restores, onto the same guest (its rings).
        let mut d = d.restored(Box::new(Rng::default()), &good).unwrap();
        assert_eq!(d.dev.state(), good);
        assert_eq!(random_buf(&mut d, 8).1, 8);
    }
}
