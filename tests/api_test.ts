/**
 * The control API (src/api/): routing and validation without KVM (every 4xx,
 * the 501 of an absent handler, a VM that is never touched by a bad request),
 * the socket's life (stale replaced, live refused, removed on close), clients
 * that go away mid-request, and a real guest paused, resumed, measured and
 * stopped over the socket.
 */

import assert from "node:assert/strict";
import { Vm } from "../src/vm.ts";
import {
  type ApiHandlers,
  checkApiSocketPath,
  handleApiRequest,
  MAX_BODY_BYTES,
  serveApi,
} from "../src/api/server.ts";
import { ApiClient, ApiError } from "../src/api/client.ts";
import { formatMigrationAddress, parseMigrationAddress } from "../src/api/address.ts";
import { DenovisorError } from "../src/errors.ts";
import { kvmTest, testGuest } from "./_helpers.ts";

/** A VM that fails the test if anything reads it: bad requests must not reach the VM. */
const UNTOUCHABLE = new Proxy({}, {
  get(_target, key) {
    throw new Error(`the VM was touched (${String(key)})`);
  },
}) as unknown as Vm;

async function answer(
  method: string,
  path: string,
  body?: BodyInit,
  options: { handlers?: ApiHandlers; headers?: Record<string, string>; vm?: Vm } = {},
): Promise<{ status: number; body: Record<string, unknown>; headers: Headers }> {
  const response = await handleApiRequest(
    options.vm ?? UNTOUCHABLE,
    new Request(`http://localhost${path}`, { method, body, headers: options.headers }),
    { handlers: options.handlers },
  );
  assert.equal(response.headers.get("content-type"), "application/json");
  return { status: response.status, body: await response.json(), headers: response.headers };
}

Deno.test("bad requests get 404, 405, 400, 413 or 501 with a JSON code, before the VM is touched", async () => {
  const cases: [string, string, BodyInit | undefined, number, string, RegExp][] = [
    ["GET", "/nope", undefined, 404, "NOT_FOUND", /no route \/nope/],
    ["GET", "/vm/", undefined, 404, "NOT_FOUND", /no route/],
    ["GET", "/constructor", undefined, 404, "NOT_FOUND", /no route/],
    ["POST", "/vm", "{}", 405, "METHOD_NOT_ALLOWED", /\/vm takes GET, not POST/],
    ["GET", "/vm/state", undefined, 405, "METHOD_NOT_ALLOWED", /takes PUT/],
    ["DELETE", "/metrics", undefined, 405, "METHOD_NOT_ALLOWED", /takes GET/],
    ["PUT", "/vm/state", undefined, 400, "BAD_REQUEST", /needs a body/],
    ["PUT", "/vm/state", "{", 400, "BAD_REQUEST", /not JSON/],
    ["PUT", "/vm/state", "[1]", 400, "BAD_REQUEST", /must be a JSON object/],
    ["PUT", "/vm/state", "null", 400, "BAD_REQUEST", /must be a JSON object/],
    ["PUT", "/vm/state", new Uint8Array([0x7b, 0xff, 0x7d]), 400, "BAD_REQUEST", /not UTF-8/],
    ["PUT", "/vm/state", "{}", 400, "BAD_REQUEST", /missing field "state"/],
    ["PUT", "/vm/state", '{"state":"asleep"}', 400, "BAD_REQUEST", /"state" must be/],
    ["PUT", "/vm/state", '{"state":1}', 400, "BAD_REQUEST", /"state" must be/],
    ["PUT", "/vm/state", '{"state":"paused","x":1}', 400, "BAD_REQUEST", /unknown field "x"/],
    ["PUT", "/balloon", '{"targetMiB":"64"}', 400, "BAD_REQUEST", /"targetMiB" must be/],
    ["PUT", "/balloon", '{"targetMiB":-1}', 400, "BAD_REQUEST", /"targetMiB" must be/],
    ["PUT", "/balloon", '{"targetMiB":1.5}', 400, "BAD_REQUEST", /"targetMiB" must be/],
    ["PUT", "/balloon", '{"target":64}', 400, "BAD_REQUEST", /unknown field "target"/],
    [
      "PUT",
      "/vm/state",
      JSON.stringify({ state: "paused", pad: "x".repeat(MAX_BODY_BYTES) }),
      413,
      "PAYLOAD_TOO_LARGE",
      /larger than 65536 bytes/,
    ],
    [
      "PUT",
      "/snapshot/create",
      '{"dir":"/tmp/s"}',
      501,
      "NOT_IMPLEMENTED",
      /snapshot creation is not available in this server \(no snapshot handler\)/,
    ],
    ["PUT", "/snapshot/load", '{"dir":"/tmp/s"}', 501, "NOT_IMPLEMENTED", /no restore handler/],
    ["PUT", "/migrate", '{"to":"tcp:127.0.0.1:1"}', 501, "NOT_IMPLEMENTED", /no migrate handler/],
    ["GET", "/metrics?format=xml", undefined, 400, "BAD_REQUEST", /json or prometheus/],
  ];
  for (const [method, path, body, status, code, message] of cases) {
    const r = await answer(method, path, body);
    const what = `${method} ${path} ${typeof body === "string" ? body.slice(0, 40) : ""}`;
    assert.equal(r.status, status, `${what}: ${JSON.stringify(r.body)}`);
    assert.equal(r.body.code, code, what);
    assert.match(String(r.body.message), message, what);
    assert.deepEqual(Object.keys(r.body).sort(), ["code", "message"], what);
  }
  const r = await answer("PUT", "/vm", "{}");
  assert.equal(r.headers.get("allow"), "GET");
});

