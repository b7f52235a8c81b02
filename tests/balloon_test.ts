// The balloon from TypeScript without a guest: its configuration is checked
// before the core sees it, the CLI flag adds it, and on a real VM
// `vm.balloon` reaches the device through the core (target set and read
// back, bounds refused). The guest's side is in linux_balloon_test.ts.

import assert from "node:assert/strict";

import { DenovisorError, deviceConfigJson, Vm, VmBalloon } from "../mod.ts";
import { deviceFlags } from "../src/cli/device_flags.ts";
import { kvmTest } from "./_helpers.ts";

const invalid = (e: unknown) => e instanceof DenovisorError && e.code === "INVALID_ARGUMENT";

Deno.test("balloon configurations are checked before the core sees them", () => {
  assert.equal(deviceConfigJson({ kind: "balloon" }), '{"kind":"balloon"}');
  assert.equal(
    deviceConfigJson({ kind: "balloon", statsIntervalMs: 0, freePageReporting: false }),
    '{"kind":"balloon","statsIntervalMs":0,"freePageReporting":false}',
  );
  for (
    const bad of [
      { kind: "balloon", statsIntervalMs: -1 },
      { kind: "balloon", statsIntervalMs: 1.5 },
      { kind: "balloon", statsIntervalMs: 2 ** 32 },
      { kind: "balloon", deflateOnOom: "yes" },
      { kind: "balloon", freePageReporting: 1 },
    ]
  ) {
    // deno-lint-ignore no-explicit-any
    assert.throws(() => deviceConfigJson(bad as any), invalid, JSON.stringify(bad));
  }
  assert.deepEqual(deviceFlags({ balloon: true }, { linux: true }), [
    { kind: "rng" },
    { kind: "balloon" },
  ]);
  assert.deepEqual(deviceFlags({}, { linux: false }), []);
});

Deno.test("VmBalloon checks targets and the core's answers", () => {
  const sent: unknown[] = [];
  const answer = {
    targetMib: 8,
    targetPages: 2048,
    actualMib: 0,
    actualPages: 0,
    stats: {},
    statsUpdates: 0,
    inflatedPages: 0,
    deflatedPages: 0,
    reportedBytes: 0,
  };
  const b = new VmBalloon((r) => (sent.push(r), answer), 64);
  assert.equal(b.setTarget(8).targetMib, 8);
  for (const bad of [-1, 65, 1.5, NaN]) assert.throws(() => b.setTarget(bad), invalid);
  assert.deepEqual(sent, [{ op: "setTarget", mib: 8 }]);
  const broken = new VmBalloon(() => ({ ...answer, actualMib: "0" }), 64);
  assert.throws(
    () => broken.stats(),
    (e) => e instanceof DenovisorError && e.code === "ABI_MISMATCH",
  );
});

kvmTest(
  "vm.balloon reaches the device: the target is set and read back, bad requests refused",
  async () => {
    using vm = await Vm.create({ memoryMiB: 64, interrupts: true, devices: [{ kind: "balloon" }] });
    const s = vm.balloon.stats();
    assert.equal(s.targetMib, 0);
    assert.equal(s.actualMib, 0);
    assert.equal(s.statsUpdates, 0);
    assert.deepEqual(s.stats, {});
    const set = vm.balloon.setTarget(48);
    assert.equal(set.targetMib, 48);
    assert.equal(set.targetPages, 48 * 256);
    assert.equal(vm.balloon.stats().targetMib, 48);
    assert.throws(() => vm.balloon.setTarget(65), invalid);
    // The core refuses a malformed request itself.
    assert.throws(() => vm.deviceControl("balloon0", { op: "setTarget", mib: -3 }), DenovisorError);
    assert.throws(() => vm.deviceControl("balloon0", { op: "inflate" }), DenovisorError);
    const listed = vm.devices().pci.find((f) => f.name === "balloon0");
    assert.ok(listed);
    assert.equal(listed.device, 0x1045);
    using plain = await Vm.create({ memoryMiB: 16, interrupts: true });
    assert.throws(() => plain.balloon, /no balloon device/);
  },
);
