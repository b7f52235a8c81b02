/**
 * The one seam between the function service (pool, service, CLI `serve`) and
 * the parts of issue 10 built beside it: the guest function runtime
 * (`startFunctionVm`, `buildFunction`, in `runtime_vm.ts` and
 * `src/build/fn_build.ts`) and the reset path of the core (`Vm.checkpoint`,
 * `reset`, `trim`, `functionReady`, `invokeAsync`, in `src/vm.ts`).
 *
 * Until those land, the shapes they export are declared here, word for word,
 * and {@link KVM_BACKEND} refuses to start a function with `NOT_AVAILABLE`.
 * Integration is the few lines marked `INTEGRATION` below: import the real
 * functions and let {@link KVM_BACKEND} call them; nothing else in
 * `src/serverless/` imports them.
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";
import { Vm } from "../vm.ts";

// INTEGRATION: replace these declarations by
//   export type { InvokeOptions, InvokeResult } from "../vm.ts";
//   import { startFunctionVm } from "./runtime_vm.ts";
//   import { buildFunction as buildSdkFunction } from "../build/fn_build.ts";

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

/**
 * A VM that runs one function: what the pool needs of `Vm` once the reset
 * path is in (the methods below exist on `Vm` after integration).
 */
export interface FunctionVm {
  /** Takes the state every request starts from (after READY). */
  checkpoint(): void;
  /** Goes back to the checkpoint. */
  reset(): { pages: number; ns: number };
  /** Gives an idle VM's private pages back to the host. */
  trim(): void;
  /** The runtime's buffers (valid once READY). */
  functionReady(): FunctionReady;
  /** Runs one request to its end, then resets the VM to its checkpoint. */
  invokeAsync(input: Uint8Array, options?: InvokeOptions): Promise<InvokeResult>;
  /** Writes a snapshot into `dir` (see `Vm.snapshot`). */
  snapshot(dir: string, options?: { resume?: boolean }): unknown;
  /** Frees the VM. */
  close(): void;
}

/** A file of a function's read-only file set. */
export interface BundleFile {
  /** The absolute path the program opens. */
  path: string;
  /** Its content. */
  data: Uint8Array;
  /** Its permission bits (default 0644; 0755 for programs). */
  mode?: number;
}

/** What a function VM boots with (`startFunctionVm`'s options). */
export interface FunctionStartOptions {
  /** The program: a static x86-64 Linux ELF. */
  program: Uint8Array;
  /** Its arguments, `argv[0]` first. */
  argv: string[];
  /** Its environment, `NAME=value` strings. */
  env?: string[];
  /** The read-only files it sees. */
  files?: BundleFile[];
  /** Guest RAM in MiB. */
  memoryMiB?: number;
}

/** Boots a function to READY (`startFunctionVm`). */
export type StartFunctionVm = (options: FunctionStartOptions) => Promise<FunctionVm>;

/**
 * Where function VMs come from: the pool boots the first one with `start`,
 * snapshots it, and `restore`s the others from that snapshot.
 */
export interface FunctionBackend {
  /** What the backend is, for metrics and `GET /fn` (`kvm`, `native`). */
  readonly kind: string;
  /** Boots a function to READY; a failed init rejects with the guest's reason. */
  start: StartFunctionVm;
  /** A VM from a snapshot that {@link FunctionVm.snapshot} wrote, at READY, not yet checkpointed. */
  restore(dir: string): Promise<FunctionVm>;
}

/** Why the KVM backend cannot run yet. */
const NOT_WIRED = "the guest function runtime and the VM reset path are not wired into " +
  "src/serverless/backend.ts yet (issue 10 integration)";

/**
 * Function VMs on KVM: the guest function runtime boots the function, and pool
 * VMs are lazy restores of its snapshot (guest memory shared copy-on-write).
 *
 * @example
 * ```ts ignore
 * import { KVM_BACKEND } from "denovisor/src/serverless/backend.ts";
 * const vm = await KVM_BACKEND.start({
 *   program: await Deno.readFile("/bin/busybox"),
 *   argv: ["busybox", "echo", "hi"],
 * });
 * vm.checkpoint();
 * const result = await vm.invokeAsync(new Uint8Array());
 * console.log(new TextDecoder().decode(result.stdout)); // "hi\n"
 * vm.close();
 * ```
 */
export const KVM_BACKEND: FunctionBackend = {
  kind: "kvm",
  // INTEGRATION: start: startFunctionVm,
  start: (_options) => Promise.reject(new DenovisorError("NOT_AVAILABLE", NOT_WIRED)),
  // INTEGRATION: drop the cast once Vm has the reset path (it then is a FunctionVm).
  restore: async (dir) => (await Vm.restore(dir, { mode: "lazy" })) as unknown as FunctionVm,
};

/**
 * Builds a program written for the guest runtime's SDK (C) into a static ELF
 * (`buildFunction` of `src/build/fn_build.ts`).
 *
 * @param source The C source file.
 * @param out Where the ELF goes (default: a cache path).
 * @returns The ELF's path.
 * @throws {DenovisorError} `NOT_AVAILABLE` until the SDK build is wired in.
 * @example
 * ```ts ignore
 * import { buildFunction } from "denovisor/src/serverless/backend.ts";
 * const elf = await buildFunction(new URL("./hello.c", import.meta.url));
 * ```
 */
export function buildFunction(source: string | URL, out?: string): Promise<string> {
  // INTEGRATION: return buildSdkFunction(source, out);
  void source, out;
  return Promise.reject(new DenovisorError("NOT_AVAILABLE", NOT_WIRED));
}
