/**
 * Function VMs on the guest function runtime (`guest/fn/runtime/`): boot one
 * to READY ({@link startFunctionVm}), read the buffers it set up
 * ({@link functionReadyOf}) and run one request step by step with the plain
 * `Vm` API ({@link runRequest}): the reference for the core's `Vm.invoke`, and
 * the test driver.
 *
 * Everything read from the mailbox is written by the guest and is checked
 * against the ABI and the VM's RAM before it is used.
 *
 * @module
 */

import { hrtime } from "node:process";
import { CONSTANTS } from "../_contract.generated.ts";
import { buildFunctionRuntime } from "../build/fn_build.ts";
import { DenovisorError } from "../errors.ts";
import { Vm } from "../vm.ts";
import type {
  FunctionReady,
  FunctionStartOptions,
  InvokeOptions,
  InvokeResult,
} from "./backend.ts";
import { encodeBundle } from "./bundle.ts";

/** Guest RAM of a function VM unless the options say otherwise. */
export const DEFAULT_FUNCTION_MEMORY_MIB = 64;
/** How long booting to READY may take (it includes a 5 ms TSC calibration). */
const INIT_TIMEOUT_MS = 60_000;
/** How long a stepped request may run unless its options say otherwise. */
const REQUEST_TIMEOUT_MS = 60_000;

const C = CONSTANTS;
const OUTCOMES = ["exited", "memory_limit", "output_limit", "init_failed", "signal"] as const;

/** The mailbox page as the guest left it. */
interface Mailbox {
  view: DataView;
  bytes: Uint8Array;
}

function readMailbox(vm: Vm): Mailbox {
  const bytes = vm.readMemory(C.FN_MAILBOX_ADDR, C.FN_MAILBOX_SIZE);
  return { bytes, view: new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength) };
}

function u64(mb: Mailbox, off: number): number {
  const v = mb.view.getBigUint64(off, true);
  // Anything beyond 2^53 is out of range for every field (RAM is far smaller).
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
}

function message(mb: Mailbox): string {
  const raw = mb.bytes.subarray(C.FN_MB_MESSAGE, C.FN_MB_MESSAGE + C.FN_MESSAGE_MAX);
  const end = raw.indexOf(0);
  return new TextDecoder().decode(raw.subarray(0, end < 0 ? raw.length : end))
    .replace(/[^\x20-\x7e]/g, "?");
}

function protocol(what: string): DenovisorError {
  return new DenovisorError("GUEST_CRASHED", `function runtime protocol error: ${what}`);
}

/** The buffers, checked against RAM and against each other. */
function buffersOf(mb: Mailbox, ramBytes: number): FunctionReady & {
  inputAddr: number;
  stdoutAddr: number;
  stderrAddr: number;
} {
  const fields = {
    input: [u64(mb, C.FN_MB_INPUT_ADDR), u64(mb, C.FN_MB_INPUT_CAP)],
    stdout: [u64(mb, C.FN_MB_STDOUT_ADDR), u64(mb, C.FN_MB_STDOUT_CAP)],
    stderr: [u64(mb, C.FN_MB_STDERR_ADDR), u64(mb, C.FN_MB_STDERR_CAP)],
  };
  const low = C.FN_MAILBOX_ADDR + C.FN_MAILBOX_SIZE;
  const ranges = Object.entries(fields).map(([name, [addr, cap]]) => {
    if (addr < low || cap > ramBytes || addr > ramBytes - cap) {
      throw protocol(`the ${name} buffer [${addr}, +${cap}) lies outside guest RAM`);
    }
    return [addr, addr + cap] as const;
  });
  for (let i = 0; i < ranges.length; i++) {
    for (let j = i + 1; j < ranges.length; j++) {
      if (ranges[i][0] < ranges[j][1] && ranges[j][0] < ranges[i][1]) {
        throw protocol("the input and output buffers overlap");
      }
    }
  }
  return {
    inputAddr: fields.input[0],
    inputCapacity: fields.input[1],
    stdoutAddr: fields.stdout[0],
    stdoutCapacity: fields.stdout[1],
    stderrAddr: fields.stderr[0],
    stderrCapacity: fields.stderr[1],
  };
}

