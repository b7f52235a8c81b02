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
  /** The registers are the x86 reset state, not the crash's: on AMD SVM, KVM
   * resets a vCPU on the SHUTDOWN intercept before they can be read, so where
   * the triple fault happened is lost (Intel keeps it). */
  resetState: boolean;
}

/** The ways a run can end. */
export type VcpuExit =
  /** The guest wrote `v` to the debug-exit port 0xf4: `exitCode = (v << 1) | 1`. */
  | { reason: "debug_exit"; exitCode: number }
  /** The guest made the EXIT hypercall with this status. */
  | { reason: "guest_exit"; status: number }
  /** The guest reset the machine through the i8042 keyboard controller (command
   * 0xFE to port 0x64, what Linux's `reboot=k` does). */
  | { reason: "reset" }
  /** The guest powered the machine off: SLP_EN with sleep type 0 written to port
   * 0x604 (QEMU's ACPI PM1a control register; `outw(0x604, 0x2000)`). */
  | { reason: "power_off" }
  /** The guest took an exception and reported it through the FAULT hypercall. */
  | {
    reason: "guest_fault";
    /** Exception vector (0 #DE, 6 #UD, 13 #GP, 14 #PF, ...). */
    vector: number;
    /** The error code the CPU pushed (0 for vectors without one). */
    errorCode: number;
    /** The faulting address (CR2) for a page fault, else 0. */
    address: bigint;
    /** The instruction that faulted. */
    rip: bigint;
  }
  /** A malformed hypercall: bad request block address or access size. */
  | { reason: "bad_hypercall"; message: string }
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

const HEX_FIELDS = new Set(["address", "data", "hardwareReason", "rip"]);

/**
 * Turns the core's JSON run result into a typed exit (hex strings → bigint).
 *
 * @param raw The parsed JSON.
 * @returns The typed exit.
 * @example
 * ```ts
 * import { parseExit } from "denovisor/src/kvm/exit.ts";
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

/** Mnemonics of the x86 exception vectors. */
const EXCEPTION_NAMES: Record<number, string> = {
  0: "#DE divide error",
  1: "#DB debug",
  2: "NMI",
  3: "#BP breakpoint",
  4: "#OF overflow",
  5: "#BR bound range",
  6: "#UD invalid opcode",
  7: "#NM device not available",
  8: "#DF double fault",
  10: "#TS invalid TSS",
  11: "#NP segment not present",
  12: "#SS stack fault",
  13: "#GP general protection",
  14: "#PF page fault",
  16: "#MF x87 error",
  17: "#AC alignment check",
  18: "#MC machine check",
  19: "#XM SIMD error",
};

/**
 * A one-line description of an exit, for messages and the CLI.
 *
 * @param exit The exit.
 * @returns A sentence-case description without a trailing period.
 * @example
 * ```ts
 * import { describeExit } from "denovisor/src/kvm/exit.ts";
 * console.log(describeExit({ reason: "hlt" })); // "guest halted"
 * ```
 */
export function describeExit(exit: VcpuExit): string {
  const hex = (v: bigint | number) => `0x${v.toString(16)}`;
  switch (exit.reason) {
    case "debug_exit":
      return `guest exited with code ${exit.exitCode}`;
    case "guest_exit":
      return `guest exited with status ${exit.status}`;
    case "reset":
      return "guest reset the machine";
    case "power_off":
      return "guest powered off";
    case "guest_fault":
      return `guest fault: ${EXCEPTION_NAMES[exit.vector] ?? `vector ${exit.vector}`} at rip=${
        hex(exit.rip)
      } (error code ${hex(exit.errorCode)}${
        exit.vector === 14 ? `, address ${hex(exit.address)}` : ""
      })`;
    case "bad_hypercall":
      return `malformed hypercall: ${exit.message}`;
    case "hlt":
      return "guest halted";
    case "shutdown":
      return exit.registers.resetState
        ? "guest crashed (triple fault); where is unknown: KVM reset the vCPU on the " +
          "shutdown (AMD SVM's SHUTDOWN intercept), so its registers show the reset state"
        : `guest crashed (triple fault) at rip=${hex(exit.registers.rip)} rsp=${
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
