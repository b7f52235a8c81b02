/**
 * The function service end to end on this host, over real HTTP, with its
 * native backend: each request a real subprocess of Debian's static busybox
 * (the same program the KVM tests serve in micro-VMs). What this covers
 * without KVM: routing and status codes, limits, containment of crashing,
 * looping and flooding functions, the pool's queue under concurrent clients,
 * metrics and the overhead model. The same behaviour in VMs is
 * tests/fn_service_test.ts ([kvm]).
 */

import assert from "node:assert/strict";

import { Service } from "../mod.ts";
import { fetchBusybox } from "../src/linux/debian_kernel.ts";
import { NATIVE_BACKEND, runNative } from "../src/serverless/native.ts";

const fetched = await fetchBusybox();
if (!fetched.ok) throw new Error(`busybox-static cannot be had: ${fetched.reason}`);
const BUSYBOX = fetched.file.path;

function sh(name: string, script: string, limits = {}) {
  return { name, program: BUSYBOX, argv: ["busybox", "sh", "-c", script], limits };
}

async function post(service: Service, name: string, body: BodyInit = "") {
  const answer = await fetch(`${service.url}fn/${name}`, { method: "POST", body });
  return { answer, text: await answer.text() };
}

Deno.test("native runs: stdin in, stdout out, exit status, signals, time and output limits", async () => {
  const input = new TextEncoder().encode("b\na\nc\n");
  const sorted = await runNative(BUSYBOX, ["busybox", "sort"], [], input);
  assert.equal(sorted.status, "done");
  assert.equal(new TextDecoder().decode(sorted.stdout), "a\nb\nc\n");
  const env = await runNative(BUSYBOX, ["busybox", "env"], ["ONLY=this"], new Uint8Array());
  assert.equal(
    new TextDecoder().decode(env.stdout),
    "ONLY=this\n",
    "the environment is the spec's",
  );
  const exit = await runNative(BUSYBOX, ["busybox", "sh", "-c", "exit 7"], [], new Uint8Array());
  assert.deepEqual([exit.outcome, exit.exitStatus], ["exited", 7]);
  const abort = await runNative(BUSYBOX, ["busybox", "sh", "-c", "kill -ABRT $$"], [], input);
  assert.deepEqual([abort.outcome, abort.exitStatus], ["signal", 6]);
  const loop = await runNative(BUSYBOX, ["busybox", "sh", "-c", "while :; do :; done"], [], input, {
    timeoutMs: 200,
  });
  assert.equal(loop.status, "timeout");
  const flood = await runNative(BUSYBOX, ["busybox", "yes"], [], input, { outputLimit: 10_000 });
  assert.equal(flood.outcome, "output_limit");
  assert.equal(flood.stdout.length + flood.stderr.length, 10_000);
});

Deno.test("POST /fn/NAME answers stdout with the exit status; 404, 405 and 413 for bad requests", async () => {
  await using service = await Service.start({
    port: 0,
    backend: NATIVE_BACKEND,
    functions: [
      { name: "sha256", program: BUSYBOX, argv: ["busybox", "sha256sum"] },
      {
        name: "small",
        program: BUSYBOX,
        argv: ["busybox", "wc", "-c"],
        limits: { inputBytes: 10 },
      },
      sh("exit3", "echo partial; exit 3"),
    ],
  });
  assert.match(service.url, /^http:\/\/127\.0\.0\.1:\d+\/$/);
  const { answer, text } = await post(service, "sha256", "abc");
  assert.equal(answer.status, 200);
  assert.equal(
    text,
    "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  -\n",
  );
  assert.equal(answer.headers.get("x-exit-status"), "0");
  assert.equal(answer.headers.get("x-denovisor-outcome"), "exited");
  assert.match(answer.headers.get("x-denovisor-run-us") ?? "", /^\d+$/);
  assert.equal(answer.headers.get("x-denovisor-reset-us"), "0");
  const exit3 = await post(service, "exit3");
  assert.deepEqual([exit3.answer.status, exit3.text], [200, "partial\n"]);
  assert.equal(exit3.answer.headers.get("x-exit-status"), "3");

  const small = await post(service, "small", "0123456789");
  assert.deepEqual([small.answer.status, small.text], [200, "10\n"]);
  const big = await post(service, "small", "01234567890");
  assert.equal(big.answer.status, 413);
  assert.equal(JSON.parse(big.text).function, "small");
  // Streamed without a length: refused as it arrives.
  const stream = new ReadableStream({
    start(c) {
      for (let i = 0; i < 4; i++) c.enqueue(new TextEncoder().encode("0123456789"));
      c.close();
    },
  });
  assert.equal((await post(service, "small", stream)).answer.status, 413);

  const missing = await post(service, "nope");
  assert.equal(missing.answer.status, 404);
  assert.match(JSON.parse(missing.text).reason, /no function "nope"/);
  const wrong = await fetch(`${service.url}fn/sha256`, { method: "PUT", body: "x" });
  await wrong.body?.cancel();
  assert.equal(wrong.status, 405);
  assert.equal(wrong.headers.get("allow"), "POST, GET");
  const metricsPost = await fetch(`${service.url}metrics`, { method: "POST" });
  await metricsPost.body?.cancel();
  assert.equal(metricsPost.status, 405);
  const root = await fetch(service.url);
  await root.body?.cancel();
  assert.equal(root.status, 404);

  const list = await (await fetch(`${service.url}fn`)).json();
  assert.deepEqual(list.functions.map((f: { name: string }) => f.name), [
    "sha256",
    "small",
    "exit3",
  ]);
  assert.equal(list.functions[1].limits.inputBytes, 10);
  assert.equal(list.functions[0].limits.timeoutMs, 10_000);
  assert.equal(list.functions[0].backend, "native");
  const one = await (await fetch(`${service.url}fn/exit3`)).json();
  assert.deepEqual(one.argv, ["busybox", "sh", "-c", "echo partial; exit 3"]);
});

