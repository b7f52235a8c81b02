//! virtio-vsock with Firecracker's Unix-socket host side: guest `AF_VSOCK`
//! stream sockets reach host programs through `PATH` (host → guest, with a
//! `CONNECT <port>\n` line answered `OK <hostport>\n`) and `PATH_<port>`
//! (guest → host port), as [`muxer`] describes.
//!
//! Three queues: rx (device → guest packets), tx (guest → device), event
//! (transport resets: [`Vsock`]'s `transport_reset` request closes every
//! host stream and tells the guest, which drops its connections and reads
//! its CID again, as Firecracker does after a snapshot is restored). The
//! worker thread owns an
//! [`Engine`]: it takes guest packets from tx while the control backlog has
//! room, and fills rx buffers with control packets and host bytes. A broken
//! chain (wrong direction, a loop, outside RAM, a short header, an oversized
//! length) stops the device with DEVICE_NEEDS_RESET.

pub mod muxer;
pub mod packet;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::Queue;
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;

use self::muxer::{ConnectionState, Muxer, Stats};
use self::packet::{RxBuffer, MAX_PAYLOAD};
use super::worker::{Wake, Worker};
use super::{
    device_type, drain, wants_interrupt, Activation, Interrupt, Served, VirtioDevice, VirtioError,
};
use crate::memory::GuestRam;

/// Each queue's size.
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, the only event (virtio spec 5.10.6.6).
const EVENT_TRANSPORT_RESET: u32 = 0;
/// An event's size: `struct virtio_vsock_event { le32 id; }`.
const EVENT_LEN: u32 = 4;
/// The longest `PATH_<port>` must fit a `sockaddr_un` (107 bytes and a NUL).
const SUN_PATH_MAX: usize = 107;
/// The longest port suffix, `_4294967295`.
const PORT_SUFFIX_MAX: usize = 11;

/// What can go wrong with a vsock device: its host side (before the VM runs)
/// or a guest packet (the device then needs a reset).
#[derive(Debug, Error)]
pub enum VsockError {
    /// CIDs 0-2 are reserved (hypervisor, local, host); -1 is "any".
    #[error("vsock cid {0} is reserved or out of range: use 3 to 4294967294")]
    BadCid(u64),
    /// An empty socket path.
    #[error("the vsock path is empty")]
    EmptyPath,
    /// The socket's directory does not exist.
    #[error("vsock path {0}: its directory does not exist")]
    MissingDirectory(String),
    /// Something is already at the path.
    #[error("vsock path {0} already exists (remove a stale socket first)")]
    PathExists(String),
    /// `PATH_<port>` would not fit a Unix socket address.
    #[error("vsock path {0} is too long: at most {max} bytes, so PATH_<port> fits a Unix socket address", max = SUN_PATH_MAX - PORT_SUFFIX_MAX)]
    PathTooLong(String),
    /// bind(2) or listen(2) failed.
    #[error("vsock path {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    /// A host resource failed.
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    /// A descriptor chain that loops, outgrows its queue or is empty.
    #[error("descriptor chain: {0}")]
    Chain(&'static str),
    /// A device-writable descriptor on tx or a readable one on rx.
    #[error("a descriptor has the wrong direction for its queue")]
    WrongDirection,
    /// An event buffer too small for an event.
    #[error("a {0}-byte event buffer cannot hold a 4-byte event")]
    ShortEvent(u32),
    /// A buffer too small for a packet header.
    #[error("a {0}-byte buffer cannot hold a 44-byte packet header")]
    ShortBuffer(usize),
    /// A payload length over 64 KiB.
    #[error("a packet claims {0} payload bytes (at most 65536)")]
    Oversized(u32),
    /// A payload length past the end of its chain.
    #[error("a packet needs {needed} bytes but its chain holds {available}")]
    Truncated { needed: usize, available: usize },
    /// A buffer outside guest RAM.
    #[error("guest address {0:#x} is outside guest RAM")]
    OutsideRam(u64),
    /// The queue's rings are unusable (avail index out of range...).
    #[error("queue: {0}")]
    Queue(virtio_queue::Error),
}

impl From<VsockError> for VirtioError {
    fn from(e: VsockError) -> VirtioError {
        match e {
            VsockError::Io { op, source } => VirtioError::Io { op, source },
            e => VirtioError::Malformed(e.to_string()),
        }
    }
}

/// The device's state as plain data (sockets themselves are not state: a
/// restored device starts with no connections, as after a transport reset).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VsockState {
    pub cid: u64,
    pub path: String,
    pub connections: Vec<ConnectionState>,
}

