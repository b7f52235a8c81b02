/**
 * The VM lifecycle's limits: a second concurrent run of one VM is refused
 * without touching the first one's stop reason, and a VM the program drops
 * without closing is reclaimed with a warning.
 */

import assert from "node:assert/strict";

import { DenovisorError, Kvm, Vm } from "../mod.ts";
import { kvmTest, testGuest } from "./_helpers.ts";
import { buildRuntimeGuest } from "../src/build/workload_build.ts";
import { RAM_MIB } from "./_runtime_guest.ts";

const UNCLOSED_CHILD = new URL("./_unclosed_vm_child.ts", import.meta.url).pathname;

/**
 * A real-mode guest that counts ECX down from `count`, then writes 7 to the
 * debug-exit port (exit code 15): a run long enough to overlap another call.
 */
function countdownGuest(count: number): Uint8Array {
  const c = new Uint8Array(new Uint32Array([count]).buffer);
  return new Uint8Array([
    0xb0,
    0x07, // mov al, 7
    0x66,
    0xb9,
    c[0],
    c[1],
    c[2],
    c[3], // mov ecx, count
    0x66,
    0x49, // dec ecx
    0x75,
    0xfc, // jnz dec
    0xe6,
    0xf4, // out 0xf4, al
  ]);
}

kvmTest(
  "a second concurrent run of one VM is BUSY and the first keeps its stop reason",
  async () => {
    const kvm = await Kvm.open();
    using vm = kvm.createVm({ memoryBytes: 2 << 20 });
    const vcpu = vm.createVcpu();
    vm.writeMemory(0x7c00, countdownGuest(300_000_000));
    vcpu.setupEntry("real", 0x7c00);
    const first = vm.run({ timeoutMs: 300_000 });
    // Let the first run reach the core before the second asks.
    await new Promise((resolve) => setTimeout(resolve, 50));
    const second = await vm.run({ timeoutMs: 300_000 }).then(
      () => undefined,
      (e: unknown) => e,
    );
    assert.ok(second instanceof DenovisorError, `the second run was not refused: ${second}`);
    assert.equal(second.code, "BUSY");
    // The VM-level refusal, before the run touches any state (not a vCPU's).
    assert.equal(
      second.message,
      "the VM is already running; wait for its run to return or stop it first",
    );
    const { exit } = await first;
    assert.deepEqual(exit, { reason: "debug_exit", exitCode: 15 });
    // A run of the vCPU alone is refused the same way while the VM runs.
    vcpu.setupEntry("real", 0x7c00);
    const whole = vm.run({ timeoutMs: 300_000 });
    await new Promise((resolve) => setTimeout(resolve, 50));
    await assert.rejects(vcpu.run({ timeoutMs: 1000 }), (e: DenovisorError) => e.code === "BUSY");
    assert.deepEqual((await whole).exit, { reason: "debug_exit", exitCode: 15 });
    // Once the run returned, the VM runs again.
    vcpu.setupEntry("real", 0x7c00);
    assert.deepEqual((await vm.run({ timeoutMs: 300_000 })).exit, {
      reason: "debug_exit",
      exitCode: 15,
    });
  },
);

kvmTest("a VM that is never closed is closed when collected, with a warning", async () => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--v8-flags=--expose-gc", UNCLOSED_CHILD],
    stdin: "null",
    env: { NO_COLOR: "1" },
  }).output();
  const stderr = new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 0, stderr);
  const { before, alive, after } = JSON.parse(new TextDecoder().decode(out.stdout));
  assert.equal(alive, before + 2, "the VM and its vCPU were live");
  assert.equal(after, before, "the dropped VM's handles were closed");
  assert.equal(
    stderr.split("\n").filter((line) =>
      line === "denovisor: a Vm was never closed; closing it (use `using` or vm.close())"
    ).length,
    1,
    stderr,
  );
});

kvmTest(
  "a guest reading its disk as fast as it can moves no more bytes than the bandwidth bucket allows",
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "denovisor-limits-" });
    try {
      await Deno.writeFile(`${dir}/disk.img`, new Uint8Array(1 << 20));
      const bucket = 256 << 10; // 256 KiB per second
      using vm = await Vm.create({
        memoryMiB: RAM_MIB,
        interrupts: true,
        devices: [{
          kind: "block",
          path: `${dir}/disk.img`,
          rateLimiter: { bandwidth: { size: bucket, refillTimeMs: 1000 } },
        }],
      });
      // virtio_blk.c mode 3: reads the disk's first 64 KiB again and again.
      vm.load(
        await buildRuntimeGuest(new URL("./guests/virtio_blk.c", import.meta.url)),
        { mode: "long", arguments: [3, RAM_MIB << 20], stack: (RAM_MIB << 20) - 0x1000 },
      );
      const started = performance.now();
      const run = vm.run({ timeoutMs: 300_000 });
      const counters = () => {
        const f = vm.devices().pci.find((p) => p.name === "block0");
        return (f?.details as { device: { bytesRead: number; throttled: number } }).device;
      };
      // Wait until the guest has emptied the bucket and waited for it (kvmbox
      // boots the guest slowly), then two more seconds of throttled reading.
      for (let i = 0; i < 1200 && counters().throttled === 0; i++) {
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
      const { bytesRead, throttled } = counters();
      const seconds = (performance.now() - started) / 1000;
      vm.stop();
      assert.equal((await run).reason, "stopped");
      assert.ok(throttled > 0, "the guest was never throttled");
      // The bucket starts full and earns `bucket` bytes a second; one request
      // (64 KiB) may be in flight past it.
      const allowed = bucket * (1 + seconds) + (64 << 10);
      assert.ok(
        bytesRead <= allowed,
        `${bytesRead} bytes read in ${seconds.toFixed(1)} s, the bucket allows ${allowed}`,
      );
      // Throttled, not starved: the guest went on reading after it waited.
      assert.ok(bytesRead >= bucket + (64 << 10), `only ${bytesRead} bytes read`);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

kvmTest("a console flood past its rate limiter is dropped and counted, not captured", async () => {
  const CHUNK = 4096;
  // Four chunks' worth of tokens, refilled over an hour: the first four
  // 4 KiB writes pass, every later one finds the bucket empty.
  using vm = await Vm.create({
    memoryMiB: 16,
    consoleRateLimiter: { bandwidth: { size: 4 * CHUNK, refillTimeMs: 3_600_000 } },
  });
  const chunks = 256; // 1 MiB
  vm.load(await testGuest("console_flood.S"), { mode: "long", arguments: [chunks] });
  const result = await vm.run({ timeoutMs: 60_000 });
  assert.equal(result.reason, "guest_exit", result.summary);
  assert.equal(
    result.console,
    "A".repeat(CHUNK) + "B".repeat(CHUNK) + "C".repeat(CHUNK) +
      "D".repeat(CHUNK),
  );
  const stats = vm.kvm.consoleStats();
  assert.equal(stats.bytes, chunks * CHUNK);
  assert.equal(stats.rateDropped, (chunks - 4) * CHUNK);
  assert.equal(stats.captureDropped, 0);
});

Deno.test("a bad console rate limiter is refused before the VM exists", async () => {
  await assert.rejects(
    Vm.create({
      memoryMiB: 16,
      consoleRateLimiter: { bandwidth: { size: 0, refillTimeMs: 1000 } },
    }),
    (e: unknown) => e instanceof DenovisorError && e.code === "INVALID_ARGUMENT",
  );
});
