/**
 * The control API of a running VM: HTTP/JSON on a Unix socket, served by
 * Deno's own HTTP server (`Deno.serve({ path })`), in the shape of the part of
 * Firecracker's API that snapshots and migration need.
 *
 * | route                 | body                                   | answer                        |
 * | --------------------- | -------------------------------------- | ----------------------------- |
 * | `GET /vm`             |                                        | state, config, image, devices |
 * | `PUT /vm/state`       | `{"state": "paused"\|"running"\|"stopped"}` | `{"state": ...}`         |
 * | `GET /balloon`        |                                        | the balloon's statistics      |
 * | `PUT /balloon`        | `{"targetMiB": N}`                     | the balloon's statistics      |
 * | `GET /metrics`        |                                        | JSON, or Prometheus text      |
 * | `PUT /snapshot/create`| `{"dir": D, "resume": true}`           | the snapshot handler's answer |
 * | `PUT /snapshot/load`  | `{"dir": D, "mode": "lazy"\|"eager"}`  | the restore handler's answer  |
 * | `PUT /migrate`        | `{"to": "tcp:HOST:PORT"}`              | the migrate handler's answer  |
 *
 * Snapshots and migration are functions passed in ({@link ApiHandlers}); a
 * route whose handler is absent answers 501. The VM served may change while
 * the server runs (`PUT /snapshot/load` replaces it): pass a function that
 * returns the current one ({@link ApiTarget}). Every error is JSON
 * `{"code": ..., "message": ...}`: a {@link DenovisorError} code where one
 * applies, else the HTTP-level code of {@link ApiErrorCode}.
 *
 * @module
 */

import { DenovisorError, type ErrorCode } from "../errors.ts";
import { metricsReport, toPrometheus } from "../metrics.ts";
import { BodyError, readBoundedBody } from "../http_body.ts";
import type { Vm } from "../vm.ts";
import { parseMigrationAddress, UNIX_PATH_MAX } from "./address.ts";

/** The codes of errors the HTTP layer itself raises (the rest are {@link ErrorCode}s). */
export type ApiErrorCode =
  | "NOT_FOUND"
  | "METHOD_NOT_ALLOWED"
  | "BAD_REQUEST"
  | "PAYLOAD_TOO_LARGE"
  | "REQUEST_TIMEOUT"
  | "NOT_IMPLEMENTED"
  | "INVALID_STATE"
  | "INTERNAL";

/** What `PUT /snapshot/create` asks for. */
export interface SnapshotCreateOptions {
  /** Resume the VM once the snapshot is written (false: it stays paused, `--stop`). */
  resume: boolean;
  /** A diff snapshot: only the pages written since `parent`, this VM's last
   * snapshot (needs dirty-page tracking). Absent: a full snapshot. */
  parent?: string;
}

/**
 * The VM an API server serves: a VM, or a function returning the current one
 * (a process whose VM `PUT /snapshot/load` replaces).
 */
export type ApiTarget = Vm | (() => Vm);

/** What `PUT /snapshot/load` asks for. */
export interface SnapshotLoadOptions {
  /** `lazy` maps guest memory from the memory file copy-on-write; `eager` copies it. */
  mode: "lazy" | "eager";
}

/**
 * The operations other modules provide. Each receives checked arguments and
 * returns what the route answers with (JSON-able; `undefined` answers `{}`).
 * A thrown {@link DenovisorError} answers with its code.
 */
export interface ApiHandlers {
  /** `PUT /snapshot/create`: pause, write the snapshot into `dir`, resume unless told not to. */
  snapshot?(dir: string, options: SnapshotCreateOptions): unknown | Promise<unknown>;
  /** `PUT /snapshot/load`: load the snapshot in `dir`. */
  restore?(dir: string, options: SnapshotLoadOptions): unknown | Promise<unknown>;
  /** `PUT /migrate`: migrate the VM to `to` (`tcp:HOST:PORT` or `unix:PATH`, checked). */
  migrate?(to: string): unknown | Promise<unknown>;
}

