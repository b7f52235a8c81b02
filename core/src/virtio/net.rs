//! virtio-net on a TAP backend (see [`super::tap`]).
//!
//! Two queues: 0 receives (device-writable buffers the guest posts), 1
//! transmits (device-readable frames). Every frame on both sides starts with
//! the 12-byte `virtio_net_hdr_v1`, which the TAP reads and writes as is
//! (`IFF_VNET_HDR`), so checksum and segmentation offloads need no work here:
//! the device only tells the TAP which offloads the guest accepted
//! (`TUNSETOFFLOAD`).
//!
//! Both directions run on the device's worker thread, which waits on the
//! queues' kicks and on the TAP fd (edge-triggered, in and out):
//! - TX: each chain is handed to the TAP with one `writev` straight from guest
//!   RAM. A full TAP (`EAGAIN`) puts the chain back and waits for the TAP to
//!   become writable; a frame the TAP refuses is dropped and counted.
//! - RX: frames are read into one host buffer and copied into the guest's
//!   buffers (several chains with `VIRTIO_NET_F_MRG_RXBUF`). With no buffer
//!   posted, the frame waits (one at most) and so do the rest in the TAP's
//!   queue, until the guest posts buffers and kicks.
//!
//! Nothing spins: every wait is the worker's epoll, and an edge-triggered fd
//! is always drained until `EAGAIN` or until the guest's queue blocks.
//!
//! Each direction may have a rate limiter ([`crate::rate_limiter`]; bytes
//! are the frame less its header, one op per frame). A TX frame the limiter
//! refuses stays in the ring; an RX frame stays pending, and the rest wait in
//! the TAP. A timerfd in the worker's epoll loop resumes both when the
//! buckets can pay.

#[cfg(test)]
use std::os::fd::OwnedFd;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::rate_limiter::{nonblocking_timer, RateLimiter, RateLimiterConfig, RateLimiterError};

use super::tap::{host_mac_for, Tap, TapError, VNET_HDR_LEN};
use super::worker::{Wake, Worker};
use super::{
    device_type, drain, pop, read_config_bytes, wants_interrupt, Activation, Served, VirtioDevice,
    VirtioError,
};

/// Feature bits (virtio spec 5.1.3).
pub mod net_features {
    /// The device handles partial checksums from the driver.
    pub const CSUM: u64 = 1 << 0;
    /// The driver handles partial checksums from the device.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// The device has a MAC address in its config space.
    pub const MAC: u64 = 1 << 5;
    /// The driver takes TSO (IPv4) frames.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// The driver takes TSO (IPv6) frames.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// The device takes TSO (IPv4) frames.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// The device takes TSO (IPv6) frames.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// A received frame may span several buffers (`num_buffers`).
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// The config space has a link status.
    pub const STATUS: u64 = 1 << 16;
    /// The checksum and segmentation offloads, offered together.
    pub const OFFLOADS: u64 = CSUM | GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | HOST_TSO4 | HOST_TSO6;
}

use net_features as nf;

/// Each queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// The largest frame either way, header included: a 64 KiB GSO frame, its
/// Ethernet and VLAN headers and the virtio-net header.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65535 + 14 + 4;
/// The most frames one wake moves in one direction before looking at the
/// other (fairness; the rest follows on the next pass of the same wake).
const BATCH: usize = 64;
/// `VIRTIO_NET_S_LINK_UP`.
const LINK_UP: u16 = 1;
const RX: usize = 0;
const TX: usize = 1;

/// Why the network device cannot be made or stops.
#[derive(Debug, Error)]
pub enum NetError {
    /// The backend (TAP) cannot be had.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The MAC address does not parse or is not a unicast address.
    #[error("invalid MAC address {0:?} (expected six hex bytes like 52:54:00:12:34:56, unicast)")]
    BadMac(String),
    /// The configuration names no backend or two.
    #[error("a network device needs exactly one of tap=NAME or netns=NS")]
    Backend,
    /// A descriptor chain breaks the rules (the device then needs a reset).
    #[error("malformed {queue} chain {head}: {why}")]
    Malformed {
        queue: &'static str,
        head: u16,
        why: &'static str,
    },
    /// A queue's rings cannot be read or written.
    #[error("{0} queue is broken (its rings are outside guest RAM or its index is invalid)")]
    BrokenQueue(&'static str),
    /// A bad rate limiter
    #[error("network device: {0}")]
    RateLimiter(#[from] RateLimiterError),
    /// The backend failed in a way that ends the device.
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
}

impl From<NetError> for VirtioError {
    fn from(e: NetError) -> VirtioError {
        match e {
            NetError::Io { op, source } => VirtioError::Io { op, source },
            NetError::Tap(t) => VirtioError::Attach(t.to_string()),
            other => VirtioError::Malformed(other.to_string()),
        }
    }
}

/// How a network device is configured (JSON: `{"tap": "tap0"}`,
/// `{"netns": "ns1", "hostAddress": "10.0.2.1/24"}`...).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetConfig {
    /// The device's name in listings (default: `net0`, `net1`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Attach this existing TAP device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Create a TAP inside this network namespace (`/run/netns/NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// The created TAP's name (with `netns`; default: the kernel picks `dvN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_name: Option<String>,
    /// The created TAP's IPv4 address and prefix (with `netns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_address: Option<String>,
    /// The guest's MAC address (default: a random locally administered one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Offer checksum and TSO offloads (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<bool>,
    /// Offer mergeable receive buffers (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mrg_rxbuf: Option<bool>,
    /// Limits on what the guest receives (bytes and frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on what the guest transmits (bytes and frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Parses `aa:bb:cc:dd:ee:ff` (unicast only).
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let bad = || NetError::BadMac(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(mac)
}

/// Formats a MAC address.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The configuration's MAC, or a random one.
fn guest_mac(config: &NetConfig) -> Result<[u8; 6], NetError> {
    match &config.mac {
        Some(m) => parse_mac(m),
        None => Ok(random_mac()),
    }
}

fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most 6 bytes into the valid array.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr() as *mut libc::c_void, 6, 0) };
    if n != 6 {
        // Still unique enough for one host: the time and the pid.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id());
        mac.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    // Locally administered, unicast.
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

impl NetConfig {
    /// Checks the configuration and that its backend exists, opening
    /// nothing: the one-line errors a VM gets before it starts.
    pub fn check(&self) -> Result<(), NetError> {
        if let Some(mac) = &self.mac {
            parse_mac(mac)?;
        }
        for limits in [&self.rx_rate_limiter, &self.tx_rate_limiter]
            .into_iter()
            .flatten()
        {
            limits.check()?;
        }
        match (&self.tap, &self.netns) {
            (Some(tap), None) if self.tap_name.is_none() && self.host_address.is_none() => {
                Tap::check_existing(tap)?
            }
            (None, Some(ns)) => {
                Tap::check_netns(ns, self.tap_name.as_deref(), self.host_address.as_deref())?
            }
            _ => return Err(NetError::Backend),
        }
        Ok(())
    }
}

/// Counters (shown in listings, and how tests see that nothing spins).
#[derive(Default, Debug)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_dropped: AtomicU64,
    /// Times RX waited for the guest to post buffers.
    pub rx_waits: AtomicU64,
    /// Times TX waited for the TAP to take more.
    pub tx_waits: AtomicU64,
    /// Worker wake-ups.
    pub wakes: AtomicU64,
    /// Times a received frame waited for the RX rate limiter.
    pub rx_throttled: AtomicU64,
    /// Times a transmitted frame waited for the TX rate limiter.
    pub tx_throttled: AtomicU64,
}

