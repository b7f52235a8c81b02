/**
 * Live migration of a Linux guest that writes to memory and to its disk while
 * it moves. One boot (Debian's kernel, busybox, 2 vCPUs, 256 MiB, a virtio-blk
 * disk on an image file both processes open by the same path, the serial
 * console) serves the file: `main.ts run --api-socket` boots it, two guest
 * loops run (one writes a sequence-numbered, checksummed record per sector of
 * the disk with `dd conv=fsync` and then counts it in a tmpfs file; one
 * rewrites 4 MiB of tmpfs from /dev/urandom with its md5), then:
 * 1. a `run --incoming` target killed mid-stream (behind a proxy that counts
 *    the bytes) fails the migration: the source guest runs on and answers;
 * 2. `main.ts migrate` moves it to another `run --incoming` process: the source
 *    exits 0, and on the target the shell answers, both loops went on past
 *    their count before the move, every record (checked in the guest, and in
 *    the image on the host once the target powered off) is there with its
 *    checksum, the tmpfs files check out, the clock moved forward sanely and
 *    both vCPUs take timer interrupts.
 *
 * Needs guest kernel code at hardware speed (`[linux]`: VT-x/AMD-V, or kvmbox).
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";

import { fetchDebianModules } from "../src/linux/modules.ts";
import { linuxTest, MAIN } from "./_helpers.ts";
import {
  busyboxInitramfs,
  debianVmlinux,
  fetchedModules,
  fetchedPath,
  VIRTIO_PCI_MODULE_NAMES,
} from "./_linux.ts";

/** Boot to the shell inside kvmbox, generously. */
const BOOT_MS = 480_000;
/** One command. */
const COMMAND_MS = 120_000;
/** A migration, inside kvmbox, generously. */
const MIGRATE_MS = 300_000;
/** Bytes the killed target receives before it dies (mid round 0). */
const KILL_AFTER = 4 << 20;
/** The disk's sectors: record n lives in sector n (1..). */
const DISK_BYTES = 16 << 20;

/** Only the virtio-pci transport and virtio-blk: a shorter boot. */
const BLK_MODULES = await fetchDebianModules([...VIRTIO_PCI_MODULE_NAMES, "virtio_blk"], {
  log: (line) => console.error(`note: ${line}`),
}).catch((e) => ({ ok: false as const, reason: (e as Error).message }));

/** Writes record n to sector n (`REC n PAYLOAD MD5`, the md5 of `REC n PAYLOAD\n`),
 * flushed (conv=fsync: the guest waits for the device's FLUSH), then counts it. The
 * counters are replaced by a rename: a reader never sees the file truncated but not
 * yet written (a `cat` that caught that moment once read "" on a slow emulator). */
const DISK_WRITER = `#!/bin/sh
n=0
while [ ! -e /mnt/tmp/stop ]; do
  n=$((n+1))
  body="REC $n $(head -c 24 /dev/urandom | md5sum | cut -c1-32)"
  sum=$(echo "$body" | md5sum | cut -c1-32)
  echo "$body $sum" | dd of=/dev/vda bs=512 seek=$n conv=sync,notrunc,fsync 2>/dev/null || {
    echo "DISKW-FAILED $n" > /dev/console; exit 1; }
  echo $n > /mnt/tmp/count.new && mv /mnt/tmp/count.new /mnt/tmp/count
done
echo stopped > /mnt/tmp/diskw.done
`;

/** Rewrites 4 MiB of tmpfs (fresh pages each time) and its md5, then counts. */
const MEMORY_WRITER = `#!/bin/sh
i=0
while [ ! -e /mnt/tmp/stop ]; do
  i=$((i+1))
  dd if=/dev/urandom of=/mnt/tmp/m bs=64k count=64 2>/dev/null
  md5sum /mnt/tmp/m > /mnt/tmp/m.md5
  echo $i > /mnt/tmp/mi.new && mv /mnt/tmp/mi.new /mnt/tmp/mi
done
echo stopped > /mnt/tmp/memw.done
`;

