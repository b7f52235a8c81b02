//! seccomp-BPF on every core thread that handles guest input.
//!
//! A guest is hostile, and a bug in a device model would hand it this
//! process's rights. So each vCPU thread, virtio worker and the console writer
//! installs, first thing, an allow-list filter built for its kind from
//! [`rules`] (the one reviewed file of data), compiled by [`bpf`]. The filter
//! binds only that thread (no TSYNC): the TypeScript/FFI threads are not
//! restricted.
//!
//! The mode is process-wide and read when a thread starts:
//! - [`Mode::Kill`] (default): a stray syscall raises SIGSYS
//!   (`SECCOMP_RET_TRAP`); the core's handler writes one "security stop" line
//!   to stderr and `_exit(148)`s: a thread that strays may be compromised, so
//!   the whole process stops (Firecracker does the same).
//! - [`Mode::Log`]: the call proceeds and the kernel logs it (audit type 1326).
//! - [`Mode::Off`]: no filter.
//!
//! A deny list removes syscalls from every list (to tighten further, or to
//! test the filter).

pub mod bpf;
pub mod rules;
pub mod syscalls;

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;

use libc::{c_int, c_void, siginfo_t};
use thiserror::Error;

use bpf::{Allow, ArgCond, BpfError, FilterSpec, SockFilter};
pub use rules::ThreadKind;

/// What a filter does with a syscall outside its list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Mode {
    /// No filter is installed.
    Off = 0,
    /// The call proceeds; the kernel logs it.
    Log = 1,
    /// SIGSYS: the core reports a security stop and exits with [`EXIT_STATUS`].
    Kill = 2,
}

impl Mode {
    /// The mode numbered `v` in the C ABI.
    pub fn from_u32(v: u32) -> Option<Mode> {
        [Mode::Off, Mode::Log, Mode::Kill]
            .into_iter()
            .find(|m| *m as u32 == v)
    }

    /// `"off"`, `"log"` or `"kill"`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Log => "log",
            Mode::Kill => "kill",
        }
    }
}

/// The process's exit status after a security stop (128 + SIGSYS's 20).
pub const EXIT_STATUS: c_int = 148;

/// Why a filter cannot be configured, built or installed.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// Mode {0} is not 0 (off), 1 (log) or 2 (kill)
    #[error("seccomp mode {0} is not 0 (off), 1 (log) or 2 (kill)")]
    BadMode(u32),
    /// The deny list names an unknown syscall
    #[error("the seccomp deny list names {0:?}, which is not an x86-64 syscall name or number")]
    UnknownSyscall(String),
    /// A list does not compile
    #[error("the {kind} thread's seccomp filter does not compile: {source}")]
    Compile {
        kind: &'static str,
        source: BpfError,
    },
    /// The kernel refused the filter or the SIGSYS handler
    #[error("installing the {kind} thread's seccomp filter: {op}: {source}")]
    Install {
        kind: &'static str,
        op: &'static str,
        source: io::Error,
    },
}

struct Config {
    mode: Mode,
    deny: Vec<u32>,
}

static CONFIG: RwLock<Config> = RwLock::new(Config {
    mode: Mode::Kill,
    deny: Vec::new(),
});

/// Filters installed, per [`ThreadKind`] discriminant (index 0 unused).
static INSTALLED: [AtomicU64; 9] = [const { AtomicU64::new(0) }; 9];
/// Installs that failed (the thread did not start, or ran unfiltered in log mode).
static FAILED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's kind once its filter is installed, else 0. Read by the
    /// SIGSYS handler (a `const` Cell: no lazy init, no destructor).
    static CURRENT: Cell<u8> = const { Cell::new(0) };
}

