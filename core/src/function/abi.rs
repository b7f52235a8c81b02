//! The function ABI (v1) between the guest function runtime (the Linux
//! personality in `guest/fn/runtime/`) and the VMM: the mailbox page the two
//! exchange each request through, and the bundle the host hands the runtime at
//! boot. One source: `guest/fn/abi.h` and the `FN_*` constants of
//! `src/_contract.generated.ts` are generated from these (`deno task contract`).
//!
//! 1. Boot. The host loads the runtime image (an ELF at 0x100000, entry mode
//!    `long`), writes a BUNDLE at the top of guest RAM and enters with
//!    rdi = the bundle's guest-physical address, rsi = guest RAM in bytes.
//! 2. Init. The runtime checks the bundle, loads the program ELF it names into
//!    guest memory, fills the MAILBOX at [`MAILBOX_ADDR`] (magic, version,
//!    input/stdout/stderr buffers), sets state = READY and makes the EXIT
//!    hypercall. A failed init sets state = DONE, outcome = INIT_FAILED and a
//!    NUL-terminated message.
//! 3. The host checkpoints the VM there (registers + memory).
//! 4. Each request: the host writes the input at input_addr (input_len <=
//!    input_cap), the per-request fields (limits, clocks, seed) and resumes the
//!    vCPU. The runtime builds the program's initial stack and jumps to its
//!    entry at CPL3. stdin reads the input, stdout/stderr append to their
//!    buffers. At exit_group (or a limit) it sets stdout_len, stderr_len,
//!    exit_status, outcome, the counters and state = DONE, then makes the EXIT
//!    hypercall.
//! 5. The host reads the mailbox (every value is untrusted and checked), copies
//!    the output out and resets the VM to the checkpoint.
//!
//! All fields little-endian; addresses are guest-physical = guest-virtual.

/// The ABI's version, in the mailbox and the bundle.
pub const ABI_VERSION: u32 = 1;

/// The mailbox: one 4 KiB page at a fixed guest-physical address.
pub const MAILBOX_ADDR: u64 = 0x20000;
/// The mailbox's size.
pub const MAILBOX_SIZE: u64 = 4096;
/// "DVFN".
pub const MAILBOX_MAGIC: u32 = 0x4e46_5644;

/// Mailbox states.
pub mod state {
    /// Not yet initialised.
    pub const NONE: u32 = 0;
    /// Initialised, waiting for a request.
    pub const READY: u32 = 1;
    /// The request (or init) ended: the outcome says how.
    pub const DONE: u32 = 2;
}

/// How a request ended (valid with state DONE).
pub mod outcome {
    /// exit/exit_group: exit_status is its status.
    pub const EXITED: u32 = 0;
    /// brk/mmap beyond memory_limit: killed.
    pub const MEMORY_LIMIT: u32 = 1;
    /// stdout + stderr beyond output_limit: killed.
    pub const OUTPUT_LIMIT: u32 = 2;
    /// A bad bundle or program ELF: the message says why.
    pub const INIT_FAILED: u32 = 3;
    /// A fatal signal (a fault, abort, kill of itself): exit_status = the signal.
    pub const SIGNAL: u32 = 4;
}

