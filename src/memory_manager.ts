/**
 * Memory overcommit in TypeScript: a {@link MemoryManager} watches several
 * guests' balloon statistics and moves memory from idle guests to busy ones,
 * keeping the memory the guests hold under a host budget. Policy lives here;
 * the core only inflates and deflates.
 *
 * @module
 */

import { DenovisorError } from "./errors.ts";
import type { BalloonControl, BalloonStats } from "./balloon.ts";

const MIB = 1 << 20;

/** A guest under a {@link MemoryManager}. */
export interface ManagedGuest {
  /** Its name in decisions and metrics (unique). */
  name: string;
  /** Its RAM in MiB (what it holds with an empty balloon). */
  memoryMiB: number;
  /** Its balloon (`vm.balloon`). */
  balloon: BalloonControl;
}

/** How a {@link MemoryManager} decides. */
export interface MemoryManagerOptions {
  /** The most memory, in MiB, all guests together may hold (RAM minus balloon). */
  hostBudgetMiB: number;
  /** A guest with less available memory than this is busy and gets memory back (default 64). */
  lowWaterMiB?: number;
  /** A guest with more available memory than this is idle and gives the excess (default 128). */
  highWaterMiB?: number;
  /** The most MiB moved into or out of one guest per step (default 64). */
  stepMiB?: number;
  /** How often {@link MemoryManager.start} steps, in milliseconds (default 1000). */
  intervalMs?: number;
  /** How many recent decisions the metrics keep (default 256). */
  keepDecisions?: number;
}

/** One change of a guest's balloon target and why. */
export interface MemoryDecision {
  /** The step that made it (from 1). */
  step: number;
  /** When (milliseconds since the epoch). */
  at: number;
  /** The guest. */
  guest: string;
  /** `inflate`: the guest gives memory to the host; `deflate`: it gets memory back. */
  action: "inflate" | "deflate";
  /** The balloon target before, MiB. */
  fromMiB: number;
  /** The balloon target after, MiB. */
  toMiB: number;
  /** Why, in words (`busy: 20 MiB available`, `gives 64 MiB to b`, `over budget`). */
  reason: string;
}

/** How the manager saw one guest at its last step. */
export interface ManagedGuestView {
  /** Its RAM, MiB. */
  memoryMiB: number;
  /** Its balloon target, MiB. */
  targetMiB: number;
  /** Its balloon's size as the guest last said, MiB. */
  actualMiB: number;
  /** Available memory the guest last reported, MiB (`null` before its first statistics). */
  availableMiB: number | null;
  /** `busy` (below the low water mark), `idle` (above the high one), `steady`, or `unknown` (no statistics yet). */
  state: "busy" | "idle" | "steady" | "unknown";
}

/** What a {@link MemoryManager} has done. */
export interface MemoryManagerMetrics {
  /** Steps taken. */
  steps: number;
  /** The host budget, MiB. */
  budgetMiB: number;
  /** What the guests may hold now (sum of RAM minus balloon targets), MiB. */
  committedMiB: number;
  /** Inflate decisions so far. */
  inflations: number;
  /** Deflate decisions so far. */
  deflations: number;
  /** MiB moved into busy guests so far. */
  grantedMiB: number;
  /** MiB taken from guests so far. */
  reclaimedMiB: number;
  /** Steps that failed (a balloon request threw); the last message. */
  errors: number;
  /** The last error's message, if any. */
  lastError?: string;
  /** The most recent decisions, oldest first. */
  decisions: MemoryDecision[];
  /** Each guest as the last step saw it. */
  guests: Record<string, ManagedGuestView>;
}

interface View {
  guest: ManagedGuest;
  stats: BalloonStats;
  target: number;
  /** Available memory once pending inflation/deflation is done, MiB. */
  available: number | null;
}

function positive(name: string, v: number, allowZero = false): number {
  if (!Number.isSafeInteger(v) || v < 0 || (!allowZero && v === 0)) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `${name} must be a ${allowZero ? "non-negative" : "positive"} integer, got ${v}`,
    );
  }
  return v;
}

