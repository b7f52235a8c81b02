//! The host side of virtio-vsock: guest stream connections carried over Unix
//! sockets, in Firecracker's convention.
//!
//! - The guest connects to CID 2 port P: the muxer connects to the Unix socket
//!   `PATH_P` (a host program listens there) and answers RESPONSE, or RST
//!   when nothing listens.
//! - A host program connects to `PATH` and writes `CONNECT P\n`: the muxer
//!   sends the guest a REQUEST from a host port in [2^30, 2^31); when the
//!   guest accepts (RESPONSE) the program reads `OK <hostport>\n` and the
//!   stream is the connection.
//!
//! Flow control is the protocol's credit: the guest may have at most
//! [`CONN_BUF`] bytes in flight to a connection (what the host socket has not
//! taken yet is held here, and never more: a guest that overruns its credit is
//! reset), and the muxer reads a host socket only as far as the guest's own
//! credit allows, straight into a guest buffer, so a slow reader on either side
//! stalls its own connection and nothing else.
//!
//! Every socket is non-blocking and edge-triggered in one epoll set that the
//! device's worker thread watches.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::packet::{op, Header, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// The guest→host bytes a connection may have in flight (its `buf_alloc`):
/// the most the VMM ever holds for one connection.
pub const CONN_BUF: u32 = 256 << 10;
/// When the guest believes less than this is free, a credit update is due
/// (half the buffer: Linux sends 64 KiB packets, so it hears of new room
/// before it runs out)...
const CREDIT_LOW: u32 = CONN_BUF / 2;
/// ...once at least this much has been forwarded since the last one.
const CREDIT_STEP: u32 = 16 << 10;
/// Connections (and host streams still sending their CONNECT line) at once.
pub const MAX_CONNECTIONS: usize = 512;
/// Control packets (RESPONSE, RST, credit...) waiting for a guest rx buffer
/// before the device stops taking guest packets.
pub const CONTROL_LIMIT: usize = 256;
/// The longest `CONNECT <port>\n` line read.
const CONNECT_LINE_MAX: usize = 32;
/// Host ports for host-initiated connections: [2^30, 2^31), round robin.
const LOCAL_PORT_FIRST: u32 = 1 << 30;
/// How long a host stream may take to send its CONNECT line, and the guest
/// to answer the REQUEST that follows (Firecracker's 2 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection: the host-side port and the guest-side port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// A host program asked for it; the guest has a REQUEST, no answer yet.
    LocalInit,
    /// Both ends are connected.
    Established,
}

/// A connection's state as plain data (counters are the protocol's wrapping
/// `u32`s).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionState {
    pub key: ConnKey,
    pub phase: Phase,
    /// A host program connected through `PATH` (else the guest connected).
    pub host_initiated: bool,
    /// Bytes received from the guest.
    pub rx_cnt: u32,
    /// Of those, bytes the host socket took.
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    pub fwd_cnt_sent: u32,
    /// Bytes sent to the guest.
    pub tx_cnt: u32,
    /// The guest's receive buffer and how much of it it has consumed.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// The guest's SHUTDOWN flags so far.
    pub guest_shutdown: u32,
    /// The host program closed its sending side.
    pub host_eof: bool,
}

