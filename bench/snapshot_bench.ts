/**
 * Snapshot and restore, denovisor side by side with QEMU (issue 9,
 * "Performance"): a guest of N MiB (Debian's kernel, a busybox initramfs,
 * idle at its shell) is paused and its whole state saved to a file, then
 * restored in a new process until it runs again; the restored shell must
 * answer.
 *
 * - QEMU: `stop` + QMP `migrate` to `exec:cat > FILE` (time to completion,
 *   the file's size), then a new QEMU with `-incoming defer` and QMP
 *   `migrate-incoming` from `exec:cat FILE`, timed to its `RESUME` event from
 *   the process's spawn and from `migrate-incoming` (bench/_qemu_migrate.ts).
 * - denovisor: `measureDenovisorSnapshots` (bench/_snapshot_compare.ts), lazy
 *   and eager from one boot of the guest, in this process.
 *
 *   deno run -A bench/snapshot_bench.ts [--mem 128,512] [--runs N] [--json]
 *
 * Needs `/dev/kvm`; on a host without one run it in kvmbox (the state files go
 * to a temporary directory: tmpfs there):
 *   ../shared/kvmbox/kvmbox --timeout 1800 -- /usr/local/bin/deno run -A bench/snapshot_bench.ts
 *
 * @module
 */

import { parseArgs } from "node:util";
import { checkKvmAccess } from "../src/build/core_build.ts";
import { DenovisorError } from "../src/errors.ts";
import { summarize } from "./_boot_compare.ts";
import { formatTable, qemuVersion } from "./_qemu.ts";
import { measureQemuSnapshot } from "./_qemu_migrate.ts";
import {
  attempt,
  benchGuest,
  cell,
  measureDenovisorSnapshots,
  mib,
  ms,
  type Outcome,
  ratioCell,
  type SnapshotFigures,
} from "./_snapshot_compare.ts";

const USAGE = "usage: deno run -A bench/snapshot_bench.ts [--mem 128,512] [--runs N] [--json]";

/** The command line's settings. */
interface Args {
  mems: number[];
  runs: number;
  json: boolean;
}

