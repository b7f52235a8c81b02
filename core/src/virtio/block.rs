//! virtio-blk: a disk backed by a raw image file (virtio spec 5.2).
//!
//! One request queue, served on the device's worker thread one request at a
//! time: the request's data descriptors become an `iovec` array pointing
//! straight into guest RAM (vm-memory's volatile slices, each checked to lie
//! inside it) and one `preadv`/`pwritev` moves the data, so nothing is copied
//! through a host buffer and no I/O happens on a vCPU thread.
//!
//! Requests: IN, OUT, FLUSH (`fdatasync` on the image), GET_ID (the serial),
//! and DISCARD / WRITE_ZEROES when the image's file system supports
//! `fallocate`'s PUNCH_HOLE / ZERO_RANGE (probed when the disk is opened; the
//! features are offered only when the probe works). A read-only disk offers
//! VIRTIO_BLK_F_RO, is opened `O_RDONLY`, and answers every write with
//! VIRTIO_BLK_S_IOERR.
//!
//! Live migration hands the image over between two processes that open the
//! same path: the target builds its disk unclaimed ([`Block::open_unclaimed`]:
//! no lock), the paused source's [`VirtioDevice::hand_over`] makes every write
//! it answered durable (`fdatasync`) and releases its lock, and the target's
//! [`VirtioDevice::take_over`] takes the lock (refused while the source still
//! holds it) before the guest runs there.
//!
//! A disk may have a rate limiter ([`crate::rate_limiter`]): each request
//! costs its data bytes and one operation; one the buckets cannot pay stays
//! in the queue, and the worker sleeps on a timerfd until they can.
//!
//! Every value the driver controls is checked: a chain that loops, points
//! outside guest RAM, puts a readable descriptor after a writable one or has
//! no byte for the status stops the device with DEVICE_NEEDS_RESET (it cannot
//! be answered); a request whose sectors run past the end of the disk, whose
//! length is not a whole number of sectors or exceeds [`MAX_REQUEST_BYTES`],
//! or whose header is short is answered IOERR; an unknown type is UNSUPP.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_bindings::virtio_blk as vb;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::worker::{Wake, Worker};
use super::{
    device_type, drain, drain_queue, wants_interrupt, Activation, Interrupt, Served, VirtioDevice,
    VirtioError,
};
use crate::memory::GuestRam;
use crate::rate_limiter::{nonblocking_timer, RateLimiter, RateLimiterConfig, RateLimiterError};

/// The request queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// A sector (the unit of capacity and of request offsets).
pub const SECTOR: u64 = 512;
/// The largest segment the driver may use (VIRTIO_BLK_F_SIZE_MAX).
pub const SIZE_MAX: u32 = 128 << 10;
/// The most data segments in a request (VIRTIO_BLK_F_SEG_MAX).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The most data bytes one request may move; larger ones are answered IOERR.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// The most descriptors a chain may have (IOV_MAX); more stops the device.
pub const MAX_DESCRIPTORS: usize = 1024;
/// The longest serial (VIRTIO_BLK_ID_BYTES).
pub const SERIAL_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;
/// DISCARD / WRITE_ZEROES limits the config space advertises.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 23;
pub const MAX_DISCARD_SEG: u32 = 32;
/// Discard granularity in sectors (4 KiB).
pub const DISCARD_ALIGNMENT: u32 = 8;
/// Bytes of the config space (`struct virtio_blk_config` up to
/// `write_zeroes_may_unmap` and its padding).
const CONFIG_LEN: usize = 60;

const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

fn bit(b: u32) -> u64 {
    1 << b
}

/// Why a disk cannot be opened or restored (host-side input, checked before
/// the VM starts).
#[derive(Debug, Error)]
pub enum BlockError {
    #[error("disk image {0} does not exist")]
    Missing(PathBuf),
    #[error("disk image {0} is a directory")]
    Directory(PathBuf),
    #[error("disk image {0} is not a regular file or block device")]
    NotAFile(PathBuf),
    #[error("disk image {0} is smaller than one 512-byte sector")]
    Empty(PathBuf),
    #[error("disk image {0} is in use by another process (locked)")]
    Locked(PathBuf),
    #[error("disk image {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("disk serial {0:?} must be at most 20 printable ASCII characters without commas")]
    BadSerial(String),
    #[error("disk: {0}")]
    RateLimiter(#[from] RateLimiterError),
    #[error("disk image {path} has {found} sectors, the saved state says {expected}")]
    CapacityChanged {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
}

/// What the user asks for: `{"kind": "block", "path", "readonly", "serial"}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    pub path: String,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub serial: String,
    /// Limits on the disk's bytes and requests per second.
    #[serde(
        default,
        rename = "rateLimiter",
        skip_serializing_if = "Option::is_none"
    )]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Counters (also part of the state).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub get_ids: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests answered IOERR or UNSUPP.
    pub errors: u64,
    /// Times a request waited for the rate limiter.
    #[serde(default)]
    pub throttled: u64,
}

/// The device's state as plain data (snapshots write it out).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub config: BlockConfig,
    pub capacity_sectors: u64,
    pub discard: bool,
    pub write_zeroes: bool,
    pub stats: BlockStats,
}

#[derive(Default)]
struct Stats {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    get_ids: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    throttled: AtomicU64,
}

impl Stats {
    fn snapshot(&self) -> BlockStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlockStats {
            reads: g(&self.reads),
            writes: g(&self.writes),
            flushes: g(&self.flushes),
            discards: g(&self.discards),
            write_zeroes: g(&self.write_zeroes),
            get_ids: g(&self.get_ids),
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            errors: g(&self.errors),
            throttled: g(&self.throttled),
        }
    }

    fn restore(s: &BlockStats) -> Stats {
        let a = AtomicU64::new;
        Stats {
            reads: a(s.reads),
            writes: a(s.writes),
            flushes: a(s.flushes),
            discards: a(s.discards),
            write_zeroes: a(s.write_zeroes),
            get_ids: a(s.get_ids),
            bytes_read: a(s.bytes_read),
            bytes_written: a(s.bytes_written),
            errors: a(s.errors),
            throttled: a(s.throttled),
        }
    }
}

/// The open image.
struct Disk {
    file: File,
    capacity: u64,
    readonly: bool,
    serial: [u8; SERIAL_BYTES],
    discard: bool,
    write_zeroes: bool,
}

/// The block device.
pub struct Block {
    config: BlockConfig,
    disk: Arc<Disk>,
    stats: Arc<Stats>,
    worker: Option<Worker>,
}

