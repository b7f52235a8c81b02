/**
 * The single boundary between TypeScript and the Rust core: the declarative
 * symbol table of `libdenovisor_core.so` and the thin wrappers that turn its
 * status codes into {@link DenovisorError}s.
 *
 * Nothing outside this file calls `Deno.dlopen` or touches a raw symbol. The
 * core's C ABI contract (see `core/src/abi.rs`): every call returns an `i32`
 * status (0 ok, negative error), handles are opaque `u32`s validated on every
 * call, sync calls leave their message in a thread-local read by
 * `dv_last_error`, and the two blocking calls (`dv_vm_run`, `dv_vcpu_run`) are
 * bound `nonblocking` and return their result or error message in a buffer.
 *
 * @module
 */

import { DenovisorError, errorCodeOfStatus, statusOf } from "./errors.ts";
import { locateCoreLibrary } from "./build/remote_core.ts";
import * as contract from "./_contract.generated.ts";

/** The ABI version this file is written against (`ABI_VERSION` in `core/src/abi/mod.rs`,
 * through the generated contract). */
export const ABI_VERSION: number = contract.ABI_VERSION;

/** `dv_vm_create` flag: stop on port I/O or MMIO that no device claims. */
export const VM_FLAG_STOP_ON_UNHANDLED: number = contract.CONSTANTS.VM_FLAG_STOP_ON_UNHANDLED;
/** `dv_vm_create` flag: KVM's in-kernel irqchip (PIC, IOAPIC, local APICs) and PIT. */
export const VM_FLAG_IRQCHIP: number = contract.CONSTANTS.VM_FLAG_IRQCHIP;
/** `dv_vm_create` flag: guest RAM `MADV_MERGEABLE`, for KSM deduplication. */
export const VM_FLAG_DEDUP: number = contract.CONSTANTS.VM_FLAG_DEDUP;
/** `dv_vm_create_from_snapshot` mode: guest RAM maps the memory file copy-on-write. */
export const RESTORE_LAZY: number = contract.CONSTANTS.RESTORE_LAZY;
/** `dv_vm_create_from_snapshot` mode: the memory file is read in and checksummed. */
export const RESTORE_EAGER: number = contract.CONSTANTS.RESTORE_EAGER;
/** Load flag: keep the image clear of the VMM's boot structures. */
export const LOAD_FLAG_RESERVE_LOW: number = contract.CONSTANTS.LOAD_FLAG_RESERVE_LOW;

/** Register sets of `dv_vcpu_get_state` / `dv_vcpu_set_state`. */
export const StateKind = {
  regs: contract.CONSTANTS.STATE_REGS,
  sregs: contract.CONSTANTS.STATE_SREGS,
  fpu: contract.CONSTANTS.STATE_FPU,
} as const;

/** The status a sync call returns when its buffer is too small (`*out_len` is then
 * the size it needs). */
const BUFFER_TOO_SMALL = statusOf("BUFFER_TOO_SMALL");

/**
 * Parses JSON the core returned. Integers beyond 2^53 (ELF virtual addresses,
 * for instance) come back as `bigint`s instead of losing precision; the core
 * writes other 64-bit values as `"0x..."` strings.
 *
 * @param text The core's JSON.
 * @returns The parsed value.
 * @example
 * ```ts
 * import { parseCoreJson } from "denovisor/src/ffi.ts";
 * console.log(parseCoreJson('{"entry": 18446744071578845184}')); // { entry: 18446744071578845184n }
 * ```
 */
export function parseCoreJson<T>(text: string): T {
  return JSON.parse(
    text,
    (_key, value, context?: { source: string }) =>
      typeof value === "number" && !Number.isSafeInteger(value) && context
        ? BigInt(context.source)
        : value,
  ) as T;
}

/**
 * `int32_t f(uint32_t vm, uint8_t *buf, size_t cap, size_t *out_len)`: the calls
 * that pass a VM and one buffer, most of them reading something of the VM into it
 * (the core's `vm_reader!`).
 */
const VM_READER = { parameters: ["u32", "buffer", "usize", "buffer"], result: "i32" } as const;

/**
 * What `dv_migration_receive` answers: the first frame that is not pages (its
 * kind and payload) and what the pages frames before it wrote.
 *
 * @example
 * ```ts
 * import type { MigrationReceived } from "denovisor/src/ffi.ts";
 * const none: MigrationReceived = {
 *   kind: 6,
 *   payload: new Uint8Array(),
 *   pages: 0,
 *   bytes: 0,
 *   writeNs: 0,
 *   frames: 0,
 * };
 * console.log(none.pages);
 * ```
 */
export interface MigrationReceived {
  /** The frame's kind byte. */
  kind: number;
  /** Its payload. */
  payload: Uint8Array;
  /** Pages written into guest RAM before it. */
  pages: number;
  /** Bytes read for them. */
  bytes: number;
  /** Time spent writing them, ns. */
  writeNs: number;
  /** Pages frames read. */
  frames: number;
}

/** `dv_fn_invoke`'s parameters (bound twice: sync and `nonblocking`). */
const FN_INVOKE_PARAMETERS = [
  "u32",
  "buffer",
  "usize",
  "u64",
  "u64",
  "u64",
  "buffer",
  "usize",
  "buffer",
  "usize",
  "buffer",
  "usize",
] as const;

/**
 * The buffers of one `dv_fn_invoke`: the input, where stdout and stderr are
 * copied, and the fixed-layout result (`LAYOUTS.fn_invoke_result`).
 *
 * @example
 * ```ts
 * import type { FnInvokeCall } from "denovisor/src/ffi.ts";
 * const call: FnInvokeCall = {
 *   input: new Uint8Array(),
 *   timeoutMs: 1000,
 *   memoryLimit: 0,
 *   outputLimit: 0,
 *   stdout: new Uint8Array(16),
 *   stderr: new Uint8Array(16),
 *   result: new Uint8Array(1112),
 * };
 * console.log(call.timeoutMs);
 * ```
 */
export interface FnInvokeCall {
  /** The request's input. */
  input: Uint8Array;
  /** Time limit, ms (0: none). */
  timeoutMs: number;
  /** brk + mmap bytes (0: all free RAM). */
  memoryLimit: number;
  /** stdout + stderr bytes (0: the capacities). */
  outputLimit: number;
  /** Receives stdout. */
  stdout: Uint8Array;
  /** Receives stderr. */
  stderr: Uint8Array;
  /** Receives the result struct. */
  result: Uint8Array;
}