/// The queue handling: tx into the muxer, the muxer into rx, transport
/// resets into the event queue.
pub struct Engine {
    mem: GuestRam,
    rx: Queue,
    tx: Queue,
    /// The event queue, if the driver enabled it.
    event: Option<Queue>,
    /// A transport reset the guest has not been told of yet (no event
    /// buffer was there).
    reset_pending: bool,
    pub muxer: Muxer,
    payload: Vec<u8>,
    scratch: Vec<u8>,
}

impl Engine {
    /// Handling for `rx`/`tx` (and `event`) over `mem`, served by `muxer`.
    pub fn new(mem: GuestRam, rx: Queue, tx: Queue, event: Option<Queue>, muxer: Muxer) -> Engine {
        Engine {
            mem,
            rx,
            tx,
            event,
            reset_pending: false,
            muxer,
            payload: Vec::with_capacity(MAX_PAYLOAD),
            scratch: vec![0u8; MAX_PAYLOAD],
        }
    }

    /// Serves one wake; `notify(q)` raises queue `q`'s interrupt. An error
    /// means the guest broke a rule and the device must stop.
    pub fn handle(&mut self, wake: Wake, notify: &mut dyn FnMut(usize)) -> Result<(), VsockError> {
        if let Wake::Fd(..) = wake {
            self.muxer.handle_events();
        }
        let (mut tx_used, mut rx_used) = (0, 0);
        loop {
            let took = self.process_tx(&mut tx_used)?;
            let gave = self.process_rx(&mut rx_used)?;
            if !took && !gave {
                break;
            }
        }
        let m = self.mem.mmap();
        if wants_interrupt(&mut self.tx, m, tx_used) {
            notify(TX);
        }
        if wants_interrupt(&mut self.rx, m, rx_used) {
            notify(RX);
        }
        self.process_event(notify)
    }

    /// A transport reset: every host stream closes, and the guest is told
    /// on the event queue now or, with no buffer there, when one comes.
    /// Returns the streams closed and whether the event went out.
    pub fn transport_reset(
        &mut self,
        notify: &mut dyn FnMut(usize),
    ) -> Result<(usize, bool), VsockError> {
        let closed = self.muxer.reset_all();
        self.reset_pending = true;
        self.process_event(notify)?;
        Ok((closed, !self.reset_pending))
    }

    /// Posts a pending transport reset in the driver's first event buffer
    /// (one device-writable descriptor of at least 4 bytes).
    fn process_event(&mut self, notify: &mut dyn FnMut(usize)) -> Result<(), VsockError> {
        let (Some(queue), true) = (self.event.as_mut(), self.reset_pending) else {
            return Ok(());
        };
        let m = self.mem.mmap();
        let pending = &mut self.reset_pending;
        let done = drain(queue, m, VsockError::Queue, |mut chain| {
            if !*pending {
                return Ok(Served::Later);
            }
            let desc = chain.next().ok_or(VsockError::Chain("an empty chain"))?;
            if !desc.is_write_only() {
                return Err(VsockError::WrongDirection);
            }
            if desc.len() < EVENT_LEN {
                return Err(VsockError::ShortEvent(desc.len()));
            }
            m.write_obj(EVENT_TRANSPORT_RESET.to_le(), desc.addr())
                .map_err(|_| VsockError::OutsideRam(desc.addr().0))?;
            *pending = false;
            Ok(Served::Used(EVENT_LEN))
        })?;
        if wants_interrupt(queue, m, done.used) {
            notify(EVENT);
        }
        Ok(())
    }