Deno.test("a body over the limit is refused while it streams, without a Content-Length", async () => {
  let pulled = 0;
  const endless = new ReadableStream<Uint8Array>({
    pull(controller) {
      // 1 MiB in all: a server without a limit would read it all and answer 400.
      if (++pulled > 64) controller.close();
      else controller.enqueue(new Uint8Array(16 * 1024).fill(0x20));
    },
  });
  const r = await answer("PUT", "/vm/state", endless);
  assert.equal(r.status, 413);
  assert.equal(r.body.code, "PAYLOAD_TOO_LARGE");
  // It stopped reading at the limit, not at the end of an endless body.
  assert.ok(pulled <= MAX_BODY_BYTES / (16 * 1024) + 3, `read ${pulled} chunks`);
});

Deno.test("snapshot, restore and migrate handlers get checked arguments, and their errors are JSON", async () => {
  const calls: unknown[] = [];
  const handlers: ApiHandlers = {
    snapshot: (dir, options) => {
      calls.push(["snapshot", dir, options]);
      return { written: dir };
    },
    restore: async (dir, options) => {
      await Promise.resolve();
      calls.push(["restore", dir, options]);
    },
    migrate: (to) => {
      calls.push(["migrate", to]);
      throw new DenovisorError("IO", `cannot reach ${to}`);
    },
  };
  let r = await answer("PUT", "/snapshot/create", '{"dir":"/s"}', { handlers });
  assert.deepEqual([r.status, r.body], [200, { written: "/s" }]);
  r = await answer("PUT", "/snapshot/create", '{"dir":"/s","resume":false}', { handlers });
  assert.equal(r.status, 200);
  r = await answer("PUT", "/snapshot/create", '{"dir":"/s","resume":"no"}', { handlers });
  assert.deepEqual([r.status, r.body.code], [400, "BAD_REQUEST"]);
  r = await answer("PUT", "/snapshot/create", '{"dir":""}', { handlers });
  assert.deepEqual([r.status, r.body.code], [400, "BAD_REQUEST"]);
  r = await answer("PUT", "/snapshot/load", '{"dir":"/s","mode":"eager"}', { handlers });
  assert.deepEqual([r.status, r.body], [200, {}]);
  r = await answer("PUT", "/snapshot/load", '{"dir":"/s","mode":"sloppy"}', { handlers });
  assert.deepEqual([r.status, r.body.code], [400, "BAD_REQUEST"]);
  r = await answer("PUT", "/migrate", '{"to":"tcp:host:0"}', { handlers });
  assert.deepEqual([r.status, r.body.code], [400, "BAD_REQUEST"]);
  assert.match(String(r.body.message), /port out of 1..65535/);
  r = await answer("PUT", "/migrate", '{"to":"tcp:[::1]:4444"}', { handlers });
  assert.deepEqual([r.status, r.body], [500, {
    code: "IO",
    message: "cannot reach tcp:[::1]:4444",
  }]);
  assert.deepEqual(calls, [
    ["snapshot", "/s", { resume: true }],
    ["snapshot", "/s", { resume: false }],
    ["restore", "/s", { mode: "eager" }],
    ["migrate", "tcp:[::1]:4444"],
  ]);
});

