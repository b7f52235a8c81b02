//! The live-migration stream's frames, read and written in the core: a
//! 12-byte header (kind, three zero bytes, payload length u32 LE, CRC-32 of
//! the payload u32 LE) and the payload. The same framing as
//! `src/migration/wire.ts` (which the control handshake's tests still speak);
//! here every frame is checked before any byte of it is used: its kind, its
//! length against [`MAX_FRAME_BYTES`], its checksum, and for `pages` frames
//! every page index against guest RAM.

use std::io::{ErrorKind, Read, Write};

use super::MigrationError;

/// Header bytes before every payload.
pub const FRAME_HEADER_BYTES: usize = 12;

/// The largest payload accepted (a batch of pages or the state).
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// The kinds of frame, by their byte on the wire (`FRAME_KINDS` in `wire.ts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// Source → target, first: JSON hello.
    Hello = 1,
    /// Target → source: the VM is built.
    Ready = 2,
    /// Either way: JSON `{ message }`.
    Abort = 3,
    /// Source → target: `[u64 index][4096 bytes]` records.
    Pages = 4,
    /// Source → target, last: the paused VM's state.
    State = 5,
    /// Target → source: the VM runs on the target.
    Running = 6,
    /// Source → target, after a pre-copy round: answer once every page
    /// before this is in RAM (a target announces it in `ready`).
    Sync = 7,
    /// Target → source: the pages before the `sync` are in RAM.
    Synced = 8,
}

impl FrameKind {
    /// The kind of a header's first byte.
    pub fn of(byte: u8) -> Option<FrameKind> {
        Some(match byte {
            1 => FrameKind::Hello,
            2 => FrameKind::Ready,
            3 => FrameKind::Abort,
            4 => FrameKind::Pages,
            5 => FrameKind::State,
            6 => FrameKind::Running,
            7 => FrameKind::Sync,
            8 => FrameKind::Synced,
            _ => return None,
        })
    }

    /// Its name, as `wire.ts` spells it.
    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Hello => "hello",
            FrameKind::Ready => "ready",
            FrameKind::Abort => "abort",
            FrameKind::Pages => "pages",
            FrameKind::State => "state",
            FrameKind::Running => "running",
            FrameKind::Sync => "sync",
            FrameKind::Synced => "synced",
        }
    }
}

impl std::fmt::Display for FrameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut s = 1;
    while s < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        s += 1;
    }
    t
}

static CRC: [[u32; 256]; 8] = crc_tables();

/// CRC-32 (ISO-HDLC, zlib's) of `bytes`, slicing by 8: `wire.ts`'s `crc32`.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    let mut chunks = bytes.chunks_exact(8);
    for w in &mut chunks {
        let a = u32::from_le_bytes([w[0], w[1], w[2], w[3]]) ^ c;
        let b = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
        c = CRC[7][(a & 0xff) as usize]
            ^ CRC[6][((a >> 8) & 0xff) as usize]
            ^ CRC[5][((a >> 16) & 0xff) as usize]
            ^ CRC[4][(a >> 24) as usize]
            ^ CRC[3][(b & 0xff) as usize]
            ^ CRC[2][((b >> 8) & 0xff) as usize]
            ^ CRC[1][((b >> 16) & 0xff) as usize]
            ^ CRC[0][(b >> 24) as usize];
    }
    for &byte in chunks.remainder() {
        c = CRC[0][((c ^ u32::from(byte)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// A frame's header as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the payload is.
    pub kind: FrameKind,
    /// Its length (at most [`MAX_FRAME_BYTES`]).
    pub len: usize,
    /// Its CRC-32 as the sender computed it.
    pub crc: u32,
}

/// The header of a frame of `kind` over `payload`.
pub fn encode_header(
    kind: FrameKind,
    payload: &[u8],
) -> Result<[u8; FRAME_HEADER_BYTES], MigrationError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&n| n as usize <= MAX_FRAME_BYTES)
        .ok_or(MigrationError::Oversized {
            kind,
            len: payload.len(),
        })?;
    let mut h = [0u8; FRAME_HEADER_BYTES];
    h[0] = kind as u8;
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..12].copy_from_slice(&crc32(payload).to_le_bytes());
    Ok(h)
}

pub(crate) fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
    move |source| match source.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => MigrationError::TimedOut(op),
        _ => MigrationError::Io { op, source },
    }
}

/// Writes one frame.
pub fn write_frame(
    w: &mut dyn Write,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), MigrationError> {
    let header = encode_header(kind, payload)?;
    w.write_all(&header).map_err(io("writing a frame"))?;
    w.write_all(payload).map_err(io("writing a frame"))
}