    /// Takes guest packets until tx is empty or the control backlog is
    /// full (resumed once rx takes control packets: a kick on rx or tx);
    /// true if any was taken.
    fn process_tx(&mut self, used: &mut usize) -> Result<bool, VsockError> {
        let m = self.mem.mmap();
        let (muxer, payload) = (&mut self.muxer, &mut self.payload);
        let done = drain(&mut self.tx, m, VsockError::Queue, |chain| {
            if muxer.backlog_full() {
                return Ok(Served::Later);
            }
            let hdr = packet::read_tx(chain, m, payload)?;
            muxer.send_pkt(&hdr, payload);
            Ok(Served::Used(0))
        })?;
        *used += done.used;
        Ok(done.used > 0)
    }

    /// Fills guest rx buffers while there is something to send; true if any
    /// was filled.
    fn process_rx(&mut self, used: &mut usize) -> Result<bool, VsockError> {
        let m = self.mem.mmap();
        let (muxer, scratch) = (&mut self.muxer, &mut self.scratch);
        let mut gave = false;
        while muxer.has_rx() {
            let done = drain(&mut self.rx, m, VsockError::Queue, |chain| {
                if !muxer.has_rx() {
                    return Ok(Served::Later);
                }
                let buf = RxBuffer::new(chain)?;
                let room = buf.payload_room();
                let Some((hdr, n)) = muxer.recv_pkt(scratch, room) else {
                    // Nothing after all (a socket had no bytes): keep the
                    // buffer; a reset that came of it is tried again.
                    return Ok(Served::Later);
                };
                Ok(Served::Used(buf.write(m, &hdr, &scratch[..n])?))
            })?;
            *used += done.used;
            gave |= done.used > 0;
            if !done.later {
                // Out of buffers: the driver's next rx kick resumes.
                break;
            }
        }
        Ok(gave)
    }
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    path: String,
    listener: UnixListener,
    /// The name the listening socket has now: `path`, or a private name
    /// beside it while another process (a live migration's other end) holds
    /// `path` — see [`VirtioDevice::hand_over`].
    name: PathBuf,
    engine: Arc<Mutex<Option<Engine>>>,
    stats: Arc<Stats>,
    worker: Option<Worker>,
    /// How host requests reach the running device's driver.
    running: Option<Running>,
}

/// A running device's interrupt and its NEEDS_RESET flag.
#[derive(Clone)]
struct Running {
    interrupt: Arc<Interrupt>,
    needs_reset: Arc<AtomicU8>,
}

impl Running {
    /// Stops the device for a broken queue (DEVICE_NEEDS_RESET).
    fn fail(&self) {
        self.needs_reset.store(1, Ordering::Release);
        self.interrupt.config();
    }
}

/// Checks a socket path the way `bind(2)` would see it, with one-line
/// answers for the usual mistakes.
fn check_path(path: &str) -> Result<(), VsockError> {
    if path.is_empty() {
        return Err(VsockError::EmptyPath);
    }
    if path.len() > SUN_PATH_MAX - PORT_SUFFIX_MAX {
        return Err(VsockError::PathTooLong(path.to_string()));
    }
    let p = Path::new(path);
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(VsockError::MissingDirectory(path.to_string()));
    }
    if p.symlink_metadata().is_ok() {
        return Err(VsockError::PathExists(path.to_string()));
    }
    Ok(())
}

