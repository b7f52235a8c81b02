/**
 * What the snapshot and migration benches share: the figures each VMM
 * reports (the same shape for denovisor and QEMU), denovisor's side of each
 * measurement, the guest both boot, and the table cells.
 *
 * denovisor's side of each measurement is one function with the interface the
 * table needs. Until denovisor's snapshot, restore and migration exist (issue
 * 9), each throws `DenovisorError` `NOT_BUILT`, which the tables print as
 * `n/a`: a bench never shows a number that was not measured.
 *
 * @module
 */

import { DenovisorError } from "../src/errors.ts";
import { fetchBusybox, fetchDebianKernel } from "../src/linux/debian_kernel.ts";
import type { BootSpec } from "./_qemu.ts";
import { GUEST_CMDLINE, shellInitramfs } from "./_qemu_migrate.ts";

/** A snapshot of a guest idle at its shell: the save and the restore. */
export interface SnapshotFigures {
  /** Guest RAM, MiB. */
  memMiB: number;
  /** Pausing the running guest and writing its whole state (CPU, devices, RAM), ms. */
  saveMs: number;
  /** Bytes the snapshot occupies (state and memory files together). */
  bytes: number;
  /** A new VMM process's start to the restored guest running, ms. */
  restoreFromStartMs: number;
  /** The restore request (QEMU: `migrate-incoming`; denovisor: the restore call) to the guest running, ms. */
  restoreMs: number;
}

/** A live migration of a running guest between two processes on one host. */
export interface MigrationFigures {
  /** Guest RAM, MiB. */
  memMiB: number;
  /** The migration request to the target running and the source done, ms. */
  totalMs: number;
  /** The time the guest did not run: the source's pause to the target's resume, ms. */
  downtimeMs: number;
  /** Bytes sent from source to target. */
  transferredBytes: number;
}

/** What the migrated guest does while it moves. */
export type GuestLoad = { kind: "idle" } | { kind: "dirty"; workingSetMiB: number };

/**
 * The guest every VMM boots for these benches: Debian's kernel, the busybox
 * initramfs of {@link shellInitramfs} (written to a temporary file), the Linux
 * benches' command line.
 *
 * @param memMiB Guest RAM.
 * @param dir Where to write the initramfs.
 * @returns The boot spec (1 vCPU).
 * @throws {Error} When Debian's kernel or busybox cannot be had.
 * @example
 * ```ts ignore
 * import { benchGuest } from "denovisor/bench/_snapshot_compare.ts";
 * const spec = await benchGuest(256, await Deno.makeTempDir());
 * ```
 */
export async function benchGuest(memMiB: number, dir: string): Promise<BootSpec> {
  const log = (line: string) => console.error(`note: ${line}`);
  const kernel = await fetchDebianKernel({ log });
  if (!kernel.ok) throw new Error(`no Debian kernel: ${kernel.reason}`);
  const busybox = await fetchBusybox({ log });
  if (!busybox.ok) throw new Error(`no busybox: ${busybox.reason}`);
  const initrd = `${dir}/initrd.cpio`;
  await Deno.writeFile(initrd, shellInitramfs(await Deno.readFile(busybox.file.path)));
  return { kernel: kernel.file.path, initrd, cmdline: GUEST_CMDLINE, memMiB, cpus: 1 };
}

function notBuilt(what: string): never {
  throw new DenovisorError("NOT_BUILT", `denovisor's ${what} is not built yet`);
}

/**
 * denovisor's snapshot of `spec`'s guest idle at its shell, measured as
 * QEMU's is: boot it (`main.ts run --api-socket`), pause and snapshot it
 * (`main.ts snapshot --to DIR`: `saveMs`, the directory's size: `bytes`),
 * then restore it in a new process (`main.ts restore DIR`, lazy or eager:
 * `restoreFromStartMs` from spawn, `restoreMs` from the restore call, both to
 * the first guest instruction) and check its shell answers.
 *
 * @param spec The guest ({@link benchGuest}).
 * @param mode Lazy (memory mapped copy-on-write from the file) or eager (copied).
 * @returns The figures.
 * @throws {DenovisorError} `NOT_BUILT` until denovisor's snapshots exist.
 * @example
 * ```ts ignore
 * import { measureDenovisorSnapshot } from "denovisor/bench/_snapshot_compare.ts";
 * console.log(await measureDenovisorSnapshot(spec, "lazy"));
 * ```
 */