impl ConnectionState {
    /// How many bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

struct Connection {
    state: ConnectionState,
    stream: UnixStream,
    /// Guest bytes the socket has not taken yet (at most [`CONN_BUF`]).
    pending: VecDeque<u8>,
    /// Edge-triggered readiness not yet used up.
    readable: bool,
    writable: bool,
    /// In the ready queue.
    queued: bool,
    /// A CREDIT_REQUEST went out and no credit information came back yet.
    credit_requested: bool,
    /// The host socket's sending side was shut down after the guest's SEND.
    host_write_shut: bool,
    /// When it was created (a REQUEST unanswered for [`REQUEST_TIMEOUT`]
    /// is given up).
    since: Instant,
}

impl Connection {
    /// A fresh connection on `stream`: a guest-initiated one starts
    /// established, a host-initiated one (`LocalInit`) waits for the guest.
    fn new(key: ConnKey, phase: Phase, stream: UnixStream) -> Connection {
        Connection {
            state: ConnectionState {
                key,
                phase,
                host_initiated: phase == Phase::LocalInit,
                rx_cnt: 0,
                fwd_cnt: 0,
                fwd_cnt_sent: 0,
                tx_cnt: 0,
                peer_buf_alloc: 0,
                peer_fwd_cnt: 0,
                guest_shutdown: 0,
                host_eof: false,
            },
            stream,
            pending: VecDeque::new(),
            readable: false,
            writable: true,
            queued: false,
            credit_requested: false,
            host_write_shut: false,
            since: Instant::now(),
        }
    }

    /// The guest's buffer and what it has consumed, from its packet.
    fn with_peer_credit(mut self, buf_alloc: u32, fwd_cnt: u32) -> Connection {
        self.state.peer_buf_alloc = buf_alloc;
        self.state.peer_fwd_cnt = fwd_cnt;
        self
    }

    /// Whether it has host bytes to read for the guest now.
    fn can_send(&self) -> bool {
        self.state.phase == Phase::Established
            && self.readable
            && !self.state.host_eof
            && self.state.guest_shutdown & SHUTDOWN_RCV == 0
            && self.state.peer_credit() > 0
    }
}

/// What an epoll token (the fd) stands for.
enum Target {
    Listener,
    /// The request timer.
    Timer,
    /// A host stream that has not finished its CONNECT line.
    Waiting,
    Conn(ConnKey),
}

/// Counters for listings.
#[derive(Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub resets: AtomicU64,
    pub bytes_to_host: AtomicU64,
    pub bytes_to_guest: AtomicU64,
}

/// What the guest is told when a packet or a connection goes wrong.
pub enum Verdict {
    Ok,
    Reset,
}

/// The connection multiplexer.
pub struct Muxer {
    cid: u64,
    path: String,
    epoll: Epoll,
    listener: UnixListener,
    conns: HashMap<ConnKey, Connection>,
    fds: HashMap<RawFd, Target>,
    waiting: HashMap<RawFd, (UnixStream, Vec<u8>, Instant)>,
    timer: TimerFd,
    local_ports: HashSet<u32>,
    next_local_port: u32,
    control: VecDeque<Header>,
    ready: VecDeque<ConnKey>,
    stats: Arc<Stats>,
}

fn conn_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

/// Adds `fd` to `epoll` for `events`, with the fd as its token.
fn watch(epoll: &Epoll, fd: RawFd, events: EventSet) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(events, fd as u64),
    )
}

