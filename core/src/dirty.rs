//! Dirty-page tracking, for diff snapshots and pre-copy migration.
//!
//! Two writers change guest RAM: the guest's vCPUs, whose writes KVM logs per
//! memory slot (`KVM_MEM_LOG_DIRTY_PAGES`, read and cleared with
//! `KVM_GET_DIRTY_LOG`, see [`crate::vm::Vm::take_dirty_pages`]), and the VMM
//! itself, which KVM does not see: virtio devices filling the buffers of the
//! chains they answer and their used rings, a balloon dropping pages,
//! hypercalls writing results. [`DirtyPages`] records those: [`GuestRam`]'s
//! own writes mark it, and a device's worker thread marks, after serving a
//! chain, every device-writable buffer of that chain and the queue's used
//! ring ([`mark_chain`], [`mark_used_ring`], called by `virtio::drain` and
//! the few paths outside it). A page is always marked after it is written,
//! so a take that runs between the two leaves it for the next take: nothing
//! written is ever lost between rounds. The union of both is the dirty set.
//!
//! The bitmap has one bit per 4 KiB page in RAM order: the pages of the
//! first RAM range, then those of the next one (above the MMIO hole).
//!
//! [`GuestRam`]: crate::memory::GuestRam

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemory;

/// The page size the bitmaps count in.
pub const PAGE_SIZE: u64 = 4096;

/// Why dirty pages cannot be tracked or taken.
#[derive(Debug, Error)]
pub enum DirtyError {
    /// Pages are taken while tracking is off
    #[error("dirty-page tracking is not on: start it first")]
    NotTracking,
    /// KVM refused to log a slot or to give its log
    #[error("{op} (slot {slot}) failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The memory slot.
        slot: u32,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// A bitmap of another size than the VM's RAM
    #[error("the dirty bitmap has {got} pages, the VM's RAM {want}")]
    Size {
        /// Pages in the bitmap.
        got: u64,
        /// Pages of RAM.
        want: u64,
    },
}

/// A set of guest pages: one bit per 4 KiB page in RAM order (see the
/// module doc), bit `i` in word `i / 64`, bit `i % 64`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    ranges: Vec<(u64, u64)>,
    pages: u64,
    words: Vec<u64>,
}

impl DirtyBitmap {
    /// An empty set over RAM made of `ranges` (guest-physical start, length;
    /// whole pages).
    pub fn new(ranges: &[(u64, u64)]) -> DirtyBitmap {
        let pages = ranges.iter().map(|r| r.1 / PAGE_SIZE).sum::<u64>();
        DirtyBitmap {
            ranges: ranges.to_vec(),
            pages,
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// How many pages the bitmap covers (every page of RAM).
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The bitmap's words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The bitmap as little-endian bytes (what the ABI hands out).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Its size in bytes (whole 64-bit words).
    pub fn byte_len(&self) -> usize {
        self.words.len() * 8
    }

    /// Adds page `index` (ignored past the end).
    pub fn set(&mut self, index: u64) {
        if index < self.pages {
            self.words[(index / 64) as usize] |= 1 << (index % 64);
        }
    }

    /// Whether page `index` is in the set.
    pub fn is_set(&self, index: u64) -> bool {
        index < self.pages && self.words[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    /// How many pages are in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The index of the page holding guest-physical `addr`, if it is RAM.
    pub fn index_of(&self, addr: u64) -> Option<u64> {
        let mut before = 0;
        for &(start, len) in &self.ranges {
            if addr >= start && addr - start < len {
                return Some(before + (addr - start) / PAGE_SIZE);
            }
            before += len / PAGE_SIZE;
        }
        None
    }

    /// The guest-physical address of page `index`.
    pub fn address_of(&self, index: u64) -> Option<u64> {
        let mut before = 0;
        for &(start, len) in &self.ranges {
            let pages = len / PAGE_SIZE;
            if index < before + pages {
                return Some(start + (index - before) * PAGE_SIZE);
            }
            before += pages;
        }
        None
    }

    /// The indexes of the pages in the set, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                Some(w as u64 * 64 + bit)
            })
        })
    }

    /// The guest-physical addresses of the pages in the set, in order.
    pub fn addresses(&self) -> impl Iterator<Item = u64> + '_ {
        self.iter().filter_map(|i| self.address_of(i))
    }

    /// Adds every page of `other` (a bitmap over the same RAM).
    pub fn union(&mut self, other: &DirtyBitmap) -> Result<(), DirtyError> {
        if other.pages != self.pages {
            return Err(DirtyError::Size {
                got: other.pages,
                want: self.pages,
            });
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        Ok(())
    }

    /// Adds the pages of a per-range log (KVM's bitmap of one memory slot:
    /// bit `i` is the range's page `i`) for the range starting at page
    /// `first` of the bitmap, `pages` long.
    pub fn add_range_log(&mut self, first: u64, pages: u64, log: &[u64]) {
        for (w, &word) in log.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let bit = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                if bit < pages {
                    self.set(first + bit);
                }
            }
        }
    }
}

