/**
 * The high-level API: a {@link Vm} is configured, loaded with an image, run to
 * completion and closed — the way a user of Firecracker or Cloud Hypervisor
 * thinks of a VM. It is built on the low-level {@link KvmVm} / {@link KvmVcpu}.
 *
 * @module
 */

import type { FunctionReady, InvokeOptions, InvokeResult } from "./kvm/function.ts";
export type { FunctionReady, InvokeOptions, InvokeResult } from "./kvm/function.ts";
import {
  type DeviceConfig,
  deviceConfigJson,
  type DeviceListing,
  type DeviceState,
} from "./devices.ts";
import { VmBalloon } from "./balloon.ts";
import { DenovisorError } from "./errors.ts";
import { checkRateLimiter, type RateLimiter } from "./rate_limiter.ts";
import { describeExit, type ExitReason, type VcpuExit } from "./kvm/exit.ts";
import { lastLines } from "./console_driver.ts";
import { type CpuidPolicy, cpuidPolicyJson, type MsrPolicy, msrPolicyJson } from "./cpu/policy.ts";
import type { IrqStats } from "./irq.ts";
import { type KsmMetrics, ksmMetrics } from "./ksm.ts";
import {
  type DirtyPages,
  type EntryMode,
  type GuestMemoryUsage,
  Kvm,
  type KvmVcpu,
  type KvmVm,
  type UnhandledAccessPolicy,
  type VcpuMetrics,
} from "./kvm/kvm.ts";
import type { LinuxLayout, LinuxLoadOptions } from "./linux/layout.ts";
import { linuxInputs } from "./linux/inspect.ts";
import { CONSTANTS } from "./_contract.generated.ts";
import { inspectSnapshot, parseSnapshotConfig, snapshotConfig } from "./snapshot.ts";
import type { SnapshotWriteStats } from "./kvm/kvm.ts";

/** Guest-physical start of the MMIO hole below 4 GiB (RAM above it moves past 4 GiB). */
const MMIO_GAP_START: number = CONSTANTS.MMIO_GAP_START;
/** Guest-physical region the VMM's boot structures use in the 64-bit modes. */
export const RESERVED_LOW_END: number = CONSTANTS.RESERVED_LOW_END;
/** Default load address of flat images in real mode. */
export const DEFAULT_REAL_LOAD_ADDRESS: number = CONSTANTS.DEFAULT_REAL_LOAD_ADDR;
/** Default load address of flat images in the 64-bit modes. */
export const DEFAULT_LONG_LOAD_ADDRESS: number = CONSTANTS.DEFAULT_LONG_LOAD_ADDR;
/** The largest RAM accepted, in MiB (1 TiB). */
const MAX_MEMORY_MIB = 1 << 20;
/** The most vCPUs per VM accepted (KVM may allow fewer). */
const MAX_VCPUS: number = CONSTANTS.MAX_VCPUS;

/** How a VM is built. */
export interface VmConfig {
  /** Guest RAM in MiB (default 16). */
  memoryMiB?: number;
  /** Number of vCPUs (default 1, at most what the host's KVM allows). Every vCPU
   * enters at the image's entry point on its own stack ({@link VCPU_STACK_BYTES}
   * apart), one thread each. */
  vcpus?: number;
  /** Port I/O and MMIO no device claims: `ignore` (default) or `stop` the VM. */
  unhandledIo?: UnhandledAccessPolicy;
  /** Where the serial console goes: kept in memory (`capture`, default) or also
   * streamed to the process's stdout as the guest writes (`stdout`). Streaming
   * never makes the guest wait: bytes a stdout that does not drain cannot take
   * are dropped and counted ({@link RunResult.consoleStreamDropped}). */
  console?: "capture" | "stdout";
  /** Default timeout of {@link Vm.run} in milliseconds (0: none). */
  timeoutMs?: number;
  /** Interrupt virtualization: KVM's in-kernel PIC, IOAPIC, local APICs and PIT,
   * and COM1 on interrupt line 4 (default false). With it, `hlt` waits in KVM for
   * an interrupt instead of ending the run; {@link Vm.injectIrq} and
   * {@link Vm.sendMsi} need it. */
  interrupts?: boolean;
  /** CPUID features to hide from the guest (it always sees the hypervisor leaf
   * 0x40000000 with the signature "denovisor" and its own APIC id). */
  cpuid?: CpuidPolicy;
  /** Which MSRs the guest may access; denied ones give it #GP and are counted. */
  msrs?: MsrPolicy;
  /** Limits the guest's console output (bytes and writes per refill period);
   * output over it is dropped and counted (`consoleStats().rateDropped`). */
  consoleRateLimiter?: RateLimiter;
  /** virtio devices on PCI bus 0 (they interrupt through MSI-X, so they need
   * `interrupts: true`). More can be added later with {@link Vm.addDevice}. */
  devices?: DeviceConfig[];
  /** Memory deduplication (default false): guest RAM is marked mergeable for
   * the host's KSM, which shares identical pages between this and other such
   * VMs (and inside each) while its `ksmd` runs (`/sys/kernel/mm/ksm/run`,
   * the host's setting). What it saves is in {@link Vm.ksm} and the metrics
   * report. A kernel without KSM refuses it with `KSM_UNAVAILABLE`. */
  dedup?: boolean;
}

/**
 * Where a VM is in its life: `created` (no run yet), `running`, `paused`
 * (every vCPU parked by {@link Vm.pause}; a pause before the first run holds the
 * vCPUs as soon as it starts), `stopped` (its run ended).
 */
export type VmState = "created" | "running" | "paused" | "stopped";

/** The configuration a VM was created with, normalized (what `GET /vm` shows). */
export interface VmSettings {
  /** Guest RAM in MiB. */
  memoryMiB: number;
  /** vCPUs. */
  vcpus: number;
  /** Whether the in-kernel irqchip is on. */
  interrupts: boolean;
  /** Whether guest RAM is mergeable for KSM. */
  dedup: boolean;
  /** What unclaimed port I/O and MMIO do. */
  unhandledIo: UnhandledAccessPolicy;
  /** Where the console goes. */
  console: "capture" | "stdout";
  /** The default run timeout in milliseconds (0: none). */
  timeoutMs: number;
}

/** A {@link VmConfig} checked, with its defaults. */
interface CheckedConfig {
  memoryBytes: number;
  vcpus: number;
  unhandledIo: UnhandledAccessPolicy;
  interrupts: boolean;
  dedup: boolean;
  devices: string[];
  consoleMode: "capture" | "stdout";
}

/**
 * What a restored VM gets instead of the snapshot's identity, so that clones
 * of one snapshot differ where the guest must see it: the first vsock
 * device's CID (Linux reads it again on the transport reset every restore
 * posts) and the first net device's MAC (in the device's configuration space;
 * Linux read it at probe and keeps its interface's address, see README
 * "Clones and their identity").
 */
export interface CloneIdentity {
  /** The vsock CID: 3 to 4294967294. */
  cid?: number;
  /** The MAC address, `xx:xx:xx:xx:xx:xx`, unicast. */
  mac?: string;
}