impl Vsock {
    /// A device for guest `cid` that listens on `path` now (so a bad path is
    /// an error before the VM runs) and connects to `path_<port>` for the
    /// guest.
    pub fn new(cid: u64, path: &str) -> Result<Vsock, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&cid) {
            return Err(VsockError::BadCid(cid));
        }
        check_path(path)?;
        Self::bound(cid, path, PathBuf::from(path))
    }

    /// A device like [`Vsock::new`] for a live migration's target, while the
    /// source still listens on `path`: its socket is bound under a private
    /// name beside `path` until [`VirtioDevice::take_over`] renames it there.
    pub fn new_unclaimed(cid: u64, path: &str) -> Result<Vsock, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&cid) {
            return Err(VsockError::BadCid(cid));
        }
        if let Err(e) = check_path(path) {
            if !matches!(e, VsockError::PathExists(_)) {
                return Err(e);
            }
        }
        Self::bound(cid, path, aside_name(path))
    }

    fn bound(cid: u64, path: &str, name: PathBuf) -> Result<Vsock, VsockError> {
        let listener = UnixListener::bind(&name).map_err(|source| VsockError::Bind {
            path: name.to_string_lossy().into_owned(),
            source,
        })?;
        Ok(Vsock {
            cid,
            path: path.to_string(),
            listener,
            name,
            engine: Arc::new(Mutex::new(None)),
            stats: Arc::new(Stats::default()),
            worker: None,
            running: None,
        })
    }

    /// The device's state as plain data.
    pub fn state(&self) -> VsockState {
        let connections = match self.engine.lock() {
            Ok(e) => e.as_ref().map(|e| e.muxer.state()).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        VsockState {
            cid: self.cid,
            path: self.path.clone(),
            connections,
        }
    }
}

/// A private name for a socket of `path` while it is not at `path`, unique
/// to this process and this call, that nothing has yet (as far as 4096 tries go): this process's id
/// and a counter in hex, short enough for a Unix socket address (`path` is
/// at most `SUN_PATH_MAX - PORT_SUFFIX_MAX` bytes; this adds at most 10).
fn aside_name(path: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let pid = u64::from(std::process::id()) & 0x3f_ffff;
    let mut name = PathBuf::new();
    // Bounded: with every name taken, the last one's bind or rename fails.
    for _ in 0..=0xfff {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) & 0xfff;
        name = PathBuf::from(format!("{path}.{:x}", pid << 12 | n));
        if name.symlink_metadata().is_err() {
            break;
        }
    }
    name
}