/** How {@link serveApi} serves. */
export interface ApiServerOptions {
  /** The Unix socket's path (at most 107 bytes). */
  path: string;
  /** Snapshot and migration operations (absent ones answer 501). */
  handlers?: ApiHandlers;
  /** The largest request body accepted, in bytes (default {@link MAX_BODY_BYTES}). */
  maxBodyBytes?: number;
  /** How long a request's body may take to arrive, in ms (default {@link BODY_TIMEOUT_MS}). */
  bodyTimeoutMs?: number;
}

/** The largest request body accepted by default: every request is a small JSON object. */
export const MAX_BODY_BYTES = 64 * 1024;
/** How long a request's body may take to arrive by default. */
export const BODY_TIMEOUT_MS = 10_000;

/** An error answered as JSON with an HTTP status. */
class HttpFailure extends Error {
  constructor(
    readonly status: number,
    readonly code: ApiErrorCode | ErrorCode,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

const HTTP_STATUS_OF_CODE: Partial<Record<ErrorCode, number>> = {
  INVALID_ARGUMENT: 400,
  SNAPSHOT_INVALID: 400,
  SNAPSHOT_WRONG_HOST: 400,
  IMAGE: 400,
  DEVICE: 400,
  BUSY: 409,
  CLOSED: 409,
  GUEST_STOPPED: 409,
  TIMEOUT: 504,
  KVM_UNAVAILABLE: 503,
};

function json(body: unknown, status = 200, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body, bigintsAsStrings) + "\n", {
    status,
    headers: { "content-type": "application/json", ...headers },
  });
}

function bigintsAsStrings(_key: string, value: unknown): unknown {
  return typeof value === "bigint" ? `0x${value.toString(16)}` : value;
}

function errorResponse(e: unknown): Response {
  if (e instanceof HttpFailure) {
    return json({ code: e.code, message: e.message }, e.status, e.headers);
  }
  if (e instanceof DenovisorError) {
    return json({ code: e.code, message: e.message }, HTTP_STATUS_OF_CODE[e.code] ?? 500);
  }
  const message = e instanceof Error ? e.message : String(e);
  return json({ code: "INTERNAL", message }, 500);
}

const ROUTES: Record<string, readonly string[]> = {
  "/vm": ["GET"],
  "/vm/state": ["PUT"],
  "/balloon": ["GET", "PUT"],
  "/metrics": ["GET"],
  "/snapshot/create": ["PUT"],
  "/snapshot/load": ["PUT"],
  "/migrate": ["PUT"],
};

/** Reads a JSON object body of at most `limit` bytes, within `timeoutMs`. */
async function readBody(
  request: Request,
  limit: number,
  timeoutMs: number,
): Promise<Record<string, unknown>> {
  let bytes: Uint8Array;
  try {
    bytes = await readBoundedBody(request, limit, timeoutMs);
  } catch (e) {
    if (!(e instanceof BodyError)) throw e;
    const [status, code] = e.problem === "too_large"
      ? [413, "PAYLOAD_TOO_LARGE" as const]
      : e.problem === "timeout"
      ? [408, "REQUEST_TIMEOUT" as const]
      : [400, "BAD_REQUEST" as const];
    // An unreadable body: the client went away, nobody reads this answer.
    throw new HttpFailure(status, code, e.message);
  }
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new HttpFailure(400, "BAD_REQUEST", "the request body is not UTF-8");
  }
  if (text.trim() === "") throw new HttpFailure(400, "BAD_REQUEST", "the request needs a body");
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch (e) {
    throw new HttpFailure(
      400,
      "BAD_REQUEST",
      `the request body is not JSON: ${e instanceof Error ? e.message : e}`,
    );
  }
  if (body === null || typeof body !== "object" || Array.isArray(body)) {
    throw new HttpFailure(400, "BAD_REQUEST", "the request body must be a JSON object");
  }
  return body as Record<string, unknown>;
}