function checkHeader(mb: Mailbox): void {
  const magic = mb.view.getUint32(C.FN_MB_MAGIC, true);
  const version = mb.view.getUint32(C.FN_MB_VERSION, true);
  if (magic !== C.FN_MAILBOX_MAGIC) throw protocol(`mailbox magic 0x${magic.toString(16)}`);
  if (version !== C.FN_ABI_VERSION) throw protocol(`mailbox version ${version}`);
}

function ramOf(vm: Vm): number {
  return vm.settings.memoryMiB * 1024 * 1024;
}

/**
 * Boots a function VM to READY: builds the runtime (cached), creates a VM,
 * loads the runtime, writes the bundle (program, argv, env, files) at the top
 * of guest RAM and runs until the runtime's EXIT at READY.
 *
 * @param options The program, its argv, env and files, and the RAM size.
 * @returns The VM, paused at READY (the caller closes it).
 * @throws {DenovisorError} `INVALID_ARGUMENT` for a bad bundle spec,
 *   `DOES_NOT_FIT` when the bundle does not fit RAM, `IMAGE` with the guest's
 *   reason when the runtime refused the bundle or program (INIT_FAILED), and
 *   `GUEST_CRASHED` when the runtime broke the protocol; the VM is closed then.
 * @example
 * ```ts ignore
 * import { runRequest, startFunctionVm } from "denovisor/src/serverless/runtime_vm.ts";
 * using vm = await startFunctionVm({
 *   program: await Deno.readFile(".cache/kernels/busybox-static"),
 *   argv: ["busybox", "wc", "-l"],
 * });
 * const result = await runRequest(vm, new TextEncoder().encode("a\nb\n"));
 * console.log(new TextDecoder().decode(result.stdout)); // "2\n"
 * ```
 */
export async function startFunctionVm(options: FunctionStartOptions): Promise<Vm> {
  if (options === null || typeof options !== "object") {
    throw new DenovisorError("INVALID_ARGUMENT", "options must be an object");
  }
  const bundle = encodeBundle({
    program: options.program,
    argv: options.argv,
    env: options.env,
    files: options.files,
  });
  return await startBundleVm(bundle, { memoryMiB: options.memoryMiB });
}

/**
 * Boots a function VM from an already encoded bundle (see
 * {@link startFunctionVm}; this is the same without the encoding, so a bundle
 * from elsewhere, or a damaged one, can be handed to the runtime as it is).
 *
 * @param bundle The bundle's bytes (`encodeBundle`).
 * @param options Guest RAM in MiB (default {@link DEFAULT_FUNCTION_MEMORY_MIB}).
 * @returns The VM, paused at READY.
 * @throws {DenovisorError} as {@link startFunctionVm} does.
 * @example
 * ```ts ignore
 * import { encodeBundle } from "denovisor/src/serverless/bundle.ts";
 * import { startBundleVm } from "denovisor/src/serverless/runtime_vm.ts";
 * const bundle = encodeBundle({ program: await Deno.readFile("fn.elf"), argv: ["fn"] });
 * using vm = await startBundleVm(bundle, { memoryMiB: 32 });
 * ```
 */
export async function startBundleVm(
  bundle: Uint8Array,
  options: { memoryMiB?: number } = {},
): Promise<Vm> {
  const runtime = await buildFunctionRuntime();
  const vm = await Vm.create({ memoryMiB: options.memoryMiB ?? DEFAULT_FUNCTION_MEMORY_MIB });
  try {
    const ram = ramOf(vm);
    const at = Math.floor((ram - bundle.length) / 4096) * 4096;
    if (at < 4 << 20) {
      throw new DenovisorError(
        "DOES_NOT_FIT",
        `the bundle (${bundle.length} bytes) does not fit a ${vm.settings.memoryMiB} MiB function VM`,
      );
    }
    vm.load(runtime, { mode: "long", arguments: [at, ram] });
    vm.writeMemory(at, bundle);
    const result = await vm.run({ timeoutMs: INIT_TIMEOUT_MS });
    if (result.reason !== "guest_exit") {
      throw new DenovisorError(
        "GUEST_CRASHED",
        `the function runtime did not reach READY: ${result.summary}`,
      );
    }
    const mb = readMailbox(vm);
    checkHeader(mb);
    const state = mb.view.getUint32(C.FN_MB_STATE, true);
    const outcome = mb.view.getUint32(C.FN_MB_OUTCOME, true);
    if (state === C.FN_STATE_DONE && outcome === C.FN_OUTCOME_INIT_FAILED) {
      throw new DenovisorError("IMAGE", `the function did not initialize: ${message(mb)}`);
    }
    if (state !== C.FN_STATE_READY) throw protocol(`state ${state} at the EXIT of init`);
    buffersOf(mb, ram);
    return vm;
  } catch (e) {
    vm.close();
    throw e;
  }
}

