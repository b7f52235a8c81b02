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
 *    or `maxRounds` is reached. Pages go as `pages` frames
 *    (`[u64 index][4096 bytes]...`): the source's core takes the dirty set,
 *    packs, checksums and writes a whole round to the socket in one call;
 *    the target's core reads, checks (CRC-32, every index inside RAM) and
 *    writes them into guest RAM. No page and no bitmap passes through
 *    JavaScript; the socket is the core's (`socket.ts`).
 * 3. source pauses the VM (vCPUs and devices), sends the last dirty pages and
 *    a `state` frame (the snapshot sections without a memory file); the
 *    target verifies it whole, applies it and answers `running` with the
 *    times of its phases; the source then stops its VM.
 *
 * Anything else — the target refuses, dies, the connection is cut or a frame
 * is corrupt, a read times out — leaves the source VM running (dirty log off,
 * resumed) and the target without a VM (its listener closed).
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";
import { Kvm, type MigrationSendStats } from "../kvm/kvm.ts";
import { Vm } from "../vm.ts";
import { type MigrationAddress, parseMigrationAddress } from "../api/address.ts";
import { jsonOf } from "./wire.ts";
import { MigrationListener, MigrationSocket } from "./socket.ts";

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
  /** Of which the core spent reading pages out of RAM and checksumming, ms. */
  packMs: number;
  /** And writing them to the socket, ms. */
  sendMs: number;
}

/** Where a migration's time went on the source, ms ({@link MigrationStats.phases}). */
export interface MigrationPhases {
  /** Connecting to the target. */
  connect: number;
  /** Reading the host section, sending hello, until the target's `ready`
   * (the target builds its VM meanwhile). */
  handshake: number;
  /** Round 0 and every pre-copy round after it, the VM running. */
  precopy: number;
  /** Downtime from here: pausing the VM (vCPUs and devices). */
  pause: number;
  /** Taking the last dirty set. */
  harvest: number;
  /** Encoding the state (CPU, VM and device sections), while the core sends
   * the last round. */
  stateEncode: number;
  /** The rest of the last round, once the state is encoded (the round's own
   * time is its {@link MigrationRound}). */
  lastRound: number;
  /** Writing the state frame. */
  stateSend: number;
  /** From the state sent to the target's `running` (its apply included). */
  awaitRunning: number;
}

