/**
 * The function service's pool policy (pure functions over a clock the test
 * drives), its metrics (histograms, medians, the Prometheus text) and how an
 * invocation's result becomes an HTTP status. Host-only: no VM.
 */

import assert from "node:assert/strict";

import { DenovisorError } from "../mod.ts";
import {
  arrivalRate,
  initialLoad,
  type LoadEstimate,
  planPool,
  type PoolMember,
  poolPolicy,
  recordArrival,
  recordService,
  targetPoolSize,
} from "../src/serverless/policy.ts";
import {
  FunctionMetrics,
  Histogram,
  median,
  type PoolGauges,
  toFunctionPrometheus,
} from "../src/serverless/metrics.ts";
import { answerOf } from "../src/serverless/service.ts";

const POOL: PoolGauges = {
  size: 2,
  busy: 1,
  starting: 0,
  queued: 3,
  trimmed: 1,
  target: 4,
  started: 5,
  retired: 2,
  replaced: 1,
  startFailures: 0,
};

function invalid(fn: () => unknown, pattern: RegExp): void {
  assert.throws(fn, (e) => {
    assert.ok(e instanceof DenovisorError, `${e}`);
    assert.equal(e.code, "INVALID_ARGUMENT");
    assert.match(e.message, pattern);
    return true;
  });
}

/** Arrivals every `everyMs` from `from` to `to`, each held `serviceMs`. */
function steady(
  load: LoadEstimate,
  from: number,
  to: number,
  everyMs: number,
  serviceMs: number,
  policy = poolPolicy(),
): LoadEstimate {
  for (let t = from; t < to; t += everyMs) {
    load = recordService(recordArrival(load, t, policy), serviceMs, policy);
  }
  return load;
}

Deno.test("the policy fills in defaults and refuses knobs out of range", () => {
  const p = poolPolicy();
  assert.equal(p.min, 1);
  assert.equal(p.max, 16);
  assert.equal(poolPolicy({ min: 20 }).max, 20, "a min above the default max raises it");
  assert.equal(poolPolicy({ min: undefined }).min, 1, "an undefined knob keeps its default");
  invalid(() => poolPolicy({ min: 5, max: 2 }), /max \(2\) is below min \(5\)/);
  invalid(() => poolPolicy({ max: 0 }), /max must be an integer from 1/);
  invalid(() => poolPolicy({ min: -1 }), /min must be/);
  invalid(() => poolPolicy({ min: 1.5 }), /min must be/);
  invalid(() => poolPolicy({ headroom: 0.5 }), /headroom/);
  invalid(() => poolPolicy({ rateHalfLifeMs: 0 }), /rateHalfLifeMs/);
  invalid(() => poolPolicy({ serviceWeight: 0 }), /serviceWeight/);
  invalid(() => poolPolicy({ shrinkAfterMs: NaN }), /shrinkAfterMs/);
  invalid(() => poolPolicy({ trimAfterMs: -1 }), /trimAfterMs/);
});

Deno.test("the arrival rate halves every half-life and tracks a steady rate", () => {
  const p = poolPolicy({ rateHalfLifeMs: 1000 });
  const one = recordArrival(initialLoad(0), 0, p);
  const r0 = arrivalRate(one, 0, p);
  assert.ok(Math.abs(arrivalRate(one, 1000, p) / r0 - 0.5) < 1e-9);
  assert.ok(Math.abs(arrivalRate(one, 3000, p) / r0 - 0.125) < 1e-9);
  assert.equal(arrivalRate(one, -50, p), r0, "a clock that went back counts as no time");
  // One arrival every 10 ms for 20 half-lives: 0.1 per ms.
  const load = steady(initialLoad(0), 0, 20_000, 10, 1, p);
  const rate = arrivalRate(load, 20_000, p);
  assert.ok(Math.abs(rate - 0.1) / 0.1 < 0.01, `rate ${rate} per ms`);
  assert.equal(arrivalRate(initialLoad(0), 1e9, p), 0);
});

Deno.test("the service time is an EWMA seeded by its first sample; bad samples are ignored", () => {
  const p = poolPolicy({ serviceWeight: 0.5 });
  let load = recordService(initialLoad(0), 8, p);
  assert.equal(load.serviceMs, 8);
  load = recordService(load, 4, p);
  assert.equal(load.serviceMs, 6);
  assert.equal(recordService(load, -1, p), load);
  assert.equal(recordService(load, NaN, p), load);
  assert.equal(recordService(load, Infinity, p), load);
  assert.equal(load.samples, 2);
});

