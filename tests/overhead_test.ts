/**
 * The guest runtime and the overhead model on real /dev/kvm: every workload
 * gives the same checksum natively and in a VM, guest exceptions arrive as
 * typed faults, and `main.ts overhead --json` reports the comparison.
 */

import assert from "node:assert/strict";

import { Vm } from "../mod.ts";
import { buildRuntimeGuest } from "../src/build/workload_build.ts";
import { runNative, runVirtual, type WorkloadName, WORKLOADS } from "../src/overhead.ts";
import { readElf } from "./_elf.ts";
import { kvmTest } from "./_helpers.ts";

/** Small sizes: a few milliseconds natively, well under a second in a VM. */
const SMALL: Record<WorkloadName, number> = { cpu: 1, memory: 4, io: 1, syscall: 1 };

for (const workload of WORKLOADS) {
  kvmTest(`${workload}: native and virtualized runs agree on the checksum`, async () => {
    const native = await runNative(workload, SMALL[workload]);
    const virtual = await runVirtual(workload, SMALL[workload]);
    assert.equal(virtual.checksum, native.checksum);
    assert.match(native.checksum, /^[0-9a-f]{16}$/);
    assert.equal(virtual.ops, native.ops);
    assert.equal(virtual.workload, workload);
    assert.ok(virtual.ns > 0 && native.ns > 0);
    assert.ok(virtual.exits >= 2, "at least the CLOCK and REPORT hypercalls");
  });
}

kvmTest("io makes one exit per console write, and the host counts every one", async () => {
  const run = await runVirtual("io", 1);
  // io does `size` thousand WRITE hypercalls; the runtime adds two CLOCKs, a
  // REPORT and the EXIT.
  assert.equal(run.ops, 1000);
  assert.ok(run.exits >= 1004, `exits ${run.exits}`);
});

const FAULTS: [string, number, (address: bigint) => void][] = [
  ["fault_pf.c", 14, (a) => assert.ok(a >= 1n << 32n, `CR2 0x${a.toString(16)}`)],
  ["fault_gp.c", 13, () => {}],
  ["fault_ud.c", 6, () => {}],
  ["fault_de.c", 0, () => {}],
];

for (const [source, vector, checkAddress] of FAULTS) {
  kvmTest(`${source}: the guest's exception arrives as a typed fault`, async () => {
    const image = await buildRuntimeGuest(new URL(`./guests/${source}`, import.meta.url));
    const faultRip = readElf(image).symbols.get("fault_rip");
    assert.ok(faultRip !== undefined, "the guest marks its faulting instruction");
    using vm = await Vm.create({ memoryMiB: 16, unhandledIo: "stop" });
    vm.load(image, { mode: "long", arguments: [0, 16 << 20] });
    const result = await vm.run({ timeoutMs: 60_000 });
    assert.equal(result.exit.reason, "guest_fault", result.summary);
    if (result.exit.reason !== "guest_fault") return;
    assert.equal(result.exit.vector, vector);
    assert.equal(result.exit.rip, faultRip);
    checkAddress(result.exit.address);
    if (vector === 14) {
      assert.equal(result.exit.errorCode & 4, 4, "the #PF came from user mode");
    }
    assert.equal(result.exitCode, null);
    assert.match(result.summary, /guest fault: #/);
  });
}

kvmTest("overhead --json compares native and virtual runs", async () => {
  const main = new URL("../main.ts", import.meta.url).pathname;
  const output = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      main,
      "overhead",
      "--json",
      "--runs",
      "1",
      "--size",
      "1",
      "--workload",
      "io",
      "--workload",
      "cpu",
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(output.stderr);
  assert.equal(output.code, 0, stderr);
  assert.match(stderr, /io \(size 1\): virtual run 1\/1/, "progress is shown");
  const results = JSON.parse(new TextDecoder().decode(output.stdout));
  assert.deepEqual(results.map((r: { workload: string }) => r.workload), ["io", "cpu"]);
  for (const r of results) {
    assert.equal(r.native[0].checksum, r.virtual[0].checksum);
    assert.equal(r.overheadNs, r.virtualNs - r.nativeNs);
    assert.ok(r.exits > 0 && r.nsPerExit > 0 && r.vmmNsPerExit > 0);
  }
  assert.ok(results[0].exits >= 1000, "io exits once per write");
});
