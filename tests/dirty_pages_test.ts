/**
 * Dirty-page tracking and a paused VM's stillness, with real guests: the
 * pages a guest writes are in the set (and few others), the pages a
 * virtio-blk device fills are too (KVM's own log does not see them), a take
 * clears, tracking off is an error; and once `vm.pause()` returns, a guest
 * reading its disk in a loop changes nothing in RAM (no page dirty, every
 * byte the same) until `vm.resume()`. (This guest has one request in flight
 * at a time and its vCPU is parked first, so that part also passes with the
 * device gates removed; the core's vsock test of host bytes arriving while
 * paused is the one that fails then.)
 */

import assert from "node:assert/strict";

import { DenovisorError, Kvm, Vm } from "../mod.ts";
import { kvmTest } from "./_helpers.ts";
import { RAM_MIB } from "./_runtime_guest.ts";
import { buildRuntimeGuest } from "../src/build/workload_build.ts";

const PAGE = 4096;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

kvmTest(
  "the dirty set holds the pages a guest wrote, a take clears it, host writes count, and tracking off is an error",
  async () => {
    using vm = (await Kvm.open()).createVm({ memoryBytes: 2 << 20 });
    const vcpu = vm.createVcpu();
    const written = [0x3_0000, 0x4_5000, 0x1f_0000];
    const code: number[] = [];
    for (const addr of written) {
      // mov byte [addr], 1
      code.push(0xc6, 0x04, 0x25, addr & 0xff, (addr >> 8) & 0xff, (addr >> 16) & 0xff, 0, 1);
    }
    code.push(0xb0, 0x05, 0xe6, 0xf4); // mov al,5; out 0xf4,al
    vm.writeMemory(0x10_0000, new Uint8Array(code));
    vcpu.setupEntry("long", 0x10_0000, 0x1f_f000);
    assert.throws(
      () => vm.takeDirtyPages(),
      (e) => e instanceof DenovisorError && e.code === "INVALID_ARGUMENT",
    );
    vm.startDirtyLog();
    const { exit } = await vcpu.run();
    assert.equal(exit.reason, "debug_exit", JSON.stringify(exit));
    const { pages, bitmap } = vm.takeDirtyPages();
    assert.equal(bitmap.length, (2 << 20) / PAGE / 8, "one bit per page");
    for (const addr of written) assert.ok(pages.includes(addr / PAGE), `${addr.toString(16)}`);
    // The others are page tables whose accessed/dirty bits the CPU set.
    assert.ok(pages.length <= written.length + 8, `extras: ${pages.map((p) => p.toString(16))}`);
    assert.deepEqual(vm.takeDirtyPages().pages, [], "a take clears");
    vm.writeMemory(0x7_0123, new Uint8Array([1, 2]));
    assert.deepEqual(vm.takeDirtyPages().pages, [0x70], "the VMM's writes count");
    vm.stopDirtyLog();
    assert.throws(() => vm.takeDirtyPages(), /not on/);
  },
);

/** The disk's first 64 KiB: virtio_blk.c's host pattern. */
const hostByte = (o: number) => (o * 13 + Math.floor(o / 512) + 1) & 0xff;

/** Where `needle` starts in `haystack` at a page boundary, or -1. */
function findPageAligned(haystack: Uint8Array, needle: Uint8Array): number {
  outer: for (let at = 0; at + needle.length <= haystack.length; at += PAGE) {
    for (let i = 0; i < needle.length; i++) {
      if (haystack[at + i] !== needle[i]) continue outer;
    }
    return at;
  }
  return -1;
}

kvmTest(
  "a guest reading its disk in a loop: the buffers the device fills are dirty pages, and while paused neither a page nor a byte of RAM changes",
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "denovisor-dirty-" });
    try {
      const image = new Uint8Array(1 << 20).map((_, o) => hostByte(o));
      await Deno.writeFile(`${dir}/disk.img`, image);
      using vm = await Vm.create({
        memoryMiB: RAM_MIB,
        interrupts: true,
        devices: [{ kind: "block", path: `${dir}/disk.img` }],
      });
      vm.load(
        await buildRuntimeGuest(new URL("./guests/virtio_blk.c", import.meta.url)),
        { mode: "long", arguments: [3, RAM_MIB << 20], stack: (RAM_MIB << 20) - 0x1000 },
      );
      vm.startDirtyLog();
      const run = vm.run({ timeoutMs: 120_000 });
      try {
        const ram = () => vm.readMemory(0, RAM_MIB << 20);
        const wanted = image.subarray(0, 64 << 10);
        // Wait until the guest's reads land (kvmbox boots it slowly).
        let data = -1;
        for (let i = 0; i < 600 && data < 0; i++) {
          await sleep(100);
          data = findPageAligned(ram(), wanted);
        }
        assert.ok(data >= 0, "the guest's buffer never got the disk's bytes");
        await sleep(300);
        vm.pause();
        const { pages } = vm.takeDirtyPages();
        for (let p = data / PAGE; p < (data + wanted.length) / PAGE; p++) {
          assert.ok(pages.includes(p), `page ${p.toString(16)} of the device's buffer`);
        }
        const before = ram();
        await sleep(1000);
        assert.deepEqual(vm.takeDirtyPages().pages, [], "pages written while paused");
        const after = ram();
        const moved = after.findIndex((b, i) => b !== before[i]);
        assert.equal(moved, -1, `RAM changed at ${moved.toString(16)} while paused`);
        vm.resume();
        await sleep(1000);
        const again = vm.takeDirtyPages().pages;
        assert.ok(again.includes(data / PAGE), "after resume the device serves again");
      } finally {
        vm.stop();
        const result = await run;
        assert.equal(result.reason, "stopped", result.summary);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
