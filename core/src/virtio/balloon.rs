//! virtio-balloon: the host asks the guest for memory back and gets it.
//!
//! The host sets a target (`num_pages` in the configuration space, changed at
//! run time by [`Balloon::control`]'s `setTarget`); the guest's driver
//! inflates towards it by allocating pages and sending their page frame
//! numbers on the inflate queue, and deflates by sending them on the deflate
//! queue, then writes how many pages the balloon holds (`actual`). Inflated
//! pages go back to the host with `MADV_DONTNEED` (guest RAM is private
//! anonymous memory: the pages are freed and read back as zeros if the guest
//! touches them again), so the VMM's RSS drops. Deflated pages need nothing:
//! the guest's next touch faults in a fresh page.
//!
//! Two optional queues: statistics (`VIRTIO_BALLOON_F_STATS_VQ`: the driver
//! keeps one buffer of tagged counters in the device, which returns it every
//! `stats_interval_ms` or on request so the driver refills it) and free page
//! reporting (`VIRTIO_BALLOON_F_REPORTING`: the guest hands over blocks of
//! free pages, which are released like inflated ones).
//!
//! Every guest value is checked: page frames must lie inside guest RAM,
//! reported ranges must be page-aligned and inside RAM, requests are bounded
//! ([`MAX_PFN_BYTES`], [`MAX_STATS`]) and descriptors must go the right way.
//! A request that breaks a rule stops the device with DEVICE_NEEDS_RESET
//! before anything of it is released.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::worker::{Wake, Worker};
use super::{
    device_type, drain, wants_interrupt, Activation, Interrupt, Served, VirtioDevice, VirtioError,
};
use crate::memory::GuestRam;

/// Balloon feature bits (virtio spec 5.5.3).
pub mod feature {
    /// The driver must tell the host before it reuses deflated pages.
    pub const MUST_TELL_HOST: u64 = 1 << 0;
    /// A statistics queue exists.
    pub const STATS_VQ: u64 = 1 << 1;
    /// The guest deflates the balloon when it runs out of memory.
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    /// A free page reporting queue exists.
    pub const REPORTING: u64 = 1 << 5;
}

/// Every queue's size (Linux needs at least 32 for free page reporting).
const QUEUE_SIZE: u16 = 256;
/// The page size of page frame numbers (`VIRTIO_BALLOON_PFN_SHIFT`).
pub const PAGE_SIZE: u64 = 4096;
/// The most bytes of page frame numbers in one inflate or deflate request
/// (Linux sends at most 256 frames, 1 KiB).
pub const MAX_PFN_BYTES: usize = 64 << 10;
/// The most statistics entries in one buffer (Linux sends 10).
pub const MAX_STATS: usize = 64;
/// One statistics entry: a `u16` tag and a `u64` value, packed.
const STAT_LEN: usize = 10;
/// The configuration space: num_pages, actual, free_page_hint_cmd_id, poison_val.
const CONFIG_LEN: usize = 16;
/// The default statistics polling interval.
pub const DEFAULT_STATS_INTERVAL_MS: u32 = 1000;

/// Why the balloon refused a request (from the guest or from the host).
#[derive(Debug, Error)]
pub enum BalloonError {
    /// The guest named a page frame outside guest RAM.
    #[error("page frame {0:#x} is outside guest RAM")]
    PfnOutsideRam(u64),
    /// A descriptor went the wrong way (device-writable where it must be read, or back).
    #[error("a {0} descriptor has the wrong direction")]
    WrongDirection(&'static str),
    /// A request is larger than the device accepts.
    #[error("a {queue} request of {len} bytes exceeds the limit of {max}")]
    Oversized {
        queue: &'static str,
        len: u64,
        max: u64,
    },
    /// A page frame list whose length is not a whole number of frames.
    #[error("a {0} request's length {1} is not a multiple of 4")]
    PartialFrame(&'static str, u64),
    /// A reported free range that is not page-aligned or not inside guest RAM.
    #[error("reported range {addr:#x}+{len:#x} is not page-aligned inside guest RAM")]
    BadReport { addr: u64, len: u64 },
    /// Reading a request from guest memory failed.
    #[error("reading guest memory at {0:#x} failed")]
    Memory(u64),
    /// The queue itself is broken (rings outside RAM, bad indices).
    #[error("queue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// Returning pages to the host failed.
    #[error("releasing guest memory: {0}")]
    Release(String),
    /// A host request the device does not understand or cannot honour.
    #[error("{0}")]
    BadRequest(String),
}

/// The device's options (the JSON of a `{"kind": "balloon", ...}` device).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BalloonConfig {
    /// How often the device asks the guest for fresh statistics (0: only on request).
    #[serde(default = "default_stats_interval")]
    pub stats_interval_ms: u32,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM (the guest may take pages back under pressure).
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_REPORTING (the guest returns free pages on its own).
    #[serde(default = "default_true")]
    pub free_page_reporting: bool,
}

fn default_stats_interval() -> u32 {
    DEFAULT_STATS_INTERVAL_MS
}

fn default_true() -> bool {
    true
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            stats_interval_ms: DEFAULT_STATS_INTERVAL_MS,
            deflate_on_oom: false,
            free_page_reporting: true,
        }
    }
}

