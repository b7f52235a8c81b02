//! The console-input function of the C ABI (see the contract in `abi/mod.rs`).

use super::{bytes, guarded};
use crate::handles;

/// Queues `len` bytes for the guest on COM1's receive side (the UART's FIFO,
/// refilled as the guest reads; IRQ 4 when the guest enabled it and the VM has an
/// irqchip). Fails with `Busy`, queueing nothing, when more than 1 MiB would be
/// waiting.
///
/// # Safety
/// `data` must be valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_console_input(vm: u32, data: *const u8, len: usize) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        // SAFETY: per this function's contract.
        vm.console_input(unsafe { bytes(data, len)? })
    })
}
