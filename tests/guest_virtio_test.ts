/**
 * Fast device tests without Linux: runtime guests with the guest runtime's
 * PCI and virtio driver (`guest/runtime/pci.c`, `virtio.c`) scan the PCI bus,
 * size BARs, walk capabilities and drive virtio devices' split queues by
 * polling, and REPORT what they saw as JSON, which these tests hold against
 * `vm.devices()`. A VM boots and finishes in well under a second of vCPU time.
 */

import assert from "node:assert/strict";

import { type PciFunction, Vm } from "../mod.ts";
import { kvmTest } from "./_helpers.ts";
import { RAM_MIB, runGuest } from "./_runtime_guest.ts";

const HOSTILE = 1n << 32n;
const MSIX = 1n << 33n;

/** What pci_scan.c reports for a function. */
interface ScannedFunction {
  address: string;
  vendor: number;
  device: number;
  class: number;
  revision: number;
  headerType: number;
  command: number;
  bars: { index: number; type: string; size: number; address: number; raw: number }[];
  caps: {
    at: number;
    id: number;
    tableSize?: number;
    tableBar?: number;
    tableOffset?: number;
    pbaBar?: number;
    pbaOffset?: number;
    cfgType?: number;
    bar?: number;
    offset?: number;
    size?: number;
    multiplier?: number;
  }[];
}

interface ScanReport {
  functions: ScannedFunction[];
  absent: Record<"slot31" | "function1" | "bus1" | "disabled", number>;
  readOnly: Record<string, [number, number]>;
}

kvmTest(
  "a guest's PCI scan matches vm.devices(): IDs, class, BARs, capabilities, MSI-X",
  async () => {
    using vm = await Vm.create({
      memoryMiB: RAM_MIB,
      interrupts: true,
      devices: [{ kind: "rng" }, { kind: "rng", name: "entropy" }],
    });
    const before = vm.devices().pci;
    const report = await runGuest(vm, "pci_scan.c", 0) as ScanReport;
    const listing = vm.devices().pci;

    // The same functions, in slot order, with the same identity.
    assert.deepEqual(
      report.functions.map((f) => [f.address, f.vendor, f.device, f.class]),
      listing.map((f: PciFunction) => [f.address, f.vendor, f.device, f.class]),
    );
    assert.deepEqual(listing.map((f) => f.name), ["host-bridge", "rng0", "entropy"]);
    for (const [i, scanned] of report.functions.entries()) {
      const listed = listing[i];
      // BAR sizing: the all-ones protocol gives the size; the address is restored
      // and still decoded where it was before the scan.
      assert.deepEqual(
        scanned.bars.map((b) => ({ index: b.index, size: b.size, address: b.address })),
        listed.bars.map((b) => ({ index: b.index, size: b.size, address: b.address })),
        scanned.address,
      );
      assert.deepEqual(listed.bars, before[i].bars, "the scan left the BARs where they were");
      if (i === 0) {
        assert.equal(scanned.class, 0x060000, "a host bridge");
        assert.deepEqual(scanned.caps, []);
        continue;
      }
      assert.equal(scanned.vendor, 0x1af4);
      assert.equal(scanned.device, 0x1044, "modern virtio-rng: 0x1040 + type 4");
      assert.equal(scanned.revision, 1, "a modern-only device has revision 1");
      assert.equal(scanned.headerType, 0);
      const [bar] = scanned.bars;
      assert.equal(bar.type, "mem64");
      assert.equal(bar.raw & 0xf, 0x4, "64-bit, non-prefetchable memory BAR");
      assert.ok(bar.address >= 0xd000_0000 && bar.address + bar.size <= 0xfec0_0000);
      // MSI-X: one vector per queue plus config, table and PBA in BAR 0.
      const msix = scanned.caps.find((c) => c.id === 0x11)!;
      assert.ok(msix, JSON.stringify(scanned.caps));
      const details = listed.details as { queues: unknown[] };
      assert.equal(msix.tableSize, details.queues.length + 1);
      assert.deepEqual(
        [msix.tableBar, msix.tableOffset, msix.pbaBar, msix.pbaOffset],
        [0, 0x4000, 0, 0x6000],
      );
      // The virtio structures: common, ISR, device, notify, all in BAR 0.
      const vendor = scanned.caps.filter((c) => c.id === 0x09);
      assert.deepEqual(
        vendor.map((c) => [c.cfgType, c.bar, c.offset, c.size]),
        [[1, 0, 0, 0x38], [3, 0, 0x1000, 1], [4, 0, 0x2000, 0x1000], [2, 0, 0x3000, 4]],
      );
      assert.equal(vendor.at(-1)!.multiplier, 4);
      for (const c of scanned.caps) assert.ok(c.at >= 0x40 && c.at % 4 === 0, `cap at ${c.at}`);
    }
    // Functions that do not exist, and the enable bit clear, read all-ones.
    assert.deepEqual(report.absent, {
      slot31: 0xffff_ffff,
      function1: 0xffff_ffff,
      bus1: 0xffff_ffff,
      disabled: 0xffff_ffff,
    });
    // Writes to read-only registers change nothing.
    for (const [register, [before, after]] of Object.entries(report.readOnly)) {
      assert.equal(after, before, `${register}: ${before.toString(16)} -> ${after.toString(16)}`);
    }
    // The guest went through mechanism #1 and the BARs' MMIO was never touched.
    const pio = vm.devices().buses.pio.devices.find((d) => d.name === "pci-config");
    assert.ok(pio && pio.reads > 100 && pio.writes > 100, JSON.stringify(pio));
  },
);

