//! The serial console's output side. What the guest transmits on COM1 (and
//! writes with the WRITE hypercall) goes into a [`ConsoleSink`], which keeps the
//! newest [`CONSOLE_CAPACITY`] bytes for the host API in a ring and may also
//! stream them to a host file descriptor (the CLI's stdout).
//!
//! A vCPU thread never waits on that file descriptor: it appends to a bounded
//! ring ([`STREAM_CAPACITY`]) that the stream's own writer thread drains into the
//! fd. When the fd does not drain (a full pipe, `run ... | less`), the ring fills
//! and further bytes are dropped and counted instead of blocking the guest. The
//! writer holds nothing but the stream's own state and a duplicate of the fd, and
//! it only writes after `poll` says the fd takes data, so stopping or closing the
//! VM never waits on it.
//!
//! A console may have a rate limiter ([`ConsoleSink::set_rate_limiter`]): a
//! UART cannot make the guest wait without stalling its vCPU, so output beyond
//! the buckets is dropped and counted (`rateDropped`), never queued.
//!
//! Every byte count is also tallied per vCPU thread ([`take_thread_tally`]), so
//! the exit handler can add them to that vCPU's metrics without a lock.

use std::cell::Cell;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError};
use crate::seccomp::ThreadKind;

use crate::error::{Error, Result};

/// The most console output kept in memory for the host API; older bytes are
/// dropped first.
pub const CONSOLE_CAPACITY: usize = 1 << 20;
/// The most console output waiting for the stream's fd; newer bytes are dropped
/// while it is full.
pub const STREAM_CAPACITY: usize = 1 << 20;
/// How long [`ConsoleSink::drain_stream`] waits for a writer that makes no
/// progress before it drops what is left.
pub const STREAM_STALL: Duration = Duration::from_secs(1);
/// The writer's largest write: at most `PIPE_BUF` bytes, so a write to a pipe
/// that `poll` reported writable does not block.
const WRITE_CHUNK: usize = 4096;
/// How often a writer waiting for its fd checks whether it should quit.
const POLL_INTERVAL_MS: i32 = 50;
/// How long closing a stream waits for its writer to leave before leaving it
/// behind (it exits at its next poll).
const WRITER_JOIN_GRACE: Duration = Duration::from_millis(200);

/// A fixed-capacity ring of bytes (storage allocated on first use).
pub struct ByteRing {
    buf: Box<[u8]>,
    capacity: usize,
    /// Index of the oldest byte.
    head: usize,
    len: usize,
}

impl ByteRing {
    /// An empty ring holding at most `capacity` bytes (at least 1).
    pub fn new(capacity: usize) -> ByteRing {
        ByteRing {
            buf: Box::new([]),
            capacity: capacity.max(1),
            head: 0,
            len: 0,
        }
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the ring holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room left before the ring is full.
    pub fn free(&self) -> usize {
        self.capacity - self.len
    }

    /// Appends `data`, dropping the oldest bytes to make room; returns how many
    /// bytes were dropped (old ones, and the head of `data` itself when it is
    /// longer than the ring).
    pub fn push_overwrite(&mut self, data: &[u8]) -> usize {
        let cap = self.capacity;
        if data.len() >= cap {
            self.storage();
            let dropped = self.len + (data.len() - cap);
            self.buf.copy_from_slice(&data[data.len() - cap..]);
            self.head = 0;
            self.len = cap;
            return dropped;
        }
        let dropped = (self.len + data.len()).saturating_sub(cap);
        self.head = (self.head + dropped) % cap;
        self.len -= dropped;
        self.append(data);
        dropped
    }

    /// Appends as much of `data` as fits; returns how many bytes it took.
    pub fn push_bounded(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.free());
        self.append(&data[..n]);
        n
    }

    /// Moves up to `dst.len()` of the oldest bytes into `dst`; returns how many.
    pub fn pop_into(&mut self, dst: &mut [u8]) -> usize {
        let n = self.len.min(dst.len());
        if n == 0 {
            return 0;
        }
        let first = n.min(self.capacity - self.head);
        dst[..first].copy_from_slice(&self.buf[self.head..self.head + first]);
        dst[first..n].copy_from_slice(&self.buf[..n - first]);
        self.head = (self.head + n) % self.capacity;
        self.len -= n;
        n
    }

    /// Empties the ring; returns how many bytes it held.
    pub fn clear(&mut self) -> usize {
        let n = self.len;
        self.head = 0;
        self.len = 0;
        n
    }