Deno.test("operations that change the VM run one at a time, in the order they arrived", async () => {
  const events: string[] = [];
  const slow = (name: string, ms: number) => async () => {
    events.push(`${name} start`);
    await new Promise((r) => setTimeout(r, ms));
    events.push(`${name} end`);
  };
  const handlers: ApiHandlers = {
    snapshot: slow("snapshot", 200),
    restore: slow("restore", 10),
    migrate: slow("migrate", 10),
  };
  const answers = await Promise.all([
    answer("PUT", "/snapshot/create", '{"dir":"/s"}', { handlers }),
    answer("PUT", "/migrate", '{"to":"tcp:127.0.0.1:1"}', { handlers }),
    answer("PUT", "/snapshot/load", '{"dir":"/s"}', { handlers }),
  ]);
  assert.deepEqual(answers.map((a) => a.status), [200, 200, 200]);
  assert.deepEqual(events, [
    "snapshot start",
    "snapshot end",
    "migrate start",
    "migrate end",
    "restore start",
    "restore end",
  ]);
  // A failed operation does not block the next one.
  const failing: ApiHandlers = {
    snapshot: () => Promise.reject(new DenovisorError("BUSY", "not now")),
    migrate: () => ({ ok: true }),
  };
  const [failed, next] = await Promise.all([
    answer("PUT", "/snapshot/create", '{"dir":"/s"}', { handlers: failing }),
    answer("PUT", "/migrate", '{"to":"tcp:127.0.0.1:1"}', { handlers: failing }),
  ]);
  assert.deepEqual([failed.status, failed.body.code, next.status], [409, "BUSY", 200]);
});

Deno.test("migration addresses: tcp:HOST:PORT and unix:PATH, anything else refused", () => {
  assert.deepEqual(parseMigrationAddress("tcp:127.0.0.1:4444"), {
    transport: "tcp",
    hostname: "127.0.0.1",
    port: 4444,
  });
  assert.deepEqual(parseMigrationAddress("tcp:[::1]:1"), {
    transport: "tcp",
    hostname: "::1",
    port: 1,
  });
  assert.deepEqual(parseMigrationAddress("unix:/run/m.sock"), {
    transport: "unix",
    path: "/run/m.sock",
  });
  for (const a of ["tcp:[::1]:1", "tcp:example.org:65535", "unix:/x"]) {
    assert.equal(formatMigrationAddress(parseMigrationAddress(a)), a);
  }
  for (
    const bad of [
      "",
      "tcp:",
      "tcp:host",
      "tcp:host:",
      "tcp:host:65536",
      "tcp:host:0",
      "tcp:ho st:1",
      "tcp::1:2",
      "udp:host:1",
      "unix:",
      `unix:/${"x".repeat(107)}`,
      "host:1",
    ]
  ) {
    assert.throws(() => parseMigrationAddress(bad), /migration address must be/, bad);
  }
});

/** A temporary directory for sockets, short enough for `sun_path`. */
async function socketDir(): Promise<string> {
  return await Deno.makeTempDir({ prefix: "dvapi" });
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch {
    return false;
  }
}

/** Leaves a socket file nobody listens on, as a crashed server would. */
async function staleSocket(path: string): Promise<void> {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "eval",
      `const listener = Deno.listen({ transport: "unix", path: ${JSON.stringify(path)} });` +
      // A pending accept keeps the child alive (a bare never-resolving
      // promise makes Deno exit at once, closing and removing the socket).
      `console.log("listening"); await listener.accept();`,
    ],
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const reader = child.stdout.getReader();
  const { value } = await reader.read();
  const said = new TextDecoder().decode(value ?? new Uint8Array());
  assert.match(said, /listening/, "the server child did not start listening");
  assert.ok((await Deno.lstat(path)).isSocket, "the server child's socket is there");
  child.kill("SIGKILL");
  await child.status;
  reader.releaseLock();
  await child.stdout.cancel();
}