kvmTest("the guest's virtio driver reads random bytes from virtio-rng", async () => {
  using vm = await Vm.create({ memoryMiB: RAM_MIB, interrupts: true, devices: [{ kind: "rng" }] });
  const n = 1024;
  const report = await runGuest(vm, "virtio_rng.c", n) as {
    status: number;
    features: number;
    queueSize: number;
    len: number;
    hex: string;
  };
  assert.equal(report.status, 0x0f, "ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK");
  assert.equal(report.features, 2 ** 32, "VERSION_1 only");
  assert.equal(report.len, n);
  const bytes = report.hex.match(/../g)!.map((h) => parseInt(h, 16));
  assert.equal(bytes.length, n);
  assert.ok(new Set(bytes).size > 200, `${new Set(bytes).size} distinct byte values`);
  // The host saw the same: one request of n bytes, the device running.
  const rng = vm.devices().pci.find((f) => f.name === "rng0")!;
  const details = rng.details as {
    status: number;
    active: boolean;
    queues: { size: number; enabled: boolean }[];
    device: { requests: number; bytes: number };
  };
  assert.equal(details.status, 0x0f);
  assert.ok(details.active);
  assert.deepEqual(details.queues[0], { size: report.queueSize, maxSize: 256, enabled: true });
  assert.deepEqual(details.device, { kind: "rng", requests: 1, bytes: n });
});

kvmTest(
  "hostile virtio drivers get NEEDS_RESET, the VMM keeps running, a reset recovers",
  async () => {
    using vm = await Vm.create({
      memoryMiB: RAM_MIB,
      interrupts: true,
      devices: [{ kind: "rng" }],
    });
    const report = await runGuest(vm, "virtio_rng.c", HOSTILE) as {
      cases: {
        name: string;
        status: number;
        used: number;
        recovered: number;
        len: number;
        distinct: number;
      }[];
    };
    assert.deepEqual(report.cases.map((c) => c.name), [
      "loop",
      "outside-ram",
      "straddles-ram",
      "queue-size-3",
      "rewrite-queue",
    ]);
    for (const c of report.cases) {
      const what = JSON.stringify(c);
      assert.ok(c.status >= 0 && (c.status & 0x40) !== 0, `NEEDS_RESET: ${what}`);
      assert.equal(c.used, 0, `no used element for a bad request: ${what}`);
      assert.equal(c.recovered, 0x0f, `running again after the reset: ${what}`);
      assert.equal(c.len, 64, what);
      assert.ok(c.distinct > 16, what);
    }
    // The VM ran to the guest's EXIT; the device is running and served only the
    // five good reads after the resets.
    const rng = vm.devices().pci.find((f) => f.name === "rng0")!;
    const details = rng.details as { status: number; device: { requests: number; bytes: number } };
    assert.equal(details.status, 0x0f);
    assert.equal(details.device.bytes, 5 * 64);
  },
);

kvmTest("the guest's virtio driver takes an MSI-X interrupt for a used buffer", async () => {
  using vm = await Vm.create({ memoryMiB: RAM_MIB, interrupts: true, devices: [{ kind: "rng" }] });
  const report = await runGuest(vm, "virtio_rng.c", MSIX);
  assert.deepEqual(report, {
    status: 0x0f,
    badEntry: 0xffff, // an entry past the 2-entry table reads back as NO_VECTOR
    entry: 0,
    head: 0,
    used: 0,
    len: 256,
    irqs: 1,
    distinct: (report as { distinct: number }).distinct,
  });
  assert.ok((report as { distinct: number }).distinct > 100, JSON.stringify(report));
  const details = vm.devices().pci.find((f) => f.name === "rng0")!.details as {
    msixEnabled: boolean;
  };
  assert.ok(details.msixEnabled);
});