/// The pages the VMM writes while tracking is on (shared by every clone of
/// one VM's guest RAM).
#[derive(Debug)]
pub struct DirtyPages {
    ranges: Vec<(u64, u64)>,
    words: Vec<AtomicU64>,
    on: AtomicBool,
}

impl DirtyPages {
    /// A record for RAM made of `ranges`, tracking off.
    pub fn new(ranges: &[(u64, u64)]) -> DirtyPages {
        let pages = ranges.iter().map(|r| r.1 / PAGE_SIZE).sum::<u64>();
        DirtyPages {
            ranges: ranges.to_vec(),
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            on: AtomicBool::new(false),
        }
    }

    /// Turns recording on or off; turning it on starts from an empty set.
    pub fn set_tracking(&self, on: bool) {
        if on {
            for w in &self.words {
                w.store(0, Ordering::Relaxed);
            }
        }
        self.on.store(on, Ordering::Release);
    }

    /// Whether writes are recorded.
    pub fn is_tracking(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// Records a write to guest-physical `[addr, addr + len)` (the parts
    /// outside RAM are ignored). Call it after the write.
    pub fn mark(&self, addr: u64, len: u64) {
        if len == 0 || !self.is_tracking() {
            return;
        }
        let end = addr.saturating_add(len);
        let mut before = 0u64;
        for &(start, rlen) in &self.ranges {
            let (lo, hi) = (addr.max(start), end.min(start + rlen));
            if lo < hi {
                let first = before + (lo - start) / PAGE_SIZE;
                let last = before + (hi - 1 - start) / PAGE_SIZE;
                for page in first..=last {
                    if let Some(w) = self.words.get((page / 64) as usize) {
                        w.fetch_or(1 << (page % 64), Ordering::AcqRel);
                    }
                }
            }
            before += rlen / PAGE_SIZE;
        }
    }

    /// Takes the recorded pages and clears them (each word at once: a page
    /// marked meanwhile is either in this take or in the next).
    pub fn take(&self) -> DirtyBitmap {
        let mut bitmap = DirtyBitmap::new(&self.ranges);
        for (out, w) in bitmap.words.iter_mut().zip(&self.words) {
            *out = w.swap(0, Ordering::AcqRel);
        }
        bitmap
    }
}

thread_local! {
    /// The record the device served on this thread writes to (set by its
    /// worker thread, see [`set_thread_log`]).
    static THREAD_LOG: RefCell<Option<Arc<DirtyPages>>> = const { RefCell::new(None) };
}

/// Makes `log` the record this thread's device writes go to.
pub fn set_thread_log(log: Option<Arc<DirtyPages>>) {
    THREAD_LOG.with(|l| *l.borrow_mut() = log);
}

/// Runs `f` with `log` as this thread's record (a host thread serving a
/// device request that writes guest memory), then puts the old one back.
pub fn with_thread_log<T>(log: Option<Arc<DirtyPages>>, f: impl FnOnce() -> T) -> T {
    let old = THREAD_LOG.with(|l| l.replace(log));
    let out = f();
    THREAD_LOG.with(|l| *l.borrow_mut() = old);
    out
}

fn with_tracking(f: impl FnOnce(&DirtyPages)) {
    THREAD_LOG.with(|l| {
        if let Some(log) = l.borrow().as_deref() {
            if log.is_tracking() {
                f(log);
            }
        }
    });
}

/// Records a device write to `[addr, addr + len)` on this thread's record.
pub fn mark(addr: u64, len: u64) {
    with_tracking(|log| log.mark(addr, len));
}

/// Records `queue`'s used ring (flags, idx, ring, avail_event) as written.
pub fn mark_used_ring(queue: &Queue) {
    with_tracking(|log| log.mark(queue.used_ring(), 6 + 8 * u64::from(queue.size()) + 2));
}

/// Records every device-writable buffer of `chain` (a copy of a chain the
/// device has just served) as written.
pub fn mark_chain<M>(chain: DescriptorChain<M>)
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    with_tracking(|log| {
        for desc in chain.writable() {
            log.mark(desc.addr().0, u64::from(desc.len()));
        }
    });
}

