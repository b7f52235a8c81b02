/**
 * How many warm VMs a function's pool keeps: pure functions over a clock the
 * caller passes in (ms), so that every decision is unit-tested without VMs.
 *
 * - Load: an exponentially weighted arrival rate λ (each arrival adds 1/τ,
 *   the sum decays as e^(−Δt/τ), so it falls to 0 while idle) and an EWMA of
 *   the service time W (the host-measured time a VM is held per request).
 * - Target (Little's law): the VMs busy on average are L = λ·W; the pool
 *   keeps `min + ceil(L × headroom)`, at most `max`, and at least what is busy
 *   or queued right now: it grows ahead of demand, before requests queue.
 * - Shrink: an idle VM beyond the target is retired only once it has been
 *   idle for `shrinkAfterMs` (bursty load does not churn VMs).
 * - Trim: a VM idle for `trimAfterMs` gives its private pages back
 *   (`vm.trim()`), once, until it serves again.
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";

/** The knobs of a pool's sizing. */
export interface PoolPolicy {
  /** VMs kept warm even with no load (0 or more). */
  min: number;
  /** Never more VMs than this (1 or more, at least `min`). */
  max: number;
  /** Spare capacity over Little's law, as a factor (1 = none; default 1.5). */
  headroom: number;
  /** Half-life of the arrival-rate estimate, in ms. */
  rateHalfLifeMs: number;
  /** Weight of each new service time in its EWMA (0 < w ≤ 1). */
  serviceWeight: number;
  /** An idle VM beyond the target is retired after this long idle, in ms. */
  shrinkAfterMs: number;
  /** An idle VM is trimmed after this long idle, in ms (0: never). */
  trimAfterMs: number;
}

/** Defaults of {@link PoolPolicy}. */
export const DEFAULT_POOL_POLICY: Readonly<PoolPolicy> = Object.freeze({
  min: 1,
  max: 16,
  headroom: 1.5,
  rateHalfLifeMs: 2_000,
  serviceWeight: 0.2,
  shrinkAfterMs: 30_000,
  trimAfterMs: 5_000,
});

/** The largest `max` a pool accepts. */
export const MAX_POOL_SIZE = 4096;

/**
 * A complete policy from a partial one, checked.
 *
 * @param policy What the caller sets.
 * @returns Every knob, defaults filled in.
 * @throws {DenovisorError} `INVALID_ARGUMENT` for a knob out of range.
 * @example
 * ```ts
 * import { poolPolicy } from "denovisor/src/serverless/policy.ts";
 * console.log(poolPolicy({ min: 2, max: 4 }).headroom); // 1.5
 * ```
 */
export function poolPolicy(policy: Partial<PoolPolicy> = {}): PoolPolicy {
  const p: PoolPolicy = { ...DEFAULT_POOL_POLICY };
  for (const key of Object.keys(DEFAULT_POOL_POLICY) as (keyof PoolPolicy)[]) {
    if (policy[key] !== undefined) p[key] = policy[key];
  }
  // A min above the default max raises the max with it, unless max is set.
  if (policy.max === undefined && p.max < p.min) p.max = p.min;
  const bad = (what: string) => new DenovisorError("INVALID_ARGUMENT", `pool policy: ${what}`);
  if (!Number.isSafeInteger(p.min) || p.min < 0 || p.min > MAX_POOL_SIZE) {
    throw bad(`min must be an integer from 0 to ${MAX_POOL_SIZE}, got ${p.min}`);
  }
  if (!Number.isSafeInteger(p.max) || p.max < 1 || p.max > MAX_POOL_SIZE) {
    throw bad(`max must be an integer from 1 to ${MAX_POOL_SIZE}, got ${p.max}`);
  }
  if (p.max < p.min) throw bad(`max (${p.max}) is below min (${p.min})`);
  if (!(p.headroom >= 1 && p.headroom <= 100)) {
    throw bad(`headroom must be from 1 to 100, got ${p.headroom}`);
  }
  if (!(p.rateHalfLifeMs > 0 && Number.isFinite(p.rateHalfLifeMs))) {
    throw bad(`rateHalfLifeMs must be positive, got ${p.rateHalfLifeMs}`);
  }
  if (!(p.serviceWeight > 0 && p.serviceWeight <= 1)) {
    throw bad(`serviceWeight must be in (0, 1], got ${p.serviceWeight}`);
  }
  for (const key of ["shrinkAfterMs", "trimAfterMs"] as const) {
    if (!(p[key] >= 0 && Number.isFinite(p[key]))) {
      throw bad(`${key} must be a non-negative number of ms, got ${p[key]}`);
    }
  }
  return p;
}

