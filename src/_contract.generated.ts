// Generated from core/src/contract.rs by `deno task contract`: do not edit.
/**
 * The TypeScript ↔ Rust contract as the core describes it: the ABI version,
 * every status, the flags and constants, the byte layouts of the structs that
 * cross the ABI, the stop reasons and the JSON fixtures in
 * `tests/fixtures/contract/`. A test fails when this file is stale.
 *
 * @module
 */

/**
 * The C ABI version (`ABI_VERSION` in `core/src/abi/mod.rs`).
 *
 * @example
 * ```ts
 * import { ABI_VERSION } from "denovisor/src/_contract.generated.ts";
 * console.log(ABI_VERSION);
 * ```
 */
export const ABI_VERSION = 7;

/**
 * Every status a `dv_*` call returns (`Status` in `core/src/error.rs`).
 *
 * @example
 * ```ts
 * import { STATUSES } from "denovisor/src/_contract.generated.ts";
 * console.log(STATUSES);
 * ```
 */
export const STATUSES = [
  { code: "OK", name: "Ok", summary: "Success", value: 0 },
  {
    code: "INVALID_ARGUMENT",
    name: "InvalidArgument",
    summary: "An argument is out of range, malformed or inconsistent",
    value: -1,
  },
  {
    code: "INVALID_HANDLE",
    name: "InvalidHandle",
    summary: "A handle is stale, closed or of another kind",
    value: -2,
  },
  {
    code: "KVM_UNAVAILABLE",
    name: "KvmUnavailable",
    summary: "/dev/kvm cannot be opened or speaks another API",
    value: -3,
  },
  { code: "KVM", name: "Kvm", summary: "A KVM ioctl failed", value: -4 },
  {
    code: "MEMORY",
    name: "Memory",
    summary: "Guest memory could not be created, read or written",
    value: -5,
  },
  {
    code: "IMAGE",
    name: "Image",
    summary: "The guest image is malformed or does not fit",
    value: -6,
  },
  {
    code: "BUSY",
    name: "Busy",
    summary: "The object is in use by a running vCPU",
    value: -7,
  },
  {
    code: "TIMEOUT",
    name: "Timeout",
    summary: "A wait ran out of time",
    value: -8,
  },
  {
    code: "PANIC",
    name: "Panic",
    summary: "A panic was caught at the ABI boundary",
    value: -9,
  },
  {
    code: "BUFFER_TOO_SMALL",
    name: "BufferTooSmall",
    summary: "The caller's buffer is too small (the size needed is in the out length)",
    value: -10,
  },
  { code: "IO", name: "Io", summary: "Host I/O failed", value: -11 },
  {
    code: "INITRD",
    name: "Initrd",
    summary: "The initrd is truncated or not an initramfs the kernel accepts",
    value: -12,
  },
  {
    code: "CMDLINE_TOO_LONG",
    name: "CmdlineTooLong",
    summary: "The kernel command line is longer than the kernel accepts",
    value: -13,
  },
  {
    code: "DOES_NOT_FIT",
    name: "DoesNotFit",
    summary: "The kernel or initrd does not fit in guest RAM",
    value: -14,
  },
  {
    code: "VCPU_LIMIT",
    name: "VcpuLimit",
    summary: "More vCPUs than the host's KVM allows",
    value: -15,
  },
  {
    code: "DEVICE",
    name: "Device",
    summary: "A virtio device cannot be configured, attached or asked",
    value: -16,
  },
  {
    code: "KSM_UNAVAILABLE",
    name: "KsmUnavailable",
    summary: "Memory deduplication (KSM) is not available in this kernel",
    value: -17,
  },
  {
    code: "SNAPSHOT_INVALID",
    name: "SnapshotInvalid",
    summary: "A snapshot is truncated, corrupted, of another version or lacks a section",
    value: -18,
  },
  {
    code: "SNAPSHOT_WRONG_HOST",
    name: "SnapshotWrongHost",
    summary: "A snapshot's CPU (vendor, model or features) does not match this host",
    value: -19,
  },
] as const;

/**
 * The flags and constants shared with the core.
 *
 * @example
 * ```ts
 * import { CONSTANTS } from "denovisor/src/_contract.generated.ts";
 * console.log(CONSTANTS);
 * ```
 */
