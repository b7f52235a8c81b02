//! Copying a set of guest pages out of and into RAM: what a diff snapshot
//! and a pre-copy migration round move. The pages go as their raw 4 KiB
//! contents, one after another in the bitmap's order (RAM order); the
//! bitmap itself says which they are.

use std::io::{Read, Write};

use crate::dirty::{DirtyBitmap, DirtyError, PAGE_SIZE};
use crate::error::{Error, Result};
use crate::memory::GuestRam;
use crate::vm::VmError;

fn check_size(ram: &GuestRam, pages: &DirtyBitmap) -> Result<()> {
    let want = ram.size() / PAGE_SIZE;
    if pages.pages() != want {
        return Err(VmError::from(DirtyError::Size {
            got: pages.pages(),
            want,
        })
        .into());
    }
    Ok(())
}

/// Writes the contents of every page in `pages` to `out`, in order; returns
/// the number of pages written. `pages` must cover this RAM.
pub fn read_pages(ram: &GuestRam, pages: &DirtyBitmap, out: &mut dyn Write) -> Result<u64> {
    check_size(ram, pages)?;
    let mut page = [0u8; PAGE_SIZE as usize];
    let mut n = 0;
    for addr in pages.addresses() {
        ram.read(addr, &mut page)?;
        out.write_all(&page).map_err(|source| Error::Io {
            op: "writing guest pages",
            source,
        })?;
        n += 1;
    }
    Ok(n)
}

/// Reads the contents of every page in `pages` from `input`, in order, into
/// RAM (what [`read_pages`] wrote); returns the number of pages read. A
/// short input is an error (the pages before it are written).
pub fn write_pages(ram: &GuestRam, pages: &DirtyBitmap, input: &mut dyn Read) -> Result<u64> {
    check_size(ram, pages)?;
    let mut page = [0u8; PAGE_SIZE as usize];
    let mut n = 0;
    for addr in pages.addresses() {
        input.read_exact(&mut page).map_err(|source| Error::Io {
            op: "reading guest pages",
            source,
        })?;
        ram.write(addr, &page)?;
        n += 1;
    }
    Ok(n)
}

/// Bytes of one packed page: its index (`u64`, little-endian) and its 4 KiB.
pub const PACKED_PAGE_BYTES: usize = 8 + PAGE_SIZE as usize;

fn all_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// Packs the pages of `pages` from index `from` on into `out` as records of
/// [`PACKED_PAGE_BYTES`] (`[u64 index][4096 bytes]`, what a migration stream
/// carries), as many as fit; `skip_zero` leaves out pages that are all zero.
/// Returns the bytes written and the index to continue from ([`DirtyBitmap::pages`]
/// once every page is done).
pub fn pack_pages(
    ram: &GuestRam,
    pages: &DirtyBitmap,
    from: u64,
    skip_zero: bool,
    out: &mut [u8],
) -> Result<(usize, u64)> {
    check_size(ram, pages)?;
    let mut at = 0usize;
    for index in pages.iter().skip_while(|&i| i < from) {
        if at + PACKED_PAGE_BYTES > out.len() {
            return Ok((at, index));
        }
        let Some(addr) = pages.address_of(index) else {
            break;
        };
        let page = &mut out[at + 8..at + PACKED_PAGE_BYTES];
        ram.read(addr, page)?;
        if skip_zero && all_zero(page) {
            continue;
        }
        out[at..at + 8].copy_from_slice(&index.to_le_bytes());
        at += PACKED_PAGE_BYTES;
    }
    Ok((at, pages.pages()))
}