/// Whether `serial` is acceptable (and fits the CLI's comma-separated form).
pub fn check_serial(serial: &str) -> Result<[u8; SERIAL_BYTES], BlockError> {
    let ok =
        serial.len() <= SERIAL_BYTES && serial.bytes().all(|b| b.is_ascii_graphic() && b != b',');
    if !ok {
        return Err(BlockError::BadSerial(serial.to_string()));
    }
    let mut id = [0u8; SERIAL_BYTES];
    id[..serial.len()].copy_from_slice(serial.as_bytes());
    Ok(id)
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    loop {
        // SAFETY: fallocate only acts on the file behind the valid descriptor.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

const PUNCH: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// Probes PUNCH_HOLE and ZERO_RANGE on a page past the end of the image
/// (KEEP_SIZE, so its size and contents never change; a zeroed probe page is
/// punched out again).
fn probe(file: &File, size: u64) -> (bool, bool) {
    let at = size.div_ceil(1 << 20).saturating_add(1) << 20;
    let punch = fallocate(file, PUNCH, at, 4096).is_ok();
    let zero = fallocate(file, ZERO, at, 4096).is_ok();
    if zero {
        let _ = fallocate(file, PUNCH, at, 4096);
    }
    (punch, zero)
}

impl Block {
    /// Opens the image `config.path` (a regular file or a block device):
    /// read-write with an exclusive lock, or read-only with a shared one.
    pub fn open(config: BlockConfig) -> Result<Block, BlockError> {
        Self::open_with(config, BlockStats::default(), true)
    }

    /// Opens the image like [`Block::open`] but takes no lock: a live
    /// migration's target, whose source holds the image until it hands it
    /// over; [`VirtioDevice::take_over`] takes the lock then.
    pub fn open_unclaimed(config: BlockConfig) -> Result<Block, BlockError> {
        Self::open_with(config, BlockStats::default(), false)
    }

    fn open_with(config: BlockConfig, stats: BlockStats, claim: bool) -> Result<Block, BlockError> {
        let path = PathBuf::from(&config.path);
        let serial = check_serial(&config.serial)?;
        if let Some(limits) = &config.rate_limiter {
            limits.check()?;
        }
        let io_err = |source: io::Error| BlockError::Io {
            path: path.clone(),
            source,
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BlockError::Missing(path));
            }
            Err(e) => return Err(io_err(e)),
        };
        if meta.is_dir() {
            return Err(BlockError::Directory(path));
        }
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(BlockError::NotAFile(path));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!config.readonly)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err)?;
        if claim {
            lock(&file, config.readonly, &path)?;
        }
        let size = size_of(&file).map_err(io_err)?;
        let capacity = size / SECTOR;
        if capacity == 0 {
            return Err(BlockError::Empty(path));
        }
        let (discard, write_zeroes) = if config.readonly || !meta.is_file() {
            (false, false)
        } else {
            probe(&file, size)
        };
        Ok(Block {
            disk: Arc::new(Disk {
                file,
                capacity,
                readonly: config.readonly,
                serial,
                discard,
                write_zeroes,
            }),
            stats: Arc::new(Stats::restore(&stats)),
            worker: None,
            config,
        })
    }

    /// The disk's capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity
    }

    /// Whether DISCARD and WRITE_ZEROES are offered (the probe worked).
    pub fn offers(&self) -> (bool, bool) {
        (self.disk.discard, self.disk.write_zeroes)
    }

    /// The device's state as plain data.
    pub fn state(&self) -> BlockState {
        BlockState {
            config: self.config.clone(),
            capacity_sectors: self.disk.capacity,
            discard: self.disk.discard,
            write_zeroes: self.disk.write_zeroes,
            stats: self.stats.snapshot(),
        }
    }

    /// Reopens a disk from its state; the image must still have the same
    /// capacity.
    pub fn restore(state: &BlockState) -> Result<Block, BlockError> {
        let b = Self::open_with(state.config.clone(), state.stats.clone(), true)?;
        if b.disk.capacity != state.capacity_sectors {
            return Err(BlockError::CapacityChanged {
                path: PathBuf::from(&state.config.path),
                expected: state.capacity_sectors,
                found: b.disk.capacity,
            });
        }
        Ok(b)
    }

    fn config_image(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&self.disk.capacity.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[44..48].copy_from_slice(&DISCARD_ALIGNMENT.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[56] = u8::from(self.disk.discard);
        c
    }
}

fn lock(file: &File, shared: bool, path: &Path) -> Result<(), BlockError> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // SAFETY: flock only acts on the open file description behind the fd.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(BlockError::Locked(path.to_path_buf()));
    }
    // A file system without locks (9p, some FUSE) is used unlocked.
    Ok(())
}

/// Releases the lock [`lock`] took.
fn unlock(file: &File) -> io::Result<()> {
    // SAFETY: flock only acts on the open file description behind the fd.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn size_of(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

/// A guest buffer: `len` bytes at `addr`, checked to lie inside guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seg {
    addr: u64,
    len: u64,
}

/// A chain split into its device-readable and device-writable parts.
#[derive(Debug, Default)]
struct Request {
    readable: Vec<Seg>,
    writable: Vec<Seg>,
}

/// Why a chain cannot even be answered (the device stops).
#[derive(Debug, Error, PartialEq, Eq)]
enum ChainError {
    #[error("the chain is empty, loops, or names a descriptor outside the queue or table")]
    Truncated,
    #[error("more than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    #[error("a buffer lies outside guest RAM")]
    OutsideRam,
    #[error("a device-readable buffer follows a device-writable one")]
    Order,
    #[error("no device-writable byte for the status")]
    NoStatus,
}

fn collect<M>(chain: DescriptorChain<M>, mem: &GuestRam) -> Result<Request, ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut r = Request::default();
    let mut last_has_next = true;
    let mut count = 0usize;
    for d in chain {
        count += 1;
        if count > MAX_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        last_has_next = d.has_next();
        let seg = Seg {
            addr: d.addr().0,
            len: u64::from(d.len()),
        };
        // An empty buffer carries nothing (and must not become the one
        // whose last byte takes the status).
        if seg.len == 0 {
            continue;
        }
        if !mem.contains(seg.addr, seg.len) {
            return Err(ChainError::OutsideRam);
        }
        if d.is_write_only() {
            r.writable.push(seg);
        } else if !r.writable.is_empty() {
            return Err(ChainError::Order);
        } else {
            r.readable.push(seg);
        }
    }
    // virtio-queue ends a chain silently when it loops (its TTL runs out),
    // names a descriptor past the queue, or an indirect table is bad: then
    // the last descriptor it gave still has NEXT set.
    if last_has_next {
        return Err(ChainError::Truncated);
    }
    if r.writable.is_empty() {
        return Err(ChainError::NoStatus);
    }
    Ok(r)
}

/// Takes `skip` bytes off the front and `trim` off the back of `segs`.
fn window(segs: &[Seg], mut skip: u64, trim: u64) -> Vec<Seg> {
    let total: u64 = segs.iter().map(|s| s.len).sum();
    let mut keep = total.saturating_sub(skip).saturating_sub(trim);
    let mut out = Vec::new();
    for s in segs {
        if keep == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let len = (s.len - skip).min(keep);
        out.push(Seg {
            addr: s.addr + skip,
            len,
        });
        keep -= len;
        skip = 0;
    }
    out
}