/** How {@link Vm.restore} restores. */
export interface RestoreOptions {
  /** `lazy` (default) maps the memory file copy-on-write; `eager` copies it. */
  mode?: "lazy" | "eager";
  /** A clone's own vsock CID and MAC. */
  identity?: CloneIdentity;
  /** Where the console goes (default: as the snapshotted VM had it). */
  console?: "capture" | "stdout";
  /**
   * Each device's host side in this process, given the snapshot's device
   * (after `identity`) and its index: clones of one snapshot that live at the
   * same time each need their own disk image (a writable one is locked),
   * TAP and vsock socket. Only `path`, `tap`, `netns`, `tapName` and
   * `hostAddress` may change; anything the guest sees is refused.
   */
  hostSides?: (device: DeviceConfig, index: number) => DeviceConfig;
}

/** The fields of a device that only the host sees. */
const HOST_SIDE_FIELDS = new Set(["path", "tap", "netns", "tapName", "hostAddress"]);

/** The devices with `hostSides` applied; a change the guest would see is refused. */
function withHostSides(config: VmConfig, hostSides: RestoreOptions["hostSides"]): VmConfig {
  if (hostSides === undefined) return config;
  const devices = (config.devices ?? []).map((device, i) => {
    const changed = hostSides(structuredClone(device), i);
    const a = device as unknown as Record<string, unknown>;
    const b = changed as unknown as Record<string, unknown>;
    for (const key of new Set([...Object.keys(a), ...Object.keys(b)])) {
      if (!HOST_SIDE_FIELDS.has(key) && JSON.stringify(a[key]) !== JSON.stringify(b[key])) {
        throw new DenovisorError(
          "INVALID_ARGUMENT",
          `hostSides: device ${i} (${device.kind}): ${key} is what the guest sees, not a host side`,
        );
      }
    }
    return changed;
  });
  return { ...config, devices };
}

/** The config with `identity` applied (a copy); a field with no device to take it is refused. */
function withIdentity(config: VmConfig, identity: CloneIdentity): VmConfig {
  const devices = [...(config.devices ?? [])];
  const apply = (kind: "vsock" | "net", field: string, patch: Partial<DeviceConfig>) => {
    const i = devices.findIndex((d) => d.kind === kind);
    if (i < 0) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `identity.${field}: the snapshot's VM has no ${kind} device`,
      );
    }
    devices[i] = { ...devices[i], ...patch } as DeviceConfig;
  };
  if (identity.cid !== undefined) apply("vsock", "cid", { cid: identity.cid });
  if (identity.mac !== undefined) apply("net", "mac", { mac: identity.mac });
  return { ...config, devices };
}

/** The names of a listing's devices of one kind. */
function devicesOfKind(listing: DeviceListing, kind: DeviceConfig["kind"]): string[] {
  return listing.pci.filter((f) =>
    (f.details as { device?: { kind?: string } } | null)?.device?.kind === kind
  ).map((f) => f.name);
}

/** Stack space set aside per vCPU below the load's stack top (each vCPU gets its own). */
export const VCPU_STACK_BYTES = 64 * 1024;

/** How an image is placed and entered. */
export interface LoadOptions {
  /** `auto` (default) detects ELF by its magic; anything else is flat. */
  format?: "auto" | "elf" | "flat";
  /** Entry mode (default `long`). */
  mode?: EntryMode;
  /** Where a flat image goes (default 0x7c00 in real mode, 0x100000 otherwise). */
  loadAddress?: number;
  /** The first instruction (default: the ELF entry, or the load address). */
  entry?: number;
  /** Initial stack pointer (default: the top of RAM below 4 GiB in the 64-bit
   * modes, the load address in real mode). */
  stack?: number;
  /** Values for the first argument registers at entry, in the SysV order
   * rdi, rsi, rdx, rcx, r8, r9 (at most six). The guest runtime reads its
   * workload argument from rdi and the RAM size from rsi. A function gets each
   * vCPU's index and returns that vCPU's arguments. */
  arguments?:
    | readonly (number | bigint)[]
    | ((vcpu: number) => readonly (number | bigint)[]);
}

const ARGUMENT_REGISTERS = ["rdi", "rsi", "rdx", "rcx", "r8", "r9"] as const;

function checkArguments(args: unknown): readonly (number | bigint)[] {
  if (!Array.isArray(args)) {
    throw new DenovisorError("INVALID_ARGUMENT", "arguments must be an array of integers");
  }
  if (args.length > ARGUMENT_REGISTERS.length) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `at most ${ARGUMENT_REGISTERS.length} arguments fit in registers, got ${args.length}`,
    );
  }
  for (const a of args) {
    const ok = typeof a === "bigint" ? a >= 0n && a < 1n << 64n : Number.isSafeInteger(a) && a >= 0;
    if (!ok) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `arguments must be integers from 0 to 2^64 - 1, got ${String(a)}`,
      );
    }
  }
  return args;
}

/** Where and how an image was loaded. */
export interface LoadedImage {
  /** Which loader was used. */
  format: "elf" | "flat" | "linux";
  /** The entry mode. */
  mode: EntryMode;
  /** The first instruction's address. */
  entry: bigint;
  /** The initial stack pointer. */
  stack: bigint;
  /** Bytes loaded. */
  size: number;
}

/** Timings of a run, all measured in this process. */
export interface RunTimings {
  /** Milliseconds {@link Vm.create} took to build the VM (RAM, vCPUs, devices),
   * not counting the once-per-process loading of the core. */
  createMs: number;
  /** Milliseconds the {@link Vm.run} call took, as seen from JavaScript. */
  runMs: number;
  /** Nanoseconds the vCPU ran, measured in the core. */
  guestNs: number;
}

/** What a run produced. */
export interface RunResult {
  /** The guest's exit code: `(v << 1) | 1` for a write of `v` to the
   * debug-exit port 0xf4, or the status of the EXIT hypercall; `null` when the
   * run ended another way. */
  exitCode: number | null;
  /** The bytes of the guest's last REPORT hypercall, if it made one. */
  report: Uint8Array | undefined;
  /** The same report decoded as UTF-8 (what the guest runtime's workloads send). */
  reportText: string | undefined;
  /** Why the run ended. */
  reason: ExitReason;
  /** The full exit, with its details (crash registers, port, ...). */
  exit: VcpuExit;
  /** A one-line description of the exit. */
  summary: string;
  /** Serial console output of this run (UTF-8 decoded): its newest 1 MiB. */
  console: string;
  /** The message of a Linux kernel panic the console showed (`Kernel panic -
   * not syncing: ...`), whatever ended the run afterwards (the kernel's own
   * reboot with `panic=N`, or the timeout while it spins with `panic=0`). */
  panic?: string;
  /** Set by a watchdog that stopped a guest which stopped answering (the CLI's
   * `--watchdog`). */
  unresponsive?: boolean;
  /** Console bytes of this run missing from {@link RunResult.console}: the
   * oldest output beyond the newest 1 MiB kept (0 when all of it is there). */
  consoleDropped: number;
  /** Console bytes of this run never written to stdout (with `console:
   * "stdout"`) because stdout did not take them in time; 0 otherwise. */
  consoleStreamDropped: number;
  /** VM exits during this run, all vCPUs. */
  exits: number;
  /** Timings. */
  timings: RunTimings;
}

