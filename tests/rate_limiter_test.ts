/**
 * Rate limiter configurations are checked before they reach the core: every
 * bad field is an INVALID_ARGUMENT naming it; good ones pass through to the
 * device JSON unchanged.
 */

import assert from "node:assert/strict";

import { type BlockDevice, checkRateLimiter, DenovisorError, deviceConfigJson } from "../mod.ts";

const invalid = (pattern: RegExp) => (e: unknown) =>
  e instanceof DenovisorError && e.code === "INVALID_ARGUMENT" && pattern.test(e.message);

Deno.test("a disk's rate limiter reaches the device JSON unchanged", () => {
  const disk: BlockDevice = {
    kind: "block",
    path: "/tmp/d.img",
    rateLimiter: {
      bandwidth: { size: 1 << 20, oneTimeBurst: 4096, refillTimeMs: 1000 },
      ops: { size: 100, refillTimeMs: 10 },
    },
  };
  assert.deepEqual(JSON.parse(deviceConfigJson(disk)), disk);
  checkRateLimiter({}, "x");
});

Deno.test("bad rate limiter fields are INVALID_ARGUMENT naming the field", () => {
  const cases: [unknown, RegExp][] = [
    [null, /rateLimiter must be an object/],
    [[], /rateLimiter must be an object/],
    [{ iops: {} }, /unknown field "iops"/],
    [{ ops: 5 }, /rateLimiter\.ops must be an object/],
    [{ ops: { size: 0, refillTimeMs: 1 } }, /ops\.size must be a positive integer/],
    [{ ops: { size: 1.5, refillTimeMs: 1 } }, /ops\.size/],
    [{ ops: { size: 1 } }, /ops\.refillTimeMs must be an integer from 1 to 3600000/],
    [{ ops: { size: 1, refillTimeMs: 3_600_001 } }, /refillTimeMs/],
    [{ bandwidth: { size: 1, refillTimeMs: 1, oneTimeBurst: -1 } }, /bandwidth\.oneTimeBurst/],
    [{ bandwidth: { size: 1, refillTimeMs: 1, burst: 1 } }, /unknown field "burst"/],
    [{ bandwidth: { size: "1", refillTimeMs: 1 } }, /bandwidth\.size/],
  ];
  for (const [limiter, pattern] of cases) {
    assert.throws(
      () => checkRateLimiter(limiter, "a block device"),
      invalid(pattern),
      JSON.stringify(limiter),
    );
    assert.throws(
      () =>
        deviceConfigJson({
          kind: "block",
          path: "/tmp/d.img",
          rateLimiter: limiter as BlockDevice["rateLimiter"],
        }),
      invalid(pattern),
    );
  }
});

Deno.test("a net device takes a rate limiter per direction, checked the same way", () => {
  const net = {
    kind: "net" as const,
    tap: "tap0",
    rxRateLimiter: { ops: { size: 1000, refillTimeMs: 1000 } },
    txRateLimiter: { bandwidth: { size: 1 << 20, refillTimeMs: 100 } },
  };
  assert.deepEqual(JSON.parse(deviceConfigJson(net)), net);
  assert.throws(
    () => deviceConfigJson({ ...net, txRateLimiter: { ops: { size: 0, refillTimeMs: 1 } } }),
    invalid(/a net device's txRateLimiter\.ops\.size/),
  );
});
