/**
 * The low-level API: a thin mirror of the KVM objects any hypervisor text
 * describes — the KVM system, a VM, a vCPU — so a reader can follow
 * `KVM_CREATE_VM`, `KVM_CREATE_VCPU`, `KVM_SET_REGS`, `KVM_RUN` step by step.
 *
 * `KvmVcpu.run()` is `KVM_RUN` with the core's exit loop in between: exits the
 * core handles itself (serial output, ignored ports) never cross into
 * JavaScript; the run resolves with the exit that ended it.
 *
 * @module
 */

import type { FnInvokeCall } from "../ffi.ts";
import {
  decodeInvokeResult,
  type FunctionReady,
  invokeCall,
  type InvokeOptions,
  type InvokeResult,
} from "./function.ts";
import { DenovisorError } from "../errors.ts";
import { checkRateLimiter, type RateLimiter } from "../rate_limiter.ts";
import {
  type Core,
  LOAD_FLAG_RESERVE_LOW,
  type MigrationReceived,
  openCore,
  RESTORE_EAGER,
  RESTORE_LAZY,
  StateKind,
  VM_FLAG_DEDUP,
  VM_FLAG_IRQCHIP,
  VM_FLAG_STOP_ON_UNHANDLED,
} from "../ffi.ts";
import { checkIrqLine, checkMsi, type IrqStats, toConsoleBytes } from "../irq.ts";
import type { KsmCounters } from "../ksm.ts";
import { parseExit, type RawRunResult, type VcpuExit } from "./exit.ts";
import { CONSTANTS } from "../_contract.generated.ts";
import type { LinuxLayout } from "../linux/layout.ts";
import { type CpuidPolicy, cpuidPolicyJson, type MsrPolicy, msrPolicyJson } from "../cpu/policy.ts";
import {
  decodeFpuState,
  decodeRegisters,
  decodeSpecialRegisters,
  encodeFpuState,
  encodeRegisters,
  encodeSpecialRegisters,
  type FpuState,
  type Registers,
  type SpecialRegisters,
} from "./registers.ts";

/** How a vCPU enters the guest; see `guest/README.md` for the CPU state of each. */
export type EntryMode = "real" | "long" | "user";

const ENTRY_MODES: Record<EntryMode, number> = {
  real: CONSTANTS.ENTRY_MODE_REAL,
  long: CONSTANTS.ENTRY_MODE_LONG,
  user: CONSTANTS.ENTRY_MODE_USER,
};

/** What to do with port I/O and MMIO that no device claims. */
export type UnhandledAccessPolicy = "ignore" | "stop";

/** What writing a snapshot did ({@link KvmVm.snapshotCreate}). */
export interface SnapshotWriteStats {
  /** Bytes of the state file. */
  stateBytes: number;
  /** Bytes of guest RAM (the memory file's length). */
  memoryBytes: number;
  /** Bytes written to the memory file; all-zero pages are holes. */
  memoryWritten: number;
  /** Milliseconds writing (and syncing) the memory file took. */
  memoryMs: number;
  /** `full`, or `diff` (only the pages dirtied since the parent). */
  kind: "full" | "diff";
  /** A diff's pages (4 KiB each); absent for a full snapshot. */
  diffPages?: number;
}

/** The `dv_vm_create` flags of a VM's options. */
function vmFlags(unhandledIo: UnhandledAccessPolicy, irqchip: boolean, dedup: boolean): number {
  return (unhandledIo === "stop" ? VM_FLAG_STOP_ON_UNHANDLED : 0) |
    (irqchip ? VM_FLAG_IRQCHIP : 0) | (dedup ? VM_FLAG_DEDUP : 0);
}

/** Per-vCPU exit counters, read from the core in one call. */
export interface VcpuMetrics {
  /** Port reads (`in`). */
  ioIn: number;
  /** Port writes (`out`). */
  ioOut: number;
  /** MMIO reads. */
  mmioRead: number;
  /** MMIO writes. */
  mmioWrite: number;
  /** HLT exits. */
  hlt: number;
  /** Shutdowns (triple faults). */
  shutdown: number;
  /** KVM internal errors. */
  internalError: number;
  /** Runs interrupted by a kick (stop, timeout). */
  interrupted: number;
  /** RDMSRs the MSR filter denied (the guest got #GP). */
  msrReadDenied: number;
  /** WRMSRs the MSR filter denied (the guest got #GP). */
  msrWriteDenied: number;
  /** Every other exit. */
  other: number;
  /** All exits. */
  exits: number;
  /** Port reads by port range. */
  ioInByPort: PortCounts;
  /** Port writes by port range. */
  ioOutByPort: PortCounts;
  /** Hypercalls by kind. */
  hypercalls: HypercallCounts;
  /** Nanoseconds spent inside KVM_RUN. */
  kvmRunNs: number;
  /** Nanoseconds the VMM spent handling exits. */
  vmmNs: number;
  /** `handlingLatencyLog2Ns[i]` counts exits handled in `[2^i, 2^(i+1))` ns. */
  handlingLatencyLog2Ns: number[];
  /** Console output this vCPU wrote (COM1 and the WRITE hypercall), and the bytes
   * dropped as it wrote them. */
  console: ConsoleCounts;
}

/** A VM's guest RAM as the host holds it ({@link KvmVm.memory}). */
export interface GuestMemoryUsage {
  /** Guest RAM, bytes. */
  sizeBytes: number;
  /** The part of it backed by host memory now (`mincore`), bytes: pages the
   * guest never touched, and pages a balloon or free page reporting gave
   * back, are not. The VMM's RSS for guest RAM, without the JavaScript heap. */
  residentBytes: number;
}

/** Console byte counts: written, and dropped on either side of the console. */
export interface ConsoleCounts {
  /** Bytes the guest wrote to its console. */
  bytes: number;
  /** Bytes the in-memory capture dropped: the oldest output beyond the newest
   * 1 MiB it keeps for {@link KvmVm.takeConsoleOutput}. */
  captureDropped: number;
  /** Bytes never written to the streamed fd ({@link KvmVm.streamConsoleTo})
   * because it did not take them in time (1 MiB waits at most). */
  streamDropped: number;
}

/** The console's cumulative counts since the VM was created. */
export interface ConsoleStats extends ConsoleCounts {
  /** Bytes queued for the streamed fd and not written yet. */
  streamPending: number;
  /** Bytes the console's rate limiter dropped ({@link KvmVm.setConsoleRateLimiter}). */
  rateDropped: number;
}

