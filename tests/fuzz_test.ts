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
