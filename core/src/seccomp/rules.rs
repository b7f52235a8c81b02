//! THE reviewed data of the seccomp filters: which system calls each kind of
//! core thread may make, and why. Nothing else in the core decides what a
//! thread may do; `seccomp/mod.rs` only compiles these lists.
//!
//! How to review: every entry names the code path that makes the call. A
//! thread kind's list is [`RUNTIME`] (what Rust std and glibc do under the hood
//! on any thread) plus its own. A security stop naming a syscall of a legitimate
//! path means a list is incomplete: add the syscall here WITH its reason; never
//! turn the filter off by default.
//!
//! Threads spawned BY a filtered thread (a vCPU activating a virtio device
//! starts its worker) are not its children: `seccomp::spawn` hands the spawn to
//! an unfiltered spawner thread, so no list carries `clone` and a worker is
//! not bound by its spawner's list too.
//!
//! Threads that never see guest input stay unfiltered: the TS/FFI threads, the
//! spawner, and `dv-netns` (a short-lived thread that enters a network
//! namespace and opens a TAP before the VM runs).

use super::bpf::ArgCond;

/// The kinds of core thread that handle guest input, one list each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ThreadKind {
    /// `dv-vcpu-N`: KVM_RUN and the exit loop (port I/O, MMIO, hypercalls,
    /// the virtio transports, device activation and reset).
    Vcpu = 1,
    /// `dv-virtio-blk`: the block device's request queue.
    Block = 2,
    /// `dv-virtio-net`: the net device's queues and its TAP (or socket).
    Net = 3,
    /// `dv-virtio-vsock`: the vsock device's queues and its Unix sockets.
    Vsock = 4,
    /// `dv-virtio-balloon`: inflate/deflate and free page reporting.
    Balloon = 5,
    /// `dv-virtio-rng`: entropy requests.
    Rng = 6,
    /// `dv-console`: writes what the guest printed to the console's fd.
    Console = 7,
    /// Any other virtio worker (tests' workers): the common worker list.
    Worker = 8,
}

impl ThreadKind {
    /// Every kind, in declaration order.
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Vcpu,
        ThreadKind::Block,
        ThreadKind::Net,
        ThreadKind::Vsock,
        ThreadKind::Balloon,
        ThreadKind::Rng,
        ThreadKind::Console,
        ThreadKind::Worker,
    ];

    /// The name used in reports and the status JSON.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Block => "virtio-blk",
            ThreadKind::Net => "virtio-net",
            ThreadKind::Vsock => "virtio-vsock",
            ThreadKind::Balloon => "virtio-balloon",
            ThreadKind::Rng => "virtio-rng",
            ThreadKind::Console => "console",
            ThreadKind::Worker => "virtio-worker",
        }
    }

    /// The kind of a virtio worker named `name` (as given to `Worker::spawn`).
    pub fn for_worker(name: &str) -> ThreadKind {
        match name {
            "virtio-blk" => ThreadKind::Block,
            "virtio-net" => ThreadKind::Net,
            "virtio-vsock" => ThreadKind::Vsock,
            "virtio-balloon" => ThreadKind::Balloon,
            "virtio-rng" => ThreadKind::Rng,
            _ => ThreadKind::Worker,
        }
    }

    /// The kind whose discriminant is `v`.
    pub fn from_u8(v: u8) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| *k as u8 == v)
    }

    /// The lists this kind's filter allows (their union).
    pub fn lists(self) -> &'static [&'static [Rule]] {
        match self {
            ThreadKind::Vcpu => &[RUNTIME, VCPU],
            ThreadKind::Block => &[RUNTIME, WORKER, BLOCK],
            ThreadKind::Net => &[RUNTIME, WORKER, NET],
            ThreadKind::Vsock => &[RUNTIME, WORKER, VSOCK],
            ThreadKind::Balloon => &[RUNTIME, WORKER, BALLOON],
            ThreadKind::Rng => &[RUNTIME, WORKER],
            ThreadKind::Console => &[RUNTIME, CONSOLE],
            ThreadKind::Worker => &[RUNTIME, WORKER],
        }
    }
}

