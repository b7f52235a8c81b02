/**
 * Fast virtio-blk and virtio-vsock tests without Linux: runtime guests
 * (`tests/guests/virtio_blk.c`, `virtio_vsock.c`) drive the devices' split
 * queues with the guest runtime's virtio driver (`guest/runtime/virtio.c`) and
 * REPORT what they saw as JSON; these tests hold it against the host's side of
 * the same I/O: the image file byte for byte, the bytes on the Unix sockets,
 * and the counters in `vm.devices()`. Each VM runs for seconds, not the minutes
 * a Linux boot takes in kvmbox.
 */

import assert from "node:assert/strict";

import { Vm } from "../mod.ts";
import { buildRuntimeGuest } from "../src/build/workload_build.ts";
import { kvmTest } from "./_helpers.ts";

const GUESTS = new URL("./guests/", import.meta.url);
const RAM_MIB = 16;
const SECTOR = 512;
/** The test image: 1 MiB, 2048 sectors. */
const IMAGE_BYTES = 1 << 20;

/** The patterns of virtio_blk.c: the host fills the image, the guest writes. */
const hostByte = (o: number) => (o * 13 + Math.floor(o / 512) + 1) & 0xff;
const guestByte = (o: number) => ((o * 7) ^ Math.floor(o / 512) ^ 0xa5) & 0xff;

/** Runs a runtime guest from tests/guests/ to its EXIT and returns its parsed REPORT. */
async function runGuest(vm: Vm, source: string, arg: bigint | number): Promise<unknown> {
  vm.load(await buildRuntimeGuest(new URL(source, GUESTS)), {
    mode: "long",
    arguments: [arg, RAM_MIB << 20],
    // The stack starts a page below the top of RAM: a hostile case hands the
    // device a buffer that straddles the end of RAM.
    stack: (RAM_MIB << 20) - 0x1000,
  });
  const result = await vm.run({ timeoutMs: 120_000 });
  assert.equal(result.reason, "guest_exit", `${result.summary}\n${result.console}`);
  assert.equal(result.exitCode, 0, `${result.reportText}\n${result.console}`);
  return JSON.parse(result.reportText!);
}

/** A fresh image in a temp dir, filled with the host pattern. */
async function hostImage(): Promise<{ dir: string; path: string; bytes: Uint8Array }> {
  const dir = await Deno.makeTempDir({ prefix: "denovisor-guest-blk-" });
  const bytes = new Uint8Array(IMAGE_BYTES);
  for (let o = 0; o < bytes.length; o++) bytes[o] = hostByte(o);
  const path = `${dir}/disk.img`;
  await Deno.writeFile(path, bytes);
  return { dir, path, bytes };
}

/** The block device's counters in `vm.devices()`. */
function blockCounters(vm: Vm): Record<string, unknown> {
  const f = vm.devices().pci.find((p) => p.name === "block0");
  assert.ok(f?.details, JSON.stringify(vm.devices().pci));
  return (f.details as { device: Record<string, unknown> }).device;
}

type Request = { status: number; used: number };

kvmTest(
  "a runtime guest's virtio-blk writes, reads back, flushes and gets IOERR past the end; the image file agrees byte for byte",
  async () => {
    const image = await hostImage();
    try {
      using vm = await Vm.create({
        memoryMiB: RAM_MIB,
        interrupts: true,
        devices: [{ kind: "block", path: image.path, serial: "guest-blk-42" }],
      });
      const r = await runGuest(vm, "virtio_blk.c", 0) as Record<string, unknown> & {
        status: number;
        offered: number;
        features: number;
        capacity: number;
        serial: string;
        read3: Request & { bad: number };
        read64: Request & { bad: number };
        readLast: Request & { bad: number };
        readHost: Request & { bad: number; hex: string };
      };
      const what = JSON.stringify(r);
      assert.equal(r.status, 0x0f, what);
      // SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH and VERSION_1 asked for and granted.
      const wanted = (1 << 1) | (1 << 2) | (1 << 6) | (1 << 9);
      assert.equal(r.features, 2 ** 32 + wanted, what);
      assert.equal(r.offered & wanted, wanted, what);
      assert.equal(r.offered & (1 << 5), 0, "a writable disk does not offer RO");
      assert.equal(r.capacity, IMAGE_BYTES / SECTOR);
      assert.deepEqual([r.segMax, r.blkSize], [254, 512]);
      assert.deepEqual(r.getId, { status: 0, used: 21 }, what);
      assert.equal(r.serial, "guest-blk-42");
      // Writes use 1 byte (the status); reads the data and the status.
      assert.deepEqual(r.write3, { status: 0, used: 1 }, what);
      assert.deepEqual(r.write64, { status: 0, used: 1 }, what);
      assert.deepEqual(r.writeLast, { status: 0, used: 1 }, what);
      assert.deepEqual(r.read3, { status: 0, used: 4097, bad: 0 }, what);
      assert.deepEqual(r.read64, { status: 0, used: 65537, bad: 0 }, what);
      assert.deepEqual(r.readLast, { status: 0, used: 513, bad: 0 }, what);
      assert.deepEqual(
        r.readHost,
        {
          status: 0,
          used: 4097,
          bad: 0,
          hex: Array.from(image.bytes.subarray(200 * SECTOR, 200 * SECTOR + 16))
            .map((b) => b.toString(16).padStart(2, "0")).join(""),
        },
        what,
      );
      assert.deepEqual(r.flush, { status: 0, used: 1 }, what);
      // IOERR (1) past the end and for half a sector, UNSUPP (2) for an unknown type.
      assert.deepEqual(r.readStraddlesEnd, { status: 1, used: 1 }, what);
      assert.deepEqual(r.readPastEnd, { status: 1, used: 1 }, what);
      assert.deepEqual(r.writePartial, { status: 1, used: 1 }, what);
      assert.deepEqual(r.unknownType, { status: 2, used: 1 }, what);
      assert.equal(r.final, 0x0f, "the device still runs");

      // The host file: the guest's pattern where it wrote, the host's elsewhere.
      const expected = image.bytes.slice();
      const written = [[3, 8], [64, 128], [IMAGE_BYTES / SECTOR - 1, 1]];
      for (const [sector, count] of written) {
        for (let o = sector * SECTOR; o < (sector + count) * SECTOR; o++) {
          expected[o] = guestByte(o);
        }
      }
      const after = await Deno.readFile(image.path);
      assert.equal(after.length, IMAGE_BYTES);
      const firstDiff = after.findIndex((b, i) => b !== expected[i]);
      assert.equal(firstDiff, -1, `the image differs at byte ${firstDiff}`);

      assert.deepEqual(blockCounters(vm), {
        ...blockCounters(vm),
        reads: 4,
        writes: 3,
        flushes: 1,
        bytesRead: 4096 + 65536 + 512 + 4096,
        bytesWritten: 4096 + 65536 + 512,
        errors: 4,
        capacitySectors: IMAGE_BYTES / SECTOR,
        serial: "guest-blk-42",
        readonly: false,
      });
    } finally {
      await Deno.remove(image.dir, { recursive: true });
    }
  },
);

