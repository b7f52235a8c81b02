//! The vCPU functions of the C ABI (see the contract in `abi/mod.rs`).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use super::{
    bytes, bytes_mut, guarded, guarded_into, json, pod_from_bytes, pod_len_check, pod_to_bytes,
    timeout, STATE_FPU, STATE_REGS, STATE_SREGS,
};
use crate::boot::EntryMode;
use crate::error::Error;
use crate::handles;
use crate::vcpu::wait_all;

/// Runs one vCPU until it stops or `timeout_ms` passes (0: no timeout), like
/// KVM_RUN with the exit loop in between. Blocks: bind it `nonblocking`. Result
/// or error message in `buf`, as for [`dv_vm_run`].
///
/// # Safety
/// `buf` must be valid for `cap` writable bytes; `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vcpu_run(
    vcpu: u32,
    timeout_ms: u64,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: per this function's contract.
    unsafe {
        guarded_into(buf, cap, out_len, || {
            let vcpu = handles::vcpu(vcpu)?;
            vcpu.start()?;
            let mut results = wait_all(std::slice::from_ref(&vcpu), timeout(timeout_ms))?;
            json(&results.remove(0))
        })
    }
}

/// Reads a register set (`kind`: 0 `kvm_regs`, 1 `kvm_sregs`, 2 `kvm_fpu`) into
/// `buf`, whose length must be exactly `dv_state_size(kind)`.
///
/// # Safety
/// `buf` must be valid for `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn dv_vcpu_get_state(vcpu: u32, kind: u32, buf: *mut u8, len: usize) -> i32 {
    guarded(|| {
        let vcpu = handles::vcpu(vcpu)?;
        // SAFETY: per this function's contract.
        let out = unsafe { bytes_mut(buf, len)? };
        match kind {
            STATE_REGS => {
                pod_len_check::<kvm_regs>(len, "kvm_regs")?;
                pod_to_bytes(&vcpu.get_regs()?, out);
            }
            STATE_SREGS => {
                pod_len_check::<kvm_sregs>(len, "kvm_sregs")?;
                pod_to_bytes(&vcpu.get_sregs()?, out);
            }
            STATE_FPU => {
                pod_len_check::<kvm_fpu>(len, "kvm_fpu")?;
                pod_to_bytes(&vcpu.get_fpu()?, out);
            }
            _ => return Err(Error::arg(format!("unknown register set {kind}"))),
        }
        Ok(())
    })
}

/// Writes a register set (see [`dv_vcpu_get_state`]).
///
/// # Safety
/// `data` must be valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn dv_vcpu_set_state(
    vcpu: u32,
    kind: u32,
    data: *const u8,
    len: usize,
) -> i32 {
    guarded(|| {
        let vcpu = handles::vcpu(vcpu)?;
        // SAFETY: per this function's contract.
        let data = unsafe { bytes(data, len)? };
        match kind {
            STATE_REGS => {
                pod_len_check::<kvm_regs>(len, "kvm_regs")?;
                Ok(vcpu.set_regs(&pod_from_bytes(data))?)
            }
            STATE_SREGS => {
                pod_len_check::<kvm_sregs>(len, "kvm_sregs")?;
                Ok(vcpu.set_sregs(&pod_from_bytes(data))?)
            }
            STATE_FPU => {
                pod_len_check::<kvm_fpu>(len, "kvm_fpu")?;
                Ok(vcpu.set_fpu(&pod_from_bytes(data))?)
            }
            _ => Err(Error::arg(format!("unknown register set {kind}"))),
        }
    })
}

/// Sets up the vCPU to start at `entry` with stack `stack` in `mode` (0 real,
/// 1 long, 2 user). For the 64-bit modes this also writes the VMM's GDT, TSS and
/// identity page tables into guest RAM (see `boot::layout`).
#[no_mangle]
pub extern "C" fn dv_vcpu_setup_entry(vcpu: u32, mode: u32, entry: u64, stack: u64) -> i32 {
    guarded(|| {
        let vcpu = handles::vcpu(vcpu)?;
        Ok(vcpu.setup_entry(EntryMode::from_abi(mode)?, entry, stack)?)
    })
}
