//! Guest RAM: how it is laid out in guest-physical space and how the host reads and
//! writes it, always bounds-checked.
//!
//! RAM starts at guest-physical 0. Like every x86 PC VMM, the 768 MiB below 4 GiB are
//! left as an MMIO hole (for devices, the LAPIC and IOAPIC), so a guest with more RAM
//! than fits below the hole gets the rest above 4 GiB.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemory as _, GuestMemoryMmap, GuestMemoryRegion as _,
    GuestRegionMmap,
};

use thiserror::Error;

use crate::dirty::DirtyPages;
use crate::ksm::KsmError;

/// Start of the MMIO hole below 4 GiB (3.25 GiB), as in Firecracker and QEMU's q35.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the MMIO hole (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The largest guest RAM accepted (a sanity bound, not a host limit).
pub const MAX_RAM_BYTES: u64 = 1 << 40;

/// What can go wrong creating, reading or writing guest RAM. A bad size is
/// the caller's argument; the rest are failures of guest memory itself.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The size is zero
    #[error("guest memory size must be greater than zero")]
    ZeroSize,
    /// The size is not whole pages
    #[error("guest memory size {0} is not a multiple of the 4 KiB page size")]
    UnalignedSize(u64),
    /// The size is above [`MAX_RAM_BYTES`]
    #[error("guest memory size {0} exceeds the maximum of {MAX_RAM_BYTES} bytes")]
    TooLarge(u64),
    /// The host could not map the RAM
    #[error("guest memory: cannot map {size} bytes of guest RAM: {source}")]
    Map {
        /// The RAM size asked for.
        size: u64,
        /// vm-memory's reason.
        source: vm_memory::mmap::Error,
    },
    /// A range reaches outside guest RAM
    #[error("guest memory: range {addr:#x}..+{len:#x} is outside guest RAM ({size} bytes)")]
    OutsideRam {
        /// First byte of the range.
        addr: u64,
        /// Its length.
        len: u64,
        /// The RAM size.
        size: u64,
    },
    /// vm-memory refused a read or write inside RAM
    #[error("guest memory: {op} at {addr:#x}: {source}")]
    Access {
        /// `"read"`, `"write"` or `"zeroing"`.
        op: &'static str,
        /// Where.
        addr: u64,
        /// vm-memory's reason.
        source: vm_memory::GuestMemoryError,
    },
    /// A memory file could not be examined
    #[error("guest memory: cannot examine the memory file: {source}")]
    FileStat {
        /// The host's error.
        source: std::io::Error,
    },
    /// A memory file's length is not the RAM size
    #[error("guest memory: the memory file holds {len} bytes where the RAM has {size}")]
    FileSize {
        /// The RAM size.
        size: u64,
        /// The file's length.
        len: u64,
    },
    /// The host refused to exclude RAM from core dumps
    #[error("guest memory: cannot exclude {len} bytes of guest RAM from core dumps: madvise(MADV_DONTDUMP): {source}")]
    DontDump {
        /// The region's length.
        len: u64,
        /// The host's error.
        source: std::io::Error,
    },
    /// The host refused to drop pages being zeroed
    #[error("guest memory: zeroing {start:#x}..{end:#x}: madvise: {source}")]
    Zero {
        /// First page.
        start: u64,
        /// End of the last page.
        end: u64,
        /// The host's error.
        source: std::io::Error,
    },
}

/// The result of a guest memory operation.
pub type Result<T> = std::result::Result<T, MemoryError>;

/// Guest RAM of one VM. Clones share the mapping (devices that reach guest
/// memory from their own threads hold one).
#[derive(Clone)]
pub struct GuestRam {
    mem: GuestMemoryMmap<()>,
    size: u64,
    /// Whether every region is `MADV_MERGEABLE` (KSM dedup, see [`crate::ksm`]).
    /// Shared by clones: it describes the one mapping they share.
    mergeable: Arc<AtomicBool>,
    /// The pages the VMM writes while dirty-page tracking is on (shared by
    /// clones: devices write through theirs). See [`crate::dirty`].
    dirty: Arc<DirtyPages>,
    /// Whether RAM is a private (copy-on-write) mapping of a snapshot's memory
    /// file ([`GuestRam::from_file`]) rather than anonymous memory: dropping
    /// a page then reverts it to the file's bytes, not to zeros. Shared by
    /// clones; set once a function checkpoint remaps anonymous RAM onto its
    /// pristine image ([`GuestRam::remap_private`]).
    file_backed: Arc<AtomicBool>,
}