/// One allowed syscall.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// The syscall's name (see `syscalls.rs`).
    pub syscall: &'static str,
    /// `None`: any arguments; else any ONE of these conditions must hold.
    pub only: Option<&'static [ArgCond]>,
    /// Why this thread kind needs it: the code path that makes the call.
    pub why: &'static str,
}

const fn any(syscall: &'static str, why: &'static str) -> Rule {
    Rule {
        syscall,
        only: None,
        why,
    }
}

const fn only(syscall: &'static str, conds: &'static [ArgCond], why: &'static str) -> Rule {
    Rule {
        syscall,
        only: Some(conds),
        why,
    }
}

/// `ioctl` request (arg 1, low 32 bits) with KVM's type byte 0xAE: every KVM
/// ioctl (`KVM_RUN`, registers, irqfd/ioeventfd, dirty log...), and no other.
pub const IOCTL_KVM: ArgCond = ArgCond {
    arg: 1,
    mask: 0xFF00,
    value: 0xAE00,
};

/// `ioctl(fd, FIONBIO)`: std's `set_nonblocking` on sockets.
pub const IOCTL_FIONBIO: ArgCond = ArgCond {
    arg: 1,
    mask: u32::MAX,
    value: libc::FIONBIO as u32,
};

/// `ioctl(tap, TUNSETOFFLOAD)`: the offloads the guest's driver accepted.
pub const IOCTL_TUNSETOFFLOAD: ArgCond = ArgCond {
    arg: 1,
    mask: u32::MAX,
    value: libc::TUNSETOFFLOAD as u32,
};

/// What Rust std and glibc do on any thread, whatever it runs.
pub const RUNTIME: &[Rule] = &[
    any("futex", "Mutex, Condvar, Once, thread parking and join"),
    any(
        "write",
        "eventfd signals (irqfd, kicks), stderr messages, the SIGSYS report",
    ),
    any("close", "dropping fds (eventfds, sockets, epoll)"),
    any("mmap", "malloc arenas, dynamic TLS, large Vecs"),
    any(
        "munmap",
        "free of large blocks; the sigaltstack at thread exit",
    ),
    any("mremap", "realloc of large Vecs"),
    any(
        "madvise",
        "malloc trimming; glibc frees a dead thread's stack",
    ),
    any("mprotect", "malloc arena growth"),
    any("brk", "malloc's main arena"),
    any(
        "rt_sigprocmask",
        "glibc masks signals around thread exit and abort",
    ),
    any(
        "rt_sigreturn",
        "return from the kick (SIGRTMIN+2) and other handlers",
    ),
    any(
        "sigaltstack",
        "std removes the stack-overflow handler's stack at thread exit",
    ),
    any("sched_yield", "spin loops backing off"),
    any(
        "clock_gettime",
        "Instant::now when the vDSO falls back to the syscall",
    ),
    any("clock_nanosleep", "thread::sleep (backoff, console drain)"),
    any("nanosleep", "thread::sleep on older glibc paths"),
    any(
        "getrandom",
        "HashMap's RandomState keys, created once per thread",
    ),
    any("gettid", "pthread_kill and raise"),
    any("getpid", "pthread_kill's tgkill(getpid(), tid, sig)"),
    any("tgkill", "kicking vCPU threads (pthread_kill); abort"),
    any("exit", "the thread ends"),
    any(
        "exit_group",
        "_exit(148) after a security stop; abort's last resort",
    ),
];

