//! The VM functions of the C ABI (see the contract in `abi/mod.rs`).

use std::sync::Arc;

use super::{
    bytes, bytes_mut, guarded, guarded_into, json, put, timeout, LOAD_FLAG_RESERVE_LOW,
    VM_FLAG_DEDUP, VM_FLAG_IRQCHIP, VM_FLAG_STOP_ON_UNHANDLED,
};
use crate::boot;
use crate::boot::elf;
use crate::error::Error;
use crate::handles::{self, Object};
use crate::vcpu::exit::UnhandledAccess;
use crate::vm::Vm;

/// Creates a VM with `mem_bytes` of RAM (`flags`: [`VM_FLAG_STOP_ON_UNHANDLED`],
/// [`VM_FLAG_IRQCHIP`], [`VM_FLAG_DEDUP`]).
///
/// # Safety
/// `out_vm` must be valid for a `u32` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_create(mem_bytes: u64, flags: u32, out_vm: *mut u32) -> i32 {
    guarded(|| {
        if flags & !(VM_FLAG_STOP_ON_UNHANDLED | VM_FLAG_IRQCHIP | VM_FLAG_DEDUP) != 0 {
            return Err(Error::arg(format!("unknown VM flags {flags:#x}")));
        }
        if out_vm.is_null() {
            return Err(Error::arg("null output pointer"));
        }
        let ram = crate::memory::GuestRam::new(mem_bytes)?;
        // SAFETY: checked non-null above; valid per the contract.
        unsafe { put(out_vm, create_with_ram(ram, flags)?) }
    })
}

/// Builds a VM around `ram` with `flags` (checked by the caller) and returns
/// its new handle.
pub(super) fn create_with_ram(
    ram: crate::memory::GuestRam,
    flags: u32,
) -> crate::error::Result<u32> {
    let unhandled = if flags & VM_FLAG_STOP_ON_UNHANDLED != 0 {
        UnhandledAccess::Stop
    } else {
        UnhandledAccess::Ignore
    };
    let vm = Arc::new(Vm::with_ram(ram, unhandled)?);
    if flags & VM_FLAG_DEDUP != 0 {
        vm.ram().set_mergeable()?;
    }
    if flags & VM_FLAG_IRQCHIP != 0 {
        vm.enable_irqchip()?;
    }
    handles::insert(Object::Vm(vm))
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
        Ok(vm.ram().write(gpa, unsafe { bytes(data, len)? })?)
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
        Ok(vm.ram().read(gpa, unsafe { bytes_mut(buf, len)? })?)
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
        boot::load_flat(vm.ram(), image, addr, flags & LOAD_FLAG_RESERVE_LOW != 0)?;
        Ok(())
    })
}

/// Streams console output to a duplicate of host fd `fd` as well as buffering
/// it (`-1`: stop streaming). A writer thread of the core writes to it: the
/// guest never waits on the fd, and output it does not take in time (1 MiB
/// queued) is dropped and counted (`dv_vm_console_stats`).
#[no_mangle]
pub extern "C" fn dv_vm_set_console_fd(vm: u32, fd: i32) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        if fd < -1 {
            return Err(Error::arg(format!("bad file descriptor {fd}")));
        }
        vm.console().set_stream_fd((fd >= 0).then_some(fd))
    })
}

/// Limits the guest's console output (bytes and writes per refill period) from
/// now on: JSON `{"bandwidth"?: {"size", "oneTimeBurst"?, "refillTimeMs"},
/// "ops"?: {...}}`; `len` 0 removes the limiter. Output over the limit is
/// dropped and counted (`rateDropped` in `dv_vm_console_stats`).
///
/// # Safety
/// `json` must be valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_set_console_rate_limiter(
    vm: u32,
    json: *const u8,
    len: usize,
) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        // SAFETY: per this function's contract.
        let json = unsafe { bytes(json, len)? };
        vm.console().set_rate_limiter_json(json)
    })
}

vm_reader!(
    /// Writes the console's cumulative counts as JSON into `buf`: `bytes` written
    /// by the guest, `captureDropped` (older bytes beyond the buffered 1 MiB),
    /// `streamDropped` (bytes the streamed fd did not take in time),
    /// `streamPending` (bytes waiting for it), `rateDropped` (bytes the console's
    /// rate limiter dropped).
    dv_vm_console_stats,
    |vm| json(&vm.console().stats())
);

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

/// Takes every vCPU of the VM out of KVM_RUN and parks it without ending its
/// run; returns once all are parked, so their registers can be read and
/// written. Waits at most a few seconds (normally microseconds).
#[no_mangle]
pub extern "C" fn dv_vm_pause(vm: u32) -> i32 {
    guarded(|| handles::vm(vm)?.pause())
}

/// Lets the VM's paused vCPUs continue their runs.
#[no_mangle]
pub extern "C" fn dv_vm_resume(vm: u32) -> i32 {
    guarded(|| {
        handles::vm(vm)?.resume();
        Ok(())
    })
}

/// Asks every vCPU of the VM to stop; a pending `dv_vm_run` returns `stopped`.
#[no_mangle]
pub extern "C" fn dv_vm_stop(vm: u32) -> i32 {
    guarded(|| {
        handles::vm(vm)?.stop();
        Ok(())
    })
}

vm_reader!(
    /// Writes the VM's per-vCPU exit metrics as a JSON array into `buf`.
    dv_vm_metrics,
    |vm| json(&vm.metrics())
);

vm_reader!(
    /// Copies the guest's last REPORT hypercall of the current or last run into
    /// `buf` (`*out_len` = 0 when the guest reported nothing).
    dv_vm_report,
    |vm| Ok(vm.report().unwrap_or_default())
);

/// A VM's guest RAM as the host holds it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct VmMemory {
    /// Guest RAM, bytes.
    size_bytes: u64,
    /// The part of it backed by host memory now (`mincore`), bytes.
    resident_bytes: u64,
}

vm_reader!(
    /// Writes the VM's guest RAM size and how much of it is resident in host
    /// memory as JSON into `buf`: `{"sizeBytes":N,"residentBytes":N}`.
    dv_vm_memory,
    |vm| {
        let ram = vm.ram();
        json(&VmMemory {
            size_bytes: ram.size(),
            resident_bytes: ram.resident_bytes().map_err(|source| Error::Io {
                op: "mincore on guest RAM",
                source,
            })?,
        })
    }
);