/**
 * Moves memory between guests through their balloons under a host budget.
 *
 * Each {@link MemoryManager.step}: reads every balloon's statistics; if the
 * guests hold more than the budget, inflates idle guests (those with more
 * available memory than `highWaterMiB`) by their excess; then gives each busy
 * guest (less available than `lowWaterMiB`, with memory in its balloon) up to
 * `stepMiB` back, from the budget's slack first, then taken from idle guests.
 * A guest never gives more than its excess over `highWaterMiB`, so memory
 * only moves from idle to busy. Pending inflation (target above the
 * balloon's size) counts as already gone.
 *
 * @example
 * ```ts ignore
 * import { MemoryManager } from "denovisor";
 * using manager = new MemoryManager(
 *   [{ name: "a", memoryMiB: 512, balloon: vmA.balloon }, { name: "b", memoryMiB: 512, balloon: vmB.balloon }],
 *   { hostBudgetMiB: 768 },
 * );
 * manager.start();
 * // ... later
 * console.log(manager.metrics().decisions);
 * ```
 */
export class MemoryManager {
  readonly #guests: ManagedGuest[];
  readonly #budget: number;
  readonly #low: number;
  readonly #high: number;
  readonly #step: number;
  readonly #interval: number;
  readonly #keep: number;
  #timer: ReturnType<typeof setInterval> | undefined;
  #metrics: MemoryManagerMetrics;

