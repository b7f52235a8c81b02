//! The ABI of live migration: guest pages packed into and unpacked from a
//! stream's batches, and the VM's state without its memory (see
//! [`crate::snapshot::pages`] and [`crate::snapshot::file`]).

use super::{bytes, bytes_mut, guarded, guarded_into, put, text};
use crate::dirty::DirtyBitmap;
use crate::error::Error;
use crate::handles;
use crate::memory::ram_ranges;
use crate::migration;
use crate::migration::socket::{self, Transport};
use crate::migration::wire::{write_frame, FrameKind};
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

// The migration stream in the core (see [`crate::migration`]): sockets made
// here and used by fd, whole rounds of pages sent or received per call. The
// calls that wait on the peer are bound `nonblocking` and return their error
// message in their buffer.

/// [`dv_migration_connect`] / [`dv_migration_listen`] transport: TCP, `host:port`.
pub const MIGRATION_TCP: u32 = 0;
/// [`dv_migration_connect`] / [`dv_migration_listen`] transport: a Unix socket path.
pub const MIGRATION_UNIX: u32 = 1;
/// [`dv_vm_migration_send_pages`] flag: every non-zero page of RAM (round 0)
/// instead of the pending dirty pages.
pub const MIGRATION_SEND_ALL: u32 = 1;

/// Connects to a migration target (`transport` 0: `target` is `host:port`,
/// 1: a path), waiting at most `timeout_ms` (0: the OS's limit); `*out_fd`
/// is the socket, closed with [`dv_migration_close`]. Blocks: bound
/// `nonblocking`, the error message goes to `buf`.
///
/// # Safety
/// `target` valid for `len` bytes, `buf` for `cap` writable bytes, `out_len`
/// for a `usize` write, `out_fd` for an `i32` write.
#[no_mangle]
pub unsafe extern "C" fn dv_migration_connect(
    transport: u32,
    target: *const u8,
    len: usize,
    timeout_ms: u64,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
    out_fd: *mut i32,
) -> i32 {
    // SAFETY: per this function's contract.
    unsafe {
        guarded_into(buf, cap, out_len, || {
            let target = text(target, len, "migration address")?;
            let fd = socket::connect(
                Transport::of(transport)?,
                target,
                super::timeout(timeout_ms),
            )?;
            put(out_fd, fd)?;
            Ok(Vec::new())
        })
    }
}

/// Listens for a migration source; `*out_fd` is the listener, `*out_port`
/// its TCP port (0 for a Unix socket).
///
/// # Safety
/// `target` valid for `len` bytes, `out_fd` for an `i32` write, `out_port`
/// for a `u32` write.
#[no_mangle]
pub unsafe extern "C" fn dv_migration_listen(
    transport: u32,
    target: *const u8,
    len: usize,
    out_fd: *mut i32,
    out_port: *mut u32,
) -> i32 {
    guarded(|| {
        // SAFETY: per this function's contract.
        let target = unsafe { text(target, len, "migration address") }?;
        let (fd, port) = socket::listen(Transport::of(transport)?, target)?;
        // SAFETY: per this function's contract.
        unsafe {
            put(out_fd, fd)?;
            put(out_port, u32::from(port))
        }
    })
}

/// Waits at most `timeout_ms` (0: forever) for one connection on a listener
/// from [`dv_migration_listen`]; `*out_fd` is it. Blocks (`nonblocking`).
///
/// # Safety
/// `buf` valid for `cap` writable bytes, `out_len` for a `usize` write,
/// `out_fd` for an `i32` write.
#[no_mangle]
pub unsafe extern "C" fn dv_migration_accept(
    listener: i32,
    timeout_ms: u64,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
    out_fd: *mut i32,
) -> i32 {
    // SAFETY: per this function's contract.
    unsafe {
        guarded_into(buf, cap, out_len, || {
            let fd = socket::accept(listener, super::timeout(timeout_ms))?;
            put(out_fd, fd)?;
            Ok(Vec::new())
        })
    }
}

/// Closes a socket or listener made by the calls above.
#[no_mangle]
pub extern "C" fn dv_migration_close(fd: i32) -> i32 {
    guarded(|| Ok(socket::close(fd)?))
}

