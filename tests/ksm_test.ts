/**
 * Memory deduplication (KSM): the `dedup` option and `--dedup`, the metrics'
 * `ksm` section, and identical guests whose pages the host's ksmd really merges
 * (run as root: in kvmbox, or on a KVM host where the tests run as root or
 * ksmd already runs).
 */

import assert from "node:assert/strict";

import { DenovisorError, ksmMetrics, metricsReport, toPrometheus, Vm } from "../mod.ts";
import type { KsmCounters } from "../mod.ts";
import { errorCodeOfStatus, statusOf } from "../src/errors.ts";
import { cli, kvmTest, testGuest } from "./_helpers.ts";
import { EXTRA_MIB, FilledGuests, withKsmRunning } from "./_ksm.ts";

const COUNTERS: KsmCounters = {
  dedup: true,
  pageSize: 4096,
  host: {
    run: 1,
    pagesShared: 8192,
    pagesSharing: 16384,
    pagesUnshared: 12,
    pagesVolatile: 3,
    fullScans: 7,
  },
  process: { rmapItems: 24600, mergingPages: 24576, zeroPages: null, profit: null },
};

Deno.test("the ksm section counts bytes saved and keeps unknown counts null", () => {
  const m = ksmMetrics(COUNTERS);
  assert.equal(m.dedup, true);
  assert.equal(m.host.savedBytes, 16384 * 4096);
  assert.equal(m.process.savedBytes, 24576 * 4096);
  assert.equal(m.host.fullScans, 7);
  const old = ksmMetrics({
    ...COUNTERS,
    dedup: false,
    host: { ...COUNTERS.host, pagesSharing: null },
    process: { ...COUNTERS.process, mergingPages: null },
  });
  assert.equal(old.host.savedBytes, null);
  assert.equal(old.process.savedBytes, null);
});

Deno.test("Prometheus text of a report carries the dedup flag and KSM gauges", () => {
  const report = {
    takenAt: new Date(0).toISOString(),
    total: {} as never,
    vcpus: [],
    ksm: ksmMetrics({ ...COUNTERS, host: { ...COUNTERS.host, pagesShared: null } }),
    devices: {
      ranges: [],
      unclaimed: { pio: { reads: 0, writes: 0 }, mmio: { reads: 0, writes: 0 } },
    },
  };
  const text = toPrometheus(report, { vm: "a" });
  assert.match(text, /^denovisor_vm_dedup\{vm="a"\} 1$/m);
  assert.match(text, /^denovisor_ksm_saved_bytes\{vm="a",scope="host"\} 67108864$/m);
  assert.match(text, /^denovisor_ksm_saved_bytes\{vm="a",scope="process"\} 100663296$/m);
  assert.match(text, /^denovisor_ksm_merging_pages\{vm="a",scope="process"\} 24576$/m);
  // A count the kernel does not report is left out, not written as null.
  assert.doesNotMatch(text, /denovisor_ksm_pages_shared/);
  assert.doesNotMatch(text, /null/);
  // Per-vCPU metrics alone have no KSM section.
  assert.doesNotMatch(toPrometheus([]), /ksm|dedup/);
});

Deno.test("dedup must be a boolean, checked before /dev/kvm is opened", async () => {
  // deno-lint-ignore no-explicit-any
  await assert.rejects(Vm.create({ dedup: "yes" as any }), (e: unknown) => {
    assert.ok(e instanceof DenovisorError);
    assert.equal(e.code, "INVALID_ARGUMENT");
    assert.match(e.message, /dedup must be a boolean, got "yes"/);
    return true;
  });
  assert.equal(errorCodeOfStatus(statusOf("KSM_UNAVAILABLE")), "KSM_UNAVAILABLE");
});

Deno.test("run --help documents --dedup", async () => {
  const { code, stdout } = await cli("run", "--help");
  assert.equal(code, 0);
  assert.match(stdout, /--dedup +memory deduplication/);
});

kvmTest("a VM reports whether its RAM is mergeable, in vm.ksm() and the metrics", async () => {
  using plain = await Vm.create({ memoryMiB: 4 });
  using dedup = await Vm.create({ memoryMiB: 4, dedup: true });
  assert.equal(plain.ksm().dedup, false);
  const report = metricsReport(dedup);
  assert.equal(report.ksm.dedup, true);
  assert.equal(report.ksm.pageSize, 4096);
  // The host has KSM (the dedup VM was created): its counters are there.
  assert.equal(typeof report.ksm.host.run, "number");
  assert.equal(typeof report.ksm.process.mergingPages, "number");
  assert.match(toPrometheus(report), /^denovisor_vm_dedup 1$/m);
  assert.match(toPrometheus(metricsReport(plain)), /^denovisor_vm_dedup 0$/m);
});