/// The device's state as plain data (for listings and snapshots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetState {
    pub config: NetConfig,
    pub mac: String,
    pub tap: String,
    pub offered_features: u64,
    pub acked_features: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    #[serde(default)]
    pub rx_throttled: u64,
    #[serde(default)]
    pub tx_throttled: u64,
}

/// What carries frames to and from the host: a TAP, or (unit tests) any
/// packet socket with the same one-frame-per-call semantics.
pub enum Backend {
    Tap(Tap),
    #[cfg(test)]
    Socket(OwnedFd),
}

impl Backend {
    fn fd(&self) -> RawFd {
        match self {
            Backend::Tap(t) => t.fd().as_raw_fd(),
            #[cfg(test)]
            Backend::Socket(s) => s.as_raw_fd(),
        }
    }

    fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        match self {
            Backend::Tap(t) => t.set_offload(flags),
            #[cfg(test)]
            Backend::Socket(_) => Ok(()),
        }
    }

    fn name(&self) -> String {
        match self {
            Backend::Tap(t) => t.name().to_string(),
            #[cfg(test)]
            Backend::Socket(_) => "socket".into(),
        }
    }
}

/// The network device.
pub struct Net {
    config: NetConfig,
    mac: [u8; 6],
    features: u64,
    acked: u64,
    backend: Arc<Backend>,
    worker: Option<Worker>,
    stats: Arc<NetStats>,
}

impl Net {
    /// Opens the backend the configuration names.
    pub fn new(config: &NetConfig) -> Result<Net, NetError> {
        config.check()?;
        let mac = guest_mac(config)?;
        let tap = match (&config.tap, &config.netns) {
            (Some(tap), None) => Tap::open_existing(tap)?,
            // The TAP's own MAC follows the guest's, so a restored guest
            // finds the host where its ARP cache says.
            (None, Some(ns)) => Tap::create_in_netns(
                ns,
                config.tap_name.as_deref(),
                config.host_address.as_deref(),
                Some(host_mac_for(mac)),
            )?,
            _ => return Err(NetError::Backend),
        };
        Self::with_backend_and_mac(config, Backend::Tap(tap), mac)
    }

    /// A device on an already open backend.
    pub fn with_backend(config: &NetConfig, backend: Backend) -> Result<Net, NetError> {
        Self::with_backend_and_mac(config, backend, guest_mac(config)?)
    }

    fn with_backend_and_mac(
        config: &NetConfig,
        backend: Backend,
        mac: [u8; 6],
    ) -> Result<Net, NetError> {
        let mut features = nf::MAC | nf::STATUS;
        if config.mrg_rxbuf.unwrap_or(true) {
            features |= nf::MRG_RXBUF;
        }
        if config.offload.unwrap_or(true) {
            features |= nf::OFFLOADS;
        }
        Ok(Net {
            config: config.clone(),
            mac,
            features,
            acked: 0,
            backend: Arc::new(backend),
            worker: None,
            stats: Arc::default(),
        })
    }

    /// The device's state as plain data.
    pub fn state(&self) -> NetState {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetState {
            config: self.config.clone(),
            mac: format_mac(&self.mac),
            tap: self.backend.name(),
            offered_features: self.features,
            acked_features: self.acked,
            rx_frames: get(&s.rx_frames),
            rx_bytes: get(&s.rx_bytes),
            rx_dropped: get(&s.rx_dropped),
            tx_frames: get(&s.tx_frames),
            tx_bytes: get(&s.tx_bytes),
            tx_dropped: get(&s.tx_dropped),
            rx_throttled: get(&s.rx_throttled),
            tx_throttled: get(&s.tx_throttled),
        }
    }

    /// The counters (tests watch them).
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    fn config_image(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        c
    }
}

/// The TUNSETOFFLOAD flags for what the driver accepted.
pub fn tap_offload_flags(acked: u64) -> u32 {
    let mut f = 0;
    if acked & nf::GUEST_CSUM != 0 {
        f |= libc::TUN_F_CSUM;
        if acked & nf::GUEST_TSO4 != 0 {
            f |= libc::TUN_F_TSO4;
        }
        if acked & nf::GUEST_TSO6 != 0 {
            f |= libc::TUN_F_TSO6;
        }
    }
    f
}

/// What a pass over the queues did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Frames moved.
    pub frames: usize,
    /// Waiting: TX for the TAP to drain, RX for the guest's buffers.
    pub blocked: bool,
    /// Stopped after [`BATCH`] frames with more to do.
    pub more: bool,
}

/// The rate limiters of a device that has one, and the timer that resumes
/// it when they can pay again.
pub struct NetThrottle {
    rx: Option<RateLimiter>,
    tx: Option<RateLimiter>,
    timer: TimerFd,
    /// When the timer fires, if armed.
    deadline: Option<Instant>,
}

impl NetThrottle {
    /// Limiters for the configured directions (None: neither is limited).
    pub fn new(config: &NetConfig) -> Result<Option<NetThrottle>, NetError> {
        let make = |c: &Option<RateLimiterConfig>| -> Result<Option<RateLimiter>, NetError> {
            match c.filter(|c| !c.is_unlimited()) {
                Some(c) => Ok(Some(RateLimiter::new(&c, Instant::now())?)),
                None => Ok(None),
            }
        };
        let (rx, tx) = (
            make(&config.rx_rate_limiter)?,
            make(&config.tx_rate_limiter)?,
        );
        if rx.is_none() && tx.is_none() {
            return Ok(None);
        }
        let timer = nonblocking_timer().map_err(|source| NetError::Io {
            op: "creating the rate limiter's timerfd",
            source,
        })?;
        Ok(Some(NetThrottle {
            rx,
            tx,
            timer,
            deadline: None,
        }))
    }