/// Renames `from` to `to` unless `to` exists (`renameat2` with
/// `RENAME_NOREPLACE`: no window in which a check and the rename disagree).
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both are NUL-terminated strings alive for the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.worker = None;
        // Only the name it has: after a hand-over `path` is another process's.
        let _ = std::fs::remove_file(&self.name);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u16 {
        device_type::VSOCK
    }

    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        // Stream sockets only: with no feature bit, that is what is offered.
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    /// Moves the listening socket's name aside, so the other process can
    /// take `path`: host programs connecting to `path` reach it from then
    /// on. Connections already open stay (the guest's, while it is here).
    fn hand_over(&mut self) -> Result<(), VirtioError> {
        if self.name != Path::new(&self.path) {
            return Ok(());
        }
        let aside = aside_name(&self.path);
        rename_noreplace(&self.name, &aside).map_err(|source| VirtioError::Io {
            op: "moving the vsock socket aside",
            source,
        })?;
        self.name = aside;
        Ok(())
    }

    /// Renames the listening socket to `path`: refused while another process's
    /// socket has that name (the source has not handed it over, or the target
    /// has taken it).
    fn take_over(&mut self) -> Result<(), VirtioError> {
        if self.name == Path::new(&self.path) {
            return Ok(());
        }
        let path = PathBuf::from(&self.path);
        rename_noreplace(&self.name, &path).map_err(|e| {
            if e.raw_os_error() == Some(libc::EEXIST) {
                VirtioError::Malformed(format!(
                    "vsock path {} is held by another process",
                    self.path
                ))
            } else {
                VirtioError::Io {
                    op: "renaming the vsock socket to its path",
                    source: e,
                }
            }
        })?;
        self.name = path;
        Ok(())
    }

    fn activate(&mut self, mut a: Activation) -> Result<(), VirtioError> {
        let rx = a.take_queue(RX)?;
        let tx = a.take_queue(TX)?;
        let event = a.take_queue(EVENT).ok();
        let listener = self
            .listener
            .try_clone()
            .map_err(|source| VirtioError::Io {
                op: "duplicating the vsock listener",
                source,
            })?;
        let muxer = Muxer::new(self.cid, self.path.clone(), listener, self.stats.clone()).map_err(
            |source| VirtioError::Io {
                op: "creating the vsock epoll set",
                source,
            },
        )?;
        let epoll_fd = muxer.epoll_fd();
        let engine = Engine::new(a.mem.clone(), rx, tx, event, muxer);
        let shared = self.engine.clone();
        *shared
            .lock()
            .map_err(|_| VirtioError::Malformed("vsock state lock poisoned".into()))? =
            Some(engine);
        let kicks = std::mem::take(&mut a.kicks);
        let running = Running {
            interrupt: Arc::new(a.interrupt),
            needs_reset: a.needs_reset,
        };
        self.running = Some(running.clone());
        let link = a.link.clone();
        self.worker = Some(Worker::spawn(
            "virtio-vsock",
            link,
            kicks,
            vec![(epoll_fd, EventSet::IN)],
            move |wake| {
                let Ok(mut guard) = shared.lock() else {
                    return false;
                };
                let Some(engine) = guard.as_mut() else {
                    return false;
                };
                match engine.handle(wake, &mut |q| running.interrupt.queue(q)) {
                    Ok(()) => true,
                    Err(_) => {
                        *guard = None;
                        running.fail();
                        false
                    }
                }
            },
        )?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.running = None;
        if let Ok(mut e) = self.engine.lock() {
            // Closes every connection's host stream.
            *e = None;
        }
    }

    /// `{"op": "transport_reset"}`: closes every host stream and posts
    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (now, or when the driver next
    /// gives an event buffer). Answers `{"closed": N, "event": "posted" |
    /// "pending" | "none"}` ("none": the driver has not started the device,
    /// there is nothing to reset).
    fn control(&mut self, request: &serde_json::Value) -> Result<serde_json::Value, VirtioError> {
        if request.get("op").and_then(|o| o.as_str()) != Some("transport_reset") {
            return Err(VirtioError::Unsupported(format!(
                "{request}: vsock takes {{\"op\": \"transport_reset\"}}"
            )));
        }
        let mut guard = self
            .engine
            .lock()
            .map_err(|_| VirtioError::Malformed("vsock state lock poisoned".into()))?;
        let (Some(engine), Some(running)) = (guard.as_mut(), self.running.as_ref()) else {
            return Ok(serde_json::json!({"closed": 0, "event": "none"}));
        };
        match engine.transport_reset(&mut |q| running.interrupt.queue(q)) {
            Ok((closed, posted)) => Ok(serde_json::json!({
                "closed": closed,
                "event": if posted { "posted" } else { "pending" },
            })),
            Err(e) => {
                // The driver broke its event queue: the device stops, as
                // the worker stops it for a broken queue.
                *guard = None;
                running.fail();
                Err(e.into())
            }
        }
    }

    fn describe(&self) -> serde_json::Value {
        let s = self.state();
        serde_json::json!({
            "kind": "vsock",
            "cid": s.cid,
            "path": s.path,
            "connections": s.connections,
            "opened": self.stats.connections.load(Ordering::Relaxed),
            "resets": self.stats.resets.load(Ordering::Relaxed),
            "bytesToHost": self.stats.bytes_to_host.load(Ordering::Relaxed),
            "bytesToGuest": self.stats.bytes_to_guest.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests;