/// The balloon's state as plain data (snapshots write it out).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BalloonState {
    /// The host's target, in 4 KiB pages.
    pub num_pages: u32,
    /// The pages the driver says the balloon holds.
    pub actual: u32,
    /// The guest's last statistics, by name, in bytes or counts.
    pub stats: BTreeMap<String, u64>,
    /// How many statistics buffers the guest has sent.
    pub stats_updates: u64,
    /// Pages received on the inflate queue (and released).
    pub inflated_pages: u64,
    /// Pages received on the deflate queue.
    pub deflated_pages: u64,
    /// Bytes of free memory the guest reported (and that were released).
    pub reported_bytes: u64,
}

/// The name of a statistics tag (virtio spec 5.5.6.3; Linux's `VIRTIO_BALLOON_S_*`).
pub fn stat_name(tag: u16) -> String {
    let known = [
        "swapIn",
        "swapOut",
        "majorFaults",
        "minorFaults",
        "freeMemory",
        "totalMemory",
        "availableMemory",
        "diskCaches",
        "hugetlbAllocations",
        "hugetlbFailures",
    ];
    known
        .get(tag as usize)
        .map_or_else(|| format!("tag{tag}"), |s| (*s).to_string())
}

/// What each queue is, in the order the driver numbers them: inflate and
/// deflate, then statistics and reporting when negotiated (absent queues take
/// no index, as in Linux's `virtio_find_vqs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Inflate => "inflate",
            Role::Deflate => "deflate",
            Role::Stats => "statistics",
            Role::Reporting => "reporting",
        }
    }
}

fn roles(features: u64) -> Vec<Role> {
    let mut r = vec![Role::Inflate, Role::Deflate];
    if features & feature::STATS_VQ != 0 {
        r.push(Role::Stats);
    }
    if features & feature::REPORTING != 0 {
        r.push(Role::Reporting);
    }
    r
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked mid-update leaves counters, nothing unsafe.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How the host reaches a running balloon's driver.
struct Control {
    interrupt: Arc<Interrupt>,
    refresh: EventFd,
}

/// What the device, its worker and the host's handles share.
#[derive(Default)]
struct Shared {
    state: Mutex<BalloonState>,
    control: Mutex<Option<Control>>,
    /// Guest RAM in bytes, known once the driver starts the device (0 before).
    ram_bytes: AtomicU64,
}

/// The host's side of a balloon: set the target, read the statistics. Clones
/// share the device (the VM keeps one while the device sits on the bus).
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
}

impl BalloonHandle {
    /// The device's state as plain data.
    pub fn state(&self) -> BalloonState {
        lock(&self.shared.state).clone()
    }

    /// Restores state written by [`BalloonHandle::state`].
    pub fn restore(&self, state: BalloonState) {
        *lock(&self.shared.state) = state;
    }

    /// Sets the target to `mib` MiB and tells the driver (a configuration
    /// change interrupt) if it runs.
    /// Before the driver starts the device the guest's RAM is unknown here:
    /// only the 32-bit page count bounds the target (the TypeScript API
    /// checks it against the VM's RAM).
    pub fn set_target(&self, mib: u64) -> Result<(), BalloonError> {
        let ram_mib = match self.shared.ram_bytes.load(Ordering::Acquire) {
            0 => u64::MAX,
            bytes => bytes >> 20,
        };
        if mib > ram_mib {
            return Err(BalloonError::BadRequest(format!(
                "balloon target {mib} MiB exceeds guest RAM ({ram_mib} MiB)"
            )));
        }
        let pages = u32::try_from(mib * ((1 << 20) / PAGE_SIZE)).map_err(|_| {
            BalloonError::BadRequest(format!("balloon target {mib} MiB is too large"))
        })?;
        lock(&self.shared.state).num_pages = pages;
        if let Some(c) = lock(&self.shared.control).as_ref() {
            c.interrupt.config();
        }
        Ok(())
    }

    /// The last statistics and the balloon's size as JSON (no side effect).
    pub fn report(&self) -> serde_json::Value {
        let s = self.state();
        serde_json::json!({
            "targetMib": (s.num_pages as u64 * PAGE_SIZE) >> 20,
            "targetPages": s.num_pages,
            "actualPages": s.actual,
            "actualMib": (s.actual as u64 * PAGE_SIZE) >> 20,
            "stats": s.stats,
            "statsUpdates": s.stats_updates,
            "inflatedPages": s.inflated_pages,
            "deflatedPages": s.deflated_pages,
            "reportedBytes": s.reported_bytes,
        })
    }

    /// [`BalloonHandle::report`], and asks the guest for fresh statistics
    /// (they arrive asynchronously: `statsUpdates` counts them).
    pub fn stats(&self) -> serde_json::Value {
        if let Some(c) = lock(&self.shared.control).as_ref() {
            let _ = c.refresh.write(1);
        }
        self.report()
    }

