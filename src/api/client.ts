/**
 * A client of the control API ({@link serveApi}) over its Unix socket.
 *
 * It uses `fetch` with `Deno.createHttpClient({ proxy: { transport: "unix",
 * path } })`, which Deno 2.9 has without unstable flags: the HTTP/1.1 framing,
 * chunked bodies and keep-alive are Deno's own (the same hyper stack as the
 * server), so there is no hand-written HTTP parser to get wrong. The URL's host
 * is ignored; only its path and query reach the server.
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";
import type { VmSettings, VmState } from "../vm.ts";
import type { DeviceListing } from "../devices.ts";
import type { BalloonStats } from "../balloon.ts";
import type { MetricsReport } from "../metrics.ts";
import type { GuestMemoryUsage } from "../kvm/kvm.ts";
import type { SnapshotLoadOptions } from "./server.ts";

/** `GET /vm`. */
export interface VmInfo {
  /** Where the VM is in its life. */
  state: VmState;
  /** Its configuration. */
  config: VmSettings;
  /** The image loaded last (entry and stack as `0x` hex strings), or null. */
  image: Record<string, unknown> | null;
  /** Its devices. */
  devices: DeviceListing;
}

/** `GET /metrics` as JSON. */
export interface ApiMetrics extends MetricsReport {
  /** Where the VM is in its life. */
  state: VmState;
  /** Guest RAM and the part of it resident in host memory. */
  memory: GuestMemoryUsage;
}

/**
 * An error answer of the API: `code` is `API_REFUSED`; the server's own code,
 * HTTP status and message are kept.
 *
 * @example
 * ```ts ignore
 * try {
 *   await client.pause();
 * } catch (e) {
 *   if (e instanceof ApiError) console.log(e.status, e.apiCode); // 409 GUEST_STOPPED
 * }
 * ```
 */
export class ApiError extends DenovisorError {
  /** The HTTP status. */
  readonly status: number;
  /** The server's error code (`NOT_FOUND`, `BAD_REQUEST`, `GUEST_STOPPED`, ...). */
  readonly apiCode: string;

  /**
   * Creates the error of one answer.
   *
   * @param status The HTTP status.
   * @param apiCode The server's code.
   * @param message The server's message.
   */
  constructor(status: number, apiCode: string, message: string) {
    super("API_REFUSED", message);
    this.name = "ApiError";
    this.status = status;
    this.apiCode = apiCode;
  }
}

/** How an {@link ApiClient} talks. */
export interface ApiClientOptions {
  /** How long one request may take, in ms (default 60 000: a snapshot may take a while). */
  timeoutMs?: number;
}

/**
 * A client of one VM's control API.
 *
 * @example
 * ```ts ignore
 * import { ApiClient } from "denovisor/src/api/client.ts";
 * using client = new ApiClient("/tmp/vm.sock");
 * await client.pause();
 * console.log((await client.vm()).state); // "paused"
 * await client.resume();
 * ```
 */
export class ApiClient implements Disposable {
  readonly #path: string;
  readonly #http: Deno.HttpClient;
  readonly #timeoutMs: number;

  /**
   * Creates a client; nothing connects until the first request.
   *
   * @param path The API's Unix socket.
   * @param options The request timeout.
   */
  constructor(path: string, options: ApiClientOptions = {}) {
    this.#path = path;
    this.#http = Deno.createHttpClient({ proxy: { transport: "unix", path } });
    this.#timeoutMs = options.timeoutMs ?? 60_000;
  }

