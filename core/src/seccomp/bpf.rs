//! A small compiler from an allow-list to a classic-BPF seccomp program.
//!
//! libseccomp is not linkable here and seccompiler is not packaged, so the
//! program is built by hand, in the one shape every list needs:
//!
//! ```text
//!   A = arch;  if A != AUDIT_ARCH_X86_64  -> arch action (kill)
//!   A = nr;    if A >= 0x40000000 (x32)   -> deny
//!   per syscall without conditions:  if A == nr -> allow
//!   per syscall with conditions:     if A == nr -> { per condition:
//!                                        A = low 32 bits of arg; A &= mask;
//!                                        if A == value -> allow }  -> deny
//!                                     (A = nr again before the next one)
//!   -> deny
//! ```
//!
//! Every jump is local (over at most one condition), so no offset ever nears
//! BPF's 8-bit limit however long the list. Conditions compare the LOW 32 bits
//! of an argument: what `ioctl`'s request is after the kernel truncates it to
//! `unsigned int`, so a request with junk in the high half cannot slip past.

use thiserror::Error;

/// `struct sock_filter`: one classic-BPF instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockFilter {
    /// Opcode.
    pub code: u16,
    /// Jump offset when the condition holds.
    pub jt: u8,
    /// Jump offset when it does not.
    pub jf: u8,
    /// Operand.
    pub k: u32,
}

// Classic-BPF opcodes (linux/bpf_common.h).
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS
const BPF_ALU_AND_K: u16 = 0x04 | 0x50; // BPF_ALU | BPF_AND | BPF_K
const BPF_JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JGE_K: u16 = 0x05 | 0x30; // BPF_JMP | BPF_JGE | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K

/// `AUDIT_ARCH_X86_64` (EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE).
pub const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// x32 syscalls are the x86-64 numbers with this bit set.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// `struct seccomp_data` offsets.
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
const OFFSET_ARGS: u32 = 16;

/// `SECCOMP_RET_*` actions.
pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
/// Raise SIGSYS in the thread (the core's handler reports and exits).
pub const RET_TRAP: u32 = 0x0003_0000;
/// Let the call proceed, and log it (audit type 1326).
pub const RET_LOG: u32 = 0x7FFC_0000;
/// Let the call proceed.
pub const RET_ALLOW: u32 = 0x7FFF_0000;
/// Fail the call with an errno (the low 16 bits).
pub const RET_ERRNO: u32 = 0x0005_0000;

/// The longest program the kernel accepts (`BPF_MAXINSNS`).
pub const MAX_INSNS: usize = 4096;

/// One argument condition: `(low 32 bits of args[arg]) & mask == value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgCond {
    /// Argument index, 0..6.
    pub arg: u8,
    /// Bits compared.
    pub mask: u32,
    /// Their expected value.
    pub value: u32,
}

/// One allowed syscall: any arguments (`conds` empty) or any ONE of `conds`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allow {
    /// Syscall number.
    pub nr: u32,
    /// Alternatives; empty means every call is allowed.
    pub conds: Vec<ArgCond>,
}

/// A filter's inputs: what is allowed, and what happens otherwise.
#[derive(Clone, Debug)]
pub struct FilterSpec {
    /// Allowed syscalls (numbers must be distinct).
    pub allow: Vec<Allow>,
    /// Action for anything else (and for x32 numbers).
    pub deny: u32,
    /// Action for a foreign architecture (i386 `int 0x80`, x32...).
    pub bad_arch: u32,
}

/// Why a filter cannot be compiled.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BpfError {
    /// Syscall {0} is listed twice
    #[error("syscall {0} is listed twice")]
    Duplicate(u32),
    /// Syscall {0} is not an x86-64 syscall number
    #[error("syscall {0} is not an x86-64 syscall number")]
    BadNumber(u32),
    /// A condition names argument {0}; syscalls have 6
    #[error("a condition names argument {0}; syscalls have 6")]
    BadArg(u8),
    /// The program has {0} instructions, more than the kernel's 4096
    #[error("the program has {0} instructions, more than the kernel's 4096")]
    TooLong(usize),
}

fn stmt(code: u16, k: u32) -> SockFilter {
    SockFilter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> SockFilter {
    SockFilter { code, jt, jf, k }
}

/// Compiles `spec` into a program for `seccomp(SECCOMP_SET_MODE_FILTER)`.
pub fn compile(spec: &FilterSpec) -> Result<Vec<SockFilter>, BpfError> {
    let mut seen = std::collections::BTreeSet::new();
    for a in &spec.allow {
        if a.nr >= X32_SYSCALL_BIT {
            return Err(BpfError::BadNumber(a.nr));
        }
        if !seen.insert(a.nr) {
            return Err(BpfError::Duplicate(a.nr));
        }
        if let Some(c) = a.conds.iter().find(|c| c.arg > 5) {
            return Err(BpfError::BadArg(c.arg));
        }
    }
    let mut p = vec![
        stmt(BPF_LD_W_ABS, OFFSET_ARCH),
        jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET_K, spec.bad_arch),
        stmt(BPF_LD_W_ABS, OFFSET_NR),
        jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, spec.deny),
    ];
    // Plain numbers first: they share one load of `nr`.
    for a in spec.allow.iter().filter(|a| a.conds.is_empty()) {
        p.push(jump(BPF_JEQ_K, a.nr, 0, 1));
        p.push(stmt(BPF_RET_K, RET_ALLOW));
    }
    for a in spec.allow.iter().filter(|a| !a.conds.is_empty()) {
        // Per condition: load, mask, compare, allow (4 instructions); then deny.
        let body = a.conds.len() * 4 + 1;
        if body > 255 {
            return Err(BpfError::TooLong(body));
        }
        p.push(stmt(BPF_LD_W_ABS, OFFSET_NR));
        p.push(jump(BPF_JEQ_K, a.nr, 0, body as u8));
        for c in &a.conds {
            p.push(stmt(BPF_LD_W_ABS, OFFSET_ARGS + 8 * c.arg as u32));
            p.push(stmt(BPF_ALU_AND_K, c.mask));
            p.push(jump(BPF_JEQ_K, c.value & c.mask, 0, 1));
            p.push(stmt(BPF_RET_K, RET_ALLOW));
        }
        p.push(stmt(BPF_RET_K, spec.deny));
    }
    p.push(stmt(BPF_RET_K, spec.deny));
    if p.len() > MAX_INSNS {
        return Err(BpfError::TooLong(p.len()));
    }
    Ok(p)
}

