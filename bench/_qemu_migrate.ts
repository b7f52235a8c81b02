/**
 * QEMU's side of the snapshot and migration benches (issue 9, "Performance"):
 * a QEMU guest booted to an idle busybox shell (the same Debian kernel and
 * busybox the Linux benches boot), driven over its serial console and over
 * QMP ({@link QmpClient}), and three measurements of it:
 *
 * - {@link measureQemuSave}: pause, then QMP `migrate` to `exec:cat > FILE`
 *   (QEMU 7.2 has no `file:` URI): time and size of the state file;
 * - {@link measureQemuRestore}: a new QEMU with `-incoming defer`, QMP
 *   `migrate-incoming` from `exec:cat FILE` and `cont`, to the `RESUME` event (the guest
 *   running again; its first instruction is not observable from outside
 *   QEMU), timed from process start and from `migrate-incoming`;
 * - {@link measureQemuLiveMigration}: pre-copy live migration between two
 *   QEMU processes over loopback TCP, idle or with the guest rewriting a
 *   tmpfs file in a loop: total time, downtime, bytes transferred.
 *
 * QEMU's default bandwidth cap for migration (`max-bandwidth`, 128 MiB/s) is
 * lifted for all three ({@link UNLIMITED_BANDWIDTH}): denovisor does not
 * throttle, and neither does a save to a file. The downtime limit stays at
 * QEMU's default (300 ms) unless asked otherwise. Every timestamp is taken from
 * QEMU's own events where one exists (`STOP`, `RESUME`, in the host's real-time
 * clock, the same clock `performance.timeOrigin + performance.now()` reads).
 *
 * @module
 */

import { DenovisorError } from "../src/errors.ts";
import { buildInitramfs } from "../src/linux/initramfs.ts";
import { BOOT_CMDLINE } from "./_boot_compare.ts";
import { type BootSpec, QEMU, qemuArgs, type QemuMachine } from "./_qemu.ts";
import { QmpClient, type QmpEvent } from "./_qmp.ts";

/** What the guest's `/init` prints once its shell is about to start. */
export const GUEST_READY = "QEMU-GUEST-READY";
/** The kernel command line of the migrated guests (the Linux benches' one). */
export const GUEST_CMDLINE = BOOT_CMDLINE;
/** The guest shell's prompt. */
export const GUEST_PROMPT = "qg# ";
/** `max-bandwidth` set for every migration: 1 TiB/s, i.e. no cap. */
export const UNLIMITED_BANDWIDTH = 2 ** 40;
/** How much of a guest's console is kept (characters). */
const CONSOLE_KEEP = 64 * 1024;
/** How often `query-migrate` is polled during a migration. */
const POLL_MS = 5;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
/** The host's real-time clock in milliseconds, with performance.now()'s resolution. */
const wallNow = () => performance.timeOrigin + performance.now();

/**
 * The initramfs of the migrated guest: busybox, `/dev/console`, and an `/init`
 * that mounts /proc, /sys, devtmpfs and a tmpfs on /dev/shm, prints
 * {@link GUEST_READY} (split in two shell words, so only the shell's output
 * matches) and starts a shell with the prompt {@link GUEST_PROMPT} on the
 * console.
 *
 * @param busybox A static busybox executable.
 * @returns A `newc` cpio archive.
 * @example
 * ```ts ignore
 * import { shellInitramfs } from "denovisor/bench/_qemu_migrate.ts";
 * const cpio = shellInitramfs(await Deno.readFile(".cache/kernels/busybox-static"));
 * ```
 */
export function shellInitramfs(busybox: Uint8Array): Uint8Array {
  const init = [
    "#!/bin/busybox sh",
    "/bin/busybox --install -s /bin",
    "mount -t proc proc /proc",
    "mount -t sysfs sys /sys",
    "mount -t devtmpfs dev /dev",
    "mkdir -p /dev/shm && mount -t tmpfs shm /dev/shm",
    `echo ${GUEST_READY.slice(0, 4)}''${GUEST_READY.slice(4)}`,
    `export PS1='${GUEST_PROMPT}'`,
    "exec setsid cttyhack /bin/sh",
  ].join("\n") + "\n";
  return buildInitramfs([
    { path: "dev", kind: "dir" },
    { path: "dev/console", kind: "char", device: [5, 1] },
    { path: "bin", kind: "dir" },
    { path: "bin/busybox", data: busybox },
    { path: "init", data: new TextEncoder().encode(init) },
  ]);
}