function positiveInteger(value: number, what: string, max: number): number {
  if (!Number.isInteger(value) || value <= 0 || value > max) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `${what} must be an integer from 1 to ${max}, got ${value}`,
    );
  }
  return value;
}

function isElf(image: Uint8Array): boolean {
  return image.length >= 4 && image[0] === 0x7f && image[1] === 0x45 && image[2] === 0x4c &&
    image[3] === 0x46;
}

const decoder = new TextDecoder();
/** A Linux kernel panic's first line on the console. */
const KERNEL_PANIC = /Kernel panic - not syncing: ([^\r\n]*)/;
/** How much console text a run's result keeps (its end). */
const CONSOLE_KEPT_CHARS = 1 << 20;
/** The process's standard output, which the core writes console bytes to directly. */
const STDOUT_FD = 1;

/**
 * A virtual machine: RAM, vCPUs, a serial console and the debug-exit port.
 *
 * @example Run the built-in default guest
 * ```ts
 * import { defaultGuestImage, Vm } from "denovisor";
 * using vm = await Vm.create({ memoryMiB: 16 });
 * vm.load(await defaultGuestImage(), { mode: "user" });
 * const result = await vm.run({ timeoutMs: 5000 });
 * console.log(result.console, result.exitCode);
 * ```
 */
export class Vm implements Disposable {
  readonly #vm: KvmVm;
  readonly #memoryBytes: number;
  #balloon: VmBalloon | undefined;
  readonly #config: Required<Pick<VmConfig, "timeoutMs">>;
  readonly #createMs: number;
  /** The configuration the VM was built from (devices added later included):
   * what a snapshot needs to rebuild it. */
  readonly #vmConfig: VmConfig;
  #loaded: LoadedImage | undefined;
  #running = false;
  #paused = false;
  #ran = false;
  /** Console text {@link Vm.readConsole} took during the current run (its last MiB). */
  #consoleRead = "";
  #consoleDecoder = new TextDecoder();

  private constructor(
    vm: KvmVm,
    memoryBytes: number,
    config: VmConfig,
    createMs: number,
    loaded?: LoadedImage,
  ) {
    this.#vm = vm;
    this.#memoryBytes = memoryBytes;
    this.#config = { timeoutMs: config.timeoutMs ?? 0 };
    this.#vmConfig = structuredClone(config);
    this.#createMs = createMs;
    this.#loaded = loaded;
  }

  /**
   * Creates a VM: guest RAM, vCPUs, COM1 at 0x3f8 and the debug-exit port 0xf4.
   * Loads (and on first use builds) the native core.
   *
   * @param config Memory, vCPUs, policies.
   * @returns The VM, ready for {@link Vm.load}.
   * @throws {DenovisorError} `INVALID_ARGUMENT` for a bad config,
   *   `KVM_UNAVAILABLE` when /dev/kvm cannot be used, `KSM_UNAVAILABLE` for
   *   `dedup` on a kernel without KSM.
   */
  static async create(config: VmConfig = {}): Promise<Vm> {
    const checked = Vm.#check(config);
    const kvm = await Kvm.open();
    // Loading the core is a once-per-process cost; the VM's own creation starts here.
    const started = performance.now();
    const vm = kvm.createVm({
      memoryBytes: checked.memoryBytes,
      unhandledIo: checked.unhandledIo,
      irqchip: checked.interrupts,
      dedup: checked.dedup,
    });
    Vm.#build(vm, config, checked);
    return new Vm(vm, checked.memoryBytes, config, performance.now() - started);
  }