/// Mailbox field offsets in bytes (who writes it, when).
pub mod mb {
    /// u32, guest.
    pub const MAGIC: u64 = 0;
    /// u32, guest.
    pub const VERSION: u64 = 4;
    /// u32, guest.
    pub const STATE: u64 = 8;
    /// u32, guest, at DONE.
    pub const OUTCOME: u64 = 12;
    /// u64, guest, at READY.
    pub const INPUT_ADDR: u64 = 16;
    /// u64, guest, at READY.
    pub const INPUT_CAP: u64 = 24;
    /// u64, host, per request.
    pub const INPUT_LEN: u64 = 32;
    /// u64, guest, at READY.
    pub const STDOUT_ADDR: u64 = 40;
    /// u64, guest, at READY.
    pub const STDOUT_CAP: u64 = 48;
    /// u64, guest, at DONE.
    pub const STDOUT_LEN: u64 = 56;
    /// u64, guest, at READY.
    pub const STDERR_ADDR: u64 = 64;
    /// u64, guest, at READY.
    pub const STDERR_CAP: u64 = 72;
    /// u64, guest, at DONE.
    pub const STDERR_LEN: u64 = 80;
    /// i64, guest, at DONE.
    pub const EXIT_STATUS: u64 = 88;
    /// u64, host, per request: brk + mmap bytes (0: all free RAM).
    pub const MEMORY_LIMIT: u64 = 96;
    /// u64, host, per request: stdout + stderr bytes (0: the capacities).
    pub const OUTPUT_LIMIT: u64 = 104;
    /// u64, host, per request: CLOCK_REALTIME at the request, in ns.
    pub const REALTIME_NS: u64 = 112;
    /// u64, host, per request: CLOCK_MONOTONIC at that instant, in ns.
    pub const MONOTONIC_NS: u64 = 120;
    /// u8[32], host, per request: fresh random bytes.
    pub const SEED: u64 = 128;
    /// u64, guest, at DONE: peak brk + mmap bytes.
    pub const MEMORY_USED: u64 = 160;
    /// u64, guest, at DONE: system calls served.
    pub const SYSCALLS: u64 = 168;
    /// u32, guest, at DONE: entries used in ENOSYS.
    pub const ENOSYS_COUNT: u64 = 176;
    /// {u32 nr; u32 count}[ENOSYS_MAX], guest, at DONE.
    pub const ENOSYS: u64 = 184;
    /// char[MESSAGE_MAX], guest: why (NUL-terminated).
    pub const MESSAGE: u64 = 704;
}

/// Entries of the mailbox's ENOSYS table.
pub const ENOSYS_MAX: u64 = 64;
/// Bytes of the mailbox's message.
pub const MESSAGE_MAX: u64 = 256;

/// "DVBN".
pub const BUNDLE_MAGIC: u32 = 0x4e42_5644;

/// Bundle header offsets in bytes.
pub mod bn {
    /// u32.
    pub const MAGIC: u64 = 0;
    /// u32, the ABI version.
    pub const VERSION: u64 = 4;
    /// u64, the whole bundle, header included.
    pub const TOTAL_LEN: u64 = 8;
    /// u32.
    pub const ARGC: u64 = 16;
    /// u32.
    pub const ENVC: u64 = 20;
    /// u32.
    pub const FILE_COUNT: u64 = 24;
    /// u32, the file that is the program.
    pub const EXEC_INDEX: u64 = 28;
    /// u64, argv then envp: argc + envc NUL-terminated strings.
    pub const STRINGS_OFF: u64 = 32;
    /// u64.
    pub const STRINGS_LEN: u64 = 40;
    /// u64, file_count entries of FILE_SIZE bytes.
    pub const FILES_OFF: u64 = 48;
    /// The header's size.
    pub const HEADER_SIZE: u64 = 64;
}

/// A bundle's file entry (offsets are from the bundle's start).
pub mod file {
    /// u64, the absolute path, NUL-terminated.
    pub const PATH_OFF: u64 = 0;
    /// u64.
    pub const DATA_OFF: u64 = 8;
    /// u64.
    pub const DATA_LEN: u64 = 16;
    /// u32, st_mode permission bits (0755, 0644).
    pub const MODE: u64 = 24;
    /// An entry's size.
    pub const SIZE: u64 = 32;
}

