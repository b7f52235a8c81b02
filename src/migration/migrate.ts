/**
 * Live migration between two denovisor processes, pre-copy over a socket
 * (TCP or a Unix socket), on the framing of `wire.ts`:
 *
 * 1. source → `hello` `{ version, config, memoryBytes, host }`: the VM's
 *    `config` section as `Vm.snapshot` stores it and the snapshot `host`
 *    section; the target checks the host and builds the VM (anonymous RAM)
 *    before any memory moves, and answers `ready` or `abort { message }`.
 * 2. source: dirty log on, every non-zero page (round 0), then rounds of the
 *    pages dirtied meanwhile until a round is small (`thresholdPages`, or an
 *    estimated downtime under `downtimeMs` at the bandwidth measured so far)
 *    or `maxRounds` is reached. Pages go as `pages` frames the core packs
 *    (`[u64 index][4096 bytes]...`) and the target's core unpacks, checking
 *    every index against its RAM.
 * 3. source pauses the VM (vCPUs and devices), sends the last dirty pages and
 *    a `state` frame (the snapshot sections without a memory file); the
 *    target verifies it whole, applies it and answers `running`; the source
 *    then stops its VM.
 *
 * Anything else — the target refuses, dies, the connection is cut or a frame
 * is corrupt, a read times out — leaves the source VM running (dirty log off,
 * resumed) and the target without a VM (its listener closed).
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";
import { Kvm } from "../kvm/kvm.ts";
import { Vm } from "../vm.ts";
import { type MigrationAddress, parseMigrationAddress } from "../api/address.ts";
import { encodeFrame, type Frame, FrameReader, jsonFrame, jsonOf, writeAll } from "./wire.ts";

/** The protocol version `hello` carries. */
export const MIGRATION_PROTOCOL_VERSION = 1;

const PAGE_BYTES = 4096;
const RECORD_BYTES = 8 + PAGE_BYTES;

/** How a source migrates ({@link migrateVm}). */
export interface MigrateOptions {
  /** Stop pre-copying once a round has at most this many dirty pages (default 64). */
  thresholdPages?: number;
  /** Or once the last round's pages would move in at most this many ms at the
   * bandwidth measured so far (default 10). */
  downtimeMs?: number;
  /** Stop pre-copying after this many rounds after round 0, however large (default 30). */
  maxRounds?: number;
  /** Every read from the peer and the connection itself time out after this (default 30000). */
  timeoutMs?: number;
  /** Bytes of pages per frame (default 4 MiB). */
  batchBytes?: number;
}

/** One pre-copy round (round 0: every non-zero page; the last: after the pause). */
export interface MigrationRound {
  /** 0, 1, ... */
  round: number;
  /** Pages sent. */
  pages: number;
  /** Bytes sent (frames included). */
  bytes: number;
  /** Milliseconds it took. */
  ms: number;
}

/** What a migration did ({@link migrateVm}). */
export interface MigrationStats {
  /** Every round, the stop-and-copy one last. */
  rounds: MigrationRound[];
  /** From connecting to the target's `running`, ms. */
  totalMs: number;
  /** From pausing the VM to the target's `running`, ms. */
  downtimeMs: number;
  /** Bytes sent in all. */
  bytes: number;
  /** Pages sent in all. */
  pages: number;
}

/** How a target receives ({@link receiveMigration}). */
export interface ReceiveOptions {
  /** Every read from the source times out after this (default 30000). */
  timeoutMs?: number;
  /** Waiting for the source to connect times out after this (default 0: never). */
  acceptTimeoutMs?: number;
  /** Where the guest's console goes here (default: the source's setting). */
  console?: "capture" | "stdout";
  /** Called once the listener is open, with its address (a TCP port 0 resolved). */
  onListening?: (address: string) => void;
}

function failure(message: string): DenovisorError {
  return new DenovisorError("MIGRATION", message);
}

function asAddress(to: string | MigrationAddress): MigrationAddress {
  return typeof to === "string" ? parseMigrationAddress(to) : to;
}

/** Awaits `p` for at most `ms` (0: forever); on timeout runs `onTimeout` and throws. */
async function timed<T>(
  p: Promise<T>,
  ms: number,
  what: string,
  onTimeout: () => void,
): Promise<T> {
  if (ms <= 0) return await p;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      onTimeout();
      reject(failure(`timed out after ${ms} ms ${what}`));
    }, ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function closeQuietly(c: { close(): void } | undefined): void {
  try {
    c?.close();
  } catch {
    // already closed
  }
}