    fn storage(&mut self) {
        if self.buf.is_empty() {
            self.buf = vec![0; self.capacity].into_boxed_slice();
        }
    }

    /// Appends bytes that fit.
    fn append(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.storage();
        let cap = self.capacity;
        let tail = (self.head + self.len) % cap;
        let first = data.len().min(cap - tail);
        self.buf[tail..tail + first].copy_from_slice(&data[..first]);
        self.buf[..data.len() - first].copy_from_slice(&data[first..]);
        self.len += data.len();
    }
}

/// Console byte counts of one push, or summed over many.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsoleTally {
    /// Bytes the guest wrote to the console.
    pub bytes: u64,
    /// Older bytes pushed out of the in-memory capture (beyond its 1 MiB).
    pub capture_dropped: u64,
    /// Bytes not streamed to the host fd because it did not drain.
    pub stream_dropped: u64,
}

impl ConsoleTally {
    fn add(&mut self, other: ConsoleTally) {
        self.bytes += other.bytes;
        self.capture_dropped += other.capture_dropped;
        self.stream_dropped += other.stream_dropped;
    }
}

thread_local! {
    /// What this thread pushed since the last [`take_thread_tally`].
    static THREAD_TALLY: Cell<ConsoleTally> = const {
        Cell::new(ConsoleTally { bytes: 0, capture_dropped: 0, stream_dropped: 0 })
    };
}

/// Takes (and resets) the console counts of the pushes this thread made since
/// the last call: the exit handler adds them to its vCPU's metrics.
pub fn take_thread_tally() -> ConsoleTally {
    THREAD_TALLY.with(|t| t.take())
}

/// The console's cumulative counts, for the host (`dv_vm_console_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsoleStats {
    /// Bytes written, bytes the capture dropped, bytes the stream dropped (also
    /// those left unwritten when the fd stopped draining at the end of a run).
    #[serde(flatten)]
    pub tally: ConsoleTally,
    /// Bytes waiting for the stream's fd.
    pub stream_pending: u64,
    /// Bytes the rate limiter dropped (counted in `bytes`, neither captured nor
    /// streamed).
    pub rate_dropped: u64,
}

struct StreamState {
    ring: ByteRing,
    /// Bytes the writer took out of the ring and has not written yet.
    in_flight: usize,
    /// Bumped when [`ConsoleStream::drain`] gives up: the writer then discards
    /// its in-flight bytes (already counted as dropped).
    epoch: u64,
    written: u64,
    dropped: u64,
    /// The fd failed for good (closed pipe, bad fd): everything is dropped.
    broken: bool,
    closing: bool,
    writer_done: bool,
}

struct StreamShared {
    state: Mutex<StreamState>,
    changed: Condvar,
}