/** Port-I/O exit counts by the device range the port belongs to. */
export interface PortCounts {
  /** COM1, 0x3f8-0x3ff. */
  serial: number;
  /** The debug-exit port 0xf4. */
  debugExit: number;
  /** The hypercall port 0x510. */
  hypercall: number;
  /** Every other port. */
  other: number;
}

/** Hypercall counts by kind (see `guest/README.md` for the ABI). */
export interface HypercallCounts {
  /** WRITE: console output. */
  write: number;
  /** EXIT: the guest ended the VM. */
  exit: number;
  /** CLOCK: monotonic clock reads. */
  clock: number;
  /** REPORT: result buffers. */
  report: number;
  /** FAULT: exceptions the guest could not handle. */
  fault: number;
  /** NOP: pure round trips. */
  nop: number;
  /** Unknown call numbers and calls refused with an error status. */
  invalid: number;
  /** IRQ_COUNTERS: the guest published its interrupt counters. */
  irqCounters: number;
}

/** The result of a run: the exit that ended it, and which vCPU took it. */
export interface RunOutcome {
  /** The exit that ended the run. */
  exit: VcpuExit;
  /** The vCPU that took it. */
  vcpu: number;
  /** Wall-clock nanoseconds the vCPU ran, measured in the core. */
  runNs: number;
}

/** Options of a run. */
export interface RunOptions {
  /** Stop the run after this many milliseconds (0 or absent: no limit). */
  timeoutMs?: number;
}

function checkTimeout(timeoutMs: number | undefined): number {
  const t = timeoutMs ?? 0;
  if (!Number.isInteger(t) || t < 0) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `timeoutMs must be a non-negative integer, got ${timeoutMs}`,
    );
  }
  return t;
}

function toAddress(value: number | bigint, what: string): bigint {
  if (typeof value === "number" && (!Number.isSafeInteger(value) || value < 0)) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `${what} must be a non-negative integer, got ${value}`,
    );
  }
  const v = BigInt(value);
  if (v < 0n || v >= 1n << 64n) {
    throw new DenovisorError("INVALID_ARGUMENT", `${what} ${value} does not fit in 64 bits`);
  }
  return v;
}

function outcome(raw: RawRunResult): RunOutcome {
  return { exit: parseExit(raw), vcpu: raw.vcpu, runNs: raw.runNs };
}

/**
 * `/dev/kvm`: the entry point of the low-level API.
 *
 * @example Running three instructions in real mode
 * ```ts
 * import { Kvm } from "denovisor";
 * const kvm = await Kvm.open();
 * using vm = kvm.createVm({ memoryBytes: 1 << 20 });
 * const vcpu = vm.createVcpu();
 * vm.writeMemory(0x7c00, new Uint8Array([0xb0, 0x05, 0xe6, 0xf4])); // mov al,5; out 0xf4,al
 * vcpu.setupEntry("real", 0x7c00);
 * const { exit } = await vcpu.run({ timeoutMs: 1000 });
 * console.log(exit); // { reason: "debug_exit", exitCode: 11 }
 * ```
 */
export class Kvm {
  readonly #core: Core;

  private constructor(core: Core) {
    this.#core = core;
  }

  /**
   * Loads the core (building it if needed) and checks that /dev/kvm is usable.
   *
   * @returns The KVM system.
   * @throws {DenovisorError} `KVM_UNAVAILABLE` when /dev/kvm cannot be opened.
   */
  static async open(): Promise<Kvm> {
    const core = await openCore();
    core.kvmCheck();
    return new Kvm(core);
  }

  /**
   * `KVM_CREATE_VM` plus guest RAM (`KVM_SET_USER_MEMORY_REGION`), COM1 and the
   * debug-exit port.
   *
   * @param options RAM size in bytes (a multiple of 4 KiB), the policy for
   *   port I/O and MMIO no device claims (default `ignore`), and `irqchip`:
   *   `KVM_CREATE_IRQCHIP` + `KVM_CREATE_PIT2` (default false; HLT then sleeps
   *   in KVM until an interrupt instead of ending the run), and `dedup`: RAM
   *   `MADV_MERGEABLE` for KSM (default false).
   * @returns The VM; close it (or `using`) to free its memory and threads.
   * @throws {DenovisorError} `KSM_UNAVAILABLE` for `dedup` on a kernel without KSM.
   */
  createVm(
    options: {
      memoryBytes: number;
      unhandledIo?: UnhandledAccessPolicy;
      irqchip?: boolean;
      dedup?: boolean;
    },
  ): KvmVm {
    const { memoryBytes, unhandledIo = "ignore", irqchip = false, dedup = false } = options;
    if (!Number.isSafeInteger(memoryBytes) || memoryBytes <= 0) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `memoryBytes must be a positive integer, got ${memoryBytes}`,
      );
    }
    if (unhandledIo !== "ignore" && unhandledIo !== "stop") {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `unhandledIo must be "ignore" or "stop", got ${JSON.stringify(unhandledIo)}`,
      );
    }
    if (typeof dedup !== "boolean") {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `dedup must be a boolean, got ${JSON.stringify(dedup)}`,
      );
    }
    return new KvmVm(
      this.#core,
      this.#core.vmCreate(memoryBytes, vmFlags(unhandledIo, irqchip, dedup)),
    );
  }

  /**
   * A VM whose guest RAM is a snapshot's (`dv_vm_create_from_snapshot`): the
   * snapshot's state file is verified whole and its host checked first.
   * `lazy` maps the memory file copy-on-write (nothing is read; VMs from one
   * snapshot share its unmodified pages); `eager` reads it into anonymous RAM
   * and verifies its checksum. Add the snapshot's devices and vCPUs, then
   * {@link KvmVm.restoreSnapshot}.
   *
   * @example
   * ```ts ignore
   * const vm = kvm.createVmFromSnapshot("/tmp/snap", { mode: "lazy" });
   * vm.createVcpu();
   * vm.restoreSnapshot("/tmp/snap");
   * ```
   *
   * @param dir The snapshot directory.
   * @param options The restore mode and the VM flags of {@link Kvm.createVm}.
   * @returns The VM.
   * @throws {DenovisorError} `SNAPSHOT_INVALID` naming the damaged section,
   *   `SNAPSHOT_WRONG_HOST` for a snapshot of another CPU.
   */
  createVmFromSnapshot(
    dir: string,
    options: {
      mode: "lazy" | "eager";
      unhandledIo?: UnhandledAccessPolicy;
      irqchip?: boolean;
      dedup?: boolean;
    },
  ): KvmVm {
    const { mode, unhandledIo = "ignore", irqchip = false, dedup = false } = options;
    if (mode !== "lazy" && mode !== "eager") {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `mode must be "lazy" or "eager", got ${JSON.stringify(mode)}`,
      );
    }
    const flags = vmFlags(unhandledIo, irqchip, dedup);
    const restore = mode === "lazy" ? RESTORE_LAZY : RESTORE_EAGER;
    return new KvmVm(this.#core, this.#core.vmCreateFromSnapshot(dir, restore, flags));
  }

  /**
   * Checks a `host` section from a migration source ({@link KvmVm.migrationHost})
   * against this host (`dv_host_check`).
   *
   * @example
   * ```ts ignore
   * kvm.checkHost(JSON.stringify(host));
   * ```
   *
   * @param host The section as JSON text.
   * @throws {DenovisorError} `SNAPSHOT_WRONG_HOST` naming what differs,
   *   `SNAPSHOT_INVALID` when it is malformed.
   */
  checkHost(host: string): void {
    this.#core.hostCheck(host);
  }

  /** Live VM and vCPU handles in this process (for leak checks). */
  get liveHandles(): number {
    return this.#core.liveHandles();
  }
}

