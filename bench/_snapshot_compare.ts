/**
 * What the snapshot and migration benches share: the figures each VMM
 * reports (the same shape for denovisor and QEMU), denovisor's side of each
 * measurement, the guest both boot, and the table cells.
 *
 * denovisor's side of each measurement is one function with the interface the
 * table needs. A side that cannot run here (no QEMU installed) prints as
 * `n/a`, a measurement that failed as `failed`: a bench never shows a number
 * that was not measured.
 *
 * @module
 */

import { ConsoleDriver } from "../src/console_driver.ts";
import { fetchBusybox, fetchDebianKernel } from "../src/linux/debian_kernel.ts";
import type { BootSpec } from "./_qemu.ts";
import { GUEST_CMDLINE, GUEST_PROMPT, GUEST_READY, shellInitramfs } from "./_qemu_migrate.ts";
import { ApiClient } from "../src/api/client.ts";
import type { MigrationStats } from "../src/migration/migrate.ts";

import { Vm } from "../src/vm.ts";

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
  /** The restore request (QEMU: `migrate-incoming`; denovisor: the restore call) to the guest
   * running (denovisor: its first vCPU exit), ms. */
  restoreMs: number;
  /** denovisor: the restore call alone (the VM rebuilt, ready to run), ms. */
  restoreReadyMs?: number;
  /** denovisor: an untimed warm-up `Vm.restore` before the timed ones (lazy, not
   * run), ms: the first in a process also pays for compiling its code. */
  restoreColdMs?: number;
  /** denovisor: a diff snapshot after a small change in the guest (one
   * shell command), ms to write it. */
  diffSaveMs?: number;
  /** denovisor: that diff's bytes on disk. */
  diffBytes?: number;
  /** denovisor: host anonymous memory (RssAnon) each extra lazily restored
   * clone of the idle guest adds, bytes. */
  cloneAnonBytes?: number;
  /** denovisor: pages each such clone dirtied (its private copies). */
  cloneDirtyPages?: number;
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
  /** denovisor only: its migration's rounds and the phases of both sides. */
  denovisor?: Pick<MigrationStats, "rounds" | "phases" | "target">;
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

/** Bytes a directory's files occupy on disk (allocated blocks: holes are free). */
async function diskBytes(dir: string): Promise<number> {
  let total = 0;
  for await (const e of Deno.readDir(dir)) {
    const st = await Deno.stat(`${dir}/${e.name}`);
    total += st.blocks !== null ? st.blocks * 512 : st.size;
  }
  return total;
}

/** This process's anonymous resident memory (`RssAnon`), bytes. */
function rssAnon(): number {
  const m = /RssAnon:\s+(\d+) kB/.exec(Deno.readTextFileSync("/proc/self/status"));
  return m ? Number(m[1]) * 1024 : NaN;
}

const BOOT_MS = 900_000;
const RUN_MS = 3_600_000;

/**
 * Starts `vm` and resolves once its first vCPU exit is counted: the guest has
 * run (its first instruction, and as far as that exit). A guest restored idle
 * at its shell makes no exit by itself (its timer and `hlt` stay inside KVM
 * with the in-kernel irqchip), so a newline is queued on its console as the
 * run starts: its serial driver's port read is the exit. Polled every 1 ms:
 * a busy loop would take the CPU from the vCPU thread on a one-CPU machine.
 */
async function runToFirstExit(
  vm: Vm,
): Promise<{ run: Promise<unknown>; at: number; shell: ConsoleDriver }> {
  const shell = new ConsoleDriver(vm);
  const run = shell.watch(vm.run({ timeoutMs: RUN_MS }));
  vm.sendConsoleInput("\n");
  const until = performance.now() + 120_000;
  for (;;) {
    if (vm.metrics().some((m) => m.exits > 0)) return { run, at: performance.now(), shell };
    if (performance.now() > until) {
      vm.stop();
      await run.catch(() => {});
      throw new Error("the restored guest made no exit within 120 s");
    }
    await new Promise((r) => setTimeout(r, 1));
  }
}

/** The restored guest's shell answers a computed value. */
async function shellAnswers(shell: ConsoleDriver): Promise<void> {
  const n = 1000 + Math.floor(Math.random() * 1000);
  shell.send(`echo ANSWER-$((${n}+1))\n`);
  await shell.waitFor(`ANSWER-${n + 1}`, { timeoutMs: 120_000 });
}