Deno.test("the target is min + ceil(rate x service time x headroom), within max, at least the demand", () => {
  const p = poolPolicy({ min: 1, max: 64, headroom: 1.5 });
  const load: LoadEstimate = { rate: 2, at: 0, serviceMs: 3, samples: 10 };
  assert.equal(targetPoolSize(load, 0, p), 1 + 9);
  assert.equal(targetPoolSize(load, 0, poolPolicy({ min: 1, max: 5 })), 5);
  assert.equal(targetPoolSize(initialLoad(0), 0, p), 1);
  assert.equal(targetPoolSize(initialLoad(0), 0, p, 7), 7, "busy + queued");
  assert.equal(targetPoolSize(initialLoad(0), 0, poolPolicy({ max: 4 }), 7), 4);
  // Idle for a long time: the load decays and the target falls back to min.
  assert.equal(targetPoolSize(load, 120_000, p), 1);
  assert.equal(targetPoolSize(load, 120_000, poolPolicy({ min: 0 })), 0);
});

Deno.test("a steady load of 1 request per ms held 4 ms each asks for about 4 x headroom VMs", () => {
  const p = poolPolicy({ min: 0, max: 100, headroom: 1.25, rateHalfLifeMs: 500 });
  const load = steady(initialLoad(0), 0, 10_000, 1, 4, p);
  // Little's law: L = 1/ms x 4 ms = 4 busy; x 1.25 = 5.
  assert.equal(targetPoolSize(load, 10_000, p), 5);
});

function member(id: number, busy: boolean, idleSince: number, trimmed = false): PoolMember {
  return { id, busy, idleSince, trimmed };
}

Deno.test("the plan starts the minimum, then grows ahead of demand before anything queues", () => {
  const p = poolPolicy({ min: 2, max: 10, headroom: 1.5 });
  assert.equal(planPool([], 0, 0, initialLoad(0), 0, p).start, 2);
  assert.equal(planPool([], 2, 0, initialLoad(0), 0, p).start, 0, "starting VMs count");
  // 2 of 2 busy, nothing queued, but the load says 1 + ceil(0.5 x 6 x 1.5) = 6.
  const load: LoadEstimate = { rate: 0.5, at: 0, serviceMs: 6, samples: 20 };
  const plan = planPool([member(1, true, 0), member(2, true, 0)], 0, 0, load, 0, p);
  assert.equal(plan.target, 7);
  assert.equal(plan.start, 5);
  // Queued requests are demand even without load history.
  const queued = planPool([member(1, true, 0)], 0, 4, initialLoad(0), 0, p);
  assert.equal(queued.start, 4);
  // Never more than max, counting those starting.
  const capped = planPool([member(1, true, 0)], 3, 50, initialLoad(0), 0, p);
  assert.equal(capped.start, 10 - 4);
});

Deno.test("the plan shrinks only after the idle time, longest idle first, and never a busy VM", () => {
  const p = poolPolicy({ min: 1, max: 10, shrinkAfterMs: 1000, trimAfterMs: 0 });
  const members = [
    member(1, false, 500),
    member(2, false, 100),
    member(3, true, 0),
    member(4, false, 900),
  ];
  assert.deepEqual(planPool(members, 0, 0, initialLoad(0), 1000, p).retire, []);
  // At 1600: VMs 1 (idle 1100 ms) and 2 (1500 ms) qualify, 4 (700 ms) does not.
  const plan = planPool(members, 0, 0, initialLoad(0), 1600, p);
  assert.equal(plan.target, 1);
  assert.deepEqual(plan.retire, [2, 1]);
  // Much later all three idle ones qualify, but the target (busy = 1 = min) keeps one VM.
  assert.deepEqual(planPool(members, 0, 0, initialLoad(0), 99_999, p).retire, [2, 1, 4]);
  // A higher target keeps them.
  const busyLoad: LoadEstimate = { rate: 1, at: 99_999, serviceMs: 3, samples: 5 };
  assert.deepEqual(planPool(members, 0, 0, busyLoad, 99_999, p).retire, []);
});

