/**
 * CPU virtualization policy and SMP on real /dev/kvm: the CPUID a guest reads
 * back, MSR filtering, several vCPUs computing together, and pause/resume with
 * register access while paused.
 */

import assert from "node:assert/strict";

import { DenovisorError, Vm } from "../mod.ts";
import { kvmTest, testGuest } from "./_helpers.ts";

function u32s(bytes: Uint8Array): number[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return Array.from({ length: bytes.length / 4 }, (_, i) => view.getUint32(i * 4, true));
}

/**
 * Runs cpuid_probe at CPL0. CPUID is read in kernel mode because that is what
 * every backend intercepts: PVM runs guest user mode natively without CPUID
 * faulting, so CPL3 code there sees the host's own CPUID, not the policy.
 */
async function readCpuid(config: Parameters<typeof Vm.create>[0]) {
  using vm = await Vm.create({ memoryMiB: 4, unhandledIo: "stop", ...config });
  vm.load(await testGuest("cpuid_probe.S"), { mode: "long" });
  const result = await vm.run({ timeoutMs: 60_000 });
  assert.equal(result.reason, "guest_exit", result.summary);
  const r = u32s(result.report!);
  return {
    hypervisor: {
      eax: r[0],
      signature: new TextDecoder().decode(
        new Uint8Array(result.report!.buffer, result.report!.byteOffset + 4, 12),
      ),
    },
    leaf1: { ebx: r[5], ecx: r[6], edx: r[7] },
    leaf7: { ebx: r[9], ecx: r[10] },
  };
}

kvmTest("the guest reads the CPUID the policy set", async () => {
  const plain = await readCpuid({});
  assert.equal(plain.hypervisor.signature, "denovisor\0\0\0");
  assert.ok(plain.hypervisor.eax >= 0x40000001, "max hypervisor leaf");
  assert.notEqual(plain.leaf1.ecx & (1 << 31), 0, "hypervisor-present bit");
  assert.equal(plain.leaf1.ebx >>> 24, 0, "vCPU 0's APIC id");
  // Hide features that KVM reports as supported (x2APIC is one on every KVM
  // host, emulated by KVM itself; CMPXCHG16B nearly so). Only those are
  // guaranteed to follow the table: PVM passes bits KVM does not know through
  // from the host CPU.
  const X2APIC = 1 << 21;
  const CX16 = 1 << 13;
  assert.notEqual(plain.leaf1.ecx & X2APIC, 0, "x2APIC is offered by default");
  const hidden = await readCpuid({
    cpuid: { hide: ["x2apic"], hideBits: [{ leaf: 1, register: "ecx", bit: 13 }] },
  });
  assert.equal(hidden.leaf1.ecx & X2APIC, 0, "x2APIC is hidden");
  if (plain.leaf1.ecx & CX16) assert.equal(hidden.leaf1.ecx & CX16, 0, "the raw bit is hidden");
  assert.equal(hidden.leaf1.ecx | X2APIC | CX16, plain.leaf1.ecx | X2APIC | CX16, "nothing else");
  assert.equal(hidden.leaf1.edx, plain.leaf1.edx, "EDX untouched");
});

kvmTest("every vCPU sees its own APIC id", async () => {
  using vm = await Vm.create({ memoryMiB: 4, vcpus: 2 });
  vm.load(await testGuest("cpuid_probe.S"), { mode: "long" });
  // Run vCPU 1 alone through the low-level API: its CPUID leaf 1 carries id 1.
  const run = await vm.vcpus[1].run({ timeoutMs: 60_000 });
  assert.equal(run.exit.reason, "guest_exit");
  const r = u32s(vm.kvm.report()!);
  assert.equal(r[5] >>> 24, 1);
});

