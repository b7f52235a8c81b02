/**
 * KSM: host memory per additional identical idle guest, with and without
 * dedup, in one process.
 *
 * Every guest runs tests/guests/ksm_fill.S: it fills `--fill` MiB of its RAM
 * with pages that differ inside the guest but are the same in every guest, then
 * sleeps in `hlt`. The bench starts one guest, then `--guests` - 1 more, and
 * reads this process's memory from /proc/self/smaps_rollup after each step
 * (with dedup, once ksmd has merged what it will); per additional guest =
 * (after all - after one) / (guests - 1). PSS charges a page shared N times
 * 1/N per mapping, so it shows what KSM saves; RSS counts every mapping of a
 * merged page in full, so inside one process it does not move. Needs root to
 * turn ksmd on (restored afterwards), or ksmd already running.
 *
 *   deno run -A bench/ksm_bench.ts [--guests N] [--fill MiB] [--json]   default 4, 32
 *   ../shared/kvmbox/kvmbox --timeout 900 -- $(which deno) run -A bench/ksm_bench.ts
 *   deno bench -A bench/ksm_bench.ts     the same runs, timed: N guests to idle (and merged)
 *
 * @module
 */

import { parseArgs } from "node:util";
import { FilledGuests, withKsmRunning } from "../tests/_ksm.ts";
import type { KsmMetrics } from "../mod.ts";

/** This process's memory, from /proc/self/smaps_rollup, in bytes. */
export interface ProcessMemory {
  /** Resident set size. */
  rss: number;
  /** Proportional set size. */
  pss: number;
}

/**
 * Reads `Rss` and `Pss` from /proc/self/smaps_rollup.
 *
 * @returns Both in bytes.
 */
export async function processMemory(): Promise<ProcessMemory> {
  const text = await Deno.readTextFile("/proc/self/smaps_rollup");
  const field = (name: string) => {
    const m = text.match(new RegExp(`^${name}:\\s+(\\d+) kB$`, "m"));
    if (!m) throw new Error(`/proc/self/smaps_rollup has no ${name} line`);
    return Number(m[1]) * 1024;
  };
  return { rss: field("Rss"), pss: field("Pss") };
}

/** One mode's measurement. */
export interface KsmMeasurement {
  /** Whether the guests had dedup. */
  dedup: boolean;
  /** Guests at the end. */
  guests: number;
  /** MiB each guest filled. */
  fillMiB: number;
  /** RSS added per guest after the first, bytes. */
  rssPerGuest: number;
  /** PSS added per guest after the first, bytes. */
  pssPerGuest: number;
  /** KSM's state at the end (from the last guest). */
  ksm: KsmMetrics;
  /** Milliseconds from starting the additional guests to idle (and, with
   * dedup, merged). */
  settleMs: number;
}

/**
 * Waits until ksmd has merged what it will of these guests: this process's
 * merging pages reach `target` and then stay the same over two full scans
 * (`target` 0: just the latter).
 */
async function settle(guests: FilledGuests, target: number, timeoutMs: number): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  const read = () => guests.vms[0].ksm();
  let last = read();
  let stableSince = last.host.fullScans ?? 0;
  for (;;) {
    if (performance.now() > deadline) {
      throw new Error(`ksmd did not settle in ${timeoutMs} ms: ${JSON.stringify(last)}`);
    }
    await new Promise((r) => setTimeout(r, 250));
    const now = read();
    const merging = now.process.mergingPages ?? 0;
    if (merging !== (last.process.mergingPages ?? 0)) {
      stableSince = now.host.fullScans ?? 0;
    } else if (merging >= target && (now.host.fullScans ?? 0) >= stableSince + 2) {
      return;
    }
    last = now;
  }
}

/**
 * Measures host memory per additional identical idle guest.
 *
 * @param options Guests (at least 2), MiB each fills, dedup or not.
 * @returns The per-guest RSS and PSS and KSM's counters.
 */
