/**
 * Helpers of `linux_boot_bench.ts` for booting the same Linux kernel and
 * initramfs to a console marker with denovisor and with QEMU: argument
 * parsing, the initramfs, a bounded marker scanner over
 * a byte stream, `/proc/PID/status` reading, statistics, and one timed boot of
 * a VMM subprocess or of denovisor in this process.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { DenovisorError } from "../src/errors.ts";
import { buildInitramfs } from "../src/linux/initramfs.ts";
import { Vm } from "../mod.ts";
import type { VcpuMetrics } from "../src/kvm/kvm.ts";
import type { BootSpec } from "./_qemu.ts";

/** The line `/init` prints on the serial console once user space runs. */
export const BOOT_MARKER = "DENOVISOR-BOOT-MARKER";
/** The command line every VMM boots the kernel with. */
export const BOOT_CMDLINE = "console=ttyS0 reboot=k panic=-1 rdinit=/init quiet";
/** Debian's 6.1 kernel refuses to load into less (see README, Linux guests). */
export const MIN_MEMORY_MIB = 80;

/** What the command line asks for. */
export interface BenchArgs {
  /** Boots per VMM (after one warm-up boot each that is not counted). */
  runs: number;
  /** Guest RAM in MiB, the same for every VMM. */
  memMiB: number;
  /** vCPUs, the same for every VMM. */
  cpus: number;
  /** Print every sample and the summary as JSON instead of tables. */
  json: boolean;
}

function positiveInt(name: string, text: string, min: number, max: number): number {
  const value = Number(text);
  if (!/^[0-9]+$/.test(text) || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `--${name} must be an integer from ${min} to ${max}, got ${JSON.stringify(text)}`,
    );
  }
  return value;
}

/**
 * Parses `[--runs N] [--mem MiB] [--cpus C] [--json]`.
 *
 * @param args The arguments after the script's name.
 * @returns The bench's settings (defaults: 5 runs, 256 MiB, 1 vCPU, tables).
 * @throws {DenovisorError} `INVALID_ARGUMENT` for an unknown flag, a stray
 *   argument or a value out of range.
 * @example
 * ```ts
 * import { parseBenchArgs } from "denovisor/bench/_boot_compare.ts";
 * console.log(parseBenchArgs(["--runs", "3"])); // { runs: 3, memMiB: 256, cpus: 1, json: false }
 * ```
 */
export function parseBenchArgs(args: string[]): BenchArgs {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: {
        runs: { type: "string", default: "5" },
        mem: { type: "string", default: "256" },
        cpus: { type: "string", default: "1" },
        json: { type: "boolean", default: false },
      },
      allowPositionals: false,
      strict: true,
    });
  } catch (e) {
    throw new DenovisorError("INVALID_ARGUMENT", e instanceof Error ? e.message : String(e));
  }
  const v = parsed.values;
  return {
    runs: positiveInt("runs", v.runs, 1, 1000),
    memMiB: positiveInt("mem", v.mem, MIN_MEMORY_MIB, 3 * 1024),
    cpus: positiveInt("cpus", v.cpus, 1, 64),
    json: v.json,
  };
}

/** Resident memory of a process, from `/proc/PID/status`. */
export interface ProcessMemory {
  /** `VmRSS`: resident now, KiB. */
  rssKiB: number;
  /** `VmHWM`: the peak resident size so far, KiB. */
  hwmKiB: number;
}

/**
 * Reads `VmRSS` and `VmHWM` out of the text of `/proc/PID/status`.
 *
 * @param text The file's contents.
 * @returns Both values in KiB, or `undefined` when either is missing (a zombie
 *   process has neither) or not in kB.
 * @example
 * ```ts
 * import { parseProcStatusMemory } from "denovisor/bench/_boot_compare.ts";
 * console.log(parseProcStatusMemory("VmHWM:\t 20 kB\nVmRSS:\t 10 kB\n")); // { rssKiB: 10, hwmKiB: 20 }
 * ```
 */
export function parseProcStatusMemory(text: string): ProcessMemory | undefined {
  const field = (name: string) => {
    const m = new RegExp(`^${name}:\\s*([0-9]+) kB$`, "m").exec(text);
    return m ? Number(m[1]) : undefined;
  };
  const rssKiB = field("VmRSS");
  const hwmKiB = field("VmHWM");
  return rssKiB === undefined || hwmKiB === undefined ? undefined : { rssKiB, hwmKiB };
}

