/**
 * The function service: HTTP in front of one warm pool of micro-VMs per
 * function (`Deno.serve`).
 *
 * | route            | answer                                                        |
 * | ---------------- | ------------------------------------------------------------- |
 * | `POST /fn/NAME`  | the body is the function's stdin; the answer is its stdout    |
 * | `GET /fn`        | the functions, their limits and pools (JSON)                  |
 * | `GET /fn/NAME`   | one function (JSON)                                           |
 * | `GET /metrics`   | Prometheus text; `?format=json` for JSON                      |
 *
 * `POST /fn/NAME` answers 200 with `x-exit-status` (any exit status: the
 * program ran), `x-denovisor-outcome`, `x-denovisor-run-us` and
 * `x-denovisor-reset-us`. What the guest did wrong is a 5xx with a JSON body
 * `{ error, reason, function }`: crashed or killed by a signal 502, timed out
 * 504, over its memory limit 507, over its output limit 502, broke the
 * mailbox protocol 502; an input over the limit is 413, a full queue 503, an
 * unknown NAME 404, a wrong method 405. Every per-request failure is
 * contained: the VM is reset (or replaced) and the next request is served.
 *
 * The overhead model: a sample of requests (`nativeSampleRate`, default 0)
 * is also run natively, the same program with the same argv, env and stdin
 * as a host subprocess, after the answer is sent; `GET /metrics` reports the
 * medians of T_virt and T_native and their difference and ratio. **Native
 * sampling runs the function on the host without isolation**: enable it only
 * for code you trust.
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";
import { BodyError, readBoundedBody } from "../http_body.ts";
import {
  type FunctionBackend,
  type FunctionVm,
  type InvokeResult,
  KVM_BACKEND,
} from "./backend.ts";
import {
  checkFunctionName,
  type FunctionSpec,
  type LoadedFunction,
  loadFunction,
} from "./function.ts";
import { FunctionMetrics, type FunctionMetricsSnapshot, toFunctionPrometheus } from "./metrics.ts";
import { NATIVE_BACKEND } from "./native.ts";
import type { PoolPolicy } from "./policy.ts";
import { FunctionPool, type PoolInvocation } from "./pool.ts";

/** How {@link Service.start} serves. */
export interface ServiceOptions {
  /** The TCP port (default 8080; 0 picks a free one: see {@link Service.port}). */
  port?: number;
  /** The address to listen on (default `127.0.0.1`). */
  hostname?: string;
  /** The functions (at least one; names unique). */
  functions: FunctionSpec[];
  /** Every pool's sizing (a function's own spec cannot override it yet). */
  pool?: Partial<PoolPolicy>;
  /** Requests that may wait for a VM, per function (default 256). */
  queueMax?: number;
  /** How long a request may wait for a VM, in ms (default 30 s). */
  queueTimeoutMs?: number;
  /** The fraction of requests also run natively for the overhead model, 0 to 1
   * (default 0: off). Native runs are NOT isolated: opt-in for trusted code. */
  nativeSampleRate?: number;
  /** Where VMs come from (default the KVM backend; `NATIVE_BACKEND` of
   * `native.ts` serves the functions as host subprocesses, unisolated). */
  backend?: FunctionBackend;
}

/** The status, outcome and error of an invocation's answer. */
export interface InvocationAnswer {
  /** The HTTP status. */
  status: number;
  /** `exited`, `timeout`, `crashed`, `signal`, `memory_limit`, ... */
  outcome: string;
  /** For a failure: what kind, in words. */
  error?: string;
}

/**
 * How an invocation is answered: 200 for a program that exited (whatever its
 * status), a 4xx or 5xx naming what went wrong otherwise.
 *
 * @param result What the VM reported.
 * @returns The HTTP status, the outcome label, and the error for a failure.
 * @example
 * ```ts
 * import { answerOf } from "denovisor/src/serverless/service.ts";
 * console.log(answerOf({ status: "timeout", outcome: null }).status); // 504
 * ```
 */
