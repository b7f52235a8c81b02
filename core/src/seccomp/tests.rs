//! Tests of the lists and of real filters (no KVM needed): a filter is
//! installed on a spawned thread of this process with an errno action, or in
//! a child process (this test binary re-run) with the real kill path.

use super::bpf::{evaluate, AUDIT_ARCH_X86_64, RET_ALLOW, RET_ERRNO, RET_TRAP};
use super::*;

fn nr(name: &str) -> u32 {
    lookup(name).unwrap()
}

fn verdict(kind: ThreadKind, name: &str, args: [u64; 6]) -> u32 {
    let p = program(kind, Mode::Kill, &[]).unwrap().unwrap();
    evaluate(&p, AUDIT_ARCH_X86_64, nr(name), args)
}

#[test]
fn every_rule_names_a_syscall_and_gives_a_reason() {
    for kind in ThreadKind::ALL {
        for rule in kind.lists().iter().flat_map(|l| l.iter()) {
            assert!(lookup(rule.syscall).is_some(), "{}", rule.syscall);
            assert!(rule.why.len() > 8, "{} has no reason", rule.syscall);
        }
        assert!(program(kind, Mode::Log, &[]).unwrap().is_some());
        assert!(program(kind, Mode::Off, &[]).unwrap().is_none());
    }
}

#[test]
fn no_thread_may_exec_open_files_or_spawn() {
    for kind in ThreadKind::ALL {
        for name in [
            "execve",
            "execveat",
            "open",
            "openat",
            "clone",
            "clone3",
            "fork",
            "ptrace",
            "mount",
            "setns",
            "kill",
            "process_vm_writev",
            "memfd_create",
            "bpf",
        ] {
            assert_eq!(verdict(kind, name, [0; 6]), RET_TRAP, "{kind:?} {name}");
        }
    }
}

#[test]
fn vcpu_ioctls_are_kvm_ones_tunsetoffload_and_fionbio() {
    let ioctl = |req: u64| verdict(ThreadKind::Vcpu, "ioctl", [5, req, 0, 0, 0, 0]);
    assert_eq!(ioctl(0xAE80), RET_ALLOW); // KVM_RUN
    assert_eq!(ioctl(libc::TUNSETOFFLOAD), RET_ALLOW);
    assert_eq!(ioctl(libc::TUNSETIFF), RET_TRAP);
    assert_eq!(ioctl(libc::FIONBIO), RET_ALLOW);
    assert_eq!(ioctl(0x5401), RET_TRAP); // TCGETS
                                         // Among workers only vsock's sets connections nonblocking.
    let fionbio = [5, libc::FIONBIO, 0, 0, 0, 0];
    assert_eq!(verdict(ThreadKind::Vsock, "ioctl", fionbio), RET_ALLOW);
    assert_eq!(verdict(ThreadKind::Block, "ioctl", fionbio), RET_TRAP);
}

#[test]
fn the_deny_list_removes_syscalls_from_every_list() {
    let deny = [nr("pwritev"), nr("futex")];
    let p = program(ThreadKind::Block, Mode::Kill, &deny)
        .unwrap()
        .unwrap();
    assert_eq!(
        evaluate(&p, AUDIT_ARCH_X86_64, nr("pwritev"), [0; 6]),
        RET_TRAP
    );
    assert_eq!(
        evaluate(&p, AUDIT_ARCH_X86_64, nr("futex"), [0; 6]),
        RET_TRAP
    );
    assert_eq!(
        evaluate(&p, AUDIT_ARCH_X86_64, nr("preadv"), [0; 6]),
        RET_ALLOW
    );
    let log = program(ThreadKind::Block, Mode::Log, &deny)
        .unwrap()
        .unwrap();
    assert_eq!(
        evaluate(&log, AUDIT_ARCH_X86_64, nr("pwritev"), [0; 6]),
        bpf::RET_LOG
    );
}