/**
 * The buffers a function VM's runtime set up (valid once it is READY).
 *
 * @param vm A VM from {@link startFunctionVm}.
 * @returns The capacities of the input, stdout and stderr.
 * @throws {DenovisorError} `GUEST_CRASHED` when the mailbox is not a valid one.
 * @example
 * ```ts ignore
 * import { functionReadyOf, startFunctionVm } from "denovisor/src/serverless/runtime_vm.ts";
 * using vm = await startFunctionVm({ program: await Deno.readFile("fn.elf"), argv: ["fn"] });
 * console.log(functionReadyOf(vm).inputCapacity);
 * ```
 */
export function functionReadyOf(vm: Vm): FunctionReady {
  const mb = readMailbox(vm);
  checkHeader(mb);
  const { inputCapacity, stdoutCapacity, stderrCapacity } = buffersOf(mb, ramOf(vm));
  return { inputCapacity, stdoutCapacity, stderrCapacity };
}

function limit(value: number | undefined, what: string): bigint {
  if (value === undefined) return 0n;
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `${what} must be a non-negative integer, got ${value}`,
    );
  }
  return BigInt(value);
}

/**
 * Runs one request on a READY function VM with the stepped API: writes the
 * input and the per-request fields (limits, clocks, a fresh seed), resumes the
 * vCPU until the runtime's EXIT, and reads the mailbox, checking every value.
 * A VM runs one request: it is not reset here (the core's `Vm.invoke` resets
 * to the checkpoint); a second call finds the runtime DONE again.
 *
 * @param vm A VM from {@link startFunctionVm}.
 * @param input The program's stdin.
 * @param options Time, memory and output limits.
 * @returns What the request did (`resetNs` and `resetPages` are 0).
 * @throws {DenovisorError} `INVALID_ARGUMENT` for a bad limit.
 * @example
 * ```ts ignore
 * import { runRequest, startFunctionVm } from "denovisor/src/serverless/runtime_vm.ts";
 * using vm = await startFunctionVm({ program: await Deno.readFile("fn.elf"), argv: ["fn"] });
 * const r = await runRequest(vm, new Uint8Array([1, 2, 3]), { outputLimit: 1024 });
 * console.log(r.status, r.outcome, r.exitStatus);
 * ```
 */