    /// A runtime request: `{"op": "setTarget", "mib": N}` or `{"op": "stats"}`;
    /// both answer with [`BalloonHandle::report`].
    pub fn control(&self, request: &serde_json::Value) -> Result<serde_json::Value, BalloonError> {
        match request.get("op").and_then(|o| o.as_str()) {
            Some("setTarget") => {
                let mib = request.get("mib").and_then(|m| m.as_u64()).ok_or_else(|| {
                    BalloonError::BadRequest(
                        "setTarget needs \"mib\", a non-negative integer".to_string(),
                    )
                })?;
                self.set_target(mib)?;
                Ok(self.report())
            }
            Some("stats") => Ok(self.stats()),
            _ => Err(BalloonError::BadRequest(format!(
                "unknown balloon request {request}: expected op setTarget or stats"
            ))),
        }
    }
}

/// The balloon device.
pub struct Balloon {
    config: BalloonConfig,
    handle: BalloonHandle,
    worker: Option<Worker>,
}

impl Balloon {
    /// A balloon, initially empty (target 0).
    pub fn new(config: BalloonConfig) -> Balloon {
        Balloon {
            config,
            handle: BalloonHandle {
                shared: Arc::default(),
            },
            worker: None,
        }
    }

    /// The host's handle on this device.
    pub fn handle(&self) -> BalloonHandle {
        self.handle.clone()
    }

    fn config_image(&self) -> [u8; CONFIG_LEN] {
        let s = lock(&self.handle.shared.state);
        let mut b = [0u8; CONFIG_LEN];
        b[0..4].copy_from_slice(&s.num_pages.to_le_bytes());
        b[4..8].copy_from_slice(&s.actual.to_le_bytes());
        b
    }

    fn stop(&mut self) {
        // The worker first: it may be raising an interrupt.
        self.worker = None;
        *lock(&self.handle.shared.control) = None;
    }
}

/// The worker's side: the queues and what they need.
struct Runner {
    mem: GuestRam,
    queues: Vec<(Role, Queue)>,
    interrupt: Arc<Interrupt>,
    needs_reset: Arc<AtomicU8>,
    shared: Arc<Shared>,
    /// The statistics buffer the device holds until it wants fresh numbers.
    stats_head: Option<u16>,
}

/// Reads the page frame numbers of one inflate/deflate request.
fn read_pfns<M>(
    m: &GuestMemoryMmap<()>,
    chain: virtio_queue::DescriptorChain<M>,
    role: Role,
) -> Result<Vec<u32>, BalloonError>
where
    M: std::ops::Deref<Target = GuestMemoryMmap<()>>,
{
    let mut bytes = Vec::new();
    for desc in chain {
        if desc.is_write_only() {
            return Err(BalloonError::WrongDirection(role.name()));
        }
        let len = desc.len() as usize;
        let total = bytes.len() as u64 + len as u64;
        if total > MAX_PFN_BYTES as u64 {
            return Err(BalloonError::Oversized {
                queue: role.name(),
                len: total,
                max: MAX_PFN_BYTES as u64,
            });
        }
        let at = bytes.len();
        bytes.resize(at + len, 0);
        m.read_slice(&mut bytes[at..], desc.addr())
            .map_err(|_| BalloonError::Memory(desc.addr().0))?;
    }
    if bytes.len() % 4 != 0 {
        return Err(BalloonError::PartialFrame(role.name(), bytes.len() as u64));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Checks every frame is inside guest RAM, then releases them in runs of
/// consecutive frames.
fn release_pfns(mem: &GuestRam, pfns: &mut [u32]) -> Result<(), BalloonError> {
    for &pfn in pfns.iter() {
        if !mem.contains(pfn as u64 * PAGE_SIZE, PAGE_SIZE) {
            return Err(BalloonError::PfnOutsideRam(pfn as u64));
        }
    }
    pfns.sort_unstable();
    let mut i = 0;
    while i < pfns.len() {
        let start = pfns[i];
        let mut end = start; // inclusive
        i += 1;
        while i < pfns.len() && pfns[i] <= end.saturating_add(1) {
            end = end.max(pfns[i]);
            i += 1;
        }
        let len = (end - start) as u64 + 1;
        // Each frame is inside RAM and RAM regions are contiguous, so a run of
        // consecutive frames is inside one region.
        // Given up by the guest: freed, not zeroed (on a RAM restored lazily
        // from a snapshot the pages revert to the snapshot's bytes).
        mem.discard(start as u64 * PAGE_SIZE, len * PAGE_SIZE)
            .map_err(|e| BalloonError::Release(e.to_string()))?;
    }
    Ok(())
}

/// Parses a statistics buffer (tag/value pairs; a trailing partial entry is ignored).
fn read_stats<M>(
    m: &GuestMemoryMmap<()>,
    chain: virtio_queue::DescriptorChain<M>,
) -> Result<BTreeMap<String, u64>, BalloonError>
where
    M: std::ops::Deref<Target = GuestMemoryMmap<()>>,
{
    const MAX: usize = MAX_STATS * STAT_LEN;
    let mut bytes = Vec::new();
    for desc in chain {
        if desc.is_write_only() {
            return Err(BalloonError::WrongDirection(Role::Stats.name()));
        }
        let len = desc.len() as usize;
        if bytes.len() as u64 + len as u64 > MAX as u64 {
            return Err(BalloonError::Oversized {
                queue: Role::Stats.name(),
                len: bytes.len() as u64 + len as u64,
                max: MAX as u64,
            });
        }
        let at = bytes.len();
        bytes.resize(at + len, 0);
        m.read_slice(&mut bytes[at..], desc.addr())
            .map_err(|_| BalloonError::Memory(desc.addr().0))?;
    }
    let mut stats = BTreeMap::new();
    for e in bytes.chunks_exact(STAT_LEN) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&e[2..]);
        stats.insert(stat_name(tag), u64::from_le_bytes(v));
    }
    Ok(stats)
}

