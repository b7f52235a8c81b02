//! A vCPU: its KVM file descriptor, the Rust thread that runs it, and the run /
//! stop / wait protocol the host drives it with.
//!
//! Each vCPU gets one long-lived thread, spawned on its first run. The host asks for
//! a run with [`Vcpu::start`], collects the result with [`Vcpu::wait_until`], and
//! stops it with [`Vcpu::request_stop`] (which kicks the thread out of KVM_RUN). The
//! thread holds the vCPU fd's mutex only while running, so register access from the
//! host while the vCPU runs is a clean `Busy` error rather than a data race.

pub mod exit;
pub mod kick;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_run, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::Serialize;

use thiserror::Error;

use crate::boot::{x86_64, BootError, EntryMode};
use crate::metrics::{ExitKind, VcpuMetrics, VcpuMetricsSnapshot};
use crate::seccomp::ThreadKind;
use crate::vm::VmShared;
use exit::{handle_exit, CrashRegisters, ExitAction, StopReason};

/// What can go wrong driving a vCPU from the host.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// Its registers are out of reach while it runs
    #[error("vCPU {0} is running; stop it before touching its registers")]
    Running(u32),
    /// A run was asked for while one is under way
    #[error("vCPU {0} is already running")]
    AlreadyRunning(u32),
    /// The vCPU was closed
    #[error("vCPU {0} is closed")]
    Closed(u32),
    /// A wait for a run that was never asked for
    #[error("vCPU {0} was never started")]
    NeverStarted(u32),
    /// The vCPU did not leave KVM_RUN after its kick
    #[error("vCPU {id} did not stop within {ms} ms of being kicked")]
    DidNotStop {
        /// Which vCPU.
        id: u32,
        /// How long it was given.
        ms: u128,
    },
    /// A KVM ioctl failed
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// The vCPU thread could not be spawned
    #[error("spawning a vCPU thread: {0}")]
    Spawn(std::io::Error),
    /// The kick signal's handler could not be installed
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(String),
    /// The entry point is not in guest RAM
    #[error("image: entry point {entry:#x} is outside guest RAM ({ram_size} bytes)")]
    EntryOutsideRam {
        /// The entry point.
        entry: u64,
        /// The RAM size.
        ram_size: u64,
    },
    /// The entry state or the boot structures were refused
    #[error(transparent)]
    Boot(#[from] BootError),
}

/// The result of a vCPU operation.
pub type Result<T> = std::result::Result<T, VcpuError>;

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { op, source }
}

/// Why the host wants a vCPU to stop (stored in an atomic the loop polls).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StopRequest {
    None = 0,
    Stop = 1,
    Timeout = 2,
}

/// The outcome of one run of a vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunResult {
    /// The vCPU's index in its VM.
    pub vcpu: u32,
    /// Why it stopped.
    #[serde(flatten)]
    pub stop: StopReason,
    /// Wall-clock nanoseconds from the start of the run to the stop.
    pub run_ns: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Thread waiting for work (or not spawned yet).
    Idle,
    /// A run was requested; the thread has not picked it up yet.
    Requested,
    /// The thread is inside the exit loop.
    Running,
    /// The vCPU is being closed; the thread leaves its loop.
    Closing,
}

struct ControlState {
    phase: Phase,
    /// Runs requested and runs finished: a wait is for `finished == started`.
    started: u64,
    finished: u64,
    last: Option<RunResult>,
    /// The vCPU thread, once it has started (for kicking).
    thread: Option<libc::pthread_t>,
    /// The thread is inside a run but parked out of KVM_RUN by a pause, with the
    /// vCPU fd unlocked (so the host may read and write its registers).
    parked: bool,
}

/// The part of a vCPU other threads use to stop it. Shared with the VM so that a
/// vCPU whose guest ends the VM can stop its siblings.
pub struct Control {
    state: Mutex<ControlState>,
    changed: Condvar,
    stop_request: AtomicU8,
    /// Set while the host wants the vCPU out of KVM_RUN without ending its run.
    pause_request: AtomicBool,
}

