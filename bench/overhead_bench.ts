/**
 * Virtualization overhead per workload kind: each group runs one workload
 * natively (the baseline) and in a fresh denovisor VM, so `deno bench` prints
 * "x times slower" per workload. These times are whole runs as seen from the
 * host (process spawn or VM creation included); `main.ts overhead` reports
 * the measured region alone.
 *
 *   deno bench -A bench/overhead_bench.ts
 *
 * @module
 */

import { runNative, runVirtual, WORKLOAD_INFO, WORKLOADS } from "../src/overhead.ts";

/** Each run takes a noticeable time here; a few samples tell the ratio. */
const SAMPLES = { n: 5, warmup: 1 };

for (const workload of WORKLOADS) {
  const size = WORKLOAD_INFO[workload].defaultArg;
  Deno.bench({
    name: `${workload}: native`,
    group: workload,
    baseline: true,
    ...SAMPLES,
    fn: async () => {
      await runNative(workload, size);
    },
  });
  Deno.bench({
    name: `${workload}: denovisor VM`,
    group: workload,
    ...SAMPLES,
    fn: async () => {
      await runVirtual(workload, size);
    },
  });
}