impl StreamShared {
    fn lock(&self) -> MutexGuard<'_, StreamState> {
        // Every critical section leaves the state consistent: a poisoned lock
        // still holds a valid state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Console output on its way to a host fd, through a bounded ring and a writer
/// thread of its own.
pub struct ConsoleStream {
    shared: Arc<StreamShared>,
    writer: Option<JoinHandle<()>>,
}

impl ConsoleStream {
    /// Streams to a duplicate of `fd` (the caller's fd is not kept).
    pub fn new(fd: RawFd) -> Result<ConsoleStream> {
        // SAFETY: F_DUPFD_CLOEXEC only reads `fd`; a bad fd is an error return.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            return Err(Error::arg(format!(
                "cannot stream the console to fd {fd}: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: `dup` is a fresh fd that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        let shared = Arc::new(StreamShared {
            state: Mutex::new(StreamState {
                ring: ByteRing::new(STREAM_CAPACITY),
                in_flight: 0,
                epoch: 0,
                written: 0,
                dropped: 0,
                broken: false,
                closing: false,
                writer_done: false,
            }),
            changed: Condvar::new(),
        });
        let for_writer = shared.clone();
        let writer = crate::seccomp::spawn("dv-console".into(), ThreadKind::Console, move || {
            stream_writer(&for_writer, owned)
        })
        .map_err(|source| Error::Io {
            op: "spawning the console writer thread",
            source,
        })?;
        Ok(ConsoleStream {
            shared,
            writer: Some(writer),
        })
    }

    /// Queues `data` for the fd without waiting; returns how many bytes were
    /// dropped because the ring was full.
    fn push(&self, data: &[u8]) -> u64 {
        let mut state = self.shared.lock();
        let taken = if state.broken {
            0
        } else {
            state.ring.push_bounded(data)
        };
        let dropped = (data.len() - taken) as u64;
        state.dropped += dropped;
        if taken > 0 {
            self.shared.changed.notify_all();
        }
        dropped
    }

    /// Waits until every queued byte is written, for as long as the writer makes
    /// progress; after `stall` without progress, drops what is left. Returns how
    /// many bytes were dropped.
    pub fn drain(&self, stall: Duration) -> u64 {
        let mut state = self.shared.lock();
        let mut last_written = state.written;
        let mut since = Instant::now();
        loop {
            if (state.ring.is_empty() && state.in_flight == 0) || state.writer_done {
                return 0;
            }
            if state.written != last_written {
                last_written = state.written;
                since = Instant::now();
            }
            let waited = since.elapsed();
            if waited >= stall {
                let lost = (state.ring.clear() + state.in_flight) as u64;
                state.in_flight = 0;
                state.epoch += 1;
                state.dropped += lost;
                return lost;
            }
            let wait = (stall - waited).min(Duration::from_millis(POLL_INTERVAL_MS as u64));
            state = self
                .shared
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn dropped(&self) -> u64 {
        self.shared.lock().dropped
    }

    fn pending(&self) -> u64 {
        let state = self.shared.lock();
        (state.ring.len() + state.in_flight) as u64
    }
}

impl Drop for ConsoleStream {
    fn drop(&mut self) {
        let deadline = Instant::now() + WRITER_JOIN_GRACE;
        let mut state = self.shared.lock();
        state.closing = true;
        self.shared.changed.notify_all();
        while !state.writer_done {
            let now = Instant::now();
            if now >= deadline {
                // Left behind: it holds only its own state and fd, and quits at
                // its next poll.
                return;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(state);
        if let Some(writer) = self.writer.take() {
            // The writer catches nothing that could panic; a join error carries
            // nothing to report.
            let _ = writer.join();
        }
    }
}

/// Whether `fd` takes data now, waiting up to `timeout_ms`.
fn poll_writable(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(err)
        };
    }
    if pfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
        return Err(io::Error::from_raw_os_error(libc::EPIPE));
    }
    // POLLHUP: the reader is gone; the write reports EPIPE.
    Ok(n > 0)
}

/// The stream's writer thread: moves bytes from the ring to `fd` until the
/// stream is closed.
fn stream_writer(shared: &StreamShared, fd: OwnedFd) {
    let mut chunk = [0u8; WRITE_CHUNK];
    // Bytes taken from the ring, not written yet: chunk[start..end], taken in
    // `epoch`.
    let (mut start, mut end, mut epoch) = (0usize, 0usize, 0u64);
    loop {
        {
            let mut state = shared.lock();
            if state.epoch != epoch {
                // A drain gave up on these bytes and counted them.
                (start, end) = (0, 0);
            }
            while start == end && state.ring.is_empty() && !state.closing {
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|p| p.into_inner());
            }
            if state.closing {
                state.writer_done = true;
                shared.changed.notify_all();
                return;
            }
        }
        match poll_writable(fd.as_raw_fd(), POLL_INTERVAL_MS) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(_) => {
                fail_stream(shared);
                (start, end) = (0, 0);
                continue;
            }
        }
        if start == end {
            let mut state = shared.lock();
            end = state.ring.pop_into(&mut chunk);
            start = 0;
            state.in_flight = end;
            epoch = state.epoch;
        }
        // SAFETY: chunk[start..end] is initialized and valid for reads; the fd is
        // owned by this thread.
        let n = unsafe {
            libc::write(
                fd.as_raw_fd(),
                chunk[start..end].as_ptr().cast(),
                end - start,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if matches!(
                err.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) {
                continue;
            }
            fail_stream(shared);
            (start, end) = (0, 0);
            continue;
        }
        let n = n as usize;
        start += n;
        let mut state = shared.lock();
        if state.epoch == epoch {
            state.in_flight -= n;
            state.written += n as u64;
        }
        shared.changed.notify_all();
    }
}

/// The fd failed for good: drop what is queued (and what comes later).
fn fail_stream(shared: &StreamShared) {
    let mut state = shared.lock();
    let lost = (state.ring.clear() + state.in_flight) as u64;
    state.in_flight = 0;
    state.dropped += lost;
    state.broken = true;
    shared.changed.notify_all();
}