#[test]
fn names_and_numbers_are_looked_up_both_ways() {
    assert_eq!(lookup("pwrite64"), Some(18));
    assert_eq!(lookup("18"), Some(18));
    assert_eq!(lookup("nosuchcall"), None);
    assert_eq!(lookup("9999"), None);
    assert_eq!(name_of(16), Some("ioctl"));
    assert!(matches!(configure(7, &[]), Err(SeccompError::BadMode(7))));
    assert!(matches!(
        configure(2, &["bogus"]),
        Err(SeccompError::UnknownSyscall(s)) if s == "bogus"
    ));
}

#[test]
fn a_real_filter_binds_only_its_thread() {
    // The Worker list with getppid denied, answering EPERM instead of SIGSYS.
    let spec = FilterSpec {
        allow: allow_list(ThreadKind::Worker, &[]).unwrap(),
        deny: RET_ERRNO | libc::EPERM as u32,
        bad_arch: bpf::RET_KILL_PROCESS,
    };
    let program = bpf::compile(&spec).unwrap();
    let filtered = std::thread::spawn(move || {
        install_here(ThreadKind::Worker, &program).unwrap();
        // SAFETY: plain syscalls without pointers.
        let ppid = unsafe { libc::syscall(libc::SYS_getppid) };
        let errno = io::Error::last_os_error().raw_os_error();
        // SAFETY: as above.
        (ppid, errno, unsafe { libc::gettid() })
    })
    .join()
    .unwrap();
    assert_eq!(filtered.0, -1);
    assert_eq!(filtered.1, Some(libc::EPERM));
    assert!(filtered.2 > 0, "gettid is on the list");
    // This thread is not filtered.
    // SAFETY: as above.
    assert!(unsafe { libc::getppid() } > 0);
}

/// Run as a child by `a_stray_syscall_is_a_security_stop`: a Block-kind
/// thread with getppid... not on its list makes it.
#[test]
fn security_stop_child() {
    if std::env::var_os("DV_SECCOMP_CHILD").is_none() {
        return;
    }
    configure(Mode::Kill as u32, &[]).unwrap();
    let t = spawn("dv-test".into(), ThreadKind::Block, || {
        // SAFETY: a plain syscall; the filter traps it.
        unsafe { libc::getppid() }
    })
    .unwrap();
    let _ = t.join();
    unreachable!("the filter did not stop the thread");
}

#[test]
fn a_stray_syscall_is_a_security_stop() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "seccomp::tests::security_stop_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DV_SECCOMP_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_STATUS), "{stderr}");
    assert!(
        stderr.contains(
            "denovisor: security stop: virtio-blk thread made syscall 110 (getppid), \
             not in its seccomp list; exiting"
        ),
        "{stderr}"
    );
}

#[test]
fn a_filtered_thread_spawns_through_the_spawner() {
    // An Rng-kind thread (eventfd2 is not on its list; denied with EPERM here)
    // spawns a Vcpu-kind thread, which may make eventfd2: it must not inherit
    // the Rng filter, so the spawn goes through the unfiltered spawner.
    let spec = FilterSpec {
        allow: allow_list(ThreadKind::Rng, &[]).unwrap(),
        deny: RET_ERRNO | libc::EPERM as u32,
        bad_arch: bpf::RET_KILL_PROCESS,
    };
    let program = bpf::compile(&spec).unwrap();
    spawner();
    let (own, child) = std::thread::spawn(move || {
        install_here(ThreadKind::Rng, &program).unwrap();
        // SAFETY: eventfd with integer arguments; the fds are closed below.
        let own = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        let child = spawn("dv-test-vcpu".into(), ThreadKind::Vcpu, || {
            // SAFETY: as above.
            unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) }
        })
        .unwrap()
        .join()
        .unwrap();
        (own, child)
    })
    .join()
    .unwrap();
    assert_eq!(own, -1, "the Rng filter allowed eventfd2");
    assert!(
        child >= 0,
        "the Vcpu thread was bound by its spawner's filter"
    );
    // SAFETY: closing the fd the child created.
    unsafe { libc::close(child) };
}
