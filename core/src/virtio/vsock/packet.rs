//! The virtio-vsock packet: a 44-byte little-endian header (virtio spec
//! 5.10.6) followed by `len` payload bytes, spread over the descriptors of one
//! chain. Every field comes from the guest, so reading a packet checks the
//! chain's shape (direction, termination) and the lengths before any byte of
//! payload is trusted.

use serde::{Deserialize, Serialize};
use virtio_queue::{Descriptor, DescriptorChain};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::VsockError;

/// The header's size on the wire.
pub const HDR_SIZE: usize = 44;
/// The most payload one packet carries (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: usize = 64 << 10;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// The only socket type served: a byte stream.
pub const TYPE_STREAM: u16 = 1;

/// Operations (virtio spec 5.10.6).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn u64_at(b: &[u8; HDR_SIZE], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn u32_at(b: &[u8; HDR_SIZE], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u16_at(b: &[u8; HDR_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl Header {
    /// Decodes the wire layout.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Header {
        Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            kind: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Encodes the wire layout.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A chain the device may use, as (address, length) pieces of one direction.
type Pieces = Vec<(GuestAddress, usize)>;

/// Walks a whole chain. virtio-queue stops quietly at a loop, a chain longer
/// than the queue or a `next` index outside it; such a chain ends on a
/// descriptor that still says NEXT, which is refused here.
fn walk(chain: DescriptorChain<&GuestMemoryMmap>) -> Result<Vec<Descriptor>, VsockError> {
    let mut descs: Vec<Descriptor> = Vec::new();
    for d in chain {
        descs.push(d);
    }
    match descs.last() {
        None => Err(VsockError::Chain("no readable descriptor at its head")),
        Some(d) if d.has_next() => Err(VsockError::Chain(
            "it loops, outgrows the queue or names a descriptor outside it",
        )),
        Some(_) => Ok(descs),
    }
}

fn pieces(descs: &[Descriptor], writable: bool) -> Result<Pieces, VsockError> {
    descs
        .iter()
        .map(|d| {
            if d.is_write_only() != writable {
                Err(VsockError::WrongDirection)
            } else {
                Ok((GuestAddress(d.addr().0), d.len() as usize))
            }
        })
        .collect()
}

/// Reads `buf.len()` bytes that start `skip` bytes into `pieces`.
fn gather(
    mem: &GuestMemoryMmap,
    pieces: &[(GuestAddress, usize)],
    mut skip: usize,
    buf: &mut [u8],
) -> Result<(), VsockError> {
    let mut done = 0;
    for &(addr, len) in pieces {
        if done == buf.len() {
            break;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = (len - skip).min(buf.len() - done);
        let at = addr
            .0
            .checked_add(skip as u64)
            .ok_or(VsockError::OutsideRam(addr.0))?;
        mem.read_slice(&mut buf[done..done + take], GuestAddress(at))
            .map_err(|_| VsockError::OutsideRam(at))?;
        done += take;
        skip = 0;
    }
    if done < buf.len() {
        return Err(VsockError::Truncated {
            needed: buf.len(),
            available: done,
        });
    }
    Ok(())
}

/// Writes `data` starting `skip` bytes into `pieces` (which hold it all).
fn scatter(
    mem: &GuestMemoryMmap,
    pieces: &[(GuestAddress, usize)],
    mut skip: usize,
    data: &[u8],
) -> Result<(), VsockError> {
    let mut done = 0;
    for &(addr, len) in pieces {
        if done == data.len() {
            break;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = (len - skip).min(data.len() - done);
        let at = addr
            .0
            .checked_add(skip as u64)
            .ok_or(VsockError::OutsideRam(addr.0))?;
        mem.write_slice(&data[done..done + take], GuestAddress(at))
            .map_err(|_| VsockError::OutsideRam(at))?;
        done += take;
        skip = 0;
    }
    Ok(())
}

/// Reads a guest packet (tx queue): device-readable descriptors only, a whole
/// header, and at most [`MAX_PAYLOAD`] payload bytes, all present. The payload
/// replaces `payload`'s contents.
pub fn read_tx(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    payload: &mut Vec<u8>,
) -> Result<Header, VsockError> {
    let descs = walk(chain)?;
    let pieces = pieces(&descs, false)?;
    let total: usize = pieces.iter().map(|p| p.1).sum();
    if total < HDR_SIZE {
        return Err(VsockError::ShortBuffer(total));
    }
    let mut raw = [0u8; HDR_SIZE];
    gather(mem, &pieces, 0, &mut raw)?;
    let hdr = Header::from_bytes(&raw);
    let len = hdr.len as usize;
    if len > MAX_PAYLOAD {
        return Err(VsockError::Oversized(hdr.len));
    }
    payload.clear();
    payload.resize(len, 0);
    gather(mem, &pieces, HDR_SIZE, payload)?;
    Ok(hdr)
}

/// A guest's receive buffer (rx queue): device-writable descriptors only, room
/// for at least a header.
pub struct RxBuffer {
    pieces: Pieces,
    capacity: usize,
}

impl RxBuffer {
    /// Checks a chain the guest offered for receiving.
    pub fn new(chain: DescriptorChain<&GuestMemoryMmap>) -> Result<RxBuffer, VsockError> {
        let descs = walk(chain)?;
        let pieces = pieces(&descs, true)?;
        let capacity: usize = pieces.iter().map(|p| p.1).sum();
        if capacity < HDR_SIZE {
            return Err(VsockError::ShortBuffer(capacity));
        }
        Ok(RxBuffer { pieces, capacity })
    }

    /// How many payload bytes fit after the header (at most [`MAX_PAYLOAD`]).
    pub fn payload_room(&self) -> usize {
        (self.capacity - HDR_SIZE).min(MAX_PAYLOAD)
    }

    /// Writes a packet; returns the bytes written (for the used ring).
    pub fn write(
        &self,
        mem: &GuestMemoryMmap,
        hdr: &Header,
        payload: &[u8],
    ) -> Result<u32, VsockError> {
        let payload = &payload[..payload.len().min(self.payload_room())];
        scatter(mem, &self.pieces, 0, &hdr.to_bytes())?;
        scatter(mem, &self.pieces, HDR_SIZE, payload)?;
        // Both are bounded by HDR_SIZE + MAX_PAYLOAD.
        Ok((HDR_SIZE + payload.len()) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_round_trips_through_the_wire_layout() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 52,
            len: 4096,
            kind: TYPE_STREAM,
            op: op::RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 256 << 10,
            fwd_cnt: 0xdead_beef,
        };
        let b = h.to_bytes();
        assert_eq!(&b[20..24], &52u32.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }
}
