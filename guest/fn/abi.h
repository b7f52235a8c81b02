/*
 * abi.h: the function ABI (v1) between the denovisor function runtime (the
 * Linux personality in guest/fn/runtime/) and the VMM (core/src/function/).
 *
 * SPEC DRAFT, written by hand: the core's contract generator is to produce this
 * file from the Rust constants (one source), with these names and values.
 *
 * 1. Boot. The host loads the runtime image (an ELF at 0x100000, entry mode
 *    `long`), writes a BUNDLE (below) at the top of guest RAM and enters with
 *    rdi = the bundle's guest-physical address, rsi = guest RAM in bytes.
 * 2. Init. The runtime checks the bundle, loads the program ELF it names into
 *    guest memory (its PT_LOAD segments, .bss zeroed), fills the MAILBOX at
 *    DV_FN_MAILBOX_ADDR (magic, version, input/stdout/stderr buffers), sets
 *    state = READY and makes the EXIT hypercall. A failed init sets state =
 *    DONE, outcome = INIT_FAILED and a NUL-terminated message.
 * 3. The host checkpoints the VM there (registers + memory).
 * 4. Each request: the host writes the input at input_addr (input_len <=
 *    input_cap), the per-request fields (limits, clocks, seed) and resumes the
 *    vCPU. The runtime builds the program's initial stack (argv, envp, auxv
 *    with AT_RANDOM from the seed) and jumps to its entry at CPL3. stdin reads
 *    the input, stdout/stderr append to their buffers. At exit_group (or a
 *    limit) it sets stdout_len, stderr_len, exit_status, outcome, the counters
 *    and state = DONE, then makes the EXIT hypercall.
 * 5. The host reads the mailbox (every value is untrusted and checked), copies
 *    the output out and resets the VM to the checkpoint.
 *
 * All fields little-endian; addresses are guest-physical = guest-virtual (the
 * first 4 GiB are identity-mapped).
 */
#ifndef DV_FN_ABI_H
#define DV_FN_ABI_H

#define DV_FN_ABI_VERSION 1

/* ---- the mailbox: one 4 KiB page at a fixed address ---- */
#define DV_FN_MAILBOX_ADDR 0x20000
#define DV_FN_MAILBOX_SIZE 4096
#define DV_FN_MAILBOX_MAGIC 0x4e465644 /* "DVFN" */

/* state */
#define DV_FN_STATE_NONE 0
#define DV_FN_STATE_READY 1
#define DV_FN_STATE_DONE 2

/* outcome (valid with state DONE) */
#define DV_FN_OUTCOME_EXITED 0       /* exit/exit_group: exit_status is its status */
#define DV_FN_OUTCOME_MEMORY_LIMIT 1 /* brk/mmap beyond memory_limit: killed */
#define DV_FN_OUTCOME_OUTPUT_LIMIT 2 /* stdout+stderr beyond output_limit: killed */
#define DV_FN_OUTCOME_INIT_FAILED 3  /* bad bundle or program ELF: message says why */
#define DV_FN_OUTCOME_SIGNAL 4       /* raised a fatal signal (abort, kill self): exit_status = signal */

/* field offsets (bytes) */
#define DV_FN_MB_MAGIC 0         /* u32  guest */
#define DV_FN_MB_VERSION 4       /* u32  guest */
#define DV_FN_MB_STATE 8         /* u32  guest */
#define DV_FN_MB_OUTCOME 12      /* u32  guest, at DONE */
#define DV_FN_MB_INPUT_ADDR 16   /* u64  guest, at READY */
#define DV_FN_MB_INPUT_CAP 24    /* u64  guest, at READY */
#define DV_FN_MB_INPUT_LEN 32    /* u64  host, per request */
#define DV_FN_MB_STDOUT_ADDR 40  /* u64  guest, at READY */
#define DV_FN_MB_STDOUT_CAP 48   /* u64  guest, at READY */
#define DV_FN_MB_STDOUT_LEN 56   /* u64  guest, at DONE */
#define DV_FN_MB_STDERR_ADDR 64  /* u64  guest, at READY */
#define DV_FN_MB_STDERR_CAP 72   /* u64  guest, at READY */
#define DV_FN_MB_STDERR_LEN 80   /* u64  guest, at DONE */
#define DV_FN_MB_EXIT_STATUS 88  /* i64  guest, at DONE */
#define DV_FN_MB_MEMORY_LIMIT 96 /* u64  host, per request: brk + mmap bytes (0: all free RAM) */
#define DV_FN_MB_OUTPUT_LIMIT 104 /* u64 host, per request: stdout + stderr bytes (0: the caps) */
#define DV_FN_MB_REALTIME_NS 112 /* u64  host, per request: CLOCK_REALTIME at the request */
#define DV_FN_MB_MONOTONIC_NS 120 /* u64 host, per request: CLOCK_MONOTONIC at that instant */
#define DV_FN_MB_SEED 128        /* u8[32] host, per request: fresh random bytes */
#define DV_FN_MB_MEMORY_USED 160 /* u64  guest, at DONE: peak brk + mmap bytes */
#define DV_FN_MB_SYSCALLS 168    /* u64  guest, at DONE: system calls served */
#define DV_FN_MB_ENOSYS_COUNT 176 /* u32 guest, at DONE: entries used in ENOSYS */
#define DV_FN_MB_ENOSYS 184      /* {u32 nr; u32 count}[DV_FN_ENOSYS_MAX] guest, at DONE */
#define DV_FN_ENOSYS_MAX 64
#define DV_FN_MB_MESSAGE 704     /* char[DV_FN_MESSAGE_MAX] guest: why (NUL-terminated) */
#define DV_FN_MESSAGE_MAX 256

/* ---- the bundle: what the host gives the runtime at boot ---- */
#define DV_FN_BUNDLE_MAGIC 0x4e425644 /* "DVBN" */
/* header offsets */
#define DV_FN_BN_MAGIC 0        /* u32 */
#define DV_FN_BN_VERSION 4      /* u32 DV_FN_ABI_VERSION */
#define DV_FN_BN_TOTAL_LEN 8    /* u64 the whole bundle, header included */
#define DV_FN_BN_ARGC 16        /* u32 */
#define DV_FN_BN_ENVC 20        /* u32 */
#define DV_FN_BN_FILE_COUNT 24  /* u32 */
#define DV_FN_BN_EXEC_INDEX 28  /* u32 the file that is the program */
#define DV_FN_BN_STRINGS_OFF 32 /* u64 argv then envp: argc + envc NUL-terminated strings */
#define DV_FN_BN_STRINGS_LEN 40 /* u64 */
#define DV_FN_BN_FILES_OFF 48   /* u64 file_count entries of DV_FN_FILE_SIZE bytes */
#define DV_FN_BN_HEADER_SIZE 64
/* a file entry (offsets are from the bundle's start) */
#define DV_FN_FILE_PATH_OFF 0   /* u64 absolute path, NUL-terminated */
#define DV_FN_FILE_DATA_OFF 8   /* u64 */
#define DV_FN_FILE_DATA_LEN 16  /* u64 */
#define DV_FN_FILE_MODE 24      /* u32 st_mode permission bits (0755, 0644) */
#define DV_FN_FILE_SIZE 32

#endif