/** Checks an object's fields: every key known, required ones present, each of its type. */
function fields<T extends Record<string, unknown>>(
  body: Record<string, unknown>,
  spec: { [K in keyof T]: { required: boolean; check(v: unknown): v is T[K]; what: string } },
): Partial<T> {
  for (const key of Object.keys(body)) {
    if (!(key in spec)) throw new HttpFailure(400, "BAD_REQUEST", `unknown field "${key}"`);
  }
  const out: Partial<T> = {};
  for (const key of Object.keys(spec) as (keyof T & string)[]) {
    const value = body[key];
    if (value === undefined) {
      if (spec[key].required) {
        throw new HttpFailure(400, "BAD_REQUEST", `missing field "${key}" (${spec[key].what})`);
      }
      continue;
    }
    if (!spec[key].check(value)) {
      throw new HttpFailure(
        400,
        "BAD_REQUEST",
        `field "${key}" must be ${spec[key].what}, got ${JSON.stringify(value)}`,
      );
    }
    out[key] = value as T[typeof key];
  }
  return out;
}

const isNonEmptyString = (v: unknown): v is string =>
  typeof v === "string" && v !== "" && !v.includes("\0");
const isBoolean = (v: unknown): v is boolean => typeof v === "boolean";

/** `GET /vm`: the VM's state, configuration, image and devices. */
function vmInfo(vm: Vm): Record<string, unknown> {
  return { state: vm.state, config: vm.settings, image: vm.image ?? null, devices: vm.devices() };
}

/** Prometheus lines the metrics module does not write: state and guest memory. */
function extraPrometheus(vm: Vm): string {
  const { sizeBytes, residentBytes } = vm.memory();
  const states = ["created", "running", "paused", "stopped"] as const;
  return [
    "# HELP denovisor_vm_state 1 for the state the VM is in.",
    "# TYPE denovisor_vm_state gauge",
    ...states.map((s) => `denovisor_vm_state{state="${s}"} ${vm.state === s ? 1 : 0}`),
    "# HELP denovisor_vm_memory_bytes Guest RAM: its size, and the part resident in host memory.",
    "# TYPE denovisor_vm_memory_bytes gauge",
    `denovisor_vm_memory_bytes{kind="size"} ${sizeBytes}`,
    `denovisor_vm_memory_bytes{kind="resident"} ${residentBytes}`,
  ].join("\n") + "\n";
}

function metrics(vm: Vm, url: URL, request: Request): Response {
  const format = url.searchParams.get("format");
  if (format !== null && format !== "json" && format !== "prometheus") {
    throw new HttpFailure(
      400,
      "BAD_REQUEST",
      `format must be json or prometheus, got ${JSON.stringify(format)}`,
    );
  }
  const accept = request.headers.get("accept") ?? "";
  const prometheus = format === "prometheus" ||
    (format === null && /(^|[,\s])text\/plain/i.test(accept));
  const report = metricsReport(vm);
  if (prometheus) {
    return new Response(toPrometheus(report) + extraPrometheus(vm), {
      headers: { "content-type": "text/plain; version=0.0.4; charset=utf-8" },
    });
  }
  return json({ ...report, state: vm.state, memory: vm.memory() });
}

/** The operation each target's changes are queued behind (settled, never rejected). */
const LAST_CHANGE = new WeakMap<ApiTarget, Promise<unknown>>();

/**
 * Runs an operation that changes the VM after the ones before it have
 * finished: a pause never lands in the middle of a snapshot, two snapshots
 * never overlap. Requests are read and checked before they queue, so a slow
 * client holds nothing up.
 */
function exclusive<T>(target: ApiTarget, operation: () => T | Promise<T>): Promise<T> {
  const previous = LAST_CHANGE.get(target) ?? Promise.resolve();
  const next = previous.then(operation);
  LAST_CHANGE.set(target, next.catch(() => {}));
  return next;
}

function notImplemented(what: string, handler: string): HttpFailure {
  return new HttpFailure(
    501,
    "NOT_IMPLEMENTED",
    `${what} is not available in this server (no ${handler} handler)`,
  );
}