/** The core's symbols, with their C signatures as comments. */
const SYMBOLS = {
  /** uint32_t dv_abi_version(void) */
  dv_abi_version: { parameters: [], result: "u32" },
  /** size_t dv_last_error(uint8_t *buf, size_t cap) */
  dv_last_error: { parameters: ["buffer", "usize"], result: "usize" },
  /** int32_t dv_kvm_check(void) */
  dv_kvm_check: { parameters: [], result: "i32" },
  /** int32_t dv_seccomp_configure(uint32_t mode, const uint8_t *deny, size_t deny_len) */
  dv_seccomp_configure: { parameters: ["u32", "buffer", "usize"], result: "i32" },
  /** int32_t dv_seccomp_status(uint8_t *buf, size_t cap, size_t *out_len) — JSON */
  dv_seccomp_status: { parameters: ["buffer", "usize", "buffer"], result: "i32" },
  /** uint64_t dv_live_handles(void) */
  dv_live_handles: { parameters: [], result: "u64" },
  /** int64_t dv_state_size(uint32_t kind) */
  dv_state_size: { parameters: ["u32"], result: "i64" },
  /** int32_t dv_vm_create(uint64_t mem_bytes, uint32_t flags, uint32_t *out_vm) */
  dv_vm_create: { parameters: ["u64", "u32", "buffer"], result: "i32" },
  /** int32_t dv_vm_close(uint32_t vm) */
  dv_vm_close: { parameters: ["u32"], result: "i32" },
  /** int32_t dv_vm_create_vcpu(uint32_t vm, uint32_t *out_vcpu) */
  dv_vm_create_vcpu: { parameters: ["u32", "buffer"], result: "i32" },
  /** int32_t dv_vm_write_memory(uint32_t vm, uint64_t gpa, const uint8_t *data, size_t len) */
  dv_vm_write_memory: { parameters: ["u32", "u64", "buffer", "usize"], result: "i32" },
  /** int32_t dv_vm_read_memory(uint32_t vm, uint64_t gpa, uint8_t *buf, size_t len) */
  dv_vm_read_memory: { parameters: ["u32", "u64", "buffer", "usize"], result: "i32" },
  /** int32_t dv_vm_load_elf(uint32_t vm, const uint8_t *data, size_t len, uint32_t flags, uint64_t *out_entry) */
  dv_vm_load_elf: { parameters: ["u32", "buffer", "usize", "u32", "buffer"], result: "i32" },
  /** int32_t dv_vm_load_flat(uint32_t vm, const uint8_t *data, size_t len, uint64_t addr, uint32_t flags) */
  dv_vm_load_flat: { parameters: ["u32", "buffer", "usize", "u64", "u32"], result: "i32" },
  /** int32_t dv_vm_set_console_fd(uint32_t vm, int32_t fd) */
  dv_vm_set_console_fd: { parameters: ["u32", "i32"], result: "i32" },
  /** int32_t dv_vm_set_console_rate_limiter(uint32_t vm, const uint8_t *json, size_t len) */
  dv_vm_set_console_rate_limiter: { parameters: ["u32", "buffer", "usize"], result: "i32" },
  /** int32_t dv_vm_console_take(uint32_t vm, uint8_t *buf, size_t cap, size_t *out_len) */
  dv_vm_console_take: VM_READER,
  /** int32_t dv_vm_console_stats(uint32_t vm, uint8_t *buf, size_t cap, size_t *out_len) — JSON */
  dv_vm_console_stats: VM_READER,
  /** int32_t dv_vm_run(uint32_t vm, uint64_t timeout_ms, uint8_t *buf, size_t cap, size_t *out_len) — blocks */
  dv_vm_run: {
    parameters: ["u32", "u64", "buffer", "usize", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  /** int32_t dv_vm_stop(uint32_t vm) */
  dv_vm_stop: { parameters: ["u32"], result: "i32" },
  /** int32_t dv_vm_pause(uint32_t vm) — waits (briefly) for every vCPU to park */
  dv_vm_pause: { parameters: ["u32"], result: "i32" },
  /** int32_t dv_vm_resume(uint32_t vm) */
  dv_vm_resume: { parameters: ["u32"], result: "i32" },
  /** int32_t dv_vm_set_cpuid_policy(uint32_t vm, const uint8_t *json, size_t len) */
  dv_vm_set_cpuid_policy: { parameters: ["u32", "buffer", "usize"], result: "i32" },
  /** int32_t dv_vm_set_msr_filter(uint32_t vm, const uint8_t *json, size_t len) */
  dv_vm_set_msr_filter: { parameters: ["u32", "buffer", "usize"], result: "i32" },
  /** int32_t dv_vm_inject_irq(uint32_t vm, uint32_t line) */
  dv_vm_inject_irq: { parameters: ["u32", "u32"], result: "i32" },
  /** int32_t dv_vm_send_msi(uint32_t vm, uint64_t address, uint32_t data, uint32_t *out_delivered) */
  dv_vm_send_msi: { parameters: ["u32", "u64", "u32", "buffer"], result: "i32" },
  /** int32_t dv_vm_irq_stats(uint32_t vm, uint8_t *buf, size_t cap, size_t *out_len) */
  dv_vm_irq_stats: VM_READER,
  /** int32_t dv_vm_guest_irq_counters(uint32_t vm, uint8_t *buf, size_t cap, size_t *out_len) */
  dv_vm_guest_irq_counters: VM_READER,
  /** int32_t dv_vm_console_input(uint32_t vm, const uint8_t *data, size_t len) */
  dv_vm_console_input: { parameters: ["u32", "buffer", "usize"], result: "i32" },
  /** int32_t dv_vm_add_device(uint32_t vm, const uint8_t *json, size_t len, uint8_t *buf, size_t cap, size_t *out_len) */
  dv_vm_add_device: {
    parameters: ["u32", "buffer", "usize", "buffer", "usize", "buffer"],
    result: "i32",
  },
  /** int32_t dv_vm_devices(uint32_t vm, uint8_t *buf, size_t cap, size_t *out_len) */
  dv_vm_devices: VM_READER,
  /** int32_t dv_vm_device_state(uint32_t vm, uint8_t *buf, size_t cap, size_t *out_len) */
  dv_vm_device_state: VM_READER,
  /** int32_t dv_vm_snapshot_state(uint32_t vm, uint8_t *buf, size_t cap, size_t *out_len) — JSON */
  dv_vm_snapshot_state: VM_READER,
  /** int32_t dv_vm_restore_state(uint32_t vm, const uint8_t *json, size_t len) */
  dv_vm_restore_state: { parameters: ["u32", "buffer", "usize"], result: "i32" },
  /** int32_t dv_vm_snapshot_create(uint32_t vm, const uint8_t *dir, size_t dir_len, const uint8_t *config, size_t config_len, uint8_t *buf, size_t cap, size_t *out_len) — JSON */
  dv_vm_snapshot_create: {
    parameters: ["u32", "buffer", "usize", "buffer", "usize", "buffer", "usize", "buffer"],
    result: "i32",
  },
  /** int32_t dv_vm_snapshot_diff(uint32_t vm, const uint8_t *dir, size_t dir_len, const uint8_t *parent, size_t parent_len, const uint8_t *config, size_t config_len, uint8_t *buf, size_t cap, size_t *out_len) — JSON */
  dv_vm_snapshot_diff: {
    parameters: [
      "u32",
      "buffer",
      "usize",
      "buffer",
      "usize",
      "buffer",
      "usize",
      "buffer",
      "usize",
      "buffer",
    ],
    result: "i32",
  },
  /** int32_t dv_snapshot_inspect(const uint8_t *dir, size_t dir_len, uint8_t *buf, size_t cap, size_t *out_len) — JSON */
  dv_snapshot_inspect: {
    parameters: ["buffer", "usize", "buffer", "usize", "buffer"],
    result: "i32",
  },
  /** int32_t dv_vm_create_from_snapshot(const uint8_t *dir, size_t dir_len, uint32_t mode, uint32_t flags, uint32_t *out_vm) */
  dv_vm_create_from_snapshot: {
    parameters: ["buffer", "usize", "u32", "u32", "buffer"],
    result: "i32",
  },
  /** int32_t dv_vm_restore_snapshot(uint32_t vm, const uint8_t *dir, size_t dir_len) */
  dv_vm_restore_snapshot: { parameters: ["u32", "buffer", "usize"], result: "i32" },
  /** int32_t dv_vm_device_control(uint32_t vm, const uint8_t *name, size_t name_len, const uint8_t *json, size_t len, uint8_t *buf, size_t cap, size_t *out_len) */
  dv_vm_device_control: {
    parameters: ["u32", "buffer", "usize", "buffer", "usize", "buffer", "usize", "buffer"],
    result: "i32",
  },
  /** int32_t dv_vm_report(uint32_t vm, uint8_t *buf, size_t cap, size_t *out_len) */
  dv_vm_report: VM_READER,
  /** int32_t dv_vm_metrics(uint32_t vm, uint8_t *buf, size_t cap, size_t *out_len) */
  dv_vm_metrics: VM_READER,
  /** int32_t dv_vm_ksm(uint32_t vm, uint8_t *buf, size_t cap, size_t *out_len) — JSON */
  dv_vm_ksm: VM_READER,
  /** int32_t dv_vm_memory(uint32_t vm, uint8_t *buf, size_t cap, size_t *out_len) — JSON */
  dv_vm_memory: VM_READER,
  /** int32_t dv_vcpu_run(uint32_t vcpu, uint64_t timeout_ms, uint8_t *buf, size_t cap, size_t *out_len) — blocks */
  dv_vcpu_run: {
    parameters: ["u32", "u64", "buffer", "usize", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  /** int32_t dv_vcpu_get_state(uint32_t vcpu, uint32_t kind, uint8_t *buf, size_t len) */
  dv_vcpu_get_state: { parameters: ["u32", "u32", "buffer", "usize"], result: "i32" },
  /** int32_t dv_vcpu_set_state(uint32_t vcpu, uint32_t kind, const uint8_t *data, size_t len) */
  dv_vcpu_set_state: { parameters: ["u32", "u32", "buffer", "usize"], result: "i32" },
  /** int32_t dv_vcpu_setup_entry(uint32_t vcpu, uint32_t mode, uint64_t entry, uint64_t stack) */
  dv_vcpu_setup_entry: { parameters: ["u32", "u32", "u64", "u64"], result: "i32" },
  // The Linux boot protocol (core/src/abi/linux.rs).
  /** int32_t dv_vm_load_linux(uint32_t vm, const uint8_t *kernel, size_t kernel_len, const uint8_t *initrd, size_t initrd_len, const uint8_t *cmdline, size_t cmdline_len, uint8_t *buf, size_t cap, size_t *out_len) */
  dv_vm_load_linux: {
    parameters: [
      "u32",
      "buffer",
      "usize",
      "buffer",
      "usize",
      "buffer",
      "usize",
      "buffer",
      "usize",
      "buffer",
    ],
    result: "i32",
  },
  /** int32_t dv_vcpu_setup_linux_entry(uint32_t vcpu, uint64_t entry, uint64_t zero_page) */
  dv_vcpu_setup_linux_entry: { parameters: ["u32", "u64", "u64"], result: "i32" },
  /** int32_t dv_inspect_image(const uint8_t *data, size_t len, uint8_t *buf, size_t cap, size_t *out_len) */
  dv_inspect_image: { parameters: ["buffer", "usize", "buffer", "usize", "buffer"], result: "i32" },
  /** int32_t dv_linux_check(const uint8_t *kernel, size_t kernel_len, const uint8_t *initrd, size_t initrd_len, const uint8_t *cmdline, size_t cmdline_len, uint64_t ram_size, uint8_t *buf, size_t cap, size_t *out_len) */
  dv_linux_check: {
    parameters: [
      "buffer",
      "usize",
      "buffer",
      "usize",
      "buffer",
      "usize",
      "u64",
      "buffer",
      "usize",
      "buffer",
    ],
    result: "i32",
  },
  /** int32_t dv_vm_dirty_log(uint32_t vm, uint32_t enable) */
  dv_vm_dirty_log: { parameters: ["u32", "u32"], result: "i32" },
  /** int32_t dv_vm_take_dirty(uint32_t vm, uint8_t *buf, size_t cap, size_t *out_len) — bitmap */
  dv_vm_take_dirty: VM_READER,
  /** int32_t dv_vm_pack_pages(uint32_t vm, const uint8_t *bitmap, size_t bitmap_len, uint64_t from, uint32_t flags, uint8_t *buf, size_t cap, size_t *out_len, uint64_t *out_next) */
  dv_vm_pack_pages: {
    parameters: ["u32", "buffer", "usize", "u64", "u32", "buffer", "usize", "buffer", "buffer"],
    result: "i32",
  },
  /** int32_t dv_vm_unpack_pages(uint32_t vm, const uint8_t *batch, size_t len, uint64_t *out_pages) */
  dv_vm_unpack_pages: VM_READER,
  /** int32_t dv_vm_migration_host(uint32_t vm, uint8_t *buf, size_t cap, size_t *out_len) — JSON */
  dv_vm_migration_host: VM_READER,
  /** int32_t dv_host_check(const uint8_t *host, size_t len) */
  dv_host_check: { parameters: ["buffer", "usize"], result: "i32" },
  /** int32_t dv_vm_migration_state(uint32_t vm, const uint8_t *config, size_t config_len, uint8_t *buf, size_t cap, size_t *out_len) — state bytes */
  dv_vm_migration_state: {
    parameters: ["u32", "buffer", "usize", "buffer", "usize", "buffer"],
    result: "i32",
  },
  /** int32_t dv_vm_apply_migration_state(uint32_t vm, const uint8_t *state, size_t len) */
  dv_vm_apply_migration_state: { parameters: ["u32", "buffer", "usize"], result: "i32" },
  /** int32_t dv_migration_connect(uint32_t transport, const uint8_t *target, size_t len, uint64_t timeout_ms, uint8_t *buf, size_t cap, size_t *out_len, int32_t *out_fd) — blocks */
  dv_migration_connect: {
    parameters: ["u32", "buffer", "usize", "u64", "buffer", "usize", "buffer", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  /** int32_t dv_migration_listen(uint32_t transport, const uint8_t *target, size_t len, int32_t *out_fd, uint32_t *out_port) */
  dv_migration_listen: {
    parameters: ["u32", "buffer", "usize", "buffer", "buffer"],
    result: "i32",
  },
  /** int32_t dv_migration_accept(int32_t listener, uint64_t timeout_ms, uint8_t *buf, size_t cap, size_t *out_len, int32_t *out_fd) — blocks */
  dv_migration_accept: {
    parameters: ["i32", "u64", "buffer", "usize", "buffer", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  /** int32_t dv_migration_close(int32_t fd) */
  dv_migration_close: { parameters: ["i32"], result: "i32" },
  /** int32_t dv_migration_send_frame(int32_t fd, uint32_t kind, const uint8_t *payload, size_t len, uint64_t timeout_ms, uint8_t *buf, size_t cap, size_t *out_len) — blocks */
  dv_migration_send_frame: {
    parameters: ["i32", "u32", "buffer", "usize", "u64", "buffer", "usize", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  /** int32_t dv_migration_receive(uint32_t vm, int32_t fd, uint64_t timeout_ms, uint8_t *buf, size_t cap, size_t *out_len, uint32_t *out_kind, uint64_t *out_stats) — blocks */
  dv_migration_receive: {
    parameters: ["u32", "i32", "u64", "buffer", "usize", "buffer", "buffer", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  /** int32_t dv_vm_migration_take_dirty(uint32_t vm, uint64_t *out_pending) */
  dv_vm_migration_take_dirty: { parameters: ["u32", "buffer"], result: "i32" },
  /** int32_t dv_vm_migration_send_pages(uint32_t vm, int32_t fd, uint32_t flags, uint64_t batch_bytes, uint64_t timeout_ms, uint8_t *buf, size_t cap, size_t *out_len) — blocks; JSON */
  dv_vm_migration_send_pages: {
    parameters: ["u32", "i32", "u32", "u64", "u64", "buffer", "usize", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  /** int32_t dv_vm_migration_end(uint32_t vm) */
  dv_vm_migration_end: { parameters: ["u32"], result: "i32" },
  /** int32_t dv_vm_devices_claim(uint32_t vm, uint32_t claim) — 0: hand over, else take over */
  dv_vm_devices_claim: { parameters: ["u32", "u32"], result: "i32" },
  // Function VMs (core/src/abi/function.rs).
  /** int32_t dv_vm_checkpoint(uint32_t vm, uint32_t *out_shared) */
  dv_vm_checkpoint: { parameters: ["u32", "buffer"], result: "i32" },
  /** int32_t dv_vm_reset(uint32_t vm, uint64_t out[2]) — pages, ns */
  dv_vm_reset: { parameters: ["u32", "buffer"], result: "i32" },
  /** int32_t dv_vm_trim(uint32_t vm, uint64_t *out_resident) */
  dv_vm_trim: { parameters: ["u32", "buffer"], result: "i32" },
  /** int32_t dv_fn_ready(uint32_t vm, uint64_t out[3]) — input, stdout, stderr capacities */
  dv_fn_ready: { parameters: ["u32", "buffer"], result: "i32" },
  /** int32_t dv_fn_invoke(uint32_t vm, const uint8_t *input, size_t input_len, uint64_t timeout_ms, uint64_t memory_limit, uint64_t output_limit, uint8_t *stdout, size_t stdout_cap, uint8_t *stderr, size_t stderr_cap, uint8_t *result, size_t result_len) */
  dv_fn_invoke: { parameters: FN_INVOKE_PARAMETERS, result: "i32" },
  /** dv_fn_invoke, off the JS thread (the event loop runs meanwhile). */
  dv_fn_invoke_async: {
    name: "dv_fn_invoke",
    parameters: FN_INVOKE_PARAMETERS,
    result: "i32",
    nonblocking: true,
  },
} as const satisfies Deno.ForeignLibraryInterface;

type Symbols = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

/** Size of the buffer blocking calls return their JSON result or message in: a run
 * result is well under 1 KiB, so this leaves a wide margin without a retry (a
 * blocking call cannot be repeated to fetch a result that did not fit). */
const RESULT_BUFFER_BYTES = 16 * 1024;
/** First buffer for `dv_vm_snapshot_state`: a several-vCPU VM's KVM state fits. */
const SNAPSHOT_STATE_BUFFER_BYTES = 512 * 1024;

const decoder = new TextDecoder();

/** `%TypedArray%.prototype.byteLength`'s own getter: an array's real size. */
const TYPED_ARRAY_BYTE_LENGTH = Object.getOwnPropertyDescriptor(
  Object.getPrototypeOf(Uint8Array.prototype),
  "byteLength",
)!.get!;

/**
 * The length to pass with `buf` to the core: its real size in bytes, read
 * through the engine's own getter, never the object's `length` (an own or
 * inherited property a caller may redefine, which would let the core read
 * or write past the buffer).
 */
function lengthOf(buf: Uint8Array): bigint {
  if (!(buf instanceof Uint8Array)) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      "a buffer passed to the core must be a Uint8Array",
    );
  }
  return BigInt(TYPED_ARRAY_BYTE_LENGTH.call(buf) as number);
}

/**
 * The loaded core, with one typed method per C function. Methods throw
 * {@link DenovisorError} on a non-zero status.
 */
export class Core {
  readonly #sym: Symbols;
  /** Absolute path of the loaded library. */
  readonly path: string;

  /** Wraps an opened library (use {@link openCore}). */
  constructor(sym: Symbols, path: string) {
    this.#sym = sym;
    this.path = path;
  }

  #lastError(): string {
    const buf = new Uint8Array(1024);
    const len = Number(this.#sym.dv_last_error(buf, lengthOf(buf)));
    return decoder.decode(buf.subarray(0, Math.min(len, buf.length)));
  }

  /** Throws the thread's last error when `status` is not 0. */
  #check(status: number): void {
    if (status !== 0) {
      throw new DenovisorError(errorCodeOfStatus(status), this.#lastError());
    }
  }

  /** Calls a sync function that copies bytes into a buffer, growing the buffer
   * when the core says it is too small. */
  #bytes(
    call: (buf: Uint8Array, cap: bigint, outLen: BigUint64Array) => number,
    initialCap = 4096,
  ): Uint8Array {
    let cap = initialCap;
    for (;;) {
      const buf = new Uint8Array(cap);
      const outLen = new BigUint64Array(1);
      const status = call(buf, BigInt(cap), outLen);
      if (status === BUFFER_TOO_SMALL && Number(outLen[0]) > cap) {
        cap = Number(outLen[0]);
        continue;
      }
      this.#check(status);
      return buf.subarray(0, Number(outLen[0]));
    }
  }

  /** Like {@link Core.#bytes}, for JSON. */
  #json<T>(call: (buf: Uint8Array, cap: bigint, outLen: BigUint64Array) => number): T {
    return JSON.parse(decoder.decode(this.#bytes(call))) as T;
  }

  /** Awaits a blocking call's status and decodes its buffer. */
  async #blocking<T>(
    call: (buf: Uint8Array, cap: bigint, outLen: BigUint64Array) => Promise<number>,
  ): Promise<T> {
    const buf = new Uint8Array(RESULT_BUFFER_BYTES);
    const outLen = new BigUint64Array(1);
    const status = await call(buf, lengthOf(buf), outLen);
    const text = decoder.decode(buf.subarray(0, Number(outLen[0])));
    if (status !== 0) throw new DenovisorError(errorCodeOfStatus(status), text);
    return JSON.parse(text) as T;
  }

  /** `dv_vm_checkpoint`: whether RAM's image is the snapshot's memory file. */
  vmCheckpoint(vm: number): boolean {
    const out = new Uint32Array(1);
    this.#check(this.#sym.dv_vm_checkpoint(vm, out));
    return out[0] === 1;
  }

  /** `dv_vm_reset`: pages restored and ns. */
  vmReset(vm: number): { pages: number; ns: number } {
    const out = new BigUint64Array(2);
    this.#check(this.#sym.dv_vm_reset(vm, out));
    return { pages: Number(out[0]), ns: Number(out[1]) };
  }

  /** `dv_vm_trim`: guest RAM's resident bytes afterwards. */
  vmTrim(vm: number): number {
    const out = new BigUint64Array(1);
    this.#check(this.#sym.dv_vm_trim(vm, out));
    return Number(out[0]);
  }

  /** `dv_fn_ready`: input, stdout and stderr capacities. */
  fnReady(vm: number): [number, number, number] {
    const out = new BigUint64Array(3);
    this.#check(this.#sym.dv_fn_ready(vm, out));
    return [Number(out[0]), Number(out[1]), Number(out[2])];
  }

  #fnArgs(vm: number, c: FnInvokeCall) {
    return [
      vm,
      c.input,
      lengthOf(c.input),
      BigInt(c.timeoutMs),
      BigInt(c.memoryLimit),
      BigInt(c.outputLimit),
      c.stdout,
      lengthOf(c.stdout),
      c.stderr,
      lengthOf(c.stderr),
      c.result,
      lengthOf(c.result),
    ] as const;
  }

  /** Throws a failed `dv_fn_invoke`'s error (its message is in the result's reason). */
  #fnCheck(status: number, c: FnInvokeCall): void {
    if (status === 0) return;
    const f = contract.LAYOUTS.fn_invoke_result.fields;
    const view = new DataView(c.result.buffer, c.result.byteOffset, c.result.byteLength);
    const len = c.result.length >= f.reason.offset
      ? Math.min(view.getUint32(f.reason_len.offset, true), f.reason.size)
      : 0;
    const message = len > 0
      ? decoder.decode(c.result.subarray(f.reason.offset, f.reason.offset + len))
      : this.#lastError();
    throw new DenovisorError(errorCodeOfStatus(status), message);
  }

  /** `dv_fn_invoke` on this thread (blocks it for the whole request). */
  fnInvoke(vm: number, call: FnInvokeCall): void {
    this.#fnCheck(this.#sym.dv_fn_invoke(...this.#fnArgs(vm, call)), call);
  }

  /** `dv_fn_invoke` off the JS thread. */
  async fnInvokeAsync(vm: number, call: FnInvokeCall): Promise<void> {
    this.#fnCheck(await this.#sym.dv_fn_invoke_async(...this.#fnArgs(vm, call)), call);
  }

  /** `dv_abi_version`. */
  abiVersion(): number {
    return this.#sym.dv_abi_version();
  }

  /** `dv_kvm_check`: throws `KVM_UNAVAILABLE` when /dev/kvm cannot be used. */
  kvmCheck(): void {
    this.#check(this.#sym.dv_kvm_check());
  }

  /** `dv_seccomp_configure`: mode 0 off, 1 log, 2 kill; `deny` comma-separated. */
  seccompConfigure(mode: number, deny: string): void {
    const text = new TextEncoder().encode(deny);
    this.#check(this.#sym.dv_seccomp_configure(mode, text, BigInt(text.length)));
  }

  /** `dv_seccomp_status`: the mode, deny list and filter counters as parsed JSON. */
  seccompStatus<T>(): T {
    return this.#json((buf, cap, outLen) => this.#sym.dv_seccomp_status(buf, cap, outLen));
  }

  /** `dv_live_handles`: live VM and vCPU handles in this process. */
  liveHandles(): number {
    return Number(this.#sym.dv_live_handles());
  }

  /** `dv_state_size`. */
  stateSize(kind: number): number {
    return Number(this.#sym.dv_state_size(kind));
  }

  /** `dv_vm_create`: returns the VM handle. */
  vmCreate(memBytes: number, flags: number): number {
    const out = new Uint32Array(1);
    this.#check(this.#sym.dv_vm_create(BigInt(memBytes), flags, out));
    return out[0];
  }

  /** `dv_vm_close`. */
  vmClose(vm: number): void {
    this.#check(this.#sym.dv_vm_close(vm));
  }

  /** `dv_vm_create_vcpu`: returns the vCPU handle. */
  vmCreateVcpu(vm: number): number {
    const out = new Uint32Array(1);
    this.#check(this.#sym.dv_vm_create_vcpu(vm, out));
    return out[0];
  }

  /** `dv_vm_write_memory`. */
  vmWriteMemory(vm: number, gpa: bigint, data: Uint8Array): void {
    this.#check(this.#sym.dv_vm_write_memory(vm, gpa, data, lengthOf(data)));
  }

  /** `dv_vm_read_memory`. */
  vmReadMemory(vm: number, gpa: bigint, length: number): Uint8Array {
    const buf = new Uint8Array(length);
    this.#check(this.#sym.dv_vm_read_memory(vm, gpa, buf, BigInt(length)));
    return buf;
  }

  /** `dv_vm_load_elf`: returns the entry point. */
  vmLoadElf(vm: number, image: Uint8Array, flags: number): bigint {
    const entry = new BigUint64Array(1);
    this.#check(this.#sym.dv_vm_load_elf(vm, image, lengthOf(image), flags, entry));
    return entry[0];
  }

  /** `dv_vm_load_flat`. */
  vmLoadFlat(vm: number, image: Uint8Array, addr: bigint, flags: number): void {
    this.#check(this.#sym.dv_vm_load_flat(vm, image, lengthOf(image), addr, flags));
  }

  /** `dv_vm_set_console_fd` (`-1` stops streaming). */
  vmSetConsoleFd(vm: number, fd: number): void {
    this.#check(this.#sym.dv_vm_set_console_fd(vm, fd));
  }

  /** `dv_vm_set_console_rate_limiter` from the limiter's JSON (`""` removes it). */
  vmSetConsoleRateLimiter(vm: number, json: string): void {
    const bytes = new TextEncoder().encode(json);
    this.#check(this.#sym.dv_vm_set_console_rate_limiter(vm, bytes, lengthOf(bytes)));
  }

  /** `dv_vm_console_stats`: the console's cumulative counts as parsed JSON. */
  vmConsoleStats<T>(vm: number): T {
    return this.#json((buf, cap, outLen) => this.#sym.dv_vm_console_stats(vm, buf, cap, outLen));
  }

  /** `dv_vm_console_take`, repeated until the buffer is drained. */
  vmConsoleTake(vm: number): Uint8Array {
    const chunks: Uint8Array[] = [];
    const outLen = new BigUint64Array(1);
    for (;;) {
      const buf = new Uint8Array(64 * 1024);
      this.#check(this.#sym.dv_vm_console_take(vm, buf, lengthOf(buf), outLen));
      const n = Number(outLen[0]);
      if (n === 0) break;
      chunks.push(buf.subarray(0, n));
      if (n < buf.length) break;
    }
    if (chunks.length === 1) return chunks[0];
    const all = new Uint8Array(chunks.reduce((sum, c) => sum + c.length, 0));
    let at = 0;
    for (const c of chunks) {
      all.set(c, at);
      at += c.length;
    }
    return all;
  }

  /** `dv_vm_run` (off the JS thread): the run result as parsed JSON. */
  vmRun<T>(vm: number, timeoutMs: number): Promise<T> {
    return this.#blocking((buf, cap, outLen) =>
      this.#sym.dv_vm_run(vm, BigInt(timeoutMs), buf, cap, outLen)
    );
  }

  /** `dv_vm_stop`. */
  vmStop(vm: number): void {
    this.#check(this.#sym.dv_vm_stop(vm));
  }

  /** `dv_vm_pause`. */
  vmPause(vm: number): void {
    this.#check(this.#sym.dv_vm_pause(vm));
  }

  /** `dv_vm_resume`. */
  vmResume(vm: number): void {
    this.#check(this.#sym.dv_vm_resume(vm));
  }

  /** `dv_vm_set_cpuid_policy` from the policy's JSON. */
  vmSetCpuidPolicy(vm: number, json: string): void {
    const bytes = new TextEncoder().encode(json);
    this.#check(this.#sym.dv_vm_set_cpuid_policy(vm, bytes, lengthOf(bytes)));
  }

  /** `dv_vm_set_msr_filter` from the policy's JSON. */
  vmSetMsrFilter(vm: number, json: string): void {
    const bytes = new TextEncoder().encode(json);
    this.#check(this.#sym.dv_vm_set_msr_filter(vm, bytes, lengthOf(bytes)));
  }

  /** `dv_vm_inject_irq`: one edge on GSI `line`. */
  vmInjectIrq(vm: number, line: number): void {
    this.#check(this.#sym.dv_vm_inject_irq(vm, line));
  }

  /** `dv_vm_send_msi`: whether a local APIC accepted the MSI. */
  vmSendMsi(vm: number, address: bigint, data: number): boolean {
    const delivered = new Uint32Array(1);
    this.#check(this.#sym.dv_vm_send_msi(vm, address, data, delivered));
    return delivered[0] === 1;
  }

  /** `dv_vm_irq_stats`: the host's interrupt counters as parsed JSON. */
  vmIrqStats<T>(vm: number): T {
    return this.#json((buf, cap, outLen) => this.#sym.dv_vm_irq_stats(vm, buf, cap, outLen));
  }

  /** `dv_vm_add_device` from the device's JSON configuration; returns its name. */
  vmAddDevice(vm: number, json: string): string {
    const config = new TextEncoder().encode(json);
    const name = this.#bytes((buf, cap, outLen) =>
      this.#sym.dv_vm_add_device(vm, config, lengthOf(config), buf, cap, outLen)
    );
    return new TextDecoder().decode(name);
  }

  /** `dv_vm_devices`: the VM's devices as parsed JSON. */
  vmDevices<T>(vm: number): T {
    return this.#json((buf, cap, outLen) => this.#sym.dv_vm_devices(vm, buf, cap, outLen));
  }

  /** `dv_vm_device_state`: every device's state as parsed JSON. */
  vmDeviceState<T>(vm: number): T {
    return this.#json((buf, cap, outLen) => this.#sym.dv_vm_device_state(vm, buf, cap, outLen));
  }

  /**
   * `dv_vm_snapshot_state`: a paused VM's KVM state, as JSON text. The first
   * buffer holds a few vCPUs' state (tens of KiB each), so the core captures
   * the state once, not a second time after BUFFER_TOO_SMALL.
   */
  vmSnapshotState(vm: number): string {
    const bytes = this.#bytes(
      (buf, cap, outLen) => this.#sym.dv_vm_snapshot_state(vm, buf, cap, outLen),
      SNAPSHOT_STATE_BUFFER_BYTES,
    );
    return decoder.decode(bytes);
  }

  /** `dv_vm_snapshot_create`: writes a snapshot of the paused VM into `dir`. */
  vmSnapshotCreate<T>(vm: number, dir: string, config: string): T {
    const d = new TextEncoder().encode(dir);
    const c = new TextEncoder().encode(config);
    return this.#json((buf, cap, outLen) =>
      this.#sym.dv_vm_snapshot_create(
        vm,
        d,
        lengthOf(d),
        c,
        lengthOf(c),
        buf,
        cap,
        outLen,
      )
    );
  }

  /** `dv_vm_snapshot_diff`: writes a diff snapshot of the paused VM into
   * `dir`, against `parent` (its last snapshot). */
  vmSnapshotDiff<T>(vm: number, dir: string, parent: string, config: string): T {
    const d = new TextEncoder().encode(dir);
    const p = new TextEncoder().encode(parent);
    const c = new TextEncoder().encode(config);
    return this.#json((buf, cap, outLen) =>
      this.#sym.dv_vm_snapshot_diff(
        vm,
        d,
        lengthOf(d),
        p,
        lengthOf(p),
        c,
        lengthOf(c),
        buf,
        cap,
        outLen,
      )
    );
  }

  /** `dv_snapshot_inspect`: the verified contents of the snapshot in `dir`. */
  snapshotInspect<T>(dir: string): T {
    const d = new TextEncoder().encode(dir);
    return this.#json((buf, cap, outLen) =>
      this.#sym.dv_snapshot_inspect(d, lengthOf(d), buf, cap, outLen)
    );
  }

  /** `dv_vm_create_from_snapshot`: a VM whose RAM is the snapshot's; its handle. */
  vmCreateFromSnapshot(dir: string, mode: number, flags: number): number {
    const d = new TextEncoder().encode(dir);
    const out = new Uint32Array(1);
    this.#check(this.#sym.dv_vm_create_from_snapshot(d, lengthOf(d), mode, flags, out));
    return out[0];
  }

  /** `dv_vm_restore_snapshot`: applies the snapshot's VM and device state. */
  vmRestoreSnapshot(vm: number, dir: string): void {
    const d = new TextEncoder().encode(dir);
    this.#check(this.#sym.dv_vm_restore_snapshot(vm, d, lengthOf(d)));
  }

  /** `dv_vm_restore_state`: restores JSON text from `vmSnapshotState`. */
  vmRestoreState(vm: number, state: string): void {
    const bytes = new TextEncoder().encode(state);
    this.#check(this.#sym.dv_vm_restore_state(vm, bytes, lengthOf(bytes)));
  }

  /** `dv_vm_dirty_log`: dirty-page tracking on (a new set) or off. */
  vmDirtyLog(vm: number, enable: boolean): void {
    this.#check(this.#sym.dv_vm_dirty_log(vm, enable ? 1 : 0));
  }

  /** `dv_vm_take_dirty`: the dirty-page bitmap (little-endian 64-bit words),
   * cleared in the core (a buffer too small takes nothing: it is retried). */
  vmTakeDirty(vm: number): Uint8Array {
    return this.#bytes((buf, cap, outLen) => this.#sym.dv_vm_take_dirty(vm, buf, cap, outLen));
  }

  /** `dv_vm_pack_pages`: packs pages of `bitmap` from page `from` into `out`;
   * returns the bytes written and the page to continue from. */
  vmPackPages(
    vm: number,
    bitmap: Uint8Array,
    from: number,
    skipZero: boolean,
    out: Uint8Array,
  ): { length: number; next: number } {
    const outLen = new BigUint64Array(1);
    const outNext = new BigUint64Array(1);
    this.#check(
      this.#sym.dv_vm_pack_pages(
        vm,
        bitmap,
        lengthOf(bitmap),
        BigInt(from),
        skipZero ? 1 : 0,
        out,
        lengthOf(out),
        outLen,
        outNext,
      ),
    );
    return { length: Number(outLen[0]), next: Number(outNext[0]) };
  }

  /** `dv_vm_unpack_pages`: writes a batch of packed pages into RAM; returns the page count. */
  vmUnpackPages(vm: number, batch: Uint8Array): number {
    const out = new BigUint64Array(1);
    this.#check(this.#sym.dv_vm_unpack_pages(vm, batch, lengthOf(batch), out));
    return Number(out[0]);
  }

  /** `dv_vm_migration_host`: the paused VM's `host` section, parsed. */
  vmMigrationHost<T>(vm: number): T {
    return this.#json((buf, cap, outLen) => this.#sym.dv_vm_migration_host(vm, buf, cap, outLen));
  }

  /** `dv_host_check`: refuses a `host` section this host cannot run. */
  hostCheck(host: string): void {
    const bytes = new TextEncoder().encode(host);
    this.#check(this.#sym.dv_host_check(bytes, lengthOf(bytes)));
  }

  /** `dv_vm_migration_state`: the paused VM's state bytes without memory. */
  vmMigrationState(vm: number, config: string): Uint8Array {
    const c = new TextEncoder().encode(config);
    return this.#bytes(
      (buf, cap, outLen) => this.#sym.dv_vm_migration_state(vm, c, lengthOf(c), buf, cap, outLen),
      1 << 20,
    );
  }

  /** `dv_vm_apply_migration_state`: verifies and applies migration state bytes. */
  vmApplyMigrationState(vm: number, state: Uint8Array): void {
    this.#check(this.#sym.dv_vm_apply_migration_state(vm, state, lengthOf(state)));
  }

  /** Awaits a blocking call that answers raw bytes (or its error message) in `buf`. */
  async #blockingBytes(
    call: (buf: Uint8Array, cap: bigint, outLen: BigUint64Array) => Promise<number>,
    cap = RESULT_BUFFER_BYTES,
  ): Promise<Uint8Array> {
    const buf = new Uint8Array(cap);
    const outLen = new BigUint64Array(1);
    const status = await call(buf, lengthOf(buf), outLen);
    const out = buf.subarray(0, Math.min(Number(outLen[0]), buf.length));
    if (status !== 0) throw new DenovisorError(errorCodeOfStatus(status), decoder.decode(out));
    return out;
  }

  /** `dv_migration_connect` (off the JS thread): the connected socket's fd. */
  async migrationConnect(transport: number, target: string, timeoutMs: number): Promise<number> {
    const t = new TextEncoder().encode(target);
    const fd = new Int32Array(1);
    await this.#blockingBytes((buf, cap, outLen) =>
      this.#sym.dv_migration_connect(
        transport,
        t,
        lengthOf(t),
        BigInt(timeoutMs),
        buf,
        cap,
        outLen,
        fd,
      )
    );
    return fd[0];
  }

  /** `dv_migration_listen`: the listener's fd and TCP port. */
  migrationListen(transport: number, target: string): { fd: number; port: number } {
    const t = new TextEncoder().encode(target);
    const fd = new Int32Array(1);
    const port = new Uint32Array(1);
    this.#check(this.#sym.dv_migration_listen(transport, t, lengthOf(t), fd, port));
    return { fd: fd[0], port: port[0] };
  }

  /** `dv_migration_accept` (off the JS thread): the accepted socket's fd. */
  async migrationAccept(listener: number, timeoutMs: number): Promise<number> {
    const fd = new Int32Array(1);
    await this.#blockingBytes((buf, cap, outLen) =>
      this.#sym.dv_migration_accept(listener, BigInt(timeoutMs), buf, cap, outLen, fd)
    );
    return fd[0];
  }

  /** `dv_migration_close`. */
  migrationClose(fd: number): void {
    this.#check(this.#sym.dv_migration_close(fd));
  }

  /** `dv_migration_send_frame` (off the JS thread). */
  async migrationSendFrame(
    fd: number,
    kind: number,
    payload: Uint8Array,
    timeoutMs: number,
  ): Promise<void> {
    await this.#blockingBytes((buf, cap, outLen) =>
      this.#sym.dv_migration_send_frame(
        fd,
        kind,
        payload,
        lengthOf(payload),
        BigInt(timeoutMs),
        buf,
        cap,
        outLen,
      )
    );
  }

  /** `dv_migration_receive` (off the JS thread): pages frames into `vm`'s RAM
   * (0: none), then the first other frame. */
  async migrationReceive(
    vm: number,
    fd: number,
    timeoutMs: number,
    cap: number,
  ): Promise<MigrationReceived> {
    const kind = new Uint32Array(1);
    const stats = new BigUint64Array(4);
    const payload = await this.#blockingBytes(
      (buf, c, outLen) =>
        this.#sym.dv_migration_receive(vm, fd, BigInt(timeoutMs), buf, c, outLen, kind, stats),
      cap,
    );
    return {
      kind: kind[0],
      payload,
      pages: Number(stats[0]),
      bytes: Number(stats[1]),
      writeNs: Number(stats[2]),
      frames: Number(stats[3]),
    };
  }

  /** `dv_vm_migration_take_dirty`: the pages pending after taking the dirty set. */
  vmMigrationTakeDirty(vm: number): number {
    const out = new BigUint64Array(1);
    this.#check(this.#sym.dv_vm_migration_take_dirty(vm, out));
    return Number(out[0]);
  }

  /** `dv_vm_migration_send_pages` (off the JS thread): the round's figures. */
  async vmMigrationSendPages<T>(
    vm: number,
    fd: number,
    flags: number,
    batchBytes: number,
    timeoutMs: number,
  ): Promise<T> {
    const bytes = await this.#blockingBytes((buf, cap, outLen) =>
      this.#sym.dv_vm_migration_send_pages(
        vm,
        fd,
        flags,
        BigInt(batchBytes),
        BigInt(timeoutMs),
        buf,
        cap,
        outLen,
      )
    );
    return JSON.parse(decoder.decode(bytes)) as T;
  }

  /** `dv_vm_migration_end`: forgets the VM's pending pages. */
  vmMigrationEnd(vm: number): void {
    this.#check(this.#sym.dv_vm_migration_end(vm));
  }

  /** `dv_vm_device_control`: a device's answer to a JSON request, parsed. */
  vmDeviceControl<T>(vm: number, name: string, json: string): T {
    const n = new TextEncoder().encode(name);
    const request = new TextEncoder().encode(json);
    return this.#json((buf, cap, outLen) =>
      this.#sym.dv_vm_device_control(
        vm,
        n,
        lengthOf(n),
        request,
        lengthOf(request),
        buf,
        cap,
        outLen,
      )
    );
  }

  /** `dv_vm_guest_irq_counters`: the guest's published counters, by vector. */
  vmGuestIrqCounters(vm: number): BigUint64Array {
    const bytes = this.#bytes((buf, cap, outLen) =>
      this.#sym.dv_vm_guest_irq_counters(vm, buf, cap, outLen)
    );
    return new BigUint64Array(bytes.slice().buffer);
  }

  /** `dv_vm_console_input`. */
  vmConsoleInput(vm: number, data: Uint8Array): void {
    this.#check(this.#sym.dv_vm_console_input(vm, data, lengthOf(data)));
  }

  /** `dv_vm_report`: the guest's last REPORT (empty when none). */
  vmReport(vm: number): Uint8Array {
    return this.#bytes((buf, cap, outLen) => this.#sym.dv_vm_report(vm, buf, cap, outLen));
  }

  /** `dv_vm_metrics`: per-vCPU metrics as parsed JSON. */
  vmMetrics<T>(vm: number): T {
    return this.#json((buf, cap, outLen) => this.#sym.dv_vm_metrics(vm, buf, cap, outLen));
  }

  /** `dv_vm_ksm`: the VM's dedup flag and KSM's counters as parsed JSON. */
  vmKsm<T>(vm: number): T {
    return this.#json((buf, cap, outLen) => this.#sym.dv_vm_ksm(vm, buf, cap, outLen));
  }

  /** `dv_vm_memory`: the VM's RAM size and resident bytes as parsed JSON. */
  vmMemory<T>(vm: number): T {
    return this.#json((buf, cap, outLen) => this.#sym.dv_vm_memory(vm, buf, cap, outLen));
  }

  /** `dv_vcpu_run` (off the JS thread): the run result as parsed JSON. */
  vcpuRun<T>(vcpu: number, timeoutMs: number): Promise<T> {
    return this.#blocking((buf, cap, outLen) =>
      this.#sym.dv_vcpu_run(vcpu, BigInt(timeoutMs), buf, cap, outLen)
    );
  }

  /** `dv_vcpu_get_state`: the raw KVM struct bytes. */
  vcpuGetState(vcpu: number, kind: number): Uint8Array {
    const size = this.stateSize(kind);
    if (size < 0) throw new DenovisorError("INVALID_ARGUMENT", `unknown register set ${kind}`);
    const buf = new Uint8Array(size);
    this.#check(this.#sym.dv_vcpu_get_state(vcpu, kind, buf, lengthOf(buf)));
    return buf;
  }

  /** `dv_vcpu_set_state` from raw KVM struct bytes. */
  vcpuSetState(vcpu: number, kind: number, data: Uint8Array): void {
    this.#check(this.#sym.dv_vcpu_set_state(vcpu, kind, data, lengthOf(data)));
  }

  /** `dv_vcpu_setup_entry` (`mode`: 0 real, 1 long, 2 user). */
  vcpuSetupEntry(vcpu: number, mode: number, entry: bigint, stack: bigint): void {
    this.#check(this.#sym.dv_vcpu_setup_entry(vcpu, mode, entry, stack));
  }

  /** `dv_vm_load_linux`: where the kernel, initrd, command line and zero page
   * went, as parsed JSON. */
  vmLoadLinux<T>(vm: number, kernel: Uint8Array, initrd: Uint8Array, cmdline: Uint8Array): T {
    return this.#json((buf, cap, outLen) =>
      this.#sym.dv_vm_load_linux(
        vm,
        kernel,
        lengthOf(kernel),
        initrd,
        lengthOf(initrd),
        cmdline,
        lengthOf(cmdline),
        buf,
        cap,
        outLen,
      )
    );
  }

  /** `dv_vcpu_setup_linux_entry`: RIP = `entry`, RSI = `zeroPage`, boot GDT. */
  vcpuSetupLinuxEntry(vcpu: number, entry: bigint, zeroPage: bigint): void {
    this.#check(this.#sym.dv_vcpu_setup_linux_entry(vcpu, entry, zeroPage));
  }

  /** `dv_linux_check`: every check of `vmLoadLinux` without a VM (no /dev/kvm);
   * the layout a load would produce. */
  linuxCheck<T>(kernel: Uint8Array, initrd: Uint8Array, cmdline: Uint8Array, ramBytes: bigint): T {
    return this.#json((buf, cap, outLen) =>
      this.#sym.dv_linux_check(
        kernel,
        lengthOf(kernel),
        initrd,
        lengthOf(initrd),
        cmdline,
        lengthOf(cmdline),
        ramBytes,
        buf,
        cap,
        outLen,
      )
    );
  }

  /** `dv_inspect_image`: what the loaders see in an image, as parsed JSON;
   * integers beyond 2^53 (ELF virtual addresses) come back as `bigint`s. */
  inspectImage<T>(image: Uint8Array): T {
    const bytes = this.#bytes((buf, cap, outLen) =>
      this.#sym.dv_inspect_image(image, lengthOf(image), buf, cap, outLen)
    );
    return parseCoreJson<T>(decoder.decode(bytes));
  }

  /** `dv_vm_devices_claim`: gives up (false) or claims (true) the devices'
   * exclusive host resources. */
  vmDevicesClaim(vm: number, claim: boolean): void {
    this.#check(this.#sym.dv_vm_devices_claim(vm, claim ? 1 : 0));
  }
}