    /// The timer's fd, for the worker's epoll.
    pub fn fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Arms the timer for `wait` from `now` unless it fires sooner already.
    fn arm(timer: &mut TimerFd, deadline: &mut Option<Instant>, wait: Duration, now: Instant) {
        let at = now + wait;
        if deadline.is_some_and(|d| d <= at) {
            return;
        }
        // A timer that cannot be armed is only a later resume: the next
        // kick or TAP event tries again.
        if timer.reset(wait, None).is_ok() {
            *deadline = Some(at);
        }
    }
}

/// The queues and the backend, run by the worker (or directly by tests).
pub struct NetQueues {
    pub rx: Queue,
    pub tx: Queue,
    mem: GuestMemoryMmap<()>,
    fd: RawFd,
    mrg_rxbuf: bool,
    stats: Arc<NetStats>,
    /// A received frame waiting for guest buffers (`pending_len` bytes).
    pending: Vec<u8>,
    pending_len: usize,
    /// TX waits for the TAP to be writable.
    pub tx_blocked: bool,
    /// RX waits for the guest to post buffers.
    pub rx_blocked: bool,
    /// The avail index at which RX last ran out of buffers.
    rx_exhausted_at: u16,
    /// The rate limiters, if the device has any.
    throttle: Option<NetThrottle>,
    /// The pending frame has been charged to the RX limiter.
    pending_paid: bool,
}

fn malformed(queue: &'static str, head: u16, why: &'static str) -> NetError {
    NetError::Malformed { queue, head, why }
}

impl NetQueues {
    /// Queues over `mem`, moving frames through `fd` (nonblocking).
    pub fn new(
        mem: GuestMemoryMmap<()>,
        rx: Queue,
        tx: Queue,
        fd: RawFd,
        acked: u64,
        stats: Arc<NetStats>,
    ) -> NetQueues {
        NetQueues {
            rx,
            tx,
            mem,
            fd,
            mrg_rxbuf: acked & nf::MRG_RXBUF != 0,
            stats,
            pending: vec![0u8; MAX_FRAME],
            pending_len: 0,
            tx_blocked: false,
            rx_blocked: false,
            rx_exhausted_at: 0,
            throttle: None,
            pending_paid: false,
        }
    }

    /// Limits both directions with `throttle` (its timer must wake the
    /// worker as extra fd 1: [`NetQueues::handle`]).
    pub fn with_throttle(mut self, throttle: Option<NetThrottle>) -> NetQueues {
        self.throttle = throttle;
        self
    }

