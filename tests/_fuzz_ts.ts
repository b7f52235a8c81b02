/**
 * The TypeScript fuzz targets `deno task fuzz` runs (scripts/fuzz.ts):
 * random and mutated inputs for N seconds against
 *
 * - `ts_http_body`: {@link readBoundedBody} with bodies of random chunks,
 *   honest or lying `content-length` headers and random limits;
 * - `ts_api_json`: the control API's request routing, JSON parsing and field
 *   validation ({@link handleApiRequest}) with random methods, paths and
 *   mutated JSON bodies, on a stand-in VM whose every member refuses;
 * - `ts_ffi_abi`: the C ABI through `Core` with random handles, random
 *   buffers and `Uint8Array`s whose `length` lies (redefined to more than the
 *   buffer holds).
 *
 * These loops are mutation-based, not coverage-guided (Deno exposes no
 * coverage counters to a running program); "coverage" is the number of
 * distinct outcomes (status and error code) seen. Usage:
 * `deno run -A tests/_fuzz_ts.ts TARGET SECONDS ARTIFACT_DIR`; prints one
 * JSON line; exits 1 on a finding, with the input in ARTIFACT_DIR.
 *
 * @module
 */

import { BodyError, readBoundedBody } from "../src/http_body.ts";
import { handleApiRequest } from "../src/api/server.ts";
import type { Vm } from "../src/vm.ts";
import { DenovisorError } from "../src/errors.ts";
import { openCore } from "../src/ffi.ts";

let state = BigInt(Date.now()) | 1n;
/** xorshift64: a number in [0, n). */
function rand(n: number): number {
  state ^= (state << 13n) & 0xffff_ffff_ffff_ffffn;
  state ^= state >> 7n;
  state ^= (state << 17n) & 0xffff_ffff_ffff_ffffn;
  return Number(state % BigInt(Math.max(1, n)));
}

function randomBytes(n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = rand(256);
  return b;
}