Deno.test("a crashing, looping or flooding function gets a 5xx with a reason, and the next request succeeds", async () => {
  await using service = await Service.start({
    port: 0,
    backend: NATIVE_BACKEND,
    functions: [
      sh("crash", 'if [ "$(cat)" = crash ]; then kill -SEGV $$; fi; echo fine'),
      sh("loop", 'if [ "$(cat)" = loop ]; then while :; do :; done; fi; echo fine', {
        timeoutMs: 300,
      }),
      sh("flood", 'if [ "$(cat)" = flood ]; then yes; fi; echo fine', { outputBytes: 4096 }),
    ],
  });
  for (
    const [name, status, outcome] of [
      ["crash", 502, "signal"],
      ["loop", 504, "timeout"],
      ["flood", 502, "output_limit"],
    ] as const
  ) {
    for (let round = 0; round < 2; round++) {
      const bad = await post(service, name, name);
      assert.equal(bad.answer.status, status, `${name}: ${bad.text}`);
      assert.equal(bad.answer.headers.get("x-denovisor-outcome"), outcome);
      const body = JSON.parse(bad.text);
      assert.equal(body.function, name);
      assert.equal(typeof body.error, "string");
      assert.equal(typeof body.reason, "string");
      const good = await post(service, name, "ok");
      assert.deepEqual([good.answer.status, good.text], [200, "fine\n"], name);
    }
  }
  const metrics = service.metrics();
  const crash = metrics.find((m) => m.function === "crash")!;
  assert.deepEqual(crash.requests, [
    { status: 200, outcome: "exited", count: 2 },
    { status: 502, outcome: "signal", count: 2 },
  ]);
});

Deno.test("concurrent clients are all served by a bounded pool; a full queue answers 503", async () => {
  await using service = await Service.start({
    port: 0,
    backend: NATIVE_BACKEND,
    pool: { min: 1, max: 3 },
    functions: [{ name: "rev", program: BUSYBOX, argv: ["busybox", "rev"] }],
  });
  const answers = await Promise.all(
    Array.from({ length: 24 }, (_, i) => post(service, "rev", `request ${i}\n`)),
  );
  answers.forEach(({ answer, text }, i) => {
    assert.equal(answer.status, 200);
    assert.equal(text, `${[...`request ${i}`].reverse().join("")}\n`);
  });
  const [m] = service.metrics();
  assert.ok(m.pool.size <= 3 && m.pool.started <= 3, JSON.stringify(m.pool));
  assert.equal(m.pool.queued, 0);

  await using strict = await Service.start({
    port: 0,
    backend: NATIVE_BACKEND,
    pool: { min: 1, max: 1 },
    queueMax: 0,
    functions: [sh("slow", "sleep 1; echo done")],
  });
  const results = await Promise.all([post(strict, "slow"), post(strict, "slow")]);
  const statuses = results.map((r) => r.answer.status).sort();
  assert.deepEqual(statuses, [200, 503]);
  const refused = results.find((r) => r.answer.status === 503)!;
  assert.equal(refused.answer.headers.get("retry-after"), "1");
  assert.match(JSON.parse(refused.text).reason, /1 VMs are busy/);
});

