/**
 * Interrupt latency and timer accuracy on this host.
 *
 * Latency is injection to handler: the host raises an edge (`vm.injectIrq`) or
 * sends an MSI, then watches the guest's counter in guest RAM until the guest's
 * handler has counted it (tests/guests/irq_count.c: a 3-instruction handler that
 * counts and signals EOI). One interrupt at a time, so each sample is one
 * delivery; the host's watching adds about a microsecond. The guest either
 * spins at CPL3 (the interrupt preempts running guest code) or sleeps in `hlt`
 * (KVM must wake the vCPU first).
 *
 *   deno run -A bench/irq_bench.ts [samples]   the latency distribution and timer rates
 *   deno bench -A bench/irq_bench.ts           the same round trips as benchmarks
 *
 * @module
 */

import { GuestVectors, msiAddress, Vm } from "../mod.ts";
import { buildRuntimeGuest } from "../src/build/workload_build.ts";

const GUESTS = new URL("../tests/guests/", import.meta.url);
const RAM_MIB = 16;
const LINE = 5;
const LINE_VECTOR = GuestVectors.IRQ_VECTOR_BASE + LINE;
const MSI_VECTOR = 0x41;

/** How an interrupt is raised and how the guest waits for it. */
export interface LatencyCase {
  /** A name for the table. */
  name: string;
  /** `line`: `injectIrq(5)` through the IOAPIC; `msi`: `sendMsi` to APIC 0. */
  via: "line" | "msi";
  /** Whether the guest sleeps in hlt (else it spins at CPL3). */
  halt: boolean;
}

/** The cases measured. */
export const LATENCY_CASES: readonly LatencyCase[] = [
  { name: "line, guest spinning at CPL3", via: "line", halt: false },
  { name: "line, guest halted", via: "line", halt: true },
  { name: "MSI, guest spinning at CPL3", via: "msi", halt: false },
  { name: "MSI, guest halted", via: "msi", halt: true },
];

const countImage = await buildRuntimeGuest(new URL("irq_count.c", GUESTS));
const timerImage = await buildRuntimeGuest(new URL("irq_timer.c", GUESTS));

/**
 * Runs irq_count.c for `samples` interrupts of one case and returns each
 * injection-to-handler latency in microseconds.
 *
 * @param c The case.
 * @param samples How many interrupts.
 * @returns The latencies, in injection order.
 */
export async function measureLatency(c: LatencyCase, samples: number): Promise<number[]> {
  const vector = c.via === "line" ? LINE_VECTOR : MSI_VECTOR;
  using vm = await Vm.create({ memoryMiB: RAM_MIB, interrupts: true });
  const arg = BigInt(samples) | (c.halt ? 1n << 32n : 0n) | (BigInt(vector) << 40n);
  vm.load(countImage, { mode: "long", arguments: [arg, RAM_MIB << 20] });
  const run = vm.run({ timeoutMs: 120_000 });
  while (vm.guestIrqCounters().length === 0) await new Promise((r) => setTimeout(r, 1));
  // Let the guest reach its wait loop (and, halted, go to sleep).
  await new Promise((r) => setTimeout(r, 5));
  const latencies: number[] = [];
  for (let i = 1; i <= samples; i++) {
    const started = performance.now();
    if (c.via === "line") vm.injectIrq(LINE);
    else vm.sendMsi(msiAddress(0), vector);
    while (vm.guestIrqCounters()[vector] < BigInt(i)) {
      if (performance.now() - started > 5000) throw new Error(`interrupt ${i} was not handled`);
    }
    latencies.push((performance.now() - started) * 1000);
    if (c.halt) {
      // Give the guest time to go back to sleep, so every sample is a wake-up.
      const until = performance.now() + 0.5;
      while (performance.now() < until) { /* spin */ }
    }
  }
  const result = await run;
  if (result.reason !== "guest_exit") throw new Error(`the guest ended: ${result.summary}`);
  return latencies;
}

/** The rate the local APIC timer fired at, measured by the guest with the host clock. */
export interface TimerRate {
  /** The rate programmed. */
  hz: number;
  /** Whether the guest slept in hlt between ticks. */
  halt: boolean;
  /** The rate measured. */
  measuredHz: number;
}

/**
 * Runs irq_timer.c at `hz` for `ms` milliseconds.
 *
 * @param hz The timer rate.
 * @param ms How long to measure.
 * @param halt Whether the guest sleeps between ticks.
 * @returns The measured rate.
 */
export async function measureTimer(hz: number, ms: number, halt: boolean): Promise<TimerRate> {
  using vm = await Vm.create({ memoryMiB: RAM_MIB, interrupts: true });
  vm.load(timerImage, {
    mode: "long",
    arguments: [BigInt(hz) | (BigInt(ms) << 32n) | ((halt ? 1n : 0n) << 48n), RAM_MIB << 20],
  });
  const result = await vm.run({ timeoutMs: 60_000 });
  if (result.reason !== "guest_exit") throw new Error(`the guest ended: ${result.summary}`);
  const report = JSON.parse(result.reportText!);
  return { hz, halt, measuredHz: report.ticks / (report.ns / 1e9) };
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

/**
 * Formats latencies as one table row: min, percentiles, max, in µs.
 *
 * @param name The row's name.
 * @param latencies Microseconds.
 * @returns The row.
 */
export function latencyRow(name: string, latencies: number[]): string {
  const s = [...latencies].sort((a, b) => a - b);
  const cell = (v: number) => v.toFixed(1).padStart(8);
  return `${name.padEnd(30)} ${cell(s[0])} ${cell(percentile(s, 50))} ${cell(percentile(s, 90))} ${
    cell(percentile(s, 99))
  } ${cell(s[s.length - 1])}`;
}

if (import.meta.main) {
  const samples = Number(Deno.args[0] ?? 500);
  console.log(`injection -> handler latency, µs (${samples} interrupts each, one at a time)`);
  console.log(
    `${"".padEnd(30)} ${["min", "p50", "p90", "p99", "max"].map((h) => h.padStart(8)).join(" ")}`,
  );
  for (const c of LATENCY_CASES) {
    console.log(latencyRow(c.name, await measureLatency(c, samples)));
  }
  console.log("\nlocal APIC timer, periodic, measured by the guest over 500 ms");
  for (const hz of [100, 1000, 4000]) {
    for (const halt of [false, true]) {
      const { measuredHz } = await measureTimer(hz, 500, halt);
      const error = ((measuredHz - hz) / hz) * 100;
      console.log(
        `${String(hz).padStart(5)} Hz, guest ${halt ? "halted " : "spinning"}: ${
          measuredHz.toFixed(1).padStart(7)
        } Hz (${error >= 0 ? "+" : ""}${error.toFixed(1)}%)`,
      );
    }
  }
} else {
  for (const c of LATENCY_CASES) {
    Deno.bench({
      name: `${c.name}: 100 interrupts, each injected and handled`,
      group: "interrupt round trip",
      baseline: c.via === "line" && !c.halt,
      n: 5,
      fn: async () => {
        await measureLatency(c, 100);
      },
    });
  }
}