/// Every constant, as `(C name without the DV_FN_ prefix, value, comment)`,
/// in the order the header lists them.
pub fn constants() -> Vec<(&'static str, u64, &'static str)> {
    vec![
        ("ABI_VERSION", ABI_VERSION.into(), "the ABI's version"),
        (
            "MAILBOX_ADDR",
            MAILBOX_ADDR,
            "the mailbox page (guest-physical)",
        ),
        ("MAILBOX_SIZE", MAILBOX_SIZE, ""),
        ("MAILBOX_MAGIC", MAILBOX_MAGIC.into(), "\"DVFN\""),
        ("STATE_NONE", state::NONE.into(), "mailbox state"),
        ("STATE_READY", state::READY.into(), ""),
        ("STATE_DONE", state::DONE.into(), ""),
        ("OUTCOME_EXITED", outcome::EXITED.into(), "exit/exit_group"),
        (
            "OUTCOME_MEMORY_LIMIT",
            outcome::MEMORY_LIMIT.into(),
            "brk/mmap beyond the limit",
        ),
        (
            "OUTCOME_OUTPUT_LIMIT",
            outcome::OUTPUT_LIMIT.into(),
            "output beyond the limit",
        ),
        (
            "OUTCOME_INIT_FAILED",
            outcome::INIT_FAILED.into(),
            "bad bundle or ELF",
        ),
        (
            "OUTCOME_SIGNAL",
            outcome::SIGNAL.into(),
            "exit_status = the signal",
        ),
        ("MB_MAGIC", mb::MAGIC, "u32 guest"),
        ("MB_VERSION", mb::VERSION, "u32 guest"),
        ("MB_STATE", mb::STATE, "u32 guest"),
        ("MB_OUTCOME", mb::OUTCOME, "u32 guest, at DONE"),
        ("MB_INPUT_ADDR", mb::INPUT_ADDR, "u64 guest, at READY"),
        ("MB_INPUT_CAP", mb::INPUT_CAP, "u64 guest, at READY"),
        ("MB_INPUT_LEN", mb::INPUT_LEN, "u64 host, per request"),
        ("MB_STDOUT_ADDR", mb::STDOUT_ADDR, "u64 guest, at READY"),
        ("MB_STDOUT_CAP", mb::STDOUT_CAP, "u64 guest, at READY"),
        ("MB_STDOUT_LEN", mb::STDOUT_LEN, "u64 guest, at DONE"),
        ("MB_STDERR_ADDR", mb::STDERR_ADDR, "u64 guest, at READY"),
        ("MB_STDERR_CAP", mb::STDERR_CAP, "u64 guest, at READY"),
        ("MB_STDERR_LEN", mb::STDERR_LEN, "u64 guest, at DONE"),
        ("MB_EXIT_STATUS", mb::EXIT_STATUS, "i64 guest, at DONE"),
        (
            "MB_MEMORY_LIMIT",
            mb::MEMORY_LIMIT,
            "u64 host: brk + mmap bytes (0: all free RAM)",
        ),
        (
            "MB_OUTPUT_LIMIT",
            mb::OUTPUT_LIMIT,
            "u64 host: stdout + stderr bytes (0: the caps)",
        ),
        (
            "MB_REALTIME_NS",
            mb::REALTIME_NS,
            "u64 host: CLOCK_REALTIME at the request",
        ),
        (
            "MB_MONOTONIC_NS",
            mb::MONOTONIC_NS,
            "u64 host: CLOCK_MONOTONIC then",
        ),
        ("MB_SEED", mb::SEED, "u8[32] host: fresh random bytes"),
        (
            "MB_MEMORY_USED",
            mb::MEMORY_USED,
            "u64 guest, at DONE: peak brk + mmap bytes",
        ),
        (
            "MB_SYSCALLS",
            mb::SYSCALLS,
            "u64 guest, at DONE: system calls served",
        ),
        (
            "MB_ENOSYS_COUNT",
            mb::ENOSYS_COUNT,
            "u32 guest, at DONE: ENOSYS entries used",
        ),
        (
            "MB_ENOSYS",
            mb::ENOSYS,
            "{u32 nr; u32 count}[ENOSYS_MAX] guest, at DONE",
        ),
        ("ENOSYS_MAX", ENOSYS_MAX, ""),
        (
            "MB_MESSAGE",
            mb::MESSAGE,
            "char[MESSAGE_MAX] guest: why (NUL-terminated)",
        ),
        ("MESSAGE_MAX", MESSAGE_MAX, ""),
        ("BUNDLE_MAGIC", BUNDLE_MAGIC.into(), "\"DVBN\""),
        ("BN_MAGIC", bn::MAGIC, "u32"),
        ("BN_VERSION", bn::VERSION, "u32 ABI_VERSION"),
        (
            "BN_TOTAL_LEN",
            bn::TOTAL_LEN,
            "u64 the whole bundle, header included",
        ),
        ("BN_ARGC", bn::ARGC, "u32"),
        ("BN_ENVC", bn::ENVC, "u32"),
        ("BN_FILE_COUNT", bn::FILE_COUNT, "u32"),
        (
            "BN_EXEC_INDEX",
            bn::EXEC_INDEX,
            "u32 the file that is the program",
        ),
        (
            "BN_STRINGS_OFF",
            bn::STRINGS_OFF,
            "u64 argv then envp, NUL-terminated",
        ),
        ("BN_STRINGS_LEN", bn::STRINGS_LEN, "u64"),
        (
            "BN_FILES_OFF",
            bn::FILES_OFF,
            "u64 file_count entries of FILE_SIZE bytes",
        ),
        ("BN_HEADER_SIZE", bn::HEADER_SIZE, ""),
        (
            "FILE_PATH_OFF",
            file::PATH_OFF,
            "u64 absolute path, NUL-terminated",
        ),
        (
            "FILE_DATA_OFF",
            file::DATA_OFF,
            "u64 from the bundle's start",
        ),
        ("FILE_DATA_LEN", file::DATA_LEN, "u64"),
        ("FILE_MODE", file::MODE, "u32 st_mode permission bits"),
        ("FILE_SIZE", file::SIZE, "an entry's size"),
    ]
}

