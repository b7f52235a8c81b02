/**
 * Soak: many VM lifecycles in one process leave no file descriptors, core
 * threads, live handles or resident memory behind.
 *
 * - 10,000 create/run/close cycles (a 2 MiB real-mode guest that exits at once),
 * - 200 VMs alive at the same time, each with a vCPU that has run, then all closed,
 *
 * and the process's open fds (`/proc/self/fd`), core threads (`/proc/self/task`
 * named `dv-*`), live core handles and RSS are read before and after each phase
 * (after a warm-up: the first cycles load the library and grow V8's heap once).
 * Not part of the default suite (it takes minutes under kvmbox):
 *
 *   deno run -A --v8-flags=--expose-gc bench/soak_bench.ts [--cycles N] [--concurrent N] [--json]
 *   ../shared/kvmbox/kvmbox --timeout 2400 -- /usr/bin/deno run -A --v8-flags=--expose-gc bench/soak_bench.ts
 *
 * It exits 1 if a count grew (fds, threads or handles by any amount; RSS by
 * more than 32 MiB, allocator noise rather than leaked guest RAM: 10,000
 * leaked VMs would be 20 GiB of mappings).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { Kvm } from "../mod.ts";
import { processResources } from "../tests/_process_resources.ts";

/** What the process holds at one moment. */
interface Resources {
  fds: number;
  threads: number;
  handles: number;
  rssKiB: number;
}

function resources(kvm: Kvm): Resources {
  const { fds, threads, rssKiB } = processResources();
  return { fds, threads, handles: kvm.liveHandles, rssKiB };
}

const gc = (globalThis as { gc?: () => void }).gc ?? (() => {});

/** A real-mode guest that writes 0 to the debug-exit port at once. */
const GUEST = new Uint8Array([0xb0, 0x00, 0xe6, 0xf4]);

async function cycle(kvm: Kvm): Promise<void> {
  using vm = kvm.createVm({ memoryBytes: 2 << 20 });
  const vcpu = vm.createVcpu();
  vm.writeMemory(0x7c00, GUEST);
  vcpu.setupEntry("real", 0x7c00);
  const { exit } = await vcpu.run({ timeoutMs: 30_000 });
  if (exit.reason !== "debug_exit") throw new Error(`unexpected exit ${exit.reason}`);
}

async function concurrent(kvm: Kvm, count: number): Promise<void> {
  const vms = [];
  try {
    for (let i = 0; i < count; i++) {
      const vm = kvm.createVm({ memoryBytes: 2 << 20 });
      vms.push(vm);
      const vcpu = vm.createVcpu();
      vm.writeMemory(0x7c00, GUEST);
      vcpu.setupEntry("real", 0x7c00);
    }
    // Every VM's vCPU runs at the same time (each has its own thread).
    const runs = await Promise.all(vms.map((vm) => vm.vcpus[0].run({ timeoutMs: 120_000 })));
    for (const { exit } of runs) {
      if (exit.reason !== "debug_exit") throw new Error(`unexpected exit ${exit.reason}`);
    }
  } finally {
    for (const vm of vms) vm.close();
  }
}

interface Phase {
  name: string;
  seconds: number;
  before: Resources;
  after: Resources;
}

function grew(p: Phase): string[] {
  const out = [];
  for (const key of ["fds", "threads", "handles"] as const) {
    if (p.after[key] > p.before[key]) out.push(`${key} ${p.before[key]} -> ${p.after[key]}`);
  }
  if (p.after.rssKiB - p.before.rssKiB > 32 * 1024) {
    out.push(`RSS ${p.before.rssKiB} -> ${p.after.rssKiB} KiB`);
  }
  return out;
}

async function phase(kvm: Kvm, name: string, body: () => Promise<void>): Promise<Phase> {
  gc();
  const before = resources(kvm);
  const t0 = performance.now();
  await body();
  const seconds = (performance.now() - t0) / 1000;
  gc();
  return { name, seconds, before, after: resources(kvm) };
}

if (import.meta.main) {
  const { values } = parseArgs({
    options: {
      cycles: { type: "string", default: "10000" },
      concurrent: { type: "string", default: "200" },
      json: { type: "boolean", default: false },
    },
  });
  const cycles = Number(values.cycles);
  const count = Number(values.concurrent);
  const kvm = await Kvm.open();
  for (let i = 0; i < 300; i++) await cycle(kvm);
  await concurrent(kvm, Math.min(count, 20));
  const phases = [
    await phase(kvm, `${cycles} create/run/close cycles`, async () => {
      for (let i = 0; i < cycles; i++) {
        await cycle(kvm);
        if (i % 1000 === 999) {
          const r = resources(kvm);
          console.error(`note: ${i + 1} cycles: ${JSON.stringify(r)}`);
        }
      }
    }),
    await phase(kvm, `${count} concurrent VMs (run, then closed)`, () => concurrent(kvm, count)),
    await phase(kvm, `${count} concurrent VMs again`, () => concurrent(kvm, count)),
  ];
  if (values.json) {
    console.log(JSON.stringify(phases));
  } else {
    for (const p of phases) {
      console.log(
        `${p.name}: ${p.seconds.toFixed(1)} s; fds ${p.before.fds} -> ${p.after.fds}, ` +
          `dv threads ${p.before.threads} -> ${p.after.threads}, handles ${p.before.handles} -> ` +
          `${p.after.handles}, RSS ${p.before.rssKiB} -> ${p.after.rssKiB} KiB`,
      );
    }
  }
  const problems = phases.flatMap((p) => grew(p).map((g) => `${p.name}: ${g}`));
  for (const p of problems) console.error(`soak: grew: ${p}`);
  Deno.exit(problems.length === 0 ? 0 : 1);
}