/** Order statistics of a sample. */
export interface Summary {
  /** Sample count. */
  n: number;
  /** The median (the mean of the middle two for an even count). */
  median: number;
  /** The smallest value. */
  min: number;
  /** The nearest-rank 90th percentile. */
  p90: number;
  /** The largest value. */
  max: number;
}

/**
 * Median, min, p90 and max of `values` (in any order).
 *
 * @param values The samples.
 * @returns The statistics, or `undefined` for no samples.
 * @example
 * ```ts
 * import { summarize } from "denovisor/bench/_boot_compare.ts";
 * console.log(summarize([3, 1, 2])?.median); // 2
 * ```
 */
export function summarize(values: readonly number[]): Summary | undefined {
  if (values.length === 0) return undefined;
  const s = [...values].sort((a, b) => a - b);
  const n = s.length;
  const median = n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
  const p90 = s[Math.min(n - 1, Math.ceil(0.9 * n) - 1)];
  return { n, median, min: s[0], p90, max: s[n - 1] };
}

/**
 * Watches a byte stream for a marker, holding only the last `marker.length - 1`
 * bytes between chunks (plus a short tail kept for error messages), so a guest
 * that prints without end costs no memory.
 *
 * @example
 * ```ts
 * import { MarkerScanner } from "denovisor/bench/_boot_compare.ts";
 * const scanner = new MarkerScanner("READY");
 * scanner.push(new TextEncoder().encode("...REA"));
 * console.log(scanner.push(new TextEncoder().encode("DY\n"))); // true
 * ```
 */
export class MarkerScanner {
  #marker: Uint8Array;
  #carry = new Uint8Array();
  #tail = new Uint8Array();
  /** Whether the marker has been seen. */
  found = false;
  /** Bytes pushed so far. */
  bytes = 0;

  /**
   * Creates a scanner.
   *
   * @param marker The text to find (UTF-8).
   */
  constructor(marker: string) {
    this.#marker = new TextEncoder().encode(marker);
  }

  /** The last bytes seen (at most 2 KiB), for error messages. */
  get tail(): Uint8Array {
    return this.#tail;
  }