/// Checks and releases one chain of reported free ranges; returns the bytes.
fn release_reported<M>(
    mem: &GuestRam,
    chain: virtio_queue::DescriptorChain<M>,
) -> Result<u64, BalloonError>
where
    M: std::ops::Deref<Target = GuestMemoryMmap<()>>,
{
    let mut ranges = Vec::new();
    for desc in chain {
        if !desc.is_write_only() {
            return Err(BalloonError::WrongDirection(Role::Reporting.name()));
        }
        let (addr, len) = (desc.addr().0, desc.len() as u64);
        if addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 || !mem.contains(addr, len) {
            return Err(BalloonError::BadReport { addr, len });
        }
        ranges.push((addr, len));
    }
    let mut total = 0;
    for (addr, len) in ranges {
        mem.zero(addr, len)
            .map_err(|e| BalloonError::Release(e.to_string()))?;
        total += len;
    }
    Ok(total)
}

impl Runner {
    /// Serves every available request of queue `q`.
    fn serve(&mut self, q: usize) -> Result<(), BalloonError> {
        let Some((role, queue)) = self.queues.get_mut(q) else {
            return Ok(());
        };
        let role = *role;
        let (mem, shared, stats_head) = (&self.mem, &self.shared, &mut self.stats_head);
        let m = mem.mmap();
        let done = drain(queue, m, BalloonError::Queue, |chain| {
            let head = chain.head_index();
            match role {
                Role::Inflate => {
                    let mut pfns = read_pfns(m, chain, role)?;
                    release_pfns(mem, &mut pfns)?;
                    lock(&shared.state).inflated_pages += pfns.len() as u64;
                }
                Role::Deflate => {
                    let pfns = read_pfns(m, chain, role)?;
                    if let Some(&bad) = pfns
                        .iter()
                        .find(|&&p| !mem.contains(p as u64 * PAGE_SIZE, PAGE_SIZE))
                    {
                        return Err(BalloonError::PfnOutsideRam(bad as u64));
                    }
                    lock(&shared.state).deflated_pages += pfns.len() as u64;
                }
                Role::Stats => {
                    let stats = read_stats(m, chain)?;
                    {
                        let mut s = lock(&shared.state);
                        s.stats = stats;
                        s.stats_updates += 1;
                    }
                    // The driver keeps one buffer here; a second one
                    // returns the first rather than leaking it.
                    let release = stats_head.replace(head).map(|old| (old, 0));
                    return Ok(Served::Kept { release });
                }
                Role::Reporting => {
                    let bytes = release_reported(mem, chain)?;
                    lock(&shared.state).reported_bytes += bytes;
                }
            }
            Ok(Served::Used(0))
        })?;
        if wants_interrupt(queue, m, done.used) {
            self.interrupt.queue(q);
        }
        Ok(())
    }

    /// Returns the held statistics buffer so the driver refills it.
    fn request_stats(&mut self) -> Result<(), BalloonError> {
        let Some(q) = self.queues.iter().position(|(r, _)| *r == Role::Stats) else {
            return Ok(());
        };
        let Some(head) = self.stats_head.take() else {
            return Ok(());
        };
        let m = self.mem.mmap();
        let queue = &mut self.queues[q].1;
        queue.add_used(m, head, 0)?;
        crate::dirty::mark_used_ring(queue);
        if queue.needs_notification(m)? {
            self.interrupt.queue(q);
        }
        Ok(())
    }

    fn fail(&self) {
        self.needs_reset.store(1, Ordering::Release);
        self.interrupt.config();
    }
}