const SEED_BODIES = [
  "{}",
  '{"state":"running"}',
  '{"state":"stopped"}',
  '{"dir":"/tmp/snap","resume":false}',
  '{"dir":"/tmp/snap","diff":true,"parent":"/tmp/base"}',
  '{"dir":"/tmp/snap","snapshot_type":"Diff","parent":"/tmp/p"}',
  '{"dir":"/tmp/snap","mode":"eager"}',
  '{"to":"tcp:127.0.0.1:4000"}',
  '{"to":"unix:/tmp/m.sock"}',
  '{"path":"/tmp/x"}',
  '{"kind":"rng"}',
  '{"kind":"block","path":"/tmp/disk.img","readonly":true}',
  '{"kind":"vsock","cid":3,"path":"/tmp/v.sock"}',
  '{"targetMiB":16}',
  '{"dir":"/tmp/snap","diff":true}',
  '{"state":"paused"}',
  '{"op":"stats"}',
  '{"address":"127.0.0.1:4000"}',
  "[1,2,3]",
  "null",
  '"x"',
];
const PATHS = [
  "/vm",
  "/vm/state",
  "/balloon",
  "/metrics",
  "/snapshot/create",
  "/snapshot/load",
  "/migrate",
  "/",
  "/vm/",
  "/%00",
  "/constructor",
  "/__proto__",
];
const METHODS = ["GET", "PUT", "POST", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/** Mutates `text` a few times: flips, inserts, deletes, splices values. */
function mutate(text: string): string {
  let s = text;
  const tokens = ['"', "{", "}", "[", "]", ",", ":", "null", "true", "-1", "1e309", "\\u0000", "ﬀ"];
  for (let i = 0, n = 1 + rand(4); i < n; i++) {
    const at = rand(s.length + 1);
    switch (rand(4)) {
      case 0:
        s = s.slice(0, at) + tokens[rand(tokens.length)] + s.slice(at);
        break;
      case 1:
        s = s.slice(0, at) + s.slice(at + 1 + rand(4));
        break;
      case 2:
        s = s.slice(0, at) + String.fromCharCode(rand(0x80)) + s.slice(at + 1);
        break;
      default:
        s = s.slice(0, at) + SEED_BODIES[rand(SEED_BODIES.length)] + s.slice(at);
    }
  }
  return s;
}

/** A VM stand-in: every member access throws, as a VM that refuses everything. */
function refusingVm(): Vm {
  return new Proxy({}, {
    get(_t, key) {
      if (key === "then") return undefined;
      throw new DenovisorError("CLOSED", `stand-in VM: ${String(key)}`);
    },
  }) as unknown as Vm;
}

interface Case {
  run(): Promise<string>;
  describe(): Uint8Array;
}

function httpBodyCase(): Case {
  const chunks = Array.from({ length: rand(5) }, () => randomBytes(rand(64)));
  const total = chunks.reduce((n, c) => n + c.length, 0);
  const limit = rand(200);
  const header = rand(3) === 0 ? null : String(rand(2) === 0 ? total : rand(400));
  return {
    async run() {
      const body = new ReadableStream<Uint8Array>({
        start(c) {
          for (const chunk of chunks) c.enqueue(chunk);
          c.close();
        },
      });
      const headers = header === null ? undefined : { "content-length": header };
      const request = new Request("http://fuzz/", { method: "PUT", body, headers });
      try {
        const bytes = await readBoundedBody(request, limit, 1000);
        if (bytes.length !== total || total > limit) {
          throw new Error(`read ${bytes.length} of ${total} bytes with limit ${limit}`);
        }
        return "ok";
      } catch (e) {
        if (!(e instanceof BodyError)) throw e;
        if (e.problem === "too_large" && total <= limit && Number(header) <= limit) {
          throw new Error(`too_large for ${total} bytes under limit ${limit}`);
        }
        return e.problem;
      }
    },
    describe: () =>
      new TextEncoder().encode(
        JSON.stringify({ chunks: chunks.map((c) => [...c]), limit, header }),
      ),
  };
}

function apiCase(): Case {
  const method = METHODS[rand(METHODS.length)];
  const path = PATHS[rand(PATHS.length)] + (rand(8) === 0 ? "?x=1" : "");
  const body = rand(2) === 0 ? mutate(SEED_BODIES[rand(SEED_BODIES.length)]) : "";
  return {
    async run() {
      const init: RequestInit = { method };
      if (body !== "" && method !== "GET" && method !== "HEAD") init.body = body;
      const refuse = () => {
        throw new DenovisorError("CLOSED", "stand-in handler");
      };
      const answer = await handleApiRequest(refusingVm(), new Request(`http://vm${path}`, init), {
        maxBodyBytes: 4096,
        handlers: { snapshot: refuse, restore: refuse, migrate: refuse },
      });
      const text = await answer.text();
      if (answer.status === 500) {
        // The stand-in's refusal surfaces as a state error, never an internal one.
        const parsed = JSON.parse(text) as { code?: string };
        if (parsed.code !== "CLOSED") throw new Error(`${answer.status} ${text}`);
      }
      const parsed = text.startsWith("{")
        ? JSON.parse(text) as { code?: string; message?: string }
        : {};
      // An outcome: the status, the code and the message's shape (values cut).
      const shape = (parsed.message ?? "").replace(/got .*|: .*|\d+/g, "").slice(0, 60);
      return `${answer.status}:${parsed.code ?? ""}:${shape}`;
    },
    describe: () => new TextEncoder().encode(JSON.stringify({ method, path, body })),
  };
}

/** A Uint8Array whose `length` (and `byteLength`) claim `claimed` bytes. */
function lying(real: number, claimed: number): Uint8Array {
  const b = randomBytes(real);
  Object.defineProperty(b, "length", { value: claimed });
  Object.defineProperty(b, "byteLength", { value: claimed });
  return b;
}

async function ffiCase(): Promise<Case> {
  const core = await openCore();
  const handle = [0, 1, 2, 0xffff_ffff, rand(1 << 16), rand(2 ** 32)][rand(6)];
  const real = rand(64);
  const buf = rand(2) === 0 ? lying(real, real + 1 + rand(1 << 20)) : randomBytes(real);
  const call = rand(8);
  /** What `f` gives on `b`, as a comparable string. */
  const outcome = (f: (b: Uint8Array) => unknown, b: Uint8Array): string => {
    try {
      return JSON.stringify(f(b), (_k, v) => typeof v === "bigint" ? String(v) : v);
    } catch (e) {
      if (!(e instanceof DenovisorError)) throw e;
      return `${e.code}: ${e.message}`;
    }
  };
  /** Calls `f` on `buf` and on an honest copy: a lying length must change nothing. */
  const same = (name: string, f: (b: Uint8Array) => unknown): string => {
    const honest = Uint8Array.from(buf.subarray(0));
    const got = outcome(f, buf);
    const want = outcome(f, honest);
    if (got !== want) {
      throw new Error(
        `${name}: a Uint8Array claiming ${buf.length} bytes (holding ${real}) ` +
          `gave ${got.slice(0, 200)}, its honest copy ${want.slice(0, 200)}`,
      );
    }
    return `${call}:${want.slice(0, 40).replace(/\d+/g, "")}`;
  };
  return {
    run: () =>
      Promise.resolve().then(() => {
        try {
          switch (call) {
            case 0:
              core.vmWriteMemory(handle, BigInt(rand(1 << 20)), buf);
              break;
            case 1:
              core.vmLoadElf(handle, buf, rand(4));
              break;
            case 2:
              core.vmLoadFlat(handle, buf, BigInt(rand(1 << 20)), rand(4));
              break;
            case 3:
              core.vmConsoleInput(handle, buf);
              break;
            case 4:
              core.vmUnpackPages(handle, buf);
              break;
            case 5:
              core.vmApplyMigrationState(handle, buf);
              break;
            case 6:
              return same("inspectImage", (b) => core.inspectImage(b));
            default:
              return same(
                "linuxCheck",
                (b) => core.linuxCheck(b, b.subarray(0, rand(2)), new Uint8Array(0), 256n << 20n),
              );
          }
          return `${call}:ok`;
        } catch (e) {
          if (!(e instanceof DenovisorError)) throw e;
          return `${call}:${e.code}`;
        }
      }),
    describe: () =>
      new TextEncoder().encode(
        JSON.stringify({ call, handle, real, claimed: buf.length, bytes: [...buf.subarray(0)] }),
      ),
  };
}

const TARGETS: Record<string, () => Case | Promise<Case>> = {
  ts_http_body: httpBodyCase,
  ts_api_json: apiCase,
  ts_ffi_abi: ffiCase,
};

async function main(): Promise<number> {
  const [target, secondsArg, artifacts] = Deno.args;
  const make = TARGETS[target];
  if (!make) {
    console.error(`unknown target ${target}; targets: ${Object.keys(TARGETS).join(", ")}`);
    return 2;
  }
  const seconds = Number(secondsArg ?? "10");
  const outcomes = new Set<string>();
  const start = performance.now();
  let executions = 0;
  let problem = "";
  while (performance.now() - start < seconds * 1000) {
    const c = await make();
    executions++;
    try {
      outcomes.add(await c.run());
    } catch (e) {
      problem = `${e instanceof Error ? e.stack ?? e.message : e}`.slice(0, 400);
      const path = `${artifacts ?? "."}/${target}-crash-${Date.now()}.json`;
      Deno.writeFileSync(path, c.describe());
      problem += ` (input: ${path})`;
      break;
    }
  }
  const elapsed = (performance.now() - start) / 1000;
  console.log(JSON.stringify({
    target,
    executions,
    execPerSecond: Math.round(executions / elapsed),
    coverage: outcomes.size,
    outcomes: Deno.env.get("FUZZ_TS_VERBOSE") ? [...outcomes] : undefined,
    features: 0,
    corpus: target === "ts_api_json" ? SEED_BODIES.length : 0,
    crashes: problem ? 1 : 0,
    problem,
  }));
  return problem ? 1 : 0;
}

if (import.meta.main) Deno.exit(await main());