/// Reads exactly `into.len()` bytes; `Ok(false)` when the stream ended
/// before the first byte and `allow_end`.
fn read_exact(
    r: &mut dyn Read,
    into: &mut [u8],
    what: &'static str,
    allow_end: bool,
) -> Result<bool, MigrationError> {
    let mut at = 0;
    while at < into.len() {
        match r.read(&mut into[at..]) {
            Ok(0) if at == 0 && allow_end => return Ok(false),
            Ok(0) => {
                return Err(MigrationError::Truncated {
                    what,
                    got: at,
                    want: into.len(),
                })
            }
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io("reading the stream")(e)),
        }
    }
    Ok(true)
}

/// Reads and checks the next frame's header: a known kind, zero padding, a
/// length within [`MAX_FRAME_BYTES`]. A stream that ends cleanly before it
/// is [`MigrationError::Closed`].
pub fn read_header(r: &mut dyn Read) -> Result<FrameHeader, MigrationError> {
    let mut h = [0u8; FRAME_HEADER_BYTES];
    if !read_exact(r, &mut h, "frame header", true)? {
        return Err(MigrationError::Closed);
    }
    let kind = FrameKind::of(h[0])
        .filter(|_| h[1..4] == [0, 0, 0])
        .ok_or(MigrationError::UnknownKind(h[0]))?;
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(MigrationError::Oversized { kind, len });
    }
    let crc = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    Ok(FrameHeader { kind, len, crc })
}

/// Reads the payload of `header` into `buf` (resized to it) and checks its
/// checksum.
pub fn read_payload(
    r: &mut dyn Read,
    header: &FrameHeader,
    buf: &mut Vec<u8>,
) -> Result<(), MigrationError> {
    buf.resize(header.len, 0);
    read_exact(r, buf, "frame payload", false)?;
    let got = crc32(buf);
    if got != header.crc {
        return Err(MigrationError::Checksum {
            kind: header.kind,
            want: header.crc,
            got,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_zlibs() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        let long: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        // slicing by 8 agrees with the bytewise loop at every length
        for n in [1usize, 7, 8, 9, 15, 16, 17, 999] {
            let mut c = !0u32;
            for &b in &long[..n] {
                c = CRC[0][((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
            }
            assert_eq!(crc32(&long[..n]), !c, "{n} bytes");
        }
    }

    #[test]
    fn a_frame_reads_back_as_written() {
        let mut stream = Vec::new();
        write_frame(&mut stream, FrameKind::Hello, b"{\"version\":1}").unwrap();
        write_frame(&mut stream, FrameKind::Ready, b"").unwrap();
        assert_eq!(stream.len(), 2 * FRAME_HEADER_BYTES + 13);
        let mut r = &stream[..];
        let h = read_header(&mut r).unwrap();
        assert_eq!((h.kind, h.len), (FrameKind::Hello, 13));
        let mut buf = Vec::new();
        read_payload(&mut r, &h, &mut buf).unwrap();
        assert_eq!(buf, b"{\"version\":1}");
        let h = read_header(&mut r).unwrap();
        assert_eq!((h.kind, h.len, h.crc), (FrameKind::Ready, 0, 0));
        assert!(matches!(read_header(&mut r), Err(MigrationError::Closed)));
    }

    #[test]
    fn a_cut_unknown_oversized_or_corrupt_frame_is_a_typed_error() {
        let mut stream = Vec::new();
        write_frame(&mut stream, FrameKind::State, &[7u8; 100]).unwrap();
        let mut buf = Vec::new();
        // cut inside the header, inside the payload
        assert!(matches!(
            read_header(&mut &stream[..5]),
            Err(MigrationError::Truncated {
                got: 5,
                want: 12,
                ..
            })
        ));
        let h = read_header(&mut &stream[..]).unwrap();
        assert!(matches!(
            read_payload(&mut &stream[12..50], &h, &mut buf),
            Err(MigrationError::Truncated {
                got: 38,
                want: 100,
                ..
            })
        ));
        // one flipped payload byte
        let mut bad = stream.clone();
        bad[60] ^= 0x40;
        assert!(matches!(
            read_payload(&mut &bad[12..], &h, &mut buf),
            Err(MigrationError::Checksum {
                kind: FrameKind::State,
                ..
            })
        ));
        // an unknown kind, non-zero padding
        let mut bad = stream.clone();
        bad[0] = 9;
        assert!(matches!(
            read_header(&mut &bad[..]),
            Err(MigrationError::UnknownKind(9))
        ));
        let mut bad = stream.clone();
        bad[2] = 1;
        assert!(matches!(
            read_header(&mut &bad[..]),
            Err(MigrationError::UnknownKind(5))
        ));
        // a length over the limit is refused before anything is allocated
        let mut bad = stream.clone();
        bad[4..8].copy_from_slice(&(MAX_FRAME_BYTES as u32 + 1).to_le_bytes());
        assert!(matches!(
            read_header(&mut &bad[..]),
            Err(MigrationError::Oversized {
                kind: FrameKind::State,
                ..
            })
        ));
    }
}