/** Where the target's time went, ms, as it reports it in `running`. */
export interface TargetPhases {
  /** Checking the host and building the VM, before `ready`. */
  build: number;
  /** Writing received pages into RAM (all rounds, checks included). */
  writePages: number;
  /** From the state frame read to the state verified and applied. */
  applyState: number;
  /** Pages written in all. */
  pages: number;
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
  /** The source's phases. */
  phases: MigrationPhases;
  /** The target's, when it reported them. */
  target?: TargetPhases;
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

/** A stopwatch of phases: `lap()` returns the ms since the last lap. */
function stopwatch(): () => number {
  let last = performance.now();
  return () => {
    const now = performance.now();
    const ms = now - last;
    last = now;
    return ms;
  };
}

function targetPhases(payload: Uint8Array): TargetPhases | undefined {
  try {
    const t = JSON.parse(new TextDecoder().decode(payload))?.phases;
    if (
      t && ["build", "writePages", "applyState", "pages"].every((k) => typeof t[k] === "number")
    ) {
      return { build: t.build, writePages: t.writePages, applyState: t.applyState, pages: t.pages };
    }
  } catch {
    // an older target's `{}`
  }
  return undefined;
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
 * console.log(stats.downtimeMs, stats.rounds.length, stats.phases.pause);
 * await running; // stopped: the guest goes on over there
 * ```
 *
 * @param vm The VM (running, paused or loaded and not yet run).
 * @param to `tcp:HOST:PORT` or `unix:PATH`.
 * @param options Convergence and timeouts.
 * @returns Per-round figures, total time, downtime and the phases of both sides.
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
  const lap = stopwatch();
  const wasPaused = vm.state === "paused";
  let socket: MigrationSocket | undefined;
  let logging = false;
  let pausedHere = false;
  let handedOver = false;
  const rounds: MigrationRound[] = [];
  let totalBytes = 0;
  let totalPages = 0;
  const phases: MigrationPhases = {
    connect: 0,
    handshake: 0,
    precopy: 0,
    pause: 0,
    harvest: 0,
    stateEncode: 0,
    lastRound: 0,
    stateSend: 0,
    awaitRunning: 0,
  };
  try {
    socket = await MigrationSocket.connect(address, timeoutMs).catch((e) => {
      throw failure(`cannot connect to the target: ${(e as Error).message}`);
    });
    const s = socket;
    phases.connect = lap();
    const sendJson = async (kind: "hello", value: unknown) => {
      const bytes = new TextEncoder().encode(JSON.stringify(value));
      await s.send(kind, bytes, timeoutMs);
      totalBytes += 12 + bytes.length;
    };

    // The host section needs the vCPUs' CPUID: a brief pause to read it.
    if (!wasPaused) vm.pause();
    let host: unknown;
    try {
      host = vm.kvm.migrationHost();
    } finally {
      if (!wasPaused) vm.resume();
    }
    // The config is fixed for the migration: made once, outside the downtime.
    const config = vm.migrationConfig();
    await sendJson("hello", {
      version: MIGRATION_PROTOCOL_VERSION,
      config: JSON.parse(config),
      memoryBytes: vm.memoryBytes,
      host,
    });
    const ready = await s.expect(timeoutMs, ["ready"]);
    phases.handshake = lap();
    // A target that says so answers a `sync` after each pre-copy round once
    // those pages are in its RAM: the bandwidth is then the target's, and a
    // backlog of pages in the socket never lands inside the downtime.
    const readyBody = jsonOf({ kind: "ready", payload: ready.payload });
    const sync = Array.isArray(readyBody.features) && readyBody.features.includes("sync");

    let bandwidth = 0; // bytes per ms, measured
    const sendRound = async (round: number, all: boolean, synced: boolean) => {
      const t0 = performance.now();
      const sent: MigrationSendStats = await vm.kvm.sendMigrationPages(s.fd, {
        all,
        batchBytes,
        timeoutMs,
      });
      if (synced) {
        await s.send("sync", new Uint8Array(), timeoutMs);
        await s.expect(timeoutMs, ["synced"]);
        sent.bytes += 12;
      }
      const ms = performance.now() - t0;
      totalBytes += sent.bytes;
      if (sent.bytes > 64 * RECORD_BYTES && ms > 0) bandwidth = sent.bytes / ms;
      rounds.push({
        round,
        pages: sent.pages,
        bytes: sent.bytes,
        ms,
        packMs: sent.packNs / 1e6,
        sendMs: sent.sendNs / 1e6,
      });
      totalPages += sent.pages;
    };

    vm.startDirtyLog();
    logging = true;
    await sendRound(0, true, sync);
    let pending = vm.kvm.migrationTakeDirty();
    for (let round = 1; round <= maxRounds; round++) {
      const estimateMs = bandwidth > 0 ? (pending * RECORD_BYTES) / bandwidth : Infinity;
      if (pending <= thresholdPages || estimateMs <= downtimeMs) break;
      await sendRound(round, false, sync);
      pending = vm.kvm.migrationTakeDirty();
    }
    phases.precopy = lap();

    // Stop and copy.
    const pausedAt = performance.now();
    if (!wasPaused) {
      vm.pause();
      pausedHere = true;
    }
    phases.pause = lap();
    // A guest that ended meanwhile has nothing to continue over there.
    if (vm.state === "stopped") throw failure("the VM's run ended during the migration");
    vm.kvm.migrationTakeDirty();
    phases.harvest = lap();
    // The core sends the last round on its own thread while this one encodes
    // the state: the two overlap on a host with a core to spare.
    const lastRound = sendRound(rounds.length, false, false);
    let state: Uint8Array;
    try {
      state = vm.kvm.migrationState(config);
    } catch (e) {
      await lastRound.catch(() => {});
      throw e;
    }
    phases.stateEncode = lap();
    await lastRound;
    phases.lastRound = lap();
    // The disks are durable and unlocked before the target may take them.
    handedOver = true;
    vm.kvm.handOverDevices();
    await s.send("state", state, timeoutMs);
    totalBytes += 12 + state.length;
    phases.stateSend = lap();
    const running = await s.expect(timeoutMs, ["running"]);
    phases.awaitRunning = lap();
    const downtime = performance.now() - pausedAt;
    logging = false;
    try {
      vm.stopDirtyLog();
    } catch {
      // the VM stops anyway
    }
    closeQuietly({ close: () => vm.kvm.endMigration() });
    vm.stop();
    closeQuietly(socket);
    return {
      rounds,
      totalMs: performance.now() - started,
      downtimeMs: downtime,
      bytes: totalBytes,
      pages: totalPages,
      phases,
      target: targetPhases(running.payload),
    };
  } catch (e) {
    const message = (e as Error).message;
    if (socket) {
      // Best effort: the target may be gone.
      await socket.sendJson("abort", { message }, 1000).catch(() => {});
      closeQuietly(socket);
    }
    if (logging) {
      try {
        vm.stopDirtyLog();
      } catch {
        // tracking may not have started
      }
    }
    closeQuietly({ close: () => vm.kvm.endMigration() });
    if (handedOver) {
      try {
        vm.kvm.takeOverDevices();
      } catch (t) {
        // The target holds a disk: it may run the guest. Never both.
        throw failure(
          `migration failed (${message}) and the VM stays paused here: ${(t as Error).message}`,
        );
      }
    }
    if (pausedHere) vm.resume();
    if (e instanceof DenovisorError && e.code === "MIGRATION") throw e;
    throw failure(`migration failed, the VM runs on here: ${message}`);
  }
}

function listenerAddress(listener: MigrationListener, address: MigrationAddress): string {
  if (address.transport === "tcp") {
    const host = address.hostname.includes(":") ? `[${address.hostname}]` : address.hostname;
    return `tcp:${host}:${listener.port}`;
  }
  return `unix:${address.path}`;
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
  let listener: MigrationListener | undefined;
  let socket: MigrationSocket | undefined;
  let vm: Vm | undefined;
  // KVM and the core are loaded before listening: the source's clock runs from
  // its hello, not from this process's start-up.
  const kvm = await Kvm.open();
  try {
    try {
      listener = await MigrationListener.listen(address);
    } catch (e) {
      throw failure(`cannot listen on ${listen}: ${(e as Error).message}`);
    }
    options.onListening?.(listenerAddress(listener, address));
    socket = await listener.accept(acceptTimeoutMs).catch((e) => {
      throw failure(`waiting for the source: ${(e as Error).message}`);
    });
    closeQuietly(listener);
    if (address.transport === "unix") await Deno.remove(address.path).catch(() => {});
    listener = undefined;
    const s = socket;

    const helloFrame = await s.expect(timeoutMs, ["hello"]);
    const lap = stopwatch();
    const hello = jsonOf({ kind: "hello", payload: helloFrame.payload });
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
    const build = lap();
    await s.sendJson("ready", { features: ["sync"] }, timeoutMs);
    // Every round's pages go into RAM in the core; `sync` asks for an answer
    // once they are there; the state ends the stream.
    let state;
    let pages = 0;
    let writeNs = 0;
    try {
      for (;;) {
        const frame = await s.expect(timeoutMs, ["state", "sync"], vm.kvm);
        pages += frame.pages;
        writeNs += frame.writeNs;
        if (frame.kind === "state") {
          state = frame;
          break;
        }
        await s.sendJson("synced", {}, timeoutMs);
      }
    } catch (e) {
      // A batch the core refused (a page outside RAM, a cut record, a
      // checksum): tell the source; a cut or silent stream has no one to tell.
      if (e instanceof DenovisorError && e.code === "INVALID_ARGUMENT") {
        throw refusal(`a pages frame was refused: ${e.message}`);
      }
      throw e;
    }
    lap();
    try {
      vm.applyMigrationState(state.payload);
    } catch (e) {
      throw refusal(`the state was refused: ${(e as Error).message}`);
    }
    const applyState = lap();
    await s.sendJson("running", {
      phases: { build, writePages: writeNs / 1e6, applyState, pages },
    }, timeoutMs);
    closeQuietly(socket);
    return vm;
  } catch (e) {
    const message = (e as Error).message;
    if (socket && e instanceof Refusal) {
      await socket.sendJson("abort", { message }, 1000).catch(() => {});
    }
    closeQuietly(socket);
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