let opening: Promise<Core> | undefined;

/**
 * The seccomp modes, indexed by their number in `dv_seccomp_configure`.
 *
 * @example
 * ```ts
 * import { SECCOMP_MODES } from "denovisor/src/ffi.ts";
 * console.log(SECCOMP_MODES.indexOf("kill")); // 2
 * ```
 */
export const SECCOMP_MODES = ["off", "log", "kill"] as const;

/** Reads an env var, or undefined without the permission. */
function envVar(name: string): string | undefined {
  try {
    return Deno.env.get(name);
  } catch {
    return undefined;
  }
}

/**
 * Applies `DENOVISOR_SECCOMP` (`off`, `log` or `kill`) and
 * `DENOVISOR_SECCOMP_DENY` (comma-separated syscalls) as the process's default
 * seccomp mode when the core loads (tests and CI); unset, the core's own
 * default (`kill`) stands.
 */
function applySeccompEnv(core: Core): void {
  const mode = envVar("DENOVISOR_SECCOMP");
  const deny = envVar("DENOVISOR_SECCOMP_DENY") ?? "";
  if (!mode && deny === "") return;
  const index = SECCOMP_MODES.indexOf((mode || "kill") as (typeof SECCOMP_MODES)[number]);
  if (index < 0) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `DENOVISOR_SECCOMP must be off, log or kill, got ${JSON.stringify(mode)}`,
    );
  }
  core.seccompConfigure(index, deny);
}