export function answerOf(result: Pick<InvokeResult, "status" | "outcome">): InvocationAnswer {
  switch (result.status) {
    case "done":
      switch (result.outcome) {
        case "exited":
          return { status: 200, outcome: "exited" };
        case "memory_limit":
          return {
            status: 507,
            outcome: "memory_limit",
            error: "the function exceeded its memory limit",
          };
        case "output_limit":
          return {
            status: 502,
            outcome: "output_limit",
            error: "the function exceeded its output limit",
          };
        case "signal":
          return { status: 502, outcome: "signal", error: "the function was killed by a signal" };
        case "init_failed":
          return {
            status: 502,
            outcome: "init_failed",
            error: "the function failed to initialize",
          };
        default:
          return {
            status: 502,
            outcome: "protocol_error",
            error: "the function's VM ended without an outcome",
          };
      }
    case "timeout":
      return { status: 504, outcome: "timeout", error: "the function ran over its time limit" };
    case "crashed":
      return { status: 502, outcome: "crashed", error: "the function crashed" };
    case "protocol_error":
      return {
        status: 502,
        outcome: "protocol_error",
        error: "the function broke the VM protocol",
      };
    case "input_too_large":
      return {
        status: 413,
        outcome: "input_too_large",
        error: "the input is larger than the function accepts",
      };
    case "stopped":
      return { status: 503, outcome: "stopped", error: "the function's VM was stopped" };
    default:
      return {
        status: 502,
        outcome: "protocol_error",
        error: "the function's VM reported an unknown status",
      };
  }
}

/** An error answered as JSON with an HTTP status. */
class HttpFailure extends Error {
  constructor(
    readonly status: number,
    readonly outcome: string,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

function json(body: unknown, status = 200, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body) + "\n", {
    status,
    headers: { "content-type": "application/json", ...headers },
  });
}

/** The last bytes of stderr, as text, for an error answer. */
const STDERR_TAIL_BYTES = 4096;

