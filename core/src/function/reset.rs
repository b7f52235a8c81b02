//! A function VM's checkpoint, and the reset to it.
//!
//! [`checkpoint`] takes, at READY: every vCPU's state, and a *pristine* image
//! of guest RAM. If RAM is a private mapping of a snapshot's memory file and
//! the VM has not run since its restore, that file is the image (VMs restored
//! from one snapshot share it in the page cache). Otherwise RAM is copied
//! into a sealed memfd (all-zero pages left as holes) and RAM is mapped again
//! at the same host address as a private mapping of it, so unwritten pages
//! are the memfd's and a dropped page reads back pristine. Dirty-page
//! tracking of RAM then starts.
//!
//! [`reset`] copies back exactly the pages written since (KVM's dirty log of
//! the slots + the pages the host wrote: input and mailbox) from the image,
//! which keeps KVM's mappings of the other pages, and writes every vCPU's
//! state back. [`trim`] drops every private page of an idle VM.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use crate::error::Result;
use crate::snapshot::cpu::VcpuState;
use crate::snapshot::file::DiffBase;
use crate::vm::Vm;

use super::abi::{MAILBOX_ADDR, MAILBOX_SIZE};
use super::mailbox::{self, Ready};
use super::FunctionError;

const PAGE: usize = 4096;

/// A read-only mapping of the pristine image: RAM's bytes in RAM order (the
/// ranges of `memory::ram_ranges` one after the other).
pub struct Pristine {
    base: *mut u8,
    len: usize,
}

// SAFETY: `base..+len` is a private read-only mapping owned by this value and
// never written: sharing or moving it between threads only shares reads.
unsafe impl Send for Pristine {}
// SAFETY: as above, only reads go through it.
unsafe impl Sync for Pristine {}

