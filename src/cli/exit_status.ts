/**
 * Process exit statuses of the CLI, in one place (README's "The command line"
 * lists them). Three families that never collide:
 *
 * - odd: a guest's debug-exit code `(v << 1) | 1` (QEMU's `isa-debug-exit`);
 * - 130..254, even: a guest's EXIT hypercall with status `s != 0`, as
 *   `128 + 2 * min(s, 63)` (254 means 63 or more; the exact `u32` is in the
 *   summary line and in `RunResult.exitCode`); `s == 0` is 0;
 * - every other even number below 130: denovisor's own {@link ExitStatus}.
 *
 * @module
 */

import type { ErrorCode } from "../errors.ts";
import type { VcpuExit } from "../kvm/exit.ts";

/** denovisor's own exit statuses: even, and outside 130..254. */
export const ExitStatus = {
  /** The default guest succeeded, a guest halted, reset or powered off, or its
   * EXIT hypercall's status was 0. */
  ok: 0,
  /** Bad command-line arguments, or a kernel or image that is malformed. */
  usage: 2,
  /** The guest crashed (an exception reported by the guest runtime, internal
   * error, failed entry, malformed hypercall, unhandled I/O under `stop`). */
  guestCrashed: 10,
  /** The guest triple-faulted (the vCPU shut down). */
  guestTripleFault: 12,
  /** The guest kernel panicked (its console showed "Kernel panic - not syncing"). */
  guestPanic: 14,
  /** The guest stopped answering (`--watchdog`: its console stayed silent). */
  guestUnresponsive: 16,
  /** The initrd is truncated or not an initramfs the kernel accepts. */
  badInitrd: 20,
  /** The kernel command line is longer than the kernel accepts. */
  cmdlineTooLong: 22,
  /** The kernel or the initrd does not fit in guest RAM (`--mem`). */
  doesNotFit: 24,
  /** More vCPUs than the host's KVM allows (`KVM_CAP_MAX_VCPUS`). */
  vcpuLimit: 26,
  /** No control API answers at `--api-socket` (no such socket, nobody listening). */
  apiUnreachable: 28,
  /** The control API refused the request (it answered with a JSON error). */
  apiRefused: 30,
  /** The VMM itself failed (no /dev/kvm, the core could not be built, ...). */
  vmmError: 70,
  /** The run's timeout passed. */
  timeout: 124,
} as const;

/** The first status of the range reserved for guests' EXIT hypercalls. */
export const GUEST_EXIT_STATUS_BASE = 128;
/** EXIT statuses from this value up share the range's last status, 254. */
export const GUEST_EXIT_STATUS_CAP = 63;

/**
 * The process exit status for a guest's EXIT hypercall status.
 *
 * @param status The guest's `u32` status.
 * @returns 0 for 0, else `128 + 2 * min(status, 63)` (130..254).
 * @example
 * ```ts
 * import { statusOfGuestExit } from "denovisor/src/cli/exit_status.ts";
 * console.log(statusOfGuestExit(1), statusOfGuestExit(1000)); // 130 254
 * ```
 */
export function statusOfGuestExit(status: number): number {
  if (status === 0) return ExitStatus.ok;
  return GUEST_EXIT_STATUS_BASE + 2 * Math.min(status, GUEST_EXIT_STATUS_CAP);
}

/**
 * The process exit status for a run that ended with `exit`.
 *
 * @param exit How the run ended.
 * @returns The guest's debug-exit code (low 8 bits, always odd), its EXIT
 *   hypercall status mapped by {@link statusOfGuestExit}, or one of
 *   {@link ExitStatus}.
 * @example
 * ```ts
 * import { statusOfExit } from "denovisor/src/cli/exit_status.ts";
 * console.log(statusOfExit({ reason: "debug_exit", exitCode: 7 })); // 7
 * ```
 */
export function statusOfExit(exit: VcpuExit): number {
  switch (exit.reason) {
    case "debug_exit":
      return exit.exitCode & 0xff;
    case "guest_exit":
      return statusOfGuestExit(exit.status);
    case "hlt":
    case "stopped":
    case "reset":
    case "power_off":
      return ExitStatus.ok;
    case "timed_out":
      return ExitStatus.timeout;
    case "shutdown":
      return ExitStatus.guestTripleFault;
    case "error":
      return ExitStatus.vmmError;
    default:
      return ExitStatus.guestCrashed;
  }
}

/**
 * The process exit status for a whole run: a kernel panic or a guest that
 * stopped answering first, then how the run ended ({@link statusOfExit}).
 *
 * @param result The run's exit, its panic message and whether the watchdog
 *   stopped it.
 * @returns One of {@link ExitStatus}, or the guest's own code.
 * @example
 * ```ts
 * import { statusOfResult } from "denovisor/src/cli/exit_status.ts";
 * console.log(statusOfResult({ exit: { reason: "reset" }, panic: "oops" })); // 14
 * ```
 */
export function statusOfResult(
  result: { exit: VcpuExit; panic?: string; unresponsive?: boolean },
): number {
  if (result.unresponsive) return ExitStatus.guestUnresponsive;
  if (result.panic !== undefined) return ExitStatus.guestPanic;
  return statusOfExit(result.exit);
}

const STATUS_OF_CODE: Partial<Record<ErrorCode, number>> = {
  INVALID_ARGUMENT: ExitStatus.usage,
  IMAGE: ExitStatus.usage,
  MEMORY: ExitStatus.usage,
  INITRD: ExitStatus.badInitrd,
  CMDLINE_TOO_LONG: ExitStatus.cmdlineTooLong,
  DOES_NOT_FIT: ExitStatus.doesNotFit,
  VCPU_LIMIT: ExitStatus.vcpuLimit,
  API_UNREACHABLE: ExitStatus.apiUnreachable,
  API_REFUSED: ExitStatus.apiRefused,
  // `restore DIR` of a bad snapshot is a bad input, as a malformed image is.
  SNAPSHOT_INVALID: ExitStatus.usage,
  SNAPSHOT_WRONG_HOST: ExitStatus.usage,
};

/**
 * The process exit status for an error that ended the command before or
 * instead of a run.
 *
 * @param error A `DenovisorError` (or anything with its `code`).
 * @returns The status of its code; {@link ExitStatus.vmmError} for the rest.
 * @example
 * ```ts
 * import { statusOfError } from "denovisor/src/cli/exit_status.ts";
 * import { DenovisorError } from "denovisor/src/errors.ts";
 * console.log(statusOfError(new DenovisorError("INITRD", "bad magic"))); // 20
 * ```
 */
export function statusOfError(error: { code: ErrorCode }): number {
  return STATUS_OF_CODE[error.code] ?? ExitStatus.vmmError;
}