/** Checks every record 1..count of a disk image; the problems found. */
function checkRecords(image: Uint8Array, count: number): string[] {
  const problems: string[] = [];
  const decoder = new TextDecoder();
  for (let n = 1; n <= count; n++) {
    const sector = decoder.decode(image.subarray(n * 512, n * 512 + 512));
    const m = sector.match(/^REC (\d+) ([0-9a-f]{32}) ([0-9a-f]{32})\n\0*$/);
    if (!m || Number(m[1]) !== n) {
      problems.push(`sector ${n}: ${JSON.stringify(sector.replace(/\0+$/, ""))}`);
      continue;
    }
    const sum = createHash("md5").update(`REC ${n} ${m[2]}\n`).digest("hex");
    if (sum !== m[3]) problems.push(`sector ${n}: checksum ${m[3]}, content ${sum}`);
  }
  return problems;
}

/** A `main.ts` child whose console the test drives through its stdin/stdout,
 * stderr streamed too. */
class Child {
  readonly child: Deno.ChildProcess;
  #out = "";
  #err = "";
  #writer: WritableStreamDefaultWriter<Uint8Array>;
  #reading: Promise<void>;
  #marks = 0;
  #exited = false;

  constructor(args: string[]) {
    this.child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", MAIN, ...args],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).spawn();
    this.#writer = this.child.stdin.getWriter();
    const pump = async (stream: ReadableStream<Uint8Array>, add: (t: string) => void) => {
      const decoder = new TextDecoder();
      for await (const chunk of stream) add(decoder.decode(chunk, { stream: true }));
    };
    this.#reading = Promise.all([
      pump(this.child.stdout, (t) => this.#out += t),
      pump(this.child.stderr, (t) => this.#err += t),
    ]).then(() => {});
    this.child.status.then(() => this.#exited = true);
  }

  get output(): string {
    return this.#out;
  }

  get stderr(): string {
    return this.#err;
  }

  async waitFor(
    pattern: RegExp,
    from: number,
    timeoutMs: number,
    where: "stdout" | "stderr" = "stdout",
  ): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = (where === "stdout" ? this.#out : this.#err).slice(from).match(pattern);
      if (m) return m;
      if (this.#exited || Date.now() > deadline) {
        throw new Error(
          `no ${pattern} on ${where} (exited: ${this.#exited}); console:\n${
            this.#out.slice(-3000)
          }\nstderr:\n${this.#err.slice(-2000)}`,
        );
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  async send(text: string): Promise<void> {
    await this.#writer.write(new TextEncoder().encode(text));
  }

  /** Runs a command that must exit 0; its output (between two marks). */
  async sh(command: string, timeoutMs = COMMAND_MS): Promise<string> {
    const n = ++this.#marks;
    const from = this.#out.length;
    // The typed line echoes `$((6*7))`; only the shell's answer has `42`.
    await this.send(`echo B${n}@$((6*7)); ${command}; echo E${n}@$((6*7))@$?\n`);
    const m = await this.waitFor(
      new RegExp(`B${n}@42\\r?\\n([\\s\\S]*?)E${n}@42@(\\d+)`),
      from,
      timeoutMs,
    );
    assert.equal(m[2], "0", `${command} failed (${m[2]}):\n${m[1]}`);
    return m[1].replaceAll("\r", "");
  }

  /** A number the guest prints. */
  async number(command: string): Promise<number> {
    const out = (await this.sh(command)).trim();
    const n = Number(out);
    assert.ok(out !== "" && Number.isFinite(n), `${command}: ${out}`);
    return n;
  }

  /** Ends: standard input closes; the status once it exits. */
  async end(): Promise<number> {
    await this.#writer.close().catch(() => {});
    const status = await this.child.status;
    await this.#reading;
    return status.code;
  }

  kill(): void {
    if (this.#exited) return;
    try {
      this.child.kill("SIGKILL");
    } catch {
      // Already gone.
    }
  }
}

function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/** `main.ts run --incoming`, once it listens. */
async function spawnTarget(port: number): Promise<Child> {
  const target = new Child(["run", "--incoming", `tcp:127.0.0.1:${port}`]);
  try {
    await target.waitFor(/waiting for a migrating VM/, 0, COMMAND_MS, "stderr");
  } catch (e) {
    target.kill();
    throw e;
  }
  return target;
}

/** `main.ts migrate --api-socket SOCKET --to tcp:127.0.0.1:PORT`. */
async function migrate(socket: string, port: number) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, "migrate", "--api-socket", socket, "--to", `tcp:127.0.0.1:${port}`],
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
    env: { NO_COLOR: "1" },
    signal: AbortSignal.timeout(MIGRATE_MS),
  }).output();
  const decode = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: out.code, stdout: decode(out.stdout), stderr: decode(out.stderr) };
}