  /**
   * Scans one more chunk.
   *
   * @param chunk The next bytes of the stream.
   * @returns `true` when the marker has been seen (in this or an earlier chunk).
   */
  push(chunk: Uint8Array): boolean {
    this.bytes += chunk.length;
    const window = new Uint8Array(this.#carry.length + chunk.length);
    window.set(this.#carry);
    window.set(chunk, this.#carry.length);
    if (!this.found && indexOf(window, this.#marker) >= 0) this.found = true;
    this.#carry = window.slice(Math.max(0, window.length - (this.#marker.length - 1)));
    const keep = 2048;
    const tail = new Uint8Array(Math.min(keep, this.#tail.length + chunk.length));
    const fromChunk = Math.min(chunk.length, tail.length);
    tail.set(this.#tail.subarray(this.#tail.length - (tail.length - fromChunk)));
    tail.set(chunk.subarray(chunk.length - fromChunk), tail.length - fromChunk);
    this.#tail = tail;
    return this.found;
  }
}

function indexOf(haystack: Uint8Array, needle: Uint8Array): number {
  outer: for (let i = 0; i + needle.length <= haystack.length; i++) {
    for (let j = 0; j < needle.length; j++) if (haystack[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

/**
 * The `/init` script: prints `marker` on the console and reboots at once. The
 * marker is split in two shell words, so it appears on the console only when
 * the shell runs (never from the kernel echoing the script or its name).
 *
 * @param marker Letters, digits, `-` and `_` only.
 * @returns The script's text.
 * @example
 * ```ts
 * import { bootInit } from "denovisor/bench/_boot_compare.ts";
 * console.log(bootInit("HELLO-MARKER"));
 * ```
 */
export function bootInit(marker: string): string {
  if (!/^[A-Za-z0-9_-]{2,}$/.test(marker)) {
    throw new DenovisorError("INVALID_ARGUMENT", `marker must be [A-Za-z0-9_-]{2,}: ${marker}`);
  }
  const half = marker.length >> 1;
  return [
    "#!/bin/busybox sh",
    `/bin/busybox echo ${marker.slice(0, half)}''${marker.slice(half)}`,
    "/bin/busybox reboot -f",
  ].join("\n") + "\n";
}

/**
 * The busybox initramfs every VMM boots: `/dev/console`, busybox and `/init`
 * from {@link bootInit}.
 *
 * @param busybox A static busybox executable.
 * @param marker What `/init` prints.
 * @returns A `newc` cpio archive.
 * @example
 * ```ts
 * import { bootInitramfs, BOOT_MARKER } from "denovisor/bench/_boot_compare.ts";
 * const cpio = bootInitramfs(await Deno.readFile(".cache/kernels/busybox-static"), BOOT_MARKER);
 * console.log(cpio.length);
 * ```
 */
export function bootInitramfs(busybox: Uint8Array, marker: string = BOOT_MARKER): Uint8Array {
  return buildInitramfs([
    { path: "dev", kind: "dir" },
    { path: "dev/console", kind: "char", device: [5, 1] },
    { path: "bin", kind: "dir" },
    { path: "bin/busybox", data: busybox },
    { path: "init", data: new TextEncoder().encode(bootInit(marker)) },
  ]);
}

/** One timed boot of a VMM subprocess. */
export interface ProcessBoot {
  /** Milliseconds from spawn to the marker on the child's stdout. */
  markerMs: number;
  /** Milliseconds from spawn to the first stderr line matching `loadedLine`
   * (denovisor: the kernel is loaded and vCPU 0 is about to enter it). */
  loadedMs?: number;
  /** Milliseconds from spawn to the child's exit (it reboots = exits), when it
   * exited by itself within the grace period. */
  exitMs?: number;
  /** The child's memory when the marker appeared. */
  memory?: ProcessMemory;
}

/** How {@link bootProcess} runs one VMM. */
export interface ProcessBootOptions {
  /** The marker to wait for on stdout. */
  marker: string;
  /** A stderr line marking the end of loading (timed as `loadedMs`). */
  loadedLine?: RegExp;
  /** Give up (and kill the child) after this many milliseconds. */
  timeoutMs: number;
  /** How long to wait for the child to exit by itself after the marker. */
  exitGraceMs: number;
  /** Extra environment variables. */
  env?: Record<string, string>;
}

async function drain(
  stream: ReadableStream<Uint8Array>,
  onChunk: (chunk: Uint8Array) => void,
): Promise<void> {
  for await (const chunk of stream) onChunk(chunk);
}

/**
 * Spawns `command args`, times the marker on its stdout, reads its
 * `/proc/PID/status` right then, and waits a little for it to exit before
 * killing it. Its stdout and stderr are read as they come and kept only as a
 * bounded tail.
 *
 * @param command The executable.
 * @param args Its arguments.
 * @param options Marker, timeouts and environment.
 * @returns The timings and memory of the boot.
 * @throws {DenovisorError} `TIMEOUT` when the marker does not come in time,
 *   `GUEST_CRASHED` when the child ends without printing it.
 * @example
 * ```ts
 * import { bootProcess } from "denovisor/bench/_boot_compare.ts";
 * const boot = await bootProcess("sh", ["-c", "echo READY"], {
 *   marker: "READY",
 *   timeoutMs: 5000,
 *   exitGraceMs: 1000,
 * });
 * console.log(boot.markerMs);
 * ```
 */
export async function bootProcess(
  command: string,
  args: string[],
  options: ProcessBootOptions,
): Promise<ProcessBoot> {
  const out = new MarkerScanner(options.marker);
  const decoder = new TextDecoder();
  let errTail = "";
  let markerAt: number | undefined;
  let loadedAt: number | undefined;
  let exitAt: number | undefined;
  let killed = false;
  let memory: ProcessMemory | undefined;
  let onMarker = () => {};
  const marker = new Promise<"marker">((resolve) => onMarker = () => resolve("marker"));
  const t0 = performance.now();
  const child = new Deno.Command(command, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: options.env,
  }).spawn();
  const status = `/proc/${child.pid}/status`;
  const stdoutDone = drain(child.stdout, (chunk) => {
    if (out.push(chunk) && markerAt === undefined) {
      markerAt = performance.now();
      // Synchronously: the child's memory at the moment the marker is read.
      try {
        memory = parseProcStatusMemory(Deno.readTextFileSync(status));
      } catch {
        memory = undefined; // it exited already
      }
      onMarker();
    }
  });
  const stderrDone = drain(child.stderr, (chunk) => {
    errTail = (errTail + decoder.decode(chunk, { stream: true })).slice(-4096);
    if (loadedAt === undefined && options.loadedLine?.test(errTail)) loadedAt = performance.now();
  });
  const exited = child.status.then((s) => {
    exitAt = performance.now();
    return s;
  });
  let timer: ReturnType<typeof setTimeout> | undefined;
  const after = <T>(ms: number, value: T) =>
    new Promise<T>((resolve) => timer = setTimeout(() => resolve(value), ms));
  try {
    const first = await Promise.race([marker, exited, after(options.timeoutMs, "timeout")]);
    clearTimeout(timer);
    if (first !== "marker") {
      await Promise.race([Promise.all([stdoutDone, stderrDone]), after(1000, "")]);
      const what = first === "timeout"
        ? `printed no ${options.marker} in ${options.timeoutMs} ms`
        : `exited (${JSON.stringify(first)}) before printing ${options.marker}`;
      throw new DenovisorError(
        first === "timeout" ? "TIMEOUT" : "GUEST_CRASHED",
        `${command} ${what}; its stdout ends with:\n${decoder.decode(out.tail)}\n` +
          `and its stderr with:\n${errTail}`,
      );
    }
    await Promise.race([exited, after(options.exitGraceMs, "grace")]);
  } finally {
    clearTimeout(timer);
    if (exitAt === undefined) {
      killed = true;
      try {
        child.kill("SIGKILL");
      } catch {
        // It exited meanwhile.
      }
    }
    await exited;
    await Promise.all([stdoutDone, stderrDone]);
  }
  return {
    markerMs: markerAt! - t0,
    loadedMs: loadedAt === undefined ? undefined : loadedAt - t0,
    exitMs: killed || exitAt === undefined ? undefined : exitAt - t0,
    memory,
  };
}

/** One timed boot of denovisor inside this process, by the `Vm` API. */
export interface InProcessBoot {
  /** `Vm.create` in milliseconds. */
  createMs: number;
  /** `loadLinux` in milliseconds. */
  loadMs: number;
  /** From the start of `Vm.create` to the marker read from the console buffer. */
  markerMs: number;
  /** From the start of `Vm.create` to the end of the run (the guest's reboot). */
  endMs: number;
  /** How the run ended (`reset` for the i8042 reboot). */
  reason: string;
  /** Every vCPU's exit metrics when the marker was seen. */
  metrics: VcpuMetrics[];
}

/**
 * Boots `spec` in this process: `Vm.create` → `loadLinux` → `run`, reading the
 * console buffer every `pollMs` while the vCPUs run (the core buffers the
 * console; the JS event loop stays free during `run`). The marker's time is
 * therefore late by at most one poll interval.
 *
 * @param kernel The bzImage's bytes.
 * @param initrd The initramfs's bytes.
 * @param spec Command line, RAM and vCPUs (`kernel`/`initrd` paths unused).
 * @param options The marker, the poll interval and a timeout.
 * @returns The phases, the reason the run ended and the exit metrics.
 * @example
 * ```ts
 * import { bootInProcess, BOOT_MARKER } from "denovisor/bench/_boot_compare.ts";
 * const kernel = await Deno.readFile(".cache/kernels/vmlinuz-6.1.0-50-amd64");
 * const initrd = await Deno.readFile("/tmp/initrd.cpio");
 * const spec = { kernel: "", initrd: "", cmdline: "console=ttyS0", memMiB: 256, cpus: 1 };
 * console.log(await bootInProcess(kernel, initrd, spec, { marker: BOOT_MARKER, pollMs: 2, timeoutMs: 60_000 }));
 * ```
 */
export async function bootInProcess(
  kernel: Uint8Array,
  initrd: Uint8Array,
  spec: BootSpec,
  options: { marker: string; pollMs: number; timeoutMs: number },
): Promise<InProcessBoot> {
  const t0 = performance.now();
  using vm = await Vm.create({ memoryMiB: spec.memMiB, vcpus: spec.cpus, interrupts: true });
  const t1 = performance.now();
  vm.loadLinux({ kernel, initrd, cmdline: spec.cmdline });
  const t2 = performance.now();
  const scanner = new MarkerScanner(options.marker);
  let markerAt: number | undefined;
  let metrics: VcpuMetrics[] = [];
  const poll = () => {
    if (markerAt === undefined && scanner.push(vm.kvm.takeConsoleOutput())) {
      markerAt = performance.now();
      metrics = vm.metrics();
    }
  };
  const timer = setInterval(poll, options.pollMs);
  let result;
  try {
    result = await vm.run({ timeoutMs: options.timeoutMs });
  } finally {
    clearInterval(timer);
  }
  const t3 = performance.now();
  poll();
  if (markerAt === undefined) {
    throw new DenovisorError(
      "GUEST_CRASHED",
      `denovisor's guest ended (${result.summary}) without printing ${options.marker}; ` +
        `its console ends with:\n${new TextDecoder().decode(scanner.tail)}`,
    );
  }
  return {
    createMs: t1 - t0,
    loadMs: t2 - t1,
    markerMs: markerAt - t0,
    endMs: t3 - t0,
    reason: String(result.reason),
    metrics,
  };
}
