/**
 * Live migration, denovisor side by side with QEMU (issue 9, "Performance"):
 * a running guest (Debian's kernel, a busybox initramfs, 256 MiB by default)
 * moves between two processes on the same host over loopback TCP, idle at its
 * shell, then while its shell rewrites a tmpfs file in a loop (`dd` over the
 * same pages: a steady dirty working set); the target's shell must answer
 * afterwards.
 *
 * - QEMU: source and target with `-accel kvm`, the target `-incoming
 *   tcp:127.0.0.1:PORT`, QMP `migrate` (max-bandwidth uncapped, QEMU's default
 *   300 ms downtime limit unless `--downtime-limit`), `query-migrate`'s
 *   total-time, downtime and bytes; the guest's real pause is the source's
 *   `STOP` event to the target's `RESUME` (bench/_qemu_migrate.ts).
 * - denovisor: `measureDenovisorMigration` (bench/_snapshot_compare.ts); `n/a`
 *   until denovisor's live migration is built.
 *
 *   deno run -A bench/migrate_bench.ts [--mem 256] [--dirty-mib 64] [--runs N]
 *                                      [--downtime-limit MS] [--json]
 *
 * Needs `/dev/kvm`; on a host without one run it in kvmbox:
 *   ../shared/kvmbox/kvmbox --timeout 1800 -- /usr/local/bin/deno run -A bench/migrate_bench.ts
 *
 * @module
 */

import { parseArgs } from "node:util";
import { checkKvmAccess } from "../src/build/core_build.ts";
import { DenovisorError } from "../src/errors.ts";
import { summarize } from "./_boot_compare.ts";
import { formatTable, qemuVersion } from "./_qemu.ts";
import { measureQemuLiveMigration, type MigrationMeasurement } from "./_qemu_migrate.ts";
import {
  attempt,
  benchGuest,
  cell,
  type GuestLoad,
  measureDenovisorMigration,
  mib,
  type MigrationFigures,
  ms,
  type Outcome,
  ratioCell,
} from "./_snapshot_compare.ts";

const USAGE = "usage: deno run -A bench/migrate_bench.ts [--mem 256] [--dirty-mib 64] " +
  "[--runs N] [--downtime-limit MS] [--json]";

interface Args {
  memMiB: number;
  dirtyMiB: number;
  runs: number;
  downtimeLimitMs?: number;
  json: boolean;
}

function int(name: string, text: string, min: number, max: number): number {
  const v = Number(text);
  if (!/^[0-9]+$/.test(text) || v < min || v > max) {
    throw new DenovisorError("INVALID_ARGUMENT", `--${name}: ${min} to ${max}, got ${text}`);
  }
  return v;
}