    /// Sends up to [`BATCH`] frames from the TX queue. `notify(TX)` when the
    /// driver wants an interrupt.
    pub fn process_tx(&mut self, notify: &mut dyn FnMut(usize)) -> Result<Progress, NetError> {
        let mut p = Progress::default();
        let (mem, fd, stats, tx_blocked) = (&self.mem, self.fd, &self.stats, &mut self.tx_blocked);
        let throttle = &mut self.throttle;
        let done = drain(
            &mut self.tx,
            mem,
            |_| NetError::BrokenQueue("transmit"),
            |chain| {
                if p.frames == BATCH {
                    p.more = true;
                    return Ok(Served::Later);
                }
                let head = chain.head_index();
                let mut iov: Vec<libc::iovec> = Vec::with_capacity(4);
                let mut total = 0usize;
                let mut cut = false;
                for desc in chain {
                    cut = desc.has_next();
                    if desc.is_write_only() {
                        return Err(malformed("transmit", head, "a device-writable descriptor"));
                    }
                    let len = desc.len() as usize;
                    total += len;
                    if total > MAX_FRAME {
                        return Err(malformed("transmit", head, "a frame over 64 KiB"));
                    }
                    if len == 0 {
                        continue;
                    }
                    let slice = mem
                        .get_slice(desc.addr(), len)
                        .map_err(|_| malformed("transmit", head, "a buffer outside guest RAM"))?;
                    iov.push(libc::iovec {
                        iov_base: slice.ptr_guard().as_ptr() as *mut libc::c_void,
                        iov_len: len,
                    });
                }
                if cut {
                    return Err(malformed("transmit", head, "a looping or cut chain"));
                }
                if total < VNET_HDR_LEN {
                    return Err(malformed("transmit", head, "no virtio-net header"));
                }
                if let Some(NetThrottle {
                    tx: Some(limiter),
                    timer,
                    deadline,
                    ..
                }) = throttle
                {
                    let (bytes, now) = ((total - VNET_HDR_LEN) as u64, Instant::now());
                    if !limiter.consume(bytes, 1, now) {
                        stats.tx_throttled.fetch_add(1, Ordering::Relaxed);
                        NetThrottle::arm(timer, deadline, limiter.wait(bytes, 1, now), now);
                        p.blocked = true;
                        return Ok(Served::Later);
                    }
                }
                let n = loop {
                    // SAFETY: every iovec points inside guest RAM (get_slice
                    // checked each range), which stays mapped while `mem`
                    // lives; the kernel only reads from them.
                    let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
                    if n >= 0 {
                        break Ok(n);
                    }
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EINTR) {
                        break Err(e);
                    }
                };
                match n {
                    Ok(_) => {
                        stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                        stats
                            .tx_bytes
                            .fetch_add((total - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                    }
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOBUFS)) => {
                        // Full: the chain goes back; the TAP's EPOLLOUT resumes.
                        *tx_blocked = true;
                        stats.tx_waits.fetch_add(1, Ordering::Relaxed);
                        p.blocked = true;
                        return Ok(Served::Later);
                    }
                    // Refused (a bad GSO header, the link detached...):
                    // the frame is dropped, the guest goes on.
                    Err(_) => {
                        stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                *tx_blocked = false;
                p.frames += 1;
                Ok(Served::Used(0))
            },
        )?;
        if wants_interrupt(&mut self.tx, &self.mem, done.used) {
            notify(TX);
        }
        Ok(p)
    }

    /// Reads the next frame from the backend into `pending`; false when
    /// there is none (`EAGAIN`).
    fn read_frame(&mut self) -> Result<bool, NetError> {
        loop {
            // SAFETY: reads at most `pending.len()` bytes into the owned buffer.
            let n = unsafe {
                libc::read(
                    self.fd,
                    self.pending.as_mut_ptr() as *mut libc::c_void,
                    self.pending.len(),
                )
            };
            if n >= 0 {
                self.pending_len = n as usize;
                if self.pending_len < VNET_HDR_LEN {
                    // A runt (or EOF on a test socket): nothing to deliver.
                    self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    if n == 0 {
                        return Ok(false);
                    }
                    continue;
                }
                return Ok(true);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => return Ok(false),
                Some(libc::EINTR) => continue,
                // A TAP whose link went away: nothing to read, not the guest's fault.
                Some(libc::EIO) | Some(libc::EBADFD) => return Ok(false),
                _ => {
                    return Err(NetError::Io {
                        op: "reading from the TAP",
                        source: e,
                    })
                }
            }
        }
    }

    /// Collects a writable chain's buffers, checked: (address, length).
    fn rx_buffers(
        &self,
        chain: impl Iterator<Item = virtio_queue::Descriptor>,
        head: u16,
    ) -> Result<Vec<(GuestAddress, usize)>, NetError> {
        let mut bufs = Vec::with_capacity(4);
        let mut cut = false;
        let mut total = 0usize;
        for desc in chain {
            cut = desc.has_next();
            if !desc.is_write_only() {
                return Err(malformed("receive", head, "a device-readable descriptor"));
            }
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            if self.mem.get_slice(desc.addr(), len).is_err() {
                return Err(malformed("receive", head, "a buffer outside guest RAM"));
            }
            // Bounded: more room than the largest frame is never used.
            if total < MAX_FRAME {
                bufs.push((desc.addr(), len));
            }
            total = total.saturating_add(len);
        }
        if cut {
            return Err(malformed("receive", head, "a looping or cut chain"));
        }
        Ok(bufs)
    }

    /// Copies `pending` into the guest's buffers; false when there are not
    /// enough (the frame stays pending and nothing is consumed).
    fn deliver(&mut self) -> Result<bool, NetError> {
        let broken = || NetError::BrokenQueue("receive");
        let len = self.pending_len;
        // num_buffers, the header's last field: 1 unless the frame spans more.
        self.pending[10..12].copy_from_slice(&1u16.to_le_bytes());
        let mut used: Vec<(u16, u32)> = Vec::new();
        let mut first: Vec<(GuestAddress, usize)> = Vec::new();
        let mut off = 0usize;
        while off < len {
            // An avail index more than a queue ahead is an error here.
            let Some(chain) = pop(&mut self.rx, &self.mem).map_err(|_| broken())? else {
                self.rx_exhausted_at = self.rx.next_avail();
                for _ in 0..used.len() {
                    self.rx.go_to_previous_position();
                }
                return Ok(false);
            };
            let head = chain.head_index();
            let bufs = self.rx_buffers(chain, head)?;
            let room: usize = bufs.iter().map(|b| b.1).sum();
            if used.is_empty() && room < VNET_HDR_LEN {
                return Err(malformed(
                    "receive",
                    head,
                    "a buffer smaller than the header",
                ));
            }
            if room == 0 {
                return Err(malformed("receive", head, "an empty buffer"));
            }
            if !self.mrg_rxbuf && room < len {
                // The guest's buffer cannot take this frame: drop the frame,
                // keep the buffer.
                self.rx.go_to_previous_position();
                self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                self.pending_len = 0;
                return Ok(true);
            }
            if used.is_empty() {
                first.clone_from(&bufs);
            }
            let start = off;
            for (addr, blen) in bufs {
                if off == len {
                    break;
                }
                let n = blen.min(len - off);
                self.mem
                    .write_slice(&self.pending[off..off + n], addr)
                    .map_err(|_| malformed("receive", head, "a buffer outside guest RAM"))?;
                crate::dirty::mark(addr.0, n as u64);
                off += n;
            }
            used.push((head, (off - start) as u32));
        }
        if used.len() > 1 {
            // Rewrite the header in the first chain with the real count.
            let count = u16::try_from(used.len()).unwrap_or(u16::MAX);
            self.pending[10..12].copy_from_slice(&count.to_le_bytes());
            let mut off = 0;
            for (addr, blen) in first {
                if off == VNET_HDR_LEN {
                    break;
                }
                let n = blen.min(VNET_HDR_LEN - off);
                self.mem
                    .write_slice(&self.pending[off..off + n], addr)
                    .map_err(|_| broken())?;
                crate::dirty::mark(addr.0, n as u64);
                off += n;
            }
        }
        for (head, n) in used {
            self.rx.add_used(&self.mem, head, n).map_err(|_| broken())?;
        }
        crate::dirty::mark_used_ring(&self.rx);
        self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.stats
            .rx_bytes
            .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        self.pending_len = 0;
        Ok(true)
    }

    /// Moves up to [`BATCH`] frames from the backend into the RX queue.
    pub fn process_rx(&mut self, notify: &mut dyn FnMut(usize)) -> Result<Progress, NetError> {
        let mut p = Progress::default();
        loop {
            if p.frames == BATCH {
                p.more = true;
                break;
            }
            if self.pending_len == 0 && !self.read_frame()? {
                self.rx_blocked = false;
                break;
            }
            if !self.pending_paid {
                if let Some(NetThrottle {
                    rx: Some(limiter),
                    timer,
                    deadline,
                    ..
                }) = &mut self.throttle
                {
                    let (bytes, now) = ((self.pending_len - VNET_HDR_LEN) as u64, Instant::now());
                    if !limiter.consume(bytes, 1, now) {
                        // The frame stays pending; the TAP holds the rest.
                        self.stats.rx_throttled.fetch_add(1, Ordering::Relaxed);
                        NetThrottle::arm(timer, deadline, limiter.wait(bytes, 1, now), now);
                        p.blocked = true;
                        break;
                    }
                }
                self.pending_paid = true;
            }
            if self.deliver()? {
                self.pending_paid = false;
                p.frames += 1;
                continue;
            }
            // Not enough buffers (chains taken for a frame were put back):
            // ask for a kick on the next buffer past those already seen,
            // unless one arrived meanwhile.
            let resume = self.rx.next_avail();
            self.rx.set_next_avail(self.rx_exhausted_at);
            let more = self.rx.enable_notification(&self.mem);
            crate::dirty::mark_used_ring(&self.rx);
            self.rx.set_next_avail(resume);
            match more {
                Ok(true) => continue,
                Ok(false) => {
                    if !self.rx_blocked {
                        self.stats.rx_waits.fetch_add(1, Ordering::Relaxed);
                    }
                    self.rx_blocked = true;
                    p.blocked = true;
                    break;
                }
                Err(_) => return Err(NetError::BrokenQueue("receive")),
            }
        }
        if p.frames > 0 && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            notify(RX);
        }
        Ok(p)
    }

