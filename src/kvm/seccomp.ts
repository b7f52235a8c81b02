/**
 * The seccomp filters of the core's guest-facing threads (vCPU threads,
 * virtio device workers, the console writer): each runs under an allow-list
 * built for its kind (`core/src/seccomp/rules.rs`). The mode is process-wide
 * and applies to threads started after it is set.
 *
 * - `kill` (the default): a syscall outside the list is a security stop: the
 *   core writes `denovisor: security stop: ...` to stderr and the process
 *   exits with status 148.
 * - `log`: the call proceeds; the kernel logs it (audit type 1326, `dmesg`).
 * - `off`: no filter.
 *
 * @module
 */

import { openCore, SECCOMP_MODES } from "../ffi.ts";
import { DenovisorError } from "../errors.ts";

/** What a filter does with a syscall outside its thread's list. */
export type SeccompMode = "off" | "log" | "kill";

/** The process's exit status after a security stop (128 + SIGSYS). */
export const SECURITY_STOP_EXIT_STATUS = 148;

/** The mode, deny list and counters of the core's filters. */
export interface SeccompStatus {
  /** The mode threads started from now on get. */
  mode: SeccompMode;
  /** Syscalls removed from every list. */
  deny: string[];
  /** Filters installed so far, by thread kind (`vcpu`, `virtio-blk`, ...). */
  installed: Record<string, number>;
  /** Filter installs that failed. */
  failed: number;
}

/** Options of {@link configureSeccomp}. */
export interface SeccompOptions {
  /**
   * Syscalls (x86-64 names like `"pwrite64"`, or numbers) to remove from every
   * thread's list: to tighten further, or to test the filter.
   */
  deny?: readonly (string | number)[];
}

const SYSCALL_NAME = /^[a-z_][a-z0-9_]{0,63}$/;

/**
 * Checks a seccomp mode's spelling.
 *
 * @param mode The candidate.
 * @returns It, typed.
 * @throws {DenovisorError} `INVALID_ARGUMENT` unless `off`, `log` or `kill`.
 * @example
 * ```ts
 * import { checkSeccompMode } from "denovisor/src/kvm/seccomp.ts";
 * console.log(checkSeccompMode("log")); // "log"
 * ```
 */
export function checkSeccompMode(mode: unknown): SeccompMode {
  if (typeof mode === "string" && (SECCOMP_MODES as readonly string[]).includes(mode)) {
    return mode as SeccompMode;
  }
  throw new DenovisorError(
    "INVALID_ARGUMENT",
    `the seccomp mode must be off, log or kill, got ${JSON.stringify(mode)}`,
  );
}

/**
 * Checks a deny list's entries (the core then checks each names a syscall).
 *
 * @param deny Syscall names or numbers.
 * @returns The list as the core takes it (comma-separated).
 * @throws {DenovisorError} `INVALID_ARGUMENT` for an entry that is neither a
 *   lower-case name nor a non-negative integer.
 * @example
 * ```ts
 * import { checkDenyList } from "denovisor/src/kvm/seccomp.ts";
 * console.log(checkDenyList(["pwrite64", 74])); // "pwrite64,74"
 * ```
 */
export function checkDenyList(deny: readonly (string | number)[]): string {
  if (!Array.isArray(deny)) {
    throw new DenovisorError("INVALID_ARGUMENT", "the seccomp deny list must be an array");
  }
  return deny.map((entry) => {
    if (typeof entry === "number" && Number.isSafeInteger(entry) && entry >= 0) {
      return String(entry);
    }
    if (typeof entry === "string" && SYSCALL_NAME.test(entry)) return entry;
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `a seccomp deny entry must be a syscall name or number, got ${JSON.stringify(entry)}`,
    );
  }).join(",");
}

/**
 * Sets the seccomp mode (and deny list) for the core's guest-facing threads
 * started from now on; threads already running keep their filter.
 *
 * @param mode `kill` (default policy), `log` or `off`.
 * @param options The deny list.
 * @throws {DenovisorError} `INVALID_ARGUMENT` for a bad mode or an unknown syscall.
 * @example
 * ```ts
 * import { configureSeccomp } from "denovisor/src/kvm/seccomp.ts";
 * await configureSeccomp("kill", { deny: ["fdatasync"] });
 * ```
 */
export async function configureSeccomp(
  mode: SeccompMode,
  options: SeccompOptions = {},
): Promise<void> {
  const index = SECCOMP_MODES.indexOf(checkSeccompMode(mode));
  const deny = checkDenyList(options.deny ?? []);
  (await openCore()).seccompConfigure(index, deny);
}

/**
 * Reads the current mode, deny list and how many filters were installed.
 *
 * @returns The core's seccomp state.
 * @example
 * ```ts
 * import { seccompStatus } from "denovisor/src/kvm/seccomp.ts";
 * console.log((await seccompStatus()).mode); // "kill" unless changed
 * ```
 */
export async function seccompStatus(): Promise<SeccompStatus> {
  return (await openCore()).seccompStatus<SeccompStatus>();
}
