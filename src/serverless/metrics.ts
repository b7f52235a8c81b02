/**
 * The function service's metrics: per function, latency histograms (end to
 * end and in-VM run time), requests by HTTP status and outcome, resets, the
 * pool's gauges, ENOSYS counts by system call number, and the overhead model
 * (T_virt − T_native over a sample of requests also run natively); rendered
 * as JSON and in the Prometheus text exposition format (0.0.4).
 *
 * Counting is a few additions per request in this process; rendering happens
 * only for `GET /metrics`.
 *
 * @module
 */

/** Upper bounds of the latency histograms' buckets, in seconds (then +Inf). */
export const LATENCY_BUCKETS_S: readonly number[] = Object.freeze([
  0.00001,
  0.000025,
  0.00005,
  0.0001,
  0.00025,
  0.0005,
  0.001,
  0.0025,
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2.5,
  5,
  10,
  30,
]);

/** How many paired native/virtual samples the overhead model keeps (the newest). */
export const OVERHEAD_SAMPLES_KEPT = 256;

/** A histogram's content. */
export interface HistogramSnapshot {
  /** Bucket upper bounds in seconds (the +Inf bucket is implied). */
  bounds: readonly number[];
  /** Observations per bucket, not cumulative; one more than `bounds` (the last is +Inf). */
  counts: number[];
  /** Sum of the observations, in seconds. */
  sum: number;
  /** Observations. */
  count: number;
}

/**
 * A fixed-bucket histogram of durations in seconds.
 *
 * @example
 * ```ts
 * import { Histogram } from "denovisor/src/serverless/metrics.ts";
 * const h = new Histogram();
 * h.observe(0.002);
 * console.log(h.snapshot().count); // 1
 * ```
 */
export class Histogram {
  readonly #bounds: readonly number[];
  readonly #counts: number[];
  #sum = 0;
  #count = 0;

  /**
   * An empty histogram.
   *
   * @param bounds Ascending bucket upper bounds in seconds (default {@link LATENCY_BUCKETS_S}).
   */
  constructor(bounds: readonly number[] = LATENCY_BUCKETS_S) {
    this.#bounds = bounds;
    this.#counts = new Array(bounds.length + 1).fill(0);
  }