impl Control {
    fn new() -> Control {
        Control {
            state: Mutex::new(ControlState {
                phase: Phase::Idle,
                started: 0,
                finished: 0,
                last: None,
                thread: None,
                parked: false,
            }),
            changed: Condvar::new(),
            stop_request: AtomicU8::new(StopRequest::None as u8),
            pause_request: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        // Every critical section leaves the state consistent before anything that can
        // panic, so a poisoned lock still holds valid state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks a running vCPU to stop and kicks it out of KVM_RUN. A no-op when idle.
    pub fn request_stop(&self, why: StopRequest) {
        let state = self.lock();
        if matches!(state.phase, Phase::Requested | Phase::Running) {
            // Store before reading `thread`: a thread not yet published will see the
            // request when it polls; a published one is kicked.
            let _ = self.stop_request.compare_exchange(
                StopRequest::None as u8,
                why as u8,
                SeqCst,
                SeqCst,
            );
            if let Some(thread) = state.thread {
                kick::kick_thread(thread);
            }
            // A parked thread waits on the condvar, not in KVM_RUN.
            self.changed.notify_all();
        }
    }

    /// Asks a running vCPU to leave KVM_RUN and park until [`Control::resume`].
    /// Does not wait; see [`Control::wait_parked`].
    pub fn request_pause(&self) {
        self.pause_request.store(true, SeqCst);
        let state = self.lock();
        if matches!(state.phase, Phase::Requested | Phase::Running) {
            if let Some(thread) = state.thread {
                kick::kick_thread(thread);
            }
        }
    }

    /// Waits until the vCPU is parked or not running, up to `timeout`. Returns
    /// whether it got there.
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            let running = matches!(state.phase, Phase::Requested | Phase::Running);
            if !running || state.parked {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Lets a paused vCPU continue.
    pub fn resume(&self) {
        self.pause_request.store(false, SeqCst);
        let _state = self.lock();
        self.changed.notify_all();
    }

    /// Whether a pause is requested.
    fn pause_requested(&self) -> bool {
        self.pause_request.load(SeqCst)
    }

    /// Parks the calling vCPU thread while a pause is requested and no stop is.
    fn park(&self) {
        let mut state = self.lock();
        state.parked = true;
        self.changed.notify_all();
        while self.pause_requested() && self.pending_stop().is_none() {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.parked = false;
    }

    fn pending_stop(&self) -> Option<StopReason> {
        match self.stop_request.load(SeqCst) {
            x if x == StopRequest::Stop as u8 => Some(StopReason::Stopped),
            x if x == StopRequest::Timeout as u8 => Some(StopReason::TimedOut),
            _ => None,
        }
    }
}

/// One virtual CPU.
pub struct Vcpu {
    /// The vCPU's index in its VM (its KVM vCPU id).
    pub id: u32,
    // Field order matters: the vCPU fd closes before the VM's shared state (and its
    // guest RAM) is released, so KVM never holds a slot over unmapped memory.
    fd: Arc<Mutex<VcpuFd>>,
    control: Arc<Control>,
    thread: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<VcpuMetrics>,
    shared: Arc<VmShared>,
}

impl Vcpu {
    /// Wraps a freshly created KVM vCPU.
    pub fn new(id: u32, fd: VcpuFd, shared: Arc<VmShared>) -> Vcpu {
        Vcpu {
            id,
            fd: Arc::new(Mutex::new(fd)),
            control: Arc::new(Control::new()),
            thread: Mutex::new(None),
            metrics: Arc::new(VcpuMetrics::default()),
            shared,
        }
    }

    /// The handle other threads stop this vCPU through.
    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// Locks the vCPU fd for host access; fails while the vCPU runs.
    pub(crate) fn fd(&self) -> Result<MutexGuard<'_, VcpuFd>> {
        match self.fd.try_lock() {
            Ok(guard) => Ok(guard),
            Err(std::sync::TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => Err(VcpuError::Running(self.id)),
        }
    }

    /// Reads the general-purpose registers.
    pub fn get_regs(&self) -> Result<kvm_regs> {
        self.fd()?.get_regs().map_err(kvm("KVM_GET_REGS"))
    }

    /// Writes the general-purpose registers.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.fd()?.set_regs(regs).map_err(kvm("KVM_SET_REGS"))
    }

    /// Reads the special registers.
    pub fn get_sregs(&self) -> Result<kvm_sregs> {
        self.fd()?.get_sregs().map_err(kvm("KVM_GET_SREGS"))
    }

    /// Writes the special registers.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.fd()?.set_sregs(sregs).map_err(kvm("KVM_SET_SREGS"))
    }

    /// Sets the CPUID the guest sees (KVM_SET_CPUID2).
    pub fn set_cpuid(&self, cpuid: &kvm_bindings::CpuId) -> Result<()> {
        self.fd()?.set_cpuid2(cpuid).map_err(kvm("KVM_SET_CPUID2"))
    }

    /// Reads the FPU/SSE state.
    pub fn get_fpu(&self) -> Result<kvm_fpu> {
        self.fd()?.get_fpu().map_err(kvm("KVM_GET_FPU"))
    }

    /// Writes the FPU/SSE state.
    pub fn set_fpu(&self, fpu: &kvm_fpu) -> Result<()> {
        self.fd()?.set_fpu(fpu).map_err(kvm("KVM_SET_FPU"))
    }

    /// Prepares the CPU state (and, for the 64-bit modes, the boot structures in
    /// guest RAM) to start executing at `entry` with stack pointer `stack`.
    pub fn setup_entry(&self, mode: EntryMode, entry: u64, stack: u64) -> Result<()> {
        let fd = self.fd()?;
        let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let ram = &self.shared.ram;
        let check_entry = || {
            if ram.contains(entry, 1) {
                Ok(())
            } else {
                Err(VcpuError::EntryOutsideRam {
                    entry,
                    ram_size: ram.size(),
                })
            }
        };
        let sregs = match mode {
            EntryMode::Real => {
                let sregs = x86_64::real_mode_sregs(sregs, entry)?;
                check_entry()?;
                sregs
            }
            EntryMode::Long | EntryMode::User => {
                check_entry()?;
                x86_64::write_boot_structures(ram)?;
                x86_64::long_mode_sregs(sregs, mode)
            }
        };
        fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&x86_64::entry_regs(mode, entry, stack))
            .map_err(kvm("KVM_SET_REGS"))
    }

    /// Whether the vCPU is between runs (not running, not parked inside a
    /// run, not closed): its state is then the host's to read and write.
    pub(crate) fn is_idle(&self) -> bool {
        self.control.lock().phase == Phase::Idle
    }

    /// Whether the host asked this vCPU to pause (it is parked, or will park
    /// as soon as a run starts). With the fd locked as well, the vCPU is still.
    pub(crate) fn pause_requested(&self) -> bool {
        self.control.pause_requested()
    }

    /// How many exits this vCPU took (cheap: no snapshot of the rest).
    pub(crate) fn exit_count(&self) -> u64 {
        self.metrics.exits()
    }

    /// A snapshot of this vCPU's exit counters.
    pub fn metrics(&self) -> VcpuMetricsSnapshot {
        self.metrics.snapshot()
    }

    /// Starts one run on the vCPU thread (spawning it on first use).
    pub fn start(&self) -> Result<()> {
        let mut state = self.control.lock();
        match state.phase {
            Phase::Idle => {}
            Phase::Requested | Phase::Running => return Err(VcpuError::AlreadyRunning(self.id)),
            Phase::Closing => return Err(VcpuError::Closed(self.id)),
        }
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if thread.is_none() {
            kick::install_handler()?;
            *thread = Some(self.spawn_thread()?);
        }
        self.control
            .stop_request
            .store(StopRequest::None as u8, SeqCst);
        state.phase = Phase::Requested;
        state.started += 1;
        state.last = None;
        self.control.changed.notify_all();
        Ok(())
    }

    fn spawn_thread(&self) -> Result<JoinHandle<()>> {
        let fd = self.fd.clone();
        let control = self.control.clone();
        let metrics = self.metrics.clone();
        let shared = self.shared.clone();
        let id = self.id;
        crate::seccomp::spawn(format!("dv-vcpu-{id}"), ThreadKind::Vcpu, move || {
            vcpu_thread(id, fd, control, metrics, shared)
        })
        .map_err(VcpuError::Spawn)
    }

    /// Waits for the current run to finish, until `deadline`. Returns `None` when
    /// the deadline passes first (the vCPU keeps running).
    pub fn wait_until(&self, deadline: Option<Instant>) -> Result<Option<RunResult>> {
        let mut state = self.control.lock();
        if state.started == 0 {
            return Err(VcpuError::NeverStarted(self.id));
        }
        while state.finished != state.started {
            match deadline {
                None => {
                    state = self
                        .control
                        .changed
                        .wait(state)
                        .unwrap_or_else(|p| p.into_inner());
                }
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(None);
                    }
                    state = self
                        .control
                        .changed
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        Ok(state.last.clone())
    }

    /// Stops the vCPU if it runs and joins its thread. Idempotent.
    pub fn close(&self) {
        {
            let mut state = self.control.lock();
            if state.phase == Phase::Running {
                drop(state);
                self.control.request_stop(StopRequest::Stop);
                state = self.control.lock();
            }
            if state.phase == Phase::Requested {
                // The thread never picked this run up: finish it here so that no
                // waiter blocks on a run that will not happen.
                state.last = Some(RunResult {
                    vcpu: self.id,
                    stop: StopReason::Stopped,
                    run_ns: 0,
                });
                state.finished = state.started;
            }
            state.phase = Phase::Closing;
            self.control.changed.notify_all();
        }
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            // A panic inside the thread was already caught and reported as a run
            // result; a join error here carries nothing more.
            let _ = handle.join();
        }
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        self.close();
    }
}

/// Runs a waiting vCPU whenever a run is requested, until it is closed.
fn vcpu_thread(
    id: u32,
    fd: Arc<Mutex<VcpuFd>>,
    control: Arc<Control>,
    metrics: Arc<VcpuMetrics>,
    shared: Arc<VmShared>,
) {
    {
        let mut state = control.lock();
        // SAFETY: pthread_self has no preconditions.
        state.thread = Some(unsafe { libc::pthread_self() });
    }
    loop {
        {
            let mut state = control.lock();
            while state.phase == Phase::Idle {
                state = control
                    .changed
                    .wait(state)
                    .unwrap_or_else(|p| p.into_inner());
            }
            if state.phase == Phase::Closing {
                // Unpublish under the lock, so no kicker signals a finished thread.
                state.thread = None;
                return;
            }
            state.phase = Phase::Running;
        }
        let began = Instant::now();
        let stop = loop {
            let outcome = {
                let mut vcpu = fd.lock().unwrap_or_else(|p| p.into_inner());
                catch_unwind(AssertUnwindSafe(|| {
                    run_until_stop(&mut vcpu, &control, &metrics, &shared)
                }))
                .unwrap_or_else(|panic| {
                    LoopEnd::Stop(StopReason::Error {
                        message: format!("the vCPU loop panicked: {}", panic_message(&panic)),
                    })
                })
            };
            match outcome {
                // The fd is unlocked while parked: the host may use the registers.
                LoopEnd::Paused => control.park(),
                LoopEnd::Stop(stop) => break stop,
            }
        };
        let result = RunResult {
            vcpu: id,
            stop,
            run_ns: began.elapsed().as_nanos() as u64,
        };
        let ends_vm = result.stop.ends_vm();
        if ends_vm {
            shared.record_vm_stop(&result);
        }
        {
            let mut state = control.lock();
            state.last = Some(result);
            state.finished = state.started;
            if state.phase == Phase::Running {
                state.phase = Phase::Idle;
            }
            control.changed.notify_all();
        }
        if ends_vm {
            shared.stop_all_except(id);
        }
    }
}

/// Extracts a panic's message.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Why the exit loop returned.
enum LoopEnd {
    /// The run is over.
    Stop(StopReason),
    /// The host paused the vCPU; the run continues after a resume.
    Paused,
}

/// The exit loop: KVM_RUN, handle the exit, repeat, until something stops or
/// pauses it.
fn run_until_stop(
    vcpu: &mut VcpuFd,
    control: &Control,
    metrics: &VcpuMetrics,
    shared: &VmShared,
) -> LoopEnd {
    let _published = kick::RunPageGuard::new(vcpu.get_kvm_run());
    let run_page: *const kvm_run = vcpu.get_kvm_run();
    // A kick that landed after the previous run finished left immediate_exit set;
    // any stop meant for this run is in `stop_request`, checked below.
    vcpu.set_kvm_immediate_exit(0);
    let mut mark = Instant::now();
    // Whether the last KVM_RUN returned without an exit to handle. After an
    // I/O or MMIO exit KVM finishes the instruction (an IN's data, RIP past it)
    // only on the next KVM_RUN, so a pause first makes one run with
    // `immediate_exit` set: parked registers are then the guest's true state.
    let mut settled = true;
    loop {
        if let Some(stop) = control.pending_stop() {
            return LoopEnd::Stop(stop);
        }
        if control.pause_requested() {
            if settled {
                return LoopEnd::Paused;
            }
            vcpu.set_kvm_immediate_exit(1);
        }
        let result = vcpu.run();
        let exited = Instant::now();
        metrics.add_kvm_run_ns((exited - mark).as_nanos() as u64);
        settled = result.is_err();
        let action = match result {
            Ok(exit) => {
                let io_size = match exit {
                    // SAFETY: `run_page` is this vCPU's kvm_run mapping, alive as
                    // long as `vcpu`; after an I/O exit the kernel has filled the
                    // union's `io` member. The exit's data slice lies elsewhere in
                    // the page (at `io.data_offset`), so this byte is not aliased.
                    VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => usize::from(unsafe {
                        std::ptr::read_volatile(std::ptr::addr_of!(
                            (*run_page).__bindgen_anon_1.io.size
                        ))
                    }),
                    _ => 0,
                };
                handle_exit(exit, io_size, shared, metrics)
            }
            Err(e) if e.errno() == libc::EINTR => {
                vcpu.set_kvm_immediate_exit(0);
                metrics.count(ExitKind::Interrupted);
                ExitAction::Continue
            }
            Err(e) if e.errno() == libc::EAGAIN => ExitAction::Continue,
            Err(e) => ExitAction::Stop(StopReason::Error {
                message: format!("KVM_RUN failed: {e}"),
            }),
        };
        mark = Instant::now();
        metrics.record_handling((mark - exited).as_nanos() as u64);
        match action {
            ExitAction::Continue => {}
            ExitAction::Stop(stop) => {
                if !settled {
                    finish_pending(vcpu);
                }
                return LoopEnd::Stop(stop);
            }
            ExitAction::Crashed => {
                return LoopEnd::Stop(StopReason::Shutdown {
                    registers: crash_registers(vcpu),
                })
            }
        }
    }
}

/// Finishes what KVM left pending from the run's last exit (an I/O or MMIO
/// exit's instruction completes, RIP past it, only on the next KVM_RUN): one
/// KVM_RUN with `immediate_exit` set, which does that without entering the
/// guest. Done here, on the vCPU's own thread, at the end of a run: the
/// registers the host reads or writes between runs are then the guest's true
/// state (a checkpoint or a snapshot taken now continues after the
/// instruction, and registers written now are not moved by a stale
/// completion), and no other thread ever calls KVM_RUN on this vCPU (KVM pays
/// an RCU grace period, milliseconds, whenever that thread changes).
fn finish_pending(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    // EINTR is the expected answer; any other error shows on the next run.
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}

/// The registers worth reporting when a guest crashes (zero where unreadable).
fn crash_registers(vcpu: &VcpuFd) -> CrashRegisters {
    let r = vcpu.get_regs().unwrap_or_default();
    let s = vcpu.get_sregs().unwrap_or_default();
    let mut registers = CrashRegisters {
        rip: r.rip,
        rsp: r.rsp,
        rflags: r.rflags,
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rbp: r.rbp,
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        efer: s.efer,
        cs: s.cs.selector,
        ss: s.ss.selector,
        reset_state: false,
    };
    registers.reset_state = registers.looks_reset();
    registers
}

/// Waits for every vCPU's current run up to `timeout`; on timeout, stops them
/// (reported as `timed_out`) and waits a short grace period for them to leave.
pub fn wait_all(vcpus: &[Arc<Vcpu>], timeout: Option<Duration>) -> Result<Vec<RunResult>> {
    const STOP_GRACE: Duration = Duration::from_secs(5);
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut results = Vec::with_capacity(vcpus.len());
    for (i, vcpu) in vcpus.iter().enumerate() {
        if let Some(result) = vcpu.wait_until(deadline)? {
            results.push(result);
            continue;
        }
        for other in &vcpus[i..] {
            other.control.request_stop(StopRequest::Timeout);
        }
        let grace = Instant::now() + STOP_GRACE;
        for other in &vcpus[i..] {
            match other.wait_until(Some(grace))? {
                Some(result) => results.push(result),
                None => {
                    return Err(VcpuError::DidNotStop {
                        id: other.id,
                        ms: STOP_GRACE.as_millis(),
                    })
                }
            }
        }
        break;
    }
    Ok(results)
}