Deno.test("the plan trims VMs idle long enough, once, and not those it retires", () => {
  const p = poolPolicy({ min: 3, max: 10, shrinkAfterMs: 10_000, trimAfterMs: 500 });
  const members = [
    member(1, false, 0),
    member(2, false, 0, true),
    member(3, true, 0),
    member(4, false, 800),
  ];
  assert.deepEqual(planPool(members, 0, 0, initialLoad(0), 1000, p).trim, [1]);
  assert.deepEqual(planPool(members, 0, 0, initialLoad(0), 1300, p).trim, [1, 4]);
  assert.deepEqual(
    planPool(members, 0, 0, initialLoad(0), 1000, poolPolicy({ trimAfterMs: 0 })).trim,
    [],
  );
  // At 1600 VMs 1 and 2 are retired (idle 1600 ms); 1 is not also trimmed; 4 (800 ms) is.
  const shrink = poolPolicy({ min: 1, max: 10, shrinkAfterMs: 1500, trimAfterMs: 500 });
  const plan = planPool(members, 0, 0, initialLoad(0), 1600, shrink);
  assert.deepEqual(plan.retire, [1, 2]);
  assert.deepEqual(plan.trim, [4]);
});

Deno.test("histograms put each value in the first bucket whose bound is not below it", () => {
  const h = new Histogram([0.001, 0.01, 0.1]);
  for (const v of [0.0005, 0.001, 0.002, 0.5, -1, NaN, Infinity]) h.observe(v);
  const s = h.snapshot();
  assert.deepEqual(s.counts, [2, 1, 0, 1]);
  assert.equal(s.count, 4);
  assert.ok(Math.abs(s.sum - 0.5035) < 1e-12);
  assert.equal(median([5, 1, 3]), 3);
  assert.equal(median([4, 1, 3, 2]), 2.5);
  assert.equal(median([]), null);
});

Deno.test("function metrics count requests, resets, ENOSYS and the overhead model", () => {
  const m = new FunctionMetrics("echo", 0.25);
  m.countRequest(200, "exited", 0.002);
  m.countRequest(200, "exited", 0.004);
  m.countRequest(504, "timeout", 1.5);
  const figures = {
    runNs: 20_000,
    resetNs: 5_000,
    resetPages: 7,
    exits: 2,
    syscalls: 30,
    enosys: [{ nr: 302, count: 2 }, { nr: 13, count: 1 }],
  };
  m.countInvocation(figures);
  m.countInvocation({ ...figures, enosys: [{ nr: 302, count: 1 }, { nr: -1, count: 9 }] });
  let s = m.snapshot(POOL);
  assert.deepEqual(s.requests, [
    { status: 200, outcome: "exited", count: 2 },
    { status: 504, outcome: "timeout", count: 1 },
  ]);
  assert.equal(s.latency.count, 3);
  assert.equal(s.run.count, 2);
  assert.deepEqual(s.resets, { count: 2, pages: 14 });
  assert.equal(s.syscalls, 60);
  assert.deepEqual(s.enosys, [{ nr: 13, count: 1 }, { nr: 302, count: 3 }]);
  assert.equal(s.overhead.samples, 0);
  assert.equal(s.overhead.ratio, null);
  m.countOverheadSample(300, 100, true);
  m.countOverheadSample(500, 200, false);
  m.countOverheadSample(400, 150, true);
  m.countOverheadSample(999, null, false);
  s = m.snapshot(POOL);
  assert.deepEqual(
    { ...s.overhead },
    {
      sampleRate: 0.25,
      samples: 3,
      virtMedianUs: 400,
      nativeMedianUs: 150,
      overheadUs: 250,
      ratio: 400 / 150,
      mismatches: 1,
      failures: 1,
    },
  );
  assert.deepEqual(s.pool, POOL);
});

/** The samples of a Prometheus text, by metric line, checking every family is declared. */
function parsePrometheus(text: string): Map<string, number> {
  assert.ok(text.endsWith("\n"));
  const types = new Map<string, string>();
  const samples = new Map<string, number>();
  for (const line of text.trimEnd().split("\n")) {
    const type = line.match(/^# TYPE (\S+) (counter|gauge|histogram)$/);
    if (type) {
      assert.ok(!types.has(type[1]), `${type[1]} declared twice`);
      types.set(type[1], type[2]);
      continue;
    }
    if (line.startsWith("# HELP ")) continue;
    const sample = line.match(/^([a-z_]+)(\{[^}]*\})? (\S+)$/);
    assert.ok(sample, `not a sample line: ${line}`);
    const family = sample[1].replace(/_(bucket|sum|count)$/, "");
    assert.ok(types.has(sample[1]) || types.get(family) === "histogram", `undeclared ${sample[1]}`);
    const value = Number(sample[3]);
    assert.ok(!Number.isNaN(value), line);
    samples.set(`${sample[1]}${sample[2] ?? ""}`, value);
  }
  return samples;
}

