//! Live migration's hot path: guest pages framed, checksummed and written
//! straight to the migration socket on the source, and read, checked and
//! written straight into guest RAM on the target, with no page crossing into
//! TypeScript. TypeScript keeps the policy (when to stop pre-copying) and the
//! control handshake; it hands the core a socket fd made here
//! ([`socket`]) and calls one function per round.
//!
//! The stream is the framing of `src/migration/wire.ts` ([`wire`]); a
//! `pages` frame's payload is the records of [`crate::snapshot::pages::pack_pages`].
//! Everything read is hostile until checked: a frame's kind, length and
//! CRC-32, then every page index of a batch against RAM before any page of
//! it is written.

pub mod socket;
pub mod wire;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use crate::dirty::DirtyBitmap;
use crate::memory::{ram_ranges, GuestRam};
use crate::snapshot::pages::{pack_pages, PACKED_PAGE_BYTES};
use wire::{
    encode_header, read_header, read_payload, FrameKind, FRAME_HEADER_BYTES, MAX_FRAME_BYTES,
};

/// What can go wrong moving a migration stream.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The peer closed the stream between frames.
    #[error("the stream ended before the next frame (the peer closed it)")]
    Closed,
    /// The stream ended inside a frame.
    #[error("the stream ended inside a {what} ({got} of {want} bytes)")]
    Truncated {
        /// The header or the payload.
        what: &'static str,
        /// Bytes read.
        got: usize,
        /// Bytes it needed.
        want: usize,
    },
    /// The header's kind byte or padding is not a frame's.
    #[error("not a migration frame (kind byte {0})")]
    UnknownKind(u8),
    /// A frame's length is over the limit.
    #[error("a {kind} frame of {len} bytes is over the {MAX_FRAME_BYTES}-byte limit")]
    Oversized {
        /// Its kind.
        kind: FrameKind,
        /// Its length.
        len: usize,
    },
    /// A payload does not match its header's CRC-32.
    #[error("a {kind} frame failed its checksum (header {want:08x}, payload {got:08x}): the stream is corrupt")]
    Checksum {
        /// Its kind.
        kind: FrameKind,
        /// The header's CRC-32.
        want: u32,
        /// The payload's.
        got: u32,
    },
    /// A pages frame that is not whole records.
    #[error("a pages frame of {0} bytes is not whole records of {PACKED_PAGE_BYTES} bytes")]
    CutRecord(usize),
    /// A page index outside guest RAM.
    #[error("page index {index} is outside guest RAM ({pages} pages)")]
    PageOutOfRange {
        /// The index the stream gave.
        index: u64,
        /// Pages of RAM.
        pages: u64,
    },
    /// A pages frame where no VM takes pages (before it is built).
    #[error("a pages frame came before the VM was built")]
    NoVm,
    /// A socket read or write timed out.
    #[error("timed out {0}")]
    TimedOut(&'static str),
    /// A socket operation failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS's error.
        source: std::io::Error,
    },
    /// An address the core cannot connect to or listen on.
    #[error("{0}")]
    Address(String),
    /// A file descriptor that is not a socket.
    #[error("fd {0} is not a socket")]
    NotASocket(i32),
    /// Guest RAM refused a read or write.
    #[error("guest RAM: {0}")]
    Guest(String),
}

fn guest(e: crate::error::Error) -> MigrationError {
    MigrationError::Guest(e.to_string())
}

fn nanos_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What a round of pages cost the source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SendStats {
    /// Pages sent.
    pub pages: u64,
    /// Bytes written, headers included.
    pub bytes: u64,
    /// Frames written.
    pub frames: u64,
    /// Nanoseconds reading pages out of RAM and checksumming them.
    pub pack_ns: u64,
    /// Nanoseconds writing them to the socket.
    pub send_ns: u64,
}

/// Sends the pages of `pages` (`skip_zero`: leaving out all-zero ones) as
/// `pages` frames of at most `batch_bytes` of records each.
pub fn send_pages(
    ram: &GuestRam,
    pages: &DirtyBitmap,
    skip_zero: bool,
    batch_bytes: usize,
    w: &mut dyn Write,
) -> Result<SendStats, MigrationError> {
    let records = (batch_bytes / PACKED_PAGE_BYTES).clamp(1, MAX_FRAME_BYTES / PACKED_PAGE_BYTES);
    let mut buf = vec![0u8; FRAME_HEADER_BYTES + records * PACKED_PAGE_BYTES];
    let mut stats = SendStats::default();
    let mut from = 0;
    while from < pages.pages() {
        let t = Instant::now();
        let (n, next) = pack_pages(ram, pages, from, skip_zero, &mut buf[FRAME_HEADER_BYTES..])
            .map_err(guest)?;
        from = next;
        if n == 0 {
            stats.pack_ns += nanos_since(t);
            continue;
        }
        let (header, payload) = buf.split_at_mut(FRAME_HEADER_BYTES);
        header.copy_from_slice(&encode_header(FrameKind::Pages, &payload[..n])?);
        stats.pack_ns += nanos_since(t);
        let t = Instant::now();
        w.write_all(&buf[..FRAME_HEADER_BYTES + n])
            .map_err(wire::io("sending pages"))?;
        stats.send_ns += nanos_since(t);
        stats.pages += (n / PACKED_PAGE_BYTES) as u64;
        stats.bytes += (FRAME_HEADER_BYTES + n) as u64;
        stats.frames += 1;
    }
    Ok(stats)
}