function positive(value: number | undefined, fallback: number, name: string): number {
  const v = value ?? fallback;
  if (!Number.isFinite(v) || v < 0) {
    throw new DenovisorError("INVALID_ARGUMENT", `${name} must be a non-negative number, got ${v}`);
  }
  return v;
}

/** A bitmap with every page of RAM set (64-bit little-endian words). */
function allPages(memoryBytes: number): Uint8Array {
  const pages = Math.floor(memoryBytes / PAGE_BYTES);
  const bitmap = new Uint8Array(Math.ceil(pages / 64) * 8);
  bitmap.fill(0xff, 0, Math.floor(pages / 8));
  for (let i = Math.floor(pages / 8) * 8; i < pages; i++) bitmap[i >> 3] |= 1 << (i & 7);
  return bitmap;
}

function countPages(bitmap: Uint8Array): number {
  let n = 0;
  for (const byte of bitmap) {
    let b = byte;
    while (b) {
      b &= b - 1;
      n++;
    }
  }
  return n;
}

/**
 * Migrates a VM live to a target waiting in {@link receiveMigration} (another
 * process's `main.ts run --incoming ADDRESS`). Resolves once the target runs
 * the guest; the VM here is then stopped (its `run()` resolves). On any
 * failure the VM here keeps running (dirty log off, resumed) and this
 * rejects with `MIGRATION` saying why.
 *
 * @example
 * ```ts ignore
 * import { Vm } from "denovisor";
 * import { migrateVm } from "denovisor/src/migration/migrate.ts";
 * const running = vm.run();
 * const stats = await migrateVm(vm, "tcp:127.0.0.1:4444");
 * console.log(stats.downtimeMs, stats.rounds.length);
 * await running; // stopped: the guest goes on over there
 * ```
 *
 * @param vm The VM (running, paused or loaded and not yet run).
 * @param to `tcp:HOST:PORT` or `unix:PATH`.
 * @param options Convergence and timeouts.
 * @returns Per-round figures, total time and downtime.
 * @throws {DenovisorError} `MIGRATION` when the target refuses, the stream
 *   fails or a read times out; `INVALID_ARGUMENT` for a bad address.
 */
