/**
 * Snapshots of a Linux guest through the CLI and the control API, restored in
 * a new process, and 20 clones of it in one process. One boot (Debian's
 * kernel, busybox, 2 vCPUs, a virtio-blk disk, virtio-net on a TAP in the
 * test's network namespace, vsock, rng) serves the whole file: `main.ts run
 * --api-socket` boots it and the test drives its shell over the child's
 * stdin/stdout; `main.ts snapshot --api-socket --to DIR --stop` writes the
 * snapshot; `main.ts restore DIR` continues it in another process; then
 * `Vm.restore` x20 (lazy) makes clones, each with its own disk copy, TAP,
 * vsock socket, CID and MAC. The restored guest pings the host over the
 * recreated TAP, its TCP connection to a host listener from before the
 * snapshot keeps working or ends (never hangs), a new one works, and it
 * reaches a host vsock listener; two clones see their own MAC (after the
 * driver probes again) and connect over vsock with their own CID. Needs
 * guest kernel code at hardware speed (`[linux]`: VT-x/AMD-V, or kvmbox) and
 * root for the namespace.
 */

import assert from "node:assert/strict";

import { ConsoleDriver, type DeviceConfig, Vm } from "../mod.ts";
import { ApiClient } from "../src/api/client.ts";
import { cli, linuxTest, MAIN } from "./_helpers.ts";
import {
  busyboxInitramfs,
  debianVmlinux,
  fetchedModules,
  fetchedPath,
  VIRTIO_MODULES,
} from "./_linux.ts";
import { createNetns, ensureTun } from "./_netns.ts";

const VSOCK_PEER = new URL("../guest/vsock/vsock_peer.c", import.meta.url).pathname;
/** The host's TCP echo listener in the namespace, and the guest's vsock port. */
const TCP_PORT = 7000;
const VSOCK_PORT = 5020;

/** Boot to the shell inside kvmbox, generously. */
const BOOT_MS = 480_000;
/** One command. */
const COMMAND_MS = 120_000;
/** How many clones. */
const CLONES = 20;
/** How many clones also check their MAC and vsock CID in the guest: the last
 * ones, so the memory figure per clone is taken over the idle ones before. */
const CHECKED_CLONES = 2;
const IDLE_CLONES = CLONES - CHECKED_CLONES;

/** A `main.ts` child whose console the test drives through its stdin/stdout. */
class ChildShell {
  readonly child: Deno.ChildProcess;
  #out = "";
  #stderr: Promise<string>;
  #writer: WritableStreamDefaultWriter<Uint8Array>;
  #reading: Promise<void>;
  #marks = 0;

  constructor(args: string[]) {
    this.child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", MAIN, ...args],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).spawn();
    this.#writer = this.child.stdin.getWriter();
    const decoder = new TextDecoder();
    const stdout = this.child.stdout;
    this.#reading = (async () => {
      for await (const chunk of stdout) this.#out += decoder.decode(chunk);
    })();
    this.#stderr = new Response(this.child.stderr).text();
  }

  get output(): string {
    return this.#out;
  }

  async waitFor(pattern: RegExp, from: number, timeoutMs: number): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      const m = this.#out.slice(from).match(pattern);
      if (m) return m;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error(`no ${pattern} in ${timeoutMs} ms; console:\n${this.#out.slice(-3000)}`);
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

  /** Ends: standard input closes, and the status and stderr once it exits. */
  async end(): Promise<{ code: number; stderr: string }> {
    await this.#writer.close().catch(() => {});
    const status = await this.child.status;
    await this.#reading;
    return { code: status.code, stderr: await this.#stderr };
  }

  kill(): void {
    try {
      this.child.kill("SIGKILL");
    } catch {
      // Already gone.
    }
  }
}

/** Builds the guest's vsock program with the host's gcc (busybox has no AF_VSOCK). */
async function buildVsockPeer(dir: string): Promise<Uint8Array> {
  const out = `${dir}/vsock_peer`;
  const gcc = await new Deno.Command("gcc", {
    args: ["-static", "-O2", "-Wall", "-o", out, VSOCK_PEER],
    stderr: "piped",
  }).output();
  assert.equal(gcc.code, 0, new TextDecoder().decode(gcc.stderr));
  return await Deno.readFile(out);
}

