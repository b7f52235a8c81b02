/**
 * The live-migration socket, made and driven by the core: TypeScript holds
 * its fd and passes it to each call, so pages never cross into JavaScript
 * (the core sends a round from the VM's dirty set and writes a received
 * round straight into guest RAM, {@link KvmVm.sendMigrationPages} and
 * {@link KvmVm.receiveMigrationFrames}). Frames are those of `wire.ts`
 * (kind, length, CRC-32), checked by the core. Every call that waits on the
 * peer runs off the JS thread with a timeout.
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";
import { type Core, openCore } from "../ffi.ts";
import type { KvmVm } from "../kvm/kvm.ts";
import type { MigrationAddress } from "../api/address.ts";
import { FRAME_KINDS, type FrameKind } from "./wire.ts";

const TCP = 0;
const UNIX = 1;

/** The largest control frame read without a VM (a hello: config and host). */
const CONTROL_FRAME_BYTES = 4 << 20;

const KIND_NAMES: ReadonlyMap<number, FrameKind> = new Map(
  Object.entries(FRAME_KINDS).map(([name, byte]) => [byte, name as FrameKind]),
);

/** A frame read by the core: its kind and checked payload. */
export interface CoreFrame {
  /** What it is. */
  kind: FrameKind;
  /** Its payload, its checksum verified. */
  payload: Uint8Array;
  /** Pages written into RAM before it (when read into a VM). */
  pages: number;
  /** Bytes read, headers included. */
  bytes: number;
  /** Nanoseconds the core spent writing those pages. */
  writeNs: number;
}

function transportOf(address: MigrationAddress): { transport: number; target: string } {
  if (address.transport === "tcp") {
    const host = address.hostname.includes(":") ? `[${address.hostname}]` : address.hostname;
    return { transport: TCP, target: `${host}:${address.port}` };
  }
  return { transport: UNIX, target: address.path };
}

function abortMessage(payload: Uint8Array): string {
  try {
    const parsed = JSON.parse(new TextDecoder().decode(payload));
    if (typeof parsed?.message === "string") return parsed.message.slice(0, 1000);
  } catch {
    // fall through
  }
  return "(no reason given)";
}

/**
 * A connected migration socket (the core's fd).
 *
 * @example
 * ```ts ignore
 * import { MigrationSocket } from "denovisor/src/migration/socket.ts";
 * using socket = await MigrationSocket.connect({ transport: "tcp", hostname: "127.0.0.1", port: 4444 }, 30_000);
 * await socket.sendJson("hello", { version: 1 }, 30_000);
 * const ready = await socket.expect(30_000, "ready");
 * ```
 */
export class MigrationSocket implements Disposable {
  readonly #core: Core;
  #fd: number;

  private constructor(core: Core, fd: number) {
    this.#core = core;
    this.#fd = fd;
  }

  /**
   * Connects to a target.
   *
   * @param address Where.
   * @param timeoutMs Connecting times out after this (0: the OS's limit).
   * @returns The socket.
   */
  static async connect(address: MigrationAddress, timeoutMs: number): Promise<MigrationSocket> {
    const core = await openCore();
    const { transport, target } = transportOf(address);
    return new MigrationSocket(core, await core.migrationConnect(transport, target, timeoutMs));
  }

  /** @internal Wraps an accepted fd. */
  static adopt(core: Core, fd: number): MigrationSocket {
    return new MigrationSocket(core, fd);
  }