impl Drop for Pristine {
    fn drop(&mut self) {
        // SAFETY: the mapping this value made and owns; nothing borrows it past
        // `self` (callers copy out of it while holding the checkpoint).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

fn os(op: &'static str) -> impl FnOnce(std::io::Error) -> FunctionError {
    move |source| FunctionError::Host { op, source }
}

fn last_os(op: &'static str) -> FunctionError {
    os(op)(std::io::Error::last_os_error())
}

impl Pristine {
    /// Maps `len` bytes of `fd` read-only (private: never written, so every
    /// page stays the file's).
    fn map(fd: OwnedFd, len: usize) -> std::result::Result<Pristine, FunctionError> {
        // SAFETY: a fresh mapping chosen by the kernel; `fd` is open and holds
        // `len` bytes (checked or made so by the callers).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(last_os("mmap of the pristine image"));
        }
        // A copy of guest RAM: out of core dumps like RAM itself.
        if let Err(e) = crate::memory::exclude_from_core_dumps(base.cast(), len) {
            // SAFETY: the mapping just made, not yet shared with anything.
            unsafe { libc::munmap(base, len) };
            return Err(os("madvise(MADV_DONTDUMP) of the pristine image")(e));
        }
        // The mapping holds the file; its fd goes (a thousand idle function
        // VMs in one process must not each keep one more fd open).
        drop(fd);
        Ok(Pristine {
            base: base.cast(),
            len,
        })
    }

    /// Page `index` of the image.
    fn page(&self, index: u64) -> Option<&[u8]> {
        let at = usize::try_from(index).ok()?.checked_mul(PAGE)?;
        if at + PAGE > self.len {
            return None;
        }
        // SAFETY: `at..at + PAGE` is inside the mapping (checked), alive as
        // long as `self`, and never written.
        Some(unsafe { std::slice::from_raw_parts(self.base.add(at), PAGE) })
    }

    /// Drops this mapping's page-table entries (the image itself stays).
    fn trim(&self) {
        // SAFETY: the whole of this value's own read-only mapping; dropping its
        // pages only makes the next read fault them in again from the file.
        unsafe { libc::madvise(self.base.cast(), self.len, libc::MADV_DONTNEED) };
    }
}

/// The state every request of a function VM starts from.
pub struct Checkpoint {
    /// Every vCPU, in id order.
    vcpus: Vec<VcpuState>,
    /// RAM at the checkpoint.
    pristine: Pristine,
    /// The runtime's buffers, checked at READY.
    pub ready: Ready,
    /// Whether the image is the snapshot's memory file (else a memfd copy).
    pub shared_image: bool,
}

/// Reads the mailbox page.
pub(crate) fn read_mailbox(vm: &Vm) -> Result<mailbox::Page> {
    let mut page = [0u8; MAILBOX_SIZE as usize];
    vm.ram().read(MAILBOX_ADDR, &mut page)?;
    Ok(page)
}

/// Fails unless every vCPU is between runs.
pub(crate) fn require_idle(vm: &Vm) -> Result<()> {
    let vcpus = vm.vcpu_list();
    if vcpus.is_empty() {
        return Err(FunctionError::NoVcpus.into());
    }
    if vcpus.iter().any(|v| !v.is_idle()) {
        return Err(FunctionError::Running.into());
    }
    Ok(())
}

/// Runs `f` on the VM's checkpoint, held for the call, once every vCPU is
/// between runs.
pub(crate) fn with_checkpoint<T>(vm: &Vm, f: impl FnOnce(&Checkpoint) -> Result<T>) -> Result<T> {
    let slot = vm
        .function_slot()
        .try_lock()
        .map_err(|_| FunctionError::Running)?;
    let cp = slot.as_ref().ok_or(FunctionError::NoCheckpoint)?;
    require_idle(vm)?;
    f(cp)
}

/// The runtime's buffers, read from the READY mailbox and checked.
fn read_ready(vm: &Vm) -> Result<Ready> {
    let page = read_mailbox(vm)?;
    let ram = vm.ram();
    Ok(mailbox::parse_ready(&page, |a, l| ram.contains(a, l)).map_err(FunctionError::NotReady)?)
}

/// The runtime's buffers: the checkpoint's, or, before one, read from the
/// mailbox of an idle VM at READY.
pub fn ready(vm: &Vm) -> Result<Ready> {
    let held = vm
        .function_slot()
        .try_lock()
        .ok()
        .and_then(|slot| slot.as_ref().map(|cp| cp.ready));
    match held {
        Some(ready) => Ok(ready),
        None => {
            require_idle(vm)?;
            read_ready(vm)
        }
    }
}

/// RAM copied into a sealed memfd, all-zero pages left as holes.
fn copy_ram(vm: &Vm) -> std::result::Result<OwnedFd, FunctionError> {
    let ram = vm.ram();
    // SAFETY: a NUL-terminated name and valid flags.
    let raw = unsafe {
        libc::memfd_create(
            c"denovisor-pristine".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if raw < 0 {
        return Err(last_os("memfd_create"));
    }
    // SAFETY: a fresh fd this function owns from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let size = libc::off_t::try_from(ram.size()).map_err(|_| FunctionError::TooLarge)?;
    // SAFETY: ftruncate of an fd we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
        return Err(last_os("ftruncate of the pristine image"));
    }
    let mut offset = 0u64;
    for (_, host, len) in ram.host_regions() {
        let mut at = 0usize;
        while at < len {
            // SAFETY: `host + at..+PAGE` is inside this RAM region (regions are
            // whole pages), alive while `vm` is; no vCPU runs (checked by the
            // caller), so nothing writes it meanwhile.
            let page = unsafe { std::slice::from_raw_parts(host.add(at), PAGE) };
            if page.iter().any(|&b| b != 0) {
                let off = (offset + at as u64) as libc::off_t;
                // SAFETY: pwrite from a valid slice into an fd we own.
                let n = unsafe { libc::pwrite(fd.as_raw_fd(), page.as_ptr().cast(), PAGE, off) };
                if n != PAGE as isize {
                    return Err(last_os("writing the pristine image"));
                }
            }
            at += PAGE;
        }
        offset += len as u64;
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on an fd we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(last_os("sealing the pristine image"));
    }
    Ok(fd)
}

/// The snapshot memory file RAM maps, duplicated.
fn ram_file(vm: &Vm) -> Option<OwnedFd> {
    use vm_memory::{GuestMemory as _, GuestMemoryRegion as _};
    let region = vm.ram().mmap().iter().next()?;
    let file = region.file_offset()?;
    if file.start() != 0 {
        return None;
    }
    file.file().try_clone().ok().map(OwnedFd::from)
}

/// What a checkpoint made.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointInfo {
    /// The runtime's buffers.
    pub ready: Ready,
    /// Whether RAM's image is the snapshot's memory file.
    pub shared_image: bool,
}

/// Takes the checkpoint of a VM stopped at READY (see the module doc).
pub fn checkpoint(vm: &Vm) -> Result<CheckpointInfo> {
    let mut slot = vm
        .function_slot()
        .try_lock()
        .map_err(|_| FunctionError::Running)?;
    require_idle(vm)?;
    let ready = read_ready(vm)?;
    let ram = vm.ram();
    let irq = vm.has_irqchip();
    let mut vcpus = Vec::new();
    for vcpu in vm.vcpu_list() {
        let fd = vcpu.fd()?;
        vcpus.push(VcpuState::capture(vcpu.id, &fd, irq)?);
    }
    let len = usize::try_from(ram.size()).map_err(|_| FunctionError::TooLarge)?;
    let restored = matches!(vm.diff_base(), DiffBase::Restored(_));
    let (pristine, shared_image) = match ram_file(vm).filter(|_| ram.is_file_backed() && restored) {
        Some(fd) => (Pristine::map(fd, len)?, true),
        None => {
            let fd = copy_ram(vm)?;
            ram.remap_private(fd.as_raw_fd())
                .map_err(os("mapping RAM onto the pristine image"))?;
            (Pristine::map(fd, len)?, false)
        }
    };
    vm.start_dirty_log()?;
    *slot = Some(Checkpoint {
        vcpus,
        pristine,
        ready,
        shared_image,
    });
    Ok(CheckpointInfo {
        ready,
        shared_image,
    })
}

/// Pages restored and the time it took.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResetStats {
    /// Pages copied back from the image.
    pub pages: u64,
    /// Nanoseconds.
    pub ns: u64,
}