/** A TCP echo server inside the namespace: it echoes what each connection
 * sends and closes a connection after a chunk with `bye`; its log (`DATA id
 * "text"`, `END id`) is in `log`. */
const ECHO_SERVER = `
const l = Deno.listen({ hostname: "0.0.0.0", port: ${TCP_PORT} });
console.log("LISTENING");
let n = 0;
for await (const c of l) {
  const id = ++n;
  (async () => {
    const buf = new Uint8Array(4096);
    try {
      for (;;) {
        const k = await c.read(buf);
        if (k === null) break;
        const text = new TextDecoder().decode(buf.subarray(0, k));
        console.log("DATA " + id + " " + JSON.stringify(text));
        await c.write(buf.subarray(0, k));
        if (text.includes("bye")) break;
      }
    } catch (e) {
      console.log("ERROR " + id + " " + e);
    }
    try { c.close(); } catch { /* closed */ }
    console.log("END " + id);
  })();
}`;

class EchoServer {
  readonly child: Deno.ChildProcess;
  log = "";
  #reading: Promise<void>;

  constructor(ns: string) {
    this.child = new Deno.Command("ip", {
      args: ["netns", "exec", ns, Deno.execPath(), "eval", ECHO_SERVER],
      stdin: "null",
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const stdout = this.child.stdout.pipeThrough(new TextDecoderStream());
    this.#reading = (async () => {
      for await (const chunk of stdout) this.log += chunk;
    })();
  }