export function measureDenovisorSnapshot(
  spec: BootSpec,
  mode: "lazy" | "eager",
): Promise<SnapshotFigures> {
  void spec;
  return Promise.reject(notBuilt(`${mode} snapshot restore`));
}

/**
 * denovisor's live migration of `spec`'s guest between two processes on
 * loopback TCP (`main.ts run --incoming tcp:127.0.0.1:PORT`, `main.ts migrate
 * --to ...`), with `load` running in the guest, measured as QEMU's is; the
 * target's shell must answer afterwards.
 *
 * @param spec The guest ({@link benchGuest}).
 * @param load Idle, or rewriting a tmpfs file of the given size in a loop.
 * @returns The figures.
 * @throws {DenovisorError} `NOT_BUILT` until denovisor's live migration exists.
 * @example
 * ```ts ignore
 * import { measureDenovisorMigration } from "denovisor/bench/_snapshot_compare.ts";
 * console.log(await measureDenovisorMigration(spec, { kind: "idle" }));
 * ```
 */
export function measureDenovisorMigration(
  spec: BootSpec,
  load: GuestLoad,
): Promise<MigrationFigures> {
  void spec;
  void load;
  return Promise.reject(notBuilt("live migration"));
}

/**
 * One VMM's attempt at a measurement: its figures, or why there are none
 * (`n/a` for a side not built yet, the error otherwise).
 */
export type Outcome<T> = { ok: true; value: T } | { ok: false; reason: string; notBuilt: boolean };

/**
 * Runs one measurement, keeping its failure as an outcome so one failed
 * measurement does not lose the others.
 *
 * @param measure The measurement.
 * @returns Its figures, or its failure.
 * @example
 * ```ts
 * import { attempt } from "denovisor/bench/_snapshot_compare.ts";
 * console.log(await attempt(() => Promise.resolve(1))); // { ok: true, value: 1 }
 * ```
 */
export async function attempt<T>(measure: () => Promise<T>): Promise<Outcome<T>> {
  try {
    return { ok: true, value: await measure() };
  } catch (e) {
    return {
      ok: false,
      reason: e instanceof Error ? e.message : String(e),
      notBuilt: e instanceof DenovisorError && e.code === "NOT_BUILT",
    };
  }
}

/**
 * A table cell: the value formatted, `n/a` for a side not built, `failed`
 * for a measurement that failed.
 *
 * @param outcome The measurement's outcome.
 * @param pick The number shown from its figures.
 * @param format How it is written.
 * @returns The cell's text.
 * @example
 * ```ts
 * import { cell } from "denovisor/bench/_snapshot_compare.ts";
 * console.log(cell({ ok: false, reason: "", notBuilt: true }, (v: number) => v, String)); // "n/a"
 * ```
 */
export function cell<T>(
  outcome: Outcome<T>,
  pick: (value: T) => number,
  format: (v: number) => string,
): string {
  if (!outcome.ok) return outcome.notBuilt ? "n/a" : "failed";
  const v = pick(outcome.value);
  return Number.isFinite(v) ? format(v) : "—";
}

/**
 * The ratio cell `a / b` of two outcomes, `n/a` unless both were measured.
 *
 * @param a The numerator's outcome (denovisor).
 * @param b The denominator's outcome (QEMU).
 * @param pick The number compared.
 * @returns `1.23x` or `n/a`.
 * @example
 * ```ts
 * import { ratioCell } from "denovisor/bench/_snapshot_compare.ts";
 * console.log(ratioCell({ ok: true, value: 2 }, { ok: true, value: 4 }, (v: number) => v)); // "0.50x"
 * ```
 */
export function ratioCell<T>(
  a: Outcome<T>,
  b: Outcome<T>,
  pick: (value: T) => number,
): string {
  if (!a.ok || !b.ok) return "n/a";
  const r = pick(a.value) / pick(b.value);
  return Number.isFinite(r) ? `${r.toFixed(2)}x` : "n/a";
}

/** Milliseconds as text (`12.3 ms`, `4.56 s`). */
export function ms(v: number): string {
  return v >= 10_000 ? `${(v / 1000).toFixed(2)} s` : `${v.toFixed(v >= 100 ? 0 : 1)} ms`;
}

/** Bytes as MiB text. */
export function mib(bytes: number): string {
  return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}
