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

use crate::boot::{elf, EntryMode};
use crate::error::{Error, Result, Status};
use crate::handles::{self, Object};
use crate::vcpu::exit::UnhandledAccess;
use crate::vcpu::{panic_message, wait_all};
use crate::vm::{check_kvm, Vm};
use std::sync::Arc;

/// The version of this ABI. `src/ffi.ts` refuses a library with another version.
pub const ABI_VERSION: u32 = 2;

/// `dv_vm_create` flag: stop the VM on port I/O or MMIO no device claims.
pub const VM_FLAG_STOP_ON_UNHANDLED: u32 = 1;
/// Load flag: keep the image clear of the VMM's boot structures (64-bit modes).
pub const LOAD_FLAG_RESERVE_LOW: u32 = 1;

/// Register sets for `dv_vcpu_get_state` / `dv_vcpu_set_state`: KVM's own structs.
const STATE_REGS: u32 = 0;
const STATE_SREGS: u32 = 1;
const STATE_FPU: u32 = 2;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_last_error(message: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = message);
}

/// Runs `f` behind the ABI's guarantees: no unwinding, errors as codes + message.
fn guarded(f: impl FnOnce() -> Result<()>) -> i32 {
    let outcome = catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|panic| Err(Error::Panic(panic_message(&panic))));
    match outcome {
        Ok(()) => Status::Ok as i32,
        Err(e) => {
            let status = e.status() as i32;
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
unsafe fn guarded_into(
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
            (e.status(), message.into_bytes())
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
unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> Result<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Error::arg("null buffer with a non-zero length"));
    }
    // SAFETY: non-null and valid for `len` bytes per this function's contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// Borrows `len` writable bytes at `ptr`.
///
/// # Safety
/// A non-null `ptr` must be valid for writes of `len` bytes for `'a`, unaliased.
unsafe fn bytes_mut<'a>(ptr: *mut u8, len: usize) -> Result<&'a mut [u8]> {
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
unsafe fn put<T>(out: *mut T, value: T) -> Result<()> {
    if out.is_null() {
        return Err(Error::arg("null output pointer"));
    }
    // SAFETY: non-null and writable per the contract.
    unsafe { out.write_unaligned(value) };
    Ok(())
}

fn timeout(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Panic(format!("serializing a result: {e}")))
}

/// Copies a plain-old-data KVM struct to or from a caller buffer of exactly its size.
fn pod_len_check<T>(len: usize, what: &str) -> Result<()> {
    let need = std::mem::size_of::<T>();
    if len != need {
        return Err(Error::arg(format!(
            "{what} buffer is {len} bytes; it must be {need}"
        )));
    }
    Ok(())
}

fn pod_to_bytes<T: Copy>(value: &T, out: &mut [u8]) {
    // SAFETY: T is a repr(C) KVM struct of plain integers (no padding reads are
    // observable as UB for these types: they are zero-initialized by KVM/Default),
    // and out has exactly size_of::<T>() bytes (checked by the caller).
    let src = unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    };
    out.copy_from_slice(src);
}

fn pod_from_bytes<T: Copy + Default>(data: &[u8]) -> T {
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

/// Creates a VM with `mem_bytes` of RAM (`flags`: [`VM_FLAG_STOP_ON_UNHANDLED`]).
///
/// # Safety
/// `out_vm` must be valid for a `u32` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_create(mem_bytes: u64, flags: u32, out_vm: *mut u32) -> i32 {
    guarded(|| {
        if flags & !VM_FLAG_STOP_ON_UNHANDLED != 0 {
            return Err(Error::arg(format!("unknown VM flags {flags:#x}")));
        }
        if out_vm.is_null() {
            return Err(Error::arg("null output pointer"));
        }
        let unhandled = if flags & VM_FLAG_STOP_ON_UNHANDLED != 0 {
            UnhandledAccess::Stop
        } else {
            UnhandledAccess::Ignore
        };
        let vm = Arc::new(Vm::new(mem_bytes, unhandled)?);
        let handle = handles::insert(Object::Vm(vm))?;
        // SAFETY: checked non-null above; valid per the contract.
        unsafe { put(out_vm, handle) }
    })
}

/// Stops the VM, joins its vCPU threads and invalidates its handle and the handles
/// of its vCPUs. Memory and fds are freed once no call is using the VM.
#[no_mangle]
pub extern "C" fn dv_vm_close(vm: u32) -> i32 {
    guarded(|| {
        let Object::Vm(vm) = handles::remove(vm, "VM")? else {
            return Err(Error::arg("handle kind mismatch"));
        };
        vm.close();
        handles::remove_vcpus_of(&vm);
        Ok(())
    })
}

/// Creates the VM's next vCPU.
///
/// # Safety
/// `out_vcpu` must be valid for a `u32` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_create_vcpu(vm: u32, out_vcpu: *mut u32) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        if out_vcpu.is_null() {
            return Err(Error::arg("null output pointer"));
        }
        let vcpu = vm.create_vcpu()?;
        let handle = handles::insert_vcpu(&vm, vcpu)?;
        // SAFETY: checked non-null above; valid per the contract.
        unsafe { put(out_vcpu, handle) }
    })
}

