/**
 * A small client of QEMU's machine protocol (QMP) over a Unix socket, for the
 * benches that drive QEMU's migration: the greeting and the capabilities
 * negotiation, commands matched to their replies by `id`, and the events QEMU
 * sends in between, each with QEMU's own timestamp. What QEMU sends is read
 * line by line with bounds (a line longer than {@link MAX_LINE_CHARS} closes
 * the connection; at most {@link MAX_EVENTS} events are kept).
 *
 * @module
 */

import { DenovisorError } from "../src/errors.ts";

/** The longest line accepted from QEMU (a `query-*` reply is a few KiB). */
export const MAX_LINE_CHARS = 1 << 20;
/** How many unconsumed events are kept (the oldest are dropped first). */
export const MAX_EVENTS = 1024;

/** An asynchronous event from QEMU (`{"event": ..., "data": ..., "timestamp": ...}`). */
export interface QmpEvent {
  /** Its name, e.g. `STOP`, `RESUME`, `MIGRATION`. */
  event: string;
  /** Its data, when it has any. */
  data?: Record<string, unknown>;
  /** When QEMU emitted it: milliseconds since the Unix epoch (QEMU's real-time clock). */
  timestampMs: number;
}

/** QEMU's greeting: its version and the capabilities it offers. */
export interface QmpGreeting {
  /** `major.minor.micro` of the QEMU binary. */
  version: string;
  /** Capabilities offered (`oob`, ...); none is enabled by this client. */
  capabilities: string[];
}

/** Options of {@link QmpClient.connect}. */
export interface QmpConnectOptions {
  /** Keep retrying until the socket accepts, for this long (QEMU creates it as it starts). */
  timeoutMs?: number;
}

/** Options of a wait on QEMU. */
export interface QmpWaitOptions {
  /** Give up after this many milliseconds (default 60000). */
  timeoutMs?: number;
}

interface Pending {
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/**
 * A QMP session on one Unix socket: connect, negotiate, execute commands, wait
 * for events. One command at a time is the usual use, but several may be in
 * flight (each carries its own `id`).
 *
 * @example
 * ```ts ignore
 * import { QmpClient } from "denovisor/bench/_qmp.ts";
 * // qemu-system-x86_64 -M none -nodefaults -display none -qmp unix:/tmp/q.sock,server=on,wait=off
 * using qmp = await QmpClient.connect("/tmp/q.sock", { timeoutMs: 10_000 });
 * console.log(qmp.greeting.version, await qmp.execute("query-status"));
 * await qmp.execute("stop");
 * console.log((await qmp.waitEvent("STOP")).timestampMs);
 * ```
 */
export class QmpClient implements Disposable {
  #conn: Deno.UnixConn;
  #pending = new Map<number, Pending>();
  #nextId = 1;
  #events: QmpEvent[] = [];
  #eventWaiters = new Set<() => void>();
  #closed: Error | undefined;
  #greeting: QmpGreeting | undefined;
  #onGreeting: ((g: QmpGreeting) => void) | undefined;
  #reader: Promise<void>;

  private constructor(conn: Deno.UnixConn) {
    this.#conn = conn;
    this.#reader = this.#read();
  }

  /**
   * Connects to QEMU's QMP socket (retrying while it does not exist yet or
   * refuses), reads the greeting and leaves capabilities negotiation mode.
   *
   * @param path The socket (`-qmp unix:PATH,server=on,wait=off`).
   * @param options How long to keep trying.
   * @returns A session in command mode.
   * @throws {DenovisorError} `TIMEOUT` when nothing accepts in time, `IO` when
   *   what answers does not speak QMP.
   */
  static async connect(path: string, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const deadline = performance.now() + (options.timeoutMs ?? 30_000);
    let conn: Deno.UnixConn | undefined;
    let lastError = "";
    while (!conn) {
      try {
        conn = await Deno.connect({ transport: "unix", path });
      } catch (e) {
        lastError = e instanceof Error ? e.message : String(e);
        if (performance.now() > deadline) {
          throw new DenovisorError("TIMEOUT", `QMP socket ${path} did not accept: ${lastError}`);
        }
        await sleep(5);
      }
    }
    const client = new QmpClient(conn);
    try {
      await client.#waitGreeting(Math.max(1000, deadline - performance.now()));
      await client.execute("qmp_capabilities");
      return client;
    } catch (e) {
      client.close();
      throw e;
    }
  }

