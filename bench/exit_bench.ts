/**
 * denovisor's Rust exit loop and cold start, side by side with a minimal C KVM
 * program (`bench/c/kvm_floor.c`, the host's floor) running the same guest.
 * `deno bench` prints each denovisor row as a ratio to its `floor` baseline.
 *
 *   deno bench -A bench/exit_bench.ts
 *
 * The "seccomp" group runs the same exits with the vCPU thread's filter off
 * (baseline) and in kill mode (the default): the filter's cost per KVM_RUN.
 *
 * @module
 */

import { configureSeccomp, Kvm, type SeccompMode } from "../mod.ts";
import { buildGuest } from "../src/build/guest_build.ts";
import { openFloor } from "./_floor.ts";

/** Exits per exit-loop iteration: enough that VM creation is noise. */
const EXITS = 10_000;

const ioLoop = await buildGuest(new URL("../tests/guests/io_loop.S", import.meta.url), {
  format: "flat",
});
const floor = await openFloor();
const kvm = await Kvm.open();

/** Runs io_loop with `iterations` exits in a fresh denovisor VM. */
async function denovisorRun(iterations: number): Promise<void> {
  using vm = kvm.createVm({ memoryBytes: 2 << 20 });
  const vcpu = vm.createVcpu();
  vm.loadFlat(ioLoop, 0x100000, { reserveLow: true });
  vcpu.setupEntry("user", 0x100000, 0x200000);
  if (iterations > 0) {
    const regs = vcpu.getRegisters();
    regs.rdi = BigInt(iterations);
    vcpu.setRegisters(regs);
  }
  const { exit } = await vcpu.run({ timeoutMs: 60_000 });
  if (exit.reason !== "debug_exit") throw new Error(`unexpected exit ${exit.reason}`);
}

Deno.bench({
  name: `floor: ${EXITS} port-I/O exits (C loop)`,
  group: "exit round trip",
  baseline: true,
  fn: () => {
    floor.exitLoop(ioLoop, EXITS);
  },
});

Deno.bench({
  name: `denovisor: ${EXITS} port-I/O exits (Rust loop)`,
  group: "exit round trip",
  fn: async () => {
    await denovisorRun(EXITS);
  },
});

Deno.bench({
  name: "floor: cold start (create VM, run to first exit, destroy)",
  group: "cold start",
  baseline: true,
  fn: () => {
    floor.coldStart(ioLoop);
  },
});

Deno.bench({
  name: "denovisor: cold start from TypeScript (create, load, run to first exit, close)",
  group: "cold start",
  fn: async () => {
    await denovisorRun(0);
  },
});

/** Like {@link denovisorRun}, its vCPU thread started under seccomp `mode`. */
async function seccompRun(mode: SeccompMode): Promise<void> {
  await configureSeccomp(mode);
  try {
    await denovisorRun(EXITS);
  } finally {
    await configureSeccomp("kill");
  }
}

Deno.bench({
  name: `denovisor: ${EXITS} port-I/O exits, seccomp off`,
  group: "seccomp",
  baseline: true,
  fn: async () => {
    await seccompRun("off");
  },
});

Deno.bench({
  name: `denovisor: ${EXITS} port-I/O exits, seccomp kill (default)`,
  group: "seccomp",
  fn: async () => {
    await seccompRun("kill");
  },
});
