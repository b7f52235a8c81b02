/**
 * Debian's kernel finds denovisor's PCI bus through the ACPI root bridge and
 * configuration mechanism #1, binds `virtio_pci` to a virtio-rng device with
 * MSI-X, and reads entropy from `/dev/hwrng`; the host sees the same device,
 * driven, in `vm.devices()`. Needs guest kernel code at hardware speed
 * (`[linux]`: VT-x/AMD-V, or kvmbox).
 */

import assert from "node:assert/strict";

import { linuxTest } from "./_helpers.ts";
import { bootLinuxShell } from "./_linux_shell.ts";

/** `lspci -n` from sysfs: "slot vendor:device class" per function. */
const LSPCI = "for d in /sys/bus/pci/devices/*; do " +
  'echo "${d##*/} $(cat $d/vendor):$(cat $d/device) $(cat $d/class)"; done';

linuxTest("Linux enumerates the PCI bus and reads entropy from virtio-rng", async () => {
  await using guest = await bootLinuxShell({ devices: [{ kind: "rng" }] });
  const { sh, vm } = guest;
  const lspci = (await sh(LSPCI)).trim().split("\n").map((l) => l.trim());
  assert.deepEqual(lspci, [
    "0000:00:00.0 0x1b36:0x0008 0x060000",
    "0000:00:01.0 0x1af4:0x1044 0xff0000",
  ]);
  // virtio_pci bound the modern device and the rng driver registered it.
  assert.match(await sh("readlink /sys/bus/pci/devices/0000:00:01.0/driver"), /virtio-pci\s*$/);
  assert.match(await sh("cat /sys/class/misc/hw_random/rng_available"), /virtio_rng\.0/);
  // MSI-X, not INTx: the queue's own vector is in /proc/interrupts, and it counts.
  const interrupts = async () => {
    const text = await sh("cat /proc/interrupts");
    const line = text.split("\n").find((l) => /PCI-MSI.*virtio0-input/.test(l));
    assert.ok(line, text);
    return line.trim().split(/\s+/).slice(1, -3).reduce((a, n) => a + Number(n), 0);
  };
  const before = await interrupts();
  // 4 KiB of entropy, not all the same byte.
  const hex = await sh("head -c 4096 /dev/hwrng | od -An -v -tx1 | tr -d ' \\n' | head -c 8192");
  assert.equal(hex.trim().length, 8192);
  assert.ok(new Set(hex.trim().match(/../g)).size > 200, "random bytes vary");
  assert.ok(await interrupts() > before, "each request completes with an MSI-X interrupt");

  const listing = vm.devices();
  const rng = listing.pci.find((f) => f.name === "rng0");
  assert.ok(rng, JSON.stringify(listing.pci));
  assert.equal(rng.address, "00:01.0");
  const details = rng.details as {
    status: number;
    msixEnabled: boolean;
    device: { requests: number; bytes: number };
  };
  assert.equal(details.status & 0x0f, 0x0f, "ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK");
  assert.ok(details.msixEnabled);
  assert.ok(details.device.bytes >= 4096, JSON.stringify(details));
  // The BAR is where the guest put it, and its accesses were counted on the MMIO bus.
  const bar = rng.bars[0];
  assert.equal(bar.size, 0x8000);
  const range = listing.buses.mmio.devices.find((d) => d.name === "rng0-bar0");
  assert.ok(range && range.base === bar.address && range.reads + range.writes > 0);
  const config = listing.buses.pio.devices.find((d) => d.name === "pci-config");
  assert.ok(config && config.reads > 0, "the guest scanned the bus through 0xcf8");
  await guest.powerOff();
});