/** Restores `dir` in `mode`, times it, checks the shell answers, stops it. */
async function timedRestore(
  dir: string,
  mode: "lazy" | "eager",
): Promise<{ readyMs: number; firstExitMs: number }> {
  const t = performance.now();
  using vm = await Vm.restore(dir, { mode });
  const readyMs = performance.now() - t;
  const { run, at, shell } = await runToFirstExit(vm);
  try {
    await shellAnswers(shell);
  } finally {
    vm.stop();
    await run.catch(() => {});
  }
  return { readyMs, firstExitMs: at - t };
}

/**
 * denovisor's snapshot figures for `spec`'s guest idle at its shell, lazy and
 * eager, from ONE boot (booting Linux is most of the time under nested
 * emulation), in this process through the `Vm` API: boot it, start dirty-page
 * tracking, snapshot it while running (`saveMs`: pause, write, resume;
 * `bytes`: the directory's allocated blocks), type one shell command and take
 * a diff against it (`diffSaveMs`, `diffBytes`), stop it; then restore the
 * full snapshot once untimed (`restoreColdMs`: the first restore in the
 * process pays for compiling its code), then lazily and eagerly
 * (`restoreReadyMs`: `Vm.restore` alone; `restoreMs`: to the restored guest's
 * first vCPU exit), each restored shell checked; then three lazy clones at once: the anonymous host memory each adds
 * and the pages each dirtied idling at its shell for 3 s (`cloneAnonBytes`,
 * `cloneDirtyPages`, lazy only). `restoreFromStartMs` is not measured (NaN):
 * the restores run in this process. Progress goes to stderr.
 *
 * @param spec The guest ({@link benchGuest}).
 * @returns The figures of each restore mode (save and diff figures shared).
 * @throws {Error} When the guest does not boot or a restored shell does not answer.
 * @example
 * ```ts ignore
 * import { measureDenovisorSnapshots } from "denovisor/bench/_snapshot_compare.ts";
 * const { lazy, eager } = await measureDenovisorSnapshots(spec);
 * ```
 */
export async function measureDenovisorSnapshots(
  spec: BootSpec,
): Promise<{ lazy: SnapshotFigures; eager: SnapshotFigures }> {
  const tmp = await Deno.makeTempDir({ prefix: "dv-snapbench-" });
  const t0 = performance.now();
  const stage = (what: string) =>
    console.error(`  denovisor ${spec.memMiB} MiB: ${what} (at ${ms(performance.now() - t0)})`);
  try {
    const full = `${tmp}/full`;
    const diff = `${tmp}/diff`;
    const saved: SnapshotFigures = {
      memMiB: spec.memMiB,
      saveMs: NaN,
      bytes: NaN,
      restoreFromStartMs: NaN,
      restoreMs: NaN,
    };
    {
      using vm = await Vm.create({ memoryMiB: spec.memMiB, vcpus: spec.cpus, interrupts: true });
      vm.loadLinux({
        kernel: await Deno.readFile(spec.kernel),
        initrd: await Deno.readFile(spec.initrd),
        cmdline: spec.cmdline,
      });
      const shell = new ConsoleDriver(vm);
      const run = shell.watch(vm.run({ timeoutMs: RUN_MS }));
      try {
        await shell.waitFor(GUEST_READY, { timeoutMs: BOOT_MS });
        await shell.waitFor(GUEST_PROMPT, { timeoutMs: BOOT_MS });
        stage("booted to its shell");
        vm.startDirtyLog();
        let t = performance.now();
        vm.snapshot(full, { resume: true });
        saved.saveMs = performance.now() - t;
        saved.bytes = await diskBytes(full);
        stage(`full snapshot: ${ms(saved.saveMs)}, ${mib(saved.bytes)}`);
        shell.send("echo small-change > /dev/shm/x; echo CHANGED''-DONE\n");
        await shell.waitFor("CHANGED-DONE", { timeoutMs: 120_000 });
        t = performance.now();
        vm.snapshot(diff, { diff: true, parent: full, resume: true });
        saved.diffSaveMs = performance.now() - t;
        saved.diffBytes = await diskBytes(diff);
        stage(`diff snapshot: ${ms(saved.diffSaveMs)}, ${mib(saved.diffBytes)}`);
      } finally {
        vm.stop();
        await run.catch(() => {});
      }
    }
    const figures = { lazy: { ...saved }, eager: { ...saved } };
    {
      const t = performance.now();
      (await Vm.restore(full, { mode: "lazy" })).close();
      figures.lazy.restoreColdMs = performance.now() - t;
      stage(`warm-up Vm.restore (lazy, not run): ${ms(figures.lazy.restoreColdMs)}`);
    }
    for (const mode of ["lazy", "eager"] as const) {
      const r = await timedRestore(full, mode);
      figures[mode].restoreReadyMs = r.readyMs;
      figures[mode].restoreMs = r.firstExitMs;
      stage(`${mode} restore: ${ms(r.readyMs)} built, ${ms(r.firstExitMs)} to its first exit`);
    }
    // The diff restores too (its chain: full + diff), and its shell answers.
    {
      using vm = await Vm.restore(diff, { mode: "lazy" });
      const { run, shell } = await runToFirstExit(vm);
      try {
        await shellAnswers(shell);
      } finally {
        vm.stop();
        await run.catch(() => {});
      }
      stage("the diff's chain restored, its shell answers");
    }
    const clones: { vm: Vm; run: Promise<unknown>; shell: ConsoleDriver }[] = [];
    const before = rssAnon();
    try {
      for (let i = 0; i < 3; i++) {
        const vm = await Vm.restore(full, { mode: "lazy" });
        vm.startDirtyLog(); // before its first run: the set starts at the snapshot
        const { run, shell } = await runToFirstExit(vm);
        clones.push({ vm, run, shell });
      }
      for (const c of clones) await shellAnswers(c.shell);
      await new Promise((r) => setTimeout(r, 3000));
      figures.lazy.cloneAnonBytes = (rssAnon() - before) / clones.length;
      figures.lazy.cloneDirtyPages = clones.map((c) => c.vm.takeDirtyPages().pages.length)
        .reduce((a, b) => a + b, 0) / clones.length;
      stage(
        `3 clones: ${mib(figures.lazy.cloneAnonBytes)} anonymous memory and ` +
          `${figures.lazy.cloneDirtyPages.toFixed(0)} dirty pages each`,
      );
    } finally {
      for (const c of clones) {
        c.vm.stop();
        await c.run.catch(() => {});
        c.vm.close();
      }
    }
    return figures;
  } finally {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
  }
}

