/**
 * The overhead model: every workload runs natively and inside a denovisor VM,
 * and the two are compared the way the textbooks define it —
 * performance = workload / time, overhead = T_virt − T_native.
 *
 * Both sides time the same region of the same C source (`guest/workloads/`):
 * the native program with `clock_gettime(CLOCK_MONOTONIC)`, the guest with the
 * CLOCK hypercall, which reads the host's same clock. Each run reports its
 * checksum; a native and a virtual run that disagree are an error, not a data
 * point.
 *
 * @module
 */

import {
  buildWorkloadGuest,
  buildWorkloadNative,
  WORKLOAD_INFO,
  workloadMemoryMiB,
  type WorkloadName,
  WORKLOADS,
} from "./build/workload_build.ts";
import { DenovisorError } from "./errors.ts";
import { sumMetrics } from "./metrics.ts";
import { Vm } from "./vm.ts";

export { WORKLOAD_INFO, type WorkloadName, WORKLOADS };

/** The JSON line every workload reports (natively on stdout, in the guest by REPORT). */
export interface WorkloadReport {
  /** The workload's name. */
  workload: string;
  /** Its size argument. */
  arg: number;
  /** A checksum of its results (16 hex digits), equal natively and virtualized. */
  checksum: string;
  /** Nanoseconds of the measured region. */
  ns: number;
  /** Units of work done (hashes, pages, writes, syscalls). */
  ops: number;
}

/** One virtualized run: the workload's report plus what the VMM saw. */
export interface VirtualRun extends WorkloadReport {
  /** VM exits during the whole run (boot and report included). */
  exits: number;
  /** Nanoseconds spent inside KVM_RUN. */
  kvmRunNs: number;
  /** Nanoseconds the VMM spent handling exits. */
  vmmNs: number;
}

/** The comparison for one workload. */
export interface WorkloadOverhead {
  /** The workload. */
  workload: WorkloadName;
  /** The size argument used. */
  size: number;
  /** Every native run. */
  native: WorkloadReport[];
  /** Every virtualized run. */
  virtual: VirtualRun[];
  /** Median native time, ns. */
  nativeNs: number;
  /** Median virtualized time, ns. */
  virtualNs: number;
  /** T_virt − T_native, ns (medians). */
  overheadNs: number;
  /** Overhead as a percentage of T_native. */
  overheadPercent: number;
  /** Exits of the median virtualized run. */
  exits: number;
  /** Exits per second of guest time in that run. */
  exitsPerSecond: number;
  /** Mean wall time per exit in that run: (time in KVM_RUN + time in the VMM) / exits.
   * For an exit-bound workload (io) this is the exit round trip. */
  nsPerExit: number;
  /** Mean time the VMM spent handling one exit (excluding KVM itself). */
  vmmNsPerExit: number;
}

/** Options of {@link measureOverhead}. */
export interface OverheadOptions {
  /** Which workloads (default: all). */
  workloads?: readonly WorkloadName[];
  /** Size argument for every selected workload (default: each one's own). */
  size?: number;
  /** Runs per side (default 3); the median is reported. */
  runs?: number;
  /** Called with a line of progress before each run. */
  onProgress?: (line: string) => void;
}

function parseReport(text: string, where: string): WorkloadReport {
  const line = text.trim().split("\n").filter((l) => l.startsWith("{")).at(-1);
  try {
    const report = JSON.parse(line ?? "") as WorkloadReport;
    if (typeof report.checksum !== "string" || typeof report.ns !== "number") throw new Error();
    return report;
  } catch {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `${where} did not report a workload result line, got: ${text.slice(0, 200)}`,
    );
  }
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/**
 * Runs a workload natively once.
 *
 * @param workload Which workload.
 * @param size Its size argument.
 * @returns Its report.
 * @example
 * ```ts
 * import { runNative } from "denovisor/src/overhead.ts";
 * console.log(await runNative("cpu", 1));
 * ```
 */
export async function runNative(workload: WorkloadName, size: number): Promise<WorkloadReport> {
  const path = await buildWorkloadNative(workload);
  const output = await new Deno.Command(path, {
    args: [String(size)],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stdout = new TextDecoder().decode(output.stdout);
  if (!output.success) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `native ${workload} exited with ${output.code}: ${new TextDecoder().decode(output.stderr)}`,
    );
  }
  return parseReport(stdout, `native ${workload}`);
}

/**
 * Runs a workload once in a fresh denovisor VM.
 *
 * @param workload Which workload.
 * @param size Its size argument.
 * @returns Its report and the run's exit metrics.
 * @example
 * ```ts
 * import { runVirtual } from "denovisor/src/overhead.ts";
 * const run = await runVirtual("io", 1);
 * console.log(run.ns, run.exits);
 * ```
 */