/**
 * Answers one API request: routing, validation, the VM's operation, and the
 * JSON (or Prometheus) answer. Never throws: every failure is an error answer.
 * {@link serveApi} calls it for each request; it needs no socket.
 *
 * @param target The VM, or a function returning the current one.
 * @param request The request (its URL's path selects the route).
 * @param options Handlers and limits (`path` is not used).
 * @returns The answer.
 * @example
 * ```ts
 * import { Vm } from "denovisor";
 * import { handleApiRequest } from "denovisor/src/api/server.ts";
 * using vm = await Vm.create();
 * const answer = await handleApiRequest(vm, new Request("http://vm/vm"));
 * console.log(answer.status, (await answer.json()).state); // 200 "created"
 * ```
 */
export async function handleApiRequest(
  target: ApiTarget,
  request: Request,
  options: Omit<ApiServerOptions, "path"> = {},
): Promise<Response> {
  try {
    return await route(target, request, options);
  } catch (e) {
    return errorResponse(e);
  }
}

async function route(
  target: ApiTarget,
  request: Request,
  options: Omit<ApiServerOptions, "path">,
): Promise<Response> {
  // The VM now; a change queued behind others reads it again when it runs.
  const current = (): Vm => typeof target === "function" ? target() : target;
  const vm = current();
  const url = new URL(request.url);
  const methods = ROUTES[url.pathname];
  if (!Object.hasOwn(ROUTES, url.pathname) || methods === undefined) {
    throw new HttpFailure(404, "NOT_FOUND", `no route ${url.pathname}`);
  }
  if (!methods.includes(request.method)) {
    throw new HttpFailure(
      405,
      "METHOD_NOT_ALLOWED",
      `${url.pathname} takes ${methods.join(", ")}, not ${request.method}`,
      { allow: methods.join(", ") },
    );
  }
  const handlers = options.handlers ?? {};
  const body = () =>
    readBody(
      request,
      options.maxBodyBytes ?? MAX_BODY_BYTES,
      options.bodyTimeoutMs ?? BODY_TIMEOUT_MS,
    );
  const answer = async (result: unknown) => json((await result) ?? {});
  switch (`${request.method} ${url.pathname}`) {
    case "GET /vm":
      return json(vmInfo(vm));
    case "PUT /vm/state": {
      const { state } = fields<{ state: string }>(await body(), {
        state: {
          required: true,
          what: '"paused", "running" or "stopped"',
          check: (v): v is string => v === "paused" || v === "running" || v === "stopped",
        },
      });
      const ended = () => new HttpFailure(409, "GUEST_STOPPED", "the VM's run has ended");
      if (state === "stopped") {
        // Not queued: stopping is how a user ends a VM whose snapshot or
        // migration hangs. The run ends asynchronously: the answer says so.
        if (vm.state === "stopped") throw ended();
        vm.stop();
        return json({ state: vm.state, stopping: true }, 202);
      }
      return await exclusive(target, () => {
        const vm = current();
        if (vm.state === "stopped") throw ended();
        if (state === "paused") vm.pause();
        else vm.resume();
        return json({ state: vm.state });
      });
    }
    case "GET /balloon":
      return json(vm.balloon.stats());
    case "PUT /balloon": {
      const { targetMiB } = fields<{ targetMiB: number }>(await body(), {
        targetMiB: {
          required: true,
          what: "a non-negative integer (MiB)",
          check: (v): v is number => Number.isSafeInteger(v) && (v as number) >= 0,
        },
      });
      return await exclusive(target, () => json(current().balloon.setTarget(targetMiB!)));
    }
    case "GET /metrics":
      return metrics(vm, url, request);
    case "PUT /snapshot/create": {
      if (!handlers.snapshot) throw notImplemented("snapshot creation", "snapshot");
      const { dir, resume, diff, parent, snapshot_type } = fields<{
        dir: string;
        resume: boolean;
        diff: boolean;
        parent: string;
        snapshot_type: "Full" | "Diff";
      }>(await body(), {
        dir: { required: true, what: "a directory path", check: isNonEmptyString },
        resume: { required: false, what: "a boolean", check: isBoolean },
        diff: { required: false, what: "a boolean", check: isBoolean },
        parent: { required: false, what: "a directory path", check: isNonEmptyString },
        snapshot_type: {
          required: false,
          what: '"Full" or "Diff" (Firecracker\'s spelling of diff)',
          check: (v): v is "Full" | "Diff" => v === "Full" || v === "Diff",
        },
      });
      const isDiff = diff ?? (snapshot_type === "Diff");
      if (
        diff !== undefined && snapshot_type !== undefined && diff !== (snapshot_type === "Diff")
      ) {
        throw new HttpFailure(400, "BAD_REQUEST", `"diff" and "snapshot_type" disagree`);
      }
      if (isDiff !== (parent !== undefined)) {
        throw new HttpFailure(
          400,
          "BAD_REQUEST",
          isDiff
            ? 'a diff snapshot needs "parent": the directory of this VM\'s last snapshot'
            : '"parent" is for a diff snapshot ("diff": true)',
        );
      }
      return await exclusive(
        target,
        () =>
          answer(handlers.snapshot!(dir!, {
            resume: resume ?? true,
            ...(parent === undefined ? {} : { parent }),
          })),
      );
    }
    case "PUT /snapshot/load": {
      if (!handlers.restore) throw notImplemented("snapshot loading", "restore");
      const { dir, mode } = fields<{ dir: string; mode: "lazy" | "eager" }>(await body(), {
        dir: { required: true, what: "a directory path", check: isNonEmptyString },
        mode: {
          required: false,
          what: '"lazy" or "eager"',
          check: (v): v is "lazy" | "eager" => v === "lazy" || v === "eager",
        },
      });
      return await exclusive(
        target,
        () => answer(handlers.restore!(dir!, { mode: mode ?? "lazy" })),
      );
    }
    case "PUT /migrate": {
      if (!handlers.migrate) throw notImplemented("migration", "migrate");
      const { to } = fields<{ to: string }>(await body(), {
        to: { required: true, what: "tcp:HOST:PORT or unix:PATH", check: isNonEmptyString },
      });
      try {
        parseMigrationAddress(to!);
      } catch (e) {
        throw new HttpFailure(400, "BAD_REQUEST", (e as Error).message);
      }
      return await exclusive(target, () => answer(handlers.migrate!(to!)));
    }
  }
  throw new HttpFailure(500, "INTERNAL", `route ${request.method} ${url.pathname} has no handler`);
}