kvmTest("run --dedup --metrics - reports the VM's ksm section", async () => {
  const image = await Deno.makeTempFile({ suffix: ".bin" });
  try {
    await Deno.writeFile(image, await testGuest("long_hello.S", { format: "flat" }));
    const { code, stdout, stderr } = await cli(
      "run",
      "--dedup",
      "--quiet",
      "--no-stdin",
      "--metrics",
      "-",
      image,
    );
    assert.equal(code, 7, stderr);
    const report = JSON.parse(stdout.slice(stdout.indexOf("{")));
    assert.equal(report.ksm.dedup, true);
    assert.ok("savedBytes" in report.ksm.host, stdout);
  } finally {
    await Deno.remove(image);
  }
});

/** Guests of each kind, the MiB each fills, and the pages that makes. */
const GUESTS = 3;
const FILL_MIB = 32;
const FILL_PAGES = (FILL_MIB << 20) / 4096;
const GUEST_PAGES = ((FILL_MIB + EXTRA_MIB) << 20) / 4096;

kvmTest(
  "identical guests with dedup share their pages while ksmd runs; without dedup they do not",
  async () => {
    await withKsmRunning(async () => {
      // Both kinds at once, with the same contents: ksmd is running and
      // scanning (the dedup guests give it work), so whatever the plain guests
      // did not merge, it was not for lack of a scan.
      const plain = await FilledGuests.start(GUESTS, { dedup: false, fillMiB: FILL_MIB });
      try {
        const shared = await FilledGuests.start(GUESTS, { dedup: true, fillMiB: FILL_MIB });
        try {
          const before = shared.vms[0].ksm();
          assert.equal(before.dedup, true);
          assert.equal(plain.vms[0].ksm().dedup, false);
          assert.equal(before.host.run, 1);
          // Every guest page differs from the guest's other pages, so all the
          // merging there can be is across guests: FILL_PAGES KSM pages, each
          // shared by GUESTS guests.
          const want = Math.floor(0.9 * GUESTS * FILL_PAGES);
          const deadline = performance.now() + 240_000;
          let now = before;
          while ((now.process.mergingPages ?? 0) < want) {
            if (performance.now() > deadline) {
              assert.fail(
                `ksmd merged ${now.process.mergingPages} of this process's pages in 240 s, ` +
                  `wanted ${want}: ${JSON.stringify(now)}`,
              );
            }
            await new Promise((r) => setTimeout(r, 250));
            now = shared.vms[0].ksm();
          }
          // Two more full scans: time for the plain guests' pages to merge
          // too, were they mergeable.
          const scans = now.host.fullScans ?? 0;
          while ((now.host.fullScans ?? 0) < scans + 2) {
            if (performance.now() > deadline) {
              assert.fail(`ksmd stopped scanning: ${JSON.stringify(now)}`);
            }
            await new Promise((r) => setTimeout(r, 250));
            now = shared.vms[0].ksm();
          }
          const merged = now.process.mergingPages ?? 0;
          // Only the dedup guests' pages are merged: their filled pages and
          // some of the rest (boot structures, zeroed pages: the same in every
          // guest), never more than all of their RAM. The plain guests' filled
          // pages would add GUESTS * FILL_PAGES.
          assert.ok(
            merged >= want && merged <= GUESTS * GUEST_PAGES,
            `merged ${merged} pages; the dedup guests have ${GUESTS * FILL_PAGES} filled ` +
              `pages of ${GUESTS * GUEST_PAGES}, the plain ones as many more`,
          );
          const sharing = (now.host.pagesSharing ?? 0) - (before.host.pagesSharing ?? 0);
          assert.ok(
            sharing >= 0.9 * (GUESTS - 1) * FILL_PAGES,
            `pages_sharing grew by ${sharing}, wanted about ${(GUESTS - 1) * FILL_PAGES}`,
          );
          const report = metricsReport(shared.vms[1]).ksm;
          assert.equal(report.dedup, true);
          assert.ok((report.host.savedBytes ?? 0) >= sharing * 4096);
          assert.ok((report.process.savedBytes ?? 0) >= want * 4096);
          // The guests are still what they were: merged pages are copied on write.
          for (const vm of [...shared.vms, ...plain.vms]) {
            const page = vm.readMemory(0x20_0000 + 5 * 4096, 16);
            const word = new DataView(page.buffer, page.byteOffset).getBigUint64(8, true);
            assert.equal(word, BigInt(0x20_0000 + 5 * 4096 + 8) ^ 0x5a5aa5a5c3c33c3cn);
          }
          for (const r of await shared.close()) assert.equal(r.reason, "stopped", r.summary);
        } finally {
          await shared.close();
        }
      } finally {
        await plain.close();
      }
    });
  },
);
