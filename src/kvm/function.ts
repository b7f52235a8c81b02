/**
 * Function VMs (issue 10): the shapes of one request's limits and result,
 * and the decoding of the core's fixed-layout result (`dv_fn_invoke`,
 * `LAYOUTS.fn_invoke_result`). The methods are `KvmVm.invoke` and `Vm.invoke`.
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";
import { CONSTANTS, LAYOUTS } from "../_contract.generated.ts";
import type { FnInvokeCall } from "../ffi.ts";

/** Per-request limits of one invocation (`Vm.invoke`'s options). */
export interface InvokeOptions {
  /** Wall-clock limit of the run, in ms: the vCPU is kicked out and the VM reset. */
  timeoutMs?: number;
  /** brk + mmap bytes the program may hold (0: all free guest RAM). */
  memoryLimit?: number;
  /** stdout + stderr bytes the program may write (0: the buffers' capacity). */
  outputLimit?: number;
}

/** What one invocation did (`Vm.invoke`'s answer). Every field the guest wrote is checked by the core. */
export interface InvokeResult {
  /** How the invocation ended, seen from the host. */
  status: "done" | "timeout" | "crashed" | "stopped" | "protocol_error" | "input_too_large";
  /** How the program ended, seen from the guest runtime (with status `done`). */
  outcome: "exited" | "memory_limit" | "output_limit" | "init_failed" | "signal" | null;
  /** The program's exit status (or the signal with outcome `signal`). */
  exitStatus: number;
  /** What the program wrote to stdout. */
  stdout: Uint8Array;
  /** What the program wrote to stderr. */
  stderr: Uint8Array;
  /** Why, for anything but a clean exit. */
  reason?: string;
  /** Time the guest ran, in ns. */
  runNs: number;
  /** Time the reset to the checkpoint took, in ns. */
  resetNs: number;
  /** Pages the reset restored. */
  resetPages: number;
  /** VM exits during the run. */
  exits: number;
  /** System calls the runtime served. */
  syscalls: number;
  /** Peak brk + mmap bytes. */
  memoryUsed: number;
  /** System calls answered with -ENOSYS, by number. */
  enosys: { nr: number; count: number }[];
}

/** The buffers a function VM's runtime set up at READY (`Vm.functionReady`). */
export interface FunctionReady {
  /** The largest input (stdin) in bytes. */
  inputCapacity: number;
  /** The largest stdout in bytes. */
  stdoutCapacity: number;
  /** The largest stderr in bytes. */
  stderrCapacity: number;
}

const STATUSES: Record<number, InvokeResult["status"]> = {
  [CONSTANTS.FN_INVOKE_DONE]: "done",
  [CONSTANTS.FN_INVOKE_TIMEOUT]: "timeout",
  [CONSTANTS.FN_INVOKE_CRASHED]: "crashed",
  [CONSTANTS.FN_INVOKE_STOPPED]: "stopped",
  [CONSTANTS.FN_INVOKE_PROTOCOL_ERROR]: "protocol_error",
  [CONSTANTS.FN_INVOKE_INPUT_TOO_LARGE]: "input_too_large",
};

const OUTCOMES: Record<number, NonNullable<InvokeResult["outcome"]>> = {
  [CONSTANTS.FN_OUTCOME_EXITED]: "exited",
  [CONSTANTS.FN_OUTCOME_MEMORY_LIMIT]: "memory_limit",
  [CONSTANTS.FN_OUTCOME_OUTPUT_LIMIT]: "output_limit",
  [CONSTANTS.FN_OUTCOME_INIT_FAILED]: "init_failed",
  [CONSTANTS.FN_OUTCOME_SIGNAL]: "signal",
};

/** Bytes of the core's result struct. */
export const INVOKE_RESULT_BYTES: number = LAYOUTS.fn_invoke_result.size;

const decoder = new TextDecoder();

function limit(value: number | undefined, what: string): number {
  const v = value ?? 0;
  if (!Number.isSafeInteger(v) || v < 0) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `${what} must be a non-negative integer, got ${value}`,
    );
  }
  return v;
}

