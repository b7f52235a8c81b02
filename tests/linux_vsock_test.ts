/**
 * virtio-vsock with Debian's kernel and Firecracker's Unix-socket host side:
 * the guest (`guest/vsock/vsock_peer.c`, built here with `gcc -static`: busybox
 * has no AF_VSOCK) reaches host listeners on `PATH_<port>`, host programs
 * reach guest listeners through `PATH` with `CONNECT <port>`; 64 MiB each way
 * checked by sha256, many connections at once, a guest and a host that close
 * mid-stream. Needs guest kernel code at hardware speed (`[linux]`: VT-x/AMD-V,
 * or kvmbox).
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";

import { linuxTest } from "./_helpers.ts";
import { bootLinuxShell } from "./_linux_shell.ts";

const GUEST_CID = 3;
const BIG = 64 << 20;
const SOURCE = new URL("../guest/vsock/vsock_peer.c", import.meta.url).pathname;

/** Builds the guest program with the host's gcc. */
async function buildPeer(dir: string): Promise<Uint8Array> {
  const out = `${dir}/vsock_peer`;
  const gcc = await new Deno.Command("gcc", {
    args: ["-static", "-O2", "-Wall", "-o", out, SOURCE],
    stderr: "piped",
  }).output();
  assert.equal(gcc.code, 0, new TextDecoder().decode(gcc.stderr));
  return await Deno.readFile(out);
}

/** Reads a Unix stream to its end; the bytes and their sha256. */
async function readAll(conn: Deno.Conn): Promise<{ bytes: number; sha256: string }> {
  const hash = createHash("sha256");
  let bytes = 0;
  const buf = new Uint8Array(256 << 10);
  for (;;) {
    const n = await conn.read(buf);
    if (n === null) break;
    hash.update(buf.subarray(0, n));
    bytes += n;
  }
  return { bytes, sha256: hash.digest("hex") };
}

/** Random bytes (getRandomValues takes 64 KiB at a time). */
function randomBytes(n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let at = 0; at < n; at += 65536) crypto.getRandomValues(out.subarray(at, at + 65536));
  return out;
}

/** Reads one `\n`-terminated line, byte by byte (nothing after it is taken). */
async function readLine(conn: Deno.Conn): Promise<string> {
  const one = new Uint8Array(1);
  let line = "";
  while (!line.endsWith("\n")) {
    const n = await conn.read(one);
    if (n === null) break;
    line += String.fromCharCode(one[0]);
  }
  return line;
}

/** Connects to the guest's `port` through `path` (Firecracker's `CONNECT`). */
async function connectGuest(path: string, port: number): Promise<Deno.UnixConn> {
  const conn = await Deno.connect({ transport: "unix", path });
  await conn.write(new TextEncoder().encode(`CONNECT ${port}\n`));
  const ok = await readLine(conn);
  assert.match(ok, /^OK \d+\n$/, `the answer to CONNECT ${port}`);
  const hostPort = Number(ok.slice(3));
  assert.ok(hostPort >= 2 ** 30 && hostPort < 2 ** 31, ok);
  return conn;
}

/** The vsock device's own listing (`vm.devices()`). */
function vsockDetails(
  vm: { devices(): { pci: { name: string; details: Record<string, unknown> | null }[] } },
): { connections: unknown[]; opened: number; bytesToHost: number; bytesToGuest: number } {
  const f = vm.devices().pci.find((p) => p.name.startsWith("vsock"));
  assert.ok(f?.details, JSON.stringify(vm.devices().pci));
  return f.details.device as ReturnType<typeof vsockDetails>;
}