  /** QEMU's greeting (version and offered capabilities). */
  get greeting(): QmpGreeting {
    if (!this.#greeting) throw new DenovisorError("IO", "no QMP greeting yet");
    return this.#greeting;
  }

  #waitGreeting(timeoutMs: number): Promise<QmpGreeting> {
    if (this.#greeting) return Promise.resolve(this.#greeting);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new DenovisorError("TIMEOUT", `no QMP greeting in ${timeoutMs} ms`)),
        timeoutMs,
      );
      this.#onGreeting = (g) => {
        clearTimeout(timer);
        resolve(g);
      };
      this.#pending.set(0, {
        resolve: () => {},
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
    });
  }

  /**
   * Runs one command and waits for its reply.
   *
   * @param command The command (`query-status`, `migrate`, ...).
   * @param args Its arguments.
   * @param options How long to wait for the reply.
   * @returns The reply's `return` value.
   * @throws {DenovisorError} `DEVICE` with QEMU's error class and description
   *   when QEMU refuses it, `CLOSED` when the connection ends first, `TIMEOUT`.
   */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    options: QmpWaitOptions = {},
  ): Promise<T> {
    if (this.#closed) return Promise.reject(this.#closed);
    const id = this.#nextId++;
    const message = JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id });
    const timeoutMs = options.timeoutMs ?? 60_000;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new DenovisorError("TIMEOUT", `QMP ${command}: no reply in ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(id, {
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v as T);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      this.#write(message + "\n").catch((e) => {
        this.#pending.delete(id);
        clearTimeout(timer);
        reject(
          new DenovisorError("CLOSED", `QMP ${command}: ${e instanceof Error ? e.message : e}`),
        );
      });
    }).catch((e) => {
      if (e instanceof DenovisorError && e.code === "DEVICE") {
        throw new DenovisorError("DEVICE", `QMP ${command}: ${e.message}`);
      }
      throw e;
    });
  }

  async #write(text: string): Promise<void> {
    const bytes = new TextEncoder().encode(text);
    for (let off = 0; off < bytes.length;) off += await this.#conn.write(bytes.subarray(off));
  }

  /**
   * Waits for the first event named `name` that arrived and was not consumed
   * yet (it may have come before this call), and consumes it.
   *
   * @param name The event's name.
   * @param options How long to wait; `match` further selects among events of that name.
   * @returns The event.
   * @throws {DenovisorError} `TIMEOUT`, or `CLOSED` when the connection ends first.
   */
  async waitEvent(
    name: string,
    options: QmpWaitOptions & { match?: (e: QmpEvent) => boolean } = {},
  ): Promise<QmpEvent> {
    const deadline = performance.now() + (options.timeoutMs ?? 60_000);
    for (;;) {
      const i = this.#events.findIndex((e) => e.event === name && (options.match?.(e) ?? true));
      if (i >= 0) return this.#events.splice(i, 1)[0];
      if (this.#closed) throw this.#closed;
      const left = deadline - performance.now();
      if (left <= 0) throw new DenovisorError("TIMEOUT", `no QMP event ${name} in time`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, left);
        function done() {
          clearTimeout(timer);
          resolve();
        }
        this.#eventWaiters.add(done);
      });
    }
  }

  /** The events received and not consumed yet, oldest first. */
  get events(): readonly QmpEvent[] {
    return this.#events;
  }

  async #read(): Promise<void> {
    const decoder = new TextDecoder();
    let buffer = "";
    let error: Error | undefined;
    try {
      for await (const chunk of this.#conn.readable) {
        buffer += decoder.decode(chunk, { stream: true });
        let nl: number;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, nl).trim();
          buffer = buffer.slice(nl + 1);
          if (line) this.#dispatch(line);
        }
        if (buffer.length > MAX_LINE_CHARS) {
          throw new DenovisorError("IO", `QMP line longer than ${MAX_LINE_CHARS} characters`);
        }
      }
    } catch (e) {
      error = e instanceof Error ? e : new Error(String(e));
    }
    this.#shutdown(
      new DenovisorError("CLOSED", `QMP connection closed${error ? `: ${error.message}` : ""}`),
    );
  }

  #dispatch(line: string): void {
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch {
      throw new DenovisorError("IO", `QMP sent a line that is not JSON: ${line.slice(0, 200)}`);
    }
    if (!isRecord(msg)) {
      throw new DenovisorError("IO", `QMP sent a non-object: ${line.slice(0, 200)}`);
    }
    if (isRecord(msg.QMP)) {
      const v = isRecord(msg.QMP.version) && isRecord(msg.QMP.version.qemu)
        ? msg.QMP.version.qemu
        : {};
      this.#greeting = {
        version: `${v.major}.${v.minor}.${v.micro}`,
        capabilities: Array.isArray(msg.QMP.capabilities) ? msg.QMP.capabilities.map(String) : [],
      };
      this.#pending.delete(0);
      this.#onGreeting?.(this.#greeting);
      return;
    }
    if (typeof msg.event === "string") {
      const ts = isRecord(msg.timestamp) ? msg.timestamp : {};
      const seconds = typeof ts.seconds === "number" ? ts.seconds : 0;
      const micros = typeof ts.microseconds === "number" ? ts.microseconds : 0;
      this.#events.push({
        event: msg.event,
        data: isRecord(msg.data) ? msg.data : undefined,
        timestampMs: seconds * 1000 + micros / 1000,
      });
      if (this.#events.length > MAX_EVENTS) this.#events.shift();
      const waiters = [...this.#eventWaiters];
      this.#eventWaiters.clear();
      for (const w of waiters) w();
      return;
    }
    const id = typeof msg.id === "number" ? msg.id : undefined;
    const pending = id === undefined ? undefined : this.#pending.get(id);
    if (!pending || id === undefined) return; // a reply to a command that timed out
    this.#pending.delete(id);
    if ("return" in msg) {
      pending.resolve(msg.return);
    } else if (isRecord(msg.error)) {
      pending.reject(new DenovisorError("DEVICE", `${msg.error.class}: ${msg.error.desc}`));
    } else {
      pending.reject(new DenovisorError("IO", `QMP reply without return or error: ${line}`));
    }
  }

  #shutdown(error: Error): void {
    if (this.#closed) return;
    this.#closed = error;
    for (const p of this.#pending.values()) p.reject(error);
    this.#pending.clear();
    const waiters = [...this.#eventWaiters];
    this.#eventWaiters.clear();
    for (const w of waiters) w();
  }

  /** Whether the connection has ended (QEMU exited, or {@link close}). */
  get closed(): boolean {
    return this.#closed !== undefined;
  }

  /** Closes the connection; pending commands fail with `CLOSED`. */
  close(): void {
    this.#shutdown(new DenovisorError("CLOSED", "QMP connection closed by the client"));
    try {
      this.#conn.close();
    } catch {
      // Already closed.
    }
  }

  /** Same as {@link close}. */
  [Symbol.dispose](): void {
    this.close();
  }

  /** Resolves when the reader has ended (after {@link close} or QEMU's exit). */
  get ended(): Promise<void> {
    return this.#reader;
  }
}