  async listening(): Promise<void> {
    const deadline = Date.now() + COMMAND_MS;
    while (!this.log.includes("LISTENING")) {
      if (Date.now() > deadline) throw new Error(`the echo server did not listen: ${this.log}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  async stop(): Promise<void> {
    try {
      this.child.kill("SIGKILL");
    } catch {
      // Already gone.
    }
    await this.child.status;
    await this.#reading.catch(() => {});
  }
}

/** Listens on the vsock host side `${path}_${VSOCK_PORT}` for one guest
 * connection: reads what the guest sends (its `cid=N` line) to its end,
 * answers `answer` and closes; `got` is what the guest sent. */
function vsockListener(path: string, answer: string): { got: Promise<string>; close(): void } {
  const listener = Deno.listen({ transport: "unix", path: `${path}_${VSOCK_PORT}` });
  const close = () => {
    try {
      listener.close();
    } catch {
      // Closed already.
    }
  };
  const got = (async () => {
    try {
      const conn = await listener.accept();
      let text = "";
      const buf = new Uint8Array(4096);
      for (;;) {
        const n = await conn.read(buf);
        if (n === null) break;
        text += new TextDecoder().decode(buf.subarray(0, n));
      }
      await conn.write(new TextEncoder().encode(answer));
      conn.close();
      return text;
    } finally {
      close();
    }
  })();
  got.catch(() => {});
  return { got, close };
}

async function waitForSocket(path: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    try {
      if ((await Deno.lstat(path)).isSocket) return;
    } catch {
      // Not yet.
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`no API socket at ${path}`);
}

/** The process's resident set, in bytes: all of it, and its anonymous part
 * (a clone's private copies; file pages shared by every clone's mapping of the
 * memory file count once per mapping in VmRSS, but once in the page cache). */
async function rssBytes(): Promise<{ total: number; anon: number }> {
  const status = await Deno.readTextFile("/proc/self/status");
  const kb = (field: string) =>
    Number(status.match(new RegExp(`^${field}:\\s+(\\d+) kB`, "m"))![1]) * 1024;
  return { total: kb("VmRSS"), anon: kb("RssAnon") };
}

linuxTest(
  "a Linux guest snapshotted through the CLI resumes in a new process with its disk, files, clock, CPUs, TAP network (ping, an old TCP connection, a new one) and vsock; 20 lazy clones answer, two of them with their own MAC and vsock CID",
  async () => {
    await ensureTun();
    const dir = await Deno.makeTempDir({ prefix: "dvlsnap" });
    const ns = `dvsnap${Deno.pid}`;
    const children: ChildShell[] = [];
    let echo: EchoServer | undefined;
    try {
      await using _netns = await createNetns(ns);
      const vsockPeer = await buildVsockPeer(dir);
      const disk = `${dir}/disk.img`;
      await Deno.writeFile(disk, new Uint8Array(0));
      await Deno.truncate(disk, 16 << 20);
      const initrd = `${dir}/initrd.img`;
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
          modules: fetchedModules(VIRTIO_MODULES),
          files: [{ path: "bin/vsock_peer", mode: 0o755, data: vsockPeer }],
        }),
      );
      const socket = `${dir}/vm.sock`;
      const vsock = `${dir}/v.sock`;
      const snap = `${dir}/snap`;

      // 1. Boot with the CLI, the API on `socket`.
      const first = new ChildShell([
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
        "--net",
        `netns=${ns},tap=dv0,host=10.77.0.1/24`,
        "--vsock",
        `cid=3,path=${vsock}`,
        "--api-socket",
        socket,
        "--timeout",
        "900000",
      ]);
      children.push(first);
      await first.waitFor(/DENOVISOR-SHELL-READY/, 0, BOOT_MS);
      await first.waitFor(/dv# /, 0, COMMAND_MS);
      await first.sh(
        "ip link set lo up && ip link set eth0 up && ip addr add 10.77.0.2/24 dev eth0",
      );
      assert.match(await first.sh("ping -c 2 -W 5 10.77.0.1"), /2 packets received/);
      // A TCP connection to a host listener, open across the snapshot: nc
      // reads a FIFO that a sleeping writer keeps open, its answers go to a file.
      echo = new EchoServer(ns);
      await echo.listening();
      await first.sh(
        "mkfifo /mnt/tmp/in && { sleep 100000 > /mnt/tmp/in & } && " +
          `{ nc 10.77.0.1 ${TCP_PORT} < /mnt/tmp/in > /mnt/tmp/out 2>&1 & } && echo $! > /mnt/tmp/nc.pid`,
      );
      const waitEcho = (text: string) =>
        `echo ${text} > /mnt/tmp/in; for i in $(seq 60); do grep -q ${text} /mnt/tmp/out && break; ` +
        `kill -0 $(cat /mnt/tmp/nc.pid) 2>/dev/null || break; sleep 1; done; cat /mnt/tmp/out; ` +
        `kill -0 $(cat /mnt/tmp/nc.pid) 2>/dev/null && echo NC-ALIVE || echo NC-GONE`;
      assert.match(await first.sh(waitEcho("before-snapshot")), /before-snapshot\nNC-ALIVE/);
      await first.sh(
        "echo disk-before-snapshot | dd of=/dev/vda bs=512 conv=sync 2>/dev/null && sync",
      );
      await first.sh("echo tmpfs-before-snapshot > /mnt/tmp/file");
      const snapshotMac = (await first.sh("cat /sys/class/net/eth0/address")).trim();
      const before = Number((await first.sh("date +%s")).trim());
      assert.equal((await first.sh("cat /sys/devices/system/cpu/online")).trim(), "0-1");

      // 2. Snapshot from another process, the VM left paused; then the first
      //    process ends (its TAP and vsock socket go with it).
      const taken = await cli("snapshot", "--api-socket", socket, "--to", snap, "--stop");
      assert.equal(taken.code, 0, taken.stderr);
      assert.match(taken.stderr, /snapshot written to .*snap \(the VM stays paused\)/);
      {
        using client = new ApiClient(socket);
        assert.equal((await client.vm()).state, "paused");
        await client.stop();
      }
      const ended = await first.end();
      assert.equal(ended.code, 0, ended.stderr);

      // 3. Restore in a new process, which opens the TAP by name again.
      const restoreSocket = `${dir}/restored.sock`;
      const second = new ChildShell(["restore", snap, "--api-socket", restoreSocket]);
      children.push(second);
      await waitForSocket(restoreSocket, COMMAND_MS);
      assert.match(
        await second.sh("dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 20"),
        /disk-before-snapshot/,
      );
      assert.match(await second.sh("cat /mnt/tmp/file"), /tmpfs-before-snapshot/);
      const after = Number((await second.sh("date +%s")).trim());
      assert.ok(after >= before && after - before < 3600, `clock: ${before} -> ${after}`);
      assert.equal((await second.sh("cat /sys/devices/system/cpu/online")).trim(), "0-1");
      // Both CPUs take timer interrupts again after the restore.
      const ticks = async () =>
        (await second.sh("grep LOC: /proc/interrupts")).trim().split(/\s+/).slice(1, 3).map(Number);
      const t0 = await ticks();
      await second.sh("sleep 1");
      const t1 = await ticks();
      assert.ok(t1[0] > t0[0] && t1[1] > t0[1], `LOC: ${t0} -> ${t1}`);
      // The same MAC as before (a random one is pinned in the snapshot).
      assert.equal((await second.sh("cat /sys/class/net/eth0/address")).trim(), snapshotMac);
      // The network over the recreated TAP: ping, the TCP connection from
      // before the snapshot (it keeps working, or it ends: never a hang), a
      // new connection, and vsock to a host listener.
      assert.match(await second.sh("ping -c 2 -W 5 10.77.0.1; true"), /2 packets received/);
      const old = await second.sh(waitEcho("after-restore"));
      assert.match(old, /after-restore\nNC-ALIVE|NC-GONE/, `the old connection hangs:\n${old}`);
      console.error(
        `note: the TCP connection from before the snapshot ${
          /NC-ALIVE/.test(old) ? "kept working" : "ended"
        } after the restore`,
      );
      assert.match(
        await second.sh(`echo new-connection-bye | nc 10.77.0.1 ${TCP_PORT}`),
        /new-connection-bye/,
      );
      if (/NC-ALIVE/.test(old)) assert.match(echo.log, /DATA 1 "after-restore\\n"/);
      assert.match(echo.log, /DATA 2 "new-connection-bye\\n"/);
      {
        const host = vsockListener(vsock, "hello-restored\n");
        try {
          const out = await second.sh(`vsock_peer whoami ${VSOCK_PORT}`);
          assert.match(out, /^cid=3\nhello-restored$/m);
          assert.equal(await host.got, "cid=3\n");
        } finally {
          host.close();
        }
      }
      // Fresh entropy from virtio-rng, and a disk that takes writes.
      assert.match(
        await second.sh("dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | head -1"),
        /[0-9a-f]{2}/,
      );
      await second.sh(
        "echo disk-after-restore | dd of=/dev/vda bs=512 seek=1 conv=sync 2>/dev/null && sync",
      );
      {
        using client = new ApiClient(restoreSocket);
        const listing = await client.vm();
        assert.equal(listing.state, "running");
      }
      await second.send("poweroff -f\n");
      const done = await second.end();
      assert.equal(done.code, 0, done.stderr);
      const sector1 = new Uint8Array(512);
      using f = await Deno.open(disk);
      await f.seek(512, Deno.SeekMode.Start);
      await f.read(sector1);
      assert.match(new TextDecoder().decode(sector1), /disk-after-restore/);

      // 4. 20 clones, lazily, in this process: each its own disk copy, TAP,
      //    vsock socket, CID and MAC; each answers on its console.
      const vms: Vm[] = [];
      const runs: Promise<unknown>[] = [];
      try {
        const rss0 = await rssBytes();
        const clonesStart = performance.now();
        const perClone: { total: number; anon: number }[] = [];
        for (let i = 0; i < CLONES; i++) {
          const cloneDisk = `${dir}/clone${i}.img`;
          await Deno.copyFile(disk, cloneDisk);
          const hex = (10 + i).toString(16).padStart(2, "0");
          const vm = await Vm.restore(snap, {
            mode: "lazy",
            console: "capture",
            identity: { cid: 100 + i, mac: `52:54:00:aa:00:${hex}` },
            hostSides: (d: DeviceConfig) => {
              if (d.kind === "block") return { ...d, path: cloneDisk };
              if (d.kind === "net") {
                const { hostAddress: _, ...rest } = d;
                return { ...rest, tapName: `dvc${i}` };
              }
              if (d.kind === "vsock") return { ...d, path: `${dir}/c${i}.sock` };
              return d;
            },
          });
          vms.push(vm);
          const shell = new ConsoleDriver(vm);
          const run = shell.watch(vm.run({ timeoutMs: 600_000 }));
          runs.push(run.catch(() => {}));
          const { output, status } = await shell.exec(`echo clone-$((${i} * 1))`, {
            timeoutMs: COMMAND_MS,
          });
          assert.equal(status, 0);
          assert.match(output, new RegExp(`^clone-${i}$`, "m"));
          const vsockDevice = vm.devices().pci.find((f) => f.name.startsWith("vsock"))
            ?.details as { device: { cid: number } };
          assert.equal(vsockDevice.device.cid, 100 + i);
          if (i >= IDLE_CLONES) {
            // The guest sees the clone's MAC once virtio-net probes again
            // (Linux reads the MAC from config space only at probe).
            const kept = await shell.exec("cat /sys/class/net/eth0/address", {
              timeoutMs: COMMAND_MS,
            });
            assert.equal(kept.output.trim(), snapshotMac, "the running interface keeps its MAC");
            const mac = await shell.exec(
              "cd /sys/bus/virtio/drivers/virtio_net && for d in virtio*; do " +
                "echo $d > unbind && echo $d > bind; done; cd /; cat /sys/class/net/eth0/address",
              { timeoutMs: COMMAND_MS },
            );
            assert.equal(mac.status, 0, mac.output);
            assert.match(mac.output, new RegExp(`^52:54:00:aa:00:${hex}$`, "m"));
            // The guest reads the clone's CID and connects from it (the
            // device drops a packet from any other source CID).
            const host = vsockListener(`${dir}/c${i}.sock`, `hello-clone-${i}\n`);
            try {
              const out = await shell.exec(`vsock_peer whoami ${VSOCK_PORT}`, {
                timeoutMs: COMMAND_MS,
              });
              assert.equal(out.status, 0, out.output);
              assert.match(out.output, new RegExp(`^cid=${100 + i}\nhello-clone-${i}$`, "m"));
              assert.equal(await host.got, `cid=${100 + i}\n`);
            } finally {
              host.close();
            }
          }
          // An idle clone parks, so 20 of them do not share 1-2 CPUs.
          vm.pause();
          perClone.push(await rssBytes());
        }
        const mib = (n: number) => (n / 2 ** 20).toFixed(2);
        console.error(
          `note: ${CLONES} clones restored and answering in ${
            ((performance.now() - clonesStart) / 1000).toFixed(1)
          } s (${CHECKED_CLONES} of them also re-probing their NIC and using vsock); frames ` +
            `their NICs took in from their TAPs: ${
              vms.map((vm) =>
                (vm.devices().pci.find((f) => f.name.startsWith("net"))?.details as
                  | { device?: { rxFrames?: number } }
                  | undefined)?.device?.rxFrames ?? "?"
              ).join(" ")
            }`,
        );
        const first = perClone[0], last = perClone[IDLE_CLONES - 1];
        console.error(
          `note: RSS before the clones ${mib(rss0.total)} MiB (anonymous ${mib(rss0.anon)}), ` +
            `after 1 clone ${mib(first.total)} (${mib(first.anon)}), after ${IDLE_CLONES} ` +
            `${mib(last.total)} (${mib(last.anon)}): per extra idle clone ` +
            `${mib((last.total - first.total) / (IDLE_CLONES - 1))} MiB RSS, ` +
            `${mib((last.anon - first.anon) / (IDLE_CLONES - 1))} MiB anonymous`,
        );
      } finally {
        for (const vm of vms) vm.stop();
        await Promise.all(runs);
        for (const vm of vms) vm.close();
      }
    } finally {
      for (const c of children) c.kill();
      await echo?.stop();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
);