export const CONSTANTS = {
  BOOT_CS: 16,
  BOOT_DS: 24,
  DEFAULT_LONG_LOAD_ADDR: 1048576,
  DEFAULT_REAL_LOAD_ADDR: 31744,
  E820_RAM: 1,
  E820_RESERVED: 2,
  ENTRY_MODE_LONG: 1,
  ENTRY_MODE_REAL: 0,
  ENTRY_MODE_USER: 2,
  FN_ABI_VERSION: 1,
  FN_BN_ARGC: 16,
  FN_BN_ENVC: 20,
  FN_BN_EXEC_INDEX: 28,
  FN_BN_FILES_OFF: 48,
  FN_BN_FILE_COUNT: 24,
  FN_BN_HEADER_SIZE: 64,
  FN_BN_MAGIC: 0,
  FN_BN_STRINGS_LEN: 40,
  FN_BN_STRINGS_OFF: 32,
  FN_BN_TOTAL_LEN: 8,
  FN_BN_VERSION: 4,
  FN_BUNDLE_MAGIC: 1312970308,
  FN_ENOSYS_MAX: 64,
  FN_FILE_DATA_LEN: 16,
  FN_FILE_DATA_OFF: 8,
  FN_FILE_MODE: 24,
  FN_FILE_PATH_OFF: 0,
  FN_FILE_SIZE: 32,
  FN_INVOKE_CRASHED: 2,
  FN_INVOKE_DONE: 0,
  FN_INVOKE_ENOSYS_ENTRIES: 64,
  FN_INVOKE_INPUT_TOO_LARGE: 5,
  FN_INVOKE_NO_OUTCOME: 4294967295,
  FN_INVOKE_PROTOCOL_ERROR: 4,
  FN_INVOKE_REASON_MAX: 512,
  FN_INVOKE_STOPPED: 3,
  FN_INVOKE_TIMEOUT: 1,
  FN_MAILBOX_ADDR: 131072,
  FN_MAILBOX_MAGIC: 1313232452,
  FN_MAILBOX_SIZE: 4096,
  FN_MB_ENOSYS: 184,
  FN_MB_ENOSYS_COUNT: 176,
  FN_MB_EXIT_STATUS: 88,
  FN_MB_INPUT_ADDR: 16,
  FN_MB_INPUT_CAP: 24,
  FN_MB_INPUT_LEN: 32,
  FN_MB_MAGIC: 0,
  FN_MB_MEMORY_LIMIT: 96,
  FN_MB_MEMORY_USED: 160,
  FN_MB_MESSAGE: 704,
  FN_MB_MONOTONIC_NS: 120,
  FN_MB_OUTCOME: 12,
  FN_MB_OUTPUT_LIMIT: 104,
  FN_MB_REALTIME_NS: 112,
  FN_MB_SEED: 128,
  FN_MB_STATE: 8,
  FN_MB_STDERR_ADDR: 64,
  FN_MB_STDERR_CAP: 72,
  FN_MB_STDERR_LEN: 80,
  FN_MB_STDOUT_ADDR: 40,
  FN_MB_STDOUT_CAP: 48,
  FN_MB_STDOUT_LEN: 56,
  FN_MB_SYSCALLS: 168,
  FN_MB_VERSION: 4,
  FN_MESSAGE_MAX: 256,
  FN_OUTCOME_EXITED: 0,
  FN_OUTCOME_INIT_FAILED: 3,
  FN_OUTCOME_MEMORY_LIMIT: 1,
  FN_OUTCOME_OUTPUT_LIMIT: 2,
  FN_OUTCOME_SIGNAL: 4,
  FN_STATE_DONE: 2,
  FN_STATE_NONE: 0,
  FN_STATE_READY: 1,
  IRQ_LINES: 24,
  LATENCY_BUCKETS: 32,
  LOAD_FLAG_RESERVE_LOW: 1,
  MAX_VCPUS: 254,
  MMIO_GAP_START: 3489660928,
  RESERVED_LOW_END: 65536,
  RESTORE_EAGER: 1,
  RESTORE_LAZY: 0,
  SERIAL_IRQ_LINE: 4,
  STATE_FPU: 2,
  STATE_REGS: 0,
  STATE_SREGS: 1,
  VM_FLAG_DEDUP: 4,
  VM_FLAG_IRQCHIP: 2,
  VM_FLAG_STOP_ON_UNHANDLED: 1,
} as const;

/**
 * Sizes and field offsets (bytes) of the `#[repr(C)]` structs that cross the ABI.
 *
 * @example
 * ```ts
 * import { LAYOUTS } from "denovisor/src/_contract.generated.ts";
 * console.log(LAYOUTS);
 * ```
 */