export async function migrateVm(
  vm: Vm,
  to: string | MigrationAddress,
  options: MigrateOptions = {},
): Promise<MigrationStats> {
  const address = asAddress(to);
  const thresholdPages = positive(options.thresholdPages, 64, "thresholdPages");
  const downtimeMs = positive(options.downtimeMs, 10, "downtimeMs");
  const maxRounds = positive(options.maxRounds, 30, "maxRounds");
  const timeoutMs = positive(options.timeoutMs, 30_000, "timeoutMs");
  const batchBytes = Math.max(
    RECORD_BYTES,
    Math.floor(positive(options.batchBytes, 4 << 20, "batchBytes") / RECORD_BYTES) * RECORD_BYTES,
  );
  const started = performance.now();
  const wasPaused = vm.state === "paused";
  let conn: Deno.Conn | undefined;
  let logging = false;
  let pausedHere = false;
  const rounds: MigrationRound[] = [];
  let totalBytes = 0;
  let totalPages = 0;
  try {
    const connecting: Promise<Deno.Conn> = address.transport === "tcp"
      ? Deno.connect({ hostname: address.hostname, port: address.port })
      : Deno.connect({ transport: "unix", path: address.path });
    conn = await timed(
      connecting.catch((e) => {
        throw failure(`cannot connect to the target: ${(e as Error).message}`);
      }),
      timeoutMs,
      "connecting to the target",
      () => {},
    );
    const c = conn;
    const reader = new FrameReader(c);
    const read = (what: string, ...kinds: Parameters<FrameReader["expect"]>) =>
      timed(reader.expect(...kinds), timeoutMs, `waiting for ${what}`, () => closeQuietly(c));
    const send = async (bytes: Uint8Array) => {
      await writeAll(c, bytes).catch((e) => {
        throw failure(`the connection to the target failed: ${(e as Error).message}`);
      });
      totalBytes += bytes.length;
    };

    // The host section needs the vCPUs' CPUID: a brief pause to read it.
    if (!wasPaused) vm.pause();
    let host: unknown;
    try {
      host = vm.kvm.migrationHost();
    } finally {
      if (!wasPaused) vm.resume();
    }
    await send(jsonFrame("hello", {
      version: MIGRATION_PROTOCOL_VERSION,
      config: JSON.parse(vm.migrationConfig()),
      memoryBytes: vm.memoryBytes,
      host,
    }));
    await read("the target to build the VM", "ready");

    const buffer = new Uint8Array(batchBytes);
    let bandwidth = 0; // bytes per ms, measured
    const sendPages = async (round: number, bitmap: Uint8Array, skipZero: boolean) => {
      const t0 = performance.now();
      const before = totalBytes;
      let pages = 0;
      let from = 0;
      const total = vm.memoryBytes / PAGE_BYTES;
      while (from < total) {
        const { length, next } = vm.kvm.packPages(bitmap, from, skipZero, buffer);
        if (length > 0) {
          await send(encodeFrame("pages", buffer.subarray(0, length)));
          pages += length / RECORD_BYTES;
        }
        from = next;
      }
      const ms = performance.now() - t0;
      const bytes = totalBytes - before;
      if (bytes > 64 * RECORD_BYTES && ms > 0) bandwidth = bytes / ms;
      rounds.push({ round, pages, bytes, ms });
      totalPages += pages;
    };

    vm.startDirtyLog();
    logging = true;
    await sendPages(0, allPages(vm.memoryBytes), true);
    let pending = vm.takeDirtyPages().bitmap;
    for (let round = 1; round <= maxRounds; round++) {
      const dirty = countPages(pending);
      const estimateMs = bandwidth > 0 ? (dirty * RECORD_BYTES) / bandwidth : Infinity;
      if (dirty <= thresholdPages || estimateMs <= downtimeMs) break;
      await sendPages(round, pending, false);
      pending = vm.takeDirtyPages().bitmap;
    }

    // Stop and copy.
    const pausedAt = performance.now();
    if (!wasPaused) {
      vm.pause();
      pausedHere = true;
    }
    // A guest that ended meanwhile has nothing to continue over there.
    if (vm.state === "stopped") throw failure("the VM's run ended during the migration");
    const last = vm.takeDirtyPages().bitmap;
    for (let i = 0; i < last.length; i++) last[i] |= pending[i];
    await sendPages(rounds.length, last, false);
    const state = vm.kvm.migrationState(vm.migrationConfig());
    await send(encodeFrame("state", state));
    await read("the target to run the VM", "running");
    const downtime = performance.now() - pausedAt;
    logging = false;
    try {
      vm.stopDirtyLog();
    } catch {
      // the VM stops anyway
    }
    vm.stop();
    closeQuietly(conn);
    return {
      rounds,
      totalMs: performance.now() - started,
      downtimeMs: downtime,
      bytes: totalBytes,
      pages: totalPages,
    };
  } catch (e) {
    const message = (e as Error).message;
    if (conn) {
      // Best effort: the target may be gone.
      await timed(
        writeAll(conn, jsonFrame("abort", { message })).catch(() => {}),
        1000,
        "sending abort",
        () => {},
      ).catch(() => {});
      closeQuietly(conn);
    }
    if (logging) {
      try {
        vm.stopDirtyLog();
      } catch {
        // tracking may not have started
      }
    }
    if (pausedHere) vm.resume();
    if (e instanceof DenovisorError && e.code === "MIGRATION") throw e;
    throw failure(`migration failed, the VM runs on here: ${message}`);
  }
}

function listenOn(address: MigrationAddress): Deno.Listener {
  if (address.transport === "tcp") {
    return Deno.listen({ hostname: address.hostname, port: address.port });
  }
  return Deno.listen({ transport: "unix", path: address.path });
}

function listenerAddress(listener: Deno.Listener, address: MigrationAddress): string {
  const a = listener.addr;
  if (a.transport === "tcp") {
    const host = a.hostname.includes(":") ? `[${a.hostname}]` : a.hostname;
    return `tcp:${host}:${a.port}`;
  }
  return address.transport === "unix" ? `unix:${address.path}` : String(a.transport);
}