/**
 * A TCP proxy to `targetPort` that SIGKILLs `target` once `killAfter` bytes
 * went from the source to it, then cuts both connections.
 */
function killingProxy(targetPort: number, target: Child, killAfter: number) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  let forwarded = 0;
  const done = (async () => {
    const source = await listener.accept();
    listener.close();
    const to = await Deno.connect({ hostname: "127.0.0.1", port: targetPort });
    const close = () => {
      for (const c of [source, to]) {
        try {
          c.close();
        } catch {
          // closed already
        }
      }
    };
    const back = (async () => {
      const buf = new Uint8Array(65536);
      for (;;) {
        const n = await to.read(buf).catch(() => null);
        if (n === null) break;
        const ok = await source.write(buf.subarray(0, n)).then(() => true, () => false);
        if (!ok) break;
      }
    })();
    const buf = new Uint8Array(65536);
    for (;;) {
      const n = await source.read(buf).catch(() => null);
      if (n === null) break;
      let off = 0;
      let ok = true;
      while (ok && off < n) {
        const w = await to.write(buf.subarray(off, n)).catch(() => 0);
        ok = w > 0;
        off += w;
      }
      forwarded += n;
      if (!ok || forwarded >= killAfter) break;
    }
    target.kill();
    await target.child.status;
    close();
    await back;
  })();
  return { port, done, forwarded: () => forwarded };
}