Deno.test("the Prometheus text has cumulative buckets, escaped labels and the overhead model", () => {
  const a = new FunctionMetrics('we"ird\\name', 0);
  a.countRequest(200, "exited", 0.00002);
  a.countRequest(200, "exited", 0.003);
  a.countRequest(507, "memory_limit", 100);
  const b = new FunctionMetrics("b", 1);
  b.countInvocation({
    runNs: 1e6,
    resetNs: 2e4,
    resetPages: 3,
    exits: 1,
    syscalls: 9,
    enosys: [{ nr: 99, count: 4 }],
  });
  b.countOverheadSample(50, 40, true);
  const text = toFunctionPrometheus([a.snapshot(POOL), b.snapshot({ ...POOL, size: 9 })]);
  const s = parsePrometheus(text);
  const A = 'function="we\\"ird\\\\name"';
  assert.equal(s.get(`denovisor_fn_requests_total{${A},status="200",outcome="exited"}`), 2);
  assert.equal(s.get(`denovisor_fn_requests_total{${A},status="507",outcome="memory_limit"}`), 1);
  assert.equal(s.get(`denovisor_fn_request_seconds_bucket{${A},le="0.000025"}`), 1);
  assert.equal(s.get(`denovisor_fn_request_seconds_bucket{${A},le="0.005"}`), 2);
  assert.equal(s.get(`denovisor_fn_request_seconds_bucket{${A},le="30"}`), 2);
  assert.equal(s.get(`denovisor_fn_request_seconds_bucket{${A},le="+Inf"}`), 3);
  assert.equal(s.get(`denovisor_fn_request_seconds_count{${A}}`), 3);
  assert.equal(s.get('denovisor_fn_run_seconds_sum{function="b"}'), 0.001);
  assert.equal(s.get('denovisor_fn_reset_pages_total{function="b"}'), 3);
  assert.equal(s.get('denovisor_fn_enosys_total{function="b",nr="99"}'), 4);
  assert.equal(s.get('denovisor_fn_pool_size{function="b"}'), 9);
  assert.equal(s.get(`denovisor_fn_pool_queued{${A}}`), 3);
  assert.equal(s.get(`denovisor_fn_pool_replaced_total{${A}}`), 1);
  assert.equal(s.get(`denovisor_fn_pool_start_failures_total{${A}}`), 0);
  assert.equal(s.get('denovisor_fn_overhead_seconds{function="b",kind="virt"}'), 50e-6);
  assert.equal(s.get('denovisor_fn_overhead_seconds{function="b",kind="native"}'), 40e-6);
  assert.equal(s.get('denovisor_fn_overhead_ratio{function="b"}'), 1.25);
  assert.equal(s.get(`denovisor_fn_overhead_ratio{${A}}`), undefined, "no samples, no ratio");
  assert.equal(s.get(`denovisor_fn_native_sample_rate{${A}}`), 0);
  // Monotonic buckets for every function.
  for (const fn of [A, 'function="b"']) {
    let last = -1;
    for (const [key, v] of s) {
      if (key.startsWith(`denovisor_fn_request_seconds_bucket{${fn},`)) {
        assert.ok(v >= last, key);
        last = v;
      }
    }
  }
});

Deno.test("each invocation result maps to its HTTP status", () => {
  const cases: [Parameters<typeof answerOf>[0], number, string][] = [
    [{ status: "done", outcome: "exited" }, 200, "exited"],
    [{ status: "done", outcome: "memory_limit" }, 507, "memory_limit"],
    [{ status: "done", outcome: "output_limit" }, 502, "output_limit"],
    [{ status: "done", outcome: "signal" }, 502, "signal"],
    [{ status: "done", outcome: "init_failed" }, 502, "init_failed"],
    [{ status: "done", outcome: null }, 502, "protocol_error"],
    [{ status: "timeout", outcome: null }, 504, "timeout"],
    [{ status: "crashed", outcome: null }, 502, "crashed"],
    [{ status: "protocol_error", outcome: null }, 502, "protocol_error"],
    [{ status: "input_too_large", outcome: null }, 413, "input_too_large"],
    [{ status: "stopped", outcome: null }, 503, "stopped"],
  ];
  for (const [result, status, outcome] of cases) {
    const answer = answerOf(result);
    assert.equal(answer.status, status, JSON.stringify(result));
    assert.equal(answer.outcome, outcome);
    assert.equal(answer.error === undefined, status === 200);
  }
});
