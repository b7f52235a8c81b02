//! One request to a function VM, in one call: write the input and the
//! per-request mailbox fields, run the vCPU to the runtime's EXIT hypercall
//! (or the time limit, or a crash), read and check the mailbox, copy the
//! output out, and reset the VM to its checkpoint, always.

use std::time::Duration;

use crate::error::Result;
use crate::vcpu::exit::StopReason;
use crate::vm::Vm;

use super::abi::{mb, MAILBOX_ADDR};
use super::mailbox;
use super::reset::{read_mailbox, reset_to, with_checkpoint};
use super::FunctionError;

/// How an invocation ended, seen from the host (`InvokeResult.status`).
pub mod status {
    /// The runtime reported DONE with a valid mailbox.
    pub const DONE: u32 = 0;
    /// The time limit ran out: the vCPU was kicked out.
    pub const TIMEOUT: u32 = 1;
    /// The guest crashed (triple fault, an exit the VMM does not serve...).
    pub const CRASHED: u32 = 2;
    /// The host stopped the VM meanwhile.
    pub const STOPPED: u32 = 3;
    /// The runtime broke the mailbox protocol.
    pub const PROTOCOL_ERROR: u32 = 4;
    /// The input is larger than the runtime's input buffer (nothing ran).
    pub const INPUT_TOO_LARGE: u32 = 5;
}

/// `InvokeResult.outcome` when there is none (the status is not DONE).
pub const NO_OUTCOME: u32 = u32::MAX;
/// Bytes of `InvokeResult.reason`.
pub const REASON_MAX: usize = 512;
/// Entries of `InvokeResult.enosys`.
pub const ENOSYS_ENTRIES: usize = super::abi::ENOSYS_MAX as usize;

/// What one invocation did: the fixed-layout struct `dv_fn_invoke` fills.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct InvokeResult {
    /// One of [`status`].
    pub status: u32,
    /// One of the function ABI's outcomes, or [`NO_OUTCOME`].
    pub outcome: u32,
    /// The program's exit status (or the signal).
    pub exit_status: i64,
    /// Bytes of stdout copied into the caller's buffer.
    pub stdout_len: u64,
    /// Bytes of stderr copied into the caller's buffer.
    pub stderr_len: u64,
    /// Time the guest ran, ns.
    pub run_ns: u64,
    /// Time the reset took, ns.
    pub reset_ns: u64,
    /// Pages the reset restored.
    pub reset_pages: u64,
    /// VM exits during the run.
    pub exits: u64,
    /// System calls the runtime served.
    pub syscalls: u64,
    /// Peak brk + mmap bytes.
    pub memory_used: u64,
    /// Entries of `enosys` used.
    pub enosys_count: u32,
    /// Bytes of `reason` used.
    pub reason_len: u32,
    /// `{nr, count}` pairs.
    pub enosys: [u32; ENOSYS_ENTRIES * 2],
    /// Why, for anything but a clean exit (UTF-8, not NUL-terminated); the
    /// error message when the call fails.
    pub reason: [u8; REASON_MAX],
}

impl Default for InvokeResult {
    fn default() -> InvokeResult {
        InvokeResult {
            status: status::DONE,
            outcome: NO_OUTCOME,
            exit_status: 0,
            stdout_len: 0,
            stderr_len: 0,
            run_ns: 0,
            reset_ns: 0,
            reset_pages: 0,
            exits: 0,
            syscalls: 0,
            memory_used: 0,
            enosys_count: 0,
            reason_len: 0,
            enosys: [0; ENOSYS_ENTRIES * 2],
            reason: [0; REASON_MAX],
        }
    }
}

impl InvokeResult {
    /// Sets the reason, cut at [`REASON_MAX`] bytes on a character boundary.
    pub fn set_reason(&mut self, text: &str) {
        let mut n = text.len().min(REASON_MAX);
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        self.reason[..n].copy_from_slice(&text.as_bytes()[..n]);
        self.reason_len = n as u32;
    }
}

