//! The interrupt functions of the C ABI (see the contract in `abi/mod.rs`): raising
//! interrupts in a VM created with [`super::VM_FLAG_IRQCHIP`], and reading the
//! host's and the guest's interrupt counters.

use super::{guarded, json, put};
use crate::error::Error;
use crate::handles;

/// Raises one edge on interrupt line `line` (GSI 0-23: the IOAPIC pin, and for
/// 0-15 also the PIC input, of that number). Fails with `InvalidArgument` when the
/// VM has no irqchip or the line does not exist.
#[no_mangle]
pub extern "C" fn dv_vm_inject_irq(vm: u32, line: u32) -> i32 {
    guarded(|| handles::vm(vm)?.inject_irq(line))
}

/// Sends a message-signalled interrupt: `address` in `0xfee00000-0xfeefffff`
/// (bits 12-19: destination APIC id), `data` bits 0-7 the vector. `*out_delivered`
/// is 1 when a local APIC accepted it, 0 when none did (e.g. software-disabled).
///
/// # Safety
/// `out_delivered` must be valid for a `u32` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_send_msi(
    vm: u32,
    address: u64,
    data: u32,
    out_delivered: *mut u32,
) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        if out_delivered.is_null() {
            return Err(Error::arg("null output pointer"));
        }
        let delivered = vm.send_msi(address, data)?;
        // SAFETY: checked non-null above; valid per the contract.
        unsafe { put(out_delivered, delivered as u32) }
    })
}

vm_reader!(
    /// Writes the host's interrupt counters as JSON into `buf`:
    /// `{"irqchip":true,"injected":N,"msis":N,"msisRefused":N,"serial":N}`.
    dv_vm_irq_stats,
    |vm| json(&vm.irq_stats())
);

vm_reader!(
    /// Copies the guest's interrupt counters (published with the IRQ_COUNTERS
    /// hypercall) into `buf` as little-endian `u64`s indexed by vector; `*out_len` is
    /// their size in bytes (0 when the guest published none). Reads guest RAM only:
    /// works while the VM runs and costs the guest nothing.
    dv_vm_guest_irq_counters,
    |vm| {
        let counts = vm.guest_irq_counters();
        Ok(counts.iter().flat_map(|c| c.to_le_bytes()).collect())
    }
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Status;

    #[test]
    fn bad_handles_are_errors() {
        assert_eq!(dv_vm_inject_irq(0xdead, 4), Status::InvalidHandle as i32);
        let mut delivered = 0u32;
        // SAFETY: a valid out pointer.
        let status = unsafe { dv_vm_send_msi(0xdead, 0xfee0_0000, 0x30, &mut delivered) };
        assert_eq!(status, Status::InvalidHandle as i32);
    }
}