export async function runVirtual(workload: WorkloadName, size: number): Promise<VirtualRun> {
  const image = await buildWorkloadGuest(workload);
  const memoryMiB = workloadMemoryMiB(workload, size);
  using vm = await Vm.create({ memoryMiB, unhandledIo: "stop" });
  vm.load(image, { mode: "long", arguments: [size, memoryMiB * 1024 * 1024] });
  const result = await vm.run({ timeoutMs: 600_000 });
  if (result.reason !== "guest_exit" || result.exitCode !== 0) {
    throw new DenovisorError(
      "GUEST_CRASHED",
      `the ${workload} guest did not finish cleanly: ${result.summary}\n${result.console}`,
    );
  }
  const report = parseReport(result.reportText ?? "", `the ${workload} guest`);
  const total = sumMetrics(vm.metrics());
  return { ...report, exits: total.exits, kvmRunNs: total.kvmRunNs, vmmNs: total.vmmNs };
}

/**
 * Measures every selected workload natively and virtualized, `runs` times
 * each, and compares the medians.
 *
 * @param options Workloads, size, runs, progress.
 * @returns One comparison per workload.
 * @throws {DenovisorError} `GUEST_CRASHED` when a guest fails, or
 *   `INVALID_ARGUMENT` when native and virtual checksums differ.
 * @example
 * ```ts
 * import { measureOverhead } from "denovisor/src/overhead.ts";
 * const [cpu] = await measureOverhead({ workloads: ["cpu"], runs: 1 });
 * console.log(`${cpu.overheadPercent.toFixed(1)} %`);
 * ```
 */
export async function measureOverhead(options: OverheadOptions = {}): Promise<WorkloadOverhead[]> {
  const workloads = options.workloads ?? WORKLOADS;
  const runs = options.runs ?? 3;
  if (!Number.isInteger(runs) || runs < 1) {
    throw new DenovisorError("INVALID_ARGUMENT", `runs must be a positive integer, got ${runs}`);
  }
  if (options.size !== undefined && (!Number.isInteger(options.size) || options.size < 1)) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `size must be a positive integer, got ${options.size}`,
    );
  }
  const results: WorkloadOverhead[] = [];
  for (const workload of workloads) {
    if (!WORKLOADS.includes(workload)) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `unknown workload "${workload}" (one of ${WORKLOADS.join(", ")})`,
      );
    }
    const size = options.size ?? WORKLOAD_INFO[workload].defaultArg;
    const native: WorkloadReport[] = [];
    const virtual: VirtualRun[] = [];
    // Interleave the two sides so that a noisy stretch of the machine hits both.
    for (let i = 0; i < runs; i++) {
      options.onProgress?.(`${workload} (size ${size}): native run ${i + 1}/${runs}`);
      native.push(await runNative(workload, size));
      options.onProgress?.(`${workload} (size ${size}): virtual run ${i + 1}/${runs}`);
      virtual.push(await runVirtual(workload, size));
    }
    const checksums = new Set([...native, ...virtual].map((r) => r.checksum));
    if (checksums.size !== 1) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `${workload}: native and virtual runs disagree on the checksum: ${
          [...checksums].join(", ")
        }`,
      );
    }
    const nativeNs = median(native.map((r) => r.ns));
    const virtualNs = median(virtual.map((r) => r.ns));
    const typical = [...virtual].sort((a, b) => a.ns - b.ns)[Math.floor(virtual.length / 2)];
    const exits = Math.max(typical.exits, 1);
    results.push({
      workload,
      size,
      native,
      virtual,
      nativeNs,
      virtualNs,
      overheadNs: virtualNs - nativeNs,
      overheadPercent: ((virtualNs - nativeNs) / nativeNs) * 100,
      exits: typical.exits,
      exitsPerSecond: typical.exits / (typical.ns / 1e9),
      nsPerExit: (typical.kvmRunNs + typical.vmmNs) / exits,
      vmmNsPerExit: typical.vmmNs / exits,
    });
  }
  return results;
}

/**
 * Formats comparisons as a text table.
 *
 * @param results What {@link measureOverhead} returned.
 * @returns The table, one line per workload, with a header.
 * @example
 * ```ts
 * import { formatOverheadTable, measureOverhead } from "denovisor/src/overhead.ts";
 * console.log(formatOverheadTable(await measureOverhead({ runs: 1 })));
 * ```
 */
export function formatOverheadTable(results: readonly WorkloadOverhead[]): string {
  const ms = (ns: number) => `${(ns / 1e6).toFixed(2)} ms`;
  const us = (ns: number) => `${(ns / 1e3).toFixed(2)} µs`;
  const header = [
    "workload",
    "T_native",
    "T_virt",
    "overhead",
    "overhead %",
    "exits",
    "exits/s",
    "time/exit",
    "VMM/exit",
  ];
  const rows = results.map((r) => [
    r.workload,
    ms(r.nativeNs),
    ms(r.virtualNs),
    ms(r.overheadNs),
    `${r.overheadPercent.toFixed(1)} %`,
    `${r.exits}`,
    `${Math.round(r.exitsPerSecond)}`,
    us(r.nsPerExit),
    us(r.vmmNsPerExit),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
  return [line(header), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)].join("\n");
}
