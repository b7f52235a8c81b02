/**
 * Creating, running and closing many VMs leaks no file descriptors, threads,
 * handles or memory.
 */

import assert from "node:assert/strict";

import { Kvm } from "../mod.ts";
import { kvmTest } from "./_helpers.ts";
import { processResources } from "./_process_resources.ts";

const CYCLES = 1000;

kvmTest(`${CYCLES} create/run/close cycles leak no fds, threads, handles or memory`, async () => {
  const kvm = await Kvm.open();
  // mov al,'.'; out 0x3f8... is not needed: the guest exits at once (out 0xf4).
  const guest = new Uint8Array([0xb0, 0x00, 0xe6, 0xf4]);
  const cycle = async () => {
    using vm = kvm.createVm({ memoryBytes: 2 << 20 });
    const vcpu = vm.createVcpu();
    vm.writeMemory(0x7c00, guest);
    vcpu.setupEntry("real", 0x7c00);
    const { exit } = await vcpu.run({ timeoutMs: 10_000 });
    assert.equal(exit.reason, "debug_exit");
  };
  // Warm up: the first cycles load the library, the signal handler, allocator
  // arenas and V8's heap, which are one-time costs, not leaks.
  for (let i = 0; i < 300; i++) await cycle();
  const gc = (globalThis as { gc?: () => void }).gc;
  gc?.();
  const before = processResources("dv-vcpu");
  const handlesBefore = kvm.liveHandles;
  for (let i = 0; i < CYCLES; i++) await cycle();
  gc?.();
  const after = processResources("dv-vcpu");
  assert.equal(after.fds, before.fds, "open file descriptors");
  assert.equal(after.threads, before.threads, "vCPU threads");
  assert.equal(after.threads, 0, "no vCPU thread outlives its VM");
  assert.equal(kvm.liveHandles, handlesBefore, "live core handles");
  // Every VM maps 2 MiB; 1000 leaked VMs would be ~2 GiB of address space and
  // at least 4 MiB of touched RSS. Allow allocator noise, not that.
  assert.ok(
    after.rssKiB - before.rssKiB < 16 * 1024,
    `RSS grew by ${after.rssKiB - before.rssKiB} KiB over ${CYCLES} cycles`,
  );
});
