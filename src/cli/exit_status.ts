/**
 * Process exit statuses of the CLI. A guest's debug-exit code `(v << 1) | 1` is
 * always odd, so denovisor's own statuses are even and never collide with it.
 *
 * @module
 */

import type { VcpuExit } from "../kvm/exit.ts";

/** The CLI's own exit statuses. */
export const ExitStatus = {
  /** The default guest succeeded, or a guest halted, reset or powered off. */
  ok: 0,
  /** Bad command-line arguments, or an image that cannot be loaded. */
  usage: 2,
  /** The guest crashed (triple fault, internal error, failed entry, unhandled I/O). */
  guestCrashed: 10,
  /** The VMM itself failed (no /dev/kvm, the core could not be built, ...). */
  vmmError: 70,
  /** The run's timeout passed. */
  timeout: 124,
} as const;

/**
 * The process exit status for a run that ended with `exit`.
 *
 * @param exit How the run ended.
 * @returns The guest's debug-exit code (low 8 bits, always odd), the status of
 *   its EXIT hypercall (low 8 bits), or one of {@link ExitStatus}.
 * @example
 * ```ts
 * import { statusOfExit } from "./src/cli/exit_status.ts";
 * console.log(statusOfExit({ reason: "debug_exit", exitCode: 7 })); // 7
 * ```
 */
export function statusOfExit(exit: VcpuExit): number {
  switch (exit.reason) {
    case "debug_exit":
      return exit.exitCode & 0xff;
    case "guest_exit":
      return exit.status & 0xff;
    case "hlt":
    case "stopped":
    case "reset":
    case "power_off":
      return ExitStatus.ok;
    case "timed_out":
      return ExitStatus.timeout;
    case "error":
      return ExitStatus.vmmError;
    default:
      return ExitStatus.guestCrashed;
  }
}
