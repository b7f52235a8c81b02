/**
 * The fuzz targets' CI smoke (no KVM): every target of `deno task fuzz`
 * (the core's libFuzzer targets and the TypeScript ones) runs a few seconds
 * and none may crash, hang or run out of memory; and the C ABI's wrapper
 * passes a buffer's real size, whatever its `length` claims.
 */

import assert from "node:assert/strict";
import { openCore } from "../src/ffi.ts";

Deno.test("a Uint8Array whose length lies reaches the core with its real size", async () => {
  const core = await openCore();
  const honest = new Uint8Array(32);
  const lying = new Uint8Array(32);
  // Found by the ts_ffi_abi fuzz target: the wrapper passed `length`, so
  // the core read 1 MiB past a 32-byte buffer.
  Object.defineProperty(lying, "length", { value: 1 << 20 });
  Object.defineProperty(lying, "byteLength", { value: 1 << 20 });
  const a = core.inspectImage<{ size: number }>(lying);
  const b = core.inspectImage<{ size: number }>(honest);
  assert.equal(a.size, 32);
  assert.deepEqual(a, b);
});

Deno.test("every fuzz target runs a short smoke without a crash, hang or running out of memory", async () => {
  const seconds = Deno.env.get("DENOVISOR_FUZZ_SECONDS") ?? "4";
  const script = new URL("../scripts/fuzz.ts", import.meta.url).pathname;
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, "--seconds", seconds],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const out = new TextDecoder().decode(stdout);
  const err = new TextDecoder().decode(stderr);
  assert.equal(code, 0, `deno task fuzz failed:\n${out}\n${err.slice(-3000)}`);
  const rows = out.split("\n").filter((l) => /^\w+\s+\d+\s+\d+/.test(l));
  const listed = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, "--list"],
    stdout: "piped",
  }).output();
  const targets = new TextDecoder().decode(listed.stdout).trim().split("\n");
  assert.ok(targets.length >= 16, `only ${targets.length} targets`);
  assert.equal(rows.length, targets.length, out);
  for (const row of rows) {
    const [target, executions, , coverage, , , crashes] = row.trim().split(/\s+/);
    assert.ok(Number(executions) > 0, `${target} ran nothing: ${row}`);
    assert.ok(Number(coverage) > 0, `${target} covered nothing: ${row}`);
    assert.equal(crashes, "0", row);
  }
});