/// A vCPU thread: KVM_RUN, the exit loop, and what a guest's device register
/// writes trigger synchronously (virtio activation and reset).
pub const VCPU: &[Rule] = &[
    only(
        "ioctl",
        &[IOCTL_KVM, IOCTL_TUNSETOFFLOAD, IOCTL_FIONBIO],
        "KVM_RUN and the vCPU/VM ioctls (KVM type 0xAE); TUNSETOFFLOAD when virtio-net activates or resets; FIONBIO on the vsock listener when virtio-vsock activates",
    ),
    any("read", "draining eventfds on device reset"),
    any("eventfd2", "virtio activation: a worker's stop eventfd"),
    any("epoll_create1", "virtio activation: a worker's epoll"),
    any("epoll_ctl", "virtio activation: watching the kicks"),
    any("dup", "virtio activation: EventFd::try_clone of kick/stop/interrupt eventfds"),
    any("fcntl", "virtio activation: duplicating eventfds (F_DUPFD_CLOEXEC)"),
    any("timerfd_create", "virtio-balloon activation: its statistics timer"),
    any("timerfd_settime", "virtio-balloon activation: arming that timer"),
];

/// Every virtio device worker (`virtio/worker.rs`).
pub const WORKER: &[Rule] = &[
    any("epoll_wait", "the worker's loop waits for kicks and fds"),
    any("epoll_pwait", "epoll_wait through glibc's pwait path"),
    any("read", "clearing a kick eventfd's counter"),
];

/// `virtio/block.rs`: guest reads, writes, flushes, discards.
pub const BLOCK: &[Rule] = &[
    any("preadv", "VIRTIO_BLK_T_IN into the guest's buffers"),
    any("pwritev", "VIRTIO_BLK_T_OUT from the guest's buffers"),
    any("fdatasync", "VIRTIO_BLK_T_FLUSH"),
    any(
        "fallocate",
        "DISCARD (PUNCH_HOLE) and WRITE_ZEROES (ZERO_RANGE)",
    ),
    any(
        "timerfd_settime",
        "a rate limiter's timer: re-armed when a bucket cannot pay for a request",
    ),
];

/// `virtio/net.rs`: frames between the queues and the TAP or socket.
pub const NET: &[Rule] = &[
    any("writev", "TX: one frame to the TAP"),
    any("sendto", "TX to a socket backend (send)"),
    any("recvfrom", "RX from a socket backend"),
    any(
        "timerfd_settime",
        "a rate limiter's timer: re-armed when a bucket cannot pay for a frame",
    ),
];

/// `virtio/vsock`: guest streams over the host's Unix sockets.
pub const VSOCK: &[Rule] = &[
    any("epoll_ctl", "watching connections and the listener"),
    any(
        "socket",
        "a guest connects to CID 2: a Unix socket to the host path",
    ),
    any("connect", "that socket's connect"),
    any("accept4", "a host program connects to the vsock's path"),
    any("sendto", "bytes to a connection (send, MSG_NOSIGNAL)"),
    any("recvfrom", "bytes from a connection"),
    any("shutdown", "a guest SHUTDOWN or RST"),
    only(
        "ioctl",
        &[IOCTL_FIONBIO],
        "set_nonblocking on a connection (FIONBIO)",
    ),
    any("fcntl", "O_NONBLOCK / CLOEXEC on a connection"),
    any("timerfd_settime", "arming the muxer's retry/credit timer"),
    any(
        "timerfd_gettime",
        "checking whether the muxer's timer is armed",
    ),
];

/// `virtio/balloon.rs`: returning and re-taking guest pages.
pub const BALLOON: &[Rule] = &[
    any("fallocate", "inflate: punching a memfd-backed page range"),
    any("mincore", "statistics: which guest pages are resident"),
    any("timerfd_settime", "arming the statistics polling timer"),
    any(
        "timerfd_gettime",
        "checking whether the statistics timer is armed",
    ),
];

/// `devices/console.rs`'s writer thread.
pub const CONSOLE: &[Rule] = &[any("poll", "waiting until the console's fd takes bytes")];
