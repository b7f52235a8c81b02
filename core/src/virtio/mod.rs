//! VIRTIO 1.x devices over PCI.
//!
//! A device ([`VirtioDevice`]) owns its function (blk, net, rng...) and knows
//! nothing of PCI; [`pci::VirtioPci`] is the transport: the modern virtio-pci
//! capabilities, feature negotiation, the queues' configuration and MSI-X.
//! When the driver sets DRIVER_OK the transport hands the device its queues,
//! one kick eventfd per queue (registered with KVM as an ioeventfd on the
//! queue's notify address, so a kick never exits to the vCPU thread) and an
//! [`Interrupt`] (MSI-X through irqfds), and the device runs them on its own
//! worker thread ([`worker::Worker`]).
//!
//! Every value the driver writes is checked: queue sizes, ring addresses
//! (inside guest RAM, aligned), descriptor chains (virtio-queue bounds them to
//! guest RAM and the queue size and refuses loops). A device that finds its
//! queue broken stops and sets DEVICE_NEEDS_RESET instead of touching anything
//! outside guest RAM.

pub mod balloon;
pub mod block;
pub mod devices;
pub mod net;
pub mod pci;
pub mod rng;
pub mod tap;
#[cfg(test)]
pub mod test_driver;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestRam;
use crate::pci::msix::Msix;

/// Device types (virtio spec 5).
pub mod device_type {
    pub const NET: u16 = 1;
    pub const BLOCK: u16 = 2;
    pub const RNG: u16 = 4;
    pub const BALLOON: u16 = 5;
    pub const VSOCK: u16 = 19;
}

/// Feature bits every device here offers.
pub mod features {
    /// VIRTIO 1.x (modern) device.
    pub const VERSION_1: u64 = 1 << 32;
    /// Descriptors may point at indirect tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
}

/// Device status bits (virtio spec 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// "No MSI-X vector" in the vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// Why a device cannot start or run.
#[derive(Debug, Error)]
pub enum VirtioError {
    /// A queue the driver configured is unusable (bad size or address).
    #[error("queue {0} is not valid (size, alignment or address outside guest RAM)")]
    BadQueue(usize),
    /// The device needs a queue the driver did not enable.
    #[error("queue {0} is required but not enabled")]
    QueueNotEnabled(usize),
    /// A host resource failed (eventfd, thread, file).
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    /// A descriptor chain, configuration or request breaks the device's rules.
    #[error("{0}")]
    Malformed(String),
    /// The device has no such runtime request.
    #[error("this device does not take the request {0}")]
    Unsupported(String),
    /// A worker did not finish the request it was serving in time to pause
    #[error("the device's worker did not stop within {0} ms to pause")]
    PauseTimeout(u128),
    /// A runtime request to a paused device (it may not touch guest memory)
    #[error("the device is paused: resume the VM first")]
    Paused,
    /// A hand-over of a device that is running (it could still write)
    #[error("the device is running: pause the VM before handing it over")]
    Running,
    /// The device cannot be attached (no irqchip, bus full, no BAR space).
    #[error("cannot attach the device: {0}")]
    Attach(String),
}

/// Raises a device's interrupts (MSI-X vectors the driver chose per queue).
pub struct Interrupt {
    msix: Arc<Msix>,
    queue_vectors: Arc<[AtomicU16]>,
    config_vector: Arc<AtomicU16>,
    isr: Arc<AtomicU8>,
}

impl Interrupt {
    /// Signals that queue `queue` has used buffers.
    pub fn queue(&self, queue: usize) {
        self.isr.fetch_or(1, Ordering::AcqRel);
        if let Some(v) = self.queue_vectors.get(queue) {
            let vector = v.load(Ordering::Acquire);
            if vector != NO_VECTOR {
                self.msix.notify(vector);
            }
        }
    }

    /// Signals a configuration change.
    pub fn config(&self) {
        self.isr.fetch_or(2, Ordering::AcqRel);
        let vector = self.config_vector.load(Ordering::Acquire);
        if vector != NO_VECTOR {
            self.msix.notify(vector);
        }
    }
}