/**
 * One restore mode's figures of {@link measureDenovisorSnapshots} (which
 * measures both from one boot; prefer it when both are wanted).
 *
 * @param spec The guest ({@link benchGuest}).
 * @param mode Lazy (memory mapped copy-on-write from the file) or eager (copied).
 * @returns The figures.
 * @throws {Error} When the guest does not boot or a restored shell does not answer.
 * @example
 * ```ts ignore
 * import { measureDenovisorSnapshot } from "denovisor/bench/_snapshot_compare.ts";
 * console.log(await measureDenovisorSnapshot(spec, "lazy"));
 * ```
 */
export async function measureDenovisorSnapshot(
  spec: BootSpec,
  mode: "lazy" | "eager",
): Promise<SnapshotFigures> {
  return (await measureDenovisorSnapshots(spec))[mode];
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
 * @throws {Error} When a process, the migration or the shell check fails.
 * @example
 * ```ts ignore
 * import { measureDenovisorMigration } from "denovisor/bench/_snapshot_compare.ts";
 * console.log(await measureDenovisorMigration(spec, { kind: "idle" }));
 * ```
 */
export async function measureDenovisorMigration(
  spec: BootSpec,
  load: GuestLoad,
): Promise<MigrationFigures> {
  const dir = await Deno.makeTempDir({ prefix: "dv-migbench-" });
  const port = freeTcpPort();
  const sock = `${dir}/api.sock`;
  const source = new ConsoleChild([
    "run",
    "--kernel",
    spec.kernel,
    "--initrd",
    spec.initrd,
    "--cmdline",
    spec.cmdline,
    "--mem",
    String(spec.memMiB),
    "--cpus",
    String(spec.cpus),
    "--api-socket",
    sock,
  ]);
  let target: ConsoleChild | undefined;
  try {
    await source.waitFor(GUEST_READY, 600_000);
    await source.waitFor(GUEST_PROMPT, 60_000);
    if (load.kind === "dirty") {
      const mark = source.mark;
      await source.send(
        "head -c 1048576 /dev/urandom > /dev/shm/block; (while :; do i=0; " +
          `while [ $i -lt ${load.workingSetMiB} ]; do dd if=/dev/shm/block of=/dev/shm/dirty ` +
          "bs=1M seek=$i count=1 conv=notrunc 2>/dev/null; i=$((i+1)); done; done) & " +
          "echo DIRTY''-STARTED\n",
      );
      await source.waitFor("DIRTY-STARTED", 60_000, mark);
      await new Promise((r) => setTimeout(r, 1000));
    }
    target = new ConsoleChild(["run", "--incoming", `tcp:127.0.0.1:${port}`]);
    await target.waitForStderr("waiting for a migrating VM", 120_000);
    using client = new ApiClient(sock, { timeoutMs: 1_200_000 });
    const stats = await client.migrate(`tcp:127.0.0.1:${port}`) as MigrationStats;
    const status = await source.exited;
    if (status !== 0) throw new Error(`the source exited ${status} after migrating`);
    const n = 1000 + Math.floor(Math.random() * 9000);
    const mark = target.mark;
    await target.send(`echo ANSWER-$((${n}+1))\n`);
    await target.waitFor(`ANSWER-${n + 1}`, 120_000, mark);
    return {
      memMiB: spec.memMiB,
      totalMs: stats.totalMs,
      downtimeMs: stats.downtimeMs,
      transferredBytes: stats.bytes,
      denovisor: { rounds: stats.rounds, phases: stats.phases, target: stats.target },
    };
  } finally {
    await source.kill();
    await target?.kill();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

function freeTcpPort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** A `main.ts` process whose console (stdout) and stderr are collected, and
 * whose stdin is the guest's console input. */
class ConsoleChild {
  readonly #proc: Deno.ChildProcess;
  readonly #stdin: WritableStreamDefaultWriter<Uint8Array>;
  #out = "";
  #err = "";
  #status: number | undefined;
  readonly exited: Promise<number>;

  constructor(args: string[]) {
    this.#proc = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", new URL("../main.ts", import.meta.url).pathname, ...args],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).spawn();
    this.#stdin = this.#proc.stdin.getWriter();
    const pump = async (stream: ReadableStream<Uint8Array>, add: (t: string) => void) => {
      const decoder = new TextDecoder();
      for await (const chunk of stream) add(decoder.decode(chunk, { stream: true }));
    };
    const pumped = Promise.all([
      pump(this.#proc.stdout, (t) => (this.#out += t)),
      pump(this.#proc.stderr, (t) => (this.#err += t)),
    ]);
    this.exited = this.#proc.status.then(async (s) => {
      this.#status = s.code;
      await pumped;
      return s.code;
    });
  }

  get mark(): number {
    return this.#out.length;
  }

  async send(text: string): Promise<void> {
    await this.#stdin.write(new TextEncoder().encode(text));
  }

  async #wait(where: () => string, text: string, timeoutMs: number, since: number) {
    const until = performance.now() + timeoutMs;
    while (!where().includes(text, since)) {
      if (this.#status !== undefined || performance.now() > until) {
        throw new Error(
          `no "${text}" (exit ${this.#status}); stderr: ${this.#err.slice(-2000)}`,
        );
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  waitFor(text: string, timeoutMs: number, since = 0): Promise<void> {
    return this.#wait(() => this.#out, text, timeoutMs, since);
  }

  waitForStderr(text: string, timeoutMs: number): Promise<void> {
    return this.#wait(() => this.#err, text, timeoutMs, 0);
  }

  async kill(): Promise<void> {
    if (this.#status === undefined) {
      try {
        this.#proc.kill("SIGKILL");
      } catch {
        // exited meanwhile
      }
    }
    await this.exited;
    await this.#stdin.close().catch(() => {});
  }
}

/**
 * One VMM's attempt at a measurement: its figures, or why there are none
 * (`missing`: the side cannot run on this host, `n/a`; the error otherwise).
 */
export type Outcome<T> = { ok: true; value: T } | { ok: false; reason: string; missing: boolean };

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
      missing: false,
    };
  }
}

/**
 * A table cell: the value formatted, `n/a` for a side missing here, `failed`
 * for a measurement that failed.
 *
 * @param outcome The measurement's outcome.
 * @param pick The number shown from its figures.
 * @param format How it is written.
 * @returns The cell's text.
 * @example
 * ```ts
 * import { cell } from "denovisor/bench/_snapshot_compare.ts";
 * console.log(cell({ ok: false, reason: "", missing: true }, (v: number) => v, String)); // "n/a"
 * ```
 */
export function cell<T>(
  outcome: Outcome<T>,
  pick: (value: T) => number,
  format: (v: number) => string,
): string {
  if (!outcome.ok) return outcome.missing ? "n/a" : "failed";
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