/// Writes one frame of `kind` (1..=8, as `wire.ts`) with `payload` to the
/// socket, waiting at most `timeout_ms` (0: forever). Blocks (`nonblocking`).
///
/// # Safety
/// `payload` valid for `len` bytes, `buf` for `cap` writable bytes,
/// `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_migration_send_frame(
    fd: i32,
    kind: u32,
    payload: *const u8,
    len: usize,
    timeout_ms: u64,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: per this function's contract.
    unsafe {
        guarded_into(buf, cap, out_len, || {
            let kind = u8::try_from(kind)
                .ok()
                .and_then(FrameKind::of)
                .ok_or_else(|| Error::arg(format!("unknown frame kind {kind}")))?;
            let payload = bytes(payload, len)?;
            let mut s = socket::Borrowed::new(fd, super::timeout(timeout_ms))?;
            write_frame(&mut s, kind, payload)?;
            Ok(Vec::new())
        })
    }
}

/// Reads frames from the socket (each read waits at most `timeout_ms`, 0:
/// forever): every `pages` frame is checked and written into the RAM of
/// `vm` (0: no VM yet, a pages frame is refused), until the first frame of
/// another kind, whose payload goes to `buf` and kind to `*out_kind`.
/// `out_stats` receives four `u64`s: pages written, bytes read, nanoseconds
/// spent writing pages, pages frames. Blocks (`nonblocking`); on failure
/// `buf` holds the message.
///
/// # Safety
/// `buf` valid for `cap` writable bytes, `out_len` for a `usize` write,
/// `out_kind` for a `u32` write, `out_stats` for four `u64` writes.
#[no_mangle]
pub unsafe extern "C" fn dv_migration_receive(
    vm: u32,
    fd: i32,
    timeout_ms: u64,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
    out_kind: *mut u32,
    out_stats: *mut u64,
) -> i32 {
    // SAFETY: per this function's contract.
    unsafe {
        guarded_into(buf, cap, out_len, || {
            if out_stats.is_null() {
                return Err(Error::arg("null output pointer"));
            }
            let vm = if vm == 0 {
                None
            } else {
                Some(handles::vm(vm)?)
            };
            let mut s = socket::Borrowed::new(fd, super::timeout(timeout_ms))?;
            let got = migration::receive(&mut s, vm.as_ref().map(|v| v.ram()))?;
            put(out_kind, got.kind as u32)?;
            let stats = [got.pages, got.bytes, got.write_ns, got.page_frames];
            for (i, v) in stats.into_iter().enumerate() {
                put(out_stats.add(i), v)?;
            }
            Ok(got.payload)
        })
    }
}

/// Takes the VM's dirty pages (as `dv_vm_take_dirty`) into its pending set,
/// which [`dv_vm_migration_send_pages`] sends; `*out_pending` is the number
/// of pages pending. The set stays in the core: no bitmap crosses the ABI.
///
/// # Safety
/// `out_pending` must be valid for a `u64` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_migration_take_dirty(vm: u32, out_pending: *mut u64) -> i32 {
    guarded(|| {
        let v = handles::vm(vm)?;
        let n = migration::add_pending(vm, v.take_dirty_pages()?)?;
        // SAFETY: per this function's contract.
        unsafe { put(out_pending, n) }
    })
}

/// Sends one round of pages to the socket as `pages` frames of at most
/// `batch_bytes` of records: with [`MIGRATION_SEND_ALL`] every non-zero page
/// of RAM, else the pending set (emptied). Writes wait at most `timeout_ms`.
/// On success `buf` holds JSON `{pages, bytes, frames, packNs, sendNs}`.
/// Blocks (`nonblocking`); on failure `buf` holds the message.
///
/// # Safety
/// `buf` valid for `cap` writable bytes, `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_migration_send_pages(
    vm: u32,
    fd: i32,
    flags: u32,
    batch_bytes: u64,
    timeout_ms: u64,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: per this function's contract.
    unsafe {
        guarded_into(buf, cap, out_len, || {
            if flags & !MIGRATION_SEND_ALL != 0 {
                return Err(Error::arg(format!("unknown send flags {flags:#x}")));
            }
            let v = handles::vm(vm)?;
            let all = flags & MIGRATION_SEND_ALL != 0;
            let pages = if all {
                let mut every = DirtyBitmap::new(&ram_ranges(v.ram().size()));
                for i in 0..every.pages() {
                    every.set(i);
                }
                every
            } else {
                migration::take_pending(vm, v.ram())
            };
            let mut s = socket::Borrowed::new(fd, super::timeout(timeout_ms))?;
            let batch = usize::try_from(batch_bytes).unwrap_or(usize::MAX);
            let stats = migration::send_pages(v.ram(), &pages, all, batch, &mut s)?;
            super::json(&stats)
        })
    }
}

/// Forgets the VM's pending pages (the migration ended either way).
#[no_mangle]
pub extern "C" fn dv_vm_migration_end(vm: u32) -> i32 {
    guarded(|| {
        migration::end(vm);
        Ok(())
    })
}