kvmTest(
  "a runtime guest's write to a read-only virtio-blk disk gets IOERR and the image stays unchanged",
  async () => {
    const image = await hostImage();
    try {
      using vm = await Vm.create({
        memoryMiB: RAM_MIB,
        interrupts: true,
        devices: [{ kind: "block", path: image.path, readonly: true }],
      });
      const r = await runGuest(vm, "virtio_blk.c", 1) as Record<string, unknown> & {
        offered: number;
        features: number;
      };
      const what = JSON.stringify(r);
      assert.equal(r.status, 0x0f, what);
      assert.equal(r.offered & (1 << 5), 1 << 5, "RO offered");
      assert.equal(r.features, 2 ** 32 + (1 << 5) + (1 << 9), what);
      assert.deepEqual(r.write, { status: 1, used: 1 }, what);
      assert.deepEqual(r.read, { status: 0, used: 16 * SECTOR + 1, bad: 0 }, what);
      assert.deepEqual(r.flush, { status: 0, used: 1 }, what);
      assert.equal(r.final, 0x0f);
      assert.deepEqual(await Deno.readFile(image.path), image.bytes, "the image is unchanged");
      const c = blockCounters(vm);
      assert.deepEqual(
        [c.readonly, c.reads, c.writes, c.bytesWritten, c.flushes, c.errors],
        [true, 1, 0, 0, 1, 1],
        JSON.stringify(c),
      );
    } finally {
      await Deno.remove(image.dir, { recursive: true });
    }
  },
);

kvmTest(
  "hostile virtio-blk chains (data outside RAM, no status byte, wrong order) get NEEDS_RESET, never touch the disk, and a reset recovers",
  async () => {
    const image = await hostImage();
    try {
      using vm = await Vm.create({
        memoryMiB: RAM_MIB,
        interrupts: true,
        devices: [{ kind: "block", path: image.path }],
      });
      const r = await runGuest(vm, "virtio_blk.c", 2) as {
        final: number;
        cases: {
          name: string;
          status: number;
          used: number;
          recovered: number;
          read: number;
          readUsed: number;
          bad: number;
        }[];
      };
      assert.deepEqual(r.cases.map((c) => c.name), [
        "data-outside-ram",
        "data-straddles-ram",
        "no-status",
        "readable-after-writable",
      ]);
      for (const c of r.cases) {
        const what = JSON.stringify(c);
        assert.ok(c.status >= 0 && (c.status & 0x40) !== 0, `NEEDS_RESET: ${what}`);
        assert.equal(c.used, 0, `no used element for a chain that cannot be answered: ${what}`);
        assert.equal(c.recovered, 0x0f, `running again after the reset: ${what}`);
        assert.deepEqual([c.read, c.readUsed, c.bad], [0, 4097, 0], what);
      }
      assert.equal(r.final, 0x0f);
      // Not one byte reached the image (the first data buffer of the first
      // case was good; the chain as a whole was refused before any I/O).
      assert.deepEqual(await Deno.readFile(image.path), image.bytes, "the image is unchanged");
      const c = blockCounters(vm);
      assert.deepEqual(
        [c.reads, c.writes, c.bytesWritten, c.errors],
        [4, 0, 0, 0],
        JSON.stringify(c),
      );
    } finally {
      await Deno.remove(image.dir, { recursive: true });
    }
  },
);
