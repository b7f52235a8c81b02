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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ram_ranges;

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