/** What {@link QemuGuest.start} runs. */
export interface QemuGuestOptions {
  /** Kernel, initrd (from {@link shellInitramfs}), command line ({@link GUEST_CMDLINE}), RAM, vCPUs. */
  spec: BootSpec;
  /** A directory for the QMP socket (short: a socket path has at most 107 bytes). */
  dir: string;
  /** A name for the socket file and messages. */
  name: string;
  /** The machine type (default `q35`). */
  machine?: QemuMachine;
  /** `-incoming`'s value (`defer`, `tcp:127.0.0.1:PORT`, ...): start paused, waiting for state. */
  incoming?: string;
  /** How long QEMU may take to open its QMP socket (default 60 s). */
  qmpTimeoutMs?: number;
}

/** The console's kept end and the waiters for more of it. */
interface ConsoleState {
  text: string;
  total: number;
  stderr: string;
  waiters: Set<() => void>;
}

/**
 * One QEMU process with KVM: its serial console on stdin/stdout (the end of
 * which is kept, {@link CONSOLE_KEEP} characters) and a QMP session.
 *
 * @example
 * ```ts ignore
 * import { QemuGuest } from "denovisor/bench/_qemu_migrate.ts";
 * await using guest = await QemuGuest.start({ spec, dir: "/tmp/q", name: "src" });
 * await guest.waitForShell(300_000);
 * console.log(await guest.qmp.execute("query-status"));
 * ```
 */
export class QemuGuest implements AsyncDisposable {
  /** The QMP session. */
  readonly qmp: QmpClient;
  /** `performance.now()` just before the process was spawned. */
  readonly startedAt: number;
  /** `performance.now()` when the QMP session was ready. */
  readonly qmpReadyAt: number;
  /** The socket's path. */
  readonly qmpPath: string;
  /** Guest RAM, MiB. */
  readonly memMiB: number;
  readonly #child: Deno.ChildProcess;
  readonly #stdin: WritableStreamDefaultWriter<Uint8Array>;
  readonly #name: string;
  #console: { text: string; total: number; stderr: string; waiters: Set<() => void> };
  #exited: Promise<Deno.CommandStatus>;
  #status: Deno.CommandStatus | undefined;

  private constructor(
    init: {
      child: Deno.ChildProcess;
      qmp: QmpClient;
      startedAt: number;
      qmpReadyAt: number;
      qmpPath: string;
      memMiB: number;
      name: string;
      console: ConsoleState;
      exited: Promise<Deno.CommandStatus>;
    },
  ) {
    this.#child = init.child;
    this.qmp = init.qmp;
    this.startedAt = init.startedAt;
    this.qmpReadyAt = init.qmpReadyAt;
    this.qmpPath = init.qmpPath;
    this.memMiB = init.memMiB;
    this.#name = init.name;
    this.#console = init.console;
    this.#exited = init.exited.then((s) => this.#status = s);
    this.#stdin = init.child.stdin.getWriter();
  }

