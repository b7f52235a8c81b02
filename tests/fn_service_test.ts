/**
 * The function service on real KVM, end to end over HTTP: unmodified static
 * Linux programs (Debian's busybox-static applets) and SDK programs served in
 * micro-VMs, compared with the same programs run natively; isolation between
 * requests; crashing, looping, memory-hungry and flooding functions answered
 * with a 5xx and followed by a successful request; concurrent clients;
 * metrics; and `main.ts serve` as a child process, stopped by SIGTERM.
 *
 * Needs the guest function runtime and the VM reset path (issue 10), which
 * `src/serverless/backend.ts` wires in; the only part of them this file
 * imports is that adapter.
 */

import assert from "node:assert/strict";
import { join } from "node:path";

import { Service } from "../mod.ts";
import { fetchBusybox } from "../src/linux/debian_kernel.ts";
import { buildFunction } from "../src/serverless/backend.ts";
import { runNative } from "../src/serverless/native.ts";
import { kvmTest, MAIN } from "./_helpers.ts";

const fetched = await fetchBusybox();
if (!fetched.ok) throw new Error(`busybox-static cannot be had: ${fetched.reason}`);
const BUSYBOX = fetched.file.path;

/**
 * An SDK function (guest/fn/sdk/dv_fn.h) that misbehaves on request: "crash"
 * faults, "loop" spins, "hog" allocates without end, "flood" writes without
 * end; "set X" stores X in a global and "get" prints the globals; anything
 * else is echoed.
 */
const MISBEHAVING_C = `#include "dv_fn.h"

static unsigned long requests;
static char stored[64];
static char block[4096];

static int is(const char *in, size_t len, const char *word)
{
	size_t n = 0;
	while (word[n]) n++;
	return len >= n && memcmp(in, word, n) == 0;
}

int main(int argc, char **argv)
{
	size_t len;
	const char *in = dv_fn_input(&len);
	(void)argc;
	(void)argv;
	requests++;
	if (is(in, len, "crash")) *(volatile int *)8 = 1;
	if (is(in, len, "loop")) for (;;) __asm__ volatile("");
	if (is(in, len, "hog")) {
		for (;;) {
			char *p = dv_fn_alloc(1 << 20);
			if (!p) return 99;
			for (size_t i = 0; i < (1 << 20); i += 4096) p[i] = 1;
		}
	}
	if (is(in, len, "flood")) for (;;) dv_fn_write(block, sizeof block);
	if (is(in, len, "set ")) {
		size_t n = len - 4 < sizeof stored - 1 ? len - 4 : sizeof stored - 1;
		dv_fn_printf("before: requests=%lu stored=[%s]\\n", requests, stored);
		memcpy(stored, in + 4, n);
		return 0;
	}
	if (is(in, len, "get")) {
		dv_fn_printf("requests=%lu stored=[%s]\\n", requests, stored);
		return 0;
	}
	dv_fn_write(in, len);
	return 0;
}
`;

let misbehaving: string | undefined;
async function misbehavingProgram(): Promise<string> {
  if (misbehaving) return misbehaving;
  const dir = await Deno.makeTempDir({ prefix: "denovisor-fn-test-" });
  const source = join(dir, "misbehaving.c");
  await Deno.writeTextFile(source, MISBEHAVING_C);
  misbehaving = await buildFunction(source, join(dir, "misbehaving"));
  return misbehaving;
}

async function post(base: string, name: string, body: BodyInit = "") {
  const answer = await fetch(`${base}fn/${name}`, { method: "POST", body });
  return { answer, text: await answer.text() };
}

const APPLETS: { name: string; argv: string[]; input: string }[] = [
  { name: "echo", argv: ["busybox", "echo", "hello", "world"], input: "" },
  { name: "sha256sum", argv: ["busybox", "sha256sum"], input: "abc".repeat(1000) },
  { name: "sort", argv: ["busybox", "sort"], input: "pear\napple\nfig\nbanana\n" },
  { name: "wc", argv: ["busybox", "wc"], input: "one two\nthree\n\nfour five six\n" },
  {
    name: "awk",
    argv: ["busybox", "awk", "{ s += $2 } END { print NR, s }"],
    input: "a 1\nb 2\nc 39\n",
  },
];

kvmTest("busybox applets served over HTTP answer as the same applets run natively", async () => {
  await using service = await Service.start({
    port: 0,
    functions: APPLETS.map(({ name, argv }) => ({ name, program: BUSYBOX, argv })),
  });
  for (const { name, argv, input } of APPLETS) {
    const native = await runNative(BUSYBOX, argv, [], new TextEncoder().encode(input));
    for (let round = 0; round < 3; round++) {
      const { answer, text } = await post(service.url, name, input);
      assert.equal(answer.status, 200, `${name}: ${text}`);
      assert.equal(text, new TextDecoder().decode(native.stdout), name);
      assert.equal(answer.headers.get("x-exit-status"), `${native.exitStatus}`);
      assert.equal(answer.headers.get("x-denovisor-outcome"), "exited");
      assert.match(answer.headers.get("x-denovisor-run-us") ?? "", /^\d+$/);
      assert.match(answer.headers.get("x-denovisor-reset-us") ?? "", /^\d+$/);
    }
  }
  const missing = await post(service.url, "cat");
  assert.equal(missing.answer.status, 404);
  const list = await (await fetch(`${service.url}fn`)).json();
  assert.deepEqual(list.functions.map((f: { name: string }) => f.name), APPLETS.map((a) => a.name));
  assert.equal(list.functions[0].backend, "kvm");
  assert.ok(list.functions[0].limits.inputBytes > 0);
});