/// The shared output of the console: the in-memory capture plus an optional
/// stream to a host fd.
pub struct ConsoleOutput {
    captured: ByteRing,
    bytes: u64,
    capture_dropped: u64,
    stream: Option<Arc<ConsoleStream>>,
    limiter: Option<RateLimiter>,
    rate_dropped: u64,
}

impl Default for ConsoleOutput {
    fn default() -> Self {
        ConsoleOutput {
            captured: ByteRing::new(CONSOLE_CAPACITY),
            bytes: 0,
            capture_dropped: 0,
            stream: None,
            limiter: None,
            rate_dropped: 0,
        }
    }
}

impl ConsoleOutput {
    /// Takes (and clears) the captured output.
    pub fn take(&mut self) -> Vec<u8> {
        let mut out = vec![0; self.captured.len()];
        self.captured.pop_into(&mut out);
        out
    }

    /// Moves up to `dst.len()` of the oldest captured bytes into `dst`; returns
    /// how many.
    pub fn take_into(&mut self, dst: &mut [u8]) -> usize {
        self.captured.pop_into(dst)
    }

    /// The cumulative counts.
    pub fn stats(&self) -> ConsoleStats {
        let stream = self.stream.as_deref();
        ConsoleStats {
            tally: ConsoleTally {
                bytes: self.bytes,
                capture_dropped: self.capture_dropped,
                stream_dropped: stream.map_or(0, ConsoleStream::dropped),
            },
            stream_pending: stream.map_or(0, ConsoleStream::pending),
            rate_dropped: self.rate_dropped,
        }
    }

    /// Appends guest output without waiting on anything but the two rings;
    /// output the rate limiter (if any) cannot pay for now is dropped.
    pub fn push(&mut self, data: &[u8]) -> ConsoleTally {
        let len = data.len() as u64;
        if let Some(limiter) = self.limiter.as_mut() {
            if !limiter.consume(len, 1, Instant::now()) {
                self.bytes += len;
                self.rate_dropped += len;
                return ConsoleTally {
                    bytes: len,
                    ..ConsoleTally::default()
                };
            }
        }
        let capture_dropped = self.captured.push_overwrite(data) as u64;
        let stream_dropped = self.stream.as_ref().map_or(0, |s| s.push(data));
        self.bytes += data.len() as u64;
        self.capture_dropped += capture_dropped;
        ConsoleTally {
            bytes: data.len() as u64,
            capture_dropped,
            stream_dropped,
        }
    }
}

/// The `Write` end the UART transmits into (and the WRITE hypercall writes to).
#[derive(Clone, Default)]
pub struct ConsoleSink(pub Arc<Mutex<ConsoleOutput>>);

impl ConsoleSink {
    fn lock(&self) -> MutexGuard<'_, ConsoleOutput> {
        // A push leaves the output consistent before anything that can panic.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cumulative counts.
    pub fn stats(&self) -> ConsoleStats {
        self.lock().stats()
    }

    /// Streams future output to a duplicate of `fd` as well (`None` stops
    /// streaming). The previous stream is closed outside the console's lock, so
    /// vCPUs writing meanwhile never wait for its writer.
    pub fn set_stream_fd(&self, fd: Option<RawFd>) -> Result<()> {
        let stream = fd.map(ConsoleStream::new).transpose()?.map(Arc::new);
        let previous = std::mem::replace(&mut self.lock().stream, stream);
        drop(previous);
        Ok(())
    }

    /// Limits the guest's output to `config`'s buckets (bytes and writes per
    /// refill period) from now on; `None` or an unlimited config removes the
    /// limiter. Output over the limit is dropped and counted.
    pub fn set_rate_limiter(
        &self,
        config: Option<&RateLimiterConfig>,
    ) -> std::result::Result<(), RateLimiterError> {
        let limiter = match config {
            Some(c) if !c.is_unlimited() => Some(RateLimiter::new(c, Instant::now())?),
            Some(c) => {
                c.check()?;
                None
            }
            None => None,
        };
        self.lock().limiter = limiter;
        Ok(())
    }

