//! The C ABI: every symbol the TypeScript side (`src/ffi.ts`) binds.
//!
//! Contract shared by every function here:
//! - It returns an `i32` [`Status`] (0 = ok, negative = error) unless noted.
//! - It never unwinds into the caller: a panic is caught and reported as
//!   `Status::Panic`.
//! - Handles are validated on every call (see `handles`); a stale, closed or
//!   foreign handle is `Status::InvalidHandle`.
//! - Pointers come with their lengths; the caller guarantees a non-null pointer is
//!   valid for its length for the duration of the call (Deno passes typed arrays).
//!   A null pointer with a non-zero length is `Status::InvalidArgument`.
//! - Sync calls leave their error message in a thread-local read by
//!   [`dv_last_error`]. Calls made as Deno `nonblocking` run on another thread, so
//!   they write their error message into their result buffer instead.
//!
//! The ABI version changes whenever a signature or a struct layout here changes.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

/// Defines `pub unsafe extern "C" fn NAME(vm: u32, buf: *mut u8, cap: usize,
/// out_len: *mut usize) -> i32`: the one shape of every call that reads something
/// of a VM into the caller's buffer. The body sees the VM (`|vm|`) and answers the
/// bytes to write; [`guarded_into`] reports `BufferTooSmall` with the size needed,
/// and errors and panics as statuses.
macro_rules! vm_reader {
    ($(#[$attr:meta])* $name:ident, |$vm:ident| $body:expr) => {
        $(#[$attr])*
        ///
        /// # Safety
        /// `buf` must be valid for `cap` writable bytes; `out_len` for a `usize` write.
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            vm: u32,
            buf: *mut u8,
            cap: usize,
            out_len: *mut usize,
        ) -> i32 {
            // SAFETY: per this function's contract.
            unsafe {
                $crate::abi::guarded_into(buf, cap, out_len, || {
                    let $vm = $crate::handles::vm(vm)?;
                    $body
                })
            }
        }
    };
}

mod console;
mod cpu;
mod devices;
mod dirty;
mod function;
mod irq;
mod ksm;
mod linux;
mod migration;
mod seccomp;
mod snapshot;
mod status;
mod vcpu;
mod vm;

pub use console::*;
pub use cpu::*;
pub use function::*;
pub use irq::*;
pub use ksm::*;
pub use linux::*;
pub use migration::*;
pub use seccomp::*;
pub use vcpu::*;
pub use vm::*;

use crate::error::{Error, Result, Status};
use crate::handles;
use crate::vcpu::panic_message;
use crate::vm::check_kvm;

/// The version of this ABI. `src/ffi.ts` refuses a library with another version.
pub const ABI_VERSION: u32 = 7;

/// `dv_vm_create` flag: stop the VM on port I/O or MMIO no device claims.
pub const VM_FLAG_STOP_ON_UNHANDLED: u32 = 1;
/// `dv_vm_create` flag: give the VM KVM's in-kernel irqchip (PIC, IOAPIC, local
/// APICs) and PIT, with COM1 on IRQ 4. HLT then stays in KVM (see `irq.rs`).
pub const VM_FLAG_IRQCHIP: u32 = 2;
/// `dv_vm_create` flag: mark guest RAM mergeable for KSM (`MADV_MERGEABLE`), so
/// the host's ksmd may share its identical pages; fails with `KsmUnavailable`
/// on a kernel without KSM (see `ksm.rs`).
pub const VM_FLAG_DEDUP: u32 = 4;
/// Load flag: keep the image clear of the VMM's boot structures (64-bit modes).
pub const LOAD_FLAG_RESERVE_LOW: u32 = 1;

/// Register sets for `dv_vcpu_get_state` / `dv_vcpu_set_state`: KVM's own structs.
pub(crate) const STATE_REGS: u32 = 0;
pub(crate) const STATE_SREGS: u32 = 1;
pub(crate) const STATE_FPU: u32 = 2;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

pub(crate) fn set_last_error(message: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = message);
}

/// Runs `f` behind the ABI's guarantees: no unwinding, errors as codes + message.
pub(crate) fn guarded(f: impl FnOnce() -> Result<()>) -> i32 {
    let outcome = catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|panic| Err(Error::Panic(panic_message(&panic))));
    match outcome {
        Ok(()) => Status::Ok as i32,
        Err(e) => {
            let status = status::status(&e) as i32;
            set_last_error(e.to_string());
            status
        }
    }
}