/// Serves the queues the driver's `features` give (inflate, deflate, then
/// statistics and reporting if negotiated, as `queues` in that order), one
/// pass per entry of `kicks` (a queue index; the held statistics buffer is
/// returned for `usize::MAX`), on the calling thread: the fuzz targets'
/// entry point. Stops at the first error, as the worker does.
#[cfg(feature = "fuzz")]
#[doc(hidden)]
pub fn serve_for_fuzz(
    mem: &GuestRam,
    queues: Vec<Queue>,
    features: u64,
    kicks: &[usize],
) -> Result<(), BalloonError> {
    let roles = roles(features);
    let count = roles.len();
    let mut runner = Runner {
        mem: mem.clone(),
        queues: roles.into_iter().zip(queues).collect(),
        interrupt: Arc::new(Interrupt::detached(count)),
        needs_reset: Arc::default(),
        shared: Arc::default(),
        stats_head: None,
    };
    for &q in kicks {
        if q == usize::MAX {
            runner.request_stats()?;
        } else {
            runner.serve(q)?;
        }
    }
    Ok(())
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> VirtioError {
    move |source| VirtioError::Io { op, source }
}

fn errno(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> VirtioError {
    move |e| VirtioError::Io {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u16 {
        device_type::BALLOON
    }

    fn queue_sizes(&self) -> Vec<u16> {
        let n = if self.config.free_page_reporting {
            4
        } else {
            3
        };
        vec![QUEUE_SIZE; n]
    }

    fn features(&self) -> u64 {
        let mut f = feature::STATS_VQ;
        if self.config.deflate_on_oom {
            f |= feature::DEFLATE_ON_OOM;
        }
        if self.config.free_page_reporting {
            f |= feature::REPORTING;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_image(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        let mut image = self.config_image();
        let Some(end) = (offset as usize).checked_add(data.len()) else {
            return;
        };
        if offset < 4 || end > 8 {
            return;
        }
        image[offset as usize..end].copy_from_slice(data);
        lock(&self.handle.shared.state).actual =
            u32::from_le_bytes([image[4], image[5], image[6], image[7]]);
    }

    fn activate(&mut self, mut a: Activation) -> Result<(), VirtioError> {
        self.stop();
        let mut queues = Vec::new();
        for (i, role) in roles(a.features).into_iter().enumerate() {
            queues.push((role, a.take_queue(i)?));
        }
        let refresh = EventFd::new(EFD_NONBLOCK).map_err(io("creating an eventfd"))?;
        let worker_refresh = refresh.try_clone().map_err(io("duplicating an eventfd"))?;
        let mut timer = TimerFd::new().map_err(errno("creating a timerfd"))?;
        if self.config.stats_interval_ms > 0 {
            let every = Duration::from_millis(self.config.stats_interval_ms as u64);
            timer
                .reset(every, Some(every))
                .map_err(errno("arming the statistics timer"))?;
        }
        self.handle
            .shared
            .ram_bytes
            .store(a.mem.size(), Ordering::Release);
        let interrupt = Arc::new(a.interrupt);
        let mut runner = Runner {
            mem: a.mem,
            queues,
            interrupt: interrupt.clone(),
            needs_reset: a.needs_reset,
            shared: self.handle.shared.clone(),
            stats_head: None,
        };
        let extra = vec![
            (worker_refresh.as_raw_fd(), EventSet::IN),
            (timer.as_raw_fd(), EventSet::IN),
        ];
        let worker = Worker::spawn("virtio-balloon", a.link, a.kicks, extra, move |wake| {
            let result = match wake {
                Wake::Kick(q) => runner.serve(q),
                Wake::Fd(0, _) => {
                    let _ = worker_refresh.read();
                    runner.request_stats()
                }
                Wake::Fd(_, _) => {
                    let _ = timer.wait();
                    runner.request_stats()
                }
            };
            match result {
                Ok(()) => true,
                Err(_) => {
                    runner.fail();
                    false
                }
            }
        })?;
        self.worker = Some(worker);
        *lock(&self.handle.shared.control) = Some(Control { interrupt, refresh });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
        lock(&self.handle.shared.state).actual = 0;
    }

    fn control(&mut self, request: &serde_json::Value) -> Result<serde_json::Value, VirtioError> {
        self.handle
            .control(request)
            .map_err(|e| VirtioError::Malformed(e.to_string()))
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = self.handle.report();
        d["kind"] = "balloon".into();
        d["statsIntervalMs"] = self.config.stats_interval_ms.into();
        d["deflateOnOom"] = self.config.deflate_on_oom.into();
        d["freePageReporting"] = self.config.free_page_reporting.into();
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::XorShift;
    use crate::virtio::status;
    use crate::virtio::test_driver::{Buf, TestDriver, BUFFERS};
    use std::time::Instant;

    const MIB: u64 = 1 << 20;
    /// Where the tests put page frame lists and statistics (pages to release
    /// come after it).
    const LIST: u64 = BUFFERS;
    const PAGES: u64 = BUFFERS + 0x10_0000;

    fn driver(config: BalloonConfig) -> (TestDriver, BalloonHandle) {
        let b = Balloon::new(config);
        let h = b.handle();
        (TestDriver::new(Box::new(b)), h)
    }

    fn quiet() -> BalloonConfig {
        BalloonConfig {
            stats_interval_ms: 0,
            ..BalloonConfig::default()
        }
    }

    fn post_pfns(d: &mut TestDriver, q: usize, pfns: &[u32]) -> u16 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        d.mem.write(LIST, &bytes).unwrap();
        d.post(q, &[Buf::readable(LIST, bytes.len() as u32)])
    }

    fn fill(d: &TestDriver, addr: u64, len: u64, byte: u8) {
        d.mem.write(addr, &vec![byte; len as usize]).unwrap();
    }

    fn all(d: &TestDriver, addr: u64, len: u64, byte: u8) -> bool {
        let mut b = vec![0u8; len as usize];
        d.mem.read(addr, &mut b).unwrap();
        b.iter().all(|&x| x == byte)
    }

    fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn inflated_pages_go_back_to_the_host_and_read_as_zero() {
        let (mut d, h) = driver(quiet());
        let s = d.start(feature::STATS_VQ | feature::REPORTING);
        assert_eq!(s & status::DRIVER_OK, status::DRIVER_OK, "status {s:#x}");
        fill(&d, PAGES, 8 * PAGE_SIZE, 0xaa);
        let first = (PAGES / PAGE_SIZE) as u32;
        // Frames 0, 1, 2 (one run, listed out of order and twice) and 5.
        let head = post_pfns(&mut d, 0, &[first + 2, first, first + 1, first + 5, first]);
        assert_eq!(d.wait_used(0), Some((head as u32, 0)));
        assert!(all(&d, PAGES, 3 * PAGE_SIZE, 0));
        assert!(all(&d, PAGES + 3 * PAGE_SIZE, 2 * PAGE_SIZE, 0xaa));
        assert!(all(&d, PAGES + 5 * PAGE_SIZE, PAGE_SIZE, 0));
        assert!(all(&d, PAGES + 6 * PAGE_SIZE, 2 * PAGE_SIZE, 0xaa));
        assert_eq!(h.state().inflated_pages, 5);
        // Deflate: counted, nothing released, and the guest can use the page again.
        let head = post_pfns(&mut d, 1, &[first]);
        assert_eq!(d.wait_used(1), Some((head as u32, 0)));
        assert_eq!(h.state().deflated_pages, 1);
        fill(&d, PAGES, PAGE_SIZE, 0x55);
        assert!(all(&d, PAGES, PAGE_SIZE, 0x55));
    }

    #[test]
    fn the_target_is_in_config_space_and_actual_is_the_drivers() {
        let (mut d, h) = driver(quiet());
        d.start(feature::STATS_VQ | feature::REPORTING);
        let fired_before = d.irqs.fired.lock().unwrap().len();
        h.set_target(3).unwrap();
        assert_eq!(d.read32(0x2000), 3 * 256, "num_pages at the device config");
        // The configuration vector (the TestDriver gives it the index after the queues).
        assert!(wait_for(
            || d.irqs.fired.lock().unwrap()[fired_before..].contains(&4)
        ));
        d.write(0x2004, &700u32.to_le_bytes());
        assert_eq!(h.state().actual, 700);
        // num_pages is the host's: a driver write is ignored.
        d.write(0x2000, &1u32.to_le_bytes());
        assert_eq!(d.read32(0x2000), 3 * 256);
        let r = h
            .control(&serde_json::json!({"op": "setTarget", "mib": 5}))
            .unwrap();
        assert_eq!(r["targetMib"], 5);
        assert_eq!(r["actualPages"], 700);
        assert!(matches!(
            h.control(&serde_json::json!({"op": "setTarget", "mib": 17})),
            Err(BalloonError::BadRequest(_))
        ));
        assert!(h.control(&serde_json::json!({"op": "setTarget"})).is_err());
        assert!(h.control(&serde_json::json!({"op": "grow"})).is_err());
        // The same requests through the transport, as the VM passes them.
        let r = d
            .dev
            .control(&serde_json::json!({"op": "setTarget", "mib": 4}))
            .unwrap();
        assert_eq!(r["targetPages"], 4 * 256);
        assert!(matches!(
            d.dev
                .control(&serde_json::json!({"op": "setTarget", "mib": -1})),
            Err(VirtioError::Malformed(_))
        ));
        let r = d
            .dev
            .control(&serde_json::json!({"op": "setTarget", "mib": 5}));
        assert_eq!(r.unwrap()["targetMib"], 5);
        assert_eq!(h.state().num_pages, 5 * 256);
    }

    fn post_stats(d: &mut TestDriver, q: usize, entries: &[(u16, u64)]) -> u16 {
        let bytes: Vec<u8> = entries
            .iter()
            .flat_map(|(t, v)| {
                let mut e = t.to_le_bytes().to_vec();
                e.extend_from_slice(&v.to_le_bytes());
                e
            })
            .collect();
        d.mem.write(LIST, &bytes).unwrap();
        d.post(q, &[Buf::readable(LIST, bytes.len() as u32)])
    }

    #[test]
    fn statistics_are_held_then_returned_on_request_and_on_the_timer() {
        let (mut d, h) = driver(quiet());
        d.start(feature::STATS_VQ | feature::REPORTING);
        let head = post_stats(&mut d, 2, &[(4, 100 * MIB), (5, 512 * MIB), (99, 7)]);
        assert!(wait_for(|| h.state().stats_updates == 1));
        let s = h.state().stats;
        assert_eq!(s["freeMemory"], 100 * MIB);
        assert_eq!(s["totalMemory"], 512 * MIB);
        assert_eq!(s["tag99"], 7);
        // Held: not used until the host asks.
        let r = h.control(&serde_json::json!({"op": "stats"})).unwrap();
        assert_eq!(r["stats"]["freeMemory"], 100 * MIB);
        assert_eq!(d.wait_used(2), Some((head as u32, 0)));
        // With a polling interval the device returns it on its own.
        let (mut d, h) = driver(BalloonConfig {
            stats_interval_ms: 10,
            ..BalloonConfig::default()
        });
        d.start(feature::STATS_VQ | feature::REPORTING);
        let head = post_stats(&mut d, 2, &[(4, 1)]);
        assert_eq!(d.wait_used(2), Some((head as u32, 0)));
        let head = post_stats(&mut d, 2, &[(4, 2)]);
        assert_eq!(d.wait_used(2), Some((head as u32, 0)));
        assert_eq!(h.state().stats["freeMemory"], 2);
    }

    #[test]
    fn reported_free_ranges_are_released_and_queues_follow_the_features() {
        // Without STATS_VQ the reporting queue is index 2 (Linux numbers only
        // the queues that exist).
        for (features, q) in [
            (feature::STATS_VQ | feature::REPORTING, 3),
            (feature::REPORTING, 2),
        ] {
            let (mut d, h) = driver(quiet());
            d.start(features);
            fill(&d, PAGES, 4 * PAGE_SIZE, 0xaa);
            let head = d.post(
                q,
                &[
                    Buf::writable(PAGES, 2 * PAGE_SIZE as u32),
                    Buf::writable(PAGES + 3 * PAGE_SIZE, PAGE_SIZE as u32),
                ],
            );
            assert_eq!(d.wait_used(q), Some((head as u32, 0)));
            assert!(all(&d, PAGES, 2 * PAGE_SIZE, 0));
            assert!(all(&d, PAGES + 2 * PAGE_SIZE, PAGE_SIZE, 0xaa));
            assert!(all(&d, PAGES + 3 * PAGE_SIZE, PAGE_SIZE, 0));
            assert_eq!(h.state().reported_bytes, 3 * PAGE_SIZE);
        }
    }

    /// Posts `bufs` on `q` of a fresh device and expects NEEDS_RESET, with the
    /// marked pages untouched.
    fn refused(features: u64, q: usize, setup: impl FnOnce(&mut TestDriver)) {
        let (mut d, h) = driver(quiet());
        d.start(features);
        fill(&d, PAGES, 4 * PAGE_SIZE, 0xaa);
        setup(&mut d);
        assert!(d.wait_needs_reset(), "queue {q}: no NEEDS_RESET");
        assert!(
            all(&d, PAGES, 4 * PAGE_SIZE, 0xaa),
            "queue {q}: pages released"
        );
        assert_eq!(h.state().inflated_pages, 0);
        assert_eq!(h.state().reported_bytes, 0);
        // A reset brings the device back.
        let s = d.start(features);
        assert_eq!(s & status::NEEDS_RESET, 0);
        let head = post_pfns(&mut d, 0, &[(PAGES / PAGE_SIZE) as u32]);
        assert_eq!(d.wait_used(0), Some((head as u32, 0)));
    }

    #[test]
    fn bad_requests_stop_the_device_before_releasing_anything() {
        let all_f = feature::STATS_VQ | feature::REPORTING;
        let first = (PAGES / PAGE_SIZE) as u32;
        // A frame outside guest RAM (16 MiB) after a valid one.
        refused(all_f, 0, |d| {
            post_pfns(d, 0, &[first, (16 * MIB / PAGE_SIZE) as u32]);
        });
        // A frame in the MMIO hole, on the deflate queue.
        refused(all_f, 1, |d| {
            post_pfns(d, 1, &[0xd0000]);
        });
        // A device-writable frame list.
        refused(all_f, 0, |d| {
            d.mem.write(LIST, &first.to_le_bytes()).unwrap();
            d.post(0, &[Buf::writable(LIST, 4)]);
        });
        // Half a frame number.
        refused(all_f, 0, |d| {
            d.mem.write(LIST, &first.to_le_bytes()).unwrap();
            d.post(0, &[Buf::readable(LIST, 6)]);
        });
        // An oversized list.
        refused(all_f, 0, |d| {
            d.post(0, &[Buf::readable(LIST, MAX_PFN_BYTES as u32 + 4)]);
        });
        // A list that runs past the end of guest RAM.
        refused(all_f, 0, |d| {
            d.post(0, &[Buf::readable(16 * MIB - 4, 8)]);
        });
        // Oversized statistics.
        refused(all_f, 2, |d| {
            d.post(
                2,
                &[Buf::readable(LIST, (MAX_STATS * STAT_LEN + 10) as u32)],
            );
        });
        // Reports: misaligned, outside RAM, read-only, empty.
        for (addr, len, write) in [
            (PAGES + 8, PAGE_SIZE as u32, true),
            (PAGES, 100, true),
            (16 * MIB - PAGE_SIZE, 2 * PAGE_SIZE as u32, true),
            (PAGES, PAGE_SIZE as u32, false),
            (PAGES, 0, true),
        ] {
            refused(all_f, 3, |d| {
                d.post(
                    3,
                    &[
                        Buf::writable(PAGES, PAGE_SIZE as u32),
                        Buf { addr, len, write },
                    ],
                );
            });
        }
    }

    #[test]
    fn state_and_config_round_trip_through_json() {
        let mut state = BalloonState {
            num_pages: 256,
            actual: 200,
            stats_updates: 3,
            inflated_pages: 300,
            deflated_pages: 100,
            reported_bytes: 4 << 20,
            ..Default::default()
        };
        state.stats.insert("freeMemory".into(), 12345);
        let json = serde_json::to_string(&state).unwrap();
        let back: BalloonState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let b = Balloon::new(BalloonConfig::default());
        b.handle().restore(back);
        assert_eq!(b.handle().state(), state);
        let c: BalloonConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, BalloonConfig::default());
        let c: BalloonConfig = serde_json::from_str(
            r#"{"statsIntervalMs":0,"deflateOnOom":true,"freePageReporting":false}"#,
        )
        .unwrap();
        assert_eq!(serde_json::to_value(&c).unwrap()["deflateOnOom"], true);
        let b = Balloon::new(c);
        assert_eq!(b.queue_sizes().len(), 3);
        assert_eq!(b.features(), feature::STATS_VQ | feature::DEFLATE_ON_OOM);
    }

    /// Random descriptor tables on random queues: every request ends in a used
    /// buffer or NEEDS_RESET (no panic, no hang), and pages the requests never
    /// name (the rings, a canary) are never released.
    #[test]
    fn random_descriptor_tables_never_crash_hang_or_release_unnamed_pages() {
        let cases: u64 = std::env::var("DENOVISOR_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000);
        let mut rng = XorShift::new(0x00ba_1100);
        let canary = 12 * MIB;
        let features = feature::STATS_VQ | feature::REPORTING;
        let (mut d, h) = driver(BalloonConfig {
            stats_interval_ms: 1,
            ..BalloonConfig::default()
        });
        d.start(features);
        fill(&d, canary, PAGE_SIZE, 0xcc);
        // Frames the lists name: 0x810..0x840 (8 MiB up). Their bytes are
        // [0x10..0x3f, 0x08, 0, 0], so even a chain that splices lists at odd
        // offsets only forms frames in that area, below 0x40, or beyond RAM:
        // never the rings (0x100..0x140) or the canary (0xc00).
        let area = 8 * MIB;
        for case in 0..cases {
            let q = (rng.next_u64() % 4) as usize;
            let n = 1 + (rng.next_u64() % 6) as u16;
            // Addresses: the frame list, the pages area, the end of RAM,
            // outside RAM, or anywhere.
            let pick = |rng: &mut XorShift| match rng.next_u64() % 5 {
                0 => LIST + (rng.next_u64() % 64) * 4,
                1 => area + (rng.next_u64() % 48 + 16) * PAGE_SIZE,
                2 => 16 * MIB - (rng.next_u64() % 3) * PAGE_SIZE,
                3 => 16 * MIB + rng.next_u64() % (1 << 30),
                _ => rng.next_u64(),
            };
            for i in 0..n {
                let len = match rng.next_u64() % 4 {
                    0 => (rng.next_u64() % 64) as u32 * 4,
                    1 => PAGE_SIZE as u32 * (1 + (rng.next_u64() % 4) as u32),
                    2 => rng.next_u64() as u32,
                    _ => (rng.next_u64() % 700) as u32,
                };
                // NEXT, WRITE and (rarely) INDIRECT flags; next anywhere.
                let flags = (rng.next_u64() & 3) as u16
                    | if rng.next_u64().is_multiple_of(16) {
                        4
                    } else {
                        0
                    };
                let next = (rng.next_u64() % (QUEUE_SIZE as u64 + 4)) as u16;
                d.set_desc(q, i, pick(&mut rng), len, flags, next);
            }
            for k in 0..64u64 {
                let pfn = if rng.next_u64().is_multiple_of(8) {
                    // Beyond RAM (16 MiB is frame 0x1000).
                    0x1000 + (rng.next_u64() as u32 >> 1)
                } else {
                    0x810 + (rng.next_u64() % 48) as u32
                };
                d.mem.write(LIST + k * 4, &pfn.to_le_bytes()).unwrap();
            }
            let head = (rng.next_u64() % n as u64) as u16;
            d.publish(q, head);
            // Done when the used index moves (a statistics buffer: when the
            // timer returned it) or the device stops.
            let progressed =
                wait_for(|| d.read8(0x14) & status::NEEDS_RESET != 0 || d.used_idx(q) != 0);
            assert!(
                progressed,
                "case {case}: queue {q} neither used the request nor stopped"
            );
            assert!(
                all(&d, canary, PAGE_SIZE, 0xcc),
                "case {case}: canary released"
            );
            // A fresh start each case: rings zeroed, NEEDS_RESET cleared.
            let s = d.start(features);
            assert_eq!(s & status::NEEDS_RESET, 0);
        }
        assert!(
            h.state().inflated_pages + h.state().reported_bytes > 0,
            "no request was ever served"
        );
    }
}