    /// [`ConsoleSink::set_rate_limiter`] from the limiter's JSON
    /// (`{"bandwidth"?: {"size", "oneTimeBurst"?, "refillTimeMs"}, "ops"?: ...}`);
    /// empty `json` removes the limiter.
    pub fn set_rate_limiter_json(&self, json: &[u8]) -> Result<()> {
        let config = if json.is_empty() {
            None
        } else {
            Some(
                serde_json::from_slice::<RateLimiterConfig>(json)
                    .map_err(|e| Error::arg(format!("bad console rate limiter: {e}")))?,
            )
        };
        self.set_rate_limiter(config.as_ref())
            .map_err(|e| Error::arg(format!("console {e}")))
    }

    /// Waits for the stream (if any) to write what it holds, giving up after
    /// `stall` without progress; returns the bytes dropped then. Does not hold
    /// the console's lock while it waits.
    pub fn drain_stream(&self, stall: Duration) -> u64 {
        let stream = self.lock().stream.clone();
        stream.map_or(0, |s| s.drain(stall))
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let tally = self.lock().push(buf);
        THREAD_TALLY.with(|t| {
            let mut sum = t.get();
            sum.add(tally);
            t.set(sum);
        });
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limiter::BucketConfig;

    #[test]
    fn the_ring_keeps_the_newest_bytes_across_wraps() {
        let mut ring = ByteRing::new(8);
        assert_eq!(ring.push_overwrite(b"abcdef"), 0);
        let mut two = [0u8; 2];
        assert_eq!(ring.pop_into(&mut two), 2);
        assert_eq!(&two, b"ab");
        assert_eq!(ring.push_overwrite(b"ghijk"), 1, "c is pushed out");
        let mut all = [0u8; 16];
        let n = ring.pop_into(&mut all);
        assert_eq!(&all[..n], b"defghijk");
        assert_eq!(
            ring.push_overwrite(b"0123456789"),
            2,
            "longer than the ring"
        );
        let n = ring.pop_into(&mut all);
        assert_eq!(&all[..n], b"23456789");
        assert_eq!(ring.push_bounded(b"xyz"), 3);
        assert_eq!(ring.push_bounded(b"0123456789"), 5);
        assert_eq!(ring.clear(), 8);
        assert!(ring.is_empty());
    }

    #[test]
    fn the_capture_is_bounded_and_counts_what_it_drops() {
        let mut out = ConsoleOutput::default();
        out.push(&vec![b'a'; CONSOLE_CAPACITY]);
        assert_eq!(out.push(b"bc").capture_dropped, 2);
        let stats = out.stats();
        assert_eq!(stats.tally.capture_dropped, 2);
        assert_eq!(stats.tally.bytes, CONSOLE_CAPACITY as u64 + 2);
        let buf = out.take();
        assert_eq!(buf.len(), CONSOLE_CAPACITY);
        assert!(buf.ends_with(b"bc"));
        assert!(buf[..CONSOLE_CAPACITY - 2].iter().all(|&b| b == b'a'));
    }

    #[test]
    fn a_full_capture_takes_single_bytes_in_constant_time() {
        // Serial output arrives a byte per exit: with a full capture, each byte
        // must not move the whole buffer (that was a 1 MiB memmove per byte).
        let mut out = ConsoleOutput::default();
        out.push(&vec![b'.'; CONSOLE_CAPACITY]);
        let began = Instant::now();
        for i in 0..(1u32 << 20) {
            out.push(&[b'a' + (i % 26) as u8]);
            assert!(
                began.elapsed() < Duration::from_secs(5),
                "{i} single-byte pushes took over 5 s"
            );
        }
        let buf = out.take();
        assert_eq!(buf.len(), CONSOLE_CAPACITY);
        assert!(buf
            .iter()
            .enumerate()
            .all(|(i, &b)| b == b'a' + (i % 26) as u8));
        assert_eq!(out.stats().tally.capture_dropped, CONSOLE_CAPACITY as u64);
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is valid for two ints.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are fresh and owned by nothing else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn read_all(fd: &OwnedFd, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        while got.len() < want {
            // SAFETY: `buf` is valid for its length; the fd is open.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            assert!(n > 0, "read: {}", io::Error::last_os_error());
            got.extend_from_slice(&buf[..n as usize]);
        }
        got
    }

    #[test]
    fn a_stream_nobody_reads_never_blocks_the_writer_and_counts_its_drops() {
        let (reader, writer) = pipe();
        let sink = ConsoleSink::default();
        sink.set_stream_fd(Some(writer.as_raw_fd())).unwrap();
        drop(writer); // the stream holds its own duplicate
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let mut vcpu_side = sink.clone();
        std::thread::spawn(move || {
            let line = [b'x'; 1000];
            for _ in 0..4096 {
                vcpu_side.write_all(&line).unwrap();
            }
            done_tx.send(take_thread_tally()).unwrap();
        });
        // 4 MB into a 64 KiB pipe nobody reads and a 1 MiB ring.
        let tally = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("pushing console output blocked on a pipe nobody reads");
        assert_eq!(tally.bytes, 4_096_000);
        assert!(tally.stream_dropped >= 4_096_000 - (STREAM_CAPACITY as u64 + 65536) - 8192);
        let began = Instant::now();
        let abandoned = sink.drain_stream(Duration::from_millis(200));
        assert!(began.elapsed() < Duration::from_secs(3));
        let stats = sink.stats();
        assert!(abandoned > 0);
        assert_eq!(stats.stream_pending, 0);
        assert_eq!(stats.tally.stream_dropped, tally.stream_dropped + abandoned);
        // What reached the pipe plus what was dropped is everything.
        let mut buf = vec![0u8; 1 << 20];
        let mut in_pipe = 0usize;
        // SAFETY: the fd is ours; O_NONBLOCK only affects this test's reads.
        unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        loop {
            // SAFETY: `buf` is valid for its length.
            let n = unsafe { libc::read(reader.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            in_pipe += n as usize;
        }
        assert_eq!(in_pipe as u64 + stats.tally.stream_dropped, 4_096_000);
        let began = Instant::now();
        sink.set_stream_fd(None).unwrap();
        assert!(
            began.elapsed() < Duration::from_secs(1),
            "closing the stream waited"
        );
    }

    #[test]
    fn a_draining_stream_delivers_every_byte_in_order() {
        let (reader, writer) = pipe();
        let sink = ConsoleSink::default();
        sink.set_stream_fd(Some(writer.as_raw_fd())).unwrap();
        drop(writer);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let reading = std::thread::spawn(move || read_all(&reader, 300_000));
        let mut vcpu_side = sink.clone();
        for piece in data.chunks(777) {
            vcpu_side.write_all(piece).unwrap();
        }
        assert_eq!(sink.drain_stream(Duration::from_secs(5)), 0);
        assert_eq!(reading.join().unwrap(), data);
        let stats = sink.stats();
        assert_eq!((stats.tally.stream_dropped, stats.stream_pending), (0, 0));
    }

    #[test]
    fn a_closed_reader_drops_output_without_blocking() {
        let (reader, writer) = pipe();
        let sink = ConsoleSink::default();
        sink.set_stream_fd(Some(writer.as_raw_fd())).unwrap();
        drop(writer);
        drop(reader);
        let mut vcpu_side = sink.clone();
        vcpu_side.write_all(&[b'y'; 10_000]).unwrap();
        assert_eq!(sink.drain_stream(Duration::from_secs(5)), 0);
        let stats = sink.stats();
        assert_eq!(stats.tally.stream_dropped, 10_000);
        vcpu_side.write_all(b"later").unwrap();
        assert_eq!(sink.stats().tally.stream_dropped, 10_005);
    }

    #[test]
    fn a_rate_limited_console_drops_what_the_bucket_cannot_pay_for() {
        let mut sink = ConsoleSink::default();
        let config = RateLimiterConfig {
            bandwidth: Some(BucketConfig {
                size: 100,
                one_time_burst: 0,
                refill_time_ms: 3_600_000,
            }),
            ops: None,
        };
        sink.set_rate_limiter(Some(&config)).unwrap();
        sink.write_all(&[b'a'; 60]).unwrap();
        sink.write_all(&[b'b'; 60]).unwrap(); // 40 tokens left: dropped
        sink.write_all(&[b'c'; 40]).unwrap();
        let stats = sink.stats();
        assert_eq!((stats.tally.bytes, stats.rate_dropped), (160, 60));
        let kept = sink.0.lock().unwrap().take();
        assert_eq!(kept, [[b'a'; 60].as_slice(), &[b'c'; 40]].concat());
        // Removing the limiter lets everything through again.
        sink.set_rate_limiter(None).unwrap();
        sink.write_all(&[b'd'; 500]).unwrap();
        assert_eq!(sink.stats().rate_dropped, 60);
        let bad = RateLimiterConfig {
            bandwidth: Some(BucketConfig::default()),
            ops: None,
        };
        assert!(sink.set_rate_limiter(Some(&bad)).is_err());
    }
}