/// `guest/fn/abi.h`, generated from [`constants`].
pub fn c_header() -> String {
    let mut out = String::from(
        "/*\n * abi.h: the function ABI between the denovisor function runtime\n \
         * (guest/fn/runtime/) and the VMM (core/src/function/).\n *\n \
         * GENERATED from core/src/function/abi.rs by `deno task contract`: do not edit.\n \
         * The protocol is described there.\n */\n#ifndef DV_FN_ABI_H\n#define DV_FN_ABI_H\n\n",
    );
    for (name, value, comment) in constants() {
        let value = if value >= 0x1000 {
            format!("{value:#x}")
        } else {
            value.to_string()
        };
        if comment.is_empty() {
            out.push_str(&format!("#define DV_FN_{name} {value}\n"));
        } else {
            out.push_str(&format!("#define DV_FN_{name} {value} /* {comment} */\n"));
        }
    }
    out.push_str("\n#endif\n");
    out
}

// The mailbox's fields fit its page without overlapping; the bundle header's fit it.
const _: () = assert!(mb::ENOSYS + ENOSYS_MAX * 8 <= mb::MESSAGE);
const _: () = assert!(mb::MESSAGE + MESSAGE_MAX <= MAILBOX_SIZE);
const _: () = assert!(mb::SEED + 32 <= mb::MEMORY_USED);
const _: () = assert!(bn::FILES_OFF + 8 <= bn::HEADER_SIZE);
const _: () = assert!(file::MODE + 4 <= file::SIZE);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_names_are_distinct_and_the_header_defines_each() {
        let names: std::collections::BTreeSet<_> = constants().iter().map(|c| c.0).collect();
        assert_eq!(names.len(), constants().len());
        let header = c_header();
        for name in names {
            assert!(header.contains(&format!("#define DV_FN_{name} ")), "{name}");
        }
    }
}