/** A function's load as the policy sees it. Immutable: every update returns a new one. */
export interface LoadEstimate {
  /** Arrivals per ms, as of `at`. */
  rate: number;
  /** When `rate` was last brought up to date (ms). */
  at: number;
  /** EWMA of the service time, in ms (0 before the first request ends). */
  serviceMs: number;
  /** Service times seen. */
  samples: number;
}

/**
 * The load before any request.
 *
 * @param now The clock (ms).
 * @returns No arrivals, no service time yet.
 * @example
 * ```ts
 * import { initialLoad } from "denovisor/src/serverless/policy.ts";
 * console.log(initialLoad(0).rate); // 0
 * ```
 */
export function initialLoad(now: number): LoadEstimate {
  return { rate: 0, at: now, serviceMs: 0, samples: 0 };
}

function tau(policy: PoolPolicy): number {
  return policy.rateHalfLifeMs / Math.LN2;
}

/**
 * The arrival rate at `now`: the estimate decayed since it was last updated.
 *
 * @param load The estimate.
 * @param now The clock (ms; a clock that went back counts as no time passed).
 * @param policy The policy (its half-life).
 * @returns Arrivals per ms.
 * @example
 * ```ts
 * import { arrivalRate, initialLoad, poolPolicy, recordArrival } from "denovisor/src/serverless/policy.ts";
 * const p = poolPolicy({ rateHalfLifeMs: 1000 });
 * const load = recordArrival(initialLoad(0), 0, p);
 * console.log(arrivalRate(load, 1000, p) / arrivalRate(load, 0, p)); // 0.5
 * ```
 */
export function arrivalRate(load: LoadEstimate, now: number, policy: PoolPolicy): number {
  const dt = Math.max(0, now - load.at);
  return load.rate * Math.exp(-dt / tau(policy));
}

/**
 * The estimate after a request arrived at `now`.
 *
 * @param load The estimate before.
 * @param now When it arrived (ms).
 * @param policy The policy.
 * @returns The new estimate.
 * @example
 * ```ts
 * import { initialLoad, poolPolicy, recordArrival } from "denovisor/src/serverless/policy.ts";
 * const load = recordArrival(initialLoad(0), 5, poolPolicy());
 * console.log(load.rate > 0); // true
 * ```
 */
export function recordArrival(load: LoadEstimate, now: number, policy: PoolPolicy): LoadEstimate {
  const at = Math.max(now, load.at);
  return { ...load, rate: arrivalRate(load, at, policy) + 1 / tau(policy), at };
}

/**
 * The estimate after a request held a VM for `serviceMs`.
 *
 * @param load The estimate before.
 * @param serviceMs How long (ms; negative or non-finite values are ignored).
 * @param policy The policy (its weight).
 * @returns The new estimate.
 * @example
 * ```ts
 * import { initialLoad, poolPolicy, recordService } from "denovisor/src/serverless/policy.ts";
 * console.log(recordService(initialLoad(0), 4, poolPolicy()).serviceMs); // 4
 * ```
 */
