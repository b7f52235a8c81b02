/*
 * abi.h: the function ABI between the denovisor function runtime
 * (guest/fn/runtime/) and the VMM (core/src/function/).
 *
 * GENERATED from core/src/function/abi.rs by `deno task contract`: do not edit.
 * The protocol is described there.
 */
#ifndef DV_FN_ABI_H
#define DV_FN_ABI_H

#define DV_FN_ABI_VERSION 1 /* the ABI's version */
#define DV_FN_MAILBOX_ADDR 0x20000 /* the mailbox page (guest-physical) */
#define DV_FN_MAILBOX_SIZE 0x1000
#define DV_FN_MAILBOX_MAGIC 0x4e465644 /* "DVFN" */
#define DV_FN_STATE_NONE 0 /* mailbox state */
#define DV_FN_STATE_READY 1
#define DV_FN_STATE_DONE 2
#define DV_FN_OUTCOME_EXITED 0 /* exit/exit_group */
#define DV_FN_OUTCOME_MEMORY_LIMIT 1 /* brk/mmap beyond the limit */
#define DV_FN_OUTCOME_OUTPUT_LIMIT 2 /* output beyond the limit */
#define DV_FN_OUTCOME_INIT_FAILED 3 /* bad bundle or ELF */
#define DV_FN_OUTCOME_SIGNAL 4 /* exit_status = the signal */
#define DV_FN_MB_MAGIC 0 /* u32 guest */
#define DV_FN_MB_VERSION 4 /* u32 guest */
#define DV_FN_MB_STATE 8 /* u32 guest */
#define DV_FN_MB_OUTCOME 12 /* u32 guest, at DONE */
#define DV_FN_MB_INPUT_ADDR 16 /* u64 guest, at READY */
#define DV_FN_MB_INPUT_CAP 24 /* u64 guest, at READY */
#define DV_FN_MB_INPUT_LEN 32 /* u64 host, per request */
#define DV_FN_MB_STDOUT_ADDR 40 /* u64 guest, at READY */
#define DV_FN_MB_STDOUT_CAP 48 /* u64 guest, at READY */
#define DV_FN_MB_STDOUT_LEN 56 /* u64 guest, at DONE */
#define DV_FN_MB_STDERR_ADDR 64 /* u64 guest, at READY */
#define DV_FN_MB_STDERR_CAP 72 /* u64 guest, at READY */
#define DV_FN_MB_STDERR_LEN 80 /* u64 guest, at DONE */
#define DV_FN_MB_EXIT_STATUS 88 /* i64 guest, at DONE */
#define DV_FN_MB_MEMORY_LIMIT 96 /* u64 host: brk + mmap bytes (0: all free RAM) */
#define DV_FN_MB_OUTPUT_LIMIT 104 /* u64 host: stdout + stderr bytes (0: the caps) */
#define DV_FN_MB_REALTIME_NS 112 /* u64 host: CLOCK_REALTIME at the request */
#define DV_FN_MB_MONOTONIC_NS 120 /* u64 host: CLOCK_MONOTONIC then */
#define DV_FN_MB_SEED 128 /* u8[32] host: fresh random bytes */
#define DV_FN_MB_MEMORY_USED 160 /* u64 guest, at DONE: peak brk + mmap bytes */
#define DV_FN_MB_SYSCALLS 168 /* u64 guest, at DONE: system calls served */
#define DV_FN_MB_ENOSYS_COUNT 176 /* u32 guest, at DONE: ENOSYS entries used */
#define DV_FN_MB_ENOSYS 184 /* {u32 nr; u32 count}[ENOSYS_MAX] guest, at DONE */
#define DV_FN_ENOSYS_MAX 64
#define DV_FN_MB_MESSAGE 704 /* char[MESSAGE_MAX] guest: why (NUL-terminated) */
#define DV_FN_MESSAGE_MAX 256
#define DV_FN_BUNDLE_MAGIC 0x4e425644 /* "DVBN" */
#define DV_FN_BN_MAGIC 0 /* u32 */
#define DV_FN_BN_VERSION 4 /* u32 ABI_VERSION */
#define DV_FN_BN_TOTAL_LEN 8 /* u64 the whole bundle, header included */
#define DV_FN_BN_ARGC 16 /* u32 */
#define DV_FN_BN_ENVC 20 /* u32 */
#define DV_FN_BN_FILE_COUNT 24 /* u32 */
#define DV_FN_BN_EXEC_INDEX 28 /* u32 the file that is the program */
#define DV_FN_BN_STRINGS_OFF 32 /* u64 argv then envp, NUL-terminated */
#define DV_FN_BN_STRINGS_LEN 40 /* u64 */
#define DV_FN_BN_FILES_OFF 48 /* u64 file_count entries of FILE_SIZE bytes */
#define DV_FN_BN_HEADER_SIZE 64
#define DV_FN_FILE_PATH_OFF 0 /* u64 absolute path, NUL-terminated */
#define DV_FN_FILE_DATA_OFF 8 /* u64 from the bundle's start */
#define DV_FN_FILE_DATA_LEN 16 /* u64 */
#define DV_FN_FILE_MODE 24 /* u32 st_mode permission bits */
#define DV_FN_FILE_SIZE 32 /* an entry's size */

#endif
