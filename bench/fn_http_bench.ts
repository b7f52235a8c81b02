/**
 * The function service over HTTP, end to end (issue 10, "Performance"): a
 * trivial function (busybox `echo ok`) served in micro-VMs, against the same
 * function served natively (a subprocess per request, the service's native
 * backend) in the same run, with N concurrent clients on each side:
 * requests/s and p50/p99 latency, and the ratios micro-VM / native.
 *
 *   deno run -A bench/fn_http_bench.ts [--clients 8] [--requests 2000] [--pool-max N] [--json]
 *
 * Needs `/dev/kvm` for the micro-VM side; on a host without one run it in
 * kvmbox (compare only the ratios there: everything is ~8x slower):
 *   ../shared/kvmbox/kvmbox --timeout 1800 -- /usr/bin/deno run -A bench/fn_http_bench.ts
 *
 * @module
 */

import { parseArgs } from "node:util";
import { Service } from "../mod.ts";
import { fetchBusybox } from "../src/linux/debian_kernel.ts";
import type { FunctionBackend } from "../src/serverless/backend.ts";
import { NATIVE_BACKEND } from "../src/serverless/native.ts";

/** One side's figures. */
interface SideResult {
  side: string;
  requests: number;
  failures: number;
  seconds: number;
  requestsPerSecond: number;
  p50Ms: number;
  p99Ms: number;
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
}

/** Sends `total` requests from `clients` concurrent loops; returns each latency in ms. */
async function load(url: string, clients: number, total: number) {
  const latencies: number[] = [];
  let next = 0;
  let failures = 0;
  const started = performance.now();
  await Promise.all(Array.from({ length: clients }, async () => {
    while (next < total) {
      next++;
      const t0 = performance.now();
      const answer = await fetch(url, { method: "POST", body: "" });
      const text = await answer.text();
      latencies.push(performance.now() - t0);
      if (answer.status !== 200 || text !== "ok\n") failures++;
    }
  }));
  return { latencies, failures, seconds: (performance.now() - started) / 1000 };
}

async function side(
  name: string,
  backend: FunctionBackend | undefined,
  program: string,
  args: { clients: number; requests: number; poolMax: number },
): Promise<SideResult> {
  await using service = await Service.start({
    port: 0,
    pool: { min: Math.min(args.clients, args.poolMax), max: args.poolMax },
    functions: [{ name: "ok", program, argv: ["busybox", "echo", "ok"] }],
    ...(backend ? { backend } : {}),
  });
  const url = `${service.url}fn/ok`;
  await load(url, args.clients, Math.min(100, args.requests)); // warm-up
  const run = await load(url, args.clients, args.requests);
  const sorted = run.latencies.sort((a, b) => a - b);
  return {
    side: name,
    requests: sorted.length,
    failures: run.failures,
    seconds: run.seconds,
    requestsPerSecond: sorted.length / run.seconds,
    p50Ms: percentile(sorted, 0.5),
    p99Ms: percentile(sorted, 0.99),
  };
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      clients: { type: "string", default: "8" },
      requests: { type: "string", default: "2000" },
      "pool-max": { type: "string" },
      json: { type: "boolean", default: false },
    },
    strict: true,
  });
  const clients = Number(values.clients);
  const requests = Number(values.requests);
  const poolMax = Number(values["pool-max"] ?? clients);
  for (
    const [what, n] of [["--clients", clients], ["--requests", requests], [
      "--pool-max",
      poolMax,
    ]] as const
  ) {
    if (!Number.isSafeInteger(n) || n < 1) {
      console.error(`fn_http_bench: ${what} must be a positive integer`);
      return 2;
    }
  }
  const busybox = await fetchBusybox();
  if (!busybox.ok) {
    console.error(`fn_http_bench: busybox-static cannot be had: ${busybox.reason}`);
    return 70;
  }
  const args = { clients, requests, poolMax };
  const native = await side("native (subprocess)", NATIVE_BACKEND, busybox.file.path, args);
  let vm: SideResult | undefined;
  let vmProblem: string | undefined;
  try {
    vm = await side("micro-VM", undefined, busybox.file.path, args);
  } catch (e) {
    vmProblem = e instanceof Error ? e.message : String(e);
  }
  const ratios = vm
    ? {
      requestsPerSecond: vm.requestsPerSecond / native.requestsPerSecond,
      p50: vm.p50Ms / native.p50Ms,
      p99: vm.p99Ms / native.p99Ms,
    }
    : undefined;
  if (values.json) {
    console.log(JSON.stringify({ clients, requests, native, vm, vmProblem, ratios }, null, 2));
  } else {
    const rows = [native, ...(vm ? [vm] : [])].map((r) =>
      `${r.side.padEnd(20)} ${r.requestsPerSecond.toFixed(0).padStart(8)} ${
        r.p50Ms.toFixed(2).padStart(9)
      } ${r.p99Ms.toFixed(2).padStart(9)} ${String(r.failures).padStart(8)}`
    );
    console.log(`HTTP end to end, busybox echo, ${clients} clients, ${requests} requests per side`);
    console.log(
      `${"side".padEnd(20)} ${"req/s".padStart(8)} ${"p50 ms".padStart(9)} ${
        "p99 ms".padStart(9)
      } failures`,
    );
    for (const row of rows) console.log(row);
    if (ratios) {
      console.log(
        `micro-VM / native: req/s x${ratios.requestsPerSecond.toFixed(2)}, p50 x${
          ratios.p50.toFixed(2)
        }, p99 x${ratios.p99.toFixed(2)}`,
      );
    }
  }
  if (vmProblem) {
    console.error(`fn_http_bench: the micro-VM side could not run: ${vmProblem}`);
    return 70;
  }
  return 0;
}

if (import.meta.main) Deno.exit(await main());