  /**
   * Spawns QEMU with KVM and connects to its QMP socket.
   *
   * @param options What to run.
   * @returns The running process with its QMP session.
   * @throws {DenovisorError} `TIMEOUT` (the socket never opened) or `GUEST_CRASHED`
   *   (QEMU exited first), with the end of its stderr.
   */
  static async start(options: QemuGuestOptions): Promise<QemuGuest> {
    const qmpPath = `${options.dir}/${options.name}.qmp`;
    const args = [
      ...qemuArgs(options.machine ?? "q35", options.spec),
      "-qmp",
      `unix:${qmpPath},server=on,wait=off`,
      ...(options.incoming ? ["-incoming", options.incoming] : []),
    ];
    const console: ConsoleState = { text: "", total: 0, stderr: "", waiters: new Set() };
    const startedAt = performance.now();
    const child = new Deno.Command(QEMU, {
      args,
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const notify = () => {
      const waiters = [...console.waiters];
      console.waiters.clear();
      for (const w of waiters) w();
    };
    (async () => {
      for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
        console.text = (console.text + chunk).slice(-CONSOLE_KEEP);
        console.total += chunk.length;
        notify();
      }
    })().catch(() => {});
    (async () => {
      for await (const chunk of child.stderr.pipeThrough(new TextDecoderStream())) {
        console.stderr = (console.stderr + chunk).slice(-4096);
      }
    })().catch(() => {});
    const exited = child.status.then((s) => {
      notify();
      return s;
    });
    let qmp: QmpClient;
    try {
      const connecting = QmpClient.connect(qmpPath, { timeoutMs: options.qmpTimeoutMs ?? 60_000 });
      const first = await Promise.race([connecting, exited]);
      if (!(first instanceof QmpClient)) {
        connecting.then((c) => c.close(), () => {});
        await sleep(100); // the end of stderr
        throw new DenovisorError(
          "GUEST_CRASHED",
          `${options.name}: QEMU exited (${first.code}) before its QMP socket opened: ${console.stderr}`,
        );
      }
      qmp = first;
    } catch (e) {
      try {
        child.kill("SIGKILL");
      } catch {
        // It exited.
      }
      await exited;
      if (e instanceof DenovisorError && e.code === "TIMEOUT") {
        throw new DenovisorError(
          "TIMEOUT",
          `${options.name}: ${e.message}; stderr: ${console.stderr}`,
        );
      }
      throw e;
    }
    return new QemuGuest({
      child,
      qmp,
      startedAt,
      qmpReadyAt: performance.now(),
      qmpPath,
      memMiB: options.spec.memMiB,
      name: options.name,
      console,
      exited,
    });
  }

  /** The process id. */
  get pid(): number {
    return this.#child.pid;
  }

  /** How many console characters have been read so far (a mark for {@link waitForConsole}). */
  get consoleMark(): number {
    return this.#console.total;
  }

  /** The end of QEMU's stderr. */
  get stderr(): string {
    return this.#console.stderr;
  }

  /** The end of the console. */
  get console(): string {
    return this.#console.text;
  }

  /**
   * Waits for text on the console after `since` (a {@link consoleMark}).
   *
   * @param pattern A string or a regular expression.
   * @param timeoutMs How long to wait.
   * @param since Only output after this mark counts (default: all that is kept).
   * @throws {DenovisorError} `GUEST_UNRESPONSIVE` on timeout, `GUEST_STOPPED`
   *   when QEMU exits first, quoting the console's end.
   */
  async waitForConsole(pattern: string | RegExp, timeoutMs: number, since = 0): Promise<void> {
    const deadline = performance.now() + timeoutMs;
    const c = this.#console;
    for (;;) {
      const start = Math.max(0, c.text.length - (c.total - since));
      const seen = c.text.slice(start);
      if (typeof pattern === "string" ? seen.includes(pattern) : pattern.test(seen)) return;
      const quote = () => `; console ends with:\n${c.text.slice(-1500)}\nstderr: ${c.stderr}`;
      if (this.#status) {
        throw new DenovisorError(
          "GUEST_STOPPED",
          `${this.#name}: QEMU exited (${this.#status.code}) before ${pattern}${quote()}`,
        );
      }
      const left = deadline - performance.now();
      if (left <= 0) {
        throw new DenovisorError("GUEST_UNRESPONSIVE", `${this.#name}: no ${pattern}${quote()}`);
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, left);
        function done() {
          clearTimeout(timer);
          resolve();
        }
        c.waiters.add(done);
      });
    }
  }

  /** Types `text` on the serial console. */
  async send(text: string): Promise<void> {
    await this.#stdin.write(new TextEncoder().encode(text));
  }

  /**
   * Waits for the guest's shell after a boot: the ready line, then the prompt.
   *
   * @param timeoutMs How long the boot may take.
   */
  async waitForShell(timeoutMs: number): Promise<void> {
    await this.waitForConsole(GUEST_READY, timeoutMs);
    await this.waitForConsole(GUEST_PROMPT, timeoutMs);
  }

  /**
   * Whether the guest's shell answers: types `echo` of a computed value and
   * waits for the result (which the typed line itself does not contain).
   *
   * @param timeoutMs How long to wait for the answer.
   * @throws {DenovisorError} `GUEST_UNRESPONSIVE` or `GUEST_STOPPED`.
   */
  async checkShellAnswers(timeoutMs: number): Promise<void> {
    const mark = this.consoleMark;
    const n = 1000 + Math.floor(Math.random() * 9000);
    await this.send(`echo ANSWER-$((${n}+1))\n`);
    await this.waitForConsole(`ANSWER-${n + 1}`, timeoutMs, mark);
  }

  /** QMP `query-status`'s `status` (`running`, `paused`, `inmigrate`, `postmigrate`, ...). */
  async status(): Promise<string> {
    const s = await this.qmp.execute<{ status: string }>("query-status");
    return s.status;
  }

  /** Kills QEMU (SIGKILL) and waits for its end. */
  async kill(): Promise<void> {
    this.qmp.close();
    if (!this.#status) {
      try {
        this.#child.kill("SIGKILL");
      } catch {
        // It exited meanwhile.
      }
    }
    await this.#exited;
    try {
      await this.#stdin.close();
    } catch {
      // The pipe is broken: QEMU is gone.
    }
  }

  /** Same as {@link kill}. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.kill();
  }
}

/** `query-migrate`'s answer, the fields used here. */
export interface MigrateInfo {
  /** `setup`, `active`, `device`, `completed`, `failed`, `cancelled`, ... */
  status: string;
  /** Milliseconds from `migrate` to completion (QEMU's own timing). */
  "total-time"?: number;
  /** Milliseconds the guest was stopped, as the source measures it (up to its last byte sent). */
  downtime?: number;
  /** Milliseconds of setup before the first byte. */
  "setup-time"?: number;
  /** RAM statistics. */
  ram?: {
    transferred: number;
    total: number;
    duplicate: number;
    normal: number;
    "dirty-sync-count": number;
    "dirty-pages-rate": number;
    mbps: number;
  };
  /** Why it failed. */
  "error-desc"?: string;
}