  /**
   * Sends one request and returns the raw answer (any status).
   *
   * @param method The HTTP method.
   * @param path The route, with its query.
   * @param init A JSON body and extra headers.
   * @returns The answer.
   * @throws {DenovisorError} `API_UNREACHABLE` when nothing answers on the socket.
   */
  async raw(
    method: string,
    path: string,
    init: { body?: unknown; headers?: Record<string, string> } = {},
  ): Promise<Response> {
    try {
      return await fetch(`http://localhost${path}`, {
        method,
        client: this.#http,
        headers: {
          ...(init.body === undefined ? {} : { "content-type": "application/json" }),
          ...init.headers,
        },
        body: init.body === undefined ? undefined : JSON.stringify(init.body),
        signal: AbortSignal.timeout(this.#timeoutMs),
      });
    } catch (e) {
      const text = e instanceof Error && e.cause instanceof Error
        ? e.cause.message
        : e instanceof Error
        ? e.message
        : String(e);
      // fetch's message nests the socket's error: "... client error (Connect): <why>".
      const why = /\(Connect\): (.*)$/.exec(text)?.[1] ?? text;
      throw new DenovisorError(
        "API_UNREACHABLE",
        `no control API answers at ${this.#path}: ${why}`,
        {
          cause: e,
        },
      );
    }
  }

  /**
   * Sends one request and returns its JSON answer; an error answer throws.
   *
   * @param method The HTTP method.
   * @param path The route.
   * @param body The JSON body, if any.
   * @returns The parsed answer.
   * @throws {ApiError} for an error answer; {@link DenovisorError}
   *   `API_UNREACHABLE` when nothing answers.
   */
  async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    const answer = await this.raw(method, path, { body });
    const text = await answer.text();
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      throw new ApiError(answer.status, "BAD_ANSWER", `the API answered non-JSON: ${text}`);
    }
    if (!answer.ok) {
      const { code, message } = (parsed ?? {}) as { code?: unknown; message?: unknown };
      throw new ApiError(
        answer.status,
        typeof code === "string" ? code : `HTTP_${answer.status}`,
        typeof message === "string" ? message : text,
      );
    }
    return parsed as T;
  }

  /** `GET /vm`. @returns State, configuration, image and devices. */
  vm(): Promise<VmInfo> {
    return this.request("GET", "/vm");
  }

  /** `PUT /vm/state` paused. @returns The new state. */
  pause(): Promise<{ state: VmState }> {
    return this.request("PUT", "/vm/state", { state: "paused" });
  }

  /** `PUT /vm/state` running. @returns The new state. */
  resume(): Promise<{ state: VmState }> {
    return this.request("PUT", "/vm/state", { state: "running" });
  }

  /** `PUT /vm/state` stopped: ends the run. @returns The state when asked. */
  stop(): Promise<{ state: VmState }> {
    return this.request("PUT", "/vm/state", { state: "stopped" });
  }

  /** `GET /metrics` as JSON. @returns The report. */
  metrics(): Promise<ApiMetrics> {
    return this.request("GET", "/metrics");
  }

  /** `GET /metrics` in the Prometheus text format. @returns The exposition text. */
  async prometheus(): Promise<string> {
    const answer = await this.raw("GET", "/metrics", { headers: { accept: "text/plain" } });
    const text = await answer.text();
    if (!answer.ok) throw new ApiError(answer.status, `HTTP_${answer.status}`, text);
    return text;
  }

  /** `PUT /balloon`. @param targetMiB The target. @returns The balloon's statistics. */
  balloon(targetMiB: number): Promise<BalloonStats> {
    return this.request("PUT", "/balloon", { targetMiB });
  }

  /**
   * `PUT /snapshot/create`.
   *
   * @param dir Where the snapshot goes (a path on the server's side).
   * @param options `resume: false` leaves the VM paused; `parent` makes it a
   *   diff against that snapshot (the VM's last; it must track dirty pages).
   * @returns The server's answer.
   */
  snapshot(dir: string, options: { resume?: boolean; parent?: string } = {}): Promise<unknown> {
    return this.request("PUT", "/snapshot/create", {
      dir,
      resume: options.resume ?? true,
      ...(options.parent === undefined ? {} : { diff: true, parent: options.parent }),
    });
  }

  /**
   * `PUT /snapshot/load`.
   *
   * @param dir The snapshot (an absolute path on the server's side).
   * @param options Lazy or eager.
   * @returns The server's answer: the new VM's `state`, `dir`, `mode`, `restoreMs`.
   */
  load(dir: string, options: Partial<SnapshotLoadOptions> = {}): Promise<unknown> {
    return this.request("PUT", "/snapshot/load", { dir, mode: options.mode ?? "lazy" });
  }

  /**
   * `PUT /migrate`.
   *
   * @param to `tcp:HOST:PORT` or `unix:PATH`.
   * @returns The server's answer, once the target runs.
   */
  migrate(to: string): Promise<unknown> {
    return this.request("PUT", "/migrate", { to });
  }

  /** Closes the client's connections. */
  close(): void {
    this.#http.close();
  }

  /** Same as {@link ApiClient.close}, for `using`. */
  [Symbol.dispose](): void {
    this.close();
  }
}