  /**
   * Counts one observation (a negative or non-finite one is dropped).
   *
   * @param seconds The duration.
   */
  observe(seconds: number): void {
    if (!(seconds >= 0 && Number.isFinite(seconds))) return;
    let i = 0;
    while (i < this.#bounds.length && seconds > this.#bounds[i]) i++;
    this.#counts[i]++;
    this.#sum += seconds;
    this.#count++;
  }

  /**
   * A copy of the content.
   *
   * @returns Bounds, counts, sum and count.
   */
  snapshot(): HistogramSnapshot {
    return { bounds: this.#bounds, counts: [...this.#counts], sum: this.#sum, count: this.#count };
  }
}

/** A pool's gauges and counters at one moment. */
export interface PoolGauges {
  /** The VMs in the pool (busy and idle). */
  size: number;
  /** VMs serving a request. */
  busy: number;
  /** VMs being started (restored from the function's snapshot). */
  starting: number;
  /** Requests waiting for a VM. */
  queued: number;
  /** Idle VMs whose pages were given back. */
  trimmed: number;
  /** The size the policy asks for now. */
  target: number;
  /** VMs started since the pool began. */
  started: number;
  /** VMs closed because the policy shrank the pool. */
  retired: number;
  /** VMs closed because an invocation or reset failed on them (and replaced). */
  replaced: number;
  /** VM starts that failed. */
  startFailures: number;
}

/** The overhead model of a function: what isolation costs per request. */
export interface OverheadModel {
  /** The fraction of requests also run natively (0: off). */
  sampleRate: number;
  /** Paired samples the medians are over. */
  samples: number;
  /** Median time of the invocation in the VM (input in, run, output out, reset), µs. */
  virtMedianUs: number | null;
  /** Median time of the native run (spawn, stdin, run, stdout, exit), µs. */
  nativeMedianUs: number | null;
  /** `virtMedianUs − nativeMedianUs`. */
  overheadUs: number | null;
  /** `virtMedianUs / nativeMedianUs`. */
  ratio: number | null;
  /** Native samples whose stdout or exit status differed from the VM's. */
  mismatches: number;
  /** Native samples that could not run (not counted in the medians). */
  failures: number;
}

/** One function's metrics at one moment. */
export interface FunctionMetricsSnapshot {
  /** The function's name. */
  function: string;
  /** Requests by HTTP status and outcome (`exited`, `timeout`, `crashed`, ...). */
  requests: { status: number; outcome: string; count: number }[];
  /** End-to-end latency: request received to response built. */
  latency: HistogramSnapshot;
  /** In-VM run time of each invocation. */
  run: HistogramSnapshot;
  /** Reset time of each invocation. */
  reset: HistogramSnapshot;
  /** Resets done, and pages they restored. */
  resets: { count: number; pages: number };
  /** System calls the guest runtime served, and VM exits. */
  syscalls: number;
  /** VM exits during runs. */
  exits: number;
  /** Calls answered with -ENOSYS, by system call number. */
  enosys: { nr: number; count: number }[];
  /** The pool. */
  pool: PoolGauges;
  /** The overhead model. */
  overhead: OverheadModel;
}

/** What one invocation reports to the metrics (the fields of `InvokeResult` counted). */
export interface InvocationFigures {
  /** In-VM run time, ns. */
  runNs: number;
  /** Reset time, ns. */
  resetNs: number;
  /** Pages the reset restored. */
  resetPages: number;
  /** VM exits. */
  exits: number;
  /** System calls served. */
  syscalls: number;
  /** ENOSYS counts. */
  enosys: readonly { nr: number; count: number }[];
}

/**
 * The median of some numbers.
 *
 * @param values The numbers.
 * @returns Their median (the mean of the middle two for an even count), or null for none.
 * @example
 * ```ts
 * import { median } from "denovisor/src/serverless/metrics.ts";
 * console.log(median([3, 1, 2]), median([1, 2, 3, 4]), median([])); // 2 2.5 null
 * ```
 */
export function median(values: readonly number[]): number | null {
  if (values.length === 0) return null;
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

const finite = (n: number) => Number.isFinite(n) && n >= 0 ? n : 0;

/**
 * The counters of one function. The service records into it; {@link FunctionMetrics.snapshot}
 * reads it.
 *
 * @example
 * ```ts
 * import { FunctionMetrics } from "denovisor/src/serverless/metrics.ts";
 * const m = new FunctionMetrics("echo", 0);
 * m.countRequest(200, "exited", 0.001);
 * const pool = {
 *   size: 1, busy: 0, starting: 0, queued: 0, trimmed: 0, target: 1,
 *   started: 1, retired: 0, replaced: 0, startFailures: 0,
 * };
 * console.log(m.snapshot(pool).requests); // [ { status: 200, outcome: "exited", count: 1 } ]
 * ```
 */
export class FunctionMetrics {
  readonly #name: string;
  readonly #sampleRate: number;
  readonly #requests = new Map<string, number>();
  readonly #latency = new Histogram();
  readonly #run = new Histogram();
  readonly #reset = new Histogram();
  #resets = 0;
  #resetPages = 0;
  #syscalls = 0;
  #exits = 0;
  readonly #enosys = new Map<number, number>();
  readonly #virtUs: number[] = [];
  readonly #nativeUs: number[] = [];
  #mismatches = 0;
  #nativeFailures = 0;

  /**
   * Counters at zero.
   *
   * @param name The function's name.
   * @param sampleRate Its native sample rate (reported with the overhead model).
   */
  constructor(name: string, sampleRate: number) {
    this.#name = name;
    this.#sampleRate = sampleRate;
  }

  /**
   * Counts an answered request.
   *
   * @param status The HTTP status answered.
   * @param outcome What happened (`exited`, `timeout`, `crashed`, `overloaded`, ...).
   * @param seconds End-to-end latency.
   */
  countRequest(status: number, outcome: string, seconds: number): void {
    const key = `${status} ${outcome}`;
    this.#requests.set(key, (this.#requests.get(key) ?? 0) + 1);
    this.#latency.observe(seconds);
  }

  /**
   * Counts what an invocation did in the VM.
   *
   * @param r Its figures.
   */
  countInvocation(r: InvocationFigures): void {
    this.#run.observe(finite(r.runNs) / 1e9);
    this.#reset.observe(finite(r.resetNs) / 1e9);
    this.#resets++;
    this.#resetPages += finite(r.resetPages);
    this.#syscalls += finite(r.syscalls);
    this.#exits += finite(r.exits);
    for (const { nr, count } of r.enosys) {
      if (!Number.isSafeInteger(nr) || nr < 0 || !(count > 0)) continue;
      this.#enosys.set(nr, (this.#enosys.get(nr) ?? 0) + count);
    }
  }

  /**
   * Counts one overhead sample: the same request in the VM and natively.
   *
   * @param virtUs The invocation's time in the VM, µs.
   * @param nativeUs The native run's time, µs (null: it could not run).
   * @param matched Whether stdout and exit status agreed.
   */
  countOverheadSample(virtUs: number, nativeUs: number | null, matched: boolean): void {
    if (nativeUs === null) {
      this.#nativeFailures++;
      return;
    }
    this.#virtUs.push(virtUs);
    this.#nativeUs.push(nativeUs);
    if (this.#virtUs.length > OVERHEAD_SAMPLES_KEPT) {
      this.#virtUs.shift();
      this.#nativeUs.shift();
    }
    if (!matched) this.#mismatches++;
  }

  /**
   * The metrics now.
   *
   * @param pool The pool's gauges now.
   * @returns Everything, JSON-able.
   */
  snapshot(pool: PoolGauges): FunctionMetricsSnapshot {
    const virt = median(this.#virtUs);
    const native = median(this.#nativeUs);
    return {
      function: this.#name,
      requests: [...this.#requests].map(([key, count]) => {
        const [status, outcome] = key.split(" ");
        return { status: Number(status), outcome, count };
      }).sort((a, b) => a.status - b.status || a.outcome.localeCompare(b.outcome)),
      latency: this.#latency.snapshot(),
      run: this.#run.snapshot(),
      reset: this.#reset.snapshot(),
      resets: { count: this.#resets, pages: this.#resetPages },
      syscalls: this.#syscalls,
      exits: this.#exits,
      enosys: [...this.#enosys].map(([nr, count]) => ({ nr, count })).sort((a, b) => a.nr - b.nr),
      pool,
      overhead: {
        sampleRate: this.#sampleRate,
        samples: this.#virtUs.length,
        virtMedianUs: virt,
        nativeMedianUs: native,
        overheadUs: virt !== null && native !== null ? virt - native : null,
        ratio: virt !== null && native !== null && native > 0 ? virt / native : null,
        mismatches: this.#mismatches,
        failures: this.#nativeFailures,
      },
    };
  }
}

/** Escapes a Prometheus label value. */
function label(value: string): string {
  return value.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}

function labels(all: Record<string, string>): string {
  const parts = Object.entries(all).map(([k, v]) => `${k}="${label(v)}"`);
  return parts.length ? `{${parts.join(",")}}` : "";
}

/**
 * Renders the service's metrics in the Prometheus text exposition format
 * (version 0.0.4). Every family is `denovisor_fn_*`, labelled by `function`.
 *
 * @param functions Each function's snapshot.
 * @returns The exposition text, ending with a newline.
 * @example
 * ```ts
 * import { FunctionMetrics, toFunctionPrometheus } from "denovisor/src/serverless/metrics.ts";
 * const m = new FunctionMetrics("echo", 0);
 * const pool = {
 *   size: 1, busy: 0, starting: 0, queued: 0, trimmed: 0, target: 1,
 *   started: 1, retired: 0, replaced: 0, startFailures: 0,
 * };
 * console.log(toFunctionPrometheus([m.snapshot(pool)]));
 * ```
 */
export function toFunctionPrometheus(functions: readonly FunctionMetricsSnapshot[]): string {
  const lines: string[] = [];
  const family = (name: string, type: string, help: string) => {
    lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
  };
  const each = (
    f: (m: FunctionMetricsSnapshot, l: (extra?: Record<string, string>) => string) => void,
  ) => {
    for (const m of functions) f(m, (extra = {}) => labels({ function: m.function, ...extra }));
  };
  const histogram = (
    name: string,
    help: string,
    pick: (m: FunctionMetricsSnapshot) => HistogramSnapshot,
  ) => {
    family(name, "histogram", help);
    each((m, l) => {
      const h = pick(m);
      let cumulative = 0;
      h.bounds.forEach((bound, i) => {
        cumulative += h.counts[i];
        lines.push(`${name}_bucket${l({ le: `${bound}` })} ${cumulative}`);
      });
      cumulative += h.counts[h.bounds.length];
      lines.push(
        `${name}_bucket${l({ le: "+Inf" })} ${cumulative}`,
        `${name}_sum${l()} ${h.sum}`,
        `${name}_count${l()} ${h.count}`,
      );
    });
  };

  family(
    "denovisor_fn_requests_total",
    "counter",
    "Requests answered, by HTTP status and outcome.",
  );
  each((m, l) => {
    for (const r of m.requests) {
      lines.push(
        `denovisor_fn_requests_total${l({ status: `${r.status}`, outcome: r.outcome })} ${r.count}`,
      );
    }
  });
  histogram(
    "denovisor_fn_request_seconds",
    "End-to-end latency: request received to response built.",
    (m) => m.latency,
  );
  histogram("denovisor_fn_run_seconds", "Time the function ran in its VM.", (m) => m.run);
  histogram(
    "denovisor_fn_reset_seconds",
    "Time the VM's reset to its checkpoint took after each request.",
    (m) => m.reset,
  );
  family("denovisor_fn_resets_total", "counter", "Resets of a VM to its checkpoint.");
  each((m, l) => lines.push(`denovisor_fn_resets_total${l()} ${m.resets.count}`));
  family("denovisor_fn_reset_pages_total", "counter", "Guest pages the resets restored.");
  each((m, l) => lines.push(`denovisor_fn_reset_pages_total${l()} ${m.resets.pages}`));
  family("denovisor_fn_syscalls_total", "counter", "System calls the guest runtime served.");
  each((m, l) => lines.push(`denovisor_fn_syscalls_total${l()} ${m.syscalls}`));
  family("denovisor_fn_vm_exits_total", "counter", "VM exits during the function's runs.");
  each((m, l) => lines.push(`denovisor_fn_vm_exits_total${l()} ${m.exits}`));
  family(
    "denovisor_fn_enosys_total",
    "counter",
    "System calls answered with -ENOSYS, by Linux x86-64 system call number.",
  );
  each((m, l) => {
    for (const e of m.enosys) {
      lines.push(`denovisor_fn_enosys_total${l({ nr: `${e.nr}` })} ${e.count}`);
    }
  });

  const gauges: [keyof PoolGauges, string, string][] = [
    ["size", "gauge", "VMs in the pool, busy and idle."],
    ["busy", "gauge", "VMs serving a request."],
    ["starting", "gauge", "VMs being restored from the function's snapshot."],
    ["queued", "gauge", "Requests waiting for a VM."],
    ["trimmed", "gauge", "Idle VMs whose private pages were given back."],
    ["target", "gauge", "The pool size the policy asks for (Little's law x headroom + min)."],
    ["started", "counter", "VMs started."],
    ["retired", "counter", "VMs closed as the pool shrank."],
    ["replaced", "counter", "VMs closed and replaced after a failed invocation or reset."],
    ["startFailures", "counter", "VM starts that failed."],
  ];
  for (const [key, type, help] of gauges) {
    const snake = key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
    const name = `denovisor_fn_pool_${snake}${type === "counter" ? "_total" : ""}`;
    family(name, type, help);
    each((m, l) => lines.push(`${name}${l()} ${m.pool[key]}`));
  }

  family(
    "denovisor_fn_overhead_seconds",
    "gauge",
    "The overhead model: medians over the sampled requests of the invocation in the VM (virt), " +
      "the same program run natively (native) and their difference (overhead).",
  );
  each((m, l) => {
    const o = m.overhead;
    for (
      const [kind, us] of [["virt", o.virtMedianUs], ["native", o.nativeMedianUs], [
        "overhead",
        o.overheadUs,
      ]] as const
    ) {
      if (us !== null) lines.push(`denovisor_fn_overhead_seconds${l({ kind })} ${us / 1e6}`);
    }
  });
  family(
    "denovisor_fn_overhead_ratio",
    "gauge",
    "Median T_virt / median T_native over the sample.",
  );
  each((m, l) => {
    if (m.overhead.ratio !== null) {
      lines.push(`denovisor_fn_overhead_ratio${l()} ${m.overhead.ratio}`);
    }
  });
  family("denovisor_fn_overhead_samples", "gauge", "Paired samples the overhead medians are over.");
  each((m, l) => lines.push(`denovisor_fn_overhead_samples${l()} ${m.overhead.samples}`));
  family("denovisor_fn_native_sample_rate", "gauge", "Fraction of requests also run natively.");
  each((m, l) => lines.push(`denovisor_fn_native_sample_rate${l()} ${m.overhead.sampleRate}`));
  family(
    "denovisor_fn_native_mismatches_total",
    "counter",
    "Native samples whose stdout or exit status differed from the VM's.",
  );
  each((m, l) => lines.push(`denovisor_fn_native_mismatches_total${l()} ${m.overhead.mismatches}`));
  family("denovisor_fn_native_failures_total", "counter", "Native samples that could not run.");
  each((m, l) => lines.push(`denovisor_fn_native_failures_total${l()} ${m.overhead.failures}`));
  return lines.join("\n") + "\n";
}