export function recordService(
  load: LoadEstimate,
  serviceMs: number,
  policy: PoolPolicy,
): LoadEstimate {
  if (!(serviceMs >= 0 && Number.isFinite(serviceMs))) return load;
  const serviceMsNext = load.samples === 0
    ? serviceMs
    : load.serviceMs + policy.serviceWeight * (serviceMs - load.serviceMs);
  return { ...load, serviceMs: serviceMsNext, samples: load.samples + 1 };
}

/**
 * The pool size the load asks for: `min + ceil(λ·W·headroom)`, at most `max`,
 * and at least `demand` (busy + queued) within `max`.
 *
 * @param load The estimate.
 * @param now The clock (ms).
 * @param policy The policy.
 * @param demand VMs needed right now (busy + queued).
 * @returns The target size.
 * @example
 * ```ts
 * import { poolPolicy, targetPoolSize } from "denovisor/src/serverless/policy.ts";
 * // 2 arrivals per ms, 3 ms each: 6 busy on average, x1.5 headroom = 9, + min 1
 * const load = { rate: 2, at: 0, serviceMs: 3, samples: 10 };
 * console.log(targetPoolSize(load, 0, poolPolicy({ max: 64 }))); // 10
 * ```
 */
export function targetPoolSize(
  load: LoadEstimate,
  now: number,
  policy: PoolPolicy,
  demand = 0,
): number {
  const busy = arrivalRate(load, now, policy) * load.serviceMs;
  // A tiny remainder (a decayed rate) must not hold a VM forever.
  const little = busy * policy.headroom < 0.05 ? 0 : Math.ceil(busy * policy.headroom);
  const target = Math.max(policy.min + little, demand);
  return Math.min(policy.max, target);
}

/** One VM of a pool as the planner sees it. */
export interface PoolMember {
  /** The pool's id of the VM. */
  id: number;
  /** Serving a request now. */
  busy: boolean;
  /** Since when it is idle (ms); meaningless while busy. */
  idleSince: number;
  /** Already trimmed since it last served. */
  trimmed: boolean;
}

/** What a pool should do now. */
export interface PoolPlan {
  /** The size the load asks for. */
  target: number;
  /** VMs to start. */
  start: number;
  /** Idle VMs to close, longest idle first. */
  retire: number[];
  /** Idle VMs to trim. */
  trim: number[];
}

/**
 * Plans a pool's next step: start VMs up to the target, retire idle VMs
 * beyond it once idle long enough, trim VMs idle long enough.
 *
 * @param members The pool's VMs.
 * @param starting VMs being started now.
 * @param queued Requests waiting for a VM.
 * @param load The load estimate.
 * @param now The clock (ms).
 * @param policy The policy.
 * @returns What to do.
 * @example
 * ```ts
 * import { initialLoad, planPool, poolPolicy } from "denovisor/src/serverless/policy.ts";
 * const plan = planPool([], 0, 0, initialLoad(0), 0, poolPolicy({ min: 2 }));
 * console.log(plan.start); // 2
 * ```
 */
export function planPool(
  members: readonly PoolMember[],
  starting: number,
  queued: number,
  load: LoadEstimate,
  now: number,
  policy: PoolPolicy,
): PoolPlan {
  const busy = members.filter((m) => m.busy).length;
  const target = targetPoolSize(load, now, policy, busy + queued);
  const have = members.length + starting;
  const start = Math.max(0, Math.min(target, policy.max) - have);
  const idle = members.filter((m) => !m.busy).sort((a, b) => a.idleSince - b.idleSince);
  const retire: number[] = [];
  let excess = have - target;
  for (const m of idle) {
    if (excess <= 0) break;
    if (now - m.idleSince >= policy.shrinkAfterMs) {
      retire.push(m.id);
      excess--;
    }
  }
  const trim = policy.trimAfterMs > 0
    ? idle.filter((m) =>
      !m.trimmed && !retire.includes(m.id) && now - m.idleSince >= policy.trimAfterMs
    ).map((m) => m.id)
    : [];
  return { target, start, retire, trim };
}