/// Writes one `pages` frame's records into RAM: every index is checked
/// before any page is written, so a hostile batch writes nothing.
pub fn write_batch(ram: &GuestRam, batch: &[u8]) -> Result<u64, MigrationError> {
    if !batch.len().is_multiple_of(PACKED_PAGE_BYTES) {
        return Err(MigrationError::CutRecord(batch.len()));
    }
    let map = DirtyBitmap::new(&ram_ranges(ram.size()));
    let mut addrs = Vec::with_capacity(batch.len() / PACKED_PAGE_BYTES);
    for record in batch.chunks_exact(PACKED_PAGE_BYTES) {
        let mut word = [0u8; 8];
        word.copy_from_slice(&record[..8]);
        let index = u64::from_le_bytes(word);
        let addr = map
            .address_of(index)
            .ok_or(MigrationError::PageOutOfRange {
                index,
                pages: map.pages(),
            })?;
        addrs.push(addr);
    }
    for (record, &addr) in batch.chunks_exact(PACKED_PAGE_BYTES).zip(&addrs) {
        ram.write(addr, &record[8..])
            .map_err(|e| MigrationError::Guest(e.to_string()))?;
    }
    Ok(addrs.len() as u64)
}

/// What [`receive`] read: the first frame that is not pages, and the pages
/// written before it.
#[derive(Debug)]
pub struct Received {
    /// The frame that ended the call.
    pub kind: FrameKind,
    /// Its payload (checksum verified).
    pub payload: Vec<u8>,
    /// Pages written into RAM.
    pub pages: u64,
    /// Bytes read, every header included.
    pub bytes: u64,
    /// Nanoseconds writing pages into RAM (checks included).
    pub write_ns: u64,
    /// Pages frames read.
    pub page_frames: u64,
}

/// Reads frames: each `pages` frame is checked and written into `ram`
/// (`None`: a pages frame is refused), until the first frame of another
/// kind, which is returned whole.
pub fn receive(r: &mut dyn Read, ram: Option<&GuestRam>) -> Result<Received, MigrationError> {
    let mut payload = Vec::new();
    let (mut pages, mut bytes, mut write_ns, mut page_frames) = (0, 0, 0, 0);
    loop {
        let header = read_header(r)?;
        read_payload(r, &header, &mut payload)?;
        bytes += (FRAME_HEADER_BYTES + header.len) as u64;
        if header.kind != FrameKind::Pages {
            return Ok(Received {
                kind: header.kind,
                payload,
                pages,
                bytes,
                write_ns,
                page_frames,
            });
        }
        let ram = ram.ok_or(MigrationError::NoVm)?;
        let t = Instant::now();
        pages += write_batch(ram, &payload)?;
        write_ns += nanos_since(t);
        page_frames += 1;
    }
}

/// The pages a source has taken from the dirty log and not sent yet, per VM
/// handle (handles are never reused).
fn pending() -> std::sync::MutexGuard<'static, HashMap<u32, DirtyBitmap>> {
    static PENDING: OnceLock<Mutex<HashMap<u32, DirtyBitmap>>> = OnceLock::new();
    PENDING
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Adds `taken` to the VM's pending pages; returns how many are pending.
pub fn add_pending(vm: u32, taken: DirtyBitmap) -> Result<u64, MigrationError> {
    let mut all = pending();
    match all.get_mut(&vm) {
        Some(set) => {
            set.union(&taken)
                .map_err(|e| MigrationError::Guest(e.to_string()))?;
            Ok(set.count())
        }
        None => {
            let n = taken.count();
            all.insert(vm, taken);
            Ok(n)
        }
    }
}

/// Takes the VM's pending pages (an empty set over `ram` when there are none).
pub fn take_pending(vm: u32, ram: &GuestRam) -> DirtyBitmap {
    pending()
        .remove(&vm)
        .unwrap_or_else(|| DirtyBitmap::new(&ram_ranges(ram.size())))
}

