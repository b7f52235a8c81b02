/**
 * What kind of KVM this host offers, decided by capability (can `/dev/kvm` be
 * opened, and which KVM module backs it), never by host name. Shared by the
 * test helpers (which tests can run here) and the test command (where each
 * group of tests runs: natively, or inside kvmbox).
 *
 * @module
 */

/**
 * The three kinds of host the suite runs on.
 * - `hardware`: VT-x or AMD-V (`kvm_intel` / `kvm_amd`, including inside kvmbox):
 *   guest kernel code runs at hardware speed.
 * - `pvm`: PVM's software KVM (`kvm_pvm`): guest user mode is native, guest
 *   kernel mode is emulated about 3000x slower, so a Linux kernel never
 *   finishes booting.
 * - `none`: `/dev/kvm` cannot be opened read-write.
 */
export type KvmKind = "hardware" | "pvm" | "none";

/** The host's KVM and, when some tests cannot run on it, why. */
export interface HostKvm {
  /** Which kind of KVM backs `/dev/kvm`. */
  kind: KvmKind;
  /** Why no guest can run here (only for `none`). */
  problem?: string;
  /** Why guest kernel code is too slow for a Linux boot here (`pvm` and `none`). */
  slowKernelProblem?: string;
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * Looks at `/dev/kvm` and `/sys/module`.
 *
 * @returns The host's kind of KVM.
 * @example
 * ```ts
 * import { detectKvm } from "denovisor/tests/_host.ts";
 * console.log(detectKvm().kind); // "hardware", "pvm" or "none"
 * ```
 */
export function detectKvm(): HostKvm {
  try {
    Deno.openSync("/dev/kvm", { read: true, write: true }).close();
  } catch (e) {
    const problem = `/dev/kvm cannot be opened read-write: ${e instanceof Error ? e.message : e}`;
    return { kind: "none", problem, slowKernelProblem: problem };
  }
  const hardware = exists("/sys/module/kvm_intel") || exists("/sys/module/kvm_amd");
  if (!hardware && exists("/sys/module/kvm_pvm")) {
    return {
      kind: "pvm",
      slowKernelProblem: "/dev/kvm is PVM (/sys/module/kvm_pvm): guest kernel code is " +
        "emulated ~3000x slower, so a Linux kernel does not finish booting",
    };
  }
  return { kind: "hardware" };
}

/**
 * Where kvmbox is (`$DENOVISOR_KVMBOX`, else `../shared/kvmbox/kvmbox` beside the
 * checkout), or undefined when it is not there or not executable.
 *
 * @param root The checkout's root folder.
 * @returns The path of the kvmbox script.
 * @example
 * ```ts
 * import { findKvmbox } from "denovisor/tests/_host.ts";
 * console.log(findKvmbox(new URL("../", import.meta.url)) ?? "no kvmbox");
 * ```
 */
export function findKvmbox(root: URL): string | undefined {
  const candidate = Deno.env.get("DENOVISOR_KVMBOX") ??
    decodeURIComponent(new URL("../shared/kvmbox/kvmbox", root).pathname);
  try {
    const info = Deno.statSync(candidate);
    return info.isFile && ((info.mode ?? 0) & 0o111) !== 0 ? candidate : undefined;
  } catch {
    return undefined;
  }
}

/** Test-name tags: the test command selects groups with `deno test --filter`. */
export const TAG = {
  /** Runs a guest on /dev/kvm. */
  kvm: "[kvm] ",
  /** Boots a Linux kernel: needs guest kernel code at hardware speed. */
  linux: "[linux] ",
} as const;