Deno.test("GET /metrics reports requests, latency, the pool and the overhead model", async () => {
  await using service = await Service.start({
    port: 0,
    backend: NATIVE_BACKEND,
    nativeSampleRate: 1,
    functions: [
      { name: "echo", program: BUSYBOX, argv: ["busybox", "echo", "hi"] },
      { name: "off", program: BUSYBOX, argv: ["busybox", "true"], nativeSampleRate: 0 },
    ],
  });
  for (let i = 0; i < 5; i++) {
    assert.equal((await post(service, "echo")).text, "hi\n");
    assert.equal((await post(service, "off")).answer.status, 200);
    // One native sample runs at a time: let it finish so each request is sampled.
    for (let wait = 0; wait < 200 && service.metrics()[0].overhead.samples <= i; wait++) {
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }
  const text = await (await fetch(`${service.url}metrics`)).text();
  assert.match(
    text,
    /^denovisor_fn_requests_total\{function="echo",status="200",outcome="exited"\} 5$/m,
  );
  assert.match(text, /^denovisor_fn_request_seconds_count\{function="echo"\} 5$/m);
  assert.match(text, /^denovisor_fn_run_seconds_count\{function="echo"\} 5$/m);
  assert.match(text, /^denovisor_fn_resets_total\{function="echo"\} 5$/m);
  assert.match(text, /^denovisor_fn_pool_size\{function="echo"\} [1-9]\d*$/m);
  assert.match(text, /^denovisor_fn_pool_queued\{function="echo"\} 0$/m);
  assert.match(text, /^denovisor_fn_overhead_samples\{function="echo"\} 5$/m);
  assert.match(text, /^denovisor_fn_overhead_ratio\{function="echo"\} [0-9.e+-]+$/m);
  assert.match(text, /^denovisor_fn_overhead_seconds\{function="echo",kind="native"\} /m);
  assert.match(text, /^denovisor_fn_native_mismatches_total\{function="echo"\} 0$/m);
  assert.match(text, /^denovisor_fn_overhead_samples\{function="off"\} 0$/m);
  assert.doesNotMatch(text, /denovisor_fn_overhead_ratio\{function="off"\}/);
  const json = await (await fetch(`${service.url}metrics?format=json`)).json();
  assert.equal(json.functions[0].function, "echo");
  assert.equal(json.functions[0].overhead.samples, 5);
  assert.equal(json.functions[0].overhead.sampleRate, 1);
  assert.equal(json.functions[1].overhead.sampleRate, 0);
  const bad = await fetch(`${service.url}metrics?format=xml`);
  await bad.body?.cancel();
  assert.equal(bad.status, 400);
});

Deno.test("closing the service lets a request in flight finish, then refuses connections", async () => {
  const service = await Service.start({
    port: 0,
    backend: NATIVE_BACKEND,
    functions: [sh("slow", "sleep 0.5; echo late")],
  });
  const url = service.url;
  const inFlight = post(service, "slow");
  await new Promise((resolve) => setTimeout(resolve, 150));
  await service.close();
  const { answer, text } = await inFlight;
  assert.deepEqual([answer.status, text], [200, "late\n"]);
  await assert.rejects(fetch(`${url}fn`));
  await service.close(); // idempotent
});

Deno.test("a VM whose invocation throws is closed and replaced, and the pool keeps serving", async () => {
  // The native backend with one fault injected: an invocation whose input is
  // "throw" fails the way a VM whose reset failed does.
  let closed = 0;
  const faulty = {
    kind: "native-faulty",
    start: NATIVE_BACKEND.start,
    async restore(dir: string) {
      const vm = await NATIVE_BACKEND.restore(dir);
      return {
        checkpoint: () => vm.checkpoint(),
        reset: () => vm.reset(),
        trim: () => vm.trim(),
        functionReady: () => vm.functionReady(),
        snapshot: (d: string) => vm.snapshot(d),
        close: () => {
          closed++;
          vm.close();
        },
        invokeAsync(input: Uint8Array, options?: Parameters<typeof vm.invokeAsync>[1]) {
          if (new TextDecoder().decode(input) === "throw") {
            return Promise.reject(new Error("the reset failed"));
          }
          return vm.invokeAsync(input, options);
        },
      };
    },
  };
  await using service = await Service.start({
    port: 0,
    backend: faulty,
    pool: { min: 1, max: 2 },
    functions: [{ name: "cat", program: BUSYBOX, argv: ["busybox", "cat"] }],
  });
  for (let round = 1; round <= 3; round++) {
    const bad = await post(service, "cat", "throw");
    assert.equal(bad.answer.status, 500);
    assert.match(JSON.parse(bad.text).reason, /the reset failed/);
    const good = await post(service, "cat", "after");
    assert.deepEqual([good.answer.status, good.text], [200, "after"]);
    const [m] = service.metrics();
    assert.equal(m.pool.replaced, round);
    assert.ok(m.pool.size >= 1 && m.pool.size <= 2, JSON.stringify(m.pool));
  }
  assert.equal(closed, 3, "each failed VM was closed");
});
