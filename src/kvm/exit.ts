/**
 * Why a vCPU stopped: the typed form of the run results the core's exit loop
 * returns (`StopReason` in `core/src/vcpu/exit.rs`). Exits the core handles
 * itself (serial output, ignored ports) never reach TypeScript; these are the
 * ones that end a run.
 *
 * @module
 */

/** Registers captured when a guest crashed (triple fault / shutdown). */
export interface CrashRegisters {
  /** RIP, the instruction pointer. */
  rip: bigint;
  /** RSP, the stack pointer. */
  rsp: bigint;
  /** RFLAGS. */
  rflags: bigint;
  /** RAX. */
  rax: bigint;
  /** RBX. */
  rbx: bigint;
  /** RCX. */
  rcx: bigint;
  /** RDX. */
  rdx: bigint;
  /** RSI. */
  rsi: bigint;
  /** RDI. */
  rdi: bigint;
  /** RBP. */
  rbp: bigint;
  /** CR0 (protection, paging). */
  cr0: bigint;
  /** CR2 (the last page-fault address). */
  cr2: bigint;
  /** CR3 (the page-table root). */
  cr3: bigint;
  /** CR4 (PAE and other extensions). */
  cr4: bigint;
  /** EFER (long mode, SYSCALL). */
  efer: bigint;
  /** Code segment selector. */
  cs: number;
  /** Stack segment selector. */
  ss: number;
}

/** The ways a run can end. */
export type VcpuExit =
  /** The guest wrote `v` to the debug-exit port 0xf4: `exitCode = (v << 1) | 1`. */
  | { reason: "debug_exit"; exitCode: number }
  /** The guest executed HLT with nothing to wake it. */
  | { reason: "hlt" }
  /** The guest crashed: triple fault or another shutdown. */
  | { reason: "shutdown"; registers: CrashRegisters }
  /** Port I/O no device claims, with the `stop` policy. */
  | { reason: "unhandled_io"; port: number; size: number; direction: "in" | "out"; data: bigint }
  /** MMIO no device claims, with the `stop` policy. */
  | {
    reason: "unhandled_mmio";
    address: bigint;
    size: number;
    direction: "in" | "out";
    data: bigint;
  }
  /** KVM could not emulate an instruction. */
  | { reason: "internal_error"; suberror: number }
  /** VM entry failed. */
  | { reason: "fail_entry"; hardwareReason: bigint }
  /** KVM reported a system event (reset, shutdown, crash). */
  | { reason: "system_event"; event: number }
  /** An exit this VMM does not handle. */
  | { reason: "unexpected_exit"; exit: string }
  /** The host stopped the vCPU. */
  | { reason: "stopped" }
  /** The run's timeout passed; the host stopped the vCPU. */
  | { reason: "timed_out" }
  /** The VMM failed while running the vCPU. */
  | { reason: "error"; message: string };

/** The name of a {@link VcpuExit} kind. */
export type ExitReason = VcpuExit["reason"];

/** A run's outcome as the core reports it. */
export interface RawRunResult {
  vcpu: number;
  runNs: number;
  reason: ExitReason;
  [field: string]: unknown;
}

const HEX_FIELDS = new Set(["address", "data", "hardwareReason"]);

/**
 * Turns the core's JSON run result into a typed exit (hex strings → bigint).
 *
 * @param raw The parsed JSON.
 * @returns The typed exit.
 * @example
 * ```ts
 * import { parseExit } from "./src/kvm/exit.ts";
 * const exit = parseExit({ vcpu: 0, runNs: 1, reason: "debug_exit", exitCode: 3 });
 * console.log(exit.reason); // "debug_exit"
 * ```
 */
export function parseExit(raw: RawRunResult): VcpuExit {
  const { vcpu: _vcpu, runNs: _runNs, ...rest } = raw;
  const exit: Record<string, unknown> = { ...rest };
  for (const [key, value] of Object.entries(rest)) {
    if (HEX_FIELDS.has(key) && typeof value === "string") exit[key] = BigInt(value);
  }
  if (raw.reason === "shutdown" && typeof raw.registers === "object" && raw.registers) {
    const regs: Record<string, unknown> = {};
    for (const [key, value] of Object.entries(raw.registers)) {
      regs[key] = typeof value === "string" ? BigInt(value) : value;
    }
    exit.registers = regs;
  }
  return exit as unknown as VcpuExit;
}

/**
 * A one-line description of an exit, for messages and the CLI.
 *
 * @param exit The exit.
 * @returns A sentence-case description without a trailing period.
 * @example
 * ```ts
 * import { describeExit } from "./src/kvm/exit.ts";
 * console.log(describeExit({ reason: "hlt" })); // "guest halted"
 * ```
 */
export function describeExit(exit: VcpuExit): string {
  const hex = (v: bigint | number) => `0x${v.toString(16)}`;
  switch (exit.reason) {
    case "debug_exit":
      return `guest exited with code ${exit.exitCode}`;
    case "hlt":
      return "guest halted";
    case "shutdown":
      return `guest crashed (triple fault) at rip=${hex(exit.registers.rip)} rsp=${
        hex(exit.registers.rsp)
      } cr2=${hex(exit.registers.cr2)}`;
    case "unhandled_io":
      return `unhandled port I/O: ${exit.direction} ${exit.size} byte(s) at port ${hex(exit.port)}`;
    case "unhandled_mmio":
      return `unhandled MMIO: ${exit.direction} ${exit.size} byte(s) at ${hex(exit.address)}`;
    case "internal_error":
      return `KVM internal error (suberror ${exit.suberror})`;
    case "fail_entry":
      return `VM entry failed (hardware reason ${hex(exit.hardwareReason)})`;
    case "system_event":
      return `KVM system event ${exit.event}`;
    case "unexpected_exit":
      return `unexpected KVM exit ${exit.exit}`;
    case "stopped":
      return "stopped by the host";
    case "timed_out":
      return "timed out";
    case "error":
      return `VMM error: ${exit.message}`;
  }
}