/// Per-request limits.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// Wall-clock limit of the run (None: none).
    pub timeout: Option<Duration>,
    /// brk + mmap bytes (0: all free RAM).
    pub memory_limit: u64,
    /// stdout + stderr bytes (0: the capacities).
    pub output_limit: u64,
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000) + ts.tv_nsec as u64
}

fn random_seed() -> std::result::Result<[u8; 32], FunctionError> {
    let mut seed = [0u8; 32];
    // SAFETY: getrandom writes at most 32 bytes into `seed`.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if n != 32 {
        return Err(FunctionError::Host {
            op: "getrandom",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(seed)
}

/// A stop reason in a few words, for `reason`.
fn describe(stop: &StopReason) -> String {
    serde_json::to_string(stop).unwrap_or_else(|_| format!("{stop:?}"))
}

fn total_exits(vm: &Vm) -> u64 {
    vm.vcpu_list().iter().map(|v| v.exit_count()).sum()
}

/// Runs one request (see the module doc). The VM must be checkpointed and
/// idle. `stdout` / `stderr` receive at most their lengths. An `Err` is a
/// failure of the host (the VM could not be run or reset), never the guest's.
pub fn invoke(
    vm: &Vm,
    input: &[u8],
    limits: &Limits,
    stdout: &mut [u8],
    stderr: &mut [u8],
    out: &mut InvokeResult,
) -> Result<()> {
    *out = InvokeResult::default();
    with_checkpoint(vm, |cp| {
        let ready = cp.ready;
        if input.len() as u64 > ready.input_cap {
            out.status = status::INPUT_TOO_LARGE;
            out.set_reason(&format!(
                "the input is {} bytes; the function takes at most {}",
                input.len(),
                ready.input_cap
            ));
            return Ok(());
        }
        let ram = vm.ram();
        let mut state = [0u8; 4];
        ram.read(MAILBOX_ADDR + mb::STATE, &mut state)?;
        if u32::from_le_bytes(state) != super::abi::state::READY {
            // Not at the checkpoint (written by the host since?): go back first.
            reset_to(vm, cp)?;
        }
        let seed = random_seed()?;
        ram.write(ready.input_addr, input)?;
        let mut fields = [0u8; 64];
        let put = |f: &mut [u8; 64], at: u64, v: u64| {
            let o = (at - mb::INPUT_LEN) as usize;
            f[o..o + 8].copy_from_slice(&v.to_le_bytes());
        };
        // INPUT_LEN..OUTPUT_LIMIT+8 is not contiguous (stdout fields between):
        // write the two runs separately.
        put(&mut fields, mb::INPUT_LEN, input.len() as u64);
        ram.write(MAILBOX_ADDR + mb::INPUT_LEN, &fields[..8])?;
        let mut per = [0u8; (mb::SEED + 32 - mb::MEMORY_LIMIT) as usize];
        let mut at = |off: u64, bytes: &[u8]| {
            let o = (off - mb::MEMORY_LIMIT) as usize;
            per[o..o + bytes.len()].copy_from_slice(bytes);
        };
        at(mb::MEMORY_LIMIT, &limits.memory_limit.to_le_bytes());
        at(mb::OUTPUT_LIMIT, &limits.output_limit.to_le_bytes());
        at(
            mb::REALTIME_NS,
            &clock_ns(libc::CLOCK_REALTIME).to_le_bytes(),
        );
        at(
            mb::MONOTONIC_NS,
            &clock_ns(libc::CLOCK_MONOTONIC).to_le_bytes(),
        );
        at(mb::SEED, &seed);
        ram.write(MAILBOX_ADDR + mb::MEMORY_LIMIT, &per)?;

        let exits_before = total_exits(vm);
        let run = vm.run(limits.timeout);
        out.exits = total_exits(vm).saturating_sub(exits_before);
        let outcome = run.map(|result| {
            out.run_ns = result.run_ns;
            match &result.stop {
                StopReason::GuestExit { .. } => match read_mailbox(vm) {
                    Ok(page) => match mailbox::parse_done(&page, &ready) {
                        Ok(done) => {
                            out.status = status::DONE;
                            out.outcome = done.outcome;
                            out.exit_status = done.exit_status;
                            out.syscalls = done.syscalls;
                            out.memory_used = done.memory_used;
                            out.enosys_count = done.enosys.len() as u32;
                            for (i, (nr, count)) in done.enosys.iter().enumerate() {
                                out.enosys[2 * i] = *nr;
                                out.enosys[2 * i + 1] = *count;
                            }
                            if !done.message.is_empty() {
                                out.set_reason(&done.message);
                            }
                            Some(done)
                        }
                        Err(e) => {
                            out.status = status::PROTOCOL_ERROR;
                            out.set_reason(&e.to_string());
                            None
                        }
                    },
                    Err(e) => {
                        out.status = status::PROTOCOL_ERROR;
                        out.set_reason(&e.to_string());
                        None
                    }
                },
                StopReason::TimedOut => {
                    out.status = status::TIMEOUT;
                    out.set_reason("the time limit ran out");
                    None
                }
                StopReason::Stopped => {
                    out.status = status::STOPPED;
                    out.set_reason("the VM was stopped");
                    None
                }
                other => {
                    out.status = status::CRASHED;
                    out.set_reason(&describe(other));
                    None
                }
            }
        });
        if let Ok(Some(done)) = &outcome {
            let copy = |addr: u64, len: u64, buf: &mut [u8]| -> Result<u64> {
                let n = (len as usize).min(buf.len());
                ram.read(addr, &mut buf[..n])?;
                Ok(n as u64)
            };
            out.stdout_len = copy(ready.stdout_addr, done.stdout_len, stdout)?;
            out.stderr_len = copy(ready.stderr_addr, done.stderr_len, stderr)?;
        }
        // Always back to the checkpoint, whatever happened.
        let stats = reset_to(vm, cp)?;
        out.reset_ns = stats.ns;
        out.reset_pages = stats.pages;
        outcome.map(|_| ())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::layout::DEFAULT_LONG_LOAD_ADDR;
    use crate::boot::EntryMode;
    use crate::vcpu::exit::UnhandledAccess;
    use crate::vm::check_kvm;

    /// Fills the mailbox (input 0x30000, stdout 0x31000, stderr 0x32000, 4 KiB
    /// each), READY, EXIT; per request: increments the byte at 0x150000 (a
    /// far page), outputs it as stdout (1 byte), DONE, EXIT. GNU as, .code64:
    /// ```text
    /// mov $0x20000, %ebx
    /// movl $0x4e465644, 0(%rbx)
    /// movl $1, 4(%rbx)
    /// movq $0x30000, 16(%rbx)
    /// movq $0x1000, 24(%rbx)
    /// movq $0x31000, 40(%rbx)
    /// movq $0x1000, 48(%rbx)
    /// movq $0x32000, 64(%rbx)
    /// movq $0x1000, 72(%rbx)
    /// movl $1, 8(%rbx)
    /// movl $2, 0x33000
    /// movq $0, 0x33008
    /// mov $0x33000, %eax
    /// mov $0x510, %dx
    /// out %eax, %dx
    /// incb 0x150000
    /// mov 0x150000, %al
    /// mov %al, 0x31000
    /// movq $1, 56(%rbx)
    /// movl $0, 12(%rbx)
    /// movl $2, 8(%rbx)
    /// mov $0x33000, %eax
    /// mov $0x510, %dx
    /// out %eax, %dx
    /// 1: jmp 1b
    /// ```
    const GUEST: &[u8] = &[
        0xbb, 0x00, 0x00, 0x02, 0x00, 0xc7, 0x03, 0x44, 0x56, 0x46, 0x4e, 0xc7, 0x43, 0x04, 0x01,
        0x00, 0x00, 0x00, 0x48, 0xc7, 0x43, 0x10, 0x00, 0x00, 0x03, 0x00, 0x48, 0xc7, 0x43, 0x18,
        0x00, 0x10, 0x00, 0x00, 0x48, 0xc7, 0x43, 0x28, 0x00, 0x10, 0x03, 0x00, 0x48, 0xc7, 0x43,
        0x30, 0x00, 0x10, 0x00, 0x00, 0x48, 0xc7, 0x43, 0x40, 0x00, 0x20, 0x03, 0x00, 0x48, 0xc7,
        0x43, 0x48, 0x00, 0x10, 0x00, 0x00, 0xc7, 0x43, 0x08, 0x01, 0x00, 0x00, 0x00, 0xc7, 0x04,
        0x25, 0x00, 0x30, 0x03, 0x00, 0x02, 0x00, 0x00, 0x00, 0x48, 0xc7, 0x04, 0x25, 0x08, 0x30,
        0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0xb8, 0x00, 0x30, 0x03, 0x00, 0x66, 0xba, 0x10, 0x05,
        0xef, 0xfe, 0x04, 0x25, 0x00, 0x00, 0x15, 0x00, 0x8a, 0x04, 0x25, 0x00, 0x00, 0x15, 0x00,
        0x88, 0x04, 0x25, 0x00, 0x10, 0x03, 0x00, 0x48, 0xc7, 0x43, 0x38, 0x01, 0x00, 0x00, 0x00,
        0xc7, 0x43, 0x0c, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x43, 0x08, 0x02, 0x00, 0x00, 0x00, 0xb8,
        0x00, 0x30, 0x03, 0x00, 0x66, 0xba, 0x10, 0x05, 0xef, 0xeb, 0xfe,
    ];

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        let r = InvokeResult::default();
        assert_eq!(r.outcome, NO_OUTCOME);
        let mut r = InvokeResult::default();
        r.set_reason(&"é".repeat(REASON_MAX));
        assert!(r.reason_len as usize <= REASON_MAX);
        assert!(std::str::from_utf8(&r.reason[..r.reason_len as usize]).is_ok());
    }

    #[test]
    #[ignore = "needs /dev/kvm: the test command runs it with --ignored where KVM works"]
    fn each_request_starts_from_the_checkpoint_and_a_timeout_resets_too() {
        if let Err(e) = check_kvm() {
            panic!("{e}: this test needs KVM (run it where /dev/kvm works, or in kvmbox)");
        }
        let vm = Vm::new(2 << 20, UnhandledAccess::Stop).unwrap();
        let vcpu = vm.create_vcpu().unwrap();
        vm.ram().write(DEFAULT_LONG_LOAD_ADDR, GUEST).unwrap();
        vcpu.setup_entry(EntryMode::Long, DEFAULT_LONG_LOAD_ADDR, 0x1f_f000)
            .unwrap();
        let ready = vm.run(Some(Duration::from_secs(30))).unwrap();
        assert!(
            matches!(ready.stop, StopReason::GuestExit { .. }),
            "{ready:?}"
        );
        let info = super::super::reset::checkpoint(&vm).unwrap();
        assert_eq!(info.ready.stdout_cap, 0x1000);
        assert!(!info.shared_image);
        let limits = Limits {
            timeout: Some(Duration::from_secs(30)),
            ..Limits::default()
        };
        let (mut stdout, mut stderr) = ([0u8; 16], [0u8; 16]);
        for _ in 0..5 {
            let mut out = InvokeResult::default();
            invoke(&vm, b"x", &limits, &mut stdout, &mut stderr, &mut out).unwrap();
            assert_eq!(out.status, status::DONE);
            assert_eq!(out.stdout_len, 1);
            assert_eq!(stdout[0], 1, "the far page's counter leaked");
            assert!(out.reset_pages >= 2, "{}", out.reset_pages);
        }
        let mut out = InvokeResult::default();
        let big = vec![0u8; 0x1001];
        invoke(&vm, &big, &limits, &mut stdout, &mut stderr, &mut out).unwrap();
        assert_eq!(out.status, status::INPUT_TOO_LARGE);
        let mut byte = [0u8; 1];
        vm.ram().read(0x15_0000, &mut byte).unwrap();
        assert_eq!(byte[0], 0);
        vm.ram().write(0x15_0000, &[9]).unwrap();
        let trimmed = super::super::reset::trim(&vm).unwrap();
        assert!(trimmed <= 1 << 20, "{trimmed}");
        vm.ram().read(0x15_0000, &mut byte).unwrap();
        assert_eq!(byte[0], 0, "trim reverts host writes too");
    }
}