/// Whether this thread records device writes now (a chain need not be
/// copied otherwise).
pub fn thread_is_tracking() -> bool {
    let mut on = false;
    with_tracking(|_| on = true);
    on
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{ram_ranges, MMIO_GAP_END, MMIO_GAP_START};

    #[test]
    fn pages_are_numbered_in_ram_order_across_the_mmio_hole() {
        let ranges = ram_ranges(MMIO_GAP_START + (1 << 20));
        let mut b = DirtyBitmap::new(&ranges);
        assert_eq!(b.pages(), (MMIO_GAP_START + (1 << 20)) / PAGE_SIZE);
        let first_high = MMIO_GAP_START / PAGE_SIZE;
        assert_eq!(b.index_of(MMIO_GAP_END + 0x1234), Some(first_high + 1));
        assert_eq!(b.index_of(MMIO_GAP_START), None);
        assert_eq!(b.address_of(first_high + 1), Some(MMIO_GAP_END + 0x1000));
        assert_eq!(b.address_of(b.pages()), None);
        b.set(3);
        b.set(first_high + 1);
        b.set(b.pages()); // past the end: ignored
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![3, first_high + 1]);
        assert_eq!(
            b.addresses().collect::<Vec<_>>(),
            vec![0x3000, MMIO_GAP_END + 0x1000]
        );
        assert_eq!(b.count(), 2);
    }

    #[test]
    fn marks_cover_every_page_touched_and_only_while_tracking() {
        let log = DirtyPages::new(&ram_ranges(1 << 20));
        log.mark(0x1000, 1);
        assert!(log.take().is_empty(), "tracking is off");
        log.set_tracking(true);
        log.mark(0x1fff, 2); // straddles pages 1 and 2
        log.mark(0xf_f000, 0x10_0000); // runs past RAM: page 255 only
        log.mark(u64::MAX - 1, 10); // outside RAM, no overflow
        let taken = log.take();
        assert_eq!(taken.iter().collect::<Vec<_>>(), vec![1, 2, 255]);
        assert!(log.take().is_empty(), "a take clears");
    }

    #[test]
    fn a_range_log_lands_at_its_range_and_unions_add_up() {
        let ranges = [(0, 128 * PAGE_SIZE), (1 << 32, 70 * PAGE_SIZE)];
        let mut b = DirtyBitmap::new(&ranges);
        b.add_range_log(128, 70, &[1 | 1 << 63, 1 << 5 | 1 << 6 | 1 << 7 | 1 << 9]);
        assert_eq!(
            b.iter().collect::<Vec<_>>(),
            vec![128, 128 + 63, 128 + 64 + 5]
        );
        let mut c = DirtyBitmap::new(&ranges);
        c.set(0);
        c.union(&b).unwrap();
        assert_eq!(c.count(), 4);
        let other = DirtyBitmap::new(&ranges[..1]);
        assert!(matches!(c.union(&other), Err(DirtyError::Size { .. })));
    }
}