/**
 * Waits on `listen` for one migrating VM (from {@link migrateVm} in another
 * process), builds it, takes its pages and state and resolves it ready to
 * {@link Vm.run}: the guest continues where the source paused it. The
 * listener is closed once the source has connected. On any failure (a host
 * or configuration this side refuses — then the source is told why —, a cut,
 * corrupt or silent stream) no VM is left and this rejects with `MIGRATION`.
 *
 * @example
 * ```ts ignore
 * import { receiveMigration } from "denovisor/src/migration/migrate.ts";
 * using vm = await receiveMigration("tcp:127.0.0.1:4444");
 * const result = await vm.run();
 * ```
 *
 * @param listen `tcp:HOST:PORT` or `unix:PATH`.
 * @param options Timeouts, the console, a callback once listening.
 * @returns The migrated VM.
 * @throws {DenovisorError} `MIGRATION` naming what failed.
 */
export async function receiveMigration(
  listen: string | MigrationAddress,
  options: ReceiveOptions = {},
): Promise<Vm> {
  const address = asAddress(listen);
  const timeoutMs = positive(options.timeoutMs, 30_000, "timeoutMs");
  const acceptTimeoutMs = positive(options.acceptTimeoutMs, 0, "acceptTimeoutMs");
  let listener: Deno.Listener | undefined;
  let conn: Deno.Conn | undefined;
  let vm: Vm | undefined;
  // KVM and the core are loaded before listening: the source's clock runs from
  // its hello, not from this process's start-up.
  const kvm = await Kvm.open();
  try {
    try {
      listener = listenOn(address);
    } catch (e) {
      throw failure(`cannot listen on ${listen}: ${(e as Error).message}`);
    }
    options.onListening?.(listenerAddress(listener, address));
    const l = listener;
    conn = await timed(
      l.accept(),
      acceptTimeoutMs,
      "waiting for the source",
      () => closeQuietly(l),
    );
    closeQuietly(listener);
    if (address.transport === "unix") await Deno.remove(address.path).catch(() => {});
    listener = undefined;
    const c = conn;
    const reader = new FrameReader(c);
    const read = (what: string, ...kinds: Parameters<FrameReader["expect"]>): Promise<Frame> =>
      timed(reader.expect(...kinds), timeoutMs, `waiting for ${what}`, () => closeQuietly(c));

    const hello = jsonOf(await read("the source's hello", "hello"));
    if (hello.version !== MIGRATION_PROTOCOL_VERSION) {
      throw refusal(
        `protocol version ${
          JSON.stringify(hello.version)
        }; this denovisor speaks ${MIGRATION_PROTOCOL_VERSION}`,
      );
    }
    try {
      kvm.checkHost(JSON.stringify(hello.host ?? null));
    } catch (e) {
      throw refusal(`this host cannot run the VM: ${(e as Error).message}`);
    }
    try {
      vm = await Vm.incoming(hello.config, { console: options.console });
    } catch (e) {
      throw refusal(`cannot build the VM: ${(e as Error).message}`);
    }
    if (vm.memoryBytes !== hello.memoryBytes) {
      throw refusal(
        `the config has ${vm.memoryBytes} bytes of RAM, the hello ${
          JSON.stringify(hello.memoryBytes)
        }`,
      );
    }
    await writeAll(c, jsonFrame("ready", {}));
    for (;;) {
      const frame = await read("pages or the state", "pages", "state");
      if (frame.kind === "pages") {
        try {
          vm.kvm.unpackPages(frame.payload);
        } catch (e) {
          throw refusal(`a pages frame was refused: ${(e as Error).message}`);
        }
        continue;
      }
      try {
        vm.applyMigrationState(frame.payload);
      } catch (e) {
        throw refusal(`the state was refused: ${(e as Error).message}`);
      }
      break;
    }
    await writeAll(c, jsonFrame("running", {}));
    closeQuietly(conn);
    return vm;
  } catch (e) {
    const message = (e as Error).message;
    if (conn && e instanceof Refusal) {
      await timed(
        writeAll(conn, jsonFrame("abort", { message })).catch(() => {}),
        1000,
        "sending abort",
        () => {},
      ).catch(() => {});
    }
    closeQuietly(conn);
    closeQuietly(listener);
    vm?.close();
    if (e instanceof Refusal) throw failure(`refused the migration: ${message}`);
    if (e instanceof DenovisorError && e.code === "MIGRATION") throw e;
    throw failure(`receiving the migration failed: ${message}`);
  }
}

/** A refusal this side tells the source about. */
class Refusal extends Error {}

function refusal(message: string): Refusal {
  return new Refusal(message);
}