/**
 * Checks a path for an API socket without taking it: refused when it is too
 * long, is something other than a socket, or a server answers on it (a live
 * socket). Resolves `"stale"` for a socket nobody listens on (a crashed
 * server's; {@link serveApi} replaces it) and `"free"` when nothing is there.
 *
 * @param path The socket's path.
 * @returns Whether the path is free or holds a stale socket.
 * @throws {DenovisorError} `INVALID_ARGUMENT` for a bad path, `BUSY` when a
 *   server listens there, `IO` when the path cannot be examined.
 * @example
 * ```ts
 * import { checkApiSocketPath } from "denovisor/src/api/server.ts";
 * console.log(await checkApiSocketPath("/tmp/no-such-dir/vm.sock")); // "free"
 * ```
 */
export async function checkApiSocketPath(path: string): Promise<"free" | "stale"> {
  if (typeof path !== "string" || path === "" || path.includes("\0")) {
    throw new DenovisorError("INVALID_ARGUMENT", "the API socket path must be a non-empty string");
  }
  if (new TextEncoder().encode(path).length > UNIX_PATH_MAX) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `the API socket path has more than ${UNIX_PATH_MAX} bytes: ${path}`,
    );
  }
  let info: Deno.FileInfo;
  try {
    info = await Deno.lstat(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return "free";
    throw new DenovisorError("IO", `cannot examine the API socket ${path}: ${e}`);
  }
  if (!info.isSocket) {
    throw new DenovisorError("INVALID_ARGUMENT", `${path} exists and is not a socket`);
  }
  let conn: Deno.UnixConn;
  try {
    conn = await Deno.connect({ transport: "unix", path });
  } catch (e) {
    if (e instanceof Deno.errors.ConnectionRefused) return "stale";
    throw new DenovisorError("IO", `cannot examine the API socket ${path}: ${e}`);
  }
  conn.close();
  throw new DenovisorError("BUSY", `another server is listening on ${path}`);
}

