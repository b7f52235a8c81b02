/**
 * The high-level `Vm` API on real /dev/kvm: guests in every entry mode, crashes,
 * timeouts, stop from JavaScript, and clear errors for bad input.
 */

import assert from "node:assert/strict";

import { DenovisorError, Vm } from "../mod.ts";
import { kvmTest, testGuest } from "./_helpers.ts";
import { EXTRA_MIB, FilledGuests } from "./_ksm.ts";

kvmTest("a real-mode guest prints and exits through the debug-exit port", async () => {
  using vm = await Vm.create({ memoryMiB: 1 });
  vm.load(await testGuest("real_hello.S", { format: "flat", bits: 16 }), { mode: "real" });
  const result = await vm.run({ timeoutMs: 10_000 });
  assert.equal(result.reason, "debug_exit");
  assert.equal(result.console, "real\n");
  assert.equal(result.exitCode, (2 << 1) | 1);
  assert.ok(result.exits >= 6, `exits: ${result.exits}`);
});

kvmTest("a long-mode (CPL0) guest runs from a flat image", async () => {
  using vm = await Vm.create({ memoryMiB: 4 });
  const loaded = vm.load(await testGuest("long_hello.S", { format: "flat" }), { mode: "long" });
  assert.equal(loaded.format, "flat");
  assert.equal(loaded.entry, 0x100000n);
  const result = await vm.run({ timeoutMs: 10_000 });
  assert.deepEqual([result.console, result.exitCode], ["long\n", 7]);
});

kvmTest("a user-mode (CPL3) guest runs from an ELF image", async () => {
  using vm = await Vm.create({ memoryMiB: 4, unhandledIo: "stop" });
  const loaded = vm.load(await testGuest("user_hello.S"), { mode: "user" });
  assert.equal(loaded.format, "elf");
  const result = await vm.run({ timeoutMs: 10_000 });
  assert.deepEqual([result.console, result.exitCode], ["user\n", 9]);
  const sregs = vm.vcpus[0].getSpecialRegisters();
  assert.equal(sregs.cs.dpl, 3, "the guest ran at CPL3");
});

kvmTest("the default guest prints its banner and succeeds", async () => {
  const { defaultGuestImage, DEFAULT_GUEST_LOAD_OPTIONS, DEFAULT_GUEST_SUCCESS_CODE } =
    await import(
      "../mod.ts"
    );
  using vm = await Vm.create({ unhandledIo: "stop" });
  vm.load(await defaultGuestImage(), DEFAULT_GUEST_LOAD_OPTIONS);
  const result = await vm.run({ timeoutMs: 10_000 });
  assert.equal(result.exitCode, DEFAULT_GUEST_SUCCESS_CODE, result.summary);
  assert.match(result.console, /denovisor/i);
  assert.match(result.console, /CPL3/);
  assert.match(result.console, /500500/, "the guest computed 1 + ... + 1000");
});

kvmTest("a triple fault is reported as a crash with the vCPU's registers", async () => {
  using vm = await Vm.create({ memoryMiB: 4 });
  vm.load(await testGuest("triple_fault.S", { format: "flat" }), { mode: "long" });
  const result = await vm.run({ timeoutMs: 10_000 });
  assert.equal(result.reason, "shutdown");
  assert.equal(result.exitCode, null);
  assert.ok(result.exit.reason === "shutdown");
  const { registers } = result.exit;
  if (registers.resetState) {
    // AMD: KVM reset the vCPU on the SHUTDOWN intercept; the report says so.
    assert.equal(registers.rip, 0xfff0n);
    assert.match(result.summary, /reset state/);
  } else {
    // Intel: the faulting state.
    assert.ok(
      registers.rip >= 0x100000n && registers.rip < 0x101000n,
      `rip 0x${registers.rip.toString(16)} points into the guest`,
    );
  }
  assert.match(result.summary, /crashed/);
});

