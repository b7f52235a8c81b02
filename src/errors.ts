/**
 * The one error family of denovisor: every failure is a {@link DenovisorError}
 * with a stable {@link ErrorCode} to branch on and a message to read.
 *
 * @module
 */

import { STATUSES } from "./_contract.generated.ts";

/**
 * Stable error codes. The first group is the Rust core's statuses
 * (`core/src/error.rs`, read from the generated contract: a status the core
 * adds or renames is a type error in {@link coreErrorCode} until it is listed
 * here); the rest are raised by the TypeScript side.
 */
export type ErrorCode =
  | "INVALID_ARGUMENT"
  | "INVALID_HANDLE"
  | "KVM_UNAVAILABLE"
  | "KVM"
  | "MEMORY"
  | "IMAGE"
  | "BUSY"
  | "TIMEOUT"
  | "PANIC"
  | "BUFFER_TOO_SMALL"
  | "IO"
  | "ABI_MISMATCH"
  | "BUILD_FAILED"
  | "CLOSED"
  | "GUEST_CRASHED"
  | "GUEST_UNRESPONSIVE"
  | "GUEST_STOPPED"
  | "INITRD"
  | "CMDLINE_TOO_LONG"
  | "DOES_NOT_FIT"
  | "VCPU_LIMIT"
  | "DEVICE"
  | "KSM_UNAVAILABLE"
  | "SNAPSHOT_INVALID"
  | "SNAPSHOT_WRONG_HOST"
  | "API_UNREACHABLE"
  | "API_REFUSED"
  | "MIGRATION"
  | "NOT_AVAILABLE"
  | "OVERLOADED";

/** The code of a core error status, which must be an {@link ErrorCode}. */
function coreErrorCode(code: Exclude<(typeof STATUSES)[number]["code"], "OK">): ErrorCode {
  return code;
}

/** Core status codes (negative `i32`s returned by `dv_*` calls), by value. */
export const CORE_STATUS_CODES: Readonly<Record<number, ErrorCode>> = Object.freeze(
  Object.fromEntries(
    STATUSES.flatMap((s) => s.code === "OK" ? [] : [[s.value, coreErrorCode(s.code)]]),
  ),
);

/**
 * The core's status value for an error code it returns.
 *
 * @param code A code of the core's statuses.
 * @returns The negative status the core returns for it.
 * @example
 * ```ts
 * import { statusOf } from "denovisor/src/errors.ts";
 * console.log(statusOf("BUFFER_TOO_SMALL")); // -10
 * ```
 */
export function statusOf(code: (typeof STATUSES)[number]["code"]): number {
  const status = STATUSES.find((s) => s.code === code);
  if (!status) throw new DenovisorError("PANIC", `the core has no status ${code}`);
  return status.value;
}

/**
 * The error every denovisor API throws.
 *
 * @example Branching on the code
 * ```ts
 * import { DenovisorError, Vm } from "denovisor";
 * try {
 *   await Vm.create({ memoryMiB: 0 });
 * } catch (e) {
 *   if (e instanceof DenovisorError && e.code === "INVALID_ARGUMENT") {
 *     console.error(e.message);
 *   }
 * }
 * ```
 */
export class DenovisorError extends Error {
  /** What kind of failure this is. */
  readonly code: ErrorCode;

  /**
   * Creates an error.
   *
   * @param code What kind of failure this is.
   * @param message What went wrong, in sentence case without a trailing period.
   * @param options Standard error options (`cause`).
   */
  constructor(code: ErrorCode, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "DenovisorError";
    this.code = code;
  }
}

/**
 * Maps a core status code to its {@link ErrorCode} (`PANIC` for unknown values,
 * which would mean a library/ABI mismatch).
 *
 * @param status A negative status returned by the core.
 * @returns The matching error code.
 * @example
 * ```ts
 * import { errorCodeOfStatus } from "denovisor/src/errors.ts";
 * console.log(errorCodeOfStatus(-2)); // "INVALID_HANDLE"
 * ```
 */
export function errorCodeOfStatus(status: number): ErrorCode {
  return CORE_STATUS_CODES[status] ?? "PANIC";
}