export async function runRequest(
  vm: Vm,
  input: Uint8Array,
  options: InvokeOptions = {},
): Promise<InvokeResult> {
  if (!(input instanceof Uint8Array)) {
    throw new DenovisorError("INVALID_ARGUMENT", "input must be a Uint8Array");
  }
  const memoryLimit = limit(options.memoryLimit, "memoryLimit");
  const outputLimit = limit(options.outputLimit, "outputLimit");
  const timeoutMs = options.timeoutMs ?? REQUEST_TIMEOUT_MS;
  const empty = new Uint8Array();
  const failed = (
    status: InvokeResult["status"],
    reason: string,
    extra: Partial<InvokeResult> = {},
  ) => ({
    status,
    outcome: null,
    exitStatus: 0,
    stdout: empty,
    stderr: empty,
    reason,
    runNs: 0,
    resetNs: 0,
    resetPages: 0,
    exits: 0,
    syscalls: 0,
    memoryUsed: 0,
    enosys: [],
    ...extra,
  });

  const ram = ramOf(vm);
  let before: Mailbox;
  let buffers: ReturnType<typeof buffersOf>;
  try {
    before = readMailbox(vm);
    checkHeader(before);
    buffers = buffersOf(before, ram);
  } catch (e) {
    return failed("protocol_error", e instanceof Error ? e.message : String(e));
  }
  if (input.length > buffers.inputCapacity) {
    return failed(
      "input_too_large",
      `the input (${input.length} bytes) is larger than the function's ${buffers.inputCapacity}`,
    );
  }
  if (input.length > 0) vm.writeMemory(buffers.inputAddr, input);
  const fields = new Uint8Array(C.FN_MB_MEMORY_USED - C.FN_MB_INPUT_LEN);
  const view = new DataView(fields.buffer);
  const at = (off: number) => off - C.FN_MB_INPUT_LEN;
  view.setBigUint64(at(C.FN_MB_INPUT_LEN), BigInt(input.length), true);
  // The buffers' fields lie between INPUT_LEN and MEMORY_LIMIT: written back unchanged.
  fields.set(before.bytes.subarray(C.FN_MB_INPUT_LEN + 8, C.FN_MB_MEMORY_LIMIT), 8);
  view.setBigUint64(at(C.FN_MB_MEMORY_LIMIT), memoryLimit, true);
  view.setBigUint64(at(C.FN_MB_OUTPUT_LIMIT), outputLimit, true);
  view.setBigUint64(at(C.FN_MB_REALTIME_NS), BigInt(Date.now()) * 1_000_000n, true);
  view.setBigUint64(at(C.FN_MB_MONOTONIC_NS), hrtime.bigint(), true);
  crypto.getRandomValues(fields.subarray(at(C.FN_MB_SEED), at(C.FN_MB_SEED) + 32));
  vm.writeMemory(C.FN_MAILBOX_ADDR + C.FN_MB_INPUT_LEN, fields);

  const run = await vm.run({ timeoutMs });
  const common = { runNs: run.timings.guestNs, exits: run.exits };
  if (run.reason === "timed_out") {
    return failed("timeout", `the request ran longer than ${timeoutMs} ms`, common);
  }
  if (run.reason === "stopped") return failed("stopped", "the VM was stopped", common);
  if (run.reason !== "guest_exit") return failed("crashed", run.summary, common);

  try {
    const mb = readMailbox(vm);
    checkHeader(mb);
    const state = mb.view.getUint32(C.FN_MB_STATE, true);
    if (state !== C.FN_STATE_DONE) throw protocol(`state ${state} at the EXIT of a request`);
    const code = mb.view.getUint32(C.FN_MB_OUTCOME, true);
    const outcome = OUTCOMES[code];
    if (outcome === undefined) throw protocol(`outcome ${code}`);
    const stdoutLen = u64(mb, C.FN_MB_STDOUT_LEN);
    const stderrLen = u64(mb, C.FN_MB_STDERR_LEN);
    if (stdoutLen > buffers.stdoutCapacity) {
      throw protocol(`stdout_len ${stdoutLen} beyond its capacity`);
    }
    if (stderrLen > buffers.stderrCapacity) {
      throw protocol(`stderr_len ${stderrLen} beyond its capacity`);
    }
    const count = mb.view.getUint32(C.FN_MB_ENOSYS_COUNT, true);
    if (count > C.FN_ENOSYS_MAX) throw protocol(`${count} ENOSYS entries`);
    const enosys = Array.from({ length: count }, (_, i) => ({
      nr: mb.view.getUint32(C.FN_MB_ENOSYS + 8 * i, true),
      count: mb.view.getUint32(C.FN_MB_ENOSYS + 8 * i + 4, true),
    }));
    const status = mb.view.getBigInt64(C.FN_MB_EXIT_STATUS, true);
    const exitStatus = outcome === "signal" || outcome === "exited"
      ? Number(BigInt.asUintN(8, status))
      : 0;
    const why = message(mb);
    return {
      status: "done",
      outcome,
      exitStatus,
      stdout: stdoutLen ? vm.readMemory(buffers.stdoutAddr, stdoutLen) : empty,
      stderr: stderrLen ? vm.readMemory(buffers.stderrAddr, stderrLen) : empty,
      ...(outcome === "exited" ? {} : { reason: why || outcome }),
      ...common,
      resetNs: 0,
      resetPages: 0,
      syscalls: u64(mb, C.FN_MB_SYSCALLS),
      memoryUsed: Math.min(u64(mb, C.FN_MB_MEMORY_USED), ram),
      enosys,
    };
  } catch (e) {
    return failed("protocol_error", e instanceof Error ? e.message : String(e), common);
  }
}
