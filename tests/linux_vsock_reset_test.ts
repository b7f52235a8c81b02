/**
 * virtio-vsock's transport reset with Debian's kernel: the host's
 * `vm.deviceControl(name, { op: "transport_reset" })` closes the host side of
 * a connection and posts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, Linux's driver
 * resets the guest's socket (its read fails with ECONNRESET), and new
 * connections work afterwards. Needs guest kernel code at hardware speed
 * (`[linux]`: VT-x/AMD-V, or kvmbox).
 */

import assert from "node:assert/strict";

import { linuxTest } from "./_helpers.ts";
import { bootLinuxShell } from "./_linux_shell.ts";

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

/** Reads one `\n`-terminated line, byte by byte. */
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

linuxTest(
  "a vsock transport reset closes the host side, Linux resets its socket, and new connections work",
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "denovisor-vsock-reset-" });
    const path = `${dir}/v.sock`;
    try {
      const peer = await buildPeer(dir);
      await using guest = await bootLinuxShell({
        devices: [{ kind: "vsock", cid: 3, path }],
        files: [{ path: "bin/vsock_peer", mode: 0o755, data: peer }],
      });
      const { sh, shell, vm } = guest;
      const name = vm.devices().pci.find((p) => p.name.startsWith("vsock"))?.name;
      assert.ok(name, JSON.stringify(vm.devices().pci));
      await sh("mkdir -p /tmp");

      // A host program connected to a guest listener, bytes flowing.
      shell.send("vsock_peer recv 5010 > /tmp/recv.out 2> /tmp/recv.err &\n");
      await sh("until grep -q VSOCK-READY /tmp/recv.err 2>/dev/null; do sleep 0.1; done");
      const conn = await Deno.connect({ transport: "unix", path });
      await conn.write(new TextEncoder().encode("CONNECT 5010\n"));
      assert.match(await readLine(conn), /^OK \d+\n$/);
      await conn.write(new TextEncoder().encode("before the reset\n"));
      await sh("until grep -q before /tmp/recv.out; do sleep 0.1; done");

      const answer = vm.deviceControl(name, { op: "transport_reset" }) as {
        closed: number;
        event: string;
      };
      assert.deepEqual(answer, { closed: 1, event: "posted" });
      // The host side is closed...
      const rest = new Uint8Array(64);
      assert.equal(await conn.read(rest), null);
      conn.close();
      // ...and the guest's socket was reset by its driver (without the
      // event it would wait for more forever: the device sends it nothing).
      const err = await sh("wait; cat /tmp/recv.err");
      assert.match(err, /vsock_peer: receiving: Connection reset by peer/, err);

      // A new connection after the reset, guest to host.
      using listener = Deno.listen({ transport: "unix", path: `${path}_5011` });
      const received = (async () => {
        const c = await listener.accept();
        const line = await readLine(c);
        c.close();
        return line;
      })();
      received.catch(() => {});
      const out = await sh("echo after the reset | vsock_peer send 5011; echo SENT $?");
      assert.match(out, /^SENT 0$/m, out);
      assert.equal(await received, "after the reset\n");

      await guest.powerOff();
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
);
