//! The ABI of live migration: guest pages packed into and unpacked from a
//! stream's batches, and the VM's state without its memory (see
//! [`crate::snapshot::pages`] and [`crate::snapshot::file`]).

use super::{bytes, bytes_mut, guarded, guarded_into, put, text};
use crate::dirty::DirtyBitmap;
use crate::error::Error;
use crate::handles;
use crate::memory::ram_ranges;
use crate::snapshot::file::{apply_state_bytes, encode_vm_state, host_of, HostCpu};
use crate::snapshot::pages::{pack_pages, unpack_pages};
use crate::snapshot::vm::VmState;

/// [`dv_vm_pack_pages`] flag: leave out pages that are all zero.
pub const PACK_FLAG_SKIP_ZERO: u32 = 1;

/// Packs the pages set in `bitmap` (one bit per page in RAM order, as
/// `dv_vm_take_dirty` hands out; exactly the RAM's size) from page `from` on
/// into `buf` as `[u64 index][4096 bytes]` records, as many as fit in `cap`.
/// `*out_len` is the bytes written, `*out_next` the page to continue from
/// (the RAM's page count once done).
///
/// # Safety
/// `bitmap` must be valid for `bitmap_len` bytes, `buf` for `cap` writable
/// bytes, `out_len` for a `usize` write, `out_next` for a `u64` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_pack_pages(
    vm: u32,
    bitmap: *const u8,
    bitmap_len: usize,
    from: u64,
    flags: u32,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
    out_next: *mut u64,
) -> i32 {
    guarded(|| {
        if flags & !PACK_FLAG_SKIP_ZERO != 0 {
            return Err(Error::arg(format!("unknown pack flags {flags:#x}")));
        }
        let vm = handles::vm(vm)?;
        let size = vm.ram().size();
        let mut pages = DirtyBitmap::new(&ram_ranges(size));
        // SAFETY: per this function's contract.
        let map = unsafe { bytes(bitmap, bitmap_len) }?;
        if map.len() != pages.byte_len() {
            return Err(Error::arg(format!(
                "the page bitmap is {} bytes; this VM's is {}",
                map.len(),
                pages.byte_len()
            )));
        }
        for (w, word) in map.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(word);
            let mut bits = u64::from_le_bytes(b);
            while bits != 0 {
                pages.set(w as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        // SAFETY: per this function's contract.
        let out = unsafe { bytes_mut(buf, cap) }?;
        let (n, next) = pack_pages(
            vm.ram(),
            &pages,
            from,
            flags & PACK_FLAG_SKIP_ZERO != 0,
            out,
        )?;
        // SAFETY: per this function's contract.
        unsafe {
            put(out_len, n)?;
            put(out_next, next)
        }
    })
}

/// Writes a batch of packed pages (from a peer's `dv_vm_pack_pages`) into
/// the VM's RAM; every index is checked against RAM and a bad batch is
/// refused whole (`InvalidArgument`). `*out_pages` is the pages written.
///
/// # Safety
/// `batch` must be valid for `len` bytes; `out_pages` for a `u64` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_unpack_pages(
    vm: u32,
    batch: *const u8,
    len: usize,
    out_pages: *mut u64,
) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        // SAFETY: per this function's contract.
        let input = unsafe { bytes(batch, len) }?;
        let n = unpack_pages(vm.ram(), input)?;
        // SAFETY: per this function's contract.
        unsafe { put(out_pages, n) }
    })
}

/// The `host` section (JSON) of the paused VM: this host's CPU and the
/// CPUID features its guest was given, for a migration target to check
/// before any memory moves. Fails with `Busy` unless the VM is paused.
///
/// # Safety
/// `buf` must be valid for `cap` writable bytes; `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_migration_host(
    vm: u32,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: per this function's contract.
    unsafe {
        guarded_into(buf, cap, out_len, || {
            let vm = handles::vm(vm)?;
            let state = VmState::capture(&vm)?;
            super::json(&host_of(&state))
        })
    }
}

/// Checks a `host` section (JSON from `dv_vm_migration_host`) against this
/// host: `SnapshotWrongHost` naming what differs, `SnapshotInvalid` when it
/// is malformed.
///
/// # Safety
/// `host` must be valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn dv_host_check(host: *const u8, len: usize) -> i32 {
    guarded(|| {
        // SAFETY: per this function's contract.
        let text = unsafe { bytes(host, len) }?;
        let host: HostCpu =
            serde_json::from_slice(text).map_err(|e| crate::snapshot::SnapshotError::Invalid {
                section: "host".into(),
                message: format!("malformed: {e}"),
            })?;
        host.check_current()?;
        Ok(())
    })
}

/// The paused VM's state without its memory: a state file's bytes with the
/// caller's `config` (JSON), what a migration's last frame carries.
///
/// # Safety
/// `config` must be valid for `config_len` bytes, `buf` for `cap` writable
/// bytes, `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_migration_state(
    vm: u32,
    config: *const u8,
    config_len: usize,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: per this function's contract.
    unsafe {
        guarded_into(buf, cap, out_len, || {
            let vm = handles::vm(vm)?;
            let config = text(config, config_len, "VM config")?;
            Ok(encode_vm_state(&vm, config)?)
        })
    }
}

/// Verifies state bytes from `dv_vm_migration_state` whole, and this host
/// against them, then applies them to `vm` (built with the same config, its
/// RAM holding the migrated pages, no vCPU run yet).
///
/// # Safety
/// `state` must be valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_apply_migration_state(vm: u32, state: *const u8, len: usize) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        // SAFETY: per this function's contract.
        let bytes = unsafe { bytes(state, len) }?;
        apply_state_bytes(&vm, bytes)?;
        Ok(())
    })
}
