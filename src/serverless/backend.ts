/**
 * The one seam between the function service (pool, service, CLI `serve`) and
 * the parts of issue 10 built beside it: the guest function runtime
 * (`startFunctionVm`, `buildFunction`, in `runtime_vm.ts` and
 * `src/build/fn_build.ts`) and the reset path of the core (`Vm.checkpoint`,
 * `reset`, `trim`, `functionReady`, `invokeAsync`, in `src/vm.ts`).
 *
 * Nothing else in `src/serverless/`'s pool and service imports them: a
 * {@link FunctionBackend} is all they see (the native backend in `native.ts`
 * is the other one).
 *
 * @module
 */

import { buildFunction as buildSdkFunction } from "../build/fn_build.ts";
import { Vm } from "../vm.ts";
import { startFunctionVm } from "./runtime_vm.ts";

import type { FunctionReady, InvokeOptions, InvokeResult } from "../vm.ts";
export type { FunctionReady, InvokeOptions, InvokeResult };

/**
 * A VM that runs one function: what the pool needs of `Vm` (a `Vm` is one).
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
  start: startFunctionVm,
  restore: (dir) => Vm.restore(dir, { mode: "lazy" }),
};

/**
 * Builds a program written for the guest runtime's SDK (C) into a static ELF
 * (`buildFunction` of `src/build/fn_build.ts`).
 *
 * @param source The C source file.
 * @param out Where the ELF goes (default: a cache path).
 * @returns The ELF's path.
 * @throws {DenovisorError} `BUILD_FAILED` with the compiler's output.
 * @example
 * ```ts ignore
 * import { buildFunction } from "denovisor/src/serverless/backend.ts";
 * const elf = await buildFunction(new URL("./hello.c", import.meta.url));
 * ```
 */
export function buildFunction(source: string | URL, out?: string): Promise<string> {
  return buildSdkFunction(source, out);
}
