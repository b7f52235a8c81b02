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
import { kvmTest } from "./_helpers.ts";
import { RAM_MIB, runGuest } from "./_runtime_guest.ts";
import { checkHostSide, G2H_BYTES, H2G_BYTES, REPLY_BYTES, vsockHostSide } from "./_vsock_host.ts";

const SECTOR = 512;
/** The test image: 1 MiB, 2048 sectors. */
const IMAGE_BYTES = 1 << 20;

/** The patterns of virtio_blk.c: the host fills the image, the guest writes. */
const hostByte = (o: number) => (o * 13 + Math.floor(o / 512) + 1) & 0xff;
const guestByte = (o: number) => ((o * 7) ^ Math.floor(o / 512) ^ 0xa5) & 0xff;

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

/**
 * Runs `body` with a VM of {@link RAM_MIB} MiB whose one virtio-blk disk is a
 * fresh {@link hostImage} (with `disk`'s other settings), then closes the VM
 * and removes the image's directory, also when `body` throws.
 */
async function withBlockVm(
  disk: { serial?: string; readonly?: boolean },
  body: (vm: Vm, image: { path: string; bytes: Uint8Array }) => Promise<void>,
): Promise<void> {
  const image = await hostImage();
  try {
    using vm = await Vm.create({
      memoryMiB: RAM_MIB,
      interrupts: true,
      devices: [{ kind: "block", path: image.path, ...disk }],
    });
    await body(vm, image);
  } finally {
    await Deno.remove(image.dir, { recursive: true });
  }
}

type Request = { status: number; used: number };

kvmTest(
  "a runtime guest's virtio-blk writes, reads back, flushes and gets IOERR past the end; the image file agrees byte for byte",
  async () => {
    await withBlockVm({ serial: "guest-blk-42" }, async (vm, image) => {
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
    });
  },
);

kvmTest(
  "a runtime guest's write to a read-only virtio-blk disk gets IOERR and the image stays unchanged",
  async () => {
    await withBlockVm({ readonly: true }, async (vm, image) => {
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
    });
  },
);

kvmTest(
  "hostile virtio-blk chains (data outside RAM, no status byte, wrong order) get NEEDS_RESET, never touch the disk, and a reset recovers",
  async () => {
    await withBlockVm({}, async (vm, image) => {
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
    });
  },
);