/// Writes packed pages (what [`pack_pages`] made, from a peer that may be
/// hostile) into RAM. The input must be whole records and every index a page
/// of this RAM: a bad batch is refused before any page of it is written.
/// Returns the number of pages written.
pub fn unpack_pages(ram: &GuestRam, input: &[u8]) -> Result<u64> {
    if !input.len().is_multiple_of(PACKED_PAGE_BYTES) {
        return Err(Error::arg(format!(
            "a batch of pages is {} bytes, not a multiple of {PACKED_PAGE_BYTES}",
            input.len()
        )));
    }
    let map = DirtyBitmap::new(&crate::memory::ram_ranges(ram.size()));
    let mut addrs = Vec::with_capacity(input.len() / PACKED_PAGE_BYTES);
    for record in input.chunks_exact(PACKED_PAGE_BYTES) {
        let mut word = [0u8; 8];
        word.copy_from_slice(&record[..8]);
        let index = u64::from_le_bytes(word);
        let addr = map.address_of(index).ok_or_else(|| {
            Error::arg(format!(
                "page index {index} is outside guest RAM ({} pages)",
                map.pages()
            ))
        })?;
        addrs.push(addr);
    }
    for (record, addr) in input.chunks_exact(PACKED_PAGE_BYTES).zip(&addrs) {
        ram.write(*addr, &record[8..])?;
    }
    Ok(addrs.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ram_ranges;

    #[test]
    fn packed_pages_carry_their_index_skip_zeros_and_continue_where_the_buffer_filled() {
        let src = GuestRam::new(1 << 20).unwrap();
        let mut all = DirtyBitmap::new(&ram_ranges(1 << 20));
        for i in 0..all.pages() {
            all.set(i);
        }
        for page in [2u64, 9, 200] {
            src.write(page * PAGE_SIZE, &[page as u8; 4096]).unwrap();
        }
        let mut buf = vec![0u8; 2 * PACKED_PAGE_BYTES + 10];
        let (n, next) = pack_pages(&src, &all, 0, true, &mut buf).unwrap();
        assert_eq!(n, 2 * PACKED_PAGE_BYTES);
        assert_eq!(
            next, 10,
            "stopped at the page after the second non-zero one"
        );
        assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), 2);
        let dst = GuestRam::new(1 << 20).unwrap();
        assert_eq!(unpack_pages(&dst, &buf[..n]).unwrap(), 2);
        let (n, next) = pack_pages(&src, &all, next, true, &mut buf).unwrap();
        assert_eq!((n, next), (PACKED_PAGE_BYTES, all.pages()));
        unpack_pages(&dst, &buf[..n]).unwrap();
        let mut a = vec![0u8; 1 << 20];
        let mut b = vec![0u8; 1 << 20];
        src.read(0, &mut a).unwrap();
        dst.read(0, &mut b).unwrap();
        assert!(a == b);
    }

    #[test]
    fn a_hostile_batch_outside_ram_or_cut_writes_nothing() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let mut batch = vec![0u8; 2 * PACKED_PAGE_BYTES];
        batch[..8].copy_from_slice(&1u64.to_le_bytes());
        batch[8..16].copy_from_slice(b"written?");
        batch[PACKED_PAGE_BYTES..PACKED_PAGE_BYTES + 8].copy_from_slice(&256u64.to_le_bytes());
        assert!(
            unpack_pages(&ram, &batch).is_err(),
            "page 256 is past 1 MiB"
        );
        batch[PACKED_PAGE_BYTES..PACKED_PAGE_BYTES + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(unpack_pages(&ram, &batch).is_err());
        assert!(unpack_pages(&ram, &batch[..PACKED_PAGE_BYTES + 1]).is_err());
        let mut page = [0u8; 8];
        ram.read(PAGE_SIZE, &mut page).unwrap();
        assert_eq!(page, [0u8; 8], "nothing of a refused batch reached RAM");
    }

    #[test]
    fn listed_pages_go_out_and_back_in_ram_order() {
        let src = GuestRam::new(1 << 20).unwrap();
        let mut pages = DirtyBitmap::new(&ram_ranges(1 << 20));
        for (i, page) in [3u64, 17, 255].into_iter().enumerate() {
            src.write(page * PAGE_SIZE, &[i as u8 + 1; 4096]).unwrap();
            pages.set(page);
        }
        src.write(5 * PAGE_SIZE, b"not listed").unwrap();
        let mut stream = Vec::new();
        assert_eq!(read_pages(&src, &pages, &mut stream).unwrap(), 3);
        assert_eq!(stream.len(), 3 * 4096);
        assert_eq!(stream[4096], 2, "page 17 comes second");
        let dst = GuestRam::new(1 << 20).unwrap();
        assert_eq!(write_pages(&dst, &pages, &mut &stream[..]).unwrap(), 3);
        let mut a = vec![0u8; 1 << 20];
        let mut b = vec![0u8; 1 << 20];
        src.read(0, &mut a).unwrap();
        dst.read(0, &mut b).unwrap();
        a[5 * 4096..5 * 4096 + 10].fill(0);
        assert_eq!(a, b);
    }

    #[test]
    fn a_short_stream_or_a_foreign_bitmap_is_an_error() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let mut pages = DirtyBitmap::new(&ram_ranges(1 << 20));
        pages.set(1);
        pages.set(2);
        let short = vec![0u8; 4096 + 100];
        assert!(matches!(
            write_pages(&ram, &pages, &mut &short[..]),
            Err(Error::Io { .. })
        ));
        let other = DirtyBitmap::new(&ram_ranges(2 << 20));
        assert!(matches!(
            read_pages(&ram, &other, &mut Vec::new()),
            Err(Error::Vm(VmError::Dirty(DirtyError::Size { .. })))
        ));
    }
}