#[cfg(feature = "fuzz")]
impl Interrupt {
    /// An interrupt line to nowhere (every vector masked, a sink that drops
    /// messages), for the fuzz targets that serve queues without a transport.
    #[doc(hidden)]
    pub fn detached(queues: usize) -> Interrupt {
        struct Nowhere;
        impl crate::pci::msix::MsiSink for Nowhere {
            fn set_route(&self, _vector: u16, _message: Option<(u64, u32)>) {}
            fn fire(&self, _vector: u16) {}
        }
        let vectors = u16::try_from(queues + 1).unwrap_or(u16::MAX);
        Interrupt {
            msix: Arc::new(Msix::new(vectors, Arc::new(Nowhere))),
            queue_vectors: (0..queues).map(|q| AtomicU16::new(q as u16)).collect(),
            config_vector: Arc::new(AtomicU16::new(NO_VECTOR)),
            isr: Arc::new(AtomicU8::new(0)),
        }
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest RAM (every queue access is bounded to it).
    pub mem: GuestRam,
    /// The enabled queues, by index (`None`: not enabled by the driver).
    pub queues: Vec<Option<Queue>>,
    /// One kick eventfd per queue (signalled by KVM on a notify write).
    pub kicks: Vec<EventFd>,
    /// The interrupt line to the driver.
    pub interrupt: Interrupt,
    /// The features the driver accepted.
    pub features: u64,
    /// Set by the device when it stops because the driver broke a rule.
    pub needs_reset: Arc<AtomicU8>,
    /// What its worker shares with the transport (pause gate, dirty pages):
    /// pass it to [`worker::Worker::spawn`].
    pub link: worker::WorkerLink,
}

impl Activation {
    /// Takes queue `index` from the activation (an error if the driver did
    /// not enable it).
    pub fn take_queue(&mut self, index: usize) -> Result<Queue, VirtioError> {
        self.queues
            .get_mut(index)
            .and_then(Option::take)
            .ok_or(VirtioError::QueueNotEnabled(index))
    }

    /// Marks the device broken (the transport then reports
    /// DEVICE_NEEDS_RESET and raises a configuration interrupt).
    pub fn fail(&self) {
        self.needs_reset.store(1, Ordering::Release);
        self.interrupt.config();
    }
}

/// A virtio device function.
pub trait VirtioDevice: Send {
    /// Its virtio device type ([`device_type`]).
    fn device_type(&self) -> u16;
    /// The maximum size of each of its queues.
    fn queue_sizes(&self) -> Vec<u16>;
    /// The features it offers ([`features::VERSION_1`] is added).
    fn features(&self) -> u64;
    /// Reads its configuration space at `offset` (bytes past it read as 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes its configuration space (most are read-only).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device on its queues (spawns its worker).
    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError>;
    /// Stops the device (the driver reset it): the worker exits and drops the
    /// queues; the device may be activated again.
    fn reset(&mut self);
    /// A JSON description for listings.
    fn describe(&self) -> serde_json::Value;
    /// Gives up the device's exclusive host resources for another process to
    /// take (a live migration's target): what it wrote reaches stable storage
    /// and its locks are released. Called only while the device is paused or
    /// not active. Default: it holds none.
    fn hand_over(&mut self) -> Result<(), VirtioError> {
        Ok(())
    }
    /// Claims what [`VirtioDevice::hand_over`] gave up, or what a device built
    /// unclaimed never took; refused while another process holds it. Claiming
    /// what it holds already is no change. Default: it holds none.
    fn take_over(&mut self) -> Result<(), VirtioError> {
        Ok(())
    }
    /// A runtime request from the host (`{"op": ...}`), answered in JSON.
    fn control(&mut self, request: &serde_json::Value) -> Result<serde_json::Value, VirtioError> {
        Err(VirtioError::Unsupported(request.to_string()))
    }
    /// The device's own guest-visible state as plain data (its configuration
    /// space, anything beyond its queues), for snapshots; the transport saves
    /// the queues. Default: none (`null`).
    fn save_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Restores what [`VirtioDevice::save_state`] gave, while the device is
    /// not activated; every field is checked. Default: only `null`.
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), VirtioError> {
        if state.is_null() {
            Ok(())
        } else {
            Err(VirtioError::Malformed(format!(
                "this device keeps no state of its own, the state has {state}"
            )))
        }
    }
}

/// Reads `data.len()` bytes of a config image at `offset`; beyond it, 0.
pub fn read_config_bytes(image: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| image.get(o + i))
            .copied()
            .unwrap_or(0);
    }
}

/// The index (among `queues`) of a queue whose used ring overlaps an avail
/// ring of `queues` (its own or another's), if any. The device writes the
/// used ring: over an avail ring, each chain it serves would announce the
/// next one (a worker spinning forever on rings the guest set up once, found
/// by the fuzz targets), so the transport refuses such a layout.
pub fn used_ring_overlaps_avail_ring(queues: &[&Queue]) -> Option<usize> {
    // Split ring sizes (virtio spec 2.7): 4-byte header, 2 or 8 bytes an
    // entry, and the 2-byte event field (counted whether or not EVENT_IDX is
    // on: a layout that overlaps only without it is still refused).
    let avail = |q: &Queue| (q.avail_ring(), 6 + 2 * u64::from(q.size()));
    let used = |q: &Queue| (q.used_ring(), 6 + 8 * u64::from(q.size()));
    let overlap = |(a, alen): (u64, u64), (b, blen): (u64, u64)| {
        a < b.saturating_add(blen) && b < a.saturating_add(alen)
    };
    queues
        .iter()
        .position(|q| queues.iter().any(|other| overlap(used(q), avail(other))))
}

