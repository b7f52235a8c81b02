/**
 * Every device's state from TypeScript (`vm.deviceState()`): what a guest
 * wrote through its ports is in the document the core returns.
 */

import assert from "node:assert/strict";

import { Kvm } from "../mod.ts";
import { kvmTest } from "./_helpers.ts";

kvmTest("device state shows what the guest wrote to COM1, the RTC and the i8042", async () => {
  const kvm = await Kvm.open();
  using vm = kvm.createVm({ memoryBytes: 2 << 20 });
  const vcpu = vm.createVcpu();
  // mov al,0x20; out 0x70,al; mov al,0x5a; out 0x71,al   (CMOS RAM byte 0x20)
  // mov dx,0x3ff; mov al,0x42; out dx,al                  (COM1 scratch)
  // mov al,0xd1; out 0x64,al                              (i8042: output port next)
  // mov al,0; out 0xf4,al                                 (debug exit)
  const code = [
    0xb0,
    0x20,
    0xe6,
    0x70,
    0xb0,
    0x5a,
    0xe6,
    0x71,
    0xba,
    0xff,
    0x03,
    0xb0,
    0x42,
    0xee,
    0xb0,
    0xd1,
    0xe6,
    0x64,
    0xb0,
    0x00,
    0xe6,
    0xf4,
  ];
  vm.writeMemory(0x7c00, new Uint8Array(code));
  vcpu.setupEntry("real", 0x7c00);
  const { exit } = await vcpu.run({ timeoutMs: 10_000 });
  assert.equal(exit.reason, "debug_exit");
  const state = vm.deviceState<{
    com1: { uart: { scratch: number } };
    rtc: { index: number; cmos: number[] };
    i8042: { pending_command: number | null };
    pm1aControl: { value: number };
    pci: { address: number; functions: { slot: number; name: string }[] };
  }>();
  assert.equal(state.com1.uart.scratch, 0x42);
  assert.equal(state.rtc.index, 0x20);
  assert.equal(state.rtc.cmos[0x20], 0x5a);
  assert.equal(state.rtc.cmos.length, 128);
  assert.equal(state.i8042.pending_command, 0xd1);
  assert.equal(state.pm1aControl.value, 0);
  assert.deepEqual(state.pci.functions.map((f) => [f.slot, f.name]), [[0, "host-bridge"]]);
});