/** Reads a request body of at most `limit` bytes, answering each problem with its status. */
async function readBody(request: Request, limit: number, timeoutMs: number): Promise<Uint8Array> {
  try {
    return await readBoundedBody(request, limit, timeoutMs);
  } catch (e) {
    if (!(e instanceof BodyError)) throw e;
    const [status, outcome] = e.problem === "too_large"
      ? [413, "input_too_large"]
      : e.problem === "timeout"
      ? [408, "body_timeout"]
      : [400, "bad_request"];
    throw new HttpFailure(status, outcome, e.message);
  }
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** One served function. */
interface Served {
  fn: LoadedFunction;
  pool: FunctionPool;
  metrics: FunctionMetrics;
  sampleRate: number;
  /** The same program as a host subprocess, for the overhead model's samples. */
  native: FunctionVm | undefined;
  /** A native sample runs now (one at a time per function). */
  sampling: boolean;
}

/** A function as `GET /fn` lists it. */
export interface ServedFunctionInfo {
  /** Its name. */
  name: string;
  /** The program's host path. */
  program: string;
  /** Its arguments. */
  argv: string[];
  /** Guest RAM in MiB. */
  memoryMiB: number;
  /** The limits in force (input and output also bounded by the runtime's buffers). */
  limits: { timeoutMs: number; memoryBytes: number; outputBytes: number; inputBytes: number };
  /** Where its VMs come from (`kvm`, `native`). */
  backend: string;
  /** The pool's bounds. */
  pool: { min: number; max: number };
  /** The fraction of requests also run natively. */
  nativeSampleRate: number;
}

/** How long a request body may take to arrive. */
const BODY_TIMEOUT_MS = 30_000;

/**
 * A running function service. `await using` (or {@link Service.close}) stops
 * it: no new connections, requests in flight finish, every VM is closed.
 *
 * @example
 * ```ts ignore
 * import { Service } from "denovisor";
 * await using service = await Service.start({
 *   port: 8080,
 *   functions: [{ name: "wc", program: "/bin/busybox", argv: ["busybox", "wc", "-c"] }],
 * });
 * const answer = await fetch(`${service.url}fn/wc`, { method: "POST", body: "hello" });
 * console.log(answer.headers.get("x-exit-status"), await answer.text()); // 0 "5\n"
 * ```
 */
export class Service implements AsyncDisposable, Disposable {
  readonly #served: Map<string, Served>;
  readonly #samples = new Set<Promise<void>>();
  #server: Deno.HttpServer<Deno.NetAddr> | undefined;
  #closing: Promise<void> | undefined;

  private constructor(served: Map<string, Served>) {
    this.#served = served;
  }

  /**
   * Checks and loads every function, boots each one's pool (first VM to
   * READY, snapshot, warm restores), then listens.
   *
   * @param options Port, address, functions, pool sizing, native sampling.
   * @returns The service, listening.
   * @throws {DenovisorError} `INVALID_ARGUMENT` for a bad spec or option (a
   *   function that does not initialize throws its guest's reason), `BUSY`
   *   when the port is taken.
   */
  static async start(options: ServiceOptions): Promise<Service> {
    const specs = options.functions;
    if (!Array.isArray(specs) || specs.length === 0) {
      throw new DenovisorError("INVALID_ARGUMENT", "the service needs at least one function");
    }
    const names = new Set<string>();
    for (const spec of specs) {
      checkFunctionName(spec?.name);
      if (names.has(spec.name)) {
        throw new DenovisorError("INVALID_ARGUMENT", `function ${spec.name} is listed twice`);
      }
      names.add(spec.name);
    }
    const port = options.port ?? 8080;
    if (!Number.isSafeInteger(port) || port < 0 || port > 65535) {
      throw new DenovisorError("INVALID_ARGUMENT", `port must be from 0 to 65535, got ${port}`);
    }
    const defaultRate = options.nativeSampleRate ?? 0;
    if (!(defaultRate >= 0 && defaultRate <= 1)) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `nativeSampleRate must be from 0 to 1, got ${defaultRate}`,
      );
    }
    const loaded = await Promise.all(specs.map(loadFunction));
    const backend = options.backend ?? KVM_BACKEND;
    const served = new Map<string, Served>();
    const service = new Service(served);
    try {
      const started = await Promise.allSettled(loaded.map(async (fn) => {
        const pool = await FunctionPool.start(fn, backend, {
          ...(options.pool ? { policy: options.pool } : {}),
          ...(options.queueMax === undefined ? {} : { queueMax: options.queueMax }),
          ...(options.queueTimeoutMs === undefined
            ? {}
            : { queueTimeoutMs: options.queueTimeoutMs }),
        });
        const sampleRate = fn.nativeSampleRate ?? defaultRate;
        served.set(fn.name, {
          fn,
          pool,
          metrics: new FunctionMetrics(fn.name, sampleRate),
          sampleRate,
          native: undefined,
          sampling: false,
        });
        if (sampleRate > 0) {
          served.get(fn.name)!.native = await NATIVE_BACKEND.start({
            program: fn.program,
            argv: fn.argv,
            env: fn.env,
          });
        }
      }));
      // Listed in the order given, not the order the pools became warm.
      const warm = new Map(served);
      served.clear();
      for (const fn of loaded) if (warm.has(fn.name)) served.set(fn.name, warm.get(fn.name)!);
      const failed = started.find((s) => s.status === "rejected");
      if (failed) {
        const i = started.indexOf(failed);
        const e = (failed as PromiseRejectedResult).reason;
        if (e instanceof DenovisorError) {
          throw new DenovisorError(e.code, `function ${loaded[i].name}: ${e.message}`, {
            cause: e,
          });
        }
        throw e;
      }
      const hostname = options.hostname ?? "127.0.0.1";
      try {
        service.#server = Deno.serve({
          port,
          hostname,
          onListen: () => {},
          onError: (e) => json({ error: "internal", reason: String(e) }, 500),
        }, (request) => service.fetch(request));
      } catch (e) {
        if (e instanceof Deno.errors.AddrInUse) {
          throw new DenovisorError("BUSY", `another server listens on ${hostname}:${port}`);
        }
        throw new DenovisorError("IO", `cannot listen on ${hostname}:${port}: ${e}`);
      }
      return service;
    } catch (e) {
      await service.close();
      throw e;
    }
  }

  /** The port listened on. */
  get port(): number {
    return this.#server?.addr.port ?? 0;
  }

  /** The address listened on. */
  get hostname(): string {
    return this.#server?.addr.hostname ?? "";
  }

  /** The service's base URL, ending with `/`. */
  get url(): string {
    const host = this.hostname.includes(":") ? `[${this.hostname}]` : this.hostname;
    return `http://${host}:${this.port}/`;
  }

  /** The names of the functions served. */
  get functions(): string[] {
    return [...this.#served.keys()];
  }

  /**
   * Answers one request (what the HTTP server calls; usable without a
   * socket). Never throws: every failure is an error answer.
   *
   * @param request The request.
   * @returns The answer.
   */
  async fetch(request: Request): Promise<Response> {
    try {
      return await this.#route(request);
    } catch (e) {
      if (e instanceof HttpFailure) {
        return json({ error: e.outcome, reason: e.message }, e.status, e.headers);
      }
      return json({ error: "internal", reason: e instanceof Error ? e.message : String(e) }, 500);
    }
  }

  async #route(request: Request): Promise<Response> {
    const url = new URL(request.url);
    const path = url.pathname;
    const allow = (methods: string[]) => {
      if (!methods.includes(request.method)) {
        throw new HttpFailure(
          405,
          "method_not_allowed",
          `${path} takes ${methods.join(", ")}, not ${request.method}`,
          { allow: methods.join(", ") },
        );
      }
    };
    if (path === "/metrics") {
      allow(["GET"]);
      return this.#metrics(url);
    }
    if (path === "/fn" || path === "/fn/") {
      allow(["GET"]);
      return json({ functions: [...this.#served.values()].map((s) => this.#info(s)) });
    }
    if (path.startsWith("/fn/")) {
      const name = decodeURIComponent(path.slice(4));
      const served = this.#served.get(name);
      if (!served) throw new HttpFailure(404, "not_found", `no function ${JSON.stringify(name)}`);
      allow(["POST", "GET"]);
      if (request.method === "GET") return json(this.#info(served));
      return await this.#invoke(served, request);
    }
    throw new HttpFailure(404, "not_found", `no route ${path}`);
  }

  #info(s: Served): ServedFunctionInfo {
    const ready = s.pool.ready;
    const policy = s.pool.policy;
    return {
      name: s.fn.name,
      program: s.fn.programPath,
      argv: s.fn.argv,
      memoryMiB: s.fn.memoryMiB,
      limits: {
        ...s.fn.limits,
        inputBytes: Math.min(s.fn.limits.inputBytes, ready.inputCapacity),
        outputBytes: Math.min(
          s.fn.limits.outputBytes,
          ready.stdoutCapacity + ready.stderrCapacity,
        ),
      },
      backend: s.pool.backendKind,
      pool: { min: policy.min, max: policy.max },
      nativeSampleRate: s.sampleRate,
    };
  }

  #metrics(url: URL): Response {
    const format = url.searchParams.get("format") ?? "prometheus";
    if (format !== "json" && format !== "prometheus") {
      throw new HttpFailure(
        400,
        "bad_request",
        `format must be json or prometheus, got ${JSON.stringify(format)}`,
      );
    }
    const snapshots = this.metrics();
    if (format === "json") return json({ functions: snapshots });
    return new Response(toFunctionPrometheus(snapshots), {
      headers: { "content-type": "text/plain; version=0.0.4; charset=utf-8" },
    });
  }

  /**
   * Every function's metrics now.
   *
   * @returns One snapshot per function.
   */
  metrics(): FunctionMetricsSnapshot[] {
    return [...this.#served.values()].map((s) => s.metrics.snapshot(s.pool.stats()));
  }

  async #invoke(s: Served, request: Request): Promise<Response> {
    const started = performance.now();
    let status = 500;
    let outcome = "internal";
    try {
      const limit = Math.min(s.fn.limits.inputBytes, s.pool.ready.inputCapacity);
      let input: Uint8Array;
      try {
        input = await readBody(request, limit, BODY_TIMEOUT_MS);
      } catch (e) {
        if (e instanceof HttpFailure) {
          status = e.status;
          outcome = e.outcome;
          return json({ error: e.outcome, reason: e.message, function: s.fn.name }, e.status);
        }
        throw e;
      }
      let invocation: PoolInvocation;
      try {
        invocation = await s.pool.invoke(input);
      } catch (e) {
        const busy = e instanceof DenovisorError &&
          (e.code === "OVERLOADED" || e.code === "CLOSED");
        status = busy ? 503 : 500;
        outcome = busy ? (e.code === "CLOSED" ? "closed" : "overloaded") : "vm_error";
        return json(
          {
            error: outcome,
            reason: e instanceof Error ? e.message : String(e),
            function: s.fn.name,
          },
          status,
          busy ? { "retry-after": "1" } : {},
        );
      }
      const { result } = invocation;
      s.metrics.countInvocation(result);
      const answer = answerOf(result);
      status = answer.status;
      outcome = answer.outcome;
      const headers: Record<string, string> = {
        "x-exit-status": `${result.exitStatus}`,
        "x-denovisor-outcome": answer.outcome,
        "x-denovisor-run-us": `${Math.round(result.runNs / 1000)}`,
        "x-denovisor-reset-us": `${Math.round(result.resetNs / 1000)}`,
      };
      if (answer.status === 200) {
        this.#maybeSample(s, input, invocation);
        return new Response(result.stdout as Uint8Array<ArrayBuffer>, {
          status: 200,
          headers: { "content-type": "application/octet-stream", ...headers },
        });
      }
      const tail = result.stderr.subarray(Math.max(0, result.stderr.length - STDERR_TAIL_BYTES));
      return json(
        {
          error: answer.error,
          reason: result.reason ?? answer.error,
          function: s.fn.name,
          outcome: answer.outcome,
          exitStatus: result.exitStatus,
          stderr: new TextDecoder().decode(tail),
        },
        answer.status,
        headers,
      );
    } catch (e) {
      status = 500;
      outcome = "internal";
      return json(
        {
          error: "internal",
          reason: e instanceof Error ? e.message : String(e),
          function: s.fn.name,
        },
        500,
      );
    } finally {
      s.metrics.countRequest(status, outcome, (performance.now() - started) / 1000);
    }
  }

  /** Runs the request natively too, after the answer, on the sample. */
  #maybeSample(s: Served, input: Uint8Array, invocation: PoolInvocation): void {
    if (!s.native || s.sampling || this.#closing || Math.random() >= s.sampleRate) return;
    s.sampling = true;
    const native = s.native;
    const { result } = invocation;
    const sample = (async () => {
      try {
        const r = await native.invokeAsync(input, {
          timeoutMs: s.fn.limits.timeoutMs,
          outputLimit: s.fn.limits.outputBytes,
        });
        const ran = r.status === "done";
        const matched = ran && r.outcome === result.outcome && r.exitStatus === result.exitStatus &&
          sameBytes(r.stdout, result.stdout);
        s.metrics.countOverheadSample(
          invocation.heldMs * 1000,
          ran ? r.runNs / 1000 : null,
          matched,
        );
      } catch {
        s.metrics.countOverheadSample(invocation.heldMs * 1000, null, false);
      } finally {
        s.sampling = false;
      }
    })();
    this.#samples.add(sample);
    sample.finally(() => this.#samples.delete(sample));
  }

  /**
   * Stops the service: stops listening, lets requests in flight finish, then
   * closes every pool (every VM) and native sampler. Idempotent.
   *
   * @returns Once everything is closed.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      await this.#server?.shutdown().catch(() => {});
      await Promise.allSettled([...this.#samples]);
      await Promise.allSettled([...this.#served.values()].map(async (s) => {
        await s.pool.close();
        s.native?.close();
      }));
    })();
    return this.#closing;
  }

  /** Same as {@link Service.close}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  /** Starts {@link Service.close} without waiting for it (for `using`; prefer `await using`). */
  [Symbol.dispose](): void {
    void this.close();
  }
}