/// The guest memory type queues run on.
pub type Mem = vm_memory::GuestMemoryMmap<()>;

/// What a device did with a chain [`drain`] gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// Done: to the used ring, with the bytes the device wrote into it.
    Used(u32),
    /// Kept by the device, which returns it later itself (balloon
    /// statistics); `release` is a chain it kept before and returns now
    /// instead (head, bytes written).
    Kept { release: Option<(u16, u32)> },
    /// Not now: the chain goes back to the ring and the pass ends with the
    /// driver's notifications still off (the device resumes on a wake of its
    /// own: a writable TAP, room in a backlog, the next batch).
    Later,
}

/// What a [`drain`] pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Chains put in the used ring.
    pub used: usize,
    /// It ended on [`Served::Later`] (else: the ring is empty and the
    /// driver's notifications are on).
    pub later: bool,
}

/// The next available chain of `queue`, or the ring's error, which is how
/// an avail index more than a queue ahead shows (virtio-queue's
/// `pop_descriptor_chain` would log it and yield nothing, and the device
/// would see more announced than it can take).
pub fn pop<'m>(
    queue: &mut Queue,
    m: &'m Mem,
) -> Result<Option<DescriptorChain<&'m Mem>>, virtio_queue::Error> {
    Ok(queue.iter(m)?.next())
}

/// Takes every available chain of `queue` to `handle` and puts what it
/// served in the used ring, with the driver's notifications off while it
/// works (while dirty pages are tracked, each served chain's device-writable
/// buffers and the used ring are recorded after they are written) and on again once the ring is empty (checked again after, so a
/// chain posted meanwhile is not missed). `broken` turns a ring error (its
/// rings, an avail index more than a queue ahead) into the device's error;
/// an error from either stops the pass. The caller raises the interrupt
/// ([`wants_interrupt`]): some devices drain two queues before they do.
pub fn drain<'m, E>(
    queue: &mut Queue,
    m: &'m Mem,
    broken: impl Fn(virtio_queue::Error) -> E,
    mut handle: impl FnMut(DescriptorChain<&'m Mem>) -> Result<Served, E>,
) -> Result<Drained, E> {
    let mut done = Drained::default();
    loop {
        queue.disable_notification(m).map_err(&broken)?;
        while let Some(chain) = pop(queue, m).map_err(&broken)? {
            let head = chain.head_index();
            let copy = crate::dirty::thread_is_tracking().then(|| chain.clone());
            let (head, len) = match handle(chain)? {
                Served::Used(len) => {
                    if let Some(copy) = copy {
                        crate::dirty::mark_chain(copy);
                    }
                    (head, len)
                }
                Served::Kept { release: None } => continue,
                Served::Kept {
                    release: Some(earlier),
                } => earlier,
                Served::Later => {
                    queue.go_to_previous_position();
                    crate::dirty::mark_used_ring(queue);
                    done.later = true;
                    return Ok(done);
                }
            };
            queue.add_used(m, head, len).map_err(&broken)?;
            crate::dirty::mark_used_ring(queue);
            done.used += 1;
        }
        let more = queue.enable_notification(m).map_err(&broken)?;
        // Notification suppression writes the used ring (avail_event) too.
        crate::dirty::mark_used_ring(queue);
        if !more {
            return Ok(done);
        }
    }
}

/// Whether to raise `queue`'s interrupt after a pass that used `used`
/// chains: only for used chains, and as the driver asked (EVENT_IDX).
pub fn wants_interrupt(queue: &mut Queue, m: &Mem, used: usize) -> bool {
    used > 0 && queue.needs_notification(m).unwrap_or(true)
}

/// [`drain`] for devices that answer every chain at once: `handle` gives
/// the length it wrote (`None`: the driver broke the queue), and queue
/// `index`'s interrupt is raised if the driver wants it. False when the
/// queue is broken.
pub fn drain_queue<'m>(
    queue: &mut Queue,
    m: &'m Mem,
    interrupt: &Interrupt,
    index: usize,
    mut handle: impl FnMut(DescriptorChain<&'m Mem>) -> Option<u32>,
) -> bool {
    let Ok(done) = drain(
        queue,
        m,
        |_| (),
        |chain| handle(chain).map(Served::Used).ok_or(()),
    ) else {
        return false;
    };
    if wants_interrupt(queue, m, done.used) {
        interrupt.queue(index);
    }
    true
}
