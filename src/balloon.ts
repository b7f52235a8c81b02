/**
 * The balloon as TypeScript sees it: the JSON the core's virtio-balloon
 * answers with, checked into {@link BalloonStats}, and {@link VmBalloon}, the
 * `vm.balloon` object that sets the target and reads the statistics.
 *
 * @module
 */

import { DenovisorError } from "./errors.ts";

/** What the guest's driver reports on the statistics queue (bytes, or counts). */
export interface GuestMemoryStats {
  /** Memory the guest does not use at all (`MemFree`), bytes. */
  freeMemory?: number;
  /** Memory the guest could use without swapping (`MemAvailable`), bytes. */
  availableMemory?: number;
  /** All memory the guest sees (`MemTotal`; falls as the balloon grows), bytes. */
  totalMemory?: number;
  /** Page cache the guest could drop, bytes. */
  diskCaches?: number;
  /** Memory swapped in, bytes. */
  swapIn?: number;
  /** Memory swapped out, bytes. */
  swapOut?: number;
  /** Major page faults. */
  majorFaults?: number;
  /** Minor page faults. */
  minorFaults?: number;
  /** Successful hugetlb page allocations. */
  hugetlbAllocations?: number;
  /** Failed hugetlb page allocations. */
  hugetlbFailures?: number;
  /** Tags this list does not name, as `tagN`. */
  [tag: string]: number | undefined;
}

/** A balloon's state: its target, its size, the guest's last statistics. */
export interface BalloonStats {
  /** The host's target, in MiB (what {@link VmBalloon.setTarget} set). */
  targetMib: number;
  /** The target in 4 KiB pages. */
  targetPages: number;
  /** How much the balloon holds, in MiB, as the guest's driver last said. */
  actualMib: number;
  /** How much the balloon holds, in 4 KiB pages. */
  actualPages: number;
  /** The guest's last statistics (empty until its driver sent some). */
  stats: GuestMemoryStats;
  /** How many statistics updates the guest has sent. */
  statsUpdates: number;
  /** Pages the guest gave up (inflate), all returned to the host. */
  inflatedPages: number;
  /** Pages the guest took back (deflate). */
  deflatedPages: number;
  /** Free memory the guest reported on its own (free page reporting), returned to the host. */
  reportedBytes: number;
}

const NUMBER_FIELDS = [
  "targetMib",
  "targetPages",
  "actualMib",
  "actualPages",
  "statsUpdates",
  "inflatedPages",
  "deflatedPages",
  "reportedBytes",
] as const;

/**
 * Checks the core's balloon JSON and returns it typed.
 *
 * @param json The parsed answer of the device's `stats` or `setTarget` request.
 * @returns The statistics.
 * @throws {DenovisorError} `ABI_MISMATCH` when a field is missing or not a number.
 * @example
 * ```ts
 * import { parseBalloonStats } from "denovisor";
 * const s = parseBalloonStats({
 *   targetMib: 64, targetPages: 16384, actualMib: 0, actualPages: 0,
 *   stats: { freeMemory: 1 << 20 }, statsUpdates: 1,
 *   inflatedPages: 0, deflatedPages: 0, reportedBytes: 0,
 * });
 * console.log(s.stats.freeMemory); // 1048576
 * ```
 */
export function parseBalloonStats(json: unknown): BalloonStats {
  const bad = (what: string) =>
    new DenovisorError("ABI_MISMATCH", `balloon statistics from the core: ${what}`);
  if (!json || typeof json !== "object") throw bad("not an object");
  const o = json as Record<string, unknown>;
  for (const f of NUMBER_FIELDS) {
    if (typeof o[f] !== "number") throw bad(`${f} is not a number`);
  }
  const stats = o.stats;
  if (!stats || typeof stats !== "object") throw bad("stats is not an object");
  const out: GuestMemoryStats = {};
  for (const [k, v] of Object.entries(stats)) {
    if (typeof v !== "number") throw bad(`stats.${k} is not a number`);
    out[k] = v;
  }
  const n = (f: typeof NUMBER_FIELDS[number]) => o[f] as number;
  return {
    targetMib: n("targetMib"),
    targetPages: n("targetPages"),
    actualMib: n("actualMib"),
    actualPages: n("actualPages"),
    stats: out,
    statsUpdates: n("statsUpdates"),
    inflatedPages: n("inflatedPages"),
    deflatedPages: n("deflatedPages"),
    reportedBytes: n("reportedBytes"),
  };
}

/**
 * What a memory policy needs from a guest's balloon ({@link VmBalloon} is one).
 */
export interface BalloonControl {
  /** Sets the balloon's target size in MiB (0 gives everything back). */
  setTarget(mib: number): BalloonStats;
  /** The last statistics (and asks the guest for fresh ones). */
  stats(): BalloonStats;
}

/**
 * A VM's virtio-balloon, reached through the device's control requests.
 *
 * @example
 * ```ts ignore
 * import { Vm } from "denovisor";
 * using vm = await Vm.create({ memoryMiB: 512, devices: [{ kind: "balloon" }] });
 * // ... boot a Linux guest with virtio_balloon ...
 * vm.balloon.setTarget(256); // ask the guest for 256 MiB back
 * console.log(vm.balloon.stats().actualMib);
 * ```
 */
export class VmBalloon implements BalloonControl {
  readonly #control: (request: Record<string, unknown>) => unknown;
  readonly #memoryMiB: number;

  /**
   * Wraps a device's control function.
   *
   * @param control Sends one JSON request to the balloon device and returns its parsed answer.
   * @param memoryMiB The guest's RAM in MiB (the largest target).
   */
  constructor(control: (request: Record<string, unknown>) => unknown, memoryMiB: number) {
    this.#control = control;
    this.#memoryMiB = memoryMiB;
  }

  /**
   * Sets the balloon's target: the guest's driver inflates (gives pages back to
   * the host) or deflates towards it on its own time.
   *
   * @param mib The target in MiB, from 0 to the guest's RAM.
   * @returns The balloon's state right after the request.
   * @throws {DenovisorError} `INVALID_ARGUMENT` for a target that is not an integer in range.
   */
  setTarget(mib: number): BalloonStats {
    if (!Number.isSafeInteger(mib) || mib < 0 || mib > this.#memoryMiB) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `balloon target must be an integer from 0 to ${this.#memoryMiB} MiB, got ${mib}`,
      );
    }
    return parseBalloonStats(this.#control({ op: "setTarget", mib }));
  }

  /**
   * The guest's last statistics and the balloon's size; also asks the guest
   * for fresh statistics (they arrive within the device's polling interval).
   *
   * @returns The statistics.
   */
  stats(): BalloonStats {
    return parseBalloonStats(this.#control({ op: "stats" }));
  }
}