/**
 * The buffers of one request, with its limits checked.
 *
 * @param input The request's input.
 * @param options Its limits.
 * @param ready The VM's buffers (output buffers are as large as they are).
 * @param defaultTimeoutMs The time limit when `options` has none.
 * @param reuse A previous call's buffers to reuse (made for the same `ready`).
 * @returns The call's buffers.
 * @throws {DenovisorError} `INVALID_ARGUMENT` for a negative or fractional limit.
 * @example
 * ```ts
 * import { invokeCall } from "denovisor/src/kvm/function.ts";
 * const call = invokeCall(new Uint8Array([1]), { timeoutMs: 100 }, {
 *   inputCapacity: 4096,
 *   stdoutCapacity: 4096,
 *   stderrCapacity: 4096,
 * }, 0);
 * console.log(call.stdout.length); // 4096
 * ```
 */
export function invokeCall(
  input: Uint8Array,
  options: InvokeOptions,
  ready: FunctionReady,
  defaultTimeoutMs: number,
  reuse?: FnInvokeCall,
): FnInvokeCall {
  if (!(input instanceof Uint8Array)) {
    throw new DenovisorError("INVALID_ARGUMENT", "the input must be a Uint8Array");
  }
  const timeoutMs = limit(options.timeoutMs ?? defaultTimeoutMs, "timeoutMs");
  const memoryLimit = limit(options.memoryLimit, "memoryLimit");
  const outputLimit = limit(options.outputLimit, "outputLimit");
  if (reuse) {
    Object.assign(reuse, { input, timeoutMs, memoryLimit, outputLimit });
    return reuse;
  }
  return {
    input,
    timeoutMs,
    memoryLimit,
    outputLimit,
    stdout: new Uint8Array(ready.stdoutCapacity),
    stderr: new Uint8Array(ready.stderrCapacity),
    result: new Uint8Array(INVOKE_RESULT_BYTES),
  };
}

/**
 * Decodes the result of a finished `dv_fn_invoke`.
 *
 * @param call The call's buffers, filled.
 * @returns The result.
 * @example
 * ```ts
 * import { decodeInvokeResult, invokeCall } from "denovisor/src/kvm/function.ts";
 * const call = invokeCall(new Uint8Array(), {}, {
 *   inputCapacity: 1,
 *   stdoutCapacity: 1,
 *   stderrCapacity: 1,
 * }, 0);
 * console.log(decodeInvokeResult(call).status); // "done"
 * ```
 */
export function decodeInvokeResult(call: FnInvokeCall): InvokeResult {
  const f = LAYOUTS.fn_invoke_result.fields;
  const r = call.result;
  const view = new DataView(r.buffer, r.byteOffset, r.byteLength);
  const u32 = (at: number) => view.getUint32(at, true);
  const u64 = (at: number) => Number(view.getBigUint64(at, true));
  const status = STATUSES[u32(f.status.offset)];
  if (status === undefined) {
    throw new DenovisorError("ABI_MISMATCH", `unknown invocation status ${u32(f.status.offset)}`);
  }
  const outcomeCode = u32(f.outcome.offset);
  const reasonLen = Math.min(u32(f.reason_len.offset), f.reason.size);
  const enosysCount = Math.min(u32(f.enosys_count.offset), CONSTANTS.FN_INVOKE_ENOSYS_ENTRIES);
  const enosys = [];
  for (let i = 0; i < enosysCount; i++) {
    enosys.push({
      nr: u32(f.enosys.offset + 8 * i),
      count: u32(f.enosys.offset + 8 * i + 4),
    });
  }
  const stdoutLen = Math.min(u64(f.stdout_len.offset), call.stdout.length);
  const stderrLen = Math.min(u64(f.stderr_len.offset), call.stderr.length);
  const result: InvokeResult = {
    status,
    outcome: outcomeCode === CONSTANTS.FN_INVOKE_NO_OUTCOME ? null : OUTCOMES[outcomeCode] ?? null,
    exitStatus: Number(view.getBigInt64(f.exit_status.offset, true)),
    stdout: call.stdout.slice(0, stdoutLen),
    stderr: call.stderr.slice(0, stderrLen),
    runNs: u64(f.run_ns.offset),
    resetNs: u64(f.reset_ns.offset),
    resetPages: u64(f.reset_pages.offset),
    exits: u64(f.exits.offset),
    syscalls: u64(f.syscalls.offset),
    memoryUsed: u64(f.memory_used.offset),
    enosys,
  };
  if (reasonLen > 0) {
    result.reason = decoder.decode(r.subarray(f.reason.offset, f.reason.offset + reasonLen));
  }
  return result;
}