    /// Handles one wake: a kick on either queue or the backend being
    /// readable or writable. Both directions get a turn until neither has
    /// more to do, [`BATCH`] frames at a time.
    pub fn handle(&mut self, wake: Wake, notify: &mut dyn FnMut(usize)) -> Result<(), NetError> {
        let (mut rx, mut tx) = match wake {
            Wake::Kick(RX) => (true, false),
            Wake::Kick(TX) => (false, true),
            Wake::Kick(_) => (false, false),
            Wake::Fd(1, _) => {
                // The rate limiters' timer: both directions try again.
                if let Some(t) = &mut self.throttle {
                    let _ = t.timer.wait();
                    t.deadline = None;
                }
                (true, true)
            }
            Wake::Fd(_, ev) => (
                ev.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP),
                ev.contains(EventSet::OUT) && self.tx_blocked,
            ),
        };
        while rx || tx {
            if tx {
                tx = self.process_tx(notify)?.more;
            }
            if rx {
                rx = self.process_rx(notify)?.more;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        device_type::NET
    }

    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_image(), offset, data);
    }

    fn activate(&mut self, mut a: Activation) -> Result<(), VirtioError> {
        let rx = a.take_queue(RX)?;
        let tx = a.take_queue(TX)?;
        self.acked = a.features;
        self.backend
            .set_offload(tap_offload_flags(a.features))
            .map_err(NetError::from)?;
        let backend = self.backend.clone();
        let fd = backend.fd();
        let stats = self.stats.clone();
        let throttle = NetThrottle::new(&self.config)?;
        let mut extra = vec![(fd, EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED)];
        if let Some(t) = &throttle {
            extra.push((t.fd(), EventSet::IN));
        }
        let mut queues =
            NetQueues::new(a.mem.mmap().clone(), rx, tx, fd, a.features, stats.clone())
                .with_throttle(throttle);
        let kicks = std::mem::take(&mut a.kicks);
        let link = a.link.clone();
        self.worker = Some(Worker::spawn(
            "virtio-net",
            link,
            kicks,
            extra,
            move |wake| {
                let _keep = &backend;
                stats.wakes.fetch_add(1, Ordering::Relaxed);
                let interrupt = &a.interrupt;
                match queues.handle(wake, &mut |q| interrupt.queue(q)) {
                    Ok(()) => true,
                    Err(_) => {
                        a.fail();
                        false
                    }
                }
            },
        )?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.acked = 0;
        let _ = self.backend.set_offload(0);
    }

    fn describe(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self.state()).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("kind".into(), "net".into());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::root::PciDevice;
    use crate::test_rng::XorShift;
    use crate::virtio::status;
    use crate::virtio::test_driver::{Buf, TestDriver, BUFFERS};
    use std::os::fd::FromRawFd;
    use std::time::{Duration, Instant};

    /// A nonblocking SOCK_SEQPACKET pair: one frame per call, like a TAP.
    fn packet_pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fds into the valid array.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: both fds were just created and are owned by nothing else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn send(fd: &OwnedFd, frame: &[u8]) -> bool {
        // SAFETY: writes from a valid slice.
        let n = unsafe {
            libc::write(
                fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
            )
        };
        n == frame.len() as isize
    }

    fn recv(fd: &OwnedFd) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_FRAME + 100];
        // SAFETY: reads into a valid, owned buffer.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
            )
        };
        if n < 0 {
            return None;
        }
        buf.truncate(n as usize);
        Some(buf)
    }

    fn recv_wait(fd: &OwnedFd) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(f) = recv(fd) {
                return f;
            }
            assert!(Instant::now() < deadline, "no frame from the device");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn frame(payload_len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
        f
    }

    fn device(config: NetConfig) -> (TestDriver, OwnedFd, Arc<NetStats>) {
        let (ours, peer) = packet_pair();
        let net = Net::with_backend(&config, Backend::Socket(ours)).unwrap();
        let stats = net.stats();
        (TestDriver::new(Box::new(net)), peer, stats)
    }

    fn mac_config() -> NetConfig {
        NetConfig {
            mac: Some("52:54:00:12:34:56".into()),
            ..NetConfig::default()
        }
    }

    const ALL: u64 = nf::MAC | nf::STATUS | nf::MRG_RXBUF | nf::OFFLOADS;

    #[test]
    fn config_space_has_the_mac_and_link_up_and_features_follow_the_config() {
        let (mut d, _peer, _) = device(mac_config());
        let f = d.device_features();
        assert_eq!(f & ALL, ALL, "{f:#x}");
        let mut c = [0u8; 8];
        d.dev.bar_read(0, 0x2000, &mut c);
        assert_eq!(c, [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0]);
        let (mut d, _peer, _) = device(NetConfig {
            offload: Some(false),
            mrg_rxbuf: Some(false),
            ..mac_config()
        });
        let f = d.device_features();
        assert_eq!(f & (nf::OFFLOADS | nf::MRG_RXBUF), 0, "{f:#x}");
        assert_eq!(
            tap_offload_flags(ALL),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
        assert_eq!(tap_offload_flags(nf::GUEST_TSO4), 0, "TSO needs GUEST_CSUM");
    }

    #[test]
    fn macs_are_parsed_and_random_ones_are_local_unicast() {
        assert_eq!(
            parse_mac("52:54:00:AB:cd:01").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 1]
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "01:00:5e:00:00:01",
            "5:54:00:ab:cd:01",
            "zz:54:00:ab:cd:01",
        ] {
            assert!(matches!(parse_mac(bad), Err(NetError::BadMac(_))), "{bad}");
        }
        let m = random_mac();
        assert_eq!(m[0] & 3, 2);
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 0xab, 0xcd, 1]),
            "52:54:00:ab:cd:01"
        );
    }

    #[test]
    fn configs_need_one_backend_and_state_round_trips_through_json() {
        for bad in [
            NetConfig::default(),
            NetConfig {
                tap: Some("a".into()),
                netns: Some("b".into()),
                ..NetConfig::default()
            },
            NetConfig {
                tap: Some("a".into()),
                host_address: Some("10.0.0.1/24".into()),
                ..NetConfig::default()
            },
        ] {
            assert!(matches!(bad.check(), Err(NetError::Backend)), "{bad:?}");
        }
        let c: NetConfig = serde_json::from_str(
            r#"{"netns":"ns1","tapName":"dv0","hostAddress":"10.0.2.1/24","mac":"52:54:00:12:34:56","offload":false}"#,
        )
        .unwrap();
        assert_eq!(c.tap_name.as_deref(), Some("dv0"));
        assert!(serde_json::from_str::<NetConfig>(r#"{"tap":"x","bogus":1}"#).is_err());
        let (ours, _peer) = packet_pair();
        let net = Net::with_backend(&c, Backend::Socket(ours)).unwrap();
        net.stats.rx_frames.store(7, Ordering::Relaxed);
        let state = net.state();
        let json = serde_json::to_string(&state).unwrap();
        let back: NetState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.rx_frames, 7);
        assert_eq!(back.mac, "52:54:00:12:34:56");
        assert_eq!(net.describe()["kind"], "net");
    }

    #[test]
    fn transmits_a_frame_to_the_backend_and_interrupts() {
        let (mut d, peer, stats) = device(mac_config());
        let s = d.start(ALL);
        assert_eq!(s & status::DRIVER_OK, status::DRIVER_OK, "status {s:#x}");
        let f = frame(1500, 3);
        d.mem.write(BUFFERS, &f[..VNET_HDR_LEN]).unwrap();
        d.mem.write(BUFFERS + 0x1000, &f[VNET_HDR_LEN..]).unwrap();
        let head = d.post(
            TX,
            &[
                Buf::readable(BUFFERS, VNET_HDR_LEN as u32),
                Buf::readable(BUFFERS + 0x1000, 1500),
            ],
        );
        assert_eq!(recv_wait(&peer), f);
        assert_eq!(d.wait_used(TX), Some((head as u32, 0)));
        assert_eq!(stats.tx_frames.load(Ordering::Relaxed), 1);
        assert_eq!(stats.tx_bytes.load(Ordering::Relaxed), 1500);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !d.irqs.fired.lock().unwrap().contains(&(TX as u16)) {
            assert!(Instant::now() < deadline, "no TX interrupt");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn rate_limited_tx_and_rx_wait_for_their_buckets_and_lose_nothing() {
        use crate::rate_limiter::BucketConfig;
        // One frame per 150 ms each way.
        let one_per = Some(RateLimiterConfig {
            ops: Some(BucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time_ms: 150,
            }),
            bandwidth: None,
        });
        let (mut d, peer, stats) = device(NetConfig {
            rx_rate_limiter: one_per,
            tx_rate_limiter: one_per,
            ..mac_config()
        });
        d.start(ALL);
        let t = Instant::now();
        for i in 0..3u64 {
            let f = frame(100, i as u8);
            let at = BUFFERS + i * 0x1000;
            d.mem.write(at, &f).unwrap();
            let head = d.post(TX, &[Buf::readable(at, f.len() as u32)]);
            assert_eq!(d.wait_used(TX), Some((head as u32, 0)));
            assert_eq!(recv_wait(&peer), f, "frame {i} in order");
        }
        assert!(
            t.elapsed() >= Duration::from_millis(290),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(stats.tx_throttled.load(Ordering::Relaxed), 2);
        // RX: three frames wait in the backend, delivered one per refill.
        let t = Instant::now();
        for i in 0..3u8 {
            assert!(send(&peer, &frame(60, 10 + i)));
        }
        for i in 0..3u64 {
            let at = BUFFERS + 0x10000 + i * 0x1000;
            let head = d.post(RX, &[Buf::writable(at, 2048)]);
            assert_eq!(d.wait_used(RX).map(|u| u.0), Some(head as u32));
            let mut got = vec![0u8; 60 + VNET_HDR_LEN];
            d.mem.read(at, &mut got).unwrap();
            assert_eq!(got[VNET_HDR_LEN..], frame(60, 10 + i as u8)[VNET_HDR_LEN..]);
        }
        assert!(
            t.elapsed() >= Duration::from_millis(290),
            "{:?}",
            t.elapsed()
        );
        assert!(stats.rx_throttled.load(Ordering::Relaxed) >= 2);
        assert_eq!(stats.rx_dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn receives_a_frame_into_one_buffer_with_num_buffers_1() {
        let (mut d, peer, _) = device(mac_config());
        d.start(ALL);
        d.mem.write(BUFFERS, &[0xee; 2048]).unwrap();
        let head = d.post(RX, &[Buf::writable(BUFFERS, 2048)]);
        let mut f = frame(60, 9);
        f[10] = 0x77; // a stale num_buffers from the backend is overwritten
        assert!(send(&peer, &f));
        assert_eq!(d.wait_used(RX), Some((head as u32, f.len() as u32)));
        let mut got = vec![0u8; f.len()];
        d.mem.read(BUFFERS, &mut got).unwrap();
        f[10] = 1;
        assert_eq!(got, f);
    }

    #[test]
    fn a_frame_spans_several_buffers_with_mrg_rxbuf() {
        let (mut d, peer, _) = device(mac_config());
        d.start(ALL);
        let heads: Vec<u16> = (0..3)
            .map(|i| d.post(RX, &[Buf::writable(BUFFERS + i * 0x1000, 1000)]))
            .collect();
        let f = frame(2500 - VNET_HDR_LEN, 1);
        assert!(send(&peer, &f));
        assert_eq!(d.wait_used(RX), Some((heads[0] as u32, 1000)));
        assert_eq!(d.wait_used(RX), Some((heads[1] as u32, 1000)));
        assert_eq!(d.wait_used(RX), Some((heads[2] as u32, 500)));
        let mut got = vec![0u8; 2500];
        for i in 0..3u64 {
            let n = if i == 2 { 500 } else { 1000 };
            d.mem
                .read(
                    BUFFERS + i * 0x1000,
                    &mut got[i as usize * 1000..i as usize * 1000 + n],
                )
                .unwrap();
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(got[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
    }

    #[test]
    fn a_frame_waits_without_spinning_until_enough_mergeable_buffers_arrive() {
        let (mut d, peer, stats) = device(mac_config());
        d.start(ALL);
        let first = d.post(RX, &[Buf::writable(BUFFERS, 1000)]);
        let f = frame(2500 - VNET_HDR_LEN, 2);
        assert!(send(&peer, &f));
        std::thread::sleep(Duration::from_millis(300));
        let wakes = stats.wakes.load(Ordering::Relaxed);
        assert!(
            wakes <= 4,
            "the worker woke {wakes} times waiting for buffers"
        );
        assert_eq!(stats.rx_frames.load(Ordering::Relaxed), 0);
        assert_eq!(stats.rx_waits.load(Ordering::Relaxed), 1);
        let second = d.post(RX, &[Buf::writable(BUFFERS + 0x1000, 1000)]);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            stats.rx_frames.load(Ordering::Relaxed),
            0,
            "two buffers are not enough"
        );
        let third = d.post(RX, &[Buf::writable(BUFFERS + 0x2000, 1000)]);
        assert_eq!(d.wait_used(RX), Some((first as u32, 1000)));
        assert_eq!(d.wait_used(RX), Some((second as u32, 1000)));
        assert_eq!(d.wait_used(RX), Some((third as u32, 500)));
    }

    #[test]
    fn without_mrg_rxbuf_a_frame_too_big_for_the_buffer_is_dropped_and_the_buffer_kept() {
        let (mut d, peer, stats) = device(NetConfig {
            mrg_rxbuf: Some(false),
            ..mac_config()
        });
        d.start(ALL);
        let head = d.post(RX, &[Buf::writable(BUFFERS, 200)]);
        assert!(send(&peer, &frame(500, 0)));
        assert!(send(&peer, &frame(100, 5)));
        assert_eq!(d.wait_used(RX), Some((head as u32, 112)));
        assert_eq!(stats.rx_dropped.load(Ordering::Relaxed), 1);
        let mut got = vec![0u8; 112];
        d.mem.read(BUFFERS, &mut got).unwrap();
        let mut want = frame(100, 5);
        want[10] = 1;
        assert_eq!(got, want);
    }

    #[test]
    fn rx_waits_for_buffers_without_spinning_and_keeps_the_order() {
        let (mut d, peer, stats) = device(mac_config());
        d.start(ALL);
        for i in 0..5 {
            assert!(send(&peer, &frame(100, i)));
        }
        std::thread::sleep(Duration::from_millis(300));
        let wakes = stats.wakes.load(Ordering::Relaxed);
        assert!(
            wakes <= 4,
            "the worker woke {wakes} times with nothing to do"
        );
        assert_eq!(stats.rx_waits.load(Ordering::Relaxed), 1);
        assert_eq!(stats.rx_frames.load(Ordering::Relaxed), 0);
        for i in 0..5u64 {
            let head = d.post(RX, &[Buf::writable(BUFFERS + i * 0x1000, 1000)]);
            assert_eq!(d.wait_used(RX), Some((head as u32, 112)));
            let mut got = [0u8; 112];
            d.mem.read(BUFFERS + i * 0x1000, &mut got).unwrap();
            assert_eq!(
                got[VNET_HDR_LEN..],
                frame(100, i as u8)[VNET_HDR_LEN..],
                "frame {i}"
            );
        }
    }

    #[test]
    fn tx_waits_for_a_full_backend_without_spinning_then_resumes() {
        let (ours, peer) = packet_pair();
        let small: libc::c_int = 8192;
        // SAFETY: setsockopt reads one int from the valid pointer.
        unsafe {
            libc::setsockopt(
                ours.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                &small as *const libc::c_int as *const libc::c_void,
                4,
            )
        };
        let net = Net::with_backend(&mac_config(), Backend::Socket(ours)).unwrap();
        let stats = net.stats();
        let mut d = TestDriver::new(Box::new(net));
        d.start(ALL);
        let n = 100u64;
        let f = frame(4000, 0);
        for i in 0..n {
            d.mem.write(BUFFERS + i * 0x2000, &f).unwrap();
            d.post(TX, &[Buf::readable(BUFFERS + i * 0x2000, f.len() as u32)]);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.tx_waits.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the backend never filled");
            std::thread::sleep(Duration::from_millis(1));
        }
        let sent = stats.tx_frames.load(Ordering::Relaxed);
        assert!(sent < n, "{sent}");
        let wakes = stats.wakes.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            stats.wakes.load(Ordering::Relaxed) - wakes <= 2,
            "the worker spun while the backend was full"
        );
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while got < n {
            match recv(&peer) {
                Some(frame) => {
                    assert_eq!(frame, f);
                    got += 1;
                }
                None => {
                    assert!(Instant::now() < deadline, "only {got} of {n} frames");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        for _ in 0..n {
            assert!(d.wait_used(TX).is_some());
        }
        assert_eq!(stats.tx_frames.load(Ordering::Relaxed), n);
    }

    /// Posts a raw chain and expects DEVICE_NEEDS_RESET.
    fn expect_reset(q: usize, descs: &[(u64, u32, u16, u16)], offload: bool) {
        let (mut d, peer, _) = device(NetConfig {
            offload: Some(offload),
            ..mac_config()
        });
        d.start(ALL);
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            d.set_desc(q, i as u16, addr, len, flags, next);
        }
        d.publish(q, 0);
        if q == RX {
            assert!(send(&peer, &frame(100, 0)));
        }
        assert!(d.wait_needs_reset(), "queue {q}: {descs:?}");
    }

    #[test]
    fn malformed_chains_stop_the_device_with_needs_reset() {
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        let b = BUFFERS;
        // TX: a device-writable descriptor, outside RAM, oversized, looping,
        // shorter than the header.
        expect_reset(TX, &[(b, 100, WRITE, 0)], true);
        expect_reset(TX, &[((16 << 20) - 8, 100, 0, 0)], true);
        expect_reset(TX, &[(b, 40_000, NEXT, 1), (b, 40_000, 0, 0)], true);
        expect_reset(TX, &[(b, 100, NEXT, 1), (b, 100, NEXT, 0)], true);
        expect_reset(TX, &[(b, 4, 0, 0)], false);
        // RX: a device-readable descriptor, outside RAM, looping, too small.
        expect_reset(RX, &[(b, 2048, 0, 0)], true);
        expect_reset(RX, &[(u64::MAX - 100, 2048, WRITE, 0)], true);
        expect_reset(
            RX,
            &[(b, 100, WRITE | NEXT, 1), (b, 100, WRITE | NEXT, 0)],
            true,
        );
        expect_reset(RX, &[(b, 4, WRITE, 0)], true);
    }

    #[test]
    fn a_reset_device_comes_back() {
        let (mut d, peer, _) = device(mac_config());
        d.start(ALL);
        d.set_desc(TX, 0, BUFFERS, 100, 2, 0);
        d.publish(TX, 0);
        assert!(d.wait_needs_reset());
        let s = d.start(ALL);
        assert_eq!(s & status::NEEDS_RESET, 0, "status {s:#x}");
        let f = frame(64, 4);
        d.mem.write(BUFFERS, &f).unwrap();
        d.post(TX, &[Buf::readable(BUFFERS, f.len() as u32)]);
        assert_eq!(recv_wait(&peer), f);
    }

    /// Random descriptor tables and avail rings on both queues, driven
    /// directly (no worker): never a panic, only typed errors, and what
    /// comes out is bounded.
    #[test]
    fn random_descriptor_tables_never_break_the_host() {
        let cases: u64 = std::env::var("DENOVISOR_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000);
        const SIZE: u16 = 16;
        const RAM: u64 = 1 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let (ours, peer) = packet_pair();
        let mut rng = XorShift::new(0x6a09_e667_f3bc_c908);
        let mut next = move || rng.next_u64();
        let stats = Arc::new(NetStats::default());
        let (mut ok, mut errors) = (0u64, 0u64);
        for case in 0..cases {
            let mut queues = Vec::new();
            for q in 0..2u64 {
                let base = 0x1000 * (1 + 4 * q);
                let mut queue = Queue::new(SIZE).unwrap();
                queue.set_size(SIZE);
                queue.set_desc_table_address(Some(base as u32), Some(0));
                queue.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
                queue.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
                queue.set_event_idx(next() & 1 == 0);
                queue.set_ready(true);
                // Mostly plausible chains with a few hostile fields, or
                // (one case in four) anything at all.
                let wild = next() % 4 == 0;
                let sane = |r: u64| !wild && !r.is_multiple_of(48);
                for i in 0..SIZE as u64 {
                    let r = next();
                    let addr = if sane(r) {
                        0x10000 + next() % (RAM - 0x30000)
                    } else {
                        match r % 3 {
                            0 => next(),
                            1 => RAM - (next() % 64),
                            _ => 0x10000 + next() % (RAM - 0x20000),
                        }
                    };
                    let len = if sane(r >> 3) {
                        (VNET_HDR_LEN as u64 + next() % 4096) as u32
                    } else if (r >> 8) % 2 == 0 {
                        next() as u32
                    } else {
                        (next() % 70_000) as u32
                    };
                    let flags = if sane(r >> 6) {
                        (if q == 0 { 2 } else { 0 }) | u16::from((r >> 16) % 4 == 0)
                    } else {
                        ((r >> 16) % 8) as u16
                    };
                    let nxt = if sane(r >> 9) {
                        ((i + 1) % SIZE as u64) as u16
                    } else {
                        ((r >> 24) % (SIZE as u64 + 4)) as u16
                    };
                    let mut d = [0u8; 16];
                    d[..8].copy_from_slice(&addr.to_le_bytes());
                    d[8..12].copy_from_slice(&len.to_le_bytes());
                    d[12..14].copy_from_slice(&flags.to_le_bytes());
                    d[14..16].copy_from_slice(&nxt.to_le_bytes());
                    mem.write_slice(&d, GuestAddress(base + 16 * i)).unwrap();
                }
                let avail_idx = if sane(next()) {
                    (next() % (SIZE as u64 + 1)) as u16
                } else {
                    next() as u16
                };
                mem.write_slice(&[0, 0], GuestAddress(base + 0x1000))
                    .unwrap();
                mem.write_slice(&avail_idx.to_le_bytes(), GuestAddress(base + 0x1002))
                    .unwrap();
                for i in 0..SIZE as u64 {
                    let r = next();
                    let h = if sane(r) {
                        (r >> 8) % SIZE as u64
                    } else {
                        (r >> 8) % (SIZE as u64 + 2)
                    } as u16;
                    mem.write_slice(&h.to_le_bytes(), GuestAddress(base + 0x1004 + 2 * i))
                        .unwrap();
                }
                mem.write_slice(&[0u8; 4], GuestAddress(base + 0x2000))
                    .unwrap();
                queues.push(queue);
            }
            let tx = queues.pop().unwrap();
            let rx = queues.pop().unwrap();
            let acked = if next() & 1 == 0 { nf::MRG_RXBUF } else { 0 };
            for _ in 0..next() % 4 {
                send(&peer, &frame((next() % 3000) as usize, case as u8));
            }
            let mut nq =
                NetQueues::new(mem.clone(), rx, tx, ours.as_raw_fd(), acked, stats.clone());
            let mut irqs = Vec::new();
            let mut result = Ok(());
            for wake in [Wake::Kick(TX), Wake::Fd(0, EventSet::IN), Wake::Kick(RX)] {
                result = nq.handle(wake, &mut |q| irqs.push(q));
                if result.is_err() {
                    break;
                }
            }
            match result {
                Ok(()) => ok += 1,
                Err(NetError::Malformed { .. } | NetError::BrokenQueue(_)) => errors += 1,
                Err(e) => panic!("case {case}: unexpected {e}"),
            }
            assert!(irqs.iter().all(|&q| q == RX || q == TX));
            // Every used element names a head inside the queue and a length
            // no larger than a frame.
            for (q, base) in [(RX, 0x1000u64), (TX, 0x5000)] {
                let mut idx = [0u8; 2];
                mem.read_slice(&mut idx, GuestAddress(base + 0x2002))
                    .unwrap();
                let n = u16::from_le_bytes(idx);
                assert!(n <= SIZE, "case {case}: queue {q} used {n}");
                for i in 0..n as u64 {
                    let mut e = [0u8; 8];
                    mem.read_slice(&mut e, GuestAddress(base + 0x2004 + 8 * i))
                        .unwrap();
                    let id = u32::from_le_bytes(e[..4].try_into().unwrap());
                    let len = u32::from_le_bytes(e[4..].try_into().unwrap());
                    assert!(
                        id < SIZE as u32 && len as usize <= MAX_FRAME,
                        "case {case}: {id} {len}"
                    );
                }
            }
            // What reached the backend is bounded; drain both sides.
            while let Some(f) = recv(&peer) {
                assert!(f.len() <= MAX_FRAME && f.len() >= VNET_HDR_LEN);
            }
            while recv(&ours).is_some() {}
        }
        let moved =
            stats.tx_frames.load(Ordering::Relaxed) + stats.rx_frames.load(Ordering::Relaxed);
        eprintln!(
            "{cases} cases: {ok} ran clean, {errors} stopped the device, {moved} frames moved"
        );
        assert!(
            ok > cases / 10 && errors > cases / 10,
            "ok {ok}, errors {errors}"
        );
        assert!(moved > cases / 10, "only {moved} frames moved");
    }
}
