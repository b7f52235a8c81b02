/**
 * Exit metrics and the hypercall interface on real /dev/kvm: exact counts,
 * the JSON and Prometheus exports, and what garbage on the hypercall port does.
 */

import assert from "node:assert/strict";

import { metricsReport, toPrometheus, Vm } from "../mod.ts";
import { kvmTest, testGuest } from "./_helpers.ts";

kvmTest("a guest that makes exactly N hypercalls shows exactly N in the counters", async () => {
  const n = 137;
  using vm = await Vm.create({ memoryMiB: 4, unhandledIo: "stop" });
  vm.load(await testGuest("hypercalls.S"), { mode: "user", arguments: [n] });
  const result = await vm.run({ timeoutMs: 60_000 });
  assert.equal(result.reason, "guest_exit", result.summary);
  assert.equal(result.exitCode, 0);
  const [m] = vm.metrics();
  assert.equal(m.hypercalls.nop, n);
  assert.equal(m.hypercalls.exit, 1);
  assert.equal(m.hypercalls.invalid, 0);
  assert.equal(m.ioOutByPort.hypercall, n + 1);
  assert.equal(m.ioOut, n + 1);
  assert.equal(m.exits, n + 1 + m.interrupted, "every exit is a hypercall (or a kick)");
  assert.equal(result.exits, m.exits);
  const handled = m.handlingLatencyLog2Ns.reduce((a, b) => a + b, 0);
  assert.ok(handled >= n + 1, `histogram holds ${handled} exits`);
  assert.ok(m.kvmRunNs > 0 && m.vmmNs > 0);
});

kvmTest("metrics export as JSON and Prometheus text", async () => {
  using vm = await Vm.create({ memoryMiB: 4 });
  vm.load(await testGuest("hypercalls.S"), { mode: "user", arguments: [5] });
  await vm.run({ timeoutMs: 60_000 });
  const report = metricsReport(vm);
  assert.equal(report.vcpus.length, 1);
  assert.equal(report.total.hypercalls.nop, 5);
  assert.deepEqual(JSON.parse(JSON.stringify(report)).total, report.total);
  const text = toPrometheus(vm.metrics(), { vm: 'demo "1"' });
  assert.match(text, /^# TYPE denovisor_vcpu_exits_total counter$/m);
  assert.match(
    text,
    /^denovisor_vcpu_hypercalls_total\{vm="demo \\"1\\"",vcpu="0",kind="nop"\} 5$/m,
  );
  assert.match(
    text,
    /^denovisor_vcpu_io_exits_total\{vm="demo \\"1\\"",vcpu="0",direction="out",range="hypercall"\} 6$/m,
  );
  const count = /denovisor_vcpu_exit_handling_seconds_count\{[^}]*\} (\d+)/.exec(text);
  const inf = /denovisor_vcpu_exit_handling_seconds_bucket\{[^}]*le="\+Inf"\} (\d+)/.exec(text);
  assert.ok(count && inf && count[1] === inf[1], "+Inf bucket equals the count");
  // Every sample line is `name{labels} value`.
  for (const line of text.trim().split("\n")) {
    if (!line.startsWith("#")) assert.match(line, /^[a-z_]+(\{.*\})? [0-9.e+-]+$/, line);
  }
});

kvmTest(
  "bad hypercall arguments get error statuses; malformed hypercalls stop the VM",
  async () => {
    const image = await testGuest("hypercall_abuse.S");
    const run = async (ending: number) => {
      using vm = await Vm.create({ memoryMiB: 4 });
      vm.load(image, { mode: "user", arguments: [ending] });
      const result = await vm.run({ timeoutMs: 60_000 });
      return { result, invalid: vm.metrics()[0].hypercalls.invalid };
    };
    const clean = await run(0);
    assert.equal(clean.result.reason, "guest_exit", clean.result.summary);
    // The report holds the three statuses the guest got back: unknown call (-1),
    // pointer outside RAM (-2), length overflow (-3).
    const raw = clean.result.report ?? new Uint8Array();
    assert.equal(raw.length, 12);
    const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    assert.deepEqual([0, 4, 8].map((o) => view.getInt32(o, true)), [-1, -2, -3]);
    assert.equal(clean.invalid, 3);

    const narrow = await run(1);
    assert.equal(narrow.result.exit.reason, "bad_hypercall");
    assert.match(narrow.result.summary, /4-byte out to port 0x510, got 1 byte/);
    const outside = await run(2);
    assert.equal(outside.result.exit.reason, "bad_hypercall");
    assert.match(outside.result.summary, /request block at 0xf0000000 is outside guest RAM/);
  },
);

kvmTest("run --metrics writes the run's metrics", async () => {
  const image = await Deno.makeTempFile({ suffix: ".elf" });
  const out = await Deno.makeTempFile({ suffix: ".json" });
  try {
    await Deno.writeFile(image, await testGuest("hypercalls.S"));
    const main = new URL("../main.ts", import.meta.url).pathname;
    const child = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", main, "run", "--mode", "user", "--arg", "9", "--metrics", out, image],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.equal(child.code, 0, new TextDecoder().decode(child.stderr));
    const report = JSON.parse(await Deno.readTextFile(out));
    assert.equal(report.total.hypercalls.nop, 9);
    assert.equal(report.vcpus[0].hypercalls.exit, 1);
    const prom = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        main,
        "run",
        "--mode",
        "user",
        "--arg",
        "3",
        "--quiet",
        "--metrics",
        "-",
        "--metrics-format",
        "prometheus",
        image,
      ],
      stdout: "piped",
    }).output();
    assert.match(new TextDecoder().decode(prom.stdout), /kind="nop"\} 3/);
  } finally {
    await Deno.remove(image);
    await Deno.remove(out);
  }
});
