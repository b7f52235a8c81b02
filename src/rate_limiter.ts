/**
 * Rate limiters for devices (Firecracker's `RateLimiter` shape): a bandwidth
 * bucket (bytes) and an operations bucket, each refilled at a steady rate.
 * A request the buckets cannot pay waits in the guest's queue until they can;
 * nothing is dropped and no host thread spins. Checked here, enforced by the
 * core (`core/src/rate_limiter.rs`).
 *
 * @module
 */

import { DenovisorError } from "./errors.ts";

/** The longest refill time the core accepts (one hour), in milliseconds. */
export const MAX_REFILL_MS = 3_600_000;

/**
 * One token bucket: `size` tokens (bytes or operations) when full, refilled
 * from empty in `refillTimeMs`; `oneTimeBurst` extra tokens are spent first
 * and never refilled. A request larger than `size` passes once the bucket is
 * full and leaves a debt that delays the next.
 *
 * @example
 * ```ts
 * import type { TokenBucket } from "denovisor";
 * const mibPerSecond: TokenBucket = { size: 1 << 20, refillTimeMs: 1000 };
 * ```
 */
export interface TokenBucket {
  /** Tokens the bucket holds when full (a positive integer). */
  size: number;
  /** Extra tokens available once (default 0). */
  oneTimeBurst?: number;
  /** Milliseconds to refill `size` tokens from empty (1 to {@link MAX_REFILL_MS}). */
  refillTimeMs: number;
}

/**
 * A device's limits: bytes and operations per refill period; a bucket left
 * out is no limit.
 *
 * @example
 * ```ts
 * import type { RateLimiter } from "denovisor";
 * const disk: RateLimiter = {
 *   bandwidth: { size: 10 << 20, refillTimeMs: 1000 }, // 10 MiB/s
 *   ops: { size: 1000, refillTimeMs: 1000 }, // 1000 requests/s
 * };
 * ```
 */
export interface RateLimiter {
  /** Bytes. */
  bandwidth?: TokenBucket;
  /** Operations (requests, packets, writes). */
  ops?: TokenBucket;
}

function fail(message: string): never {
  throw new DenovisorError("INVALID_ARGUMENT", message);
}

function checkBucket(bucket: unknown, where: string): void {
  if (typeof bucket !== "object" || bucket === null || Array.isArray(bucket)) {
    fail(`${where} must be an object, got ${JSON.stringify(bucket)}`);
  }
  const b = bucket as Record<string, unknown>;
  for (const key of Object.keys(b)) {
    if (!["size", "oneTimeBurst", "refillTimeMs"].includes(key)) {
      fail(`${where} has an unknown field ${JSON.stringify(key)}`);
    }
  }
  const integer = (value: unknown, min: number, max: number) =>
    typeof value === "number" && Number.isSafeInteger(value) && value >= min && value <= max;
  if (!integer(b.size, 1, Number.MAX_SAFE_INTEGER)) {
    fail(`${where}.size must be a positive integer, got ${JSON.stringify(b.size)}`);
  }
  if (b.oneTimeBurst !== undefined && !integer(b.oneTimeBurst, 0, Number.MAX_SAFE_INTEGER)) {
    fail(
      `${where}.oneTimeBurst must be a non-negative integer, got ${JSON.stringify(b.oneTimeBurst)}`,
    );
  }
  if (!integer(b.refillTimeMs, 1, MAX_REFILL_MS)) {
    fail(
      `${where}.refillTimeMs must be an integer from 1 to ${MAX_REFILL_MS}, got ` +
        JSON.stringify(b.refillTimeMs),
    );
  }
}

/**
 * Checks a rate limiter configuration.
 *
 * @example
 * ```ts
 * import { checkRateLimiter } from "denovisor";
 * checkRateLimiter({ ops: { size: 100, refillTimeMs: 1000 } }, "disk");
 * ```
 *
 * @param limiter The configuration.
 * @param owner What it limits (for the error message).
 * @param field The field holding it (for the error message).
 * @throws {DenovisorError} `INVALID_ARGUMENT` naming the bad field.
 */
export function checkRateLimiter(limiter: unknown, owner: string, field = "rateLimiter"): void {
  const where = `${owner}'s ${field}`;
  if (typeof limiter !== "object" || limiter === null || Array.isArray(limiter)) {
    fail(`${where} must be an object, got ${JSON.stringify(limiter)}`);
  }
  const l = limiter as Record<string, unknown>;
  for (const key of Object.keys(l)) {
    if (key !== "bandwidth" && key !== "ops") {
      fail(`${where} has an unknown field ${JSON.stringify(key)} (known: bandwidth, ops)`);
    }
  }
  if (l.bandwidth !== undefined) checkBucket(l.bandwidth, `${where}.bandwidth`);
  if (l.ops !== undefined) checkBucket(l.ops, `${where}.ops`);
}