Deno.test("bad CPU policies are refused", async () => {
  await assert.rejects(
    // deno-lint-ignore no-explicit-any
    Vm.create({ cpuid: { hide: ["warp_drive" as any] } }),
    (e: unknown) =>
      e instanceof DenovisorError && /unknown CPUID feature "warp_drive"/.test(e.message),
  );
  await assert.rejects(
    Vm.create({ cpuid: { hideBits: [{ leaf: 1, register: "ecx", bit: 40 }] } }),
    /bad CPUID bit/,
  );
  await assert.rejects(
    Vm.create({ msrs: { allow: [0x10], deny: [0x10] } }),
    /both allowed and denied/,
  );
  await assert.rejects(Vm.create({ msrs: { deny: [-1] } }), /bad MSR index -1/);
  await assert.rejects(Vm.create({ vcpus: 255 }), /vcpus must be an integer from 1 to 254/);
});

kvmTest("a denied MSR gives the guest #GP and counts; an allowed one reads", async () => {
  const image = await testGuest("msr_probe.S");
  const IA32_TSC = 0x10;
  const IA32_APIC_BASE = 0x1b;
  {
    using vm = await Vm.create({ memoryMiB: 4, msrs: { deny: [IA32_APIC_BASE] } });
    vm.load(image, { mode: "long", arguments: [IA32_APIC_BASE] });
    const result = await vm.run({ timeoutMs: 120_000 });
    assert.equal(result.exit.reason, "guest_fault", result.summary);
    assert.ok(result.exit.reason === "guest_fault" && result.exit.vector === 13);
    assert.equal(vm.metrics()[0].msrReadDenied, 1);
  }
  {
    using vm = await Vm.create({ memoryMiB: 4, msrs: { deny: [IA32_APIC_BASE] } });
    vm.load(image, { mode: "long", arguments: [IA32_TSC] });
    const result = await vm.run({ timeoutMs: 120_000 });
    assert.equal(result.reason, "guest_exit", result.summary);
    assert.equal(vm.metrics()[0].msrReadDenied, 0);
  }
});

kvmTest("N vCPUs each compute a share and combine the result", async () => {
  const n = 1_000_000n;
  for (const vcpus of [1, 2, 4]) {
    using vm = await Vm.create({ memoryMiB: 4, vcpus, unhandledIo: "stop" });
    vm.load(await testGuest("smp_sum.S"), { mode: "user", arguments: (i) => [n, i, vcpus] });
    const result = await vm.run({ timeoutMs: 60_000 });
    assert.equal(result.reason, "guest_exit", `${vcpus} vCPUs: ${result.summary}`);
    const total = new DataView(result.report!.buffer, result.report!.byteOffset, 8).getBigUint64(
      0,
      true,
    );
    assert.equal(total, (n * (n + 1n)) / 2n, `${vcpus} vCPUs`);
    assert.equal(vm.metrics().length, vcpus);
  }
});

kvmTest(
  "pause takes every vCPU out of the guest; registers are then readable and writable",
  async () => {
    using vm = await Vm.create({ memoryMiB: 4, vcpus: 2 });
    vm.load(await testGuest("pause_probe.S"), { mode: "user" });
    const run = vm.run({ timeoutMs: 60_000 });
    await new Promise((r) => setTimeout(r, 100));
    vm.pause();
    const counts = vm.vcpus.map((v) => v.getRegisters().rbx);
    assert.ok(counts.every((c) => c > 0n), `both vCPUs were counting: ${counts}`);
    await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual(vm.vcpus.map((v) => v.getRegisters().rbx), counts, "paused vCPUs do not run");
    // Tell vCPU 0 to finish: only possible because it is out of KVM_RUN.
    const regs = vm.vcpus[0].getRegisters();
    regs.r12 = 1n;
    vm.vcpus[0].setRegisters(regs);
    vm.resume();
    const result = await run;
    assert.equal(result.reason, "guest_exit", result.summary);
    assert.equal(result.exitCode, 0);
  },
);

