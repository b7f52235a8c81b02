//! CPU virtualization policy functions of the C ABI (see the contract in
//! `abi/mod.rs`): what CPUID the guest sees and which MSRs it may touch.

use super::{bytes, guarded};
use crate::cpuid::CpuidPolicy;
use crate::handles;
use crate::msr_filter::MsrFilter;

/// Sets the VM's CPUID policy from JSON (`{"hide": [{"leaf", "subleaf",
/// "register", "bit"}]}`) and applies it to every vCPU; vCPUs created later get
/// it too. Call before the first run: KVM refuses CPUID changes after one.
///
/// # Safety
/// `json` must be valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_set_cpuid_policy(vm: u32, json: *const u8, len: usize) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        // SAFETY: per this function's contract.
        let policy = CpuidPolicy::from_json(unsafe { bytes(json, len)? })?;
        vm.set_cpuid_policy(policy)
    })
}

/// Installs an MSR filter from JSON (`{"default": "allow" | "deny", "allow":
/// [...], "deny": [...]}`). Denied accesses give the guest #GP and are counted
/// in the vCPU's metrics (`msrReadDenied`, `msrWriteDenied`).
///
/// # Safety
/// `json` must be valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_set_msr_filter(vm: u32, json: *const u8, len: usize) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        // SAFETY: per this function's contract.
        let filter = MsrFilter::from_json(unsafe { bytes(json, len)? })?;
        vm.set_msr_filter(filter)
    })
}
