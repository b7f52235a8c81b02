/**
 * The command line, run as a real subprocess: the default guest, `run` with
 * images in each mode, exit statuses, and clear errors for bad input.
 */

import assert from "node:assert/strict";

import { cli, kvmTest, testGuest } from "./_helpers.ts";

async function tempImage(bytes: Uint8Array): Promise<string> {
  const path = await Deno.makeTempFile({ suffix: ".img" });
  await Deno.writeFile(path, bytes);
  return path;
}

kvmTest("hello runs the built-in hello guest and exits 0", async () => {
  const { code, stdout, stderr } = await cli("hello");
  assert.equal(code, 0, stderr);
  assert.match(stdout, /denovisor/i);
  assert.match(stdout, /500500/);
  assert.match(stderr, /guest exited with code 1 · \d+ exits · run [\d.]+ ms/);
});

kvmTest("run streams the console to stdout and exits with the guest's code", async () => {
  const real = await tempImage(await testGuest("real_hello.S", { format: "flat", bits: 16 }));
  const user = await tempImage(await testGuest("user_hello.S"));
  try {
    let r = await cli("run", "--mode", "real", "--mem", "1", real);
    assert.deepEqual([r.code, r.stdout], [5, "real\n"], r.stderr);
    r = await cli("run", "--mode", "user", "--quiet", user);
    assert.deepEqual([r.code, r.stdout, r.stderr], [9, "user\n", ""]);
  } finally {
    await Deno.remove(real);
    await Deno.remove(user);
  }
});

kvmTest("a crash, a timeout and an unhandled port each have their own status", async () => {
  const crash = await tempImage(await testGuest("triple_fault.S", { format: "flat" }));
  const spin = await tempImage(await testGuest("spin.S", { format: "flat" }));
  // out %al, $0x80 (no device there), then out to 0xf4.
  const probe = await tempImage(new Uint8Array([0xe6, 0x80, 0xe6, 0xf4]));
  try {
    let r = await cli("run", crash);
    assert.equal(r.code, 12, r.stderr); // a triple fault has its own status
    // Intel reports where; AMD resets the vCPU on the shutdown and says so.
    assert.match(r.stderr, /guest crashed \(triple fault\)( at rip=0x10|; where is unknown)/);
    r = await cli("run", "--mode", "user", "--timeout", "200", spin);
    assert.equal(r.code, 124, r.stderr);
    assert.match(r.stderr, /timed out/);
    // A guest that prints nothing: the watchdog ends it with its own status.
    r = await cli("run", "--mode", "user", "--watchdog", "300", "--timeout", "60000", spin);
    assert.equal(r.code, 16, r.stderr);
    assert.match(r.stderr, /the guest stopped answering: no console output for \d+ ms/);
    r = await cli("run", "--mode", "real", "--unhandled-io", "stop", probe);
    assert.equal(r.code, 10, r.stderr);
    assert.match(r.stderr, /unhandled port I\/O: out 1 byte\(s\) at port 0x80/);
  } finally {
    for (const p of [crash, spin, probe]) await Deno.remove(p);
  }
});

Deno.test("bad arguments give status 2 and a one-line message", async () => {
  const cases: [string[], RegExp][] = [
    [["run"], /missing IMAGE/],
    [["run", "--mode", "protected", "x.img"], /--mode must be one of real, long, user/],
    [["run", "--mem", "0", "x.img"], /--mem must be an integer from 1 to/],
    [["run", "--mem", "lots", "x.img"], /--mem must be an integer/],
    [["run", "--load-addr", "0xZZ", "x.img"], /--load-addr must be a non-negative integer/],
    [["run", "--bogus", "x.img"], /Unknown option '--bogus'/],
    [["run", "/nonexistent/image.bin"], /cannot read image \/nonexistent\/image.bin/],
    [["frobnicate"], /unknown command "frobnicate"/],
    [["overhead", "--workload", "gpu"], /--workload must be one of cpu, memory, io, syscall/],
    [["overhead", "--runs", "0"], /--runs must be an integer >= 1/],
  ];
  for (const [args, message] of cases) {
    const r = await cli(...args);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, message);
    assert.equal(r.stderr.trim().split("\n").length, 1, `one line: ${r.stderr}`);
  }
});

kvmTest("malformed images give status 2 and name the problem", async () => {
  const elf = await testGuest("user_hello.S");
  const truncated = await tempImage(elf.subarray(0, 50));
  const notX86 = await tempImage(Uint8Array.from(elf, (b, i) => (i === 18 ? 3 : b)));
  const flat = await tempImage(new Uint8Array([0x90, 0xf4]));
  try {
    let r = await cli("run", "--mode", "user", truncated);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /ELF file is truncated/);
    r = await cli("run", notX86);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /not x86-64/);
    r = await cli("run", "--entry", "0x4000000", flat);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /entry point 0x4000000 is outside guest RAM/);
    r = await cli("run", "--mem", "1", "--load-addr", "0x200000", flat);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /does not fit in guest RAM/);
  } finally {
    for (const p of [truncated, notX86, flat]) await Deno.remove(p);
  }
});

Deno.test("--help works on every command", async () => {
  for (const args of [["--help"], ["run", "--help"], ["overhead", "--help"]]) {
    const r = await cli(...args);
    assert.equal(r.code, 0);
    assert.match(r.stdout, /Usage/);
  }
});