/// Sets the process-wide mode and deny list for threads started from now on
/// (threads already running keep their filter: seccomp filters cannot be
/// removed). `deny` holds syscall names or decimal numbers.
pub fn configure(mode: u32, deny: &[&str]) -> Result<(), SeccompError> {
    let mode = Mode::from_u32(mode).ok_or(SeccompError::BadMode(mode))?;
    let deny = deny
        .iter()
        .map(|s| lookup(s.trim()).ok_or_else(|| SeccompError::UnknownSyscall(s.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let mut config = CONFIG.write().unwrap_or_else(|p| p.into_inner());
    *config = Config { mode, deny };
    Ok(())
}

/// The current mode.
pub fn mode() -> Mode {
    CONFIG.read().unwrap_or_else(|p| p.into_inner()).mode
}

/// The state for the status ABI call.
#[derive(serde::Serialize)]
pub struct Status {
    /// `"off"`, `"log"` or `"kill"`.
    pub mode: &'static str,
    /// Denied syscalls by name (or number when unnamed).
    pub deny: Vec<String>,
    /// Filters installed so far, per thread kind.
    pub installed: std::collections::BTreeMap<&'static str, u64>,
    /// Installs that failed.
    pub failed: u64,
}

/// The mode, deny list and counters.
pub fn status() -> Status {
    let config = CONFIG.read().unwrap_or_else(|p| p.into_inner());
    Status {
        mode: config.mode.name(),
        deny: config
            .deny
            .iter()
            .map(|nr| name_of(*nr).map_or_else(|| nr.to_string(), str::to_string))
            .collect(),
        installed: ThreadKind::ALL
            .iter()
            .map(|k| (k.name(), INSTALLED[*k as usize].load(Ordering::Relaxed)))
            .collect(),
        failed: FAILED.load(Ordering::Relaxed),
    }
}

/// A syscall's number from its name or decimal number.
pub fn lookup(s: &str) -> Option<u32> {
    if let Ok(nr) = s.parse::<u32>() {
        return syscalls::SYSCALLS
            .iter()
            .any(|(_, n)| *n == nr)
            .then_some(nr);
    }
    syscalls::SYSCALLS
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, nr)| *nr)
}

/// A syscall's name (async-signal-safe: a scan of a static table).
pub fn name_of(nr: u32) -> Option<&'static str> {
    syscalls::SYSCALLS
        .iter()
        .find(|(_, n)| *n == nr)
        .map(|(name, _)| *name)
}

/// The allow-list of `kind` without `deny`: duplicates across its lists are
/// merged (any-arguments wins over conditions).
pub fn allow_list(kind: ThreadKind, deny: &[u32]) -> Result<Vec<Allow>, SeccompError> {
    let mut out: Vec<Allow> = Vec::new();
    for rule in kind.lists().iter().flat_map(|l| l.iter()) {
        let nr = lookup(rule.syscall).ok_or_else(|| SeccompError::Compile {
            kind: kind.name(),
            source: BpfError::BadNumber(u32::MAX),
        })?;
        if deny.contains(&nr) {
            continue;
        }
        let conds: Vec<ArgCond> = rule.only.map(<[ArgCond]>::to_vec).unwrap_or_default();
        match out.iter_mut().find(|a| a.nr == nr) {
            Some(a) if a.conds.is_empty() || conds.is_empty() => a.conds.clear(),
            Some(a) => {
                for c in conds {
                    if !a.conds.contains(&c) {
                        a.conds.push(c);
                    }
                }
            }
            None => out.push(Allow { nr, conds }),
        }
    }
    Ok(out)
}

/// The program for `kind` under `mode` (None when off).
pub fn program(
    kind: ThreadKind,
    mode: Mode,
    deny: &[u32],
) -> Result<Option<Vec<SockFilter>>, SeccompError> {
    let (deny_action, bad_arch) = match mode {
        Mode::Off => return Ok(None),
        Mode::Log => (bpf::RET_LOG, bpf::RET_LOG),
        Mode::Kill => (bpf::RET_TRAP, bpf::RET_KILL_PROCESS),
    };
    let spec = FilterSpec {
        allow: allow_list(kind, deny)?,
        deny: deny_action,
        bad_arch,
    };
    bpf::compile(&spec)
        .map(Some)
        .map_err(|source| SeccompError::Compile {
            kind: kind.name(),
            source,
        })
}

/// Installs `program` on the calling thread only.
fn install_here(kind: ThreadKind, program: &[SockFilter]) -> Result<(), SeccompError> {
    let fail = |op| {
        let source = io::Error::last_os_error();
        move || SeccompError::Install {
            kind: kind.name(),
            op,
            source,
        }
    };
    // Touch the thread-local now: the SIGSYS handler must not be the first to.
    CURRENT.with(|c| c.set(0));
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(fail("PR_SET_NO_NEW_PRIVS")());
    }
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `program`, live for the call; `SockFilter` has
    // `struct sock_filter`'s layout. Flags 0: this thread only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(fail("seccomp(SECCOMP_SET_MODE_FILTER)")());
    }
    CURRENT.with(|c| c.set(kind as u8));
    INSTALLED[kind as usize].fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Writes the security-stop line and exits. Async-signal-safe: stack buffer,