/**
 * Guest pages written since the last take ({@link KvmVm.takeDirtyPages}):
 * one bit per 4 KiB page in RAM order (page `i` is at guest-physical
 * `i * 4096` below the 3.25 GiB MMIO hole; the pages after it continue at
 * 4 GiB).
 */
export interface DirtyPages {
  /** The bitmap: page `i` is bit `i % 8` of byte `i >> 3` (64-bit little-endian words). */
  readonly bitmap: Uint8Array;
  /** The dirty pages' indexes, in order. */
  readonly pages: number[];
}

/** The page indexes set in a dirty bitmap. */
function dirtyPages(bitmap: Uint8Array): DirtyPages {
  const pages: number[] = [];
  for (let byte = 0; byte < bitmap.length; byte++) {
    const bits = bitmap[byte];
    if (bits === 0) continue;
    for (let bit = 0; bit < 8; bit++) {
      if (bits & (1 << bit)) pages.push(byte * 8 + bit);
    }
  }
  return { bitmap, pages };
}

/** What reclaiming a VM the program dropped without closing needs. */
interface Unclosed {
  core: Core;
  handle: number;
}

/** The warning printed when a dropped VM is reclaimed. */
const NEVER_CLOSED_WARNING =
  "denovisor: a Vm was never closed; closing it (use `using` or vm.close())";

/**
 * Closes the core handle of every {@link KvmVm} that was garbage-collected
 * without {@link KvmVm.close}: its guest RAM, vCPU threads and device
 * threads would otherwise live as long as the process.
 */
const reclaimer = new FinalizationRegistry<Unclosed>(({ core, handle }) => {
  console.warn(NEVER_CLOSED_WARNING);
  try {
    core.vmClose(handle);
  } catch {
    // Already gone (the library was unloaded at exit): nothing left to free.
  }
});

/**
 * A KVM VM: guest RAM, devices and vCPUs. Created by {@link Kvm.createVm}.
 * A VM that becomes unreachable without being closed is closed when it is
 * garbage-collected, with a warning: close it (or `using`) instead.
 *
 * @example
 * ```ts
 * import { Kvm } from "denovisor";
 * using vm = (await Kvm.open()).createVm({ memoryBytes: 2 << 20 });
 * vm.writeMemory(0x1000, new Uint8Array([1, 2, 3]));
 * console.log(vm.readMemory(0x1000, 3)); // Uint8Array(3) [ 1, 2, 3 ]
 * ```
 */
export class KvmVm implements Disposable {
  readonly #core: Core;
  readonly #handle: number;
  readonly #vcpus: KvmVcpu[] = [];
  #closed = false;
  /** The function runtime's buffers, read once per checkpoint. */
  #ready: FunctionReady | undefined;
  /** One request's buffers, reused while no other request is in flight. */
  #call: FnInvokeCall | undefined;
  #calling = false;

  /** Wraps a core VM handle (use {@link Kvm.createVm}). */
  constructor(core: Core, handle: number) {
    this.#core = core;
    this.#handle = handle;
    reclaimer.register(this, { core, handle }, this);
  }

  #live(): number {
    if (this.#closed) throw new DenovisorError("CLOSED", "the VM is closed");
    return this.#handle;
  }

  /** Whether {@link KvmVm.close} was called. */
  get closed(): boolean {
    return this.#closed;
  }

  /** The vCPUs created so far, by index. */
  get vcpus(): readonly KvmVcpu[] {
    return this.#vcpus;
  }

  /**
   * `KVM_CREATE_VCPU` for the next index.
   *
   * @returns The new vCPU.
   */
  createVcpu(): KvmVcpu {
    const vcpu = new KvmVcpu(
      this.#core,
      this.#core.vmCreateVcpu(this.#live()),
      this.#vcpus.length,
      this,
    );
    this.#vcpus.push(vcpu);
    return vcpu;
  }

  /**
   * Copies bytes into guest RAM (bounds-checked by the core).
   *
   * @param gpa Guest-physical address.
   * @param data The bytes.
   */
  writeMemory(gpa: number | bigint, data: Uint8Array): void {
    this.#core.vmWriteMemory(this.#live(), toAddress(gpa, "address"), data);
  }