/**
 * Polls `query-migrate` until the migration leaves its active states.
 *
 * @param qmp The source's QMP session.
 * @param timeoutMs How long it may take; then it is cancelled.
 * @param onPoll Called with every answer (to follow the dirty rate).
 * @returns The final answer, with status `completed`.
 * @throws {DenovisorError} `TIMEOUT` (after `migrate_cancel`), `DEVICE` when it failed.
 */
export async function waitMigration(
  qmp: QmpClient,
  timeoutMs: number,
  onPoll?: (info: MigrateInfo) => void,
): Promise<MigrateInfo> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const info = await qmp.execute<MigrateInfo>("query-migrate");
    onPoll?.(info);
    if (info.status === "completed") return info;
    if (info.status === "failed" || info.status === "cancelled") {
      throw new DenovisorError("DEVICE", `migration ${info.status}: ${info["error-desc"] ?? ""}`);
    }
    if (performance.now() > deadline) {
      await qmp.execute("migrate_cancel").catch(() => {});
      throw new DenovisorError(
        "TIMEOUT",
        `migration not done in ${timeoutMs} ms: ${JSON.stringify(info)}`,
      );
    }
    await sleep(POLL_MS);
  }
}

/** Sets migration parameters on a QMP session (`migrate-set-parameters`). */
async function setParameters(qmp: QmpClient, params: Record<string, unknown>): Promise<void> {
  await qmp.execute("migrate-set-parameters", params);
}