  /**
   * Creates a manager (it does nothing until {@link MemoryManager.step} or
   * {@link MemoryManager.start}).
   *
   * @param guests The guests, each with a unique name.
   * @param options The budget and the policy's thresholds.
   * @throws {DenovisorError} `INVALID_ARGUMENT` for bad options or duplicate names.
   */
  constructor(guests: readonly ManagedGuest[], options: MemoryManagerOptions) {
    this.#budget = positive("hostBudgetMiB", options.hostBudgetMiB);
    this.#low = positive("lowWaterMiB", options.lowWaterMiB ?? 64, true);
    this.#high = positive("highWaterMiB", options.highWaterMiB ?? 128, true);
    this.#step = positive("stepMiB", options.stepMiB ?? 64);
    this.#interval = positive("intervalMs", options.intervalMs ?? 1000);
    this.#keep = positive("keepDecisions", options.keepDecisions ?? 256, true);
    if (this.#low > this.#high) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `lowWaterMiB (${this.#low}) must not exceed highWaterMiB (${this.#high})`,
      );
    }
    const names = new Set<string>();
    for (const g of guests) {
      if (names.has(g.name)) {
        throw new DenovisorError("INVALID_ARGUMENT", `guest name ${g.name} is used twice`);
      }
      names.add(g.name);
      positive(`memoryMiB of ${g.name}`, g.memoryMiB);
    }
    this.#guests = [...guests];
    this.#metrics = {
      steps: 0,
      budgetMiB: this.#budget,
      committedMiB: guests.reduce((s, g) => s + g.memoryMiB, 0),
      inflations: 0,
      deflations: 0,
      grantedMiB: 0,
      reclaimedMiB: 0,
      errors: 0,
      decisions: [],
      guests: {},
    };
  }

  /**
   * Takes one step of the policy now.
   *
   * @returns The decisions of this step (also kept in {@link MemoryManager.metrics}).
   */
  step(): MemoryDecision[] {
    const m = this.#metrics;
    m.steps++;
    const views: View[] = this.#guests.map((guest) => {
      const stats = guest.balloon.stats();
      const reported = stats.stats.availableMemory ?? stats.stats.freeMemory;
      const available = reported === undefined || stats.statsUpdates === 0
        ? null
        : reported / MIB - (stats.targetMib - stats.actualMib);
      return { guest, stats, target: stats.targetMib, available };
    });
    const decisions: MemoryDecision[] = [];
    const committed = () => views.reduce((s, v) => s + v.guest.memoryMiB - v.target, 0);
    const excess = (v: View) =>
      v.available === null ? 0 : Math.max(0, Math.floor(v.available - this.#high));
    const move = (v: View, to: number, reason: string) => {
      const d: MemoryDecision = {
        step: m.steps,
        at: Date.now(),
        guest: v.guest.name,
        action: to > v.target ? "inflate" : "deflate",
        fromMiB: v.target,
        toMiB: to,
        reason,
      };
      v.guest.balloon.setTarget(to);
      if (v.available !== null) v.available -= to - v.target;
      v.target = to;
      decisions.push(d);
      if (d.action === "inflate") {
        m.inflations++;
        m.reclaimedMiB += d.toMiB - d.fromMiB;
      } else {
        m.deflations++;
        m.grantedMiB += d.fromMiB - d.toMiB;
      }
    };
    const donors = () =>
      views.filter((v) => excess(v) > 0 && v.target < v.guest.memoryMiB)
        .sort((a, b) => excess(b) - excess(a));

    // Over budget: the idle give their excess, a step at a time.
    for (const v of donors()) {
      const over = committed() - this.#budget;
      if (over <= 0) break;
      const give = Math.min(over, excess(v), this.#step, v.guest.memoryMiB - v.target);
      if (give > 0) move(v, v.target + give, "over budget");
    }

    // The busy get memory back: budget slack first, then from the idle.
    const busy = views.filter((v) =>
      v.available !== null && v.available < this.#low && v.target > 0
    )
      .sort((a, b) => (a.available ?? 0) - (b.available ?? 0));
    for (const b of busy) {
      let want = Math.min(this.#step, b.target);
      let granted = Math.max(0, Math.min(want, this.#budget - committed()));
      want -= granted;
      for (const d of donors()) {
        if (want <= 0) break;
        if (d === b) continue;
        const give = Math.min(want, excess(d), this.#step, d.guest.memoryMiB - d.target);
        if (give <= 0) continue;
        move(d, d.target + give, `gives ${give} MiB to ${b.guest.name}`);
        want -= give;
        granted += give;
      }
      if (granted > 0) {
        move(b, b.target - granted, `busy: ${Math.floor(b.available ?? 0)} MiB available`);
      }
    }

    m.committedMiB = committed();
    m.guests = Object.fromEntries(views.map((v) => {
      const state: ManagedGuestView["state"] = v.available === null
        ? "unknown"
        : v.available < this.#low
        ? "busy"
        : v.available > this.#high
        ? "idle"
        : "steady";
      const reported = v.stats.stats.availableMemory ?? v.stats.stats.freeMemory;
      return [v.guest.name, {
        memoryMiB: v.guest.memoryMiB,
        targetMiB: v.target,
        actualMiB: v.stats.actualMib,
        availableMiB: v.available === null || reported === undefined ? null : reported / MIB,
        state,
      }];
    }));
    m.decisions.push(...decisions);
    if (m.decisions.length > this.#keep) m.decisions.splice(0, m.decisions.length - this.#keep);
    return decisions;
  }

  /**
   * Steps every `intervalMs` until {@link MemoryManager.stop}. A step that
   * throws (a VM closed) is counted in the metrics and the next one runs.
   */
  start(): void {
    if (this.#timer !== undefined) return;
    this.#timer = setInterval(() => {
      try {
        this.step();
      } catch (e) {
        this.#metrics.errors++;
        this.#metrics.lastError = e instanceof Error ? e.message : String(e);
      }
    }, this.#interval);
  }

  /** Stops stepping. */
  stop(): void {
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#timer = undefined;
  }

  /**
   * What the manager has done and how it sees each guest.
   *
   * @returns A copy of its metrics.
   */
  metrics(): MemoryManagerMetrics {
    return structuredClone(this.#metrics);
  }

  /** Stops stepping (for `using`). */
  [Symbol.dispose](): void {
    this.stop();
  }
}