/// `send(2)` without SIGPIPE (the host process may not ignore it).
fn send_nosignal(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the buffer is valid for `data.len()` bytes; send only reads it.
        let n = unsafe {
            libc::send(
                fd,
                data.as_ptr() as *const libc::c_void,
                data.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Connects to a Unix socket without blocking: a listener whose backlog is
/// full is a refusal (EAGAIN), not a wait on the worker thread.
fn connect_nonblocking(path: &str) -> io::Result<UnixStream> {
    let bytes = path.as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the fd is owned right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns; the stream closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un and the length covers it.
    let r = unsafe {
        libc::connect(
            fd,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// Parses `CONNECT <port>` (the word in any case, as Firecracker accepts).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_whitespace();
    let verb = words.next()?;
    if !verb.eq_ignore_ascii_case("connect") {
        return None;
    }
    let port = words.next()?.parse::<u32>().ok()?;
    words.next().is_none().then_some(port)
}

impl Muxer {
    /// A muxer for guest `cid` whose host sockets are `path` and `path_P`;
    /// `listener` is bound to `path`.
    pub fn new(
        cid: u64,
        path: String,
        listener: UnixListener,
        stats: Arc<Stats>,
    ) -> io::Result<Muxer> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        let fd = listener.as_raw_fd();
        watch(&epoll, fd, EventSet::IN)?;
        let mut fds = HashMap::new();
        fds.insert(fd, Target::Listener);
        let timer = TimerFd::new()?;
        let tfd = timer.as_raw_fd();
        watch(&epoll, tfd, EventSet::IN)?;
        fds.insert(tfd, Target::Timer);
        Ok(Muxer {
            cid,
            path,
            epoll,
            listener,
            conns: HashMap::new(),
            fds,
            waiting: HashMap::new(),
            timer,
            local_ports: HashSet::new(),
            next_local_port: LOCAL_PORT_FIRST,
            control: VecDeque::new(),
            ready: VecDeque::new(),
            stats,
        })
    }

    /// The epoll fd the worker watches.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// The connections, as plain data.
    pub fn state(&self) -> Vec<ConnectionState> {
        let mut v: Vec<_> = self.conns.values().map(|c| c.state.clone()).collect();
        v.sort_by_key(|s| (s.key.local_port, s.key.peer_port));
        v
    }

    /// Guest→host bytes held in the VMM, over all connections.
    pub fn buffered(&self) -> usize {
        self.conns.values().map(|c| c.pending.len()).sum()
    }

    /// Control packets waiting for an rx buffer.
    pub fn control_len(&self) -> usize {
        self.control.len()
    }

    /// Whether guest packets must wait until the guest takes control packets.
    pub fn backlog_full(&self) -> bool {
        self.control.len() >= CONTROL_LIMIT
    }

    /// Whether there is something for the guest's rx queue.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.ready.is_empty()
    }

    fn header(&self, key: ConnKey, op: u16, flags: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF,
            fwd_cnt,
        }
    }

    /// Queues a control packet for `key` carrying current credit.
    fn control_for(&mut self, key: ConnKey, op: u16, flags: u32) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        c.state.fwd_cnt_sent = c.state.fwd_cnt;
        let fwd = c.state.fwd_cnt;
        let h = self.header(key, op, flags, fwd);
        self.control.push_back(h);
    }

    fn rst(&mut self, local_port: u32, peer_port: u32) {
        let mut h = self.header(
            ConnKey {
                local_port,
                peer_port,
            },
            op::RST,
            0,
            0,
        );
        h.buf_alloc = 0;
        self.control.push_back(h);
        self.stats.resets.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds a connection (its stream is already in the epoll set).
    fn open(&mut self, c: Connection) {
        self.conns.insert(c.state.key, c);
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops a connection (closing its host stream).
    fn remove(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.fds.remove(&fd);
            if c.state.host_initiated {
                self.local_ports.remove(&key.local_port);
            }
        }
    }

    /// Drops a connection and tells the guest (RST).
    fn kill(&mut self, key: ConnKey) {
        self.remove(key);
        self.rst(key.local_port, key.peer_port);
    }

    fn admit(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.can_send() {
                c.queued = true;
                self.ready.push_back(key);
            }
        }
    }

    /// Sends what the guest wrote on to the host socket; false: the socket
    /// failed.
    fn flush(c: &mut Connection, stats: &Stats) -> bool {
        while !c.pending.is_empty() && c.writable {
            let (front, _) = c.pending.as_slices();
            match send_nosignal(c.stream.as_raw_fd(), front) {
                Ok(0) => return false,
                Ok(n) => {
                    c.pending.drain(..n);
                    c.state.fwd_cnt = c.state.fwd_cnt.wrapping_add(n as u32);
                    stats.bytes_to_host.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.writable = false,
                Err(_) => return false,
            }
        }
        true
    }

    /// After the socket took bytes: shutdowns that were waiting for the
    /// buffer to drain, and a credit update when the guest's view is low.
    fn after_flush(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.pending.is_empty() {
            let shut = c.state.guest_shutdown;
            if shut & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                // The guest closed: its close completes with our RST.
                self.kill(key);
                return;
            }
            if shut & SHUTDOWN_SEND != 0 && !c.host_write_shut {
                c.host_write_shut = true;
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
            }
        }
        let s = &c.state;
        let seen_in_flight = s.rx_cnt.wrapping_sub(s.fwd_cnt_sent);
        let gained = s.fwd_cnt.wrapping_sub(s.fwd_cnt_sent);
        if seen_in_flight.saturating_add(CREDIT_LOW) > CONN_BUF && gained >= CREDIT_STEP {
            self.control_for(key, op::CREDIT_UPDATE, 0);
        }
    }

    /// A packet from the guest (tx queue).
    pub fn send_pkt(&mut self, h: &Header, payload: &[u8]) {
        if h.dst_cid != HOST_CID || h.src_cid != self.cid {
            // Not ours to route (only guest↔host exists here).
            return;
        }
        if h.kind != TYPE_STREAM {
            if h.op != op::RST {
                self.rst(h.dst_port, h.src_port);
            }
            return;
        }
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if !self.conns.contains_key(&key) {
            match h.op {
                op::REQUEST => self.guest_connect(key, h),
                op::RST => {}
                _ => self.rst(key.local_port, key.peer_port),
            }
            return;
        }
        {
            let Some(c) = self.conns.get_mut(&key) else {
                return;
            };
            c.state.peer_buf_alloc = h.buf_alloc;
            c.state.peer_fwd_cnt = h.fwd_cnt;
            c.credit_requested = false;
        }
        match h.op {
            op::RST => self.remove(key),
            op::RESPONSE => self.guest_accepted(key),
            op::RW => self.guest_data(key, payload),
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => self.control_for(key, op::CREDIT_UPDATE, 0),
            op::SHUTDOWN => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.state.guest_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                }
                self.after_flush(key);
            }
            // A second REQUEST on a live connection, or an unknown op.
            _ => self.kill(key),
        }
        self.admit(key);
    }

    fn guest_connect(&mut self, key: ConnKey, h: &Header) {
        if self.conns.len() + self.waiting.len() >= MAX_CONNECTIONS {
            self.rst(key.local_port, key.peer_port);
            return;
        }
        let path = format!("{}_{}", self.path, key.local_port);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(_) => {
                self.rst(key.local_port, key.peer_port);
                return;
            }
        };
        let fd = stream.as_raw_fd();
        if watch(&self.epoll, fd, conn_events()).is_err() {
            self.rst(key.local_port, key.peer_port);
            return;
        }
        self.fds.insert(fd, Target::Conn(key));
        self.open(
            Connection::new(key, Phase::Established, stream)
                .with_peer_credit(h.buf_alloc, h.fwd_cnt),
        );
        self.control_for(key, op::RESPONSE, 0);
    }

    fn guest_accepted(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.state.phase != Phase::LocalInit {
            self.kill(key);
            return;
        }
        c.state.phase = Phase::Established;
        let ok = format!("OK {}\n", key.local_port);
        match send_nosignal(c.stream.as_raw_fd(), ok.as_bytes()) {
            Ok(n) if n == ok.len() => {}
            // A fresh stream that cannot take a dozen bytes is gone.
            _ => self.kill(key),
        }
    }

    fn guest_data(&mut self, key: ConnKey, payload: &[u8]) {
        let stats = self.stats.clone();
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.state.phase != Phase::Established || c.state.guest_shutdown & SHUTDOWN_SEND != 0 {
            self.kill(key);
            return;
        }
        if c.pending.len() + payload.len() > CONN_BUF as usize {
            // More than the credit we gave: the guest broke flow control.
            self.kill(key);
            return;
        }
        c.state.rx_cnt = c.state.rx_cnt.wrapping_add(payload.len() as u32);
        let mut rest = payload;
        if c.pending.is_empty() && c.writable {
            // The usual case: the socket takes it straight from the packet.
            match send_nosignal(c.stream.as_raw_fd(), payload) {
                Ok(n) => {
                    c.state.fwd_cnt = c.state.fwd_cnt.wrapping_add(n as u32);
                    stats.bytes_to_host.fetch_add(n as u64, Ordering::Relaxed);
                    rest = &payload[n..];
                    if !rest.is_empty() {
                        c.writable = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.writable = false,
                Err(_) => {
                    self.kill(key);
                    return;
                }
            }
        }
        c.pending.extend(rest);
        if !Self::flush(c, &stats) {
            self.kill(key);
            return;
        }
        self.after_flush(key);
    }

    /// Fills an rx packet: a control packet, else host bytes from a ready
    /// connection (at most `room` and the guest's credit), read into
    /// `scratch`. Returns the header and the payload length.
    pub fn recv_pkt(&mut self, scratch: &mut [u8], room: usize) -> Option<(Header, usize)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, 0));
        }
        while let Some(key) = self.ready.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.queued = false;
            if !c.can_send() {
                continue;
            }
            let want = room.min(c.state.peer_credit() as usize).min(scratch.len());
            match c.stream.read(&mut scratch[..want]) {
                Ok(0) => {
                    c.state.host_eof = true;
                    c.readable = false;
                    c.state.fwd_cnt_sent = c.state.fwd_cnt;
                    let fwd = c.state.fwd_cnt;
                    return Some((self.header(key, op::SHUTDOWN, SHUTDOWN_SEND, fwd), 0));
                }
                Ok(n) => {
                    c.state.tx_cnt = c.state.tx_cnt.wrapping_add(n as u32);
                    c.state.fwd_cnt_sent = c.state.fwd_cnt;
                    let fwd = c.state.fwd_cnt;
                    self.stats
                        .bytes_to_guest
                        .fetch_add(n as u64, Ordering::Relaxed);
                    let mut h = self.header(key, op::RW, 0, fwd);
                    h.len = n as u32;
                    self.request_credit_if_out(key);
                    self.admit(key);
                    return Some((h, n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.admit(key),
                Err(_) => self.kill(key),
            }
        }
        None
    }

    /// A connection with host bytes and no guest credit asks the guest once.
    fn request_credit_if_out(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let open = c.state.phase == Phase::Established
            && !c.state.host_eof
            && c.state.guest_shutdown & SHUTDOWN_RCV == 0;
        if open && c.readable && c.state.peer_credit() == 0 && !c.credit_requested {
            c.credit_requested = true;
            self.control_for(key, op::CREDIT_REQUEST, 0);
        }
    }

    /// Serves every ready host socket event.
    pub fn handle_events(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for e in &events[..n] {
                self.handle_event(e.data() as RawFd, e.event_set());
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn handle_event(&mut self, fd: RawFd, set: EventSet) {
        match self.fds.get(&fd) {
            Some(Target::Listener) => self.accept_all(),
            Some(Target::Timer) => {
                let _ = self.timer.wait();
                self.expire(Instant::now());
            }
            Some(Target::Waiting) => self.read_connect_line(fd),
            Some(Target::Conn(key)) => {
                let key = *key;
                let stats = self.stats.clone();
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                if set.intersects(
                    EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                ) {
                    c.readable = true;
                }
                if set.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
                    c.writable = true;
                    if !Self::flush(c, &stats) {
                        self.kill(key);
                        return;
                    }
                    self.after_flush(key);
                }
                self.request_credit_if_out(key);
                self.admit(key);
            }
            None => {}
        }
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.conns.len() + self.waiting.len() >= MAX_CONNECTIONS {
                continue; // dropped: closed at once
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if watch(&self.epoll, fd, EventSet::IN).is_err() {
                continue;
            }
            self.fds.insert(fd, Target::Waiting);
            self.waiting
                .insert(fd, (stream, Vec::new(), Instant::now()));
            self.arm_timer(REQUEST_TIMEOUT);
        }
    }

    fn drop_waiting(&mut self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.fds.remove(&fd);
        self.waiting.remove(&fd);
    }

    /// Reads a host stream's CONNECT line a byte at a time, so no byte of the
    /// data after it is taken early.
    fn read_connect_line(&mut self, fd: RawFd) {
        let port = {
            let Some((stream, line, _)) = self.waiting.get_mut(&fd) else {
                return;
            };
            loop {
                let mut b = [0u8; 1];
                match stream.read(&mut b) {
                    Ok(0) => break None,
                    Ok(_) => {
                        line.push(b[0]);
                        if b[0] == b'\n' {
                            break parse_connect(line);
                        }
                        if line.len() >= CONNECT_LINE_MAX {
                            break None;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break None,
                }
            }
        };
        let Some(peer_port) = port else {
            self.drop_waiting(fd);
            return;
        };
        let Some((stream, _, _)) = self.waiting.remove(&fd) else {
            return;
        };
        let local_port = self.allocate_local_port();
        let key = ConnKey {
            local_port,
            peer_port,
        };
        if self.conns.contains_key(&key)
            || self
                .epoll
                .ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(conn_events(), fd as u64),
                )
                .is_err()
        {
            self.local_ports.remove(&local_port);
            self.drop_waiting(fd);
            return;
        }
        self.fds.insert(fd, Target::Conn(key));
        self.open(Connection::new(key, Phase::LocalInit, stream));
        self.control_for(key, op::REQUEST, 0);
        self.arm_timer(REQUEST_TIMEOUT);
    }

    /// Closes every host stream (connections and streams still sending
    /// their CONNECT line) and forgets what was queued for the guest, as a
    /// transport reset wants: the guest drops its side on the event, so
    /// nothing is sent for them. Returns how many streams were closed.
    pub fn reset_all(&mut self) -> usize {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        let waiting: Vec<RawFd> = self.waiting.keys().copied().collect();
        let closed = keys.len() + waiting.len();
        for key in keys {
            self.remove(key);
        }
        for fd in waiting {
            self.drop_waiting(fd);
        }
        self.control.clear();
        self.ready.clear();
        closed
    }

    fn arm_timer(&mut self, after: Duration) {
        if !self.timer.is_armed().unwrap_or(false) {
            let _ = self.timer.reset(after.max(Duration::from_millis(1)), None);
        }
    }

    /// Gives up host streams that never sent their CONNECT line and REQUESTs
    /// the guest never answered; re-arms for the next deadline.
    pub fn expire(&mut self, now: Instant) {
        let late = |since: Instant| now.saturating_duration_since(since) >= REQUEST_TIMEOUT;
        let streams: Vec<RawFd> = self
            .waiting
            .iter()
            .filter(|(_, w)| late(w.2))
            .map(|(fd, _)| *fd)
            .collect();
        for fd in streams {
            self.drop_waiting(fd);
        }
        let requests: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state.phase == Phase::LocalInit && late(c.since))
            .map(|(k, _)| *k)
            .collect();
        for key in requests {
            self.kill(key);
        }
        let next = self
            .waiting
            .values()
            .map(|w| w.2)
            .chain(
                self.conns
                    .values()
                    .filter(|c| c.state.phase == Phase::LocalInit)
                    .map(|c| c.since),
            )
            .min();
        if let Some(oldest) = next {
            self.arm_timer(REQUEST_TIMEOUT.saturating_sub(now.saturating_duration_since(oldest)));
        }
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = if p >= u32::MAX >> 1 {
                LOCAL_PORT_FIRST
            } else {
                p + 1
            };
            if self.local_ports.insert(p) {
                return p;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse_as_firecracker_reads_them() {
        assert_eq!(parse_connect(b"CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect(b"connect 4294967295\n"), Some(u32::MAX));
        assert_eq!(parse_connect(b"Connect  7 \n"), Some(7));
        for bad in [
            &b"CONNECT\n"[..],
            b"CONNECT 4294967296\n",
            b"CONNECT -1\n",
            b"CONNECT 5 6\n",
            b"OPEN 5\n",
            b"\xff\n",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }
}