export const LAYOUTS = {
  fn_invoke_result: {
    fields: {
      enosys: { offset: 88, size: 512 },
      enosys_count: { offset: 80, size: 4 },
      exit_status: { offset: 8, size: 8 },
      exits: { offset: 56, size: 8 },
      memory_used: { offset: 72, size: 8 },
      outcome: { offset: 4, size: 4 },
      reason: { offset: 600, size: 512 },
      reason_len: { offset: 84, size: 4 },
      reset_ns: { offset: 40, size: 8 },
      reset_pages: { offset: 48, size: 8 },
      run_ns: { offset: 32, size: 8 },
      status: { offset: 0, size: 4 },
      stderr_len: { offset: 24, size: 8 },
      stdout_len: { offset: 16, size: 8 },
      syscalls: { offset: 64, size: 8 },
    },
    size: 1112,
  },
  kvm_dtable: {
    fields: {
      base: { offset: 0, size: 8 },
      limit: { offset: 8, size: 2 },
      padding: { offset: 10, size: 6 },
    },
    size: 16,
  },
  kvm_fpu: {
    fields: {
      fcw: { offset: 128, size: 2 },
      fpr: { offset: 0, size: 128 },
      fsw: { offset: 130, size: 2 },
      ftwx: { offset: 132, size: 1 },
      last_dp: { offset: 144, size: 8 },
      last_ip: { offset: 136, size: 8 },
      last_opcode: { offset: 134, size: 2 },
      mxcsr: { offset: 408, size: 4 },
      pad1: { offset: 133, size: 1 },
      pad2: { offset: 412, size: 4 },
      xmm: { offset: 152, size: 256 },
    },
    size: 416,
  },
  kvm_regs: {
    fields: {
      r10: { offset: 80, size: 8 },
      r11: { offset: 88, size: 8 },
      r12: { offset: 96, size: 8 },
      r13: { offset: 104, size: 8 },
      r14: { offset: 112, size: 8 },
      r15: { offset: 120, size: 8 },
      r8: { offset: 64, size: 8 },
      r9: { offset: 72, size: 8 },
      rax: { offset: 0, size: 8 },
      rbp: { offset: 56, size: 8 },
      rbx: { offset: 8, size: 8 },
      rcx: { offset: 16, size: 8 },
      rdi: { offset: 40, size: 8 },
      rdx: { offset: 24, size: 8 },
      rflags: { offset: 136, size: 8 },
      rip: { offset: 128, size: 8 },
      rsi: { offset: 32, size: 8 },
      rsp: { offset: 48, size: 8 },
    },
    size: 144,
  },
  kvm_segment: {
    fields: {
      avl: { offset: 21, size: 1 },
      base: { offset: 0, size: 8 },
      db: { offset: 17, size: 1 },
      dpl: { offset: 16, size: 1 },
      g: { offset: 20, size: 1 },
      l: { offset: 19, size: 1 },
      limit: { offset: 8, size: 4 },
      padding: { offset: 23, size: 1 },
      present: { offset: 15, size: 1 },
      s: { offset: 18, size: 1 },
      selector: { offset: 12, size: 2 },
      type: { offset: 14, size: 1 },
      unusable: { offset: 22, size: 1 },
    },
    size: 24,
  },
  kvm_sregs: {
    fields: {
      apic_base: { offset: 272, size: 8 },
      cr0: { offset: 224, size: 8 },
      cr2: { offset: 232, size: 8 },
      cr3: { offset: 240, size: 8 },
      cr4: { offset: 248, size: 8 },
      cr8: { offset: 256, size: 8 },
      cs: { offset: 0, size: 24 },
      ds: { offset: 24, size: 24 },
      efer: { offset: 264, size: 8 },
      es: { offset: 48, size: 24 },
      fs: { offset: 72, size: 24 },
      gdt: { offset: 192, size: 16 },
      gs: { offset: 96, size: 24 },
      idt: { offset: 208, size: 16 },
      interrupt_bitmap: { offset: 280, size: 32 },
      ldt: { offset: 168, size: 24 },
      ss: { offset: 120, size: 24 },
      tr: { offset: 144, size: 24 },
    },
    size: 312,
  },
} as const;

/**
 * Every `reason` of a run result (`StopReason` in `core/src/vcpu/exit.rs`).
 *
 * @example
 * ```ts
 * import { STOP_REASONS } from "denovisor/src/_contract.generated.ts";
 * console.log(STOP_REASONS);
 * ```
 */
export const STOP_REASONS = [
  "debug_exit",
  "guest_exit",
  "reset",
  "power_off",
  "guest_fault",
  "bad_hypercall",
  "hlt",
  "shutdown",
  "unhandled_io",
  "unhandled_mmio",
  "internal_error",
  "fail_entry",
  "system_event",
  "unexpected_exit",
  "stopped",
  "timed_out",
  "error",
] as const;

/**
 * The JSON examples in `tests/fixtures/contract/`, by file name without `.json`.
 *
 * @example
 * ```ts
 * import { FIXTURES } from "denovisor/src/_contract.generated.ts";
 * console.log(FIXTURES);
 * ```
 */
export const FIXTURES = [
  "console_stats",
  "contract",
  "exit_bad_hypercall",
  "exit_debug_exit",
  "exit_error",
  "exit_fail_entry",
  "exit_guest_exit",
  "exit_guest_fault",
  "exit_hlt",
  "exit_internal_error",
  "exit_power_off",
  "exit_reset",
  "exit_shutdown",
  "exit_stopped",
  "exit_system_event",
  "exit_timed_out",
  "exit_unexpected_exit",
  "exit_unhandled_io",
  "exit_unhandled_mmio",
  "inspect_bzimage",
  "inspect_elf",
  "inspect_unknown",
  "irq_stats",
  "kvm_fpu",
  "kvm_regs",
  "kvm_sregs",
  "linux_layout",
  "metrics",
] as const;