/**
 * A running API server. `await using` (or {@link ApiServer.close}) stops it and
 * removes its socket.
 *
 * @example
 * ```ts
 * import { Vm } from "denovisor";
 * import { serveApi } from "denovisor/src/api/server.ts";
 * using vm = await Vm.create();
 * const api = await serveApi(vm, { path: "/tmp/vm.sock" });
 * console.log(api.path); // "/tmp/vm.sock"
 * await api.close(); // the socket is gone
 * ```
 */
export class ApiServer implements AsyncDisposable {
  readonly #server: Deno.HttpServer<Deno.UnixAddr>;
  readonly #path: string;
  readonly #ino: number | null;
  #closing: Promise<void> | undefined;

  /** @internal Use {@link serveApi}. */
  constructor(server: Deno.HttpServer<Deno.UnixAddr>, path: string, ino: number | null) {
    this.#server = server;
    this.#path = path;
    this.#ino = ino;
  }

  /** The socket's path. */
  get path(): string {
    return this.#path;
  }

  /**
   * Stops accepting connections, waits for the requests in flight, and removes
   * the socket (if it is still this server's). Idempotent.
   *
   * @returns Once the server is down and its socket gone.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      await this.#server.shutdown();
      try {
        const info = await Deno.lstat(this.#path);
        if (info.isSocket && info.ino === this.#ino) await Deno.remove(this.#path);
      } catch {
        // Already gone (Deno removes a socket it listened on when it closes it).
      }
    })();
    return this.#closing;
  }

  /** Same as {@link ApiServer.close}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/**
 * Serves the control API of `vm` on a Unix socket (mode 0600). A stale socket
 * at `path` (nobody listening) is replaced; a live one, or a file that is not a
 * socket, is refused.
 *
 * @param target The VM, or a function returning the current one (a process
 *   whose VM `PUT /snapshot/load` replaces).
 * @param options The socket's path, snapshot and migration handlers, limits.
 * @returns The server; close it (or `await using`) to stop it.
 * @throws {DenovisorError} `BUSY` when a server listens on `path`,
 *   `INVALID_ARGUMENT` for a bad path, `IO` when it cannot listen there.
 * @example
 * ```ts
 * import { Vm } from "denovisor";
 * import { serveApi } from "denovisor/src/api/server.ts";
 * using vm = await Vm.create();
 * await using api = await serveApi(vm, { path: "/tmp/vm.sock" });
 * // curl --unix-socket /tmp/vm.sock http://localhost/vm
 * ```
 */
export async function serveApi(target: ApiTarget, options: ApiServerOptions): Promise<ApiServer> {
  const { path } = options;
  if ((await checkApiSocketPath(path)) === "stale") {
    try {
      await Deno.remove(path);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) {
        throw new DenovisorError("IO", `cannot remove the stale API socket ${path}: ${e}`);
      }
    }
  }
  let server: Deno.HttpServer<Deno.UnixAddr>;
  try {
    server = Deno.serve({
      path,
      onListen: () => {},
      onError: errorResponse,
    }, (request) => handleApiRequest(target, request, options));
  } catch (e) {
    if (e instanceof Deno.errors.AddrInUse) {
      throw new DenovisorError("BUSY", `another server is listening on ${path}`);
    }
    throw new DenovisorError("IO", `cannot serve the API on ${path}: ${e}`);
  }
  let ino: number | null = null;
  try {
    await Deno.chmod(path, 0o600);
    ino = (await Deno.lstat(path)).ino;
  } catch (e) {
    await server.shutdown();
    throw new DenovisorError("IO", `cannot secure the API socket ${path}: ${e}`);
  }
  return new ApiServer(server, path, ino);
}