Deno.test("a server replaces a stale socket, refuses a live one and a non-socket, and removes its socket on close", async () => {
  const dir = await socketDir();
  const path = `${dir}/vm.sock`;
  try {
    assert.equal(await checkApiSocketPath(path), "free");
    await staleSocket(path);
    assert.ok((await Deno.lstat(path)).isSocket, "the killed server left its socket");
    assert.equal(await checkApiSocketPath(path), "stale");
    const server = await serveApi(UNTOUCHABLE, { path });
    assert.equal((await Deno.lstat(path)).mode! & 0o777, 0o600);
    await assert.rejects(
      () => serveApi(UNTOUCHABLE, { path }),
      (e: unknown) =>
        e instanceof DenovisorError && e.code === "BUSY" &&
        /another server is listening on/.test(e.message),
    );
    {
      using client = new ApiClient(path);
      // The first server still answers after the second was refused.
      await assert.rejects(
        () => client.request("GET", "/nope"),
        (e: unknown) => e instanceof ApiError && e.status === 404 && e.apiCode === "NOT_FOUND",
      );
    }
    await server.close();
    assert.equal(await exists(path), false, "the socket is removed on close");
    await server.close(); // idempotent

    await Deno.writeTextFile(`${dir}/plain`, "not a socket");
    await assert.rejects(
      () => serveApi(UNTOUCHABLE, { path: `${dir}/plain` }),
      /exists and is not a socket/,
    );
    assert.equal(await Deno.readTextFile(`${dir}/plain`), "not a socket");
    await assert.rejects(
      () => serveApi(UNTOUCHABLE, { path: `${dir}/${"x".repeat(120)}` }),
      /more than 107 bytes/,
    );
    {
      await using _ = await serveApi(UNTOUCHABLE, { path });
      assert.ok(await exists(path));
    }
    assert.equal(await exists(path), false, "await using removes the socket too");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("clients that go away mid-request, or never finish their body, leave the server serving", async () => {
  const dir = await socketDir();
  const path = `${dir}/vm.sock`;
  const unhandled: unknown[] = [];
  const onUnhandled = (e: PromiseRejectionEvent) => {
    unhandled.push(e.reason);
    e.preventDefault();
  };
  globalThis.addEventListener("unhandledrejection", onUnhandled);
  try {
    await using _server = await serveApi(UNTOUCHABLE, { path, bodyTimeoutMs: 300 });
    const send = async (text: string, close: boolean) => {
      const conn = await Deno.connect({ transport: "unix", path });
      await conn.write(new TextEncoder().encode(text));
      if (close) {
        conn.close();
        return "";
      }
      const buffer = new Uint8Array(4096);
      let got = "";
      while (true) {
        const n = await conn.read(buffer);
        if (n === null) break;
        got += new TextDecoder().decode(buffer.subarray(0, n));
        if (got.includes("\r\n\r\n") && /"\}\n$/.test(got)) break;
      }
      conn.close();
      return got;
    };
    // Half the headers, then gone.
    await send("PUT /vm/state HTTP/1.1\r\nHost: x\r\nContent-Le", true);
    // The headers and part of the body, then gone.
    await send(
      'PUT /vm/state HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"state":',
      true,
    );
    // A body that never finishes: 408 once the body timeout passes.
    const slow = await send(
      'PUT /vm/state HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"state":',
      false,
    );
    assert.match(slow, /^HTTP\/1.1 408/);
    assert.match(slow, /"code":"REQUEST_TIMEOUT"/);
    // Garbage instead of HTTP.
    await send("\x00\x01\x02 not http\r\n\r\n", true);
    await new Promise((r) => setTimeout(r, 100));
    using client = new ApiClient(path);
    for (let i = 0; i < 3; i++) {
      await assert.rejects(
        () => client.request("GET", "/still-here"),
        (e: unknown) => e instanceof ApiError && e.status === 404,
      );
    }
    const tooLarge = await client.raw("PUT", "/vm/state", {
      body: { state: "paused", pad: "x".repeat(2 * MAX_BODY_BYTES) },
    });
    assert.equal(tooLarge.status, 413);
    assert.equal((await tooLarge.json()).code, "PAYLOAD_TOO_LARGE");
  } finally {
    globalThis.removeEventListener("unhandledrejection", onUnhandled);
    await Deno.remove(dir, { recursive: true });
  }
  assert.deepEqual(unhandled, []);
});

Deno.test("the client says when nothing answers, and keeps the server's code on an error answer", async () => {
  const dir = await socketDir();
  try {
    using client = new ApiClient(`${dir}/none.sock`);
    await assert.rejects(
      () => client.vm(),
      (e: unknown) =>
        e instanceof DenovisorError && e.code === "API_UNREACHABLE" &&
        /no control API answers at .*none\.sock: No such file/.test(e.message),
    );
    const path = `${dir}/vm.sock`;
    await using _server = await serveApi(UNTOUCHABLE, { path });
    using live = new ApiClient(path);
    await assert.rejects(
      () => live.snapshot("/tmp/x"),
      (e: unknown) =>
        e instanceof ApiError && e.code === "API_REFUSED" && e.status === 501 &&
        e.apiCode === "NOT_IMPLEMENTED",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** Every vCPU's exits, summed, read over the API. */
async function exitsOverApi(client: ApiClient): Promise<number> {
  return (await client.metrics()).total.exits;
}

async function waitFor(what: string, ok: () => Promise<boolean>, timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await ok())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Parses the Prometheus text format: every line a comment or `name{labels} value`. */
function parsePrometheus(text: string): Map<string, number> {
  const samples = new Map<string, number>();
  for (const line of text.trimEnd().split("\n")) {
    if (line.startsWith("# HELP ") || line.startsWith("# TYPE ")) continue;
    const m =
      /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})?) (\S+)$/
        .exec(line);
    assert.ok(m, `not a Prometheus sample: ${line}`);
    const value = Number(m[2]);
    assert.ok(!Number.isNaN(value) || m[2] === "NaN", `bad value: ${line}`);
    samples.set(m[1], value);
  }
  return samples;
}

kvmTest(
  "a running guest is shown, paused, resumed, measured and stopped over the API socket",
  async () => {
    const dir = await socketDir();
    const path = `${dir}/vm.sock`;
    try {
      using vm = await Vm.create({ memoryMiB: 4 });
      vm.load(await testGuest("ticker.S", { format: "flat" }), { mode: "user" });
      await using server = await serveApi(vm, { path });
      using client = new ApiClient(path);
      assert.equal((await client.vm()).state, "created");
      const run = vm.run({ timeoutMs: 120_000 });
      // A failed assertion closes the VM under the run: its rejection must not hide the failure.
      run.catch(() => {});
      await waitFor("the guest's first exits", async () => (await exitsOverApi(client)) > 2);

      const info = await client.vm();
      assert.equal(info.state, "running");
      assert.deepEqual(info.config, {
        memoryMiB: 4,
        vcpus: 1,
        interrupts: false,
        dedup: false,
        unhandledIo: "ignore",
        console: "capture",
        timeoutMs: 0,
      });
      assert.equal(info.image?.format, "flat");
      assert.equal(info.image?.entry, "0x100000");
      assert.ok(info.devices.buses.pio.devices.some((d) => d.name === "com1"));

      assert.deepEqual(await client.pause(), { state: "paused" });
      assert.equal((await client.vm()).state, "paused");
      const paused = await exitsOverApi(client);
      await new Promise((r) => setTimeout(r, 500));
      assert.equal(await exitsOverApi(client), paused, "no exits while paused");
      assert.deepEqual(await client.pause(), { state: "paused" }, "pausing twice is harmless");

      assert.deepEqual(await client.resume(), { state: "running" });
      await waitFor("exits after the resume", async () => (await exitsOverApi(client)) > paused);

      const metrics = await client.metrics();
      assert.equal(metrics.state, "running");
      assert.equal(metrics.vcpus.length, 1);
      assert.ok(metrics.total.ioOut > 0);
      assert.ok(metrics.vcpus[0].console.bytes > 0, "the guest's dots are counted");
      assert.equal(metrics.memory.sizeBytes, 4 << 20);
      assert.ok(metrics.memory.residentBytes > 0);
      const prometheus = parsePrometheus(await client.prometheus());
      const viaQuery = await client.raw("GET", "/metrics?format=prometheus");
      assert.match(viaQuery.headers.get("content-type")!, /^text\/plain; version=0.0.4/);
      parsePrometheus(await viaQuery.text());
      assert.ok(prometheus.get('denovisor_vcpu_exits_total{vcpu="0",reason="io_out"}')! > 0);
      assert.ok(prometheus.get('denovisor_vcpu_console_bytes_total{vcpu="0",kind="written"}')! > 0);
      assert.equal(prometheus.get('denovisor_vm_state{state="running"}'), 1);
      assert.equal(prometheus.get('denovisor_vm_memory_bytes{kind="size"}'), 4 << 20);
      assert.ok(
        prometheus.has('denovisor_device_exits_total{device="com1",space="pio",op="write"}'),
      );

      // A VM without a balloon: the VM's own error, as JSON.
      await assert.rejects(
        () => client.balloon(1),
        (e: unknown) =>
          e instanceof ApiError && e.status === 400 && e.apiCode === "INVALID_ARGUMENT" &&
          /no balloon device/.test(e.message),
      );
      const malformed = await client.raw("PUT", "/vm/state", { body: { state: true } });
      assert.equal(malformed.status, 400);

      const stopping = await client.raw("PUT", "/vm/state", { body: { state: "stopped" } });
      assert.equal(stopping.status, 202);
      await stopping.body?.cancel();
      const result = await run;
      assert.equal(result.reason, "stopped");
      assert.equal((await client.vm()).state, "stopped");
      await assert.rejects(
        () => client.pause(),
        (e: unknown) => e instanceof ApiError && e.status === 409 && e.apiCode === "GUEST_STOPPED",
      );
      await server.close();
      assert.equal(await exists(path), false);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
