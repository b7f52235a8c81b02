/**
 * The one error family of denovisor: every failure is a {@link DenovisorError}
 * with a stable {@link ErrorCode} to branch on and a message to read.
 *
 * @module
 */

/**
 * Stable error codes. The first group mirrors the Rust core's status codes
 * (`core/src/error.rs`); the rest are raised by the TypeScript side.
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
  | "DEVICE";

/** Core status codes (negative `i32`s returned by `dv_*` calls), by value. */
export const CORE_STATUS_CODES: Readonly<Record<number, ErrorCode>> = {
  [-1]: "INVALID_ARGUMENT",
  [-2]: "INVALID_HANDLE",
  [-3]: "KVM_UNAVAILABLE",
  [-4]: "KVM",
  [-5]: "MEMORY",
  [-6]: "IMAGE",
  [-7]: "BUSY",
  [-8]: "TIMEOUT",
  [-9]: "PANIC",
  [-10]: "BUFFER_TOO_SMALL",
  [-11]: "IO",
  [-12]: "INITRD",
  [-13]: "CMDLINE_TOO_LONG",
  [-14]: "DOES_NOT_FIT",
  [-15]: "VCPU_LIMIT",
  [-16]: "DEVICE",
};

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