fn total(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// Copies the first `out.len()` bytes of `segs` (checked to be in RAM).
fn gather(mem: &GuestRam, segs: &[Seg], out: &mut [u8]) -> bool {
    let mut at = 0usize;
    for s in segs {
        if at == out.len() {
            break;
        }
        let n = (out.len() - at).min(s.len as usize);
        if mem.read(s.addr, &mut out[at..at + n]).is_err() {
            return false;
        }
        at += n;
    }
    at == out.len()
}

/// Moves `segs` (guest RAM) to or from the image at `offset`, straight from
/// guest memory with preadv/pwritev.
fn transfer(
    mem: &GuestMemoryMmap<()>,
    file: &File,
    segs: &[Seg],
    offset: u64,
    write: bool,
) -> io::Result<()> {
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    let mut slices = Vec::with_capacity(segs.len());
    for s in segs.iter().filter(|s| s.len > 0) {
        let len = usize::try_from(s.len).map_err(|_| einval())?;
        slices.push(
            mem.get_slice(GuestAddress(s.addr), len)
                .map_err(|_| einval())?,
        );
    }
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iov: Vec<libc::iovec> = guards
        .iter()
        .zip(&slices)
        .map(|(g, s)| libc::iovec {
            iov_base: g.as_ptr() as *mut libc::c_void,
            iov_len: s.len(),
        })
        .collect();
    let mut offset = offset;
    let mut first = 0usize;
    while first < iov.len() {
        let cnt = (iov.len() - first).min(MAX_DESCRIPTORS) as libc::c_int;
        let off = i64::try_from(offset).map_err(|_| einval())?;
        // SAFETY: every iovec points into guest RAM, inside a volatile slice
        // vm-memory checked and whose mapping (`mem`) outlives the call; the
        // kernel reads or writes at most iov_len bytes at each.
        let n = unsafe {
            let p = iov[first..].as_ptr();
            if write {
                libc::pwritev(file.as_raw_fd(), p, cnt, off)
            } else {
                libc::preadv(file.as_raw_fd(), p, cnt, off)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 && first < iov.len() {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                v.iov_base = (v.iov_base as usize + n) as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
        while first < iov.len() && iov[first].iov_len == 0 {
            first += 1;
        }
    }
    Ok(())
}

/// What serving a request needs.
struct Ctx {
    mem: GuestRam,
    disk: Arc<Disk>,
    stats: Arc<Stats>,
    features: u64,
}

impl Ctx {
    /// The byte range of `sectors` sectors from `sector`, if inside the disk.
    fn range(&self, sector: u64, bytes: u64) -> Option<u64> {
        let start = sector.checked_mul(SECTOR)?;
        let end = start.checked_add(bytes)?;
        (end <= self.disk.capacity * SECTOR).then_some(start)
    }

    /// Serves one request; returns its status and the data bytes written
    /// into guest buffers.
    fn execute(&self, r: &Request) -> (u8, u64) {
        let mut header = [0u8; 16];
        if !gather(&self.mem, &r.readable, &mut header) {
            return (S_IOERR, 0);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        let input = window(&r.readable, 16, 0);
        let output = window(&r.writable, 0, 1);
        let d = &self.disk;
        let s = &self.stats;
        match kind {
            vb::VIRTIO_BLK_T_IN => {
                let len = total(&output);
                let Some(at) = self.range(sector, len) else {
                    return (S_IOERR, 0);
                };
                if !len.is_multiple_of(SECTOR) || len > MAX_REQUEST_BYTES {
                    return (S_IOERR, 0);
                }
                if transfer(self.mem.mmap(), &d.file, &output, at, false).is_err() {
                    return (S_IOERR, 0);
                }
                s.reads.fetch_add(1, Ordering::Relaxed);
                s.bytes_read.fetch_add(len, Ordering::Relaxed);
                (S_OK, len)
            }
            vb::VIRTIO_BLK_T_OUT => {
                let len = total(&input);
                if d.readonly || !len.is_multiple_of(SECTOR) || len > MAX_REQUEST_BYTES {
                    return (S_IOERR, 0);
                }
                let Some(at) = self.range(sector, len) else {
                    return (S_IOERR, 0);
                };
                if transfer(self.mem.mmap(), &d.file, &input, at, true).is_err() {
                    return (S_IOERR, 0);
                }
                s.writes.fetch_add(1, Ordering::Relaxed);
                s.bytes_written.fetch_add(len, Ordering::Relaxed);
                (S_OK, 0)
            }
            vb::VIRTIO_BLK_T_FLUSH => {
                s.flushes.fetch_add(1, Ordering::Relaxed);
                if d.readonly {
                    return (S_OK, 0);
                }
                // SAFETY: fdatasync only acts on the file behind the fd.
                let r = unsafe { libc::fdatasync(d.file.as_raw_fd()) };
                (if r == 0 { S_OK } else { S_IOERR }, 0)
            }
            vb::VIRTIO_BLK_T_GET_ID => {
                let n = total(&output).min(SERIAL_BYTES as u64) as usize;
                let mut at = 0usize;
                for seg in &output {
                    if at == n {
                        break;
                    }
                    let k = (n - at).min(seg.len as usize);
                    if self.mem.write(seg.addr, &d.serial[at..at + k]).is_err() {
                        return (S_IOERR, 0);
                    }
                    at += k;
                }
                s.get_ids.fetch_add(1, Ordering::Relaxed);
                (S_OK, n as u64)
            }
            vb::VIRTIO_BLK_T_DISCARD | vb::VIRTIO_BLK_T_WRITE_ZEROES => {
                let zeroes = kind == vb::VIRTIO_BLK_T_WRITE_ZEROES;
                let (feature, offered) = if zeroes {
                    (vb::VIRTIO_BLK_F_WRITE_ZEROES, d.write_zeroes)
                } else {
                    (vb::VIRTIO_BLK_F_DISCARD, d.discard)
                };
                if !offered || self.features & bit(feature) == 0 {
                    return (S_UNSUPP, 0);
                }
                self.discard(&input, zeroes)
            }
            _ => (S_UNSUPP, 0),
        }
    }

    /// DISCARD or WRITE_ZEROES over the segments in `input`.
    fn discard(&self, input: &[Seg], zeroes: bool) -> (u8, u64) {
        let len = total(input);
        if len == 0 || !len.is_multiple_of(16) || len / 16 > u64::from(MAX_DISCARD_SEG) {
            return (S_IOERR, 0);
        }
        let mut raw = vec![0u8; len as usize];
        if !gather(&self.mem, input, &mut raw) {
            return (S_IOERR, 0);
        }
        // Check every segment before acting on any.
        let mut ops = Vec::with_capacity(raw.len() / 16);
        for seg in raw.chunks_exact(16) {
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
            let count = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
            let unmap = flags & 1 != 0;
            if flags & !1 != 0 || (unmap && !zeroes) {
                return (S_UNSUPP, 0);
            }
            if count > MAX_DISCARD_SECTORS {
                return (S_IOERR, 0);
            }
            let bytes = u64::from(count) * SECTOR;
            let Some(at) = self.range(sector, bytes) else {
                return (S_IOERR, 0);
            };
            ops.push((at, bytes, unmap));
        }
        let d = &self.disk;
        if d.readonly {
            return (S_IOERR, 0);
        }
        for (at, bytes, unmap) in ops {
            if bytes == 0 {
                continue;
            }
            // WRITE_ZEROES with UNMAP may punch a hole (it reads back zero).
            let mode = if !zeroes || (unmap && d.discard) {
                PUNCH
            } else {
                ZERO
            };
            if fallocate(&d.file, mode, at, bytes).is_err() {
                return (S_IOERR, 0);
            }
        }
        let counter = if zeroes {
            &self.stats.write_zeroes
        } else {
            &self.stats.discards
        };
        counter.fetch_add(1, Ordering::Relaxed);
        (S_OK, 0)
    }
}

impl Ctx {
    /// Serves one collected request and writes its status; the length for
    /// the used ring (`None`: the status byte cannot be written).
    fn answer(&self, req: &Request) -> Option<u32> {
        let (status, written) = self.execute(req);
        if status != S_OK {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        // `collect` checked the last writable buffer is non-empty and in RAM.
        let last = req.writable.last()?;
        self.mem.write(last.addr + last.len - 1, &[status]).ok()?;
        Some(u32::try_from(written + 1).unwrap_or(u32::MAX))
    }
}

/// Serves every available request; false when the queue is broken.
fn serve(queue: &mut Queue, ctx: &Ctx, interrupt: &Interrupt) -> bool {
    drain_queue(queue, ctx.mem.mmap(), interrupt, 0, |chain| {
        let req = collect(chain, &ctx.mem).ok()?;
        ctx.answer(&req)
    })
}

/// What a request costs the bandwidth bucket: its data bytes (the buffers
/// less the 16-byte header and the status byte).
fn data_bytes(req: &Request) -> u64 {
    (total(&req.readable) + total(&req.writable)).saturating_sub(17)
}

/// A rate-limited disk's worker state: the limiter and the timer that wakes
/// the worker when the buckets can pay again.
struct Throttle {
    limiter: RateLimiter,
    timer: TimerFd,
}

/// Serves available requests while the limiter lets them through; the first
/// it refuses stays in the ring and the timer is armed for when it can pay.
/// False when the queue is broken.
fn serve_limited(queue: &mut Queue, ctx: &Ctx, interrupt: &Interrupt, t: &mut Throttle) -> bool {
    let mut wait = None;
    let m = ctx.mem.mmap();
    let done = drain(
        queue,
        m,
        |_| (),
        |chain| {
            let req = collect(chain, &ctx.mem).map_err(|_| ())?;
            let (bytes, now) = (data_bytes(&req), Instant::now());
            if !t.limiter.consume(bytes, 1, now) {
                ctx.stats.throttled.fetch_add(1, Ordering::Relaxed);
                wait = Some(t.limiter.wait(bytes, 1, now));
                return Ok(Served::Later);
            }
            ctx.answer(&req).map(Served::Used).ok_or(())
        },
    );
    let Ok(done) = done else {
        return false;
    };
    if wants_interrupt(queue, m, done.used) {
        interrupt.queue(0);
    }
    if let Some(wait) = wait {
        // The queue's notifications stay off: the timer, not the driver's
        // kicks, resumes the device. A timer that cannot be armed would leave
        // the request unserved for ever: the device stops instead.
        return t.timer.reset(wait, None).is_ok();
    }
    true
}

#[cfg(feature = "fuzz")]
impl Block {
    /// Serves every available request of `queue` over `mem` as the worker
    /// does, on the calling thread (the fuzz targets' entry point). False
    /// when the queue is broken.
    #[doc(hidden)]
    pub fn serve_for_fuzz(
        &self,
        mem: &GuestRam,
        queue: &mut Queue,
        features: u64,
        interrupt: &Interrupt,
    ) -> bool {
        let ctx = Ctx {
            mem: mem.clone(),
            disk: self.disk.clone(),
            stats: self.stats.clone(),
            features,
        };
        serve(queue, &ctx, interrupt)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        device_type::BLOCK
    }

    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = bit(vb::VIRTIO_BLK_F_SIZE_MAX)
            | bit(vb::VIRTIO_BLK_F_SEG_MAX)
            | bit(vb::VIRTIO_BLK_F_BLK_SIZE)
            | bit(vb::VIRTIO_BLK_F_FLUSH);
        if self.disk.readonly {
            f |= bit(vb::VIRTIO_BLK_F_RO);
        }
        if self.disk.discard {
            f |= bit(vb::VIRTIO_BLK_F_DISCARD);
        }
        if self.disk.write_zeroes {
            f |= bit(vb::VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_image(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        let ctx = Ctx {
            mem: a.mem.clone(),
            disk: self.disk.clone(),
            stats: self.stats.clone(),
            features: a.features,
        };
        let Some(limits) = self.config.rate_limiter.filter(|l| !l.is_unlimited()) else {
            self.worker = Some(Worker::one_queue(
                "virtio-blk",
                a,
                move |queue, _, interrupt| serve(queue, &ctx, interrupt),
            )?);
            return Ok(());
        };
        let mut throttle = Throttle {
            limiter: RateLimiter::new(&limits, Instant::now())
                .map_err(|e| VirtioError::Malformed(e.to_string()))?,
            timer: nonblocking_timer().map_err(|source| VirtioError::Io {
                op: "creating the rate limiter's timerfd",
                source,
            })?,
        };
        let mut a = a;
        let mut queue = a.take_queue(0)?;
        let kicks = std::mem::take(&mut a.kicks);
        let timer_fd = throttle.timer.as_raw_fd();
        self.worker = Some(Worker::spawn(
            "virtio-blk",
            a.link.clone(),
            kicks,
            vec![(timer_fd, EventSet::IN)],
            move |wake| {
                match wake {
                    Wake::Kick(0) => {}
                    Wake::Fd(0, _) => {
                        // Clear the expiration (EAGAIN when a re-arm did).
                        let _ = throttle.timer.wait();
                    }
                    _ => return true,
                }
                if serve_limited(&mut queue, &ctx, &a.interrupt, &mut throttle) {
                    true
                } else {
                    a.fail();
                    false
                }
            },
        )?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    /// Every write answered so far to stable storage (`fdatasync`: the device
    /// is paused, so none is in flight), then the lock released.
    fn hand_over(&mut self) -> Result<(), VirtioError> {
        if !self.disk.readonly {
            // SAFETY: fdatasync only acts on the file behind the fd.
            if unsafe { libc::fdatasync(self.disk.file.as_raw_fd()) } != 0 {
                return Err(VirtioError::Io {
                    op: "fdatasync of the disk image",
                    source: io::Error::last_os_error(),
                });
            }
        }
        unlock(&self.disk.file).map_err(|source| VirtioError::Io {
            op: "unlocking the disk image",
            source,
        })
    }

    /// The image's lock again (exclusive, or shared when read-only): refused
    /// while another process holds it.
    fn take_over(&mut self) -> Result<(), VirtioError> {
        lock(
            &self.disk.file,
            self.disk.readonly,
            Path::new(&self.config.path),
        )
        .map_err(|e| VirtioError::Malformed(e.to_string()))
    }

    /// `{"op": "state"}`: the device's [`BlockState`].
    fn control(&mut self, request: &serde_json::Value) -> Result<serde_json::Value, VirtioError> {
        match request.get("op").and_then(|o| o.as_str()) {
            Some("state") => serde_json::to_value(self.state())
                .map_err(|e| VirtioError::Malformed(e.to_string())),
            _ => Err(VirtioError::Unsupported(request.to_string())),
        }
    }

    fn describe(&self) -> serde_json::Value {
        let s = self.stats.snapshot();
        serde_json::json!({
            "kind": "block",
            "path": self.config.path,
            "readonly": self.config.readonly,
            "serial": self.config.serial,
            "capacitySectors": self.disk.capacity,
            "discard": self.disk.discard,
            "writeZeroes": self.disk.write_zeroes,
            "reads": s.reads,
            "writes": s.writes,
            "flushes": s.flushes,
            "discards": s.discards,
            "writeZeroesRequests": s.write_zeroes,
            "bytesRead": s.bytes_read,
            "bytesWritten": s.bytes_written,
            "errors": s.errors,
            "throttled": s.throttled,
            "rateLimiter": self.config.rate_limiter,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::XorShift;
    use crate::virtio::test_driver::{Buf, TestDriver, BUFFERS};
    use crate::virtio::{features, status};
    use std::sync::atomic::AtomicUsize;

    /// A scratch image file, removed on drop.
    struct Image(PathBuf);

    impl Image {
        fn new(bytes: &[u8]) -> Image {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "dv-blk-{}-{}.img",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&p, bytes).unwrap();
            Image(p)
        }
        fn path(&self) -> String {
            self.0.to_string_lossy().into_owned()
        }
        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut r = XorShift::new(seed);
        (0..len).map(|_| r.next_u64() as u8).collect()
    }

    fn disk(img: &Image, readonly: bool, serial: &str) -> Block {
        Block::open(BlockConfig {
            path: img.path(),
            readonly,
            serial: serial.into(),
            rate_limiter: None,
        })
        .unwrap()
    }

    fn throttled(d: &mut TestDriver) -> u64 {
        let state = d.dev.control(&serde_json::json!({"op": "state"})).unwrap();
        state["stats"]["throttled"].as_u64().unwrap()
    }

    #[test]
    fn a_rate_limited_disk_serves_every_request_but_no_faster_than_its_buckets() {
        use crate::rate_limiter::BucketConfig;
        let img = Image::new(&pattern(1 << 20, 3));
        let limited = |rate_limiter| {
            Block::open(BlockConfig {
                path: img.path(),
                rate_limiter: Some(rate_limiter),
                ..BlockConfig::default()
            })
            .unwrap()
        };
        // One operation per 200 ms: four flushes take three refills.
        let mut d = TestDriver::new(Box::new(limited(RateLimiterConfig {
            ops: Some(BucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time_ms: 200,
            }),
            bandwidth: None,
        })));
        d.start(0);
        let t = Instant::now();
        for _ in 0..4 {
            assert_eq!(request(&mut d, vb::VIRTIO_BLK_T_FLUSH, 0, 0, false).0, S_OK);
        }
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(590),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(throttled(&mut d), 3, "each of the last three waited once");
        drop(d); // the image's lock

        // 8 KiB per 100 ms: six 4 KiB writes, the last four after two refills.
        let mut d = TestDriver::new(Box::new(limited(RateLimiterConfig {
            bandwidth: Some(BucketConfig {
                size: 8192,
                one_time_burst: 0,
                refill_time_ms: 100,
            }),
            ops: None,
        })));
        d.start(0);
        let t = Instant::now();
        for i in 0..6 {
            assert_eq!(
                request(&mut d, vb::VIRTIO_BLK_T_OUT, i * 8, 4096, false).0,
                S_OK
            );
        }
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(195),
            "{:?}",
            t.elapsed()
        );
        assert!(throttled(&mut d) >= 2);
    }

    const HEADER: u64 = BUFFERS;
    const STATUS: u64 = BUFFERS + 0x100;
    const DATA: u64 = BUFFERS + 0x1_0000;

    /// Posts header + `data` (len bytes at DATA, device-writable when
    /// `write_data`) + status; returns (status, used len).
    fn request(
        d: &mut TestDriver,
        kind: u32,
        sector: u64,
        len: u32,
        write_data: bool,
    ) -> (u8, u32) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        d.mem.write(HEADER, &h).unwrap();
        d.mem.write(STATUS, &[0xff]).unwrap();
        let mut bufs = vec![Buf::readable(HEADER, 16)];
        if len > 0 {
            bufs.push(Buf {
                addr: DATA,
                len,
                write: write_data,
            });
        }
        bufs.push(Buf::writable(STATUS, 1));
        let head = d.post(0, &bufs);
        let (id, used) = d.wait_used(0).expect("the device answered");
        assert_eq!(id, head as u32);
        let mut s = [0u8];
        d.mem.read(STATUS, &mut s).unwrap();
        (s[0], used)
    }

    fn read_config(d: &mut TestDriver, offset: u64, len: usize) -> Vec<u8> {
        // The device-specific config window starts at BAR offset 0x2000.
        (0..len as u64)
            .map(|i| d.read8(0x2000 + offset + i))
            .collect()
    }

    #[test]
    fn reads_and_writes_reach_the_image_and_config_space_describes_it() {
        let content = pattern(1 << 20, 7);
        let img = Image::new(&content);
        let mut d = TestDriver::new(Box::new(disk(&img, false, "")));
        let offered = d.device_features();
        for f in [
            vb::VIRTIO_BLK_F_SIZE_MAX,
            vb::VIRTIO_BLK_F_SEG_MAX,
            vb::VIRTIO_BLK_F_BLK_SIZE,
            vb::VIRTIO_BLK_F_FLUSH,
        ] {
            assert_ne!(offered & bit(f), 0, "feature {f} offered");
        }
        assert_eq!(offered & bit(vb::VIRTIO_BLK_F_RO), 0);
        let s = d.start(0);
        assert_eq!(s & status::DRIVER_OK, status::DRIVER_OK);
        let cap = read_config(&mut d, 0, 8);
        assert_eq!(u64::from_le_bytes(cap.try_into().unwrap()), 2048);
        let blk = read_config(&mut d, 20, 4);
        assert_eq!(u32::from_le_bytes(blk.try_into().unwrap()), 512);
        let seg = read_config(&mut d, 12, 4);
        assert_eq!(u32::from_le_bytes(seg.try_into().unwrap()), SEG_MAX);

        // IN: 8 sectors from sector 3.
        let (st, used) = request(&mut d, vb::VIRTIO_BLK_T_IN, 3, 4096, true);
        assert_eq!((st, used), (S_OK, 4097));
        let mut got = vec![0u8; 4096];
        d.mem.read(DATA, &mut got).unwrap();
        assert_eq!(got, content[3 * 512..3 * 512 + 4096]);

        // OUT: a new pattern at the last 16 sectors.
        let new = pattern(8192, 9);
        d.mem.write(DATA, &new).unwrap();
        let (st, used) = request(&mut d, vb::VIRTIO_BLK_T_OUT, 2048 - 16, 8192, false);
        assert_eq!((st, used), (S_OK, 1));
        let (st, _) = request(&mut d, vb::VIRTIO_BLK_T_FLUSH, 0, 0, false);
        assert_eq!(st, S_OK);
        let file = img.bytes();
        assert_eq!(file.len(), 1 << 20, "the image keeps its size");
        assert_eq!(file[(1 << 20) - 8192..], new[..]);
        assert_eq!(file[..(1 << 20) - 8192], content[..(1 << 20) - 8192]);
    }

    #[test]
    fn requests_past_the_end_or_malformed_are_answered_with_an_error() {
        let img = Image::new(&pattern(64 * 512, 1));
        let mut d = TestDriver::new(Box::new(disk(&img, false, "")));
        d.start(0);
        // One sector past the end, and one that starts beyond it.
        assert_eq!(
            request(&mut d, vb::VIRTIO_BLK_T_IN, 63, 1024, true).0,
            S_IOERR
        );
        assert_eq!(
            request(&mut d, vb::VIRTIO_BLK_T_OUT, 64, 512, false).0,
            S_IOERR
        );
        // A sector number whose byte offset overflows u64.
        assert_eq!(
            request(&mut d, vb::VIRTIO_BLK_T_IN, u64::MAX / 256, 512, true).0,
            S_IOERR
        );
        // Not a whole number of sectors.
        assert_eq!(
            request(&mut d, vb::VIRTIO_BLK_T_IN, 0, 100, true).0,
            S_IOERR
        );
        // Unknown type; DISCARD without the feature negotiated.
        assert_eq!(request(&mut d, 77, 0, 0, false).0, S_UNSUPP);
        assert_eq!(
            request(&mut d, vb::VIRTIO_BLK_T_DISCARD, 0, 16, false).0,
            S_UNSUPP
        );
        // A short header.
        d.mem.write(STATUS, &[0xff]).unwrap();
        let bufs = [Buf::readable(HEADER, 8), Buf::writable(STATUS, 1)];
        d.post(0, &bufs);
        assert_eq!(d.wait_used(0).map(|u| u.1), Some(1));
        let mut s = [0u8];
        d.mem.read(STATUS, &mut s).unwrap();
        assert_eq!(s[0], S_IOERR);
        // Still serving, and nothing was written.
        assert_eq!(request(&mut d, vb::VIRTIO_BLK_T_IN, 0, 512, true).0, S_OK);
        assert_eq!(img.bytes(), pattern(64 * 512, 1));
    }

    #[test]
    fn a_read_only_disk_offers_ro_and_refuses_every_write() {
        let content = pattern(64 * 512, 3);
        let img = Image::new(&content);
        let mut d = TestDriver::new(Box::new(disk(&img, true, "")));
        let offered = d.device_features();
        assert_ne!(offered & bit(vb::VIRTIO_BLK_F_RO), 0);
        assert_eq!(offered & bit(vb::VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(offered & bit(vb::VIRTIO_BLK_F_WRITE_ZEROES), 0);
        d.start(bit(vb::VIRTIO_BLK_F_DISCARD) | bit(vb::VIRTIO_BLK_F_WRITE_ZEROES));
        d.mem.write(DATA, &[0x55; 4096]).unwrap();
        assert_eq!(
            request(&mut d, vb::VIRTIO_BLK_T_OUT, 0, 4096, false).0,
            S_IOERR
        );
        assert_eq!(
            request(&mut d, vb::VIRTIO_BLK_T_DISCARD, 0, 16, false).0,
            S_UNSUPP
        );
        assert_eq!(request(&mut d, vb::VIRTIO_BLK_T_FLUSH, 0, 0, false).0, S_OK);
        assert_eq!(request(&mut d, vb::VIRTIO_BLK_T_IN, 1, 512, true).0, S_OK);
        assert_eq!(img.bytes(), content, "never written");
    }

    #[test]
    fn get_id_returns_the_serial() {
        let img = Image::new(&[0; 4096]);
        let mut d = TestDriver::new(Box::new(disk(&img, false, "disk-0001")));
        d.start(0);
        d.mem.write(DATA, &[0xaa; 32]).unwrap();
        let (st, used) = request(&mut d, vb::VIRTIO_BLK_T_GET_ID, 0, 20, true);
        assert_eq!((st, used), (S_OK, 21));
        let mut id = [0u8; 21];
        d.mem.read(DATA, &mut id).unwrap();
        assert_eq!(&id[..9], b"disk-0001");
        assert_eq!(id[9..20], [0u8; 11], "padded with NULs");
        assert_eq!(id[20], 0xaa, "nothing past 20 bytes");
    }

    #[test]
    fn discard_and_write_zeroes_follow_the_probe() {
        let content = pattern(256 * 1024, 5);
        let img = Image::new(&content);
        let b = disk(&img, false, "");
        let file = File::options().write(true).open(&img.0).unwrap();
        let expected = probe(&file, content.len() as u64);
        assert_eq!(b.offers(), expected);
        let mut d = TestDriver::new(Box::new(b));
        let offered = d.device_features();
        assert_eq!(offered & bit(vb::VIRTIO_BLK_F_DISCARD) != 0, expected.0);
        assert_eq!(
            offered & bit(vb::VIRTIO_BLK_F_WRITE_ZEROES) != 0,
            expected.1
        );
        d.start(offered & !features::VERSION_1);
        assert_eq!(read_config(&mut d, 56, 1)[0], u8::from(expected.0));
        let seg = |sector: u64, count: u32, flags: u32| {
            let mut s = [0u8; 16];
            s[..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&count.to_le_bytes());
            s[12..].copy_from_slice(&flags.to_le_bytes());
            s
        };
        let mut want = content.clone();
        if expected.1 {
            d.mem.write(DATA, &seg(8, 16, 0)).unwrap();
            assert_eq!(
                request(&mut d, vb::VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false).0,
                S_OK
            );
            want[8 * 512..24 * 512].fill(0);
            assert_eq!(img.bytes(), want);
            // Past the end: refused, nothing changes.
            d.mem.write(DATA, &seg(500, 16, 0)).unwrap();
            assert_eq!(
                request(&mut d, vb::VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false).0,
                S_IOERR
            );
        }
        if expected.0 {
            d.mem.write(DATA, &seg(64, 64, 0)).unwrap();
            assert_eq!(
                request(&mut d, vb::VIRTIO_BLK_T_DISCARD, 0, 16, false).0,
                S_OK
            );
            want[64 * 512..128 * 512].fill(0);
            // UNMAP is for WRITE_ZEROES only.
            d.mem.write(DATA, &seg(0, 8, 1)).unwrap();
            assert_eq!(
                request(&mut d, vb::VIRTIO_BLK_T_DISCARD, 0, 16, false).0,
                S_UNSUPP
            );
            assert_eq!(img.bytes(), want, "a punched hole reads back zero");
        }
        assert_eq!(img.bytes().len(), content.len());
    }

    #[test]
    fn chains_that_cannot_be_answered_stop_the_device_with_needs_reset() {
        let img = Image::new(&[0; 4096]);
        let mut d = TestDriver::new(Box::new(disk(&img, false, "")));
        let cases: [&[Buf]; 4] = [
            // Data outside guest RAM.
            &[
                Buf::readable(HEADER, 16),
                Buf::writable((16 << 20) - 256, 512),
                Buf::writable(STATUS, 1),
            ],
            // A readable buffer after a writable one.
            &[
                Buf::readable(HEADER, 16),
                Buf::writable(STATUS, 1),
                Buf::readable(DATA, 512),
            ],
            // No byte for the status.
            &[Buf::readable(HEADER, 16)],
            &[Buf::readable(HEADER, 16), Buf::writable(STATUS, 0)],
        ];
        for bufs in cases {
            d.start(0);
            d.mem.write(HEADER, &[0; 16]).unwrap();
            d.post(0, bufs);
            assert!(d.wait_needs_reset(), "{bufs:?}");
        }
        // A loop of writable buffers: 0 -> 1 -> 2 -> 1.
        d.start(0);
        d.mem.write(HEADER, &[0; 16]).unwrap();
        d.set_desc(0, 0, HEADER, 16, 1, 1);
        d.set_desc(0, 1, DATA, 512, 1 | 2, 2);
        d.set_desc(0, 2, STATUS, 1, 1 | 2, 1);
        d.publish(0, 0);
        assert!(d.wait_needs_reset());
        // A next index past the queue.
        d.start(0);
        d.set_desc(0, 0, HEADER, 16, 1, QUEUE_SIZE + 5);
        d.publish(0, 0);
        assert!(d.wait_needs_reset());
        // After a reset it serves again.
        d.start(0);
        assert_eq!(request(&mut d, vb::VIRTIO_BLK_T_IN, 0, 512, true).0, S_OK);
    }

    #[test]
    fn a_zero_length_last_buffer_does_not_move_the_status_byte() {
        let img = Image::new(&pattern(8 * 512, 4));
        let mut d = TestDriver::new(Box::new(disk(&img, false, "")));
        d.start(0);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&vb::VIRTIO_BLK_T_IN.to_le_bytes());
        d.mem.write(HEADER, &h).unwrap();
        d.mem.write(DATA, &[0xee; 513]).unwrap();
        d.mem.write(STATUS - 1, &[0xee; 2]).unwrap();
        // The status goes in the last byte of the last non-empty writable
        // buffer: 511 data bytes are left, not whole sectors, so IOERR there.
        let bufs = [
            Buf::readable(HEADER, 16),
            Buf::writable(DATA, 512),
            Buf::writable(STATUS, 0),
        ];
        d.post(0, &bufs);
        assert_eq!(d.wait_used(0).map(|u| u.1), Some(1));
        let mut b = [0u8; 2];
        d.mem.read(DATA + 511, &mut b).unwrap();
        assert_eq!(b, [S_IOERR, 0xee]);
        d.mem.read(STATUS - 1, &mut b).unwrap();
        assert_eq!(b, [0xee, 0xee], "nothing written around the empty buffer");
    }

    #[test]
    fn host_side_bad_input_is_refused_before_the_vm_starts() {
        let open = |path: &str, serial: &str| {
            Block::open(BlockConfig {
                path: path.into(),
                readonly: false,
                serial: serial.into(),
                rate_limiter: None,
            })
        };
        let dir = std::env::temp_dir();
        assert!(matches!(
            open("/nonexistent/dv-disk.img", ""),
            Err(BlockError::Missing(_))
        ));
        assert!(matches!(
            open(&dir.to_string_lossy(), ""),
            Err(BlockError::Directory(_))
        ));
        assert!(matches!(
            open("/dev/null", ""),
            Err(BlockError::NotAFile(_))
        ));
        let tiny = Image::new(&[0; 100]);
        assert!(matches!(open(&tiny.path(), ""), Err(BlockError::Empty(_))));
        let img = Image::new(&[0; 4096]);
        for bad in ["123456789012345678901", "a,b", "sp ace", "é"] {
            assert!(
                matches!(open(&img.path(), bad), Err(BlockError::BadSerial(_))),
                "{bad}"
            );
        }
        let first = open(&img.path(), "12345678901234567890").unwrap();
        assert!(matches!(open(&img.path(), ""), Err(BlockError::Locked(_))));
        drop(first);
        assert!(open(&img.path(), "").is_ok());
        let e = open("/nonexistent/dv-disk.img", "").err().unwrap();
        assert!(!e.to_string().contains('\n'), "one line: {e}");
    }

    #[test]
    fn hand_over_flushes_and_unlocks_and_take_over_locks_again() {
        let img = Image::new(&[0; 4096]);
        let config = BlockConfig {
            path: img.path(),
            ..Default::default()
        };
        let mut source = Block::open(config.clone()).unwrap();
        let mut target = Block::open_unclaimed(config.clone()).unwrap();
        assert!(
            target.take_over().is_err(),
            "the source holds the image until it hands it over"
        );
        source.hand_over().unwrap();
        target.take_over().unwrap();
        let e = source.take_over().expect_err("the target holds it now");
        assert!(e.to_string().contains("locked"), "{e}");
        assert!(matches!(
            Block::open(config.clone()),
            Err(BlockError::Locked(_))
        ));
        target.hand_over().unwrap();
        source.take_over().unwrap();
        // Taking what one holds already changes nothing.
        source.take_over().unwrap();
        let mut ro = Block::open_unclaimed(BlockConfig {
            readonly: true,
            ..config
        })
        .unwrap();
        assert!(
            ro.take_over().is_err(),
            "a shared lock waits for the writer"
        );
    }

    #[test]
    fn a_running_disk_is_handed_over_only_once_paused() {
        let img = Image::new(&[0; 4096]);
        let mut d = TestDriver::new(Box::new(disk(&img, false, "")));
        d.start(0);
        assert!(matches!(d.dev.hand_over(), Err(VirtioError::Running)));
        d.dev.pause(std::time::Duration::from_secs(5)).unwrap();
        d.dev.hand_over().unwrap();
        let other = Block::open(BlockConfig {
            path: img.path(),
            ..Default::default()
        })
        .unwrap();
        assert!(d.dev.take_over().is_err(), "the other process holds it");
        drop(other);
        d.dev.take_over().unwrap();
        d.dev.resume();
    }

    #[test]
    fn state_round_trips_through_json() {
        let img = Image::new(&pattern(8 * 512, 2));
        let mut d = TestDriver::new(Box::new(disk(&img, false, "s1")));
        d.start(0);
        assert_eq!(request(&mut d, vb::VIRTIO_BLK_T_IN, 0, 1024, true).0, S_OK);
        drop(d);
        let b = disk(&img, true, "s1");
        let mut state = b.state();
        state.stats.reads = 3;
        let json = serde_json::to_string(&state).unwrap();
        let back: BlockState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let restored = Block::restore(&back).unwrap();
        assert_eq!(restored.state(), state);
        // A resized image no longer matches.
        drop((b, restored));
        std::fs::write(&img.0, [0u8; 4096]).unwrap();
        assert!(Block::restore(&state).is_ok(), "same capacity");
        std::fs::write(&img.0, [0u8; 1024]).unwrap();
        assert!(matches!(
            Block::restore(&state),
            Err(BlockError::CapacityChanged {
                expected: 8,
                found: 2,
                ..
            })
        ));
    }

    /// Random descriptor tables, headers and discard segments: the device
    /// answers each chain or sets NEEDS_RESET, never hangs or crashes, a
    /// read-only image never changes and a writable one never grows.
    #[test]
    fn random_descriptor_tables_are_answered_or_stop_the_device() {
        let cases: usize = std::env::var("DENOVISOR_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000);
        for readonly in [false, true] {
            let content = pattern(64 * 512, 11);
            let img = Image::new(&content);
            let mut d = TestDriver::new(Box::new(disk(&img, readonly, "fz")));
            let all = d.device_features() & !features::VERSION_1;
            let mut rng = XorShift::new(0x5eed_b10c ^ u64::from(readonly));
            d.start(all);
            let (mut answered, mut stopped) = (0, 0);
            for _ in 0..cases / 2 {
                fuzz_case(&mut d, &mut rng);
                match d.wait_used_or_reset(0) {
                    Some(Ok(_)) => answered += 1,
                    Some(Err(())) => {
                        stopped += 1;
                        d.start(all);
                    }
                    None => panic!("the device neither answered nor stopped"),
                }
            }
            assert!(answered > 0 && stopped > 0, "{answered} {stopped}");
            // The random requests reached the device's real paths.
            let desc = crate::pci::root::PciDevice::describe(&d.dev)["device"].clone();
            let n = |k: &str| desc[k].as_u64().unwrap_or(0);
            assert!(n("reads") > 0 && n("errors") > 0, "{desc}");
            assert_eq!(n("writes") > 0, !readonly, "{desc}");
            drop(d);
            let after = img.bytes();
            assert_eq!(after.len(), content.len());
            if readonly {
                assert_eq!(after, content, "a read-only image was written");
            }
        }
    }

    /// Half the cases: a well-formed request (header, data in the right
    /// direction, status) with one field sometimes mutated; the other half:
    /// a random table (`random_table`).
    fn fuzz_case(d: &mut TestDriver, rng: &mut XorShift) {
        if rng.next_u64().is_multiple_of(2) {
            return random_table(d, rng);
        }
        let kinds = [0u32, 1, 4, 8, 11, 13, rng.next_u64() as u32];
        let kind = kinds[(rng.next_u64() % kinds.len() as u64) as usize];
        let sector = match rng.next_u64() % 8 {
            0 => rng.next_u64(),
            _ => rng.next_u64() % 70,
        };
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        d.mem.write(HEADER, &h).unwrap();
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&(rng.next_u64() % 70).to_le_bytes());
        seg[8..12].copy_from_slice(&((rng.next_u64() % 80) as u32).to_le_bytes());
        seg[12..].copy_from_slice(&((rng.next_u64() % 4) as u32 / 3).to_le_bytes());
        d.mem.write(DATA, &seg).unwrap();
        let write = kind == vb::VIRTIO_BLK_T_IN || kind == vb::VIRTIO_BLK_T_GET_ID;
        let mut bufs = vec![Buf::readable(HEADER, 16)];
        for i in 0..rng.next_u64() % 4 {
            let len = match kind {
                vb::VIRTIO_BLK_T_DISCARD | vb::VIRTIO_BLK_T_WRITE_ZEROES => 16,
                vb::VIRTIO_BLK_T_GET_ID => 20,
                _ => 512 * (1 + rng.next_u64() % 8) as u32,
            };
            bufs.push(Buf {
                addr: DATA + i * 0x1_0000,
                len,
                write,
            });
        }
        bufs.push(Buf::writable(STATUS, 1));
        if rng.next_u64().is_multiple_of(4) {
            // One mutation: an address, a length or a direction.
            let i = (rng.next_u64() % bufs.len() as u64) as usize;
            match rng.next_u64() % 3 {
                0 => bufs[i].addr = (16 << 20) - rng.next_u64() % 1024,
                1 => bufs[i].len = rng.next_u64() as u32 % 2048,
                _ => bufs[i].write = !bufs[i].write,
            }
        }
        d.post(0, &bufs);
    }

    /// Writes a random table (some descriptors valid-looking, some not) and
    /// publishes a random head.
    fn random_table(d: &mut TestDriver, rng: &mut XorShift) {
        let ram = 16u64 << 20;
        let area = ram - BUFFERS;
        let addr = |rng: &mut XorShift| match rng.next_u64() % 16 {
            0 => ram - (rng.next_u64() % 64),
            1 => rng.next_u64(),
            _ => BUFFERS + rng.next_u64() % area,
        };
        let len = |rng: &mut XorShift| match rng.next_u64() % 16 {
            0 => rng.next_u64() as u32,
            1 => 0,
            2 => 1,
            3 => 16,
            _ => 512 * (rng.next_u64() % 9) as u32,
        };
        let n = 1 + rng.next_u64() % 6;
        let base = (rng.next_u64() % u64::from(QUEUE_SIZE)) as u16;
        for i in 0..n as u16 {
            let idx = (base + i) % QUEUE_SIZE;
            let mut flags = 0u16;
            if i + 1 < n as u16 || rng.next_u64().is_multiple_of(32) {
                flags |= 1;
            }
            if (i > 0 && rng.next_u64().is_multiple_of(2)) || rng.next_u64().is_multiple_of(8) {
                flags |= 2;
            }
            let mut a = addr(rng);
            let mut l = len(rng);
            if rng.next_u64().is_multiple_of(24) {
                // An indirect table of random descriptors in the buffer area.
                flags = 4 | (flags & 1);
                let entries = 1 + rng.next_u64() % 6;
                a = (BUFFERS + rng.next_u64() % (area - 0x1000)) & !0xf;
                l = (entries * 16) as u32 + u32::from(rng.next_u64().is_multiple_of(16));
                for e in 0..entries {
                    let mut raw = [0u8; 16];
                    raw[..8].copy_from_slice(&addr(rng).to_le_bytes());
                    raw[8..12].copy_from_slice(&len(rng).to_le_bytes());
                    let f = u16::from(e + 1 < entries)
                        | (u16::from(e > 0) * 2)
                        | (u16::from(rng.next_u64().is_multiple_of(64)) * 4);
                    raw[12..14].copy_from_slice(&f.to_le_bytes());
                    raw[14..].copy_from_slice(&((e + 1) as u16).to_le_bytes());
                    let _ = d.mem.write(a + e * 16, &raw);
                }
            }
            let next = if rng.next_u64().is_multiple_of(16) {
                rng.next_u64() as u16
            } else {
                (idx + 1) % QUEUE_SIZE
            };
            d.set_desc(0, idx, a, l, flags, next);
            if i == 0 && a >= BUFFERS && a + 16 <= ram {
                // Usually a plausible header.
                let kinds = [0u32, 1, 4, 8, 11, 13, 2, rng.next_u64() as u32];
                let kind = kinds[(rng.next_u64() % kinds.len() as u64) as usize];
                let sector = match rng.next_u64() % 4 {
                    0 => rng.next_u64(),
                    _ => rng.next_u64() % 70,
                };
                let mut h = [0u8; 16];
                h[..4].copy_from_slice(&kind.to_le_bytes());
                h[8..].copy_from_slice(&sector.to_le_bytes());
                let _ = d.mem.write(a, &h);
                // Discard-style segments right after it.
                let mut seg = [0u8; 16];
                seg[..8].copy_from_slice(&(rng.next_u64() % 70).to_le_bytes());
                seg[8..12].copy_from_slice(&((rng.next_u64() % 80) as u32).to_le_bytes());
                seg[12..].copy_from_slice(&((rng.next_u64() % 4) as u32 / 3).to_le_bytes());
                let _ = d.mem.write(a + 16, &seg);
            }
        }
        d.publish(0, base);
    }
}
