/**
 * Device configuration from TypeScript and the CLI: bad configurations are
 * refused before /dev/kvm is opened (host tests), and a VM with devices lists
 * them on its PCI bus (KVM tests; no guest runs).
 */

import assert from "node:assert/strict";

import { DenovisorError, deviceConfigJson, metricsReport, toPrometheus, Vm } from "../mod.ts";
import { deviceFlags } from "../src/cli/device_flags.ts";
import { openCore } from "../src/ffi.ts";
import { cli, kvmTest } from "./_helpers.ts";

await openCore();

Deno.test("device configurations are checked before /dev/kvm is opened", async () => {
  assert.equal(deviceConfigJson({ kind: "rng" }), '{"kind":"rng"}');
  for (const bad of [null, {}, { kind: "floppy" }, { kind: "rng", name: "" }]) {
    assert.throws(
      () => deviceConfigJson(bad as never),
      (e) => e instanceof DenovisorError && e.code === "INVALID_ARGUMENT",
      JSON.stringify(bad),
    );
  }
  await assert.rejects(
    Vm.create({ devices: [{ kind: "rng" }] }),
    (e) => e instanceof DenovisorError && /interrupts: true/.test(e.message),
  );
});

Deno.test("the CLI's device flags: rng by default for Linux, JSON devices, contradictions", () => {
  assert.deepEqual(deviceFlags({}, { linux: true }), [{ kind: "rng" }]);
  assert.deepEqual(deviceFlags({ "no-rng": true }, { linux: true }), []);
  assert.deepEqual(deviceFlags({}, { linux: false }), []);
  assert.deepEqual(
    deviceFlags({ device: ['{"kind":"rng","name":"e"}'] }, { linux: false }),
    [{ kind: "rng", name: "e" }],
  );
  assert.throws(() => deviceFlags({ rng: true, "no-rng": true }, { linux: true }), /contradict/);
  assert.throws(() => deviceFlags({ device: ["{"] }, { linux: false }), /not JSON/);
});

Deno.test("bad device flags are status 2 with one line", async () => {
  for (
    const args of [
      ["devices", "--device", '{"kind":"floppy"}'],
      ["run", "--rng", "/etc/passwd"],
      ["devices", "--rng", "--no-rng"],
    ]
  ) {
    const r = await cli(...args);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
  }
});

kvmTest("a VM lists its devices on PCI bus 0 with their BARs", async () => {
  using vm = await Vm.create({ interrupts: true, devices: [{ kind: "rng" }] });
  assert.equal(vm.addDevice({ kind: "rng", name: "second" }), "second");
  assert.throws(() => vm.addDevice({ kind: "rng", name: "second" }), /already taken/);
  const listing = vm.devices();
  assert.deepEqual(
    listing.pci.map((f) => [f.address, f.name, f.vendor, f.device]),
    [
      ["00:00.0", "host-bridge", 0x1b36, 0x0008],
      ["00:01.0", "rng0", 0x1af4, 0x1044],
      ["00:02.0", "second", 0x1af4, 0x1044],
    ],
  );
  const [a, b] = [listing.pci[1].bars[0], listing.pci[2].bars[0]];
  assert.equal(a.size, 0x8000);
  assert.ok(a.address !== null && b.address !== null && b.address >= a.address + a.size);
  assert.ok(listing.buses.pio.devices.some((d) => d.name === "pci-config" && d.base === 0xcf8));
  assert.ok(listing.buses.mmio.devices.some((d) => d.name === "rng0-bar0"));
  assert.throws(
    () => vm.deviceControl("rng0", { op: "stats" }),
    (e) => e instanceof DenovisorError && e.code === "DEVICE",
  );
  assert.throws(() => vm.deviceControl("nothing", {}), /no device named/);
  // The metrics attribute exits to devices (none ran yet: all zero, all listed).
  const report = metricsReport(vm);
  assert.ok(report.devices.ranges.some((r) => r.name === "com1" && r.space === "pio"));
  const text = toPrometheus(report);
  assert.match(
    text,
    /^denovisor_device_exits_total\{device="rng0-bar0",space="mmio",op="read"\} 0$/m,
  );
  assert.match(
    text,
    /^denovisor_device_exits_total\{device="\(none\)",space="pio",op="write"\} 0$/m,
  );
  // Without the irqchip there is no MSI-X: refused with the reason.
  using bare = await Vm.create({});
  assert.throws(() => bare.addDevice({ kind: "rng" }), /irqchip/);
});

kvmTest("main.ts devices lists the bus", async () => {
  const r = await cli("devices", "--rng");
  assert.equal(r.code, 0, r.stderr);
  const lines = r.stdout.trim().split("\n");
  assert.match(lines[0], /^00:00\.0 1b36:0008 060000 host-bridge/);
  assert.match(lines[1], /^00:01\.0 1af4:1044 ff0000 rng0\s+BAR0 32 KiB @ 0xd0000000$/);
  const json = JSON.parse((await cli("devices", "--rng", "--json")).stdout);
  assert.equal(json.pci.length, 2);
});