/// Forgets the VM's pending pages (the migration ended).
pub fn end(vm: u32) {
    pending().remove(&vm);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::PAGE_SIZE;
    use wire::write_frame;

    fn all_pages(ram: &GuestRam) -> DirtyBitmap {
        let mut all = DirtyBitmap::new(&ram_ranges(ram.size()));
        for i in 0..all.pages() {
            all.set(i);
        }
        all
    }

    #[test]
    fn pages_sent_in_frames_arrive_in_ram_and_the_next_frame_is_handed_back() {
        let src = GuestRam::new(1 << 20).unwrap();
        for page in [0u64, 5, 77, 255] {
            src.write(page * PAGE_SIZE, &[page as u8 | 1; 4096])
                .unwrap();
        }
        let mut stream = Vec::new();
        // Two records per frame: four pages make two frames.
        let stats = send_pages(
            &src,
            &all_pages(&src),
            true,
            2 * PACKED_PAGE_BYTES,
            &mut stream,
        )
        .unwrap();
        assert_eq!((stats.pages, stats.frames), (4, 2));
        assert_eq!(stats.bytes, stream.len() as u64);
        write_frame(&mut stream, FrameKind::State, b"state").unwrap();
        let dst = GuestRam::new(1 << 20).unwrap();
        let got = receive(&mut &stream[..], Some(&dst)).unwrap();
        assert_eq!(
            (got.kind, &got.payload[..], got.pages),
            (FrameKind::State, &b"state"[..], 4)
        );
        let mut a = vec![0u8; 1 << 20];
        let mut b = vec![0u8; 1 << 20];
        src.read(0, &mut a).unwrap();
        dst.read(0, &mut b).unwrap();
        assert!(a == b);
    }

    fn one_page_frame(index: u64) -> Vec<u8> {
        let mut record = vec![0xabu8; PACKED_PAGE_BYTES];
        record[..8].copy_from_slice(&index.to_le_bytes());
        let mut stream = Vec::new();
        write_frame(&mut stream, FrameKind::Pages, &record).unwrap();
        stream
    }

    fn untouched(ram: &GuestRam) -> bool {
        let mut all = vec![0u8; ram.size() as usize];
        ram.read(0, &mut all).unwrap();
        all.iter().all(|&b| b == 0)
    }

    #[test]
    fn a_hostile_stream_is_a_typed_error_and_writes_nothing() {
        let ram = GuestRam::new(1 << 20).unwrap();
        // A page index past RAM, and one far past it.
        for index in [256u64, u64::MAX] {
            assert!(matches!(
                receive(&mut &one_page_frame(index)[..], Some(&ram)),
                Err(MigrationError::PageOutOfRange { pages: 256, .. })
            ));
        }
        // A batch with a good record then a bad one writes neither.
        let mut batch = vec![1u8; 2 * PACKED_PAGE_BYTES];
        batch[..8].copy_from_slice(&3u64.to_le_bytes());
        batch[PACKED_PAGE_BYTES..PACKED_PAGE_BYTES + 8].copy_from_slice(&999u64.to_le_bytes());
        assert!(matches!(
            write_batch(&ram, &batch),
            Err(MigrationError::PageOutOfRange { index: 999, .. })
        ));
        // A cut record, with a valid checksum.
        let mut stream = Vec::new();
        write_frame(
            &mut stream,
            FrameKind::Pages,
            &batch[..PACKED_PAGE_BYTES + 3],
        )
        .unwrap();
        assert!(matches!(
            receive(&mut &stream[..], Some(&ram)),
            Err(MigrationError::CutRecord(n)) if n == PACKED_PAGE_BYTES + 3
        ));
        // A corrupted checksum, a truncated frame, an oversized length.
        let mut bad = one_page_frame(1);
        bad[100] ^= 1;
        assert!(matches!(
            receive(&mut &bad[..], Some(&ram)),
            Err(MigrationError::Checksum {
                kind: FrameKind::Pages,
                ..
            })
        ));
        let good = one_page_frame(1);
        assert!(matches!(
            receive(&mut &good[..good.len() - 1], Some(&ram)),
            Err(MigrationError::Truncated {
                what: "frame payload",
                ..
            })
        ));
        let mut big = good.clone();
        big[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            receive(&mut &big[..], Some(&ram)),
            Err(MigrationError::Oversized { len, .. }) if len == u32::MAX as usize
        ));
        // Pages with no VM to take them.
        assert!(matches!(
            receive(&mut &good[..], None),
            Err(MigrationError::NoVm)
        ));
        assert!(untouched(&ram), "nothing of a refused stream reached RAM");
    }

    #[test]
    fn pending_pages_accumulate_until_taken() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let handle = u32::MAX - 7;
        let mut a = DirtyBitmap::new(&ram_ranges(ram.size()));
        a.set(1);
        a.set(2);
        let mut b = DirtyBitmap::new(&ram_ranges(ram.size()));
        b.set(2);
        b.set(9);
        assert_eq!(add_pending(handle, a).unwrap(), 2);
        assert_eq!(add_pending(handle, b).unwrap(), 3);
        assert_eq!(
            take_pending(handle, &ram).iter().collect::<Vec<_>>(),
            [1, 2, 9]
        );
        assert_eq!(take_pending(handle, &ram).count(), 0);
        end(handle);
    }
}