export async function measureKsm(
  options: { guests: number; fillMiB: number; dedup: boolean },
): Promise<KsmMeasurement> {
  const { guests, fillMiB, dedup } = options;
  const fillPages = (fillMiB << 20) / 4096;
  const first = await FilledGuests.start(1, { dedup, fillMiB });
  try {
    if (dedup) await settle(first, 0, 300_000); // whatever merges inside one guest
    const one = await processMemory();
    const started = performance.now();
    const more = await FilledGuests.start(guests - 1, { dedup, fillMiB });
    try {
      if (dedup) await settle(first, Math.floor(0.9 * guests * fillPages), 300_000);
      const settleMs = performance.now() - started;
      const all = await processMemory();
      return {
        dedup,
        guests,
        fillMiB,
        rssPerGuest: (all.rss - one.rss) / (guests - 1),
        pssPerGuest: (all.pss - one.pss) / (guests - 1),
        ksm: more.vms[0].ksm(),
        settleMs,
      };
    } finally {
      await more.close();
    }
  } finally {
    await first.close();
  }
}

const MIB = 1 << 20;

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      guests: { type: "string", default: "4" },
      fill: { type: "string", default: "32" },
      json: { type: "boolean" },
    },
  });
  const guests = Number(values.guests);
  const fillMiB = Number(values.fill);
  if (!Number.isInteger(guests) || guests < 2 || !Number.isInteger(fillMiB) || fillMiB < 1) {
    throw new Error("--guests must be an integer of at least 2, --fill a positive integer");
  }
  const results = await withKsmRunning(async () => [
    await measureKsm({ guests, fillMiB, dedup: false }),
    await measureKsm({ guests, fillMiB, dedup: true }),
  ]);
  if (values.json) {
    console.log(JSON.stringify(results, null, 2));
  } else {
    console.log(
      `host memory per additional identical idle guest (${guests} guests, ` +
        `each filling ${fillMiB} MiB), this process's /proc/self/smaps_rollup`,
    );
    console.log(
      `${"".padEnd(10)} ${"RSS/guest".padStart(12)} ${"PSS/guest".padStart(12)} ` +
        `${"settle".padStart(9)} ${"merging pages".padStart(14)} ${"pages_sharing".padStart(14)}`,
    );
    for (const r of results) {
      console.log(
        `${(r.dedup ? "dedup" : "no dedup").padEnd(10)} ` +
          `${(r.rssPerGuest / MIB).toFixed(2).padStart(8)} MiB ` +
          `${(r.pssPerGuest / MIB).toFixed(2).padStart(8)} MiB ` +
          `${(r.settleMs / 1000).toFixed(1).padStart(7)} s ` +
          `${String(r.ksm.process.mergingPages).padStart(14)} ` +
          `${String(r.ksm.host.pagesSharing).padStart(14)}`,
      );
    }
    const [plain, dedup] = results;
    console.log(
      `dedup / no dedup: PSS ${(dedup.pssPerGuest / plain.pssPerGuest).toFixed(3)}x, ` +
        `RSS ${(dedup.rssPerGuest / plain.rssPerGuest).toFixed(3)}x`,
    );
  }
} else {
  for (const dedup of [false, true]) {
    Deno.bench({
      name: `4 identical guests filling 32 MiB each to idle${dedup ? ", then merged by ksmd" : ""}`,
      group: "KSM",
      baseline: !dedup,
      n: 1,
      warmup: 0,
      fn: async () => {
        const r = await withKsmRunning(() => measureKsm({ guests: 4, fillMiB: 32, dedup }));
        console.log(
          `${dedup ? "dedup" : "no dedup"}: ${(r.pssPerGuest / MIB).toFixed(2)} MiB PSS, ` +
            `${(r.rssPerGuest / MIB).toFixed(2)} MiB RSS per additional guest`,
        );
      },
    });
  }
}