function parse(args: string[]): Args {
  const { values } = parseArgs({
    args,
    options: {
      mem: { type: "string", default: "128,512" },
      runs: { type: "string", default: "1" },
      json: { type: "boolean", default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  const mems = values.mem.split(",").map(Number);
  const runs = Number(values.runs);
  if (mems.some((m) => !Number.isInteger(m) || m < 128 || m > 8192)) {
    throw new DenovisorError("INVALID_ARGUMENT", `--mem: MiB from 128 to 8192, got ${values.mem}`);
  }
  if (!Number.isInteger(runs) || runs < 1 || runs > 100) {
    throw new DenovisorError("INVALID_ARGUMENT", `--runs: 1 to 100, got ${values.runs}`);
  }
  return { mems, runs, json: values.json };
}

/** The medians of several runs' figures (each field on its own). */
function medians(all: SnapshotFigures[]): SnapshotFigures {
  const m = (f: (s: SnapshotFigures) => number) => summarize(all.map(f))!.median;
  return {
    memMiB: all[0].memMiB,
    saveMs: m((s) => s.saveMs),
    bytes: m((s) => s.bytes),
    restoreFromStartMs: m((s) => s.restoreFromStartMs),
    restoreMs: m((s) => s.restoreMs),
  };
}

/** QEMU's figures for `memMiB`: `runs` rounds, their medians. */
async function qemuSide(memMiB: number, runs: number): Promise<SnapshotFigures> {
  const dir = await Deno.makeTempDir({ prefix: "dv-snap-" });
  try {
    const spec = await benchGuest(memMiB, dir);
    const all: SnapshotFigures[] = [];
    for (let r = 0; r < runs; r++) {
      const m = await measureQemuSnapshot({ spec, dir });
      console.error(
        `  QEMU ${memMiB} MiB run ${r + 1}/${runs}: save ${ms(m.save.wallMs)} ` +
          `(${mib(m.save.bytes)}), restore ${ms(m.restore.fromStartMs)} from spawn, ` +
          `${ms(m.restore.fromIncomingMs)} from migrate-incoming`,
      );
      all.push({
        memMiB,
        saveMs: m.save.wallMs,
        bytes: m.save.bytes,
        restoreFromStartMs: m.restore.fromStartMs,
        restoreMs: m.restore.fromIncomingMs,
      });
    }
    return medians(all);
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** denovisor's figures for `memMiB`, lazy and eager, from one boot of the guest. */
async function denovisorSide(
  memMiB: number,
): Promise<{ lazy: SnapshotFigures; eager: SnapshotFigures }> {
  const dir = await Deno.makeTempDir({ prefix: "dv-snap-" });
  try {
    return await measureDenovisorSnapshots(await benchGuest(memMiB, dir));
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** One guest size's outcomes. */
interface SizeResult {
  memMiB: number;
  qemu: Outcome<SnapshotFigures>;
  lazy: Outcome<SnapshotFigures>;
  eager: Outcome<SnapshotFigures>;
}

function table(r: SizeResult): string {
  const row = (name: string, pick: (s: SnapshotFigures) => number, f: (v: number) => string) => [
    name,
    cell(r.lazy, pick, f),
    cell(r.eager, pick, f),
    cell(r.qemu, pick, f),
    ratioCell(r.lazy, r.qemu, pick),
  ];
  return formatTable(["", "denovisor lazy", "denovisor eager", "QEMU", "lazy / QEMU"], [
    row("save (pause + write state)", (s) => s.saveMs, ms),
    row("snapshot size", (s) => s.bytes, mib),
    row("restore: spawn → running", (s) => s.restoreFromStartMs, ms),
    row("restore: request → running", (s) => s.restoreMs, ms),
    row("restore: VM rebuilt (Vm.restore)", (s) => s.restoreReadyMs ?? NaN, ms),
    row("restore: first Vm.restore (warm-up)", (s) => s.restoreColdMs ?? NaN, ms),
    row("diff after one shell command: write", (s) => s.diffSaveMs ?? NaN, ms),
    row("diff size", (s) => s.diffBytes ?? NaN, mib),
    row("host memory per extra lazy clone", (s) => s.cloneAnonBytes ?? NaN, mib),
    row("pages each idle clone dirtied", (s) => s.cloneDirtyPages ?? NaN, (v) => v.toFixed(0)),
  ]);
}

async function main(args: Args): Promise<void> {
  const kvm = checkKvmAccess();
  if (kvm) {
    console.error(`snapshot_bench: needs /dev/kvm (${kvm}); run it in kvmbox`);
    Deno.exit(70);
  }
  const version = await qemuVersion();
  const results: SizeResult[] = [];
  for (const memMiB of args.mems) {
    const qemu = version
      ? await attempt(() => qemuSide(memMiB, args.runs))
      : { ok: false as const, reason: "QEMU is not installed", missing: true };
    const both = await attempt(() => denovisorSide(memMiB));
    const lazy: Outcome<SnapshotFigures> = both.ok ? { ok: true, value: both.value.lazy } : both;
    const eager: Outcome<SnapshotFigures> = both.ok ? { ok: true, value: both.value.eager } : both;
    for (
      const [side, o] of [["QEMU", qemu], ["denovisor lazy", lazy], ["denovisor eager", eager]]
    ) {
      const outcome = o as Outcome<SnapshotFigures>;
      if (!outcome.ok) console.error(`  ${side} ${memMiB} MiB: ${outcome.reason}`);
    }
    results.push({ memMiB, qemu, lazy, eager });
  }
  if (args.json) {
    console.log(JSON.stringify({ qemu: version, runs: args.runs, results }, null, 2));
    return;
  }
  console.log(
    `\nSnapshot of a guest idle at a busybox shell (Debian's kernel, 1 vCPU), ` +
      `${args.runs} run(s), medians\n${version ?? "QEMU not available"}`,
  );
  for (const r of results) console.log(`\n${r.memMiB} MiB guest\n${table(r)}`);
  console.log(
    `\n  QEMU: save = stop + migrate to "exec:cat > FILE" (max-bandwidth uncapped) until ` +
      `completed; restore = -incoming defer, migrate-incoming "exec:cat FILE", to QEMU's RESUME ` +
      `event.\n  denovisor: request → running = Vm.restore to the restored guest's first vCPU exit ` +
      `(a newline queued on its console as it starts); snapshots from one boot, in-process. ` +
      `n/a: not available on this host.`,
  );
}

if (import.meta.main) {
  let args: Args;
  try {
    args = parse(Deno.args);
  } catch (e) {
    console.error(`snapshot_bench: ${e instanceof Error ? e.message : e}\n${USAGE}`);
    Deno.exit(2);
  }
  await main(args);
}