/// Puts the VM back at `cp` (the caller holds the checkpoint slot and no vCPU
/// runs).
pub(crate) fn reset_to(vm: &Vm, cp: &Checkpoint) -> Result<ResetStats> {
    use vm_memory::{GuestAddress, GuestMemory as _};
    let began = Instant::now();
    let dirty = vm.take_dirty_log()?;
    let mem = vm.ram().mmap();
    let mut pages = 0;
    for index in dirty.iter() {
        let (Some(addr), Some(src)) = (dirty.address_of(index), cp.pristine.page(index)) else {
            continue;
        };
        let host = mem
            .get_host_address(GuestAddress(addr))
            .map_err(|_| FunctionError::Host {
                op: "finding a dirty page",
                source: std::io::Error::from_raw_os_error(libc::EFAULT),
            })?;
        // SAFETY: `host..+PAGE` is the page at `addr` of this VM's RAM (a
        // page-aligned address inside one region), alive while `vm` is; no
        // vCPU runs, and `src` is the separate read-only image.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), host, PAGE) };
        pages += 1;
    }
    for (vcpu, state) in vm.vcpu_list().iter().zip(&cp.vcpus) {
        let fd = vcpu.fd()?;
        state.reset_to(&fd)?;
    }
    Ok(ResetStats {
        pages,
        ns: began.elapsed().as_nanos() as u64,
    })
}

/// [`reset_to`] the VM's checkpoint.
pub fn reset(vm: &Vm) -> Result<ResetStats> {
    with_checkpoint(vm, |cp| reset_to(vm, cp))
}

/// Gives an idle VM's private pages back to the host: it is at its checkpoint
/// (every request ends with a reset), so every page may read the image's
/// bytes again. Returns guest RAM's resident bytes afterwards.
pub fn trim(vm: &Vm) -> Result<u64> {
    with_checkpoint(vm, |cp| {
        // Pages written since the last reset (by the host, outside a request)
        // go back first, so that what the log says and what RAM holds agree.
        reset_to(vm, cp)?;
        vm.ram()
            .drop_private_pages()
            .map_err(os("dropping private pages"))?;
        cp.pristine.trim();
        vm.ram()
            .resident_bytes()
            .map_err(|source| FunctionError::Host {
                op: "mincore",
                source,
            })
            .map_err(Into::into)
    })
}
