/**
 * virtio-blk with Debian's kernel and its own virtio_blk module, three disks
 * at once in one boot:
 *
 * - `/dev/vda`: an ext4 image made on the host with `mkfs.ext4 -d`; the guest
 *   mounts it, reads the host's file, writes files, `sync`s, unmounts and
 *   powers off; the host reads them back with `debugfs`.
 * - `/dev/vdb`: a raw image the host filled with a known pattern; the guest's
 *   `md5sum` of it matches the host's, the guest `dd`s another pattern (from
 *   its initramfs) onto it with `oflag=direct`, and the host reads the image
 *   byte for byte; a DISCARD (`blkdiscard`) punches a hole when the device
 *   offers it (the host's `fallocate` probe), else the queue says it cannot.
 * - `/dev/vdc`: a read-only disk: the guest sees it read-only, every write
 *   fails in the guest, and the image does not change.
 *
 * Each disk's serial comes back through GET_ID (`/sys/block/vdX/serial`).
 * Needs guest kernel code at hardware speed (`[linux]`: VT-x/AMD-V, or kvmbox).
 */

import assert from "node:assert/strict";

import { debugfsCat, makeExt4Image } from "./_disk.ts";
import { linuxTest } from "./_helpers.ts";
import { INSMOD_FAILED } from "./_linux.ts";
import { bootLinuxShell } from "./_linux_shell.ts";

/** Deterministic bytes (xorshift32), the same on every run. */
function pattern(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}

async function md5(bytes: Uint8Array): Promise<string> {
  const child = new Deno.Command("md5sum", { stdin: "piped", stdout: "piped" }).spawn();
  const writer = child.stdin.getWriter();
  await writer.write(bytes);
  await writer.close();
  const out = await child.output();
  return new TextDecoder().decode(out.stdout).split(" ")[0];
}

const MiB = 1 << 20;

linuxTest(
  "virtio-blk: ext4 written by the guest, a dd pattern byte for byte, a read-only disk, three disks",
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "denovisor-blk-" });
    try {
      const ext4 = `${dir}/ext4.img`;
      await makeExt4Image(ext4, 16, { "from-host.txt": "made by mkfs.ext4 on the host\n" });
      // vdb: 4 MiB of one pattern; the guest overwrites 1 MiB at 512 KiB with another.
      const raw = `${dir}/raw.img`;
      const before = pattern(4 * MiB, 0x1234);
      await Deno.writeFile(raw, before);
      const written = pattern(MiB, 0xbeef);
      const writeAt = 512 * 1024;
      // vdc: read-only.
      const ro = `${dir}/ro.img`;
      const roBytes = pattern(2 * MiB, 0x77);
      await Deno.writeFile(ro, roBytes);

      let discard: boolean | undefined;
      {
        await using guest = await bootLinuxShell({
          memoryMiB: 256,
          devices: [
            { kind: "block", path: ext4, serial: "ext4-disk" },
            { kind: "block", path: raw, serial: "raw-disk" },
            { kind: "block", path: ro, readonly: true, serial: "ro-disk" },
          ],
          files: [{ path: "pattern.bin", mode: 0o644, data: written }],
        });
        const { sh, exec, vm, shell } = guest;
        assert.doesNotMatch(shell.transcript, new RegExp(INSMOD_FAILED));
        const rawDevice = vm.devices().pci.find((f) => f.name === "block1");
        discard = (rawDevice?.details as { device?: { discard?: boolean } })?.device
          ?.discard;
        assert.equal(typeof discard, "boolean", JSON.stringify(rawDevice));

        // Three disks, in the order given, each with its serial and size.
        const sizes = await sh("cat /sys/block/vda/size /sys/block/vdb/size /sys/block/vdc/size");
        assert.deepEqual(sizes.trim().split(/\s+/).map(Number), [16 * 2048, 4 * 2048, 2 * 2048]);
        const serials = await sh("for d in vda vdb vdc; do cat /sys/block/$d/serial; echo; done");
        assert.deepEqual(serials.trim().split(/\s+/), ["ext4-disk", "raw-disk", "ro-disk"]);
        assert.equal((await sh("cat /sys/block/vdc/ro /sys/block/vda/ro")).trim(), "1\n0");

        // vda: ext4 from the host; the guest writes, syncs and unmounts.
        await sh("mkdir -p /mnt && mount -t ext4 /dev/vda /mnt");
        assert.equal(await sh("cat /mnt/from-host.txt"), "made by mkfs.ext4 on the host\n");
        await sh("echo 'written by the guest' > /mnt/guest.txt");
        await sh("mkdir /mnt/dir && cp /pattern.bin /mnt/dir/pattern.bin && sync");
        await sh("umount /mnt");

        // vdb: the host's pattern reads back, the guest's lands where it was put.
        assert.equal((await sh("md5sum /dev/vdb")).split(" ")[0], await md5(before));
        await sh(
          `dd if=/pattern.bin of=/dev/vdb bs=4096 seek=${writeAt / 4096} oflag=direct conv=notrunc`,
        );
        await sh("sync");
        if (discard) {
          // The last 1 MiB becomes a hole that reads back zero.
          await sh(`blkdiscard -o ${3 * MiB} -l ${MiB} /dev/vdb`);
        } else {
          assert.equal((await sh("cat /sys/block/vdb/queue/discard_max_bytes")).trim(), "0");
        }

        // vdc: read-only; writes fail in the guest.
        const refused = await exec(
          "dd if=/pattern.bin of=/dev/vdc bs=4096 count=16 oflag=direct conv=notrunc",
        );
        assert.notEqual(refused.status, 0, refused.output);
        assert.match(refused.output, /Operation not permitted|Read-only file system|I\/O error/);
        console.error(`note: discard offered: ${discard}; the read-only write: ${refused.output}`);
        const mounted = await exec("mount -t ext4 -o rw /dev/vdc /mnt");
        assert.notEqual(mounted.status, 0, mounted.output);

        await guest.powerOff();
      }
      // The host's view of the images.
      assert.equal(
        new TextDecoder().decode(await debugfsCat(ext4, "guest.txt")),
        "written by the guest\n",
      );
      assert.deepEqual(await debugfsCat(ext4, "dir/pattern.bin"), written);
      const after = await Deno.readFile(raw);
      const expected = before.slice();
      expected.set(written, writeAt);
      if (discard) expected.fill(0, 3 * MiB, 4 * MiB);
      assert.equal(after.length, expected.length);
      const firstDiff = after.findIndex((b, i) => b !== expected[i]);
      assert.equal(firstDiff, -1, `the raw image differs from byte ${firstDiff}`);
      assert.deepEqual(await Deno.readFile(ro), roBytes, "the read-only image changed");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
