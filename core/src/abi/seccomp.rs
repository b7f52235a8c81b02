//! The seccomp mode in the C ABI (see the contract in `abi/mod.rs` and
//! [`crate::seccomp`]): process-wide, read by each guest-facing thread when it
//! starts.

use super::{guarded, guarded_into, json, text};
use crate::error::Error;
use crate::seccomp;

/// Sets the seccomp mode (0 off, 1 log, 2 kill) and the deny list
/// (`deny`: syscall names or numbers separated by commas, empty for none) for
/// threads started from now on. Unknown modes or syscalls are `InvalidArgument`.
///
/// # Safety
/// `deny` must be valid for `deny_len` bytes, or null with `deny_len` 0.
#[no_mangle]
pub unsafe extern "C" fn dv_seccomp_configure(mode: u32, deny: *const u8, deny_len: usize) -> i32 {
    guarded(|| {
        // SAFETY: per this function's contract.
        let deny = unsafe { text(deny, deny_len, "seccomp deny list") }?;
        let names: Vec<&str> = deny.split(',').filter(|s| !s.trim().is_empty()).collect();
        seccomp::configure(mode, &names).map_err(|e| Error::arg(e.to_string()))
    })
}

/// Writes the seccomp state as JSON into `buf`: `{"mode":"off"|"log"|"kill",
/// "deny":[name...],"installed":{kind:N...},"failed":N}`.
///
/// # Safety
/// `buf` must be valid for `cap` writable bytes; `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_seccomp_status(buf: *mut u8, cap: usize, out_len: *mut usize) -> i32 {
    // SAFETY: per this function's contract.
    unsafe { guarded_into(buf, cap, out_len, || json(&seccomp::status())) }
}
