//! The ABI of function VMs (see [`crate::function`]): checkpoint, reset,
//! trim, the READY buffers, and one request in one call.

use super::{bytes, bytes_mut, guarded, put, set_last_error, status, timeout};
use crate::error::{Error, Status};
use crate::function::invoke::{self, InvokeResult, Limits};
use crate::function::reset;
use crate::handles;
use crate::vcpu::panic_message;

/// Takes the checkpoint of a VM stopped at READY (every request starts
/// there); `*out_shared` = 1 when guest RAM's pristine image is the
/// snapshot's memory file (a lazily restored VM), 0 for a private copy.
///
/// # Safety
/// `out_shared` must be valid for a `u32` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_checkpoint(vm: u32, out_shared: *mut u32) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        let info = reset::checkpoint(&vm)?;
        // SAFETY: per this function's contract.
        unsafe { put(out_shared, u32::from(info.shared_image)) }
    })
}

/// Resets the VM to its checkpoint: `out[0]` = pages restored, `out[1]` = ns.
///
/// # Safety
/// `out` must be valid for two `u64` writes.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_reset(vm: u32, out: *mut u64) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        if out.is_null() {
            return Err(Error::arg("null output pointer"));
        }
        let stats = reset::reset(&vm)?;
        // SAFETY: non-null and valid for two u64s per the contract.
        unsafe {
            put(out, stats.pages)?;
            put(out.add(1), stats.ns)
        }
    })
}

/// Gives an idle checkpointed VM's private pages back to the host;
/// `*out_resident` = guest RAM's resident bytes afterwards.
///
/// # Safety
/// `out_resident` must be valid for a `u64` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_trim(vm: u32, out_resident: *mut u64) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        let resident = reset::trim(&vm)?;
        // SAFETY: per this function's contract.
        unsafe { put(out_resident, resident) }
    })
}

/// Reads and checks the READY mailbox: `out` = input, stdout, stderr
/// capacities in bytes.
///
/// # Safety
/// `out` must be valid for three `u64` writes.
#[no_mangle]
pub unsafe extern "C" fn dv_fn_ready(vm: u32, out: *mut u64) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        if out.is_null() {
            return Err(Error::arg("null output pointer"));
        }
        let ready = reset::ready(&vm)?;
        // SAFETY: non-null and valid for three u64s per the contract.
        unsafe {
            put(out, ready.input_cap)?;
            put(out.add(1), ready.stdout_cap)?;
            put(out.add(2), ready.stderr_cap)
        }
    })
}

/// Runs one request on a checkpointed VM and resets it (see
/// [`crate::function::invoke`]): the input, the limits (`timeout_ms` 0: none;
/// `memory_limit`, `output_limit` 0: the runtime's defaults), the buffers
/// stdout and stderr are copied into, and `result`, an [`InvokeResult`]
/// (`result_len` must be its size). Blocks: bound `nonblocking`. On an error
/// status, the message is in `result.reason` too.
///
/// # Safety
/// Every pointer must be valid for its length (writable for the outputs).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn dv_fn_invoke(
    vm: u32,
    input: *const u8,
    input_len: usize,
    timeout_ms: u64,
    memory_limit: u64,
    output_limit: u64,
    stdout: *mut u8,
    stdout_cap: usize,
    stderr: *mut u8,
    stderr_cap: usize,
    result: *mut u8,
    result_len: usize,
) -> i32 {
    if result.is_null() || result_len != std::mem::size_of::<InvokeResult>() {
        set_last_error(format!(
            "the result buffer must be {} bytes",
            std::mem::size_of::<InvokeResult>()
        ));
        return Status::InvalidArgument as i32;
    }
    let mut out = InvokeResult::default();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let vm = handles::vm(vm)?;
        // SAFETY: per this function's contract.
        let (input, stdout, stderr) = unsafe {
            (
                bytes(input, input_len)?,
                bytes_mut(stdout, stdout_cap)?,
                bytes_mut(stderr, stderr_cap)?,
            )
        };
        let limits = Limits {
            timeout: timeout(timeout_ms),
            memory_limit,
            output_limit,
        };
        invoke::invoke(&vm, input, &limits, stdout, stderr, &mut out)
    }))
    .unwrap_or_else(|panic| Err(Error::Panic(panic_message(&panic))));
    let code = match outcome {
        Ok(()) => Status::Ok as i32,
        Err(e) => {
            let message = e.to_string();
            out.set_reason(&message);
            set_last_error(message);
            status::status(&e) as i32
        }
    };
    // SAFETY: `result` is non-null and valid for `result_len` ==
    // size_of::<InvokeResult>() bytes per the contract (checked above); an
    // unaligned write because the caller's buffer may be a byte array.
    unsafe { result.cast::<InvokeResult>().write_unaligned(out) };
    code
}