linuxTest(
  "vsock carries streams both ways between Linux and host Unix sockets, many at once, and survives either end closing mid-stream",
  async (t) => {
    const dir = await Deno.makeTempDir({ prefix: "denovisor-vsock-" });
    const path = `${dir}/v.sock`;
    try {
      const peer = await buildPeer(dir);
      await using guest = await bootLinuxShell({
        devices: [{ kind: "vsock", cid: GUEST_CID, path }],
        files: [{ path: "bin/vsock_peer", mode: 0o755, data: peer }],
      });
      const { sh, shell, vm } = guest;
      assert.match(await sh("cat /sys/bus/virtio/devices/*/device"), /0x0013/);
      await sh("mkdir -p /tmp");

      await t.step("guest to host: 64 MiB arrive intact on PATH_5000", async () => {
        using listener = Deno.listen({ transport: "unix", path: `${path}_5000` });
        const received = (async () => {
          const conn = await listener.accept();
          const got = await readAll(conn);
          await conn.write(new TextEncoder().encode(`RECEIVED ${got.bytes}\n`));
          conn.close();
          return got;
        })();
        received.catch(() => {}); // awaited below; a failure before then is the step's
        const out = await sh(
          `head -c ${BIG} /dev/urandom > /tmp/g2h && sha256sum /tmp/g2h && ` +
            "vsock_peer send 5000 < /tmp/g2h && rm /tmp/g2h",
          600_000,
        );
        const got = await received;
        assert.equal(got.bytes, BIG);
        assert.match(out, new RegExp(`^${got.sha256}  /tmp/g2h$`, "m"), out);
        assert.match(out, new RegExp(`^RECEIVED ${BIG}$`, "m"));
      });

      await t.step("host to guest: 64 MiB through CONNECT arrive intact", async () => {
        shell.send("(vsock_peer recv 5001 | sha256sum > /tmp/h2g.sum) &\n");
        await shell.waitFor("VSOCK-READY 5001", { timeoutMs: 60_000 });
        const data = randomBytes(BIG);
        const conn = await connectGuest(path, 5001);
        for (let at = 0; at < data.length;) at += await conn.write(data.subarray(at));
        conn.close();
        await shell.waitFor(`VSOCK-RECEIVED ${BIG}`, { timeoutMs: 600_000 });
        const sum = await sh("wait; cat /tmp/h2g.sum");
        const want = createHash("sha256").update(data).digest("hex");
        assert.match(sum, new RegExp(`^${want}  -$`, "m"));
      });

      await t.step("32 guest connections at once to one host echo server", async () => {
        using listener = Deno.listen({ transport: "unix", path: `${path}_5002` });
        let accepted = 0;
        const server = (async () => {
          const echoes: Promise<void>[] = [];
          for (; accepted < 32; accepted++) {
            const conn = await listener.accept();
            echoes.push(conn.readable.pipeTo(conn.writable).catch(() => {}));
          }
          await Promise.all(echoes);
        })();
        server.catch(() => {});
        const out = await sh("vsock_peer multi 5002 32 262144", 600_000);
        assert.match(out, /^MULTI OK 32 262144$/m);
        await server;
        assert.equal(accepted, 32);
      });

      await t.step("16 host connections at once to one guest echo server", async () => {
        shell.send("vsock_peer echo 5003 16 > /tmp/echo.out &\n");
        await shell.waitFor("VSOCK-READY 5003", { timeoutMs: 60_000 });
        const conns = await Promise.all(
          Array.from({ length: 16 }, () => connectGuest(path, 5003)),
        );
        await Promise.all(conns.map(async (conn, i) => {
          const data = randomBytes(256 << 10);
          const writing = (async () => {
            for (let at = 0; at < data.length;) at += await conn.write(data.subarray(at));
            await conn.closeWrite();
          })();
          const back = await readAll(conn);
          await writing;
          conn.close();
          assert.equal(back.bytes, data.length, `connection ${i}`);
          assert.equal(back.sha256, createHash("sha256").update(data).digest("hex"));
        }));
        assert.match(await sh("wait; cat /tmp/echo.out"), /^ECHO DONE 16 FAILED 0$/m);
      });

      await t.step("a guest that closes mid-stream resets the host's writes", async () => {
        using listener = Deno.listen({ transport: "unix", path: `${path}_5004` });
        const host = (async () => {
          const conn = await listener.accept();
          const chunk = new Uint8Array(1 << 20).fill(0x68);
          let sent = 0;
          try {
            for (let i = 0; i < 256; i++) sent += await conn.write(chunk);
            return { sent, error: "" };
          } catch (e) {
            return { sent, error: e instanceof Error ? e.name : String(e) };
          } finally {
            conn.close();
          }
        })();
        host.catch(() => {});
        const out = await sh("vsock_peer partial 5004 100000");
        assert.match(out, /^PARTIAL READ 100000$/m);
        const result = await host;
        assert.ok(result.error !== "", `the host wrote all ${result.sent} bytes`);
        assert.ok(result.sent < 256 << 20, JSON.stringify(result));
      });

      await t.step("a host that closes mid-stream stops the guest's writes", async () => {
        using listener = Deno.listen({ transport: "unix", path: `${path}_5005` });
        const host = (async () => {
          const conn = await listener.accept();
          const buf = new Uint8Array(64 << 10);
          let got = 0;
          while (got < 1 << 20) {
            const n = await conn.read(buf);
            if (n === null) break;
            got += n;
          }
          conn.close();
          return got;
        })();
        host.catch(() => {});
        const out = await sh("vsock_peer flood 5005", 600_000);
        const got = await host;
        assert.ok(got >= 1 << 20, `the host read ${got}`);
        const m = out.match(/^FLOOD STOPPED (\d+) (\w+)$/m);
        assert.ok(m, out);
        assert.ok(Number(m[1]) >= got, out);
        assert.match(m[2], /^(EPIPE|ECONNRESET)$/, out);
      });

      await t.step("no connection lingers, and the device counted the traffic", async () => {
        // Closed connections finish with the guest's RST or ours.
        for (let i = 0; i < 100 && vsockDetails(vm).connections.length > 0; i++) {
          await new Promise((r) => setTimeout(r, 100));
        }
        const d = vsockDetails(vm);
        assert.deepEqual(d.connections, [], JSON.stringify(d));
        assert.ok(d.opened >= 1 + 1 + 32 + 16 + 2, JSON.stringify(d));
        assert.ok(d.bytesToHost >= BIG && d.bytesToGuest >= BIG, JSON.stringify(d));
      });

      await guest.powerOff();
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
);
