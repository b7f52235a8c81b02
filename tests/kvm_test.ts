/**
 * The low-level KVM API on real /dev/kvm: registers, memory, runs to an exit,
 * and what happens to stale, closed and foreign handles.
 */

import assert from "node:assert/strict";

import { DenovisorError, Kvm } from "../mod.ts";
import { openCore } from "../src/ffi.ts";
import { kvmTest, testGuest } from "./_helpers.ts";

kvmTest("general-purpose, special and FPU registers round-trip", async () => {
  const kvm = await Kvm.open();
  using vm = kvm.createVm({ memoryBytes: 2 << 20 });
  const vcpu = vm.createVcpu();
  const regs = vcpu.getRegisters();
  Object.assign(regs, {
    rax: 0x1122334455667788n,
    r15: 0xffffffffffffffffn,
    rip: 0x7c00n,
    rflags: 0x2n,
  });
  vcpu.setRegisters(regs);
  assert.deepEqual(vcpu.getRegisters(), regs);

  vcpu.setupEntry("long", 0x100000, 0x1ff000);
  const sregs = vcpu.getSpecialRegisters();
  assert.equal(sregs.cs.l, 1, "64-bit code segment");
  assert.equal(sregs.cr3, 0x1000n);
  assert.equal(sregs.efer & 0x500n, 0x500n, "LME and LMA");
  sregs.cr2 = 0xdeadb000n;
  vcpu.setSpecialRegisters(sregs);
  assert.equal(vcpu.getSpecialRegisters().cr2, 0xdeadb000n);

  const fpu = vcpu.getFpuState();
  fpu.xmm[3] = new Uint8Array(16).fill(0xab);
  fpu.fcw = 0x027f;
  // KVM_SET_FPU does not write MXCSR (the kernel copies every field but that one),
  // so it is not part of the round trip.
  vcpu.setFpuState(fpu);
  const back = vcpu.getFpuState();
  assert.deepEqual(back.xmm[3], new Uint8Array(16).fill(0xab));
  assert.equal(back.fcw, 0x027f);
});

kvmTest("the guest computes with registers the host set", async () => {
  const kvm = await Kvm.open();
  using vm = kvm.createVm({ memoryBytes: 4 << 20 });
  const vcpu = vm.createVcpu();
  vm.loadFlat(await testGuest("regs_echo.S", { format: "flat" }), 0x100000, { reserveLow: true });
  vcpu.setupEntry("long", 0x100000, 0x200000);
  const regs = vcpu.getRegisters();
  regs.rax = 40n;
  regs.rbx = 2n;
  vcpu.setRegisters(regs);
  const { exit } = await vcpu.run({ timeoutMs: 10_000 });
  assert.equal(exit.reason, "hlt");
  assert.equal(vcpu.getRegisters().rcx, 42n);
});

kvmTest("guest memory written by the host is seen by the guest and back", async () => {
  const kvm = await Kvm.open();
  using vm = kvm.createVm({ memoryBytes: 4 << 20 });
  const vcpu = vm.createVcpu();
  vm.loadFlat(await testGuest("mem_echo.S", { format: "flat" }), 0x100000, { reserveLow: true });
  vcpu.setupEntry("long", 0x100000, 0x180000);
  const value = new Uint8Array(8);
  new DataView(value.buffer).setBigUint64(0, 0x0102030405060708n, true);
  vm.writeMemory(0x200000, value);
  assert.equal((await vcpu.run({ timeoutMs: 10_000 })).exit.reason, "hlt");
  const out = vm.readMemory(0x200008, 8);
  assert.equal(new DataView(out.buffer).getBigUint64(0, true), 0x0102030405060709n);
});

kvmTest("memory access outside guest RAM is an error, never a crash", async () => {
  const kvm = await Kvm.open();
  using vm = kvm.createVm({ memoryBytes: 1 << 20 });
  for (
    const [gpa, len] of [[1 << 20, 1], [(1 << 20) - 4, 8], [0xffff_ffff_ffff_fff0n, 32]] as const
  ) {
    assert.throws(() => vm.readMemory(gpa, len), (e: unknown) => {
      assert.ok(e instanceof DenovisorError);
      assert.equal(e.code, "MEMORY");
      assert.match(e.message, /outside guest RAM/);
      return true;
    });
    assert.throws(() => vm.writeMemory(gpa, new Uint8Array(len)), /outside guest RAM/);
  }
  assert.throws(() => vm.readMemory(-1, 1), /non-negative/);
});

