/**
 * What crossing the FFI boundary costs: a sync call, a sync call that fails and
 * fetches its message, and a `nonblocking` call (the one a run uses).
 *
 *   deno bench -A bench/ffi_bench.ts
 *
 * @module
 */

import { openCore } from "../src/ffi.ts";

const core = await openCore();

Deno.bench({
  name: "sync call (dv_abi_version)",
  group: "ffi",
  baseline: true,
  fn: () => {
    core.abiVersion();
  },
});

Deno.bench({
  name: "sync call with a handle lookup (dv_live_handles)",
  group: "ffi",
  fn: () => {
    core.liveHandles();
  },
});

Deno.bench({
  name: "failing sync call + error message (dv_vm_stop on a stale handle)",
  group: "ffi",
  fn: () => {
    try {
      core.vmStop(0);
    } catch {
      // expected: INVALID_HANDLE
    }
  },
});

Deno.bench({
  name: "nonblocking call round trip (dv_vcpu_run on a stale handle)",
  group: "ffi",
  fn: async () => {
    try {
      await core.vcpuRun(0, 0);
    } catch {
      // expected: INVALID_HANDLE
    }
  },
});