kvmTest(
  "a runtime guest speaks raw virtio-vsock packets both ways: connect, credit, data, shutdown and reset, with the bytes checked on the host's Unix sockets",
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "denovisor-guest-vsock-" });
    const path = `${dir}/v.sock`;
    const hostPort = 5000;
    const guestPort = 6000;
    // The guest connects to CID 2 port 5000: the device connects to PATH_5000.
    const listener = Deno.listen({ transport: "unix", path: `${path}_${hostPort}` });
    try {
      using vm = await Vm.create({
        memoryMiB: RAM_MIB,
        interrupts: true,
        devices: [{ kind: "vsock", cid: 3, path }],
      });

      const [report, seen] = await Promise.all([
        runGuest(vm, "virtio_vsock.c", BigInt(hostPort) | BigInt(guestPort) << 32n),
        vsockHostSide(listener, path, guestPort),
      ]);
      const r = report as {
        status: number;
        features: number;
        cid: number;
        queues: number;
        g2h: Record<string, number>;
        h2g: Record<string, number>;
        creditUpdatesIn: number;
        creditRequestsIn: number;
        creditUpdatesOut: number;
        creditRequestsOut: number;
        creditWaits: number;
        overCredit: number;
        stray: number;
        final: number;
      };
      const what = JSON.stringify(r);
      assert.deepEqual(
        [r.status, r.features, r.cid, r.queues, r.final],
        [0x0f, 2 ** 32, 3, 3, 0x0f],
        what,
      );
      assert.equal(r.stray, 0, what);

      // Guest -> host: RESPONSE (2) with the device's 256 KiB buffer; every byte
      // reached the Unix socket in order; the reply came back whole; the host's
      // close arrived as SHUTDOWN SEND (2); the guest's close was answered RST.
      assert.deepEqual(r.g2h, {
        answer: 2,
        peerBufAlloc: 256 << 10,
        error: 0,
        sent: G2H_BYTES,
        replyBytes: REPLY_BYTES,
        replyPackets: r.g2h.replyPackets,
        replyBad: 0,
        hostShutdown: 2,
        closed: 0,
        rst: 1,
        peerFwdCnt: G2H_BYTES,
      }, what);
      // (That every byte reached the Unix socket in order: checkHostSide, below.)
      // 320 KiB is more than the device's credit: the guest ran out, asked,
      // and went on with the device's CREDIT_UPDATEs. The 48 KiB reply through
      // a 15000-byte guest buffer: the device ran the credit down, asked at
      // least 3 times, got an update each time, and never sent a byte past it.
      assert.ok(r.creditUpdatesIn >= 1, what);
      assert.ok(r.creditWaits >= 1 && r.creditRequestsOut >= 1, what);
      assert.ok(r.creditRequestsIn >= 3, what);
      assert.equal(r.creditUpdatesOut, r.creditRequestsIn, what);
      assert.equal(r.overCredit, 0, `the device never sent past the guest's credit: ${what}`);
      assert.ok(r.g2h.replyPackets >= 12, `at most 4 KiB per rx buffer: ${what}`);

      // Host -> guest: the refused CONNECT closed without a byte; the accepted
      // one read `OK <hostport>` and got every byte back, xored.
      assert.equal(checkHostSide(seen), r.h2g.hostPort);
      assert.ok(r.h2g.hostPort >= 2 ** 30 && r.h2g.hostPort < 2 ** 31, what);
      assert.deepEqual(r.h2g, {
        refused: 1,
        refusedPort: guestPort + 1,
        hostPort: r.h2g.hostPort,
        error: 0,
        received: H2G_BYTES,
        packets: r.h2g.packets,
        echoed: H2G_BYTES,
        hostShutdown: 2,
        closed: 0,
        rst: 1,
      }, what);

      // The device's counters: three connections opened (one refused), two
      // RSTs it sent (the guest's closes), the bytes each way, none left open.
      const f = vm.devices().pci.find((p) => p.name === "vsock0");
      assert.ok(f?.details, JSON.stringify(vm.devices().pci));
      const d = (f.details as { device: Record<string, unknown> }).device;
      assert.deepEqual(d, {
        kind: "vsock",
        cid: 3,
        path,
        connections: [],
        opened: 3,
        resets: 2,
        bytesToHost: G2H_BYTES + H2G_BYTES,
        bytesToGuest: REPLY_BYTES + H2G_BYTES,
      });
    } finally {
      listener.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
);

kvmTest(
  "hostile virtio-vsock packets (payload past the chain, a writable tx buffer, a readable rx buffer, over 64 KiB) get NEEDS_RESET and a reset recovers",
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "denovisor-guest-vsock-" });
    const path = `${dir}/v.sock`;
    const hostPort = 5000;
    const listener = Deno.listen({ transport: "unix", path: `${path}_${hostPort}` });
    const streams: Deno.Conn[] = [];
    const accepting = (async () => {
      try {
        for (;;) streams.push(await listener.accept());
      } catch {
        // The listener closed.
      }
    })();
    try {
      using vm = await Vm.create({
        memoryMiB: RAM_MIB,
        interrupts: true,
        devices: [{ kind: "vsock", cid: 3, path }],
      });
      const r = await runGuest(vm, "virtio_vsock.c", BigInt(hostPort) | 1n << 63n) as {
        final: number;
        cases: { name: string; status: number; used: number; recovered: number; answer: number }[];
      };
      assert.deepEqual(r.cases.map((c) => c.name), [
        "payload-past-chain",
        "writable-tx",
        "readable-rx",
        "oversized",
      ]);
      for (const c of r.cases) {
        const what = JSON.stringify(c);
        assert.ok(c.status >= 0 && (c.status & 0x40) !== 0, `NEEDS_RESET: ${what}`);
        assert.equal(c.used, 0, `no used element for the bad packet: ${what}`);
        assert.equal(c.recovered, 0x0f, `running again after the reset: ${what}`);
        assert.equal(c.answer, 2, `a RESPONSE to the next REQUEST: ${what}`);
      }
      assert.equal(r.final, 0x0f);
      // Five connections reached PATH_5000 (four recoveries and the REQUEST
      // whose RESPONSE found a readable rx buffer); none is left open and no
      // byte moved.
      const f = vm.devices().pci.find((p) => p.name === "vsock0");
      const d = (f?.details as { device: Record<string, unknown> }).device;
      assert.deepEqual(
        [d.opened, d.connections, d.bytesToHost, d.bytesToGuest],
        [5, [], 0, 0],
        JSON.stringify(d),
      );
    } finally {
      listener.close();
      await accepting;
      for (const s of streams) s.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
);