function parse(args: string[]): Args {
  const { values } = parseArgs({
    args,
    options: {
      mem: { type: "string", default: "256" },
      "dirty-mib": { type: "string", default: "64" },
      runs: { type: "string", default: "1" },
      "downtime-limit": { type: "string" },
      json: { type: "boolean", default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  const memMiB = int("mem", values.mem, 128, 8192);
  return {
    memMiB,
    dirtyMiB: int("dirty-mib", values["dirty-mib"], 1, Math.floor(memMiB / 2)),
    runs: int("runs", values.runs, 1, 100),
    downtimeLimitMs: values["downtime-limit"] === undefined
      ? undefined
      : int("downtime-limit", values["downtime-limit"], 1, 100_000),
    json: values.json,
  };
}

/** One load's outcomes, with QEMU's own details. */
interface LoadResult {
  load: GuestLoad;
  qemu: Outcome<MigrationFigures>;
  qemuRuns: MigrationMeasurement[];
  denovisor: Outcome<MigrationFigures>;
}

function loadName(load: GuestLoad): string {
  return load.kind === "idle" ? "idle" : `dirtying ${load.workingSetMiB} MiB`;
}

async function qemuSide(args: Args, load: GuestLoad, runs: MigrationMeasurement[]) {
  const dir = await Deno.makeTempDir({ prefix: "dv-mig-" });
  try {
    const spec = await benchGuest(args.memMiB, dir);
    for (let r = 0; r < args.runs; r++) {
      const m = await measureQemuLiveMigration({
        spec,
        dir,
        dirty: load.kind === "dirty" ? { workingSetMiB: load.workingSetMiB } : undefined,
        downtimeLimitMs: args.downtimeLimitMs,
      });
      console.error(
        `  QEMU ${loadName(load)} run ${r + 1}/${args.runs}: total ${ms(m.totalMs)}, ` +
          `downtime ${ms(m.downtimeMs)} (STOP→RESUME ${ms(m.stopToResumeMs)}), ` +
          `${mib(m.transferredBytes)} in ${m.rounds} syncs`,
      );
      runs.push(m);
    }
    const med = (f: (m: MigrationMeasurement) => number) => summarize(runs.map(f))!.median;
    return {
      memMiB: args.memMiB,
      totalMs: med((m) => m.totalMs),
      downtimeMs: med((m) => m.stopToResumeMs),
      transferredBytes: med((m) => m.transferredBytes),
    };
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

async function denovisorSide(args: Args, load: GuestLoad): Promise<MigrationFigures> {
  const dir = await Deno.makeTempDir({ prefix: "dv-mig-" });
  try {
    return await measureDenovisorMigration(await benchGuest(args.memMiB, dir), load);
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

async function main(args: Args): Promise<void> {
  const kvm = checkKvmAccess();
  if (kvm) {
    console.error(`migrate_bench: needs /dev/kvm (${kvm}); run it in kvmbox`);
    Deno.exit(70);
  }
  const version = await qemuVersion();
  const loads: GuestLoad[] = [{ kind: "idle" }, { kind: "dirty", workingSetMiB: args.dirtyMiB }];
  const results: LoadResult[] = [];
  for (const load of loads) {
    const qemuRuns: MigrationMeasurement[] = [];
    const qemu: Outcome<MigrationFigures> = version
      ? await attempt(() => qemuSide(args, load, qemuRuns))
      : { ok: false, reason: "QEMU is not installed", missing: true };
    const denovisor = await attempt(() => denovisorSide(args, load));
    for (const [side, o] of [["QEMU", qemu], ["denovisor", denovisor]] as const) {
      if (!o.ok) console.error(`  ${side} ${loadName(load)}: ${o.reason}`);
    }
    results.push({ load, qemu, qemuRuns, denovisor });
  }
  if (args.json) {
    console.log(JSON.stringify({ qemu: version, args, results }, null, 2));
    return;
  }
  console.log(
    `\nLive migration of a ${args.memMiB} MiB guest over loopback TCP (Debian's kernel, ` +
      `busybox shell, 1 vCPU), ${args.runs} run(s), medians\n${version ?? "QEMU not available"}\n`,
  );
  const rows = results.flatMap((r) => {
    const row = (name: string, pick: (f: MigrationFigures) => number, f: (v: number) => string) => [
      `${loadName(r.load)}: ${name}`,
      cell(r.denovisor, pick, f),
      cell(r.qemu, pick, f),
      ratioCell(r.denovisor, r.qemu, pick),
    ];
    return [
      row("total time", (m) => m.totalMs, ms),
      row("downtime (pause → resume)", (m) => m.downtimeMs, ms),
      row("transferred", (m) => m.transferredBytes, mib),
    ];
  });
  console.log(formatTable(["", "denovisor", "QEMU", "denovisor / QEMU"], rows));
  for (const r of results) {
    for (const m of r.qemuRuns) {
      console.log(
        `  QEMU ${loadName(r.load)}: query-migrate downtime ${ms(m.downtimeMs)} (the source's ` +
          `view), setup ${ms(m.setupMs)}, ${m.rounds} dirty syncs, ` +
          `${mib(m.resentBytes)} re-sent after the first pass, peak dirty rate ` +
          `${m.maxDirtyPagesPerSec} pages/s, downtime limit ${m.downtimeLimitMs} ms`,
      );
    }
  }
  for (const r of results) {
    if (!r.denovisor.ok || !r.denovisor.value.denovisor) continue;
    const { rounds, phases, target } = r.denovisor.value.denovisor;
    const last = rounds[rounds.length - 1];
    const fixed = (v: number) => v.toFixed(1);
    console.log(
      `  denovisor ${loadName(r.load)}: ${rounds.length} rounds (round 0 ${
        rounds[0]?.pages
      } pages ` +
        `in ${fixed(rounds[0]?.ms ?? 0)} ms: pack ${fixed(rounds[0]?.packMs ?? 0)}, send ` +
        `${fixed(rounds[0]?.sendMs ?? 0)}; last ${last?.pages} pages); source phases ms: ` +
        Object.entries(phases).map(([k, v]) => `${k} ${fixed(v)}`).join(", ") +
        (target
          ? `; target: build ${fixed(target.build)}, write pages ${fixed(target.writePages)}, ` +
            `apply state ${fixed(target.applyState)}`
          : ""),
    );
  }
  console.log(
    "\n  downtime = the source's STOP event to the target's RESUME event (both QEMU's " +
      "timestamps); total = QEMU's total-time. n/a: not built yet.",
  );
}

if (import.meta.main) {
  let args: Args;
  try {
    args = parse(Deno.args);
  } catch (e) {
    console.error(`migrate_bench: ${e instanceof Error ? e.message : e}\n${USAGE}`);
    Deno.exit(2);
  }
  await main(args);
}