/// Like [`guarded`], for calls whose result (or error message) goes to a buffer.
/// On `BufferTooSmall` `*out_len` is the size needed.
///
/// # Safety
/// `buf` must be valid for `cap` bytes and `out_len` valid for a write, or null.
pub(crate) unsafe fn guarded_into(
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
    f: impl FnOnce() -> Result<Vec<u8>>,
) -> i32 {
    let outcome = catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|panic| Err(Error::Panic(panic_message(&panic))));
    let (status, bytes) = match outcome {
        Ok(bytes) if bytes.len() <= cap => (Status::Ok, bytes),
        Ok(bytes) => {
            let need = bytes.len();
            let e = Error::BufferTooSmall { need, got: cap };
            set_last_error(e.to_string());
            if !out_len.is_null() {
                // SAFETY: the caller guarantees a non-null out_len is writable.
                unsafe { *out_len = need };
            }
            return Status::BufferTooSmall as i32;
        }
        Err(e) => {
            let message = e.to_string();
            set_last_error(message.clone());
            (status::status(&e), message.into_bytes())
        }
    };
    let n = bytes.len().min(cap);
    if !buf.is_null() && n > 0 {
        // SAFETY: the caller guarantees buf is valid for cap bytes; n <= cap.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, n) };
    }
    if !out_len.is_null() {
        // SAFETY: the caller guarantees a non-null out_len is writable.
        unsafe { *out_len = n };
    }
    status as i32
}

/// Borrows `len` bytes at `ptr`.
///
/// # Safety
/// A non-null `ptr` must be valid for reads of `len` bytes for `'a`.
pub(crate) unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> Result<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Error::arg("null buffer with a non-zero length"));
    }
    // SAFETY: non-null and valid for `len` bytes per this function's contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// Borrows `len` bytes at `ptr` as UTF-8 text; `what` names the argument in
/// the error (`the {what} is not UTF-8`).
///
/// # Safety
/// A non-null `ptr` must be valid for reads of `len` bytes for `'a`.
pub(crate) unsafe fn text<'a>(ptr: *const u8, len: usize, what: &str) -> Result<&'a str> {
    // SAFETY: per this function's contract.
    std::str::from_utf8(unsafe { bytes(ptr, len) }?)
        .map_err(|_| Error::arg(format!("the {what} is not UTF-8")))
}

/// Borrows `len` writable bytes at `ptr`.
///
/// # Safety
/// A non-null `ptr` must be valid for writes of `len` bytes for `'a`, unaliased.
pub(crate) unsafe fn bytes_mut<'a>(ptr: *mut u8, len: usize) -> Result<&'a mut [u8]> {
    if len == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() {
        return Err(Error::arg("null buffer with a non-zero length"));
    }
    // SAFETY: non-null and valid for `len` writable bytes per the contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// Writes `value` through an out pointer.
///
/// # Safety
/// A non-null `out` must be valid for a write of `T`.
pub(crate) unsafe fn put<T>(out: *mut T, value: T) -> Result<()> {
    if out.is_null() {
        return Err(Error::arg("null output pointer"));
    }
    // SAFETY: non-null and writable per the contract.
    unsafe { out.write_unaligned(value) };
    Ok(())
}

pub(crate) fn timeout(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

pub(crate) fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Panic(format!("serializing a result: {e}")))
}

/// Copies a plain-old-data KVM struct to or from a caller buffer of exactly its size.
pub(crate) fn pod_len_check<T>(len: usize, what: &str) -> Result<()> {
    let need = std::mem::size_of::<T>();
    if len != need {
        return Err(Error::arg(format!(
            "{what} buffer is {len} bytes; it must be {need}"
        )));
    }
    Ok(())
}

pub(crate) fn pod_to_bytes<T: Copy>(value: &T, out: &mut [u8]) {
    // SAFETY: T is a repr(C) KVM struct of plain integers (no padding reads are
    // observable as UB for these types: they are zero-initialized by KVM/Default),
    // and out has exactly size_of::<T>() bytes (checked by the caller).
    let src = unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    };
    out.copy_from_slice(src);
}

pub(crate) fn pod_from_bytes<T: Copy + Default>(data: &[u8]) -> T {
    let mut value = T::default();
    // SAFETY: data has exactly size_of::<T>() bytes (checked by the caller) and every
    // bit pattern is a valid value of these integer-only KVM structs.
    unsafe {
        std::ptr::copy_nonoverlapping(
            data.as_ptr(),
            (&mut value as *mut T).cast::<u8>(),
            data.len(),
        )
    };
    value
}