/**
 * Loads the core once per process: locates (building if needed) the library,
 * opens it and checks its ABI version. `DENOVISOR_LIB` overrides the path.
 *
 * @returns The loaded core.
 * @example
 * ```ts
 * import { openCore } from "denovisor/src/ffi.ts";
 * const core = await openCore();
 * console.log(core.abiVersion());
 * ```
 */
export function openCore(): Promise<Core> {
  opening ??= (async () => {
    const path = await locateCoreLibrary(new URL("../", import.meta.url));
    let lib: Deno.DynamicLibrary<typeof SYMBOLS>;
    try {
      lib = Deno.dlopen(path, SYMBOLS);
    } catch (e) {
      throw new DenovisorError("ABI_MISMATCH", `cannot load the core library ${path}: ${e}`, {
        cause: e,
      });
    }
    const core = new Core(lib.symbols, path);
    const version = core.abiVersion();
    if (version !== ABI_VERSION) {
      lib.close();
      throw new DenovisorError(
        "ABI_MISMATCH",
        `the core library ${path} speaks ABI ${version}, this module needs ${ABI_VERSION}: rebuild it`,
      );
    }
    applySeccompEnv(core);
    return core;
  })();
  // A failed load (e.g. cargo missing) may be fixed and retried in-process.
  opening.catch(() => opening = undefined);
  return opening;
}