/// Runs `program` over one `seccomp_data` in user space: what the kernel
/// would answer. For tests of the compiler and of the lists without installing
/// anything (supports exactly the opcodes [`compile`] emits).
pub fn evaluate(program: &[SockFilter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
    let load = |off: u32| -> u32 {
        match off {
            OFFSET_NR => nr,
            OFFSET_ARCH => arch,
            o if o >= OFFSET_ARGS && (o - OFFSET_ARGS).is_multiple_of(4) => {
                let i = ((o - OFFSET_ARGS) / 8) as usize;
                let word = args.get(i).copied().unwrap_or(0);
                if (o - OFFSET_ARGS).is_multiple_of(8) {
                    word as u32
                } else {
                    (word >> 32) as u32
                }
            }
            _ => 0,
        }
    };
    let (mut pc, mut a) = (0usize, 0u32);
    while let Some(ins) = program.get(pc) {
        pc += 1;
        match ins.code {
            BPF_LD_W_ABS => a = load(ins.k),
            BPF_ALU_AND_K => a &= ins.k,
            BPF_JEQ_K | BPF_JGE_K => {
                let hit = if ins.code == BPF_JEQ_K {
                    a == ins.k
                } else {
                    a >= ins.k
                };
                pc += usize::from(if hit { ins.jt } else { ins.jf });
            }
            BPF_RET_K => return ins.k,
            _ => return RET_KILL_PROCESS,
        }
    }
    RET_KILL_PROCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(allow: Vec<Allow>) -> FilterSpec {
        FilterSpec {
            allow,
            deny: RET_TRAP,
            bad_arch: RET_KILL_PROCESS,
        }
    }

    fn plain(nr: u32) -> Allow {
        Allow { nr, conds: vec![] }
    }

    const IOCTL: u32 = 16;
    const KVM_TYPE: ArgCond = ArgCond {
        arg: 1,
        mask: 0xFF00,
        value: 0xAE00,
    };

    #[test]
    fn allows_listed_numbers_and_denies_the_rest() {
        let p = compile(&spec(vec![plain(0), plain(1), plain(60)])).unwrap();
        for nr in [0, 1, 60] {
            assert_eq!(evaluate(&p, AUDIT_ARCH_X86_64, nr, [0; 6]), RET_ALLOW);
        }
        for nr in [2, 59, 61, 449] {
            assert_eq!(evaluate(&p, AUDIT_ARCH_X86_64, nr, [0; 6]), RET_TRAP);
        }
    }

    #[test]
    fn foreign_arch_and_x32_numbers_are_refused() {
        let p = compile(&spec(vec![plain(0)])).unwrap();
        // i386's AUDIT_ARCH: read is 3 there, and nothing is allowed.
        assert_eq!(evaluate(&p, 0x4000_0003, 0, [0; 6]), RET_KILL_PROCESS);
        assert_eq!(
            evaluate(&p, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT, [0; 6]),
            RET_TRAP
        );
    }

    #[test]
    fn ioctl_conditions_compare_the_low_32_bits() {
        let fionbio = ArgCond {
            arg: 1,
            mask: u32::MAX,
            value: 0x5421,
        };
        let p = compile(&spec(vec![
            plain(0),
            Allow {
                nr: IOCTL,
                conds: vec![KVM_TYPE, fionbio],
            },
            plain(1),
        ]))
        .unwrap();
        let ioctl = |req: u64| evaluate(&p, AUDIT_ARCH_X86_64, IOCTL, [3, req, 0, 0, 0, 0]);
        assert_eq!(ioctl(0xAE80), RET_ALLOW); // KVM_RUN
        assert_eq!(ioctl(0xC008_AE67), RET_ALLOW); // a KVM _IOWR
        assert_eq!(ioctl(0x5421), RET_ALLOW);
        // The kernel truncates the request: junk above bit 31 does not matter.
        assert_eq!(ioctl(0xFFFF_FFFF_0000_AE80), RET_ALLOW);
        assert_eq!(ioctl(0x4004_54CA), RET_TRAP); // TUNSETIFF
        assert_eq!(ioctl(0x5422), RET_TRAP);
        // A rule after the conditional one still sees `nr`.
        assert_eq!(evaluate(&p, AUDIT_ARCH_X86_64, 1, [0; 6]), RET_ALLOW);
    }

    #[test]
    fn bad_lists_are_refused() {
        assert_eq!(
            compile(&spec(vec![plain(1), plain(1)])).unwrap_err(),
            BpfError::Duplicate(1)
        );
        assert_eq!(
            compile(&spec(vec![plain(X32_SYSCALL_BIT)])).unwrap_err(),
            BpfError::BadNumber(X32_SYSCALL_BIT)
        );
        let bad = ArgCond {
            arg: 6,
            mask: 1,
            value: 1,
        };
        assert_eq!(
            compile(&spec(vec![Allow {
                nr: 16,
                conds: vec![bad]
            }]))
            .unwrap_err(),
            BpfError::BadArg(6)
        );
    }
}