kvmTest("a Linux load writes an MP table listing every vCPU and the I/O APIC", async () => {
  const { buildConformanceGuest } = await import("../src/linux/conformance_guest.ts");
  using vm = await Vm.create({ memoryMiB: 64, vcpus: 3 });
  vm.loadLinux({ kernel: await buildConformanceGuest() });
  const floating = vm.readMemory(0x9fc00, 16);
  assert.equal(new TextDecoder().decode(floating.subarray(0, 4)), "_MP_");
  const sum = (b: Uint8Array) => b.reduce((a, x) => (a + x) & 0xff, 0);
  assert.equal(sum(floating), 0, "floating pointer checksum");
  const tableAt = new DataView(floating.buffer).getUint32(4, true);
  const header = vm.readMemory(tableAt, 44);
  const length = new DataView(header.buffer).getUint16(4, true);
  const table = vm.readMemory(tableAt, length);
  assert.equal(new TextDecoder().decode(table.subarray(0, 4)), "PCMP");
  assert.equal(sum(table), 0, "table checksum");
  const processors = [0, 1, 2].map((i) => table.subarray(44 + i * 20, 64 + i * 20));
  assert.deepEqual(processors.map((p) => [p[0], p[1]]), [[0, 0], [0, 1], [0, 2]]);
  assert.equal(processors[0][3] & 2, 2, "CPU 0 is the bootstrap processor");
  const ioApic = table.subarray(44 + 3 * 20 + 8, 44 + 3 * 20 + 16);
  assert.equal(ioApic[0], 2, "then the bus, then the I/O APIC entry");
  assert.equal(new DataView(ioApic.buffer, ioApic.byteOffset).getUint32(4, true), 0xfec00000);
});

kvmTest("run --kernel --cpus 2 boots on vCPU 0 while vCPU 1 waits for the kernel", async () => {
  const { buildConformanceGuest, CONFORMANCE_EXIT_CODE } = await import(
    "../src/linux/conformance_guest.ts"
  );
  const kernel = await Deno.makeTempFile({ suffix: ".bzImage" });
  try {
    await Deno.writeFile(kernel, await buildConformanceGuest());
    const main = new URL("../main.ts", import.meta.url).pathname;
    const args = ["run", "-A", main, "run", "--kernel", kernel, "--cpus", "2", "--mem", "64"];
    const output = await new Deno.Command(Deno.execPath(), {
      args: [...args, "--no-stdin", "--quiet", "--metrics", "-"],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stdout = new TextDecoder().decode(output.stdout);
    assert.equal(
      output.code,
      CONFORMANCE_EXIT_CODE & 0xff,
      new TextDecoder().decode(output.stderr),
    );
    const metrics = JSON.parse(stdout.slice(stdout.indexOf("{\n")));
    assert.equal(metrics.vcpus.length, 2);
    assert.ok(metrics.vcpus[0].exits > 0, "vCPU 0 ran the kernel");
  } finally {
    await Deno.remove(kernel);
  }
});

kvmTest(
  "the guest runtime runs one program per vCPU, entered in 64-bit mode on every vCPU",
  async () => {
    const { buildRuntimeGuest } = await import("../src/build/workload_build.ts");
    const image = await buildRuntimeGuest(new URL("./guests/smp_runtime.c", import.meta.url));
    const n = 3_000_000n;
    for (const vcpus of [1, 3]) {
      using vm = await Vm.create({ memoryMiB: 16, vcpus, unhandledIo: "stop" });
      vm.load(image, { mode: "long", arguments: (i) => [n, 16 << 20, 0, 0, i, vcpus] });
      const result = await vm.run({ timeoutMs: 60_000 });
      assert.equal(result.reason, "guest_exit", `${vcpus} vCPUs: ${result.summary}`);
      assert.equal(result.exitCode, 0);
      const total = new DataView(result.report!.buffer, result.report!.byteOffset, 8).getBigUint64(
        0,
        true,
      );
      assert.equal(total, (n * (n + 1n)) / 2n, `${vcpus} vCPUs`);
    }
  },
);