/// static tables, `write` and `_exit` only.
extern "C" fn on_sigsys(_num: c_int, info: *mut siginfo_t, _ctx: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO. For SIGSYS its
    // union holds `_sigsys { void *call_addr; int syscall; unsigned arch; }` at
    // offset 16 (after signo, errno, code and padding on 64-bit).
    let (nr, arch) = unsafe {
        let base = info as *const u8;
        (
            std::ptr::read_unaligned(base.add(24) as *const i32),
            std::ptr::read_unaligned(base.add(28) as *const u32),
        )
    };
    let kind = CURRENT
        .with(|c| ThreadKind::from_u8(c.get()))
        .map_or("core", ThreadKind::name);
    let mut msg = Msg::new();
    msg.push(b"denovisor: security stop: ");
    msg.push(kind.as_bytes());
    msg.push(b" thread made syscall ");
    msg.number(nr as i64);
    if arch != bpf::AUDIT_ARCH_X86_64 {
        msg.push(b" of a foreign architecture");
    } else if let Some(name) = u32::try_from(nr).ok().and_then(name_of) {
        msg.push(b" (");
        msg.push(name.as_bytes());
        msg.push(b")");
    }
    msg.push(b", not in its seccomp list; exiting\n");
    // SAFETY: write from a live stack buffer; _exit never returns.
    unsafe {
        libc::write(2, msg.buf.as_ptr().cast(), msg.len);
        libc::_exit(EXIT_STATUS);
    }
}

/// A fixed buffer that formats without allocating.
struct Msg {
    buf: [u8; 256],
    len: usize,
}

impl Msg {
    fn new() -> Msg {
        Msg {
            buf: [0; 256],
            len: 0,
        }
    }

    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn number(&mut self, v: i64) {
        if v < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let (mut v, mut i) = (v.unsigned_abs(), digits.len());
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Installs the SIGSYS handler once per process.
fn install_sigsys_handler() -> Result<(), SeccompError> {
    static DONE: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = DONE.get_or_init(|| {
        // SAFETY: a zeroed sigaction is valid; we fill the handler, flags and
        // an empty mask before passing it to sigaction.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            let handler: extern "C" fn(c_int, *mut siginfo_t, *mut c_void) = on_sigsys;
            sa.sa_sigaction = handler as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    });
    r.map_err(|errno| SeccompError::Install {
        kind: "any",
        op: "sigaction(SIGSYS)",
        source: io::Error::from_raw_os_error(errno),
    })
}

type Job = Box<dyn FnOnce() + Send>;

/// The unfiltered thread that spawns threads for filtered ones (a thread
/// inherits its creator's filters; a worker must have only its own).
fn spawner() -> Option<&'static Mutex<Sender<Job>>> {
    static SPAWNER: OnceLock<Option<Mutex<Sender<Job>>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("dv-spawner".into())
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })
                .ok()
                .map(|_| Mutex::new(tx))
        })
        .as_ref()
}

/// Spawns a thread named `name` that installs `kind`'s filter (per the
/// current mode) before running `f`. From a filtered thread the spawn is
/// made by the unfiltered spawner thread. In kill mode a filter that cannot
/// be installed fails the spawn (the thread never runs `f`); in log mode the
/// thread runs unfiltered and the failure is logged.
pub fn spawn<T, F>(name: String, kind: ThreadKind, f: F) -> io::Result<JoinHandle<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    if CURRENT.with(Cell::get) == 0 {
        return spawn_here(name, kind, f);
    }
    let sender = spawner().ok_or_else(|| io::Error::other("the seccomp spawner thread is gone"))?;
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(spawn_here(name, kind, f));
    });
    sender
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| io::Error::other("the seccomp spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("the seccomp spawner thread dropped a spawn"))?
}

fn spawn_here<T, F>(name: String, kind: ThreadKind, f: F) -> io::Result<JoinHandle<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (mode, program) = {
        let config = CONFIG.read().unwrap_or_else(|p| p.into_inner());
        (config.mode, program(kind, config.mode, &config.deny))
    };
    let program = program.map_err(io::Error::other)?;
    if program.is_some() {
        // Exists before any filtered thread needs it (they come after this one).
        spawner();
    }
    if mode == Mode::Kill {
        install_sigsys_handler().map_err(io::Error::other)?;
    }
    let (tx, rx) = mpsc::sync_channel::<Result<(), SeccompError>>(1);
    let handle = std::thread::Builder::new().name(name).spawn(move || {
        if let Some(program) = program {
            let installed = install_here(kind, &program);
            let failed = installed.is_err();
            let _ = tx.send(installed);
            if failed && mode == Mode::Kill {
                // Never run the thread's work unfiltered; no panic message.
                std::panic::resume_unwind(Box::new("seccomp filter not installed"));
            }
        } else {
            let _ = tx.send(Ok(()));
        }
        f()
    })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            FAILED.fetch_add(1, Ordering::Relaxed);
            eprintln!("denovisor: {e}");
            if mode == Mode::Kill {
                let _ = handle.join();
                Err(io::Error::other(e))
            } else {
                Ok(handle)
            }
        }
        Err(_) => Err(io::Error::other(format!(
            "the {} thread ended before installing its seccomp filter",
            kind.name()
        ))),
    }
}

#[cfg(test)]
mod tests;