  /** The socket's fd, for the core's page calls. */
  get fd(): number {
    if (this.#fd < 0) throw new DenovisorError("CLOSED", "the migration socket is closed");
    return this.#fd;
  }

  /**
   * Sends one frame.
   *
   * @param kind What it is.
   * @param payload Its bytes.
   * @param timeoutMs The write times out after this (0: never).
   */
  send(kind: FrameKind, payload: Uint8Array, timeoutMs: number): Promise<void> {
    return this.#core.migrationSendFrame(this.fd, FRAME_KINDS[kind], payload, timeoutMs);
  }

  /**
   * Sends one JSON frame.
   *
   * @param kind What it is.
   * @param value Its body.
   * @param timeoutMs The write times out after this (0: never).
   */
  sendJson(kind: FrameKind, value: unknown, timeoutMs: number): Promise<void> {
    return this.send(kind, new TextEncoder().encode(JSON.stringify(value)), timeoutMs);
  }

  /**
   * Reads the next frame, into `vm`'s RAM for pages frames (without a VM a
   * pages frame is refused), and requires its kind; an `abort` from the
   * peer becomes an error carrying its message.
   *
   * @param timeoutMs Each read times out after this (0: never).
   * @param kinds The kinds allowed.
   * @param vm The VM that takes pages.
   * @returns The frame.
   * @throws {DenovisorError} `MIGRATION` for an abort or another kind; the
   *   core's code (`IO`, `TIMEOUT`, `INVALID_ARGUMENT` for a corrupt or
   *   hostile stream) otherwise.
   */
  async expect(timeoutMs: number, kinds: FrameKind[], vm?: KvmVm): Promise<CoreFrame> {
    const got = vm
      ? await vm.receiveMigrationFrames(this.fd, timeoutMs)
      : await this.#core.migrationReceive(0, this.fd, timeoutMs, CONTROL_FRAME_BYTES);
    const kind = KIND_NAMES.get(got.kind);
    if (kind === undefined) {
      throw new DenovisorError("MIGRATION", `not a migration frame (kind ${got.kind})`);
    }
    if (kind === "abort" && !kinds.includes("abort")) {
      throw new DenovisorError(
        "MIGRATION",
        `the other side aborted: ${abortMessage(got.payload)}`,
      );
    }
    if (!kinds.includes(kind)) {
      throw new DenovisorError("MIGRATION", `expected ${kinds.join(" or ")}, got ${kind}`);
    }
    return { ...got, kind };
  }

  /** Closes the socket (again: nothing). */
  close(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    this.#core.migrationClose(fd);
  }

  /** Closes the socket. */
  [Symbol.dispose](): void {
    this.close();
  }
}

/**
 * A listener waiting for one migration source.
 *
 * @example
 * ```ts ignore
 * import { MigrationListener } from "denovisor/src/migration/socket.ts";
 * using listener = await MigrationListener.listen({ transport: "tcp", hostname: "127.0.0.1", port: 0 });
 * using socket = await listener.accept(0);
 * ```
 */
export class MigrationListener implements Disposable {
  readonly #core: Core;
  #fd: number;
  /** The TCP port it listens on (0 for a Unix socket). */
  readonly port: number;

  private constructor(core: Core, fd: number, port: number) {
    this.#core = core;
    this.#fd = fd;
    this.port = port;
  }

  /**
   * Listens on `address`.
   *
   * @param address Where (a TCP port 0 picks a free one: {@link MigrationListener.port}).
   * @returns The listener.
   */
  static async listen(address: MigrationAddress): Promise<MigrationListener> {
    const core = await openCore();
    const { transport, target } = transportOf(address);
    const { fd, port } = core.migrationListen(transport, target);
    return new MigrationListener(core, fd, port);
  }

  /**
   * Waits for one connection.
   *
   * @param timeoutMs Times out after this (0: never).
   * @returns The connection.
   */
  async accept(timeoutMs: number): Promise<MigrationSocket> {
    if (this.#fd < 0) throw new DenovisorError("CLOSED", "the migration listener is closed");
    return MigrationSocket.adopt(this.#core, await this.#core.migrationAccept(this.#fd, timeoutMs));
  }

  /** Closes the listener (again: nothing). */
  close(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    this.#core.migrationClose(fd);
  }

  /** Closes the listener. */
  [Symbol.dispose](): void {
    this.close();
  }
}