fn exclude_regions_from_core_dumps(mem: &GuestMemoryMmap<()>) -> Result<()> {
    for region in mem.iter() {
        exclude_from_core_dumps(region.as_ptr(), region.len() as usize).map_err(|source| {
            MemoryError::DontDump {
                len: region.len(),
                source,
            }
        })?;
    }
    Ok(())
}

/// The guest-physical ranges `(start, len)` that `size` bytes of RAM occupy.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

/// Marks `len` bytes at `addr` `MADV_DONTDUMP`: a core dump of the host
/// process leaves them out. Every mapping of guest RAM (and of a copy of it)
/// gets this: a crash of the VMM must not write a guest's secrets, nor
/// gigabytes of its RAM, into a core file.
pub fn exclude_from_core_dumps(addr: *mut u8, len: usize) -> std::io::Result<()> {
    // SAFETY: MADV_DONTDUMP only sets a flag on the mappings in the range
    // (VM_DONTDUMP); it neither changes nor frees memory, so no pointer into
    // it is affected. A range that is not mapped is ENOMEM, returned.
    let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTDUMP) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl GuestRam {
    /// Whether `size` bytes is a RAM size [`GuestRam::new`] accepts: positive,
    /// page-aligned and at most [`MAX_RAM_BYTES`]. Also for checks made
    /// without mapping anything (a Linux load checked before a VM exists).
    pub fn check_size(size: u64) -> Result<()> {
        if size == 0 {
            return Err(MemoryError::ZeroSize);
        }
        if !size.is_multiple_of(4096) {
            return Err(MemoryError::UnalignedSize(size));
        }
        if size > MAX_RAM_BYTES {
            return Err(MemoryError::TooLarge(size));
        }
        Ok(())
    }

    /// Maps `size` bytes of anonymous, zeroed guest RAM.
    pub fn new(size: u64) -> Result<GuestRam> {
        Self::check_size(size)?;
        let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
            .into_iter()
            .map(|(start, len)| (GuestAddress(start), len as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges)
            .map_err(|source| MemoryError::Map { size, source })?;
        exclude_regions_from_core_dumps(&mem)?;
        Ok(GuestRam {
            mem,
            size,
            mergeable: Arc::new(AtomicBool::new(false)),
            dirty: Arc::new(DirtyPages::new(&ram_ranges(size))),
            file_backed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Maps `size` bytes of guest RAM privately (`MAP_PRIVATE`, copy-on-write)
    /// from `file`, whose bytes are the RAM ranges of [`ram_ranges`] one after
    /// the other (a snapshot's memory file). Nothing is read: a page comes from
    /// the page cache when the guest first touches it, so the time this takes
    /// does not grow with `size`, and VMs mapping the same file share every
    /// page none of them has written. Writes go to private copies, never to the
    /// file. The file must be exactly `size` bytes long (checked here: a
    /// shorter file would fault the guest with SIGBUS past its end).
    pub fn from_file(size: u64, file: File) -> Result<GuestRam> {
        Self::check_size(size)?;
        let map_err = |source| MemoryError::Map { size, source };
        let len = file
            .metadata()
            .map_err(|source| MemoryError::FileStat { source })?
            .len();
        if len != size {
            return Err(MemoryError::FileSize { size, len });
        }
        let file = Arc::new(file);
        let mut regions = Vec::new();
        let mut offset = 0u64;
        for (start, len) in ram_ranges(size) {
            let region = MmapRegion::build(
                Some(FileOffset::from_arc(file.clone(), offset)),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
            .map_err(|e| map_err(vm_memory::mmap::Error::MmapRegion(e)))?;
            regions.push(GuestRegionMmap::new(region, GuestAddress(start)).map_err(map_err)?);
            offset += len;
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(map_err)?;
        exclude_regions_from_core_dumps(&mem)?;
        Ok(GuestRam {
            mem,
            size,
            mergeable: Arc::new(AtomicBool::new(false)),
            dirty: Arc::new(DirtyPages::new(&ram_ranges(size))),
            file_backed: Arc::new(AtomicBool::new(true)),
        })
    }

    /// Whether RAM maps a snapshot's memory file ([`GuestRam::from_file`]).
    pub fn is_file_backed(&self) -> bool {
        self.file_backed.load(Ordering::Acquire)
    }

    /// Maps every RAM region again, at the same host address, as a private
    /// (copy-on-write) mapping of `fd`, whose bytes are the RAM ranges of
    /// [`ram_ranges`] one after the other (a function checkpoint's pristine
    /// image, see `crate::function::reset`). KVM's memory slots keep their
    /// host addresses; its MMU notifier drops the old pages' mappings. The
    /// caller guarantees no vCPU runs and no device touches RAM meanwhile,
    /// and that `fd` holds at least [`GuestRam::size`] bytes.
    pub fn remap_private(&self, fd: std::os::fd::RawFd) -> std::io::Result<()> {
        let mut offset = 0u64;
        for region in self.mem.iter() {
            let len = region.len();
            let off = libc::off_t::try_from(offset)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            // SAFETY: `region.as_ptr()..+len` is this RAM's own mapping (owned by
            // `self.mem`, which unmaps exactly that range on drop); MAP_FIXED
            // replaces it in place with a mapping of the same size and
            // protection, so every pointer into it stays valid. The contents
            // become `fd`'s bytes, which the caller made equal to RAM's.
            let ptr = unsafe {
                libc::mmap(
                    region.as_ptr().cast(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    fd,
                    off,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            // A new mapping starts without VM_DONTDUMP.
            exclude_from_core_dumps(region.as_ptr(), len as usize)?;
            offset += len;
        }
        self.file_backed.store(true, Ordering::Release);
        Ok(())
    }

    /// Drops every private page of RAM mapped from a file (`MADV_DONTNEED`
    /// over all of it): each page reads back as the file's bytes again and
    /// costs no host memory until touched. Refused on anonymous RAM (it would
    /// read back as zeros). The caller guarantees no vCPU runs.
    pub fn drop_private_pages(&self) -> std::io::Result<()> {
        if !self.is_file_backed() {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        for region in self.mem.iter() {
            // SAFETY: the whole of one of this RAM's own mappings, alive as long
            // as `self`; on a private file mapping MADV_DONTNEED only reverts its
            // pages to the file's (the mapping stays valid; KVM's MMU notifier
            // drops its mappings of them).
            let rc = unsafe {
                libc::madvise(
                    region.as_ptr().cast(),
                    region.len() as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Every RAM region as host memory, in guest-physical order, for bulk
    /// copies to and from a file (snapshots). The slices alias guest RAM,
    /// which a running guest may change underneath: callers copy only from a
    /// paused VM or into RAM no vCPU runs on yet.
    pub fn host_regions(&self) -> Vec<(u64, *mut u8, usize)> {
        self.mem
            .iter()
            .map(|r| (r.start_addr().0, r.as_ptr(), r.len() as usize))
            .collect()
    }

    /// Opts every RAM region into KSM deduplication (`MADV_MERGEABLE`): the
    /// host's `ksmd`, when it runs, may then back identical pages of this and
    /// other mergeable memory with one copy, copied again on a write. Guest
    /// contents are unchanged. A kernel without KSM is
    /// [`KsmError::Unsupported`], never silently ignored.
    pub fn set_mergeable(&self) -> std::result::Result<(), KsmError> {
        for region in self.mem.iter() {
            let len = region.len();
            // SAFETY: `region` is one of this RAM's own mappings: `as_ptr()` is
            // its page-aligned start and `len` its length, alive as long as
            // `self`. MADV_MERGEABLE only lets ksmd share identical pages
            // copy-on-write; contents and the address range stay as they are
            // (KVM's MMU notifier follows the kernel's page replacements).
            let rc = unsafe {
                libc::madvise(region.as_ptr().cast(), len as usize, libc::MADV_MERGEABLE)
            };
            if rc != 0 {
                return Err(KsmError::from_madvise(len, std::io::Error::last_os_error()));
            }
        }
        self.mergeable.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Whether [`GuestRam::set_mergeable`] marked this RAM.
    pub fn is_mergeable(&self) -> bool {
        self.mergeable.load(Ordering::Relaxed)
    }

    /// The record of the pages the VMM writes (see [`crate::dirty`]).
    pub fn dirty_pages(&self) -> &Arc<DirtyPages> {
        &self.dirty
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The vm-memory view, for KVM slot registration and device access.
    pub fn mmap(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// How much of guest RAM is backed by host memory now: the pages of every
    /// region that `mincore` reports resident. Pages the guest never touched,
    /// and pages a balloon or free page reporting returned (`MADV_DONTNEED`),
    /// are not; pages swapped out are not either. This is the VMM's RSS for
    /// guest RAM, without the rest of the process (its JavaScript heap).
    pub fn resident_bytes(&self) -> std::io::Result<u64> {
        /// Pages asked of `mincore` at once (64 MiB): a bounded vector.
        const CHUNK_PAGES: usize = 16 * 1024;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096);
        let mut vec = vec![0u8; CHUNK_PAGES];
        let mut resident = 0u64;
        for region in self.mem.iter() {
            let base = region.as_ptr();
            let len = region.len() as usize;
            let mut off = 0usize;
            while off < len {
                let n = (len - off).min(CHUNK_PAGES * page);
                // SAFETY: `base + off .. + n` lies inside this region's own mapping
                // (page-aligned: regions and `off` are whole pages), alive as long
                // as `self`; `vec` has room for `ceil(n / page)` <= CHUNK_PAGES
                // entries. mincore only reads the page tables.
                let rc = unsafe { libc::mincore(base.add(off).cast(), n, vec.as_mut_ptr()) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let pages = n.div_ceil(page);
                resident += vec[..pages].iter().filter(|&&v| v & 1 != 0).count() as u64;
                off += n;
            }
        }
        Ok(resident * page as u64)
    }

    /// Whether `[addr, addr + len)` lies entirely inside guest RAM.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        if len == 0 {
            return self.mem.address_in_range(GuestAddress(addr));
        }
        let Some(last) = addr.checked_add(len - 1) else {
            return false;
        };
        // RAM regions are contiguous inside themselves, so a range is inside RAM when
        // both ends fall in the same region.
        self.mem.iter().any(|region| {
            let start = region.start_addr().0;
            let end = start + region.len() - 1;
            addr >= start && last <= end
        })
    }

    fn outside(&self, addr: u64, len: u64) -> MemoryError {
        MemoryError::OutsideRam {
            addr,
            len,
            size: self.size,
        }
    }

    fn check(&self, addr: u64, len: usize) -> Result<()> {
        if self.contains(addr, len as u64) {
            Ok(())
        } else {
            Err(self.outside(addr, len as u64))
        }
    }

    /// Copies guest memory at `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.check(addr, buf.len())?;
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|source| MemoryError::Access {
                op: "read",
                addr,
                source,
            })
    }

    /// Copies `data` into guest memory at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.check(addr, data.len())?;
        let written = self
            .mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|source| MemoryError::Access {
                op: "write",
                addr,
                source,
            });
        self.dirty.mark(addr, data.len() as u64);
        written
    }

    /// Writes a little-endian u64 at `addr`.
    pub fn write_u64(&self, addr: u64, value: u64) -> Result<()> {
        self.write(addr, &value.to_le_bytes())
    }

    /// Zeroes `[addr, addr + len)` without allocating host memory: whole pages are
    /// dropped with `MADV_DONTNEED` (guest RAM is private anonymous memory, so they
    /// read back as zero and cost nothing until touched; KVM's MMU notifier drops
    /// its mappings too), and the at most two partial pages at the ends are written
    /// from a 4 KiB static buffer. Untouched (fresh) RAM stays untouched.
    ///
    /// On RAM mapped from a snapshot's memory file ([`GuestRam::from_file`])
    /// a dropped page would read back as the file's bytes, so there every
    /// page is written with zeros instead (a private copy each).
    pub fn zero(&self, addr: u64, len: u64) -> Result<()> {
        const PAGE: u64 = 4096;
        static ZEROS: [u8; PAGE as usize] = [0; PAGE as usize];
        if len == 0 {
            return Ok(());
        }
        if !self.contains(addr, len) {
            return Err(self.outside(addr, len));
        }
        if self.is_file_backed() {
            let end = addr + len; // no overflow: `contains` checked it
            let mut at = addr;
            while at < end {
                let n = (end - at).min(PAGE - at % PAGE);
                self.write(at, &ZEROS[..n as usize])?;
                at += n;
            }
            return Ok(());
        }
        self.drop_pages(addr, len)
    }

    /// Gives the host memory behind the whole pages of `[addr, addr + len)`
    /// back (`MADV_DONTNEED`), for pages the guest gave up (a balloon's
    /// inflate, free page reporting): what they hold afterwards is not the
    /// guest's concern. On anonymous RAM they read back as zeros; on RAM
    /// mapped from a snapshot's memory file they revert to the file's bytes
    /// (the private copy is freed, the page cache's page is shared again).
    /// The partial pages at the ends are zeroed.
    pub fn discard(&self, addr: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if !self.contains(addr, len) {
            return Err(self.outside(addr, len));
        }
        self.drop_pages(addr, len)
    }

    /// [`GuestRam::zero`]'s anonymous-memory path: `[addr, addr + len)` is
    /// inside RAM (checked by the caller).
    fn drop_pages(&self, addr: u64, len: u64) -> Result<()> {
        const PAGE: u64 = 4096;
        static ZEROS: [u8; PAGE as usize] = [0; PAGE as usize];
        let end = addr + len; // no overflow: `contains` checked it
        let first_page = addr.next_multiple_of(PAGE);
        let last_page = end & !(PAGE - 1);
        if first_page >= last_page {
            // Within one or two pages: plain writes, at most two 4 KiB chunks.
            let mut at = addr;
            while at < end {
                let n = (end - at).min(PAGE);
                self.write(at, &ZEROS[..n as usize])?;
                at += n;
            }
            return Ok(());
        }
        // The partial pages at either end; empty when the range is
        // page-aligned there. An empty write at the end of RAM (or of the
        // RAM below the MMIO gap) would be refused as outside RAM.
        if first_page > addr {
            self.write(addr, &ZEROS[..(first_page - addr) as usize])?;
        }
        if end > last_page {
            self.write(last_page, &ZEROS[..(end - last_page) as usize])?;
        }
        let host = self
            .mem
            .get_host_address(GuestAddress(first_page))
            .map_err(|source| MemoryError::Access {
                op: "zeroing",
                addr: first_page,
                source,
            })?;
        // SAFETY: `[first_page, last_page)` lies inside one RAM region (the
        // callers checked the whole range; regions are page-aligned and
        // contiguous), so `host` addresses this VM's own private mapping for
        // that many bytes, page-aligned. MADV_DONTNEED only replaces those
        // pages' contents with zero-fill-on-demand pages (anonymous RAM) or the
        // file's pages (a private file mapping); the mapping stays valid.
        let rc = unsafe {
            libc::madvise(
                host.cast(),
                (last_page - first_page) as usize,
                libc::MADV_DONTNEED,
            )
        };
        self.dirty.mark(first_page, last_page - first_page);
        if rc != 0 {
            return Err(MemoryError::Zero {
                start: first_page,
                end: last_page,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Populates the host memory behind `[addr, addr + len)` before a large copy,
    /// in transparent huge pages where the host allows them: on a host that is
    /// itself virtualized, faulting in 8 MiB page by page costs about 4 ms, in
    /// 2 MiB pages under 2 ms. Only an optimization: ranges outside RAM and hosts
    /// without `MADV_POPULATE_WRITE` (Linux < 5.14) or THP are left to fault as
    /// usual. The 2 MiB blocks around the range become huge-page eligible too.
    pub fn prefault(&self, addr: u64, len: u64) {
        const PAGE: u64 = 4096;
        const HUGE_PAGE: u64 = 2 << 20;
        if len == 0 || !self.contains(addr, len) {
            return;
        }
        let Some(region) = self.mem.iter().find(|r| {
            let start = r.start_addr().0;
            addr >= start && addr - start < r.len()
        }) else {
            return;
        };
        let (region_start, region_end) =
            (region.start_addr().0, region.start_addr().0 + region.len());
        let start = addr & !(PAGE - 1);
        let end = (addr + len).next_multiple_of(PAGE).min(region_end);
        let huge_start = (addr & !(HUGE_PAGE - 1)).max(region_start);
        let huge_end = (addr + len).next_multiple_of(HUGE_PAGE).min(region_end);
        let (Ok(host), Ok(huge_host)) = (
            self.mem.get_host_address(GuestAddress(start)),
            self.mem.get_host_address(GuestAddress(huge_start)),
        ) else {
            return;
        };
        // SAFETY: both ranges lie inside one RAM region (the region holding
        // `addr`, clamped to its bounds; regions are page-aligned), so the host
        // pointers address this VM's live anonymous mapping for their lengths.
        // MADV_HUGEPAGE only changes how future faults allocate, and
        // MADV_POPULATE_WRITE only faults pages in as a write would: neither
        // changes contents or the mapping's address range.
        unsafe {
            libc::madvise(
                huge_host.cast(),
                (huge_end - huge_start) as usize,
                libc::MADV_HUGEPAGE,
            );
            libc::madvise(
                host.cast(),
                (end - start) as usize,
                libc::MADV_POPULATE_WRITE,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VmFlags line of the mapping that starts at `addr` in /proc/self/smaps.
    fn vm_flags(addr: *mut u8) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, _)) = range.split_once('-') {
                    if let Ok(start) = u64::from_str_radix(start, 16) {
                        inside = start == addr as u64;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.split_whitespace().map(str::to_string).collect();
                }
            }
        }
        panic!("no mapping starts at {addr:p}");
    }

    #[test]
    fn guest_ram_is_excluded_from_core_dumps() {
        let ram = GuestRam::new(4 << 20).unwrap();
        for (_, ptr, _) in ram.host_regions() {
            assert!(
                vm_flags(ptr).contains(&"dd".to_string()),
                "anonymous RAM lacks dd"
            );
        }
        let path = std::env::temp_dir().join(format!("dv-dontdump-{}.mem", std::process::id()));
        std::fs::write(&path, vec![0u8; 2 << 20]).unwrap();
        let ram = GuestRam::from_file(2 << 20, File::open(&path).unwrap()).unwrap();
        let image = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        for (_, ptr, _) in ram.host_regions() {
            assert!(
                vm_flags(ptr).contains(&"dd".to_string()),
                "file-backed RAM lacks dd"
            );
        }
        let anon = GuestRam::new(2 << 20).unwrap();
        anon.remap_private(std::os::fd::AsRawFd::as_raw_fd(&image))
            .unwrap();
        for (_, ptr, _) in anon.host_regions() {
            assert!(
                vm_flags(ptr).contains(&"dd".to_string()),
                "remapped RAM lacks dd"
            );
        }
    }

    #[test]
    fn resident_bytes_follow_touches_and_zeroing() {
        let ram = GuestRam::new(64 << 20).expect("map");
        assert_eq!(
            ram.resident_bytes().expect("mincore"),
            0,
            "fresh RAM is untouched"
        );
        // 3 MiB written at 8 MiB: exactly those pages become resident.
        ram.write(8 << 20, &vec![0xa5; 3 << 20]).expect("write");
        assert_eq!(ram.resident_bytes().expect("mincore"), 3 << 20);
        // Zeroing drops whole pages again (MADV_DONTNEED).
        ram.zero(8 << 20, 2 << 20).expect("zero");
        assert_eq!(ram.resident_bytes().expect("mincore"), 1 << 20);
    }

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(ram_ranges(2 << 20), vec![(0, 2 << 20)]);
    }

    #[test]
    fn large_ram_skips_the_mmio_gap() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges[0], (0, MMIO_GAP_START));
        assert_eq!(ranges[1], (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(GuestRam::new(0), Err(MemoryError::ZeroSize)));
        assert!(matches!(
            GuestRam::new(4095),
            Err(MemoryError::UnalignedSize(4095))
        ));
        assert!(matches!(
            GuestRam::new(MAX_RAM_BYTES + 4096),
            Err(MemoryError::TooLarge(_))
        ));
    }

    #[test]
    fn prefault_keeps_contents_and_ignores_bad_ranges() {
        let ram = GuestRam::new(8 << 20).unwrap();
        ram.write(0x1000, b"keep").unwrap();
        ram.prefault(0x800, 3 << 20);
        ram.prefault(7 << 20, 2 << 20); // runs past the end: ignored
        ram.prefault(u64::MAX - 10, 100);
        let mut buf = [0u8; 4];
        ram.read(0x1000, &mut buf).unwrap();
        assert_eq!(&buf, b"keep");
        ram.read(0x20_0000, &mut buf).unwrap();
        assert_eq!(buf, [0; 4]);
    }

    /// The `VmFlags` of the mapping at `host` in this process's smaps.
    fn vm_flags_at(host: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, end)) = range.split_once('-') {
                    if let (Ok(start), Ok(end)) = (
                        usize::from_str_radix(start, 16),
                        usize::from_str_radix(end, 16),
                    ) {
                        inside = start <= host && host < end;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.trim().to_owned();
                }
            }
        }
        panic!("no mapping at {host:#x} in /proc/self/smaps");
    }

    #[test]
    fn set_mergeable_marks_every_region_for_ksm() {
        if !std::path::Path::new(crate::ksm::SYS_KSM_DIR).exists() {
            // A kernel without KSM refuses the advice, with the typed error.
            let ram = GuestRam::new(64 << 10).unwrap();
            assert!(matches!(ram.set_mergeable(), Err(KsmError::Unsupported(_))));
            return;
        }
        // Two regions: RAM above the MMIO gap (reserved, never touched here).
        let ram = GuestRam::new(MMIO_GAP_START + (2 << 20)).unwrap();
        ram.write(0x1000, b"keep").unwrap();
        assert!(!ram.is_mergeable());
        for region in ram.mmap().iter() {
            let flags = vm_flags_at(region.as_ptr() as usize);
            assert!(!flags.split(' ').any(|f| f == "mg"), "before: {flags}");
        }
        ram.set_mergeable().unwrap();
        assert!(ram.is_mergeable());
        assert_eq!(ram.mmap().iter().count(), 2);
        for region in ram.mmap().iter() {
            let flags = vm_flags_at(region.as_ptr() as usize);
            assert!(flags.split(' ').any(|f| f == "mg"), "after: {flags}");
        }
        let mut buf = [0u8; 4];
        ram.read(0x1000, &mut buf).unwrap();
        assert_eq!(&buf, b"keep");
    }

    #[test]
    fn zeroing_whole_pages_up_to_the_end_of_ram_or_of_the_low_region_succeeds() {
        // Found by the fuzz targets: an empty tail write at the end of RAM
        // was refused, so a balloon's free page report (or an ELF's BSS)
        // ending at the top of RAM failed.
        let ram = GuestRam::new(64 << 10).unwrap();
        ram.write(0xf000, &[0xaa; 0x1000]).unwrap();
        ram.zero(0, 64 << 10).unwrap();
        ram.zero(0xe000, 0x2000).unwrap();
        let mut page = [0xffu8; 0x1000];
        ram.read(0xf000, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0));
        let split = GuestRam::new(MMIO_GAP_START + (1 << 20)).unwrap();
        split
            .write(MMIO_GAP_START - 0x1000, &[0xaa; 0x1000])
            .unwrap();
        split.zero(MMIO_GAP_START - 0x2000, 0x2000).unwrap();
        split.read(MMIO_GAP_START - 0x1000, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0));
    }

    #[test]
    fn reads_and_writes_are_bounds_checked() {
        let ram = GuestRam::new(64 << 10).unwrap();
        ram.write(0x100, b"hello").unwrap();
        let mut buf = [0u8; 5];
        ram.read(0x100, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(matches!(
            ram.write((64 << 10) - 2, b"abc"),
            Err(MemoryError::OutsideRam {
                addr: 0xfffe,
                len: 3,
                size: 0x10000
            })
        ));
        assert!(matches!(
            ram.read(u64::MAX - 1, &mut buf),
            Err(MemoryError::OutsideRam { .. })
        ));
        assert!(matches!(
            ram.zero(0xf000, 0x2000),
            Err(MemoryError::OutsideRam { .. })
        ));
        assert_eq!(
            ram.write(0x10000, b"x").unwrap_err().to_string(),
            "guest memory: range 0x10000..+0x1 is outside guest RAM (65536 bytes)"
        );
        assert!(ram.contains(0, 64 << 10));
        assert!(!ram.contains(0, (64 << 10) + 1));
    }
}