kvmTest("an infinite loop is stopped by a 200 ms timeout", async () => {
  using vm = await Vm.create({ memoryMiB: 4 });
  vm.load(await testGuest("spin.S", { format: "flat" }), { mode: "user" });
  const started = performance.now();
  const result = await vm.run({ timeoutMs: 200 });
  const elapsed = performance.now() - started;
  assert.equal(result.reason, "timed_out");
  assert.ok(elapsed >= 190 && elapsed < 5000, `elapsed ${elapsed} ms`);
  // The VM is reusable after a timeout: run it again and stop it from JS.
  const again = vm.run();
  setTimeout(() => vm.stop(), 50);
  assert.equal((await again).reason, "stopped");
});

kvmTest("the JS event loop keeps running while a guest spins", async () => {
  using vm = await Vm.create({ memoryMiB: 4 });
  vm.load(await testGuest("spin.S", { format: "flat" }), { mode: "user" });
  let ticks = 0;
  const timer = setInterval(() => ticks++, 10);
  await vm.run({ timeoutMs: 300 });
  clearInterval(timer);
  assert.ok(ticks >= 10, `only ${ticks} timer ticks ran during the guest`);
});

kvmTest(
  "unhandled port I/O stops the VM with the stop policy and is ignored otherwise",
  async () => {
    // out %al, $0x80 (no device), then out to 0xf4 with al=0.
    const code = new Uint8Array([0x30, 0xc0, 0xe6, 0x80, 0xe6, 0xf4]);
    {
      using vm = await Vm.create({ memoryMiB: 1, unhandledIo: "stop" });
      vm.load(code, { mode: "real" });
      const result = await vm.run({ timeoutMs: 10_000 });
      assert.equal(result.exit.reason, "unhandled_io");
      assert.ok(result.exit.reason === "unhandled_io" && result.exit.port === 0x80);
      assert.match(result.summary, /port 0x80/);
    }
    {
      using vm = await Vm.create({ memoryMiB: 1 });
      vm.load(code, { mode: "real" });
      assert.equal((await vm.run({ timeoutMs: 10_000 })).exitCode, 1);
    }
  },
);

Deno.test("bad VM configurations are refused with clear errors", async () => {
  const bad: [Parameters<typeof Vm.create>[0], RegExp][] = [
    [{ memoryMiB: 0 }, /memoryMiB must be an integer from 1/],
    [{ memoryMiB: 1.5 }, /memoryMiB/],
    [{ vcpus: 0 }, /vcpus/],
    [{ timeoutMs: -1 }, /timeoutMs/],
    // deno-lint-ignore no-explicit-any
    [{ unhandledIo: "explode" as any }, /unhandledIo/],
  ];
  for (const [config, message] of bad) {
    await assert.rejects(Vm.create(config), (e: unknown) => {
      assert.ok(e instanceof DenovisorError);
      assert.equal(e.code, "INVALID_ARGUMENT");
      assert.match(e.message, message);
      return true;
    });
  }
});

kvmTest("malformed images are refused and name the problem", async () => {
  using vm = await Vm.create({ memoryMiB: 2 });
  const elf = await testGuest("user_hello.S");
  // Cut the file one byte short of the end of its first segment's bytes.
  const header = new DataView(elf.buffer, elf.byteOffset, elf.byteLength);
  const phoff = Number(header.getBigUint64(32, true));
  const segmentEnd = Number(header.getBigUint64(phoff + 8, true)) +
    Number(header.getBigUint64(phoff + 32, true));
  const cases: [Uint8Array, Parameters<Vm["load"]>[1], RegExp][] = [
    [elf.subarray(0, 40), { mode: "user" }, /truncated/],
    [
      elf.subarray(0, segmentEnd - 1),
      { mode: "user", format: "elf" },
      /segment 0 needs file bytes/,
    ],
    [new Uint8Array(0), { mode: "real" }, /empty/],
    [new Uint8Array([0x90]), { mode: "long", loadAddress: 0x1000 }, /reserved boot area/],
    [new Uint8Array([0x90]), { mode: "long", loadAddress: 0x300000 }, /does not fit/],
    [
      new Uint8Array([0x90]),
      { mode: "long", entry: 0x800000 },
      /entry point 0x800000 is outside guest RAM/,
    ],
  ];
  for (const [image, options, message] of cases) {
    assert.throws(() => vm.load(image, options), (e: unknown) => {
      assert.ok(e instanceof DenovisorError, String(e));
      assert.ok(e.code === "IMAGE" || e.code === "MEMORY", e.code);
      assert.match(e.message, message);
      return true;
    }, `expected ${message}`);
  }
  await assert.rejects(vm.run(), /no image is loaded/);
});