  /**
   * Copies bytes out of guest RAM (bounds-checked by the core).
   *
   * @param gpa Guest-physical address.
   * @param length How many bytes.
   * @returns A copy of the bytes.
   */
  readMemory(gpa: number | bigint, length: number): Uint8Array {
    if (!Number.isSafeInteger(length) || length < 0) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `length must be a non-negative integer, got ${length}`,
      );
    }
    return this.#core.vmReadMemory(this.#live(), toAddress(gpa, "address"), length);
  }

  /**
   * Loads a static ELF64 x86-64 executable by its program headers.
   *
   * @param image The file's bytes.
   * @param options `reserveLow`: refuse segments over the VMM's boot structures
   *   (required for the 64-bit entry modes).
   * @returns The entry point.
   */
  loadElf(image: Uint8Array, options: { reserveLow: boolean }): bigint {
    return this.#core.vmLoadElf(
      this.#live(),
      image,
      options.reserveLow ? LOAD_FLAG_RESERVE_LOW : 0,
    );
  }

  /**
   * Loads a flat binary at a guest-physical address.
   *
   * @param image The bytes.
   * @param address Where they go.
   * @param options `reserveLow` as for {@link KvmVm.loadElf}.
   */
  loadFlat(image: Uint8Array, address: number | bigint, options: { reserveLow: boolean }): void {
    this.#core.vmLoadFlat(
      this.#live(),
      image,
      toAddress(address, "load address"),
      options.reserveLow ? LOAD_FLAG_RESERVE_LOW : 0,
    );
  }

  /**
   * Loads a Linux kernel by the 64-bit boot protocol: the kernel (bzImage or
   * `vmlinux` ELF), an initrd and a command line, plus the zero page, the boot
   * GDT and the identity page tables. Nothing is written unless it all fits.
   * Point a vCPU at it with {@link KvmVcpu.setupLinuxEntry}.
   *
   * @param kernel The kernel image.
   * @param initrd The initrd (empty: none).
   * @param cmdline The command line's bytes (no NUL).
   * @returns Where everything went.
   */
  loadLinux(kernel: Uint8Array, initrd: Uint8Array, cmdline: Uint8Array): LinuxLayout {
    return this.#core.vmLoadLinux<LinuxLayout>(this.#live(), kernel, initrd, cmdline);
  }

  /**
   * Streams the serial console to a host file descriptor as the guest writes it
   * (a writer thread of the core writes a duplicate of it; no JavaScript runs
   * per byte). The guest never waits for the fd: output it does not take in
   * time (1 MiB waiting) is dropped and counted ({@link KvmVm.consoleStats}).
   * A run returns once its output is written, or after the fd made no progress
   * for a second. `null` stops.
   *
   * @param fd An open fd (1 = stdout); the core keeps its own duplicate.
   */
  streamConsoleTo(fd: number | null): void {
    this.#core.vmSetConsoleFd(this.#live(), fd ?? -1);
  }

  /**
   * Limits what the guest writes to its console (the UART and the WRITE
   * hypercall) from now on: bytes and writes per refill period. A UART cannot
   * make the guest wait without stalling its vCPU, so output over the limit is
   * dropped and counted (`rateDropped` in {@link KvmVm.consoleStats}).
   *
   * @example
   * ```ts ignore
   * import { Kvm } from "denovisor";
   * using kvm = Kvm.open();
   * using vm = kvm.createVm({ memoryMiB: 16 });
   * vm.setConsoleRateLimiter({ bandwidth: { size: 64 * 1024, refillTimeMs: 1000 } }); // 64 KiB/s
   * ```
   *
   * @param limiter The buckets (`null` removes the limiter).
   * @throws {DenovisorError} `INVALID_ARGUMENT` naming a bad field.
   */
  setConsoleRateLimiter(limiter: RateLimiter | null): void {
    if (limiter !== null) checkRateLimiter(limiter, "console");
    this.#core.vmSetConsoleRateLimiter(
      this.#live(),
      limiter === null ? "" : JSON.stringify(limiter),
    );
  }

  /**
   * The console's cumulative byte counts: written, dropped by the capture and
   * by the stream, and waiting for the stream.
   *
   * @returns The counts since the VM was created.
   */
  consoleStats(): ConsoleStats {
    return this.#core.vmConsoleStats<ConsoleStats>(this.#live());
  }

  /**
   * Takes the console output buffered since the last call (the core keeps the
   * newest 1 MiB).
   *
   * @returns The bytes.
   */
  takeConsoleOutput(): Uint8Array {
    return this.#core.vmConsoleTake(this.#live());
  }

  /**
   * Runs every vCPU until the guest ends the VM or the timeout passes. The JS
   * event loop keeps running meanwhile.
   *
   * @param options The timeout.
   * @returns The exit that ended the VM (or vCPU 0's).
   */
  async run(options: RunOptions = {}): Promise<RunOutcome> {
    const timeout = checkTimeout(options.timeoutMs);
    return outcome(await this.#core.vmRun<RawRunResult>(this.#live(), timeout));
  }

  /** Asks every vCPU to stop; a pending run resolves with `stopped`. */
  stop(): void {
    this.#core.vmStop(this.#live());
  }

  /**
   * Takes every vCPU out of KVM_RUN without ending the run and quiesces the
   * virtio devices; returns once all are parked and idle, so registers can
   * be read and written and guest memory stays still.
   */
  pause(): void {
    this.#core.vmPause(this.#live());
  }

  /** Lets paused vCPUs continue. */
  resume(): void {
    this.#core.vmResume(this.#live());
  }

  /**
   * Sets which CPUID features the guest sees (on every vCPU, and on vCPUs
   * created later). Call before the first run: KVM refuses changes after it.
   *
   * @param policy Features to hide.
   */
  setCpuidPolicy(policy: CpuidPolicy): void {
    this.#core.vmSetCpuidPolicy(this.#live(), cpuidPolicyJson(policy));
  }

  /**
   * Installs an MSR filter: denied accesses give the guest #GP and count in
   * the metrics (`msrReadDenied`, `msrWriteDenied`).
   *
   * @param policy Default action and listed MSRs.
   */
  setMsrPolicy(policy: MsrPolicy): void {
    this.#core.vmSetMsrFilter(this.#live(), msrPolicyJson(policy));
  }

  /**
   * `KVM_IRQ_LINE` high then low: one edge on an interrupt line (GSI 0-23: the
   * IOAPIC pin of that number, and for 0-15 the PIC input too). Needs `irqchip`.
   *
   * @param line The GSI.
   */
  injectIrq(line: number): void {
    this.#core.vmInjectIrq(this.#live(), checkIrqLine(line));
  }

  /**
   * `KVM_SIGNAL_MSI`: a message-signalled interrupt. Needs `irqchip`.
   *
   * @param address `0xfee00000 | apicId << 12`.
   * @param data The vector in bits 0-7 (fixed delivery, edge).
   * @returns Whether a local APIC accepted it.
   */
  sendMsi(address: number | bigint, data: number): boolean {
    const [a, d] = checkMsi(address, data);
    return this.#core.vmSendMsi(this.#live(), a, d);
  }

  /**
   * The host's interrupt counters.
   *
   * @returns Whether the VM has an irqchip, and what the host raised.
   */
  irqStats(): IrqStats {
    return this.#core.vmIrqStats<IrqStats>(this.#live());
  }

  /**
   * Attaches a virtio device on PCI bus 0 from its JSON configuration (see
   * `src/devices.ts` for the shapes). Needs the irqchip.
   *
   * @example
   * ```ts ignore
   * const name = vm.addDevice('{"kind":"rng"}'); // "rng0"
   * ```
   *
   * @param json The device's configuration.
   * @returns The device's name.
   * @throws {DenovisorError} `DEVICE` when it cannot be built or attached.
   */
  addDevice(json: string): string {
    return this.#core.vmAddDevice(this.#live(), json);
  }

  /**
   * The VM's devices: PCI functions and each bus's ranges with their accesses.
   *
   * @example
   * ```ts ignore
   * const listing = vm.devices<{ pci: unknown[] }>();
   * ```
   *
   * @returns The listing's parsed JSON.
   */
  devices<T>(): T {
    return this.#core.vmDevices<T>(this.#live());
  }

  /**
   * Every device's state as plain data (`dv_vm_device_state`): COM1, the
   * i8042, PM1a, the RTC, debug-exit, ACPI PM and the PCI bus with each
   * virtio transport. What snapshots read device state from.
   *
   * @example
   * ```ts ignore
   * const state = vm.deviceState<{ rtc: { index: number } }>();
   * ```
   *
   * @returns The state's parsed JSON.
   */
  deviceState<T>(): T {
    return this.#core.vmDeviceState<T>(this.#live());
  }

  /**
   * The KVM state of the paused VM (`dv_vm_snapshot_state`): every vCPU
   * (registers, XSAVE, MSRs, LAPIC, pending events, CPUID...), the irqchip,
   * the PIT and the KVM clock, as JSON text. Refused with `BUSY` unless the
   * VM is paused.
   *
   * @example
   * ```ts ignore
   * vm.pause();
   * const state = vm.snapshotState();
   * ```
   *
   * @returns The state as JSON text.
   */
  snapshotState(): string {
    return this.#core.vmSnapshotState(this.#live());
  }

  /**
   * Starts dirty-page tracking (`KVM_MEM_LOG_DIRTY_PAGES` on every RAM slot,
   * plus the pages the VMM's devices and hypercalls write): from now on,
   * {@link KvmVm.takeDirtyPages} gives the pages written. Starting again
   * starts a new, empty set.
   *
   * @example
   * ```ts
   * import { Kvm } from "denovisor";
   * using vm = (await Kvm.open()).createVm({ memoryBytes: 2 << 20 });
   * vm.startDirtyLog();
   * vm.writeMemory(0x3000, new Uint8Array([1]));
   * console.log(vm.takeDirtyPages().pages); // [ 3 ]
   * ```
   */
  startDirtyLog(): void {
    this.#core.vmDirtyLog(this.#live(), true);
  }

  /**
   * Stops dirty-page tracking.
   *
   * @example
   * ```ts ignore
   * vm.stopDirtyLog();
   * ```
   */
  stopDirtyLog(): void {
    this.#core.vmDirtyLog(this.#live(), false);
  }

  /**
   * The pages written since tracking started or since the last take, by the
   * guest or by the VMM, and clears them. Throws `INVALID_ARGUMENT` while
   * tracking is off.
   *
   * @example
   * ```ts ignore
   * const { pages } = vm.takeDirtyPages(); // page indexes, RAM order
   * ```
   *
   * @returns The bitmap and the dirty pages' indexes.
   */
  takeDirtyPages(): DirtyPages {
    return dirtyPages(this.#core.vmTakeDirty(this.#live()));
  }

  /**
   * Writes a snapshot of the paused VM into the directory `dir`, which must
   * not exist or be empty (`dv_vm_snapshot_create`): the KVM state, every
   * device's state, `config` (opaque JSON to rebuild the VM from) and guest
   * RAM. Refused with `BUSY` unless the VM is paused; a failed snapshot
   * leaves nothing at `dir`.
   *
   * @example
   * ```ts ignore
   * vm.pause();
   * vm.snapshotCreate("/tmp/snap", "{}");
   * ```
   *
   * @param dir The snapshot directory.
   * @param config JSON text stored with the snapshot.
   * @param parent For a diff snapshot (`dv_vm_snapshot_diff`): the VM's
   *   last snapshot, dirty-page tracking on since; only the pages written
   *   since are stored.
   * @returns What was written: bytes of state and memory, time taken.
   */
  snapshotCreate(dir: string, config: string, parent?: string): SnapshotWriteStats {
    if (parent !== undefined) {
      return this.#core.vmSnapshotDiff<SnapshotWriteStats>(this.#live(), dir, parent, config);
    }
    return this.#core.vmSnapshotCreate<SnapshotWriteStats>(this.#live(), dir, config);
  }

  /**
   * Applies a snapshot's device and KVM state (`dv_vm_restore_snapshot`) to
   * this VM, made by {@link Kvm.createVmFromSnapshot} from the same snapshot
   * with its devices and vCPUs, none run yet. Its next run continues the
   * snapshotted guest.
   *
   * @example
   * ```ts ignore
   * vm.restoreSnapshot("/tmp/snap");
   * ```
   *
   * @param dir The snapshot directory.
   */
  restoreSnapshot(dir: string): void {
    this.#core.vmRestoreSnapshot(this.#live(), dir);
  }

  /**
   * Takes the dirty pages into this VM's pending migration set, kept in the
   * core (`dv_vm_migration_take_dirty`): no bitmap crosses into JavaScript.
   *
   * @example
   * ```ts ignore
   * const pending = vm.migrationTakeDirty();
   * ```
   *
   * @returns The pages pending (sent by the next {@link KvmVm.sendMigrationPages}).
   */
  migrationTakeDirty(): number {
    return this.#core.vmMigrationTakeDirty(this.#live());
  }

  /**
   * Sends one round of pages to a migration socket as checksummed `pages`
   * frames, packed and written by the core off the JS thread
   * (`dv_vm_migration_send_pages`): every non-zero page with `all`, else the
   * pending set (emptied).
   *
   * @example
   * ```ts ignore
   * const round = await vm.sendMigrationPages(fd, { all: true });
   * ```
   *
   * @param fd A socket from `src/migration/socket.ts`.
   * @param options `all`, the bytes of records per frame, the write timeout.
   * @returns The round's pages, bytes, frames and the ns spent packing and sending.
   */
  sendMigrationPages(
    fd: number,
    options: { all?: boolean; batchBytes?: number; timeoutMs?: number } = {},
  ): Promise<MigrationSendStats> {
    return this.#core.vmMigrationSendPages<MigrationSendStats>(
      this.#live(),
      fd,
      options.all ? 1 : 0,
      options.batchBytes ?? 4 << 20,
      options.timeoutMs ?? 0,
    );
  }

  /**
   * Reads a migration stream into this VM (`dv_migration_receive`): every
   * `pages` frame is checked (checksum, every index inside RAM) and written
   * into RAM by the core, until the first frame of another kind.
   *
   * @example
   * ```ts ignore
   * const { kind, payload } = await vm.receiveMigrationFrames(fd, 30_000);
   * ```
   *
   * @param fd A socket from `src/migration/socket.ts`.
   * @param timeoutMs Each read's timeout (0: none).
   * @returns That frame (its kind byte and payload) and the pages written before it.
   */
  receiveMigrationFrames(
    fd: number,
    timeoutMs: number,
  ): Promise<MigrationReceived> {
    return this.#core.migrationReceive(this.#live(), fd, timeoutMs, (64 << 20) + 4096);
  }

  /**
   * Forgets the pending migration pages (`dv_vm_migration_end`).
   *
   * @example
   * ```ts ignore
   * vm.endMigration();
   * ```
   */
  endMigration(): void {
    this.#core.vmMigrationEnd(this.#live());
  }

  /**
   * Packs guest pages for a migration stream (`dv_vm_pack_pages`): the pages
   * set in `bitmap` (as {@link KvmVm.takeDirtyPages} gives it) from page
   * `from` on, as `[u64 index][4096 bytes]` records, as many as fit in `out`.
   *
   * @example
   * ```ts ignore
   * const { length, next } = vm.packPages(vm.takeDirtyPages().bitmap, 0, false, buf);
   * ```
   *
   * @param bitmap One bit per page of RAM.
   * @param from The first page to consider.
   * @param skipZero Leave out pages that are all zero.
   * @param out Where the records go.
   * @returns The bytes written and the page to continue from (the RAM's page count when done).
   */
  packPages(
    bitmap: Uint8Array,
    from: number,
    skipZero: boolean,
    out: Uint8Array,
  ): { length: number; next: number } {
    return this.#core.vmPackPages(this.#live(), bitmap, from, skipZero, out);
  }

  /**
   * Writes a batch of packed pages from a peer into RAM (`dv_vm_unpack_pages`).
   * Every index is checked against RAM; a bad batch is refused whole.
   *
   * @example
   * ```ts ignore
   * target.unpackPages(batch);
   * ```
   *
   * @param batch Records from {@link KvmVm.packPages}.
   * @returns The pages written.
   * @throws {DenovisorError} `INVALID_ARGUMENT` for a cut record or an index outside RAM.
   */
  unpackPages(batch: Uint8Array): number {
    return this.#core.vmUnpackPages(this.#live(), batch);
  }

  /**
   * The paused VM's `host` section (`dv_vm_migration_host`): this host's CPU
   * and the CPUID features the guest was given, for a migration target to check.
   *
   * @example
   * ```ts ignore
   * vm.pause();
   * const host = vm.migrationHost();
   * ```
   *
   * @returns The section, parsed.
   */
  migrationHost(): unknown {
    return this.#core.vmMigrationHost<unknown>(this.#live());
  }

  /**
   * The paused VM's state without its memory (`dv_vm_migration_state`): a
   * snapshot state file's bytes with `config`, for a migration's last frame.
   *
   * @example
   * ```ts ignore
   * vm.pause();
   * const state = vm.migrationState("{}");
   * ```
   *
   * @param config JSON text to carry with it.
   * @returns The state bytes.
   */
  migrationState(config: string): Uint8Array {
    return this.#core.vmMigrationState(this.#live(), config);
  }

  /**
   * Verifies migration state bytes whole and applies them to this VM
   * (`dv_vm_apply_migration_state`), built with the same configuration, its
   * RAM already holding the guest's pages and no vCPU run yet.
   *
   * @example
   * ```ts ignore
   * target.applyMigrationState(state);
   * ```
   *
   * @param state Bytes from {@link KvmVm.migrationState}.
   * @throws {DenovisorError} `SNAPSHOT_INVALID` naming a bad section,
   *   `SNAPSHOT_WRONG_HOST` for another CPU.
   */
  applyMigrationState(state: Uint8Array): void {
    this.#core.vmApplyMigrationState(this.#live(), state);
  }

  /**
   * Restores a state from {@link KvmVm.snapshotState} into this VM, which must
   * be fresh: the same RAM size and vCPU count, the irqchip if the state has
   * one, vCPUs that have not run. Guest memory is the caller's to copy.
   *
   * @example
   * ```ts ignore
   * target.restoreState(source.snapshotState());
   * ```
   *
   * @param state The JSON text `snapshotState` returned.
   */
  restoreState(state: string): void {
    this.#core.vmRestoreState(this.#live(), state);
  }

  /**
   * Passes a runtime request (`{"op": ...}` as JSON) to the device `name`.
   *
   * @example
   * ```ts ignore
   * const stats = vm.deviceControl("balloon0", '{"op":"stats"}');
   * ```
   *
   * @param name The device's name.
   * @param json The request.
   * @returns The device's answer, parsed.
   * @throws {DenovisorError} `DEVICE` when the device does not take the request.
   */
  deviceControl<T>(name: string, json: string): T {
    return this.#core.vmDeviceControl<T>(this.#live(), name, json);
  }

  /**
   * The guest's interrupt counters by vector, as the guest published them with
   * the IRQ_COUNTERS hypercall; read from guest RAM, at no cost to the guest.
   *
   * @returns One count per vector (empty when the guest published none).
   */
  guestIrqCounters(): BigUint64Array {
    return this.#core.vmGuestIrqCounters(this.#live());
  }

  /**
   * Queues bytes for the guest on COM1's receive side.
   *
   * @param input Bytes, or a string (sent as UTF-8).
   */
  sendConsoleInput(input: Uint8Array | string): void {
    this.#core.vmConsoleInput(this.#live(), toConsoleBytes(input));
  }

  /**
   * The bytes of the guest's last REPORT hypercall in the current or last run.
   *
   * @returns The report, or undefined when the guest reported nothing.
   */
  report(): Uint8Array | undefined {
    const bytes = this.#core.vmReport(this.#live());
    return bytes.length > 0 ? bytes : undefined;
  }

  /**
   * Reads every vCPU's exit counters in one call.
   *
   * @returns One entry per vCPU.
   */
  metrics(): VcpuMetrics[] {
    return this.#core.vmMetrics<VcpuMetrics[]>(this.#live());
  }

  /**
   * Reads KSM's counters: the host's (`/sys/kernel/mm/ksm/`) and this
   * process's (`/proc/self/ksm_stat`), beside whether this VM's RAM is
   * mergeable. Fields the kernel does not report are null.
   *
   * @returns The counters, as the core read them.
   * @example
   * ```ts
   * import { Kvm } from "denovisor";
   * using vm = (await Kvm.open()).createVm({ memoryBytes: 2 << 20, dedup: true });
   * console.log(vm.ksm().process.mergingPages); // 0 until ksmd merges something
   * ```
   */
  ksm(): KsmCounters {
    return this.#core.vmKsm<KsmCounters>(this.#live());
  }

  /**
   * Reads how much of guest RAM is backed by host memory now (`mincore` over
   * every RAM region).
   *
   * @returns The RAM size and its resident part, in bytes.
   * @example
   * ```ts
   * import { Kvm } from "denovisor";
   * using vm = (await Kvm.open()).createVm({ memoryBytes: 2 << 20 });
   * console.log(vm.memory()); // { sizeBytes: 2097152, residentBytes: 0 }
   * ```
   */
  memory(): GuestMemoryUsage {
    return this.#core.vmMemory<GuestMemoryUsage>(this.#live());
  }

  /**
   * Gives up the devices' exclusive host resources for another process (a
   * live migration's other side): each disk makes every write it answered
   * durable (`fdatasync`) and releases its image's lock. The VM must be
   * paused or not yet run; devices added afterwards are built without them.
   * {@link KvmVm.takeOverDevices} claims them again.
   *
   * @example
   * ```ts ignore
   * vm.pause();
   * vm.handOverDevices(); // another process may open the disks now
   * ```
   *
   * @throws {DenovisorError} `BUSY` while a device runs, `DEVICE` when a
   *   disk cannot be flushed.
   */
  handOverDevices(): void {
    this.#core.vmDevicesClaim(this.#live(), false);
  }

  /**
   * Claims the devices' exclusive host resources (disk images' locks) after
   * {@link KvmVm.handOverDevices}, or on a migration target built without
   * them.
   *
   * @example
   * ```ts ignore
   * vm.takeOverDevices(); // throws while another process holds a disk
   * ```
   *
   * @throws {DenovisorError} `DEVICE` naming the device whose resource
   *   another process holds.
   */
  takeOverDevices(): void {
    this.#core.vmDevicesClaim(this.#live(), true);
  }

  /**
   * Takes the checkpoint of a function VM stopped at READY (after the
   * runtime's EXIT hypercall): every vCPU's state, and guest RAM as the
   * pristine image every request starts from (the snapshot's memory file
   * for a VM restored lazily and not run since, else a sealed private copy
   * RAM is then mapped onto). Starts dirty-page tracking.
   *
   * @example
   * ```ts ignore
   * await vm.run(); // to the runtime's READY
   * vm.checkpoint();
   * ```
   *
   * @returns Whether RAM's image is the snapshot's memory file (shared by
   *   every VM restored from it).
   * @throws {DenovisorError} `INVALID_ARGUMENT` when the mailbox is not at a
   *   valid READY, `BUSY` while the VM runs.
   */
  checkpoint(): boolean {
    const shared = this.#core.vmCheckpoint(this.#live());
    this.#ready = undefined;
    this.#call = undefined;
    return shared;
  }

  /**
   * Puts a checkpointed VM back at its checkpoint: the pages written since
   * and every vCPU's state.
   *
   * @example
   * ```ts ignore
   * const { pages, ns } = vm.reset();
   * ```
   *
   * @returns Pages restored and the time it took, ns.
   * @throws {DenovisorError} `INVALID_ARGUMENT` without a checkpoint.
   */
  reset(): { pages: number; ns: number } {
    return this.#core.vmReset(this.#live());
  }

  /**
   * Gives an idle checkpointed VM's private pages back to the host.
   *
   * @example
   * ```ts ignore
   * console.log(vm.trim()); // guest RAM resident afterwards, bytes
   * ```
   *
   * @returns Guest RAM's resident bytes afterwards.
   * @throws {DenovisorError} `INVALID_ARGUMENT` without a checkpoint.
   */
  trim(): number {
    return this.#core.vmTrim(this.#live());
  }

  /**
   * The buffers the function runtime set up at READY (checked by the core).
   *
   * @example
   * ```ts ignore
   * console.log(vm.functionReady().inputCapacity);
   * ```
   *
   * @returns The capacities.
   * @throws {DenovisorError} `INVALID_ARGUMENT` when the mailbox is not at READY.
   */
  functionReady(): FunctionReady {
    if (this.#ready) return this.#ready;
    const [inputCapacity, stdoutCapacity, stderrCapacity] = this.#core.fnReady(this.#live());
    this.#ready = { inputCapacity, stdoutCapacity, stderrCapacity };
    return this.#ready;
  }

  /**
   * Runs one request on a checkpointed function VM, on this thread, and
   * resets the VM to its checkpoint (see {@link KvmVm.invokeAsync}).
   *
   * @example
   * ```ts ignore
   * const result = vm.invoke(new TextEncoder().encode("hi"), { timeoutMs: 1000 });
   * ```
   *
   * @param input The request's input (stdin).
   * @param options Its limits.
   * @returns What the request did.
   * @throws {DenovisorError} `INVALID_ARGUMENT` for bad limits or without a
   *   checkpoint, `BUSY` while another request runs, `CLOSED`.
   */
  invoke(input: Uint8Array, options: InvokeOptions = {}): InvokeResult {
    const vm = this.#live();
    const call = this.#callFor(input, options);
    try {
      this.#core.fnInvoke(vm, call);
      return decodeInvokeResult(call);
    } finally {
      this.#release(call);
    }
  }

  /** The buffers of a request: the VM's own unless one is in flight (the
   * core then refuses the second with `BUSY`, into buffers of its own). */
  #callFor(input: Uint8Array, options: InvokeOptions): FnInvokeCall {
    const ready = this.functionReady();
    const fresh = invokeCall(input, options, ready, 0, this.#calling ? undefined : this.#call);
    if (!this.#calling) {
      this.#calling = true;
      this.#call = fresh;
    }
    return fresh;
  }

  #release(call: FnInvokeCall): void {
    if (call === this.#call) this.#calling = false;
  }

  /**
   * Runs one request on a checkpointed function VM in one core call, off the
   * JS thread: writes the input and the per-request mailbox fields, runs the
   * vCPU to the runtime's DONE (or the time limit, or a crash), checks the
   * mailbox, copies the output, and always resets the VM to its checkpoint.
   *
   * @example
   * ```ts ignore
   * const result = await vm.invokeAsync(new TextEncoder().encode("hi"));
   * console.log(result.status, new TextDecoder().decode(result.stdout));
   * ```
   *
   * @param input The request's input (stdin).
   * @param options Its limits.
   * @returns What the request did.
   * @throws {DenovisorError} `INVALID_ARGUMENT` for bad limits or without a
   *   checkpoint, `BUSY` while another request runs, `CLOSED`.
   */
  async invokeAsync(input: Uint8Array, options: InvokeOptions = {}): Promise<InvokeResult> {
    const vm = this.#live();
    const call = this.#callFor(input, options);
    try {
      await this.#core.fnInvokeAsync(vm, call);
      return decodeInvokeResult(call);
    } finally {
      this.#release(call);
    }
  }

  /** Stops the vCPUs, joins their threads, frees RAM and fds. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    reclaimer.unregister(this);
    this.#core.vmClose(this.#handle);
  }

  /** Same as {@link KvmVm.close}, for `using`. */
  [Symbol.dispose](): void {
    this.close();
  }
}

/**
 * A KVM vCPU. Its registers can be read and written while it is not running.
 *
 * @example
 * ```ts
 * import { Kvm } from "denovisor";
 * using vm = (await Kvm.open()).createVm({ memoryBytes: 2 << 20 });
 * const vcpu = vm.createVcpu();
 * const regs = vcpu.getRegisters();
 * regs.rax = 42n;
 * vcpu.setRegisters(regs);
 * console.log(vcpu.getRegisters().rax); // 42n
 * ```
 */
export class KvmVcpu {
  readonly #core: Core;
  readonly #handle: number;
  readonly #vm: KvmVm;
  /** The vCPU's index (its KVM vCPU id). */
  readonly index: number;

  /** Wraps a core vCPU handle (use {@link KvmVm.createVcpu}). */
  constructor(core: Core, handle: number, index: number, vm: KvmVm) {
    this.#core = core;
    this.#handle = handle;
    this.index = index;
    this.#vm = vm;
  }

  #live(): number {
    if (this.#vm.closed) throw new DenovisorError("CLOSED", "the vCPU's VM is closed");
    return this.#handle;
  }

  /** `KVM_GET_REGS`. @returns The general-purpose registers. */
  getRegisters(): Registers {
    return decodeRegisters(this.#core.vcpuGetState(this.#live(), StateKind.regs));
  }

  /** `KVM_SET_REGS`. @param regs The general-purpose registers. */
  setRegisters(regs: Registers): void {
    this.#core.vcpuSetState(this.#live(), StateKind.regs, encodeRegisters(regs));
  }

  /** `KVM_GET_SREGS`. @returns Segment, control and descriptor-table registers. */
  getSpecialRegisters(): SpecialRegisters {
    return decodeSpecialRegisters(this.#core.vcpuGetState(this.#live(), StateKind.sregs));
  }

  /** `KVM_SET_SREGS`. @param sregs Segment, control and descriptor-table registers. */
  setSpecialRegisters(sregs: SpecialRegisters): void {
    this.#core.vcpuSetState(this.#live(), StateKind.sregs, encodeSpecialRegisters(sregs));
  }

  /** `KVM_GET_FPU`. @returns The x87/SSE state. */
  getFpuState(): FpuState {
    return decodeFpuState(this.#core.vcpuGetState(this.#live(), StateKind.fpu));
  }

  /** `KVM_SET_FPU`. @param fpu The x87/SSE state. */
  setFpuState(fpu: FpuState): void {
    this.#core.vcpuSetState(this.#live(), StateKind.fpu, encodeFpuState(fpu));
  }

  /**
   * Puts the CPU in an entry mode at `entry` with stack pointer `stack`. For
   * `long` and `user` this also writes the VMM's GDT, TSS and identity page
   * tables into guest RAM below 0x10000.
   *
   * @param mode `real`, `long` (64-bit CPL0) or `user` (64-bit CPL3, IOPL=3).
   * @param entry The first instruction's address.
   * @param stack The initial stack pointer (default 0).
   */
  setupEntry(mode: EntryMode, entry: number | bigint, stack: number | bigint = 0): void {
    const code = ENTRY_MODES[mode];
    if (code === undefined) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `entry mode must be one of ${Object.keys(ENTRY_MODES).join(", ")}, got ${
          JSON.stringify(mode)
        }`,
      );
    }
    this.#core.vcpuSetupEntry(
      this.#live(),
      code,
      toAddress(entry, "entry"),
      toAddress(stack, "stack"),
    );
  }

  /**
   * Puts the CPU at a Linux kernel's 64-bit entry, as the boot protocol asks:
   * long mode with identity paging, CS = 0x10 and DS/ES/SS = 0x18 from the boot
   * GDT, interrupts off, RSI = the zero page. Call after {@link KvmVm.loadLinux}.
   *
   * @param entry The entry point (`LinuxLayout.entry`).
   * @param zeroPage The zero page (`LinuxLayout.zeroPage`).
   */
  setupLinuxEntry(entry: number | bigint, zeroPage: number | bigint): void {
    this.#core.vcpuSetupLinuxEntry(
      this.#live(),
      toAddress(entry, "entry"),
      toAddress(zeroPage, "zero page"),
    );
  }

  /**
   * `KVM_RUN`, with the core's exit loop handling device exits, until an exit
   * that ends the run. The JS event loop keeps running meanwhile.
   *
   * @param options The timeout.
   * @returns The exit that ended the run.
   */
  async run(options: RunOptions = {}): Promise<RunOutcome> {
    const timeout = checkTimeout(options.timeoutMs);
    return outcome(await this.#core.vcpuRun<RawRunResult>(this.#live(), timeout));
  }
}

/** One round of pages the core sent ({@link KvmVm.sendMigrationPages}). */
export interface MigrationSendStats {
  /** Pages sent. */
  pages: number;
  /** Bytes written, frame headers included. */
  bytes: number;
  /** Frames written. */
  frames: number;
  /** Nanoseconds reading the pages out of RAM and checksumming them. */
  packNs: number;
  /** Nanoseconds writing them to the socket. */
  sendNs: number;
}