linuxTest(
  "a Linux guest writing to memory and to a shared disk image migrates live between two processes: its loops go on and every record checks out; a target killed mid-migration leaves it running",
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "dvlmig" });
    const children: Child[] = [];
    try {
      const disk = `${dir}/disk.img`;
      await Deno.writeFile(disk, new Uint8Array(0));
      await Deno.truncate(disk, DISK_BYTES);
      const initrd = `${dir}/initrd.img`;
      const encoder = new TextEncoder();
      await Deno.writeFile(
        initrd,
        await busyboxInitramfs([
          "/bin/busybox --install -s /bin",
          "mount -t sysfs sys /sys",
          "mount -t devtmpfs dev /dev",
          "mkdir -p /mnt/tmp && mount -t tmpfs tmpfs /mnt/tmp",
          "echo DENOVISOR-SHELL-READY",
          "export PS1='dv# '",
          "exec setsid cttyhack /bin/sh",
        ], {
          modules: fetchedModules(BLK_MODULES),
          files: [
            { path: "usr", kind: "dir" },
            { path: "usr/local", kind: "dir" },
            { path: "usr/local/diskw", data: encoder.encode(DISK_WRITER) },
            { path: "usr/local/memw", data: encoder.encode(MEMORY_WRITER) },
          ],
        }),
      );
      const socket = `${dir}/vm.sock`;

      // Boot, the API on `socket`.
      const source = new Child([
        "run",
        "--kernel",
        fetchedPath(debianVmlinux, "Debian's vmlinux"),
        "--initrd",
        initrd,
        "--cmdline",
        "console=ttyS0 panic=-1 rdinit=/init quiet",
        "--mem",
        "256",
        "--cpus",
        "2",
        "--disk",
        disk,
        "--api-socket",
        socket,
        "--timeout",
        "1200000",
      ]);
      children.push(source);
      await source.waitFor(/DENOVISOR-SHELL-READY/, 0, BOOT_MS);
      await source.waitFor(/dv# /, 0, COMMAND_MS);
      assert.equal((await source.sh("cat /sys/devices/system/cpu/online")).trim(), "0-1");
      // Data that must cross unchanged, and the two loops.
      const staticSum = (await source.sh(
        "head -c 1048576 /dev/urandom > /mnt/tmp/static && md5sum /mnt/tmp/static",
      )).trim();
      await source.sh(
        "(sh /usr/local/diskw >/dev/null 2>&1 &); (sh /usr/local/memw >/dev/null 2>&1 &)",
      );
      const waitPast = async (shell: Child, file: string, past: number) => {
        const deadline = Date.now() + COMMAND_MS;
        for (;;) {
          const n = await shell.number(`cat /mnt/tmp/${file} 2>/dev/null || echo 0`);
          if (n > past) return n;
          assert.ok(Date.now() < deadline, `${file} stays at ${n}`);
          await new Promise((r) => setTimeout(r, 500));
        }
      };
      await waitPast(source, "count", 2);
      await waitPast(source, "mi", 1);

      // 1. A target killed mid-stream: the migration fails, the source runs on.
      {
        const targetPort = freePort();
        const doomed = await spawnTarget(targetPort);
        children.push(doomed);
        const proxy = killingProxy(targetPort, doomed, KILL_AFTER);
        const failed = await migrate(socket, proxy.port);
        await proxy.done;
        console.error(`note: migrate to a killed target: ${failed.stderr.trim()}`);
        assert.notEqual(failed.code, 0, `the migration succeeded: ${failed.stdout}`);
        assert.ok(
          proxy.forwarded() >= KILL_AFTER,
          `only ${proxy.forwarded()} bytes went; the target: ${doomed.stderr}`,
        );
        const count = await source.number("cat /mnt/tmp/count");
        await waitPast(source, "count", count);
        assert.match(await source.sh("echo still-here"), /still-here/);
      }

      // 2. The migration, while both loops run.
      const before = {
        count: await source.number("cat /mnt/tmp/count"),
        mi: await source.number("cat /mnt/tmp/mi"),
        clock: await source.number("date +%s"),
      };
      const port = freePort();
      const target = await spawnTarget(port);
      children.push(target);
      const moved = await migrate(socket, port);
      assert.equal(moved.code, 0, `migrate: ${moved.stderr}\nsource: ${source.stderr}`);
      console.error(`note: migrated: ${moved.stdout.trim()} ${moved.stderr.trim()}`);
      assert.equal(await source.end(), 0, source.stderr);

      // On the target: the shell answers and both loops went on.
      const count = await waitPast(target, "count", before.count);
      await waitPast(target, "mi", before.mi);
      await waitPast(target, "count", count);
      const after = await target.number("date +%s");
      assert.ok(
        after >= before.clock && after - before.clock < 600,
        `clock: ${before.clock} -> ${after}`,
      );
      assert.equal((await target.sh("cat /sys/devices/system/cpu/online")).trim(), "0-1");
      const ticks = async () =>
        (await target.sh("grep LOC: /proc/interrupts")).trim().split(/\s+/).slice(1, 3).map(
          Number,
        );
      const t0 = await ticks();
      await target.sh("sleep 1");
      const t1 = await ticks();
      assert.ok(t1[0] > t0[0] && t1[1] > t0[1], `LOC: ${t0} -> ${t1}`);

      // Stop the loops at a record boundary, then check everything.
      await target.sh("touch /mnt/tmp/stop");
      const deadline = Date.now() + COMMAND_MS;
      while ((await target.sh("ls /mnt/tmp")).match(/(diskw|memw)\.done/g)?.length !== 2) {
        assert.ok(Date.now() < deadline, "the loops do not stop");
        await new Promise((r) => setTimeout(r, 500));
      }
      const last = await target.number("cat /mnt/tmp/count");
      assert.ok(last > before.count);
      assert.equal((await target.sh("md5sum /mnt/tmp/static")).trim(), staticSum);
      assert.match(await target.sh("md5sum -c /mnt/tmp/m.md5"), /OK/);
      // What the guest reads through the target's device (its page cache
      // dropped) is what the image holds.
      const guestSum = (await target.sh(
        `sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=512 count=${
          last + 1
        } 2>/dev/null | md5sum`,
      )).trim().split(/\s+/)[0];
      await target.send("poweroff -f\n");
      assert.equal(await target.end(), 0, target.stderr);
      // And the image on the host, once the target is gone.
      const image = await Deno.readFile(disk);
      assert.deepEqual(checkRecords(image, last), [], "records in the image file");
      assert.equal(
        createHash("md5").update(image.subarray(0, (last + 1) * 512)).digest("hex"),
        guestSum,
        "the guest read the image's records",
      );
      console.error(
        `note: ${last} disk records (${before.count} before the migration), ` +
          `memory loop ${before.mi} rounds before`,
      );
    } finally {
      for (const c of children) c.kill();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
);
