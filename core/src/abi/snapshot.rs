//! The ABI of snapshots' CPU and VM state (see [`crate::snapshot`]).

use std::path::Path;

use super::{
    guarded, guarded_into, json, put, text, VM_FLAG_DEDUP, VM_FLAG_IRQCHIP,
    VM_FLAG_STOP_ON_UNHANDLED,
};
use crate::error::Error;
use crate::handles;
use crate::snapshot::file::{
    inspect, write_snapshot, DiffBase, Snapshot, SnapshotId, RESTORE_EAGER, RESTORE_LAZY,
};
use crate::snapshot::vm::VmState;

vm_reader!(
    /// Writes the KVM state of a paused VM (every vCPU, the irqchip, the PIT, the
    /// KVM clock) as JSON into `buf`. Fails with `Busy` unless the VM is paused.
    dv_vm_snapshot_state,
    |vm| Ok(VmState::capture(&vm)?.to_json().into_bytes())
);

/// Restores the JSON state `state` (from `dv_vm_snapshot_state`) into a fresh
/// VM of the same shape whose vCPUs have not run; guest memory is the caller's.
///
/// # Safety
/// `state` must be valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_restore_state(vm: u32, state: *const u8, len: usize) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        // SAFETY: per this function's contract.
        let state = unsafe { text(state, len, "VM state") }?;
        VmState::from_json(state)?.restore(&vm)?;
        Ok(())
    })
}

/// A path argument: UTF-8 bytes, not empty, no NUL.
///
/// # Safety
/// `ptr` must be valid for `len` bytes.
unsafe fn path_arg<'a>(ptr: *const u8, len: usize) -> crate::error::Result<&'a Path> {
    // SAFETY: per this function's contract.
    let text = unsafe { text(ptr, len, "snapshot path") }?;
    if text.is_empty() || text.contains('\0') {
        return Err(Error::arg("the snapshot path is empty or holds a NUL"));
    }
    Ok(Path::new(text))
}

/// Writes a snapshot of the paused VM into the directory `dir` (which must
/// not exist or be empty): its KVM and device state, `config` (opaque JSON
/// the caller needs to rebuild the VM) and guest RAM. Writes what it did
/// (JSON) into `buf`. Fails with `Busy` unless the VM is paused; a failed
/// snapshot leaves nothing at `dir`.
///
/// # Safety
/// `dir` must be valid for `dir_len` bytes, `config` for `config_len`, `buf`
/// for `cap` writable bytes, `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_snapshot_create(
    vm: u32,
    dir: *const u8,
    dir_len: usize,
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
            let dir = path_arg(dir, dir_len)?;
            let config = text(config, config_len, "snapshot config")?;
            json(&write_snapshot(&vm, dir, config, None)?)
        })
    }
}

/// `dv_vm_snapshot_create` of a diff snapshot: only the pages dirtied since
/// `parent`, which must be this VM's last snapshot (or the one it was
/// restored from, tracking started before its first run) with dirty-page
/// tracking on ever since. Refused naming the parent otherwise.
///
/// # Safety
/// `dir` must be valid for `dir_len` bytes, `parent` for `parent_len`,
/// `config` for `config_len`, `buf` for `cap` writable bytes, `out_len` for
/// a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_snapshot_diff(
    vm: u32,
    dir: *const u8,
    dir_len: usize,
    parent: *const u8,
    parent_len: usize,
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
            let dir = path_arg(dir, dir_len)?;
            let parent = path_arg(parent, parent_len)?;
            let config = text(config, config_len, "snapshot config")?;
            json(&write_snapshot(&vm, dir, config, Some(parent))?)
        })
    }
}

/// Reads and verifies the snapshot in `dir` without a VM (every section's
/// checksum, version and JSON, the memory file's size; not the memory file's
/// checksum) and writes what it holds as JSON into `buf`: header, sections,
/// host, whether this host can restore it, config, memory.
///
/// # Safety
/// `dir` must be valid for `dir_len` bytes, `buf` for `cap` writable bytes,
/// `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_snapshot_inspect(
    dir: *const u8,
    dir_len: usize,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: per this function's contract.
    unsafe {
        guarded_into(buf, cap, out_len, || {
            let dir = path_arg(dir, dir_len)?;
            json(&inspect(dir)?)
        })
    }
}

/// Creates a VM whose RAM is the snapshot's in `dir` ([`RESTORE_LAZY`]:
/// mapped copy-on-write from its memory file; [`RESTORE_EAGER`]: read and
/// checksummed), with the VM `flags` of `dv_vm_create`. The whole state file
/// is verified and the host checked first. The caller then adds the devices
/// and vCPUs of the snapshot's config and calls `dv_vm_restore_snapshot`.
///
/// # Safety
/// `dir` must be valid for `dir_len` bytes; `out_vm` for a `u32` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_create_from_snapshot(
    dir: *const u8,
    dir_len: usize,
    mode: u32,
    flags: u32,
    out_vm: *mut u32,
) -> i32 {
    guarded(|| {
        if flags & !(VM_FLAG_STOP_ON_UNHANDLED | VM_FLAG_IRQCHIP | VM_FLAG_DEDUP) != 0 {
            return Err(Error::arg(format!("unknown VM flags {flags:#x}")));
        }
        let lazy = match mode {
            RESTORE_LAZY => true,
            RESTORE_EAGER => false,
            _ => return Err(Error::arg(format!("unknown snapshot restore mode {mode}"))),
        };
        if out_vm.is_null() {
            return Err(Error::arg("null output pointer"));
        }
        // SAFETY: per this function's contract.
        let dir = unsafe { path_arg(dir, dir_len) }?;
        let snapshot = Snapshot::read(dir)?;
        snapshot.host.check_current()?;
        let ram = snapshot.guest_ram(dir, lazy)?;
        let handle = super::vm::create_with_ram(ram, flags)?;
        // SAFETY: checked non-null above; valid per the contract.
        unsafe { put(out_vm, handle) }
    })
}

/// Applies the snapshot in `dir` (verified again whole first) to `vm`, built
/// by `dv_vm_create_from_snapshot` from it with the config's devices and
/// vCPUs, none run yet: every device's state, then KVM's (vCPUs, irqchip,
/// PIT, clock). The VM's next run continues the snapshotted guest.
///
/// # Safety
/// `dir` must be valid for `dir_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_restore_snapshot(vm: u32, dir: *const u8, dir_len: usize) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        // SAFETY: per this function's contract.
        let dir = unsafe { path_arg(dir, dir_len) }?;
        let snapshot = Snapshot::read(dir)?;
        snapshot.host.check_current()?;
        snapshot.apply(&vm)?;
        // Until it runs, the VM is exactly this snapshot: a diff can start here.
        if let Ok(dir) = std::fs::canonicalize(dir) {
            vm.set_diff_base(DiffBase::Restored(SnapshotId {
                dir,
                state_crc64: snapshot.state_crc64,
            }));
        }
        Ok(())
    })
}