/** Quotes a path for the shell QEMU runs an `exec:` URI with. */
function shellQuote(path: string): string {
  return `'${path.replaceAll("'", `'\\''`)}'`;
}

/** A guest's state saved to a file. */
export interface SaveMeasurement {
  /** Guest RAM, MiB. */
  memMiB: number;
  /** Milliseconds from `stop` being sent to the migration's completion (wall clock). */
  wallMs: number;
  /** QEMU's `total-time` of the migration to the file. */
  qemuTotalMs: number;
  /** The state file's size in bytes. */
  bytes: number;
  /** Bytes of RAM QEMU wrote (zero pages take a few bytes each). */
  ramTransferredBytes: number;
  /** The file. */
  file: string;
}

/**
 * Saves a running guest's whole state to `file`: `stop`, then `migrate` to
 * `exec:cat > FILE`, as a non-live snapshot (the guest stays paused, as
 * denovisor's snapshot of a paused VM).
 *
 * @param guest A guest at its shell.
 * @param file Where to write (a temporary directory: tmpfs in kvmbox).
 * @param timeoutMs How long the save may take.
 * @returns Time and size.
 * @throws {DenovisorError} As {@link waitMigration}, or `IO` when the file stays empty.
 */
export async function measureQemuSave(
  guest: QemuGuest,
  file: string,
  timeoutMs = 600_000,
): Promise<SaveMeasurement> {
  const qmp = guest.qmp;
  await setParameters(qmp, { "max-bandwidth": UNLIMITED_BANDWIDTH });
  const t0 = performance.now();
  await qmp.execute("stop");
  await qmp.execute("migrate", { uri: `exec:cat > ${shellQuote(file)}` });
  const info = await waitMigration(qmp, timeoutMs);
  const wallMs = performance.now() - t0;
  // QEMU closes its end when it completes; `cat` may still be writing its
  // last pipe buffer: wait until the size holds still.
  let bytes = -1;
  for (let i = 0; i < 200; i++) {
    const size = (await Deno.stat(file)).size;
    if (size === bytes && size > 0) break;
    bytes = size;
    await sleep(10);
  }
  if (bytes <= 0) throw new DenovisorError("IO", `the state file ${file} is empty`);
  return {
    memMiB: guest.memMiB,
    wallMs,
    qemuTotalMs: info["total-time"] ?? NaN,
    bytes,
    ramTransferredBytes: info.ram?.transferred ?? NaN,
    file,
  };
}

/** A guest restored from a state file. */
export interface RestoreMeasurement {
  /** Milliseconds from spawning QEMU to its QMP session being ready. */
  qmpReadyMs: number;
  /** Milliseconds from spawning QEMU to the guest running (QEMU's `RESUME` event). */
  fromStartMs: number;
  /** Milliseconds from sending `migrate-incoming` to the guest running. */
  fromIncomingMs: number;
}

/**
 * Restores a saved guest in a new QEMU: `-incoming defer`, QMP
 * `migrate-incoming` from `exec:cat FILE`, then `cont` once the state is in
 * (the state of a paused guest restores paused), until the `RESUME` event.
 * The guest is left running.
 *
 * @param options The new QEMU (the same spec as the saved one's), without `incoming`.
 * @param file The state file of {@link measureQemuSave}.
 * @param timeoutMs How long the restore may take.
 * @returns The timings and the running guest (dispose it).
 */
export async function measureQemuRestore(
  options: QemuGuestOptions,
  file: string,
  timeoutMs = 600_000,
): Promise<{ measurement: RestoreMeasurement; guest: QemuGuest }> {
  const guest = await QemuGuest.start({ ...options, incoming: "defer" });
  try {
    const startedWall = performance.timeOrigin + guest.startedAt;
    const incomingWall = wallNow();
    await guest.qmp.execute("migrate-incoming", { uri: `exec:cat ${shellQuote(file)}` });
    const deadline = performance.now() + timeoutMs;
    let resume: QmpEvent | undefined;
    while (!resume) {
      resume = guest.qmp.events.find((e) => e.event === "RESUME");
      if (resume) break;
      const info = await guest.qmp.execute<MigrateInfo>("query-migrate");
      const status = await guest.status();
      if (info.status === "completed" && status === "paused") {
        // The state was saved from a paused guest, and QEMU restores that:
        // it starts the guest only when told to.
        await guest.qmp.execute("cont");
        continue;
      }
      if (info.status === "failed" || !["inmigrate", "running", "paused"].includes(status)) {
        throw new DenovisorError(
          "GUEST_STOPPED",
          `restore: QEMU is ${status}, migration ${JSON.stringify(info)}; stderr: ${guest.stderr}`,
        );
      }
      if (performance.now() > deadline) {
        throw new DenovisorError(
          "TIMEOUT",
          `restore: still ${status} after ${timeoutMs} ms, migration ${JSON.stringify(info)}; ` +
            `stderr: ${guest.stderr}`,
        );
      }
      await sleep(POLL_MS);
    }
    return {
      measurement: {
        qmpReadyMs: guest.qmpReadyAt - guest.startedAt,
        fromStartMs: resume.timestampMs - startedWall,
        fromIncomingMs: resume.timestampMs - incomingWall,
      },
      guest,
    };
  } catch (e) {
    await guest.kill();
    throw e;
  }
}

/** What a guest does while it migrates. */
export interface DirtyLoad {
  /** The size of the tmpfs file the guest rewrites in an endless loop (1 MiB of random bytes
   * at a time, with `dd`), MiB. */
  workingSetMiB: number;
}

/** Options of {@link measureQemuLiveMigration}. */
export interface LiveMigrationOptions {
  /** The guests (kernel, initrd, RAM, vCPUs). */
  spec: BootSpec;
  /** A directory for the QMP sockets. */
  dir: string;
  /** Make the guest dirty memory while it migrates (default: idle at its shell). */
  dirty?: DirtyLoad;
  /** QEMU's `downtime-limit` in ms (default: QEMU's own, 300). */
  downtimeLimitMs?: number;
  /** How long the boot may take. */
  bootTimeoutMs?: number;
  /** How long the migration may take before it is cancelled. */
  migrateTimeoutMs?: number;
}

/** A live migration between two QEMU processes. */
export interface MigrationMeasurement {
  /** Guest RAM, MiB. */
  memMiB: number;
  /** What the guest did: `idle`, or the dirtying loop. */
  load: string;
  /** QEMU's `total-time`: `migrate` to completion, ms. */
  totalMs: number;
  /** QEMU's `downtime` (the source's view: stop to its last byte sent), ms. */
  downtimeMs: number;
  /** The guest's real pause: the source's `STOP` event to the target's `RESUME`, ms. */
  stopToResumeMs: number;
  /** Setup before the first byte, ms. */
  setupMs: number;
  /** RAM bytes sent. */
  transferredBytes: number;
  /** RAM bytes sent after the first pass over all of RAM: the pages dirtied meanwhile
   * (as polled, up to {@link POLL_MS} late; NaN when the migration ended within one poll). */
  resentBytes: number;
  /** Dirty-page synchronisations (pre-copy rounds + 1). */
  rounds: number;
  /** The highest dirty-page rate QEMU reported during the migration, pages/s. */
  maxDirtyPagesPerSec: number;
  /** The downtime limit in force, ms. */
  downtimeLimitMs: number;
}

function freeTcpPort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/**
 * Boots a guest to its shell in one QEMU, optionally starts a loop in it that
 * rewrites a tmpfs file, migrates it live to a second QEMU listening on
 * loopback TCP, and checks that the target runs and its shell answers.
 *
 * @param options The guest, the load, the limits.
 * @returns QEMU's figures and the real stop-to-resume time.
 * @throws {DenovisorError} When a boot, the migration or the check fails.
 */
export async function measureQemuLiveMigration(
  options: LiveMigrationOptions,
): Promise<MigrationMeasurement> {
  const bootTimeoutMs = options.bootTimeoutMs ?? 600_000;
  await using source = await QemuGuest.start({ spec: options.spec, dir: options.dir, name: "src" });
  await source.waitForShell(bootTimeoutMs);
  let load = "idle";
  if (options.dirty) {
    const mib = options.dirty.workingSetMiB;
    load = `rewriting a ${mib} MiB tmpfs file`;
    const mark = source.consoleMark;
    // Random bytes, not zeros: QEMU sends a zero page as a flag of a few bytes.
    await source.send(
      "head -c 1048576 /dev/urandom > /dev/shm/block; (while :; do i=0; " +
        `while [ $i -lt ${mib} ]; do dd if=/dev/shm/block of=/dev/shm/dirty bs=1M seek=$i ` +
        "count=1 conv=notrunc 2>/dev/null; i=$((i+1)); done; done) & echo DIRTY''-STARTED\n",
    );
    await source.waitForConsole("DIRTY-STARTED", 60_000, mark);
    await sleep(1000); // the loop is rewriting by now
  }
  const port = freeTcpPort();
  await using target = await QemuGuest.start({
    spec: options.spec,
    dir: options.dir,
    name: "dst",
    incoming: `tcp:127.0.0.1:${port}`,
  });
  const params: Record<string, unknown> = { "max-bandwidth": UNLIMITED_BANDWIDTH };
  if (options.downtimeLimitMs !== undefined) params["downtime-limit"] = options.downtimeLimitMs;
  await setParameters(source.qmp, params);
  const { "downtime-limit": downtimeLimitMs } = await source.qmp.execute<
    { "downtime-limit": number }
  >("query-migrate-parameters");
  let maxDirty = 0;
  let firstPassBytes: number | undefined;
  await source.qmp.execute("migrate", { uri: `tcp:127.0.0.1:${port}` });
  const info = await waitMigration(source.qmp, options.migrateTimeoutMs ?? 600_000, (i) => {
    maxDirty = Math.max(maxDirty, i.ram?.["dirty-pages-rate"] ?? 0);
    // The second synchronisation ends the first pass over all of RAM.
    if (firstPassBytes === undefined && (i.ram?.["dirty-sync-count"] ?? 0) >= 2) {
      firstPassBytes = i.ram?.transferred;
    }
  });
  const stop = await source.qmp.waitEvent("STOP", { timeoutMs: 10_000 });
  const resume = await target.qmp.waitEvent("RESUME", { timeoutMs: 60_000 });
  const status = await target.status();
  if (status !== "running") {
    throw new DenovisorError("GUEST_STOPPED", `migrated guest is ${status}, not running`);
  }
  await target.checkShellAnswers(120_000);
  return {
    memMiB: options.spec.memMiB,
    load,
    totalMs: info["total-time"] ?? NaN,
    downtimeMs: info.downtime ?? NaN,
    stopToResumeMs: resume.timestampMs - stop.timestampMs,
    setupMs: info["setup-time"] ?? NaN,
    transferredBytes: info.ram?.transferred ?? NaN,
    resentBytes: (info.ram?.transferred ?? NaN) - (firstPassBytes ?? NaN),
    rounds: info.ram?.["dirty-sync-count"] ?? NaN,
    maxDirtyPagesPerSec: maxDirty,
    downtimeLimitMs,
  };
}

/** Options of {@link measureQemuSnapshot}. */
export interface SnapshotRoundOptions {
  /** The guest (kernel, initrd, RAM, vCPUs). */
  spec: BootSpec;
  /** A directory for the sockets and the state file. */
  dir: string;
  /** How long the boot may take. */
  bootTimeoutMs?: number;
}

/** A save and a restore of the same guest. */
export interface SnapshotMeasurement {
  /** The save. */
  save: SaveMeasurement;
  /** The restore. */
  restore: RestoreMeasurement;
}

/**
 * Boots a guest to its shell, saves it ({@link measureQemuSave}), restores it
 * in a new QEMU ({@link measureQemuRestore}), checks the restored shell
 * answers, and removes the state file.
 *
 * @param options The guest and where to put its files.
 * @returns Both measurements.
 * @example
 * ```ts ignore
 * import { measureQemuSnapshot } from "denovisor/bench/_qemu_migrate.ts";
 * const m = await measureQemuSnapshot({ spec, dir: await Deno.makeTempDir() });
 * console.log(m.save.bytes, m.restore.fromIncomingMs);
 * ```
 */
export async function measureQemuSnapshot(
  options: SnapshotRoundOptions,
): Promise<SnapshotMeasurement> {
  const file = `${options.dir}/qemu-state.bin`;
  try {
    let save: SaveMeasurement;
    {
      await using source = await QemuGuest.start({
        spec: options.spec,
        dir: options.dir,
        name: "save",
      });
      await source.waitForShell(options.bootTimeoutMs ?? 600_000);
      save = await measureQemuSave(source, file);
    }
    const { measurement, guest } = await measureQemuRestore(
      { spec: options.spec, dir: options.dir, name: "restore" },
      file,
    );
    await using _restored = guest;
    await guest.checkShellAnswers(120_000);
    return { save, restore: measurement };
  } finally {
    await Deno.remove(file).catch(() => {});
  }
}