  /** Checks a configuration before /dev/kvm is opened. */
  static #check(config: VmConfig): CheckedConfig {
    const memoryMiB = positiveInteger(config.memoryMiB ?? 16, "memoryMiB", MAX_MEMORY_MIB);
    const vcpus = positiveInteger(config.vcpus ?? 1, "vcpus", MAX_VCPUS);
    const timeoutMs = config.timeoutMs ?? 0;
    if (!Number.isInteger(timeoutMs) || timeoutMs < 0) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `timeoutMs must be a non-negative integer, got ${timeoutMs}`,
      );
    }
    const consoleMode = config.console ?? "capture";
    if (consoleMode !== "capture" && consoleMode !== "stdout") {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `console must be "capture" or "stdout", got ${JSON.stringify(consoleMode)}`,
      );
    }
    const unhandledIo = config.unhandledIo ?? "ignore";
    if (unhandledIo !== "ignore" && unhandledIo !== "stop") {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `unhandledIo must be "ignore" or "stop", got ${JSON.stringify(unhandledIo)}`,
      );
    }
    const interrupts = config.interrupts ?? false;
    if (typeof interrupts !== "boolean") {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `interrupts must be a boolean, got ${JSON.stringify(interrupts)}`,
      );
    }
    const dedup = config.dedup ?? false;
    if (typeof dedup !== "boolean") {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `dedup must be a boolean, got ${JSON.stringify(dedup)}`,
      );
    }
    // The policies are checked (and thrown away) here so that every bad
    // configuration is refused before /dev/kvm is opened.
    if (config.cpuid !== undefined) cpuidPolicyJson(config.cpuid);
    if (config.msrs !== undefined) msrPolicyJson(config.msrs);
    if (config.consoleRateLimiter !== undefined) {
      checkRateLimiter(config.consoleRateLimiter, "console", "consoleRateLimiter");
    }
    const devices = (config.devices ?? []).map(deviceConfigJson);
    if (devices.length > 0 && !interrupts) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        "devices interrupt through MSI-X: create the VM with interrupts: true",
      );
    }
    const memoryBytes = memoryMiB * 1024 * 1024;
    return { memoryBytes, vcpus, unhandledIo, interrupts, dedup, devices, consoleMode };
  }

  /** Gives a new low-level VM its policies, devices and vCPUs (closing it on failure). */
  static #build(vm: KvmVm, config: VmConfig, checked: CheckedConfig): void {
    try {
      if (config.cpuid) vm.setCpuidPolicy(config.cpuid);
      if (config.msrs) vm.setMsrPolicy(config.msrs);
      if (config.consoleRateLimiter) vm.setConsoleRateLimiter(config.consoleRateLimiter);
      for (const device of checked.devices) vm.addDevice(device);
      for (let i = 0; i < checked.vcpus; i++) vm.createVcpu();
      if (checked.consoleMode === "stdout") vm.streamConsoleTo(STDOUT_FD);
    } catch (e) {
      vm.close();
      throw e;
    }
  }

  /**
   * Writes a snapshot of this VM into the directory `dir` (which must not
   * exist or be empty): every vCPU's and device's state, guest RAM (a sparse
   * `memory` file) and the VM's configuration and loaded image, so that
   * {@link Vm.restore} rebuilds it in this or another process. A running VM
   * is paused for it and resumed after (`resume: false` leaves it paused); a
   * VM already paused stays paused unless `resume: true`. A failed snapshot
   * leaves nothing at `dir`. A paused VM's virtio devices are still (they
   * finish the requests they took and take none until resume), so the
   * memory and device state written agree.
   *
   * Diff snapshots: with dirty-page tracking on ({@link Vm.startDirtyLog}),
   * every snapshot takes the dirty set, and `{ diff: true, parent }` writes
   * only the pages written since `parent`, which must be this VM's last
   * snapshot (or, tracking started before its first run, the one it was
   * restored from). A diff restores through its chain of parents back to a
   * full snapshot; all of them must stay in place.
   *
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * const dir = await Deno.makeTempDir();
   * using vm = await Vm.create({ memoryMiB: 4 });
   * const stats = vm.snapshot(`${dir}/snap`);
   * console.log(stats.memoryBytes); // 4194304
   * ```
   *
   * @param dir The snapshot directory to create.
   * @param options Whether to resume the VM afterwards; `diff` and
   *   `parent` for a diff snapshot.
   * @returns What was written.
   * @throws {DenovisorError} `BUSY` when the VM cannot be paused, `INVALID_ARGUMENT`
   *   when `dir` exists and is not empty or a diff's parent is not this VM's
   *   last snapshot (or tracking is off), `IO` when writing fails.
   */
  snapshot(
    dir: string,
    options: { resume?: boolean; diff?: boolean; parent?: string } = {},
  ): SnapshotWriteStats {
    const config = JSON.stringify(snapshotConfig(this.#pinnedConfig(), this.#loaded));
    if ((options.diff === true) !== (options.parent !== undefined)) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        "a diff snapshot needs both diff: true and its parent",
      );
    }
    const parent = options.diff === true ? options.parent : undefined;
    try {
      const stats = this.#vm.snapshotCreate(dir, config, parent);
      if (options.resume === true) this.resume();
      return stats;
    } catch (e) {
      if (!(e instanceof DenovisorError && e.code === "BUSY")) throw e;
    }
    this.pause();
    try {
      return this.#vm.snapshotCreate(dir, config, parent);
    } finally {
      if (options.resume !== false) this.resume();
    }
  }

  /** The configuration with each net device's MAC as the guest read it: a
   * random one must come back the same on restore (the guest's driver read it
   * at probe). */
  #pinnedConfig(): VmConfig {
    const devices = this.#vmConfig.devices;
    if (!devices?.some((d) => d.kind === "net" && d.mac === undefined)) return this.#vmConfig;
    // The listing has the net functions in the order they were added.
    const macs = this.devices().pci.flatMap((f) => {
      const device = (f.details as { device?: { kind?: string; mac?: string } } | null)?.device;
      return device?.kind === "net" && typeof device.mac === "string" ? [device.mac] : [];
    });
    let net = 0;
    return {
      ...this.#vmConfig,
      devices: devices.map((d) => {
        if (d.kind !== "net") return d;
        const mac = macs[net++];
        return d.mac === undefined && mac !== undefined ? { ...d, mac } : d;
      }),
    };
  }

  /**
   * Rebuilds a VM from a snapshot written by {@link Vm.snapshot}, in this
   * process or another: the same configuration (memory, vCPUs, devices,
   * policies), guest RAM and every vCPU's and device's state. Its
   * {@link Vm.run} continues the guest where the snapshot paused it. Every
   * section of the snapshot is verified before anything is applied.
   *
   * `lazy` (default) maps the memory file copy-on-write: restoring takes the
   * same time whatever the RAM size, pages load as the guest touches them,
   * and VMs restored from one snapshot share the pages none has written; the
   * memory file's length is checked but not its checksum (that would read it
   * all). `eager` reads the memory file into the VM's own RAM and verifies its
   * checksum. The snapshot directory must stay in place while a lazy VM runs.
   *
   * Every vsock device posts a transport reset (the host streams of the
   * snapshotted process are gone: the guest resets its sockets and reads its
   * CID again); `identity` gives a clone its own CID and MAC. virtio-rng keeps
   * nothing in a snapshot: it reads fresh host entropy for every request.
   *
   * @example
   * ```ts ignore
   * import { Vm } from "denovisor";
   * using vm = await Vm.restore("/tmp/snap", { mode: "lazy" });
   * const result = await vm.run();
   * ```
   *
   * @param dir The snapshot directory.
   * @param options `mode` (`lazy` or `eager`), a clone's `identity` and
   *   `hostSides`, the `console`.
   * @returns The VM, loaded and ready to {@link Vm.run}.
   * @throws {DenovisorError} `SNAPSHOT_INVALID` naming the section that is
   *   truncated, corrupted, missing or of another version, `SNAPSHOT_WRONG_HOST`
   *   for a snapshot of another CPU, `IO` when it cannot be read.
   */
  static async restore(dir: string, options: RestoreOptions = {}): Promise<Vm> {
    const mode = options.mode ?? "lazy";
    const info = await inspectSnapshot(dir);
    const parsed = parseSnapshotConfig(info.config);
    const loaded = parsed.loaded;
    const config = withHostSides(
      withIdentity(parsed.config, options.identity ?? {}),
      options.hostSides,
    );
    if (options.console !== undefined) config.console = options.console;
    const checked = Vm.#check(config);
    if (checked.memoryBytes !== info.memory.size) {
      throw new DenovisorError(
        "SNAPSHOT_INVALID",
        `snapshot config: ${checked.memoryBytes} bytes of RAM, the memory section has ${info.memory.size}`,
      );
    }
    const kvm = await Kvm.open();
    const started = performance.now();
    const vm = kvm.createVmFromSnapshot(dir, {
      mode,
      unhandledIo: checked.unhandledIo,
      irqchip: checked.interrupts,
      dedup: checked.dedup,
    });
    Vm.#build(vm, config, checked);
    try {
      vm.restoreSnapshot(dir);
      // Host streams did not survive: the guest drops its connections and
      // reads its CID again (a clone's own, with `identity.cid`).
      for (const name of devicesOfKind(vm.devices<DeviceListing>(), "vsock")) {
        vm.deviceControl(name, JSON.stringify({ op: "transport_reset" }));
      }
    } catch (e) {
      vm.close();
      throw e;
    }
    return new Vm(vm, checked.memoryBytes, config, performance.now() - started, loaded);
  }

  /**
   * The `config` section of this VM as JSON text, the way {@link Vm.snapshot}
   * stores it: what a live migration's `hello` carries for the target to
   * rebuild the VM with {@link Vm.incoming}.
   *
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create({ memoryMiB: 4 });
   * console.log(JSON.parse(vm.migrationConfig()).config.memoryMiB); // 4
   * ```
   *
   * @returns JSON text.
   */
  migrationConfig(): string {
    return JSON.stringify(snapshotConfig(this.#vmConfig, this.#loaded));
  }

  /**
   * Builds the target VM of a live migration from the source's `config`
   * section ({@link Vm.migrationConfig}): the same configuration, anonymous
   * RAM, every device and vCPU, nothing run. Its RAM then takes the
   * migrated pages (`vm.kvm.unpackPages`) and {@link Vm.applyMigrationState}
   * the state; {@link Vm.run} continues the guest.
   *
   * @example
   * ```ts ignore
   * import { Vm } from "denovisor";
   * using target = await Vm.incoming(JSON.parse(source.migrationConfig()));
   * ```
   *
   * @param section The parsed `config` section.
   * @param options `console`: where the guest's console goes here (default:
   *   the source's setting).
   * @returns The VM.
   * @throws {DenovisorError} `SNAPSHOT_INVALID` for a section of another kind
   *   or version, `INVALID_ARGUMENT` for a bad configuration.
   */
  static async incoming(
    section: unknown,
    options: { console?: "capture" | "stdout" } = {},
  ): Promise<Vm> {
    const parsed = parseSnapshotConfig(section);
    const config: VmConfig = options.console === undefined
      ? parsed.config
      : { ...parsed.config, console: options.console };
    const checked = Vm.#check(config);
    const kvm = await Kvm.open();
    const started = performance.now();
    const vm = kvm.createVm({
      memoryBytes: checked.memoryBytes,
      unhandledIo: checked.unhandledIo,
      irqchip: checked.interrupts,
      dedup: checked.dedup,
    });
    // The source holds the disks until it hands them over at stop-and-copy:
    // they open here without their locks, taken in applyMigrationState.
    vm.handOverDevices();
    Vm.#build(vm, config, checked);
    return new Vm(vm, checked.memoryBytes, config, performance.now() - started, parsed.loaded);
  }

  /**
   * Applies a migration's state (from the source's `kvm.migrationState`) to
   * a VM built by {@link Vm.incoming} whose RAM holds the guest's pages: the
   * state is verified whole, and this host against it, before anything is
   * applied. The devices first claim what the source handed over (its disk
   * images' locks): refused while the source still holds one.
   *
   * @example
   * ```ts ignore
   * target.applyMigrationState(stateBytes);
   * await target.run();
   * ```
   *
   * @param state The state bytes.
   * @throws {DenovisorError} `SNAPSHOT_INVALID` naming a bad section,
   *   `SNAPSHOT_WRONG_HOST` for another CPU.
   */
  applyMigrationState(state: Uint8Array): void {
    this.#vm.takeOverDevices();
    this.#vm.applyMigrationState(state);
  }

  /** The low-level VM, for register-level work. */
  get kvm(): KvmVm {
    return this.#vm;
  }

  /** The vCPUs, by index. */
  get vcpus(): readonly KvmVcpu[] {
    return this.#vm.vcpus;
  }

  /** Guest RAM in bytes. */
  get memoryBytes(): number {
    return this.#memoryBytes;
  }

  /**
   * Attaches a virtio device on PCI bus 0; the guest finds it when it scans
   * the bus (so add devices before booting the guest that should see them).
   *
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create({ interrupts: true });
   * console.log(vm.addDevice({ kind: "rng" })); // "rng0"
   * ```
   *
   * @param device The device.
   * @returns Its name.
   * @throws {DenovisorError} `INVALID_ARGUMENT` for a bad configuration,
   *   `DEVICE` when its host side (a file, a socket) is unusable or it cannot
   *   be attached.
   */
  addDevice(device: DeviceConfig): string {
    const name = this.#vm.addDevice(deviceConfigJson(device));
    this.#vmConfig.devices = [...(this.#vmConfig.devices ?? []), structuredClone(device)];
    return name;
  }

  /**
   * The VM's devices: the PCI functions (IDs, BARs, virtio status and queues,
   * each device's counters) and what each port and MMIO range handled.
   *
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create({ interrupts: true, devices: [{ kind: "rng" }] });
   * for (const f of vm.devices().pci) console.log(f.address, f.name);
   * ```
   *
   * @returns The listing.
   */
  devices(): DeviceListing {
    return this.#vm.devices<DeviceListing>();
  }

  /**
   * Every device's state as plain data: COM1 (registers, receive FIFO,
   * queued input), the i8042, PM1a control, the RTC, debug-exit, ACPI PM and
   * PCI bus 0 (the address register and each function: its configuration
   * space, MSI-X table, and for virtio its negotiation, queues and their
   * positions). The core restores such a document onto a VM built with the
   * same devices, checking every field; snapshots build on it.
   *
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create({ interrupts: true, devices: [{ kind: "rng" }] });
   * const state = vm.deviceState();
   * console.log(state.pci.functions.map((f) => f.name));
   * ```
   *
   * @returns The state.
   */
  deviceState(): DeviceState {
    return this.#vm.deviceState<DeviceState>();
  }

  /**
   * The KVM state of the paused VM as JSON text: every vCPU (registers,
   * special registers, XSAVE with MXCSR, XCRs, MSRs, local APIC, pending
   * events, debug registers, MP state, CPUID), the PICs, the IOAPIC, the PIT
   * and the KVM clock. Refused with `BUSY` unless the VM is paused
   * ({@link Vm.pause}). Guest memory and device state travel apart.
   *
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create({ memoryMiB: 4 });
   * vm.pause();
   * const state = JSON.parse(vm.snapshotState());
   * console.log(state.vcpus.length); // 1
   * ```
   *
   * @returns The state as JSON text.
   */
  snapshotState(): string {
    return this.#vm.snapshotState();
  }

  /**
   * Starts dirty-page tracking, for diff snapshots and pre-copy migration:
   * KVM logs the guest's writes to every RAM slot, and the VMM records its
   * own (virtio devices filling buffers and used rings, the balloon dropping
   * pages, hypercalls). Starting again starts a new, empty set.
   *
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create({ memoryMiB: 4 });
   * vm.startDirtyLog();
   * console.log(vm.takeDirtyPages().pages); // []
   * vm.stopDirtyLog();
   * ```
   */
  startDirtyLog(): void {
    this.#vm.startDirtyLog();
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
    this.#vm.stopDirtyLog();
  }

  /**
   * The guest pages written since tracking started or since the last take,
   * by the guest or by the VMM, and clears the set: a bitmap with one bit
   * per 4 KiB page in RAM order, and the dirty pages' indexes. Throws
   * `INVALID_ARGUMENT` while tracking is off.
   *
   * @example
   * ```ts ignore
   * vm.startDirtyLog();
   * // ... the guest runs ...
   * const { pages } = vm.takeDirtyPages();
   * ```
   *
   * @returns The bitmap and the page indexes.
   */
  takeDirtyPages(): DirtyPages {
    return this.#vm.takeDirtyPages();
  }

  /**
   * Sends a runtime request to a device (`{ op: ... }`, per device kind):
   * balloon `setTarget` and `stats`, blk `state`, vsock `transport_reset`
   * (closes every host stream and tells the guest on the event queue).
   *
   * @example
   * ```ts ignore
   * const stats = vm.deviceControl("balloon0", { op: "stats" });
   * vm.deviceControl("vsock0", { op: "transport_reset" }); // { closed, event }
   * ```
   *
   * @param name The device's name (see {@link Vm.devices}).
   * @param request The request.
   * @returns The device's answer.
   * @throws {DenovisorError} `INVALID_ARGUMENT` for an unknown device,
   *   `DEVICE` for a request the device does not take.
   */
  deviceControl(name: string, request: Record<string, unknown>): unknown {
    return this.#vm.deviceControl(name, JSON.stringify(request));
  }

  /**
   * The VM's virtio-balloon (the first, if several): set its target, read
   * the guest's memory statistics.
   *
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create({ memoryMiB: 64, interrupts: true, devices: [{ kind: "balloon" }] });
   * console.log(vm.balloon.stats().targetMib); // 0
   * ```
   *
   * @throws {DenovisorError} `INVALID_ARGUMENT` when the VM has no balloon device.
   */
  get balloon(): VmBalloon {
    if (!this.#balloon) {
      // virtio-pci modern device ID: 0x1040 + the virtio type (5, balloon).
      const f = this.devices().pci.find((f) => f.vendor === 0x1af4 && f.device === 0x1045);
      if (!f) {
        throw new DenovisorError(
          "INVALID_ARGUMENT",
          'this VM has no balloon device (add { kind: "balloon" } to its devices)',
        );
      }
      const name = f.name;
      this.#balloon = new VmBalloon(
        (request) => this.deviceControl(name, request),
        this.#memoryBytes / (1024 * 1024),
      );
    }
    return this.#balloon;
  }

  /** The image loaded last, if any. */
  get image(): LoadedImage | undefined {
    return this.#loaded;
  }

  /**
   * Loads an image and points every vCPU at its entry. ELF images load by their
   * program headers; flat images at `loadAddress`.
   *
   * @param image The image's bytes.
   * @param options Format, entry mode, addresses.
   * @returns Where and how it was loaded.
   * @throws {DenovisorError} `IMAGE` when the image is malformed or does not fit.
   */
  load(image: Uint8Array, options: LoadOptions = {}): LoadedImage {
    const mode = options.mode ?? "long";
    if (mode !== "real" && mode !== "long" && mode !== "user") {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `mode must be "real", "long" or "user", got ${JSON.stringify(mode)}`,
      );
    }
    const requested = options.format ?? "auto";
    if (!["auto", "elf", "flat"].includes(requested)) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `format must be "auto", "elf" or "flat", got ${JSON.stringify(requested)}`,
      );
    }
    if (!(image instanceof Uint8Array)) {
      throw new DenovisorError("INVALID_ARGUMENT", "image must be a Uint8Array");
    }
    for (const key of ["loadAddress", "entry", "stack"] as const) {
      const value = options[key];
      if (value !== undefined && (!Number.isSafeInteger(value) || value < 0)) {
        throw new DenovisorError(
          "INVALID_ARGUMENT",
          `${key} must be a non-negative integer, got ${value}`,
        );
      }
    }
    if (typeof options.arguments === "object") checkArguments(options.arguments);
    else if (options.arguments !== undefined && typeof options.arguments !== "function") {
      throw new DenovisorError("INVALID_ARGUMENT", "arguments must be an array or a function");
    }
    const format = requested === "auto" ? (isElf(image) ? "elf" : "flat") : requested;
    const reserveLow = mode !== "real";
    let entry: bigint;
    if (format === "elf") {
      entry = this.#vm.loadElf(image, { reserveLow });
    } else {
      const loadAddress = options.loadAddress ??
        (mode === "real" ? DEFAULT_REAL_LOAD_ADDRESS : DEFAULT_LONG_LOAD_ADDRESS);
      this.#vm.loadFlat(image, loadAddress, { reserveLow });
      entry = BigInt(loadAddress);
    }
    if (options.entry !== undefined) entry = BigInt(options.entry);
    const stack = BigInt(
      options.stack ??
        (mode === "real" ? Number(entry & 0xffffn) : Math.min(this.#memoryBytes, MMIO_GAP_START)),
    );
    const argumentsOf = typeof options.arguments === "function"
      ? options.arguments
      : () => (options.arguments ?? []) as readonly (number | bigint)[];
    // Every vCPU's arguments are checked before the first vCPU is touched.
    const perVcpu = this.#vm.vcpus.map((vcpu) => checkArguments(argumentsOf(vcpu.index)));
    for (const vcpu of this.#vm.vcpus) {
      const args = perVcpu[vcpu.index];
      // Every vCPU enters at the same entry point, each on its own stack.
      const ownStack = stack - BigInt(vcpu.index * VCPU_STACK_BYTES);
      vcpu.setupEntry(mode, entry, ownStack);
      if (args.length > 0) {
        const regs = vcpu.getRegisters();
        args.forEach((value, i) => regs[ARGUMENT_REGISTERS[i]] = BigInt(value));
        vcpu.setRegisters(regs);
      }
    }
    this.#loaded = { format, mode, entry, stack, size: image.length };
    return this.#loaded;
  }

  /**
   * Loads a Linux kernel the way Firecracker and Cloud Hypervisor do, without
   * firmware, by the 64-bit boot protocol: a bzImage's protected-mode kernel at
   * its `pref_address` (or a `vmlinux` ELF by its program headers), the initrd at
   * the top of RAM below its `initrd_addr_max`, the command line, and a zero page
   * with the copied setup header and an e820 map of guest RAM. vCPU 0 then starts
   * at the 64-bit entry (`startup_64`) with RSI = the zero page; other vCPUs stay
   * in their reset state for the kernel to start.
   *
   * Only the pages that receive data are written: the rest of guest RAM, the
   * kernel's decompression area included, stays untouched.
   *
   * @param options The kernel, initrd and command line.
   * @returns Where everything went.
   * @throws {DenovisorError} `IMAGE` when the kernel is malformed, `INITRD` when
   *   the initrd is truncated or not an initramfs the kernel accepts,
   *   `DOES_NOT_FIT` when the kernel or initrd does not fit in guest RAM,
   *   `CMDLINE_TOO_LONG` when the command line is longer than the kernel's
   *   `cmdline_size`; `INVALID_ARGUMENT` for arguments of the wrong type.
   *   `checkLinuxLoad` makes the same checks without a VM.
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create({ memoryMiB: 256 });
   * const layout = vm.loadLinux({
   *   kernel: await Deno.readFile("bzImage"),
   *   initrd: await Deno.readFile("initrd.img"),
   *   cmdline: "console=ttyS0",
   * });
   * console.log(layout.entry.toString(16), layout.initrd);
   * const result = await vm.run({ timeoutMs: 10_000 });
   * ```
   */
  loadLinux(options: LinuxLoadOptions): LinuxLayout {
    const { kernel, initrd, cmdline } = linuxInputs(options);
    const layout = this.#vm.loadLinux(kernel, initrd, cmdline);
    this.#vm.vcpus[0].setupLinuxEntry(layout.entry, layout.zeroPage);
    this.#loaded = {
      format: "linux",
      mode: "long",
      entry: BigInt(layout.entry),
      stack: BigInt(layout.stack),
      size: kernel.length,
    };
    return layout;
  }

  /**
   * Runs the VM until the guest exits, crashes, halts or the timeout passes.
   * The JS event loop keeps running; {@link Vm.stop} ends the run early.
   *
   * @param options `timeoutMs` overrides the VM's default.
   * @returns Exit code, reason, console output, exit count and timings.
   */
  async run(options: { timeoutMs?: number } = {}): Promise<RunResult> {
    if (!this.#loaded) {
      throw new DenovisorError("INVALID_ARGUMENT", "no image is loaded: call load() first");
    }
    const before = this.#vm.metrics().reduce((sum, m) => sum + m.exits, 0);
    this.#consoleRead = "";
    const consoleBefore = this.#vm.consoleStats();
    const started = performance.now();
    this.#running = true;
    let outcome;
    try {
      outcome = await this.#vm.run({ timeoutMs: options.timeoutMs ?? this.#config.timeoutMs });
    } finally {
      this.#running = false;
      this.#ran = true;
    }
    const { exit, runNs } = outcome;
    const runMs = performance.now() - started;
    const after = this.#vm.metrics().reduce((sum, m) => sum + m.exits, 0);
    const consoleAfter = this.#vm.consoleStats();
    const report = this.#vm.report();
    const consoleText = this.#takeConsoleText();
    const panic = KERNEL_PANIC.exec(consoleText)?.[1];
    const crashed = panic !== undefined || exit.reason === "shutdown";
    const summary = panic !== undefined
      ? `guest kernel panic: ${panic} (then ${describeExit(exit)})`
      : describeExit(exit);
    return {
      exitCode: exit.reason === "debug_exit"
        ? exit.exitCode
        : exit.reason === "guest_exit"
        ? exit.status
        : null,
      report,
      reportText: report === undefined ? undefined : decoder.decode(report),
      reason: exit.reason,
      exit,
      summary: crashed && consoleText
        ? `${summary}; last console lines:\n${lastLines(consoleText, 10)}`
        : summary,
      console: consoleText,
      ...(panic === undefined ? {} : { panic }),
      consoleDropped: consoleAfter.captureDropped - consoleBefore.captureDropped,
      consoleStreamDropped: consoleAfter.streamDropped - consoleBefore.streamDropped,
      exits: after - before,
      timings: { createMs: this.#createMs, runMs, guestNs: runNs },
    };
  }

  /**
   * Takes the checkpoint of a function VM stopped at its runtime's READY
   * (after {@link Vm.run} returned with the EXIT hypercall): every request
   * starts from it, and {@link Vm.invoke} resets the VM to it afterwards.
   * On a VM restored lazily from a snapshot (and not run since), guest RAM's
   * pristine image is the snapshot's memory file, shared by every VM
   * restored from it.
   *
   * @example
   * ```ts ignore
   * import { Vm } from "denovisor";
   * const vm = await Vm.restore("/tmp/fn-snap", { mode: "lazy" });
   * vm.checkpoint();
   * const result = await vm.invokeAsync(new TextEncoder().encode("hi"));
   * ```
   *
   * @returns Whether RAM's image is the snapshot's memory file.
   * @throws {DenovisorError} `INVALID_ARGUMENT` when the mailbox is not at a
   *   valid READY, `BUSY` while the VM runs, `CLOSED`.
   */
  checkpoint(): boolean {
    return this.#vm.checkpoint();
  }

  /**
   * Puts a checkpointed VM back at its checkpoint (the pages written since,
   * every vCPU's state). {@link Vm.invoke} does this after every request.
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
    return this.#vm.reset();
  }

  /**
   * Gives an idle function VM's private pages back to the host: its guest
   * RAM then costs only the pages the next request touches.
   *
   * @example
   * ```ts ignore
   * vm.trim();
   * console.log(vm.memory().residentBytes); // 0
   * ```
   *
   * @returns Guest RAM's resident bytes afterwards.
   * @throws {DenovisorError} `INVALID_ARGUMENT` without a checkpoint.
   */
  trim(): number {
    return this.#vm.trim();
  }

  /**
   * The buffers the function runtime set up at READY.
   *
   * @example
   * ```ts ignore
   * console.log(vm.functionReady()); // { inputCapacity: 4096, ... }
   * ```
   *
   * @returns The capacities.
   * @throws {DenovisorError} `INVALID_ARGUMENT` when the mailbox is not at READY.
   */
  functionReady(): FunctionReady {
    return this.#vm.functionReady();
  }

  /**
   * Runs one request on a checkpointed function VM, blocking this thread
   * (see {@link Vm.invokeAsync}). The time limit defaults to the VM's
   * `timeoutMs`.
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
    return this.#vm.invoke(input, this.#withTimeout(options));
  }

  /**
   * Runs one request on a checkpointed function VM in one core call, off
   * the JS thread: the input and the per-request mailbox fields go in, the
   * vCPU runs to the runtime's DONE (or the time limit: it is kicked out, or
   * a crash), the mailbox is checked, the output copied out, and the VM is
   * always reset to its checkpoint. The time limit defaults to the VM's
   * `timeoutMs`.
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
  invokeAsync(input: Uint8Array, options: InvokeOptions = {}): Promise<InvokeResult> {
    return this.#vm.invokeAsync(input, this.#withTimeout(options));
  }

  #withTimeout(options: InvokeOptions): InvokeOptions {
    return options.timeoutMs === undefined
      ? { ...options, timeoutMs: this.#config.timeoutMs }
      : options;
  }

  /**
   * Takes every vCPU out of the guest without ending the run, and quiesces
   * every virtio device (each finishes the requests it took and takes no
   * other; host packets wait in their TAP or socket): once this returns,
   * every vCPU's registers can be read and written
   * (`vm.vcpus[i].getRegisters()`) and neither guest memory nor a queue
   * moves. A device that does not stop within 5 s makes it throw `TIMEOUT`
   * (the VM then runs on). {@link Vm.resume} continues.
   */
  pause(): void {
    this.#vm.pause();
    this.#paused = true;
  }

  /** Lets a paused guest continue. */
  resume(): void {
    this.#vm.resume();
    this.#paused = false;
  }

  /**
   * Where the VM is in its life, as its own methods moved it ({@link Vm.run},
   * {@link Vm.pause}, {@link Vm.resume}).
   *
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create();
   * console.log(vm.state); // "created"
   * vm.pause();
   * console.log(vm.state); // "paused"
   * ```
   */
  get state(): VmState {
    if (this.#running) return this.#paused ? "paused" : "running";
    if (this.#ran) return "stopped";
    return this.#paused ? "paused" : "created";
  }

  /**
   * The configuration the VM was created with, normalized (defaults filled in).
   *
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create({ memoryMiB: 32 });
   * console.log(vm.settings.memoryMiB, vm.settings.vcpus); // 32 1
   * ```
   */
  get settings(): VmSettings {
    const checked = Vm.#check(this.#vmConfig);
    return {
      memoryMiB: checked.memoryBytes / (1024 * 1024),
      vcpus: checked.vcpus,
      interrupts: checked.interrupts,
      dedup: checked.dedup,
      unhandledIo: checked.unhandledIo,
      console: checked.consoleMode,
      timeoutMs: this.#config.timeoutMs,
    };
  }

  /**
   * Raises one edge on an interrupt line (GSI 0-23), as an ISA device would.
   * The guest runtime (`dv_irq_init()`) routes line `n` to vector `0x20 + n`.
   * Works while the guest runs; needs `interrupts: true`.
   *
   * @param line The interrupt line.
   * @throws {DenovisorError} `INVALID_ARGUMENT` without an irqchip or for a bad line.
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create({ interrupts: true });
   * vm.injectIrq(5); // pending until the guest enables interrupts
   * ```
   */
  injectIrq(line: number): void {
    this.#vm.injectIrq(line);
  }

  /**
   * Sends a message-signalled interrupt straight to a local APIC. Needs
   * `interrupts: true`.
   *
   * @param address `0xfee00000 | apicId << 12` (see `msiAddress`).
   * @param data The vector in bits 0-7 (fixed delivery, edge-triggered).
   * @returns Whether a local APIC accepted it (false while the guest's local
   *   APIC is software-disabled).
   * @example
   * ```ts
   * import { msiAddress, Vm } from "denovisor";
   * using vm = await Vm.create({ interrupts: true });
   * console.log(vm.sendMsi(msiAddress(0), 0x41)); // false: the APIC is not enabled yet
   * ```
   */
  sendMsi(address: number | bigint, data: number): boolean {
    return this.#vm.sendMsi(address, data);
  }

  /**
   * The host's interrupt counters: edges injected, MSIs sent, COM1's IRQs.
   *
   * @returns The counters and whether the VM has an irqchip.
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create({ interrupts: true });
   * console.log(vm.irqStats()); // { irqchip: true, injected: 0, ... }
   * ```
   */
  irqStats(): IrqStats {
    return this.#vm.irqStats();
  }

  /**
   * The guest's own interrupt counters, by vector: what its handlers counted, as
   * published with the IRQ_COUNTERS hypercall (the guest runtime does this in
   * `dv_irq_init()`). Read from guest RAM while the guest runs, at no cost to it.
   *
   * @returns Counts by vector (empty when the guest published none).
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create({ interrupts: true });
   * console.log(vm.guestIrqCounters().length); // 0 until the guest publishes them
   * ```
   */
  guestIrqCounters(): BigUint64Array {
    return this.#vm.guestIrqCounters();
  }

  /**
   * Types into the guest's serial console: the bytes go to COM1's receive FIFO
   * (refilled as the guest reads it) and raise interrupt line 4 when the guest
   * enabled it. Works while the guest runs.
   *
   * @param input Bytes, or a string (sent as UTF-8).
   * @throws {DenovisorError} `BUSY` when over 1 MiB would be waiting unread.
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create();
   * vm.sendConsoleInput("hello\n");
   * ```
   */
  sendConsoleInput(input: Uint8Array | string): void {
    this.#vm.sendConsoleInput(input);
  }

  /**
   * The console output the guest wrote since the last call (or since the run
   * began), while the guest runs: what drives a guest over its serial console
   * (see `ConsoleDriver`). The run's result still holds the whole run's output
   * (its last MiB).
   *
   * @returns The new text (UTF-8 decoded; a character split across calls is
   *   returned whole by the next call).
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create();
   * console.log(JSON.stringify(vm.readConsole())); // "" before any run
   * ```
   */
  readConsole(): string {
    const text = this.#consoleDecoder.decode(this.#vm.takeConsoleOutput(), { stream: true });
    this.#consoleRead = (this.#consoleRead + text).slice(-CONSOLE_KEPT_CHARS);
    return text;
  }

  #takeConsoleText(): string {
    const rest = this.#consoleDecoder.decode(this.#vm.takeConsoleOutput());
    const text = (this.#consoleRead + rest).slice(-CONSOLE_KEPT_CHARS);
    this.#consoleRead = "";
    return text;
  }

  /** Asks the running guest to stop; a pending {@link Vm.run} resolves with `stopped`. */
  stop(): void {
    this.#vm.stop();
  }

  /**
   * Per-vCPU exit metrics, read in one call; `console` counts each vCPU's
   * console output and the bytes dropped as it wrote them.
   *
   * @returns One entry per vCPU.
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create();
   * console.log(vm.metrics()[0].console); // { bytes: 0, captureDropped: 0, streamDropped: 0 }
   * ```
   */
  metrics(): VcpuMetrics[] {
    return this.#vm.metrics();
  }

  /**
   * What KSM deduplication saves: whether this VM's RAM is mergeable
   * ({@link VmConfig.dedup}), the host's counters with the bytes saved
   * (`pagesSharing` × page size) and this process's (`mergingPages` × page
   * size, every VM of the process with dedup together). Null where the
   * host's kernel does not report a count.
   *
   * @returns The `ksm` section of {@link metricsReport}.
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create({ dedup: true });
   * const { dedup, host, process } = vm.ksm();
   * console.log(dedup, host.run, host.savedBytes, process.savedBytes); // true 1 ...
   * ```
   */
  ksm(): KsmMetrics {
    return ksmMetrics(this.#vm.ksm());
  }

  /**
   * How much of this VM's RAM the host backs now: its size and the bytes
   * resident in host memory (`mincore`). Untouched pages and pages the
   * balloon or free page reporting returned are not resident, so this is the
   * VMM's RSS for guest RAM, without the rest of the process.
   *
   * @returns Size and resident bytes.
   * @example
   * ```ts
   * import { Vm } from "denovisor";
   * using vm = await Vm.create({ memoryMiB: 16 });
   * const { sizeBytes, residentBytes } = vm.memory();
   * console.log(sizeBytes, residentBytes); // 16777216 0 (nothing touched yet)
   * ```
   */
  memory(): GuestMemoryUsage {
    return this.#vm.memory();
  }

  /**
   * Copies bytes out of guest RAM.
   *
   * @param address Guest-physical address.
   * @param length How many bytes.
   * @returns A copy.
   */
  readMemory(address: number | bigint, length: number): Uint8Array {
    return this.#vm.readMemory(address, length);
  }

  /**
   * Copies bytes into guest RAM.
   *
   * @param address Guest-physical address.
   * @param data The bytes.
   */
  writeMemory(address: number | bigint, data: Uint8Array): void {
    this.#vm.writeMemory(address, data);
  }

  /** Stops the guest and frees every thread, fd and mapping. Idempotent. */
  close(): void {
    this.#vm.close();
  }

  /** Same as {@link Vm.close}, for `using`. */
  [Symbol.dispose](): void {
    this.close();
  }
}