/// Copies `len` bytes from `data` into guest RAM at guest-physical `gpa`.
///
/// # Safety
/// `data` must be valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_write_memory(vm: u32, gpa: u64, data: *const u8, len: usize) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        // SAFETY: per this function's contract.
        vm.ram().write(gpa, unsafe { bytes(data, len)? })
    })
}

/// Copies `len` bytes of guest RAM at `gpa` into `buf`.
///
/// # Safety
/// `buf` must be valid for `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_read_memory(vm: u32, gpa: u64, buf: *mut u8, len: usize) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        // SAFETY: per this function's contract.
        vm.ram().read(gpa, unsafe { bytes_mut(buf, len)? })
    })
}

/// Loads a static ELF64 x86-64 image; writes its entry point to `out_entry`.
/// `flags`: [`LOAD_FLAG_RESERVE_LOW`]. Nothing is written on error.
///
/// # Safety
/// `data` must be valid for `len` bytes; `out_entry` for a `u64` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_load_elf(
    vm: u32,
    data: *const u8,
    len: usize,
    flags: u32,
    out_entry: *mut u64,
) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        if out_entry.is_null() {
            return Err(Error::arg("null output pointer"));
        }
        // SAFETY: per this function's contract.
        let image = unsafe { bytes(data, len)? };
        let entry = elf::load(vm.ram(), image, flags & LOAD_FLAG_RESERVE_LOW != 0)?;
        // SAFETY: checked non-null above; valid per the contract.
        unsafe { put(out_entry, entry) }
    })
}

/// Loads a flat binary at guest-physical `addr` after checking it fits.
///
/// # Safety
/// `data` must be valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_load_flat(
    vm: u32,
    data: *const u8,
    len: usize,
    addr: u64,
    flags: u32,
) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        // SAFETY: per this function's contract.
        let image = unsafe { bytes(data, len)? };
        if image.is_empty() {
            return Err(Error::Image("the image is empty".into()));
        }
        elf::check_placement(
            vm.ram(),
            "the image",
            addr,
            len as u64,
            flags & LOAD_FLAG_RESERVE_LOW != 0,
        )?;
        vm.ram().write(addr, image)
    })
}

/// Streams console output to host fd `fd` as well as buffering it (`-1`: stop
/// streaming). The caller keeps the fd open while it is set.
#[no_mangle]
pub extern "C" fn dv_vm_set_console_fd(vm: u32, fd: i32) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        if fd < -1 {
            return Err(Error::arg(format!("bad file descriptor {fd}")));
        }
        let mut out = vm.console().0.lock().unwrap_or_else(|p| p.into_inner());
        out.set_stream_fd((fd >= 0).then_some(fd));
        Ok(())
    })
}

/// Moves up to `cap` bytes of buffered console output into `buf`; `*out_len` is
/// how many. Call until it returns 0 bytes to drain everything.
///
/// # Safety
/// `buf` must be valid for `cap` writable bytes; `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_console_take(
    vm: u32,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        // SAFETY: per this function's contract.
        let dst = unsafe { bytes_mut(buf, cap)? };
        let n = vm
            .console()
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_into(dst);
        // SAFETY: per this function's contract.
        unsafe { put(out_len, n) }
    })
}

/// Runs every vCPU of the VM until the VM stops or `timeout_ms` passes (0: no
/// timeout). Blocks: bind it `nonblocking`. On success `buf` holds the run result
/// as JSON; on error it holds the error message. `*out_len` is its length.
///
/// # Safety
/// `buf` must be valid for `cap` writable bytes; `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_run(
    vm: u32,
    timeout_ms: u64,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: per this function's contract.
    unsafe {
        guarded_into(buf, cap, out_len, || {
            let vm = handles::vm(vm)?;
            json(&vm.run(timeout(timeout_ms))?)
        })
    }
}

/// Asks every vCPU of the VM to stop; a pending `dv_vm_run` returns `stopped`.
#[no_mangle]
pub extern "C" fn dv_vm_stop(vm: u32) -> i32 {
    guarded(|| {
        handles::vm(vm)?.stop();
        Ok(())
    })
}

/// Writes the VM's per-vCPU exit metrics as a JSON array into `buf`.
///
/// # Safety
/// `buf` must be valid for `cap` writable bytes; `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_metrics(
    vm: u32,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: per this function's contract.
    unsafe { guarded_into(buf, cap, out_len, || json(&handles::vm(vm)?.metrics())) }
}

/// Copies the guest's last REPORT hypercall of the current or last run into
/// `buf` (`*out_len` = 0 when the guest reported nothing).
///
/// # Safety
/// `buf` must be valid for `cap` writable bytes; `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_report(
    vm: u32,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: per this function's contract.
    unsafe {
        guarded_into(buf, cap, out_len, || {
            Ok(handles::vm(vm)?.report().unwrap_or_default())
        })
    }
}

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
                vcpu.set_regs(&pod_from_bytes(data))
            }
            STATE_SREGS => {
                pod_len_check::<kvm_sregs>(len, "kvm_sregs")?;
                vcpu.set_sregs(&pod_from_bytes(data))
            }
            STATE_FPU => {
                pod_len_check::<kvm_fpu>(len, "kvm_fpu")?;
                vcpu.set_fpu(&pod_from_bytes(data))
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
        vcpu.setup_entry(EntryMode::from_abi(mode)?, entry, stack)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