kvmTest("what one request writes is invisible to the next (SDK program)", async () => {
  await using service = await Service.start({
    port: 0,
    pool: { min: 1, max: 1 },
    functions: [{ name: "state", program: await misbehavingProgram() }],
  });
  for (const secret of ["first", "second", "third"]) {
    const set = await post(service.url, "state", `set ${secret}`);
    assert.deepEqual([set.answer.status, set.text], [200, "before: requests=1 stored=[]\n"]);
    const get = await post(service.url, "state", "get");
    assert.deepEqual([get.answer.status, get.text], [200, "requests=1 stored=[]\n"]);
  }
  const echo = await post(service.url, "state", "plain input");
  assert.equal(echo.text, "plain input");
});

kvmTest(
  "crashing, looping, memory-hungry and flooding requests get a 5xx, and the next succeeds",
  async () => {
    await using service = await Service.start({
      port: 0,
      pool: { min: 1, max: 2 },
      functions: [{
        name: "bad",
        program: await misbehavingProgram(),
        memoryMiB: 32,
        limits: { timeoutMs: 2_000, memoryBytes: 8 << 20, outputBytes: 64 << 10 },
      }],
    });
    const cases = [
      ["crash", [502], ["signal", "crashed"]],
      ["loop", [504], ["timeout"]],
      ["hog", [507], ["memory_limit"]],
      ["flood", [502], ["output_limit"]],
    ] as const;
    for (const [input, statuses, outcomes] of cases) {
      for (let round = 0; round < 2; round++) {
        const bad = await post(service.url, "bad", input);
        assert.ok(
          (statuses as readonly number[]).includes(bad.answer.status),
          `${input}: ${bad.answer.status} ${bad.text}`,
        );
        const body = JSON.parse(bad.text);
        assert.equal(body.function, "bad");
        assert.ok((outcomes as readonly string[]).includes(body.outcome), bad.text);
        assert.equal(typeof body.reason, "string");
        const good = await post(service.url, "bad", "still alive");
        assert.deepEqual([good.answer.status, good.text], [200, "still alive"], input);
      }
    }
    const get = await post(service.url, "bad", "get");
    assert.equal(get.text, "requests=1 stored=[]\n", "no failed request left state behind");
    const [m] = service.metrics();
    assert.equal(m.requests.find((r) => r.status === 504)?.count, 2);
    assert.equal(m.requests.find((r) => r.status === 507)?.count, 2);
  },
);

kvmTest("concurrent clients are served by a bounded pool, and the metrics show it", async () => {
  await using service = await Service.start({
    port: 0,
    pool: { min: 1, max: 3 },
    nativeSampleRate: 1,
    functions: [{ name: "rev", program: BUSYBOX, argv: ["busybox", "rev"] }],
  });
  const answers = await Promise.all(
    Array.from({ length: 12 }, (_, i) => post(service.url, "rev", `client ${i}\n`)),
  );
  answers.forEach(({ answer, text }, i) => {
    assert.equal(answer.status, 200);
    assert.equal(text, `${[...`client ${i}`].reverse().join("")}\n`);
  });
  for (let wait = 0; wait < 500 && service.metrics()[0].overhead.samples === 0; wait++) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  const [m] = service.metrics();
  assert.ok(m.pool.size >= 1 && m.pool.size <= 3, JSON.stringify(m.pool));
  assert.equal(m.resets.count, 12);
  assert.equal(m.run.count, 12);
  assert.ok(m.syscalls > 0);
  assert.ok(m.overhead.samples > 0);
  assert.ok(m.overhead.nativeMedianUs! > 0 && m.overhead.virtMedianUs! > 0);
  const text = await (await fetch(`${service.url}metrics`)).text();
  assert.match(
    text,
    /^denovisor_fn_requests_total\{function="rev",status="200",outcome="exited"\} 12$/m,
  );
  assert.match(text, /^denovisor_fn_reset_seconds_count\{function="rev"\} 12$/m);
  assert.match(text, /^# TYPE denovisor_fn_enosys_total counter$/m);
  assert.match(text, /^denovisor_fn_overhead_ratio\{function="rev"\} /m);
  assert.match(text, /^denovisor_fn_pool_size\{function="rev"\} [123]$/m);
});

kvmTest("main.ts serve answers HTTP requests and exits 0 on SIGTERM, closing its VMs", async () => {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      MAIN,
      "serve",
      "--port",
      "0",
      "--pool-max",
      "2",
      `hello=${BUSYBOX} echo hello from a micro-VM`,
      `sum=${BUSYBOX} sha256sum`,
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  let log = "";
  const stderr = (async () => {
    for await (const chunk of child.stderr.pipeThrough(new TextDecoderStream())) log += chunk;
    return log;
  })();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let printed = "";
  while (!printed.includes("\n")) {
    const { done, value } = await reader.read();
    if (done) break;
    printed += value;
  }
  const url = printed.trim();
  assert.match(url, /^http:\/\/127\.0\.0\.1:\d+\/$/, `${printed}\n${log}`);
  const hello = await post(url, "hello");
  assert.deepEqual([hello.answer.status, hello.text], [200, "hello from a micro-VM\n"]);
  const sum = await post(url, "sum", "abc");
  assert.equal(sum.text, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  -\n");
  assert.equal((await post(url, "nope")).answer.status, 404);
  child.kill("SIGTERM");
  const status = await child.status;
  reader.releaseLock();
  await child.stdout.cancel().catch(() => {});
  await stderr;
  assert.equal(status.code, 0, log);
  assert.match(log, /serving 2 function\(s\) at http/);
  assert.match(log, /stopping: closing every VM/);
});
