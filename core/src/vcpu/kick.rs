//! Getting a vCPU thread out of KVM_RUN from another thread.
//!
//! The kicker sends a real-time signal to the vCPU thread. The handler sets
//! `immediate_exit` in that thread's `kvm_run` page, so whether the signal lands
//! while the thread is inside KVM_RUN (the ioctl returns EINTR) or just before it
//! enters (the ioctl returns EINTR at once), the loop gets control back and checks
//! its stop request. This is the scheme Firecracker and Cloud Hypervisor use.

use std::cell::Cell;
use std::ptr;
use std::sync::OnceLock;

use kvm_bindings::kvm_run;
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::{Result, VcpuError};

/// Offset of the kick signal from SIGRTMIN (Firecracker uses SIGRTMIN + 0; a
/// different offset keeps both usable in one process).
const KICK_SIGNAL_OFFSET: c_int = 2;

thread_local! {
    /// The `kvm_run` page of the vCPU this thread is running, or null.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn on_kick(_num: c_int, _info: *mut siginfo_t, _ctx: *mut c_void) {
    let run = KVM_RUN.with(|cell| cell.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, published by
        // `RunPageGuard` for exactly as long as the mapping is alive and the vCPU is
        // owned by this thread; a volatile byte store is async-signal-safe.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.to_string()))
        .clone()
        .map_err(VcpuError::KickHandler)
}

/// Publishes a `kvm_run` page to this thread's kick handler while alive.
pub struct RunPageGuard;

impl RunPageGuard {
    /// Publishes `run`. The caller keeps the mapping alive until the guard drops.
    pub fn new(run: *mut kvm_run) -> RunPageGuard {
        KVM_RUN.with(|cell| cell.set(run));
        RunPageGuard
    }
}

impl Drop for RunPageGuard {
    fn drop(&mut self) {
        KVM_RUN.with(|cell| cell.set(ptr::null_mut()));
    }
}

/// Sends the kick signal to `thread`.
pub fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: `thread` belongs to a vCPU thread that has not been joined yet (the
    // caller holds the vCPU's control lock, and joining happens only after the
    // thread left its loop under that lock), so the id is valid.
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}
