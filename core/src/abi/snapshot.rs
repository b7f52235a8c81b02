//! The ABI of snapshots' CPU and VM state (see [`crate::snapshot`]).

use super::{bytes, guarded, guarded_into};
use crate::error::Error;
use crate::handles;
use crate::snapshot::vm::VmState;

/// Writes the KVM state of a paused VM (every vCPU, the irqchip, the PIT, the
/// KVM clock) as JSON into `buf`. Fails with `Busy` unless the VM is paused.
///
/// # Safety
/// `buf` must be valid for `cap` writable bytes; `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_snapshot_state(
    vm: u32,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: per this function's contract.
    unsafe {
        guarded_into(buf, cap, out_len, || {
            let vm = handles::vm(vm)?;
            Ok(VmState::capture(&vm)?.to_json().into_bytes())
        })
    }
}

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
        let text = std::str::from_utf8(unsafe { bytes(state, len) }?)
            .map_err(|_| Error::arg("the VM state is not UTF-8"))?;
        VmState::from_json(text)?.restore(&vm)?;
        Ok(())
    })
}
