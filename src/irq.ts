/**
 * Interrupts: the types and checks behind `vm.injectIrq`, `vm.sendMsi` and the
 * interrupt counters, and the vector layout of the guest runtime
 * (`guest/runtime/`), which tests and benchmarks share with its C side
 * (`dv_guest.h`).
 *
 * A VM gets KVM's in-kernel interrupt controllers (PIC, IOAPIC, one local APIC
 * per vCPU) and the PIT with `Vm.create({ interrupts: true })`. The host raises
 * an edge on one of the 24 interrupt lines (GSIs) with `injectIrq(line)`, or
 * sends an MSI straight to a local APIC with `sendMsi(address, data)`; COM1
 * raises line 4 itself when the guest enabled its receive interrupt.
 *
 * @module
 */

import { DenovisorError } from "./errors.ts";
import { CONSTANTS } from "./_contract.generated.ts";

/** Interrupt lines the host can raise: GSIs 0 to 23 (the IOAPIC's pins). */
export const IRQ_LINES: number = CONSTANTS.IRQ_LINES;

/** The line COM1 raises (ISA IRQ 4). */
export const SERIAL_IRQ_LINE: number = CONSTANTS.SERIAL_IRQ_LINE;

/**
 * The guest runtime's vectors (`dv_guest.h`): `dv_irq_init()` routes interrupt
 * line `n` to vector `IRQ_VECTOR_BASE + n` through the IOAPIC, the local APIC
 * timer uses `TIMER_VECTOR`, and every vector from 32 to 254 is counted.
 */
export const GuestVectors = {
  /** Line `n` arrives as vector `0x20 + n`. */
  IRQ_VECTOR_BASE: 0x20,
  /** The local APIC timer. */
  TIMER_VECTOR: 0xf0,
  /** The local APIC's spurious vector (never counted). */
  SPURIOUS_VECTOR: 0xff,
} as const;

/** The host's interrupt counters of a VM. */
export interface IrqStats {
  /** Whether the VM has the in-kernel irqchip. */
  irqchip: boolean;
  /** Edges raised with `injectIrq`. */
  injected: number;
  /** MSIs a local APIC accepted. */
  msis: number;
  /** MSIs no local APIC accepted. */
  msisRefused: number;
  /** Times COM1 raised line 4. */
  serial: number;
}

/**
 * The MSI address that targets the local APIC with `apicId` (physical
 * destination mode).
 *
 * @param apicId The destination's APIC id (0-255; vCPU `i` has id `i`).
 * @returns `0xfee00000 | apicId << 12`.
 * @example
 * ```ts
 * import { msiAddress } from "denovisor/src/irq.ts";
 * console.log(msiAddress(1).toString(16)); // "fee01000"
 * ```
 */
export function msiAddress(apicId = 0): number {
  if (!Number.isInteger(apicId) || apicId < 0 || apicId > 255) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `an APIC id is an integer from 0 to 255, got ${apicId}`,
    );
  }
  return 0xfee0_0000 + apicId * 0x1000;
}

/**
 * Checks an interrupt line number.
 *
 * @param line The GSI.
 * @returns The line.
 * @example
 * ```ts
 * import { checkIrqLine } from "denovisor/src/irq.ts";
 * checkIrqLine(4); // 4; checkIrqLine(24) throws INVALID_ARGUMENT
 * ```
 */
export function checkIrqLine(line: number): number {
  if (!Number.isInteger(line) || line < 0 || line >= IRQ_LINES) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `interrupt line must be an integer from 0 to ${IRQ_LINES - 1}, got ${line}`,
    );
  }
  return line;
}

/**
 * Checks an MSI's address and data.
 *
 * @param address In `0xfee00000-0xfeefffff`.
 * @param data A 32-bit value (bits 0-7: the vector, which must be 16 or more).
 * @returns Both, the address as a bigint.
 * @example
 * ```ts
 * import { checkMsi, msiAddress } from "denovisor/src/irq.ts";
 * const [address, data] = checkMsi(msiAddress(0), 0x40);
 * ```
 */
export function checkMsi(address: number | bigint, data: number): [bigint, number] {
  const a = typeof address === "bigint"
    ? address
    : BigInt(Number.isSafeInteger(address) ? address : -1);
  if (a < 0xfee0_0000n || a > 0xfeef_ffffn) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `an MSI address is in 0xfee00000-0xfeefffff, got ${address}`,
    );
  }
  if (!Number.isInteger(data) || data < 0 || data > 0xffff_ffff || (data & 0xff) < 16) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `MSI data must be a 32-bit integer whose vector (bits 0-7) is 16 or more, got ${data}`,
    );
  }
  return [a, data];
}

const encoder = new TextEncoder();

/**
 * Console input as bytes (strings are sent as UTF-8).
 *
 * @param input Bytes or text.
 * @returns The bytes.
 * @example
 * ```ts
 * import { toConsoleBytes } from "denovisor/src/irq.ts";
 * console.log(toConsoleBytes("hi")); // Uint8Array(2) [ 104, 105 ]
 * ```
 */
export function toConsoleBytes(input: Uint8Array | string): Uint8Array {
  if (typeof input === "string") return encoder.encode(input);
  if (input instanceof Uint8Array) return input;
  throw new DenovisorError("INVALID_ARGUMENT", "console input must be a Uint8Array or a string");
}