kvmTest("registers cannot be touched while the vCPU runs", async () => {
  const kvm = await Kvm.open();
  using vm = kvm.createVm({ memoryBytes: 4 << 20 });
  const vcpu = vm.createVcpu();
  vm.loadFlat(await testGuest("spin.S", { format: "flat" }), 0x100000, { reserveLow: true });
  vcpu.setupEntry("user", 0x100000, 0x200000);
  const run = vcpu.run({ timeoutMs: 5_000 });
  await new Promise((r) => setTimeout(r, 50));
  assert.throws(() => vcpu.getRegisters(), (e: unknown) => {
    assert.ok(e instanceof DenovisorError);
    assert.equal(e.code, "BUSY");
    return true;
  });
  await assert.rejects(vcpu.run(), /already running/);
  vm.stop();
  assert.equal((await run).exit.reason, "stopped");
  assert.ok(vcpu.getRegisters().rip >= 0x100000n, "readable again once stopped");
});

kvmTest("the core rejects stale, closed and foreign handles", async () => {
  const core = await openCore();
  const vm = core.vmCreate(1 << 20, 0);
  const vcpu = core.vmCreateVcpu(vm);
  const expectInvalid = (f: () => unknown) =>
    assert.throws(f, (e: unknown) => {
      assert.ok(e instanceof DenovisorError);
      assert.equal(e.code, "INVALID_HANDLE");
      assert.match(e.message, /not a live/);
      return true;
    });
  expectInvalid(() => core.vmCreateVcpu(vcpu)); // a vCPU handle where a VM is expected
  expectInvalid(() => core.vcpuGetState(vm, 0)); // a VM handle where a vCPU is expected
  expectInvalid(() => core.vmStop(0x7fff_ffff));
  core.vmClose(vm);
  expectInvalid(() => core.vmClose(vm)); // double close
  expectInvalid(() => core.vmReadMemory(vm, 0n, 1)); // use after close
  expectInvalid(() => core.vcpuGetState(vcpu, 0)); // a vCPU of a closed VM
  await assert.rejects(core.vcpuRun(vcpu, 10), /not a live vCPU/);
  assert.throws(
    () => core.vcpuGetState(core.vmCreateVcpu(core.vmCreate(1 << 20, 0)), 7),
    /unknown register set 7/,
  );
});

kvmTest("the TypeScript objects refuse use after close", async () => {
  const kvm = await Kvm.open();
  const vm = kvm.createVm({ memoryBytes: 1 << 20 });
  const vcpu = vm.createVcpu();
  vm.close();
  vm.close(); // idempotent
  assert.throws(
    () => vm.readMemory(0, 1),
    (e: unknown) => e instanceof DenovisorError && e.code === "CLOSED",
  );
  assert.throws(() => vcpu.getRegisters(), /closed/);
  await assert.rejects(vcpu.run(), /closed/);
});

kvmTest("bad arguments to the low-level API are refused", async () => {
  const kvm = await Kvm.open();
  assert.throws(() => kvm.createVm({ memoryBytes: 0 }), /memoryBytes/);
  assert.throws(() => kvm.createVm({ memoryBytes: 4097 }), /multiple of the 4 KiB page size/);
  using vm = kvm.createVm({ memoryBytes: 1 << 20 });
  const vcpu = vm.createVcpu();
  // deno-lint-ignore no-explicit-any
  assert.throws(() => vcpu.setupEntry("protected" as any, 0), /entry mode must be one of/);
  assert.throws(() => vcpu.setupEntry("real", 0x100000), /above the 1 MiB real-mode address space/);
  assert.throws(
    () => vcpu.setupEntry("long", 0x800000),
    /entry point 0x800000 is outside guest RAM/,
  );
  using tiny = kvm.createVm({ memoryBytes: 0x8000 });
  assert.throws(() => tiny.createVcpu().setupEntry("long", 0x1000), /need at least 0x10000 bytes/);
  assert.throws(
    () => tiny.vcpus[0].setupEntry("real", 0x9000),
    /entry point 0x9000 is outside guest RAM \(32768 bytes\)/,
  );
  await assert.rejects(vcpu.run({ timeoutMs: -5 }), /timeoutMs/);
});