/// The ABI version ([`ABI_VERSION`]).
#[no_mangle]
pub extern "C" fn dv_abi_version() -> u32 {
    ABI_VERSION
}

/// Copies this thread's last error message into `buf` (up to `cap` bytes, not
/// NUL-terminated) and returns its full length.
///
/// # Safety
/// `buf` must be valid for `cap` writable bytes, or null with `cap` 0.
#[no_mangle]
pub unsafe extern "C" fn dv_last_error(buf: *mut u8, cap: usize) -> usize {
    catch_unwind(|| {
        LAST_ERROR.with(|e| {
            let e = e.borrow();
            let n = e.len().min(cap);
            if !buf.is_null() && n > 0 {
                // SAFETY: buf valid for cap >= n bytes per the contract.
                unsafe { std::ptr::copy_nonoverlapping(e.as_ptr(), buf, n) };
            }
            e.len()
        })
    })
    .unwrap_or(0)
}

/// Checks that /dev/kvm can be opened and speaks API 12.
#[no_mangle]
pub extern "C" fn dv_kvm_check() -> i32 {
    guarded(check_kvm)
}

/// How many handles are live (a leak check for tests).
#[no_mangle]
pub extern "C" fn dv_live_handles() -> u64 {
    catch_unwind(handles::live_count).unwrap_or(0) as u64
}

/// The size in bytes of a register-state struct (`kind`: 0 regs, 1 sregs, 2 fpu),
/// or -1 for an unknown kind.
#[no_mangle]
pub extern "C" fn dv_state_size(kind: u32) -> i64 {
    match kind {
        STATE_REGS => std::mem::size_of::<kvm_regs>() as i64,
        STATE_SREGS => std::mem::size_of::<kvm_sregs>() as i64,
        STATE_FPU => std::mem::size_of::<kvm_fpu>() as i64,
        _ => -1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_arguments_are_utf8_or_named_in_the_error() {
        let ok = b"/tmp/snap";
        // SAFETY: `ok` is valid for its length.
        let read = unsafe { text(ok.as_ptr(), ok.len(), "path") };
        assert_eq!(read.unwrap(), "/tmp/snap");
        let bad = [0x2f, 0xff, 0xfe];
        // SAFETY: `bad` is valid for its length.
        let e = unsafe { text(bad.as_ptr(), bad.len(), "snapshot config") }.unwrap_err();
        assert_eq!(e.to_string(), "the snapshot config is not UTF-8");
        // SAFETY: a null pointer with a non-zero length is refused before any read.
        assert!(unsafe { text(std::ptr::null(), 3, "path") }.is_err());
    }

    #[test]
    fn bad_handles_are_errors_not_crashes() {
        assert_eq!(dv_vm_close(0xdead_beef), Status::InvalidHandle as i32);
        let mut msg = [0u8; 200];
        // SAFETY: msg is a valid buffer of its length.
        let n = unsafe { dv_last_error(msg.as_mut_ptr(), msg.len()) };
        assert!(std::str::from_utf8(&msg[..n])
            .unwrap()
            .contains("not a live VM"));
        assert_eq!(dv_vm_stop(0), Status::InvalidHandle as i32);
        assert_eq!(
            dv_vcpu_setup_entry(12345, 1, 0, 0),
            Status::InvalidHandle as i32
        );
    }

    #[test]
    fn null_pointers_are_rejected() {
        // SAFETY: testing that null pointers are refused, not dereferenced.
        unsafe {
            assert_eq!(
                dv_vm_create(1 << 20, 0, std::ptr::null_mut()),
                Status::InvalidArgument as i32
            );
        }
    }

    #[test]
    fn state_sizes_match_kvm() {
        assert_eq!(dv_state_size(STATE_REGS), 144);
        assert_eq!(dv_state_size(STATE_SREGS), 312);
        assert_eq!(dv_state_size(STATE_FPU), 416);
        assert_eq!(dv_state_size(9), -1);
    }

    #[test]
    fn small_buffers_report_the_size_needed() {
        let mut need = 0usize;
        // SAFETY: a zero-capacity null buffer and a valid out pointer.
        let status =
            unsafe { guarded_into(std::ptr::null_mut(), 0, &mut need, || Ok(b"12345".to_vec())) };
        assert_eq!(status, Status::BufferTooSmall as i32);
        assert_eq!(need, 5);
    }
}
