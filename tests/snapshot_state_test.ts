/**
 * A paused VM's KVM state from TypeScript (`vm.snapshotState()`): refused while
 * the guest runs, complete once it is paused, and the guest continues after.
 * The restore itself is tested in the core (`core/src/snapshot/vm.rs`).
 */

import assert from "node:assert/strict";

import { DenovisorError, Vm } from "../mod.ts";
import { kvmTest, testGuest } from "./_helpers.ts";

kvmTest(
  "snapshotState is refused while the guest runs and holds every vCPU once it is paused",
  async () => {
    using vm = await Vm.create({ memoryMiB: 4, vcpus: 2 });
    vm.load(await testGuest("pause_probe.S"), { mode: "user" });
    const run = vm.run({ timeoutMs: 60_000 });
    await new Promise((r) => setTimeout(r, 100));
    assert.throws(
      () => vm.snapshotState(),
      (e) => e instanceof DenovisorError && e.code === "BUSY" && /not paused/.test(e.message),
    );
    vm.pause();
    const state = JSON.parse(vm.snapshotState());
    assert.equal(state.memoryBytes, 4 << 20);
    assert.equal(state.vcpus.length, 2);
    for (const [i, vcpu] of state.vcpus.entries()) {
      assert.equal(vcpu.id, i);
      for (const section of ["regs", "sregs", "xsave", "xcrs", "debugRegs", "events"]) {
        assert.ok(Array.isArray(vcpu[section]) && vcpu[section].length > 0, `vcpu ${i} ${section}`);
      }
      assert.ok(vcpu.msrs.some((m: { index: number }) => m.index === 0x10), "the TSC is saved");
      assert.ok(vcpu.cpuid.length > 0);
    }
    // The guest counts in rbx: the state holds the count the registers show.
    const rbx = vm.vcpus[0].getRegisters().rbx;
    const regs = new DataView(new Uint8Array(state.vcpus[0].regs).buffer);
    assert.equal(regs.getBigUint64(8, true), rbx, "rbx in the state");
    const finish = vm.vcpus[0].getRegisters();
    finish.r12 = 1n;
    vm.vcpus[0].setRegisters(finish);
    vm.resume();
    const result = await run;
    assert.equal(result.reason, "guest_exit", result.summary);
  },
);