/** A small ELF (120 bytes of headers and `code`): one segment at 1 MiB, `code` in the file, `memsz` in memory. */
function bssElf(code: number[], memsz: bigint): Uint8Array {
  const elf = new Uint8Array(64 + 56 + code.length);
  const v = new DataView(elf.buffer);
  elf.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]);
  v.setUint16(16, 2, true); // ET_EXEC
  v.setUint16(18, 62, true); // x86-64
  v.setBigUint64(24, 0x100000n, true); // e_entry
  v.setBigUint64(32, 64n, true); // e_phoff
  v.setUint16(54, 56, true);
  v.setUint16(56, 1, true);
  v.setUint32(64, 1, true); // PT_LOAD
  v.setUint32(68, 7, true); // RWX
  v.setBigUint64(72, 120n, true); // p_offset
  v.setBigUint64(80, 0x100000n, true); // p_vaddr
  v.setBigUint64(88, 0x100000n, true); // p_paddr
  v.setBigUint64(96, BigInt(code.length), true); // p_filesz
  v.setBigUint64(104, memsz, true); // p_memsz
  elf.set(code, 120);
  return elf;
}

kvmTest(
  "an ELF with a huge BSS loads fast without host memory, and its BSS reads zero",
  async () => {
    // mov al, [0x100000 + 1.5 GiB - 1] (the BSS's last byte); out 0xf4, al
    const last = 0x100000 + 3 * 2 ** 29 - 1;
    const code = [0xa0, ...new Uint8Array(new BigUint64Array([BigInt(last)]).buffer), 0xe6, 0xf4];
    const elf = bssElf(code, 3n << 29n);
    assert.equal(elf.length, 131);
    using vm = await Vm.create({ memoryMiB: 2048 });
    const rss = Deno.memoryUsage().rss;
    const started = performance.now();
    vm.load(elf, { mode: "long" });
    const ms = performance.now() - started;
    const grown = Deno.memoryUsage().rss - rss;
    assert.ok(ms < 2000, `load took ${ms.toFixed(0)} ms`);
    assert.ok(grown < 256 * 2 ** 20, `RSS grew by ${grown} bytes`);
    // Written over, then loaded again: the BSS is zero again.
    vm.writeMemory(last - 4095, new Uint8Array(4096).fill(0x41));
    vm.load(elf, { mode: "long" });
    assert.deepEqual(vm.readMemory(last - 4095, 4096), new Uint8Array(4096));
    const result = await vm.run({ timeoutMs: 60_000 });
    assert.equal(result.exitCode, 1, result.summary); // (0 << 1) | 1
  },
);

kvmTest("vm.memory() counts the guest RAM pages a guest touched, and nothing before", async () => {
  const MIB = 1 << 20;
  using fresh = await Vm.create({ memoryMiB: 32 });
  assert.deepEqual(fresh.memory(), { sizeBytes: 32 * MIB, residentBytes: 0 });
  // A guest that writes 24 MiB of its RAM (tests/guests/ksm_fill.S), then halts.
  const guests = await FilledGuests.start(1, { dedup: false, fillMiB: 24 });
  try {
    const { sizeBytes, residentBytes } = guests.vms[0].memory();
    assert.equal(sizeBytes, (24 + EXTRA_MIB) * MIB);
    // The fill, plus the image, page tables and stack below it; never more than RAM.
    assert.ok(residentBytes >= 24 * MIB && residentBytes <= sizeBytes, `${residentBytes}`);
  } finally {
    await guests.close();
  }
  assert.throws(() => guests.vms[0].memory(), DenovisorError);
});
