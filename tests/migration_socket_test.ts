/**
 * The core's migration socket on the host (no KVM): its frames are
 * `wire.ts`'s in both directions, and what it reads is checked in the core —
 * a flipped byte, a pages frame with no VM to take it, an oversized length,
 * a silent peer and an abort are refused with their reason.
 */

import assert from "node:assert/strict";
import type { DenovisorError } from "../src/errors.ts";
import { encodeFrame, FrameReader, jsonFrame, jsonOf, writeAll } from "../src/migration/wire.ts";
import { MigrationListener, MigrationSocket } from "../src/migration/socket.ts";

/** A core socket connected to a Deno peer on loopback TCP. */
async function pair(): Promise<{ core: MigrationSocket; peer: Deno.Conn; close(): void }> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const accepted = listener.accept();
  const core = await MigrationSocket.connect(
    { transport: "tcp", hostname: "127.0.0.1", port },
    5000,
  );
  const peer = await accepted;
  listener.close();
  return {
    core,
    peer,
    close() {
      core.close();
      try {
        peer.close();
      } catch {
        // closed already
      }
    },
  };
}

Deno.test("frames the core writes are wire.ts frames, and the core reads wire.ts frames", async () => {
  const p = await pair();
  try {
    await p.core.sendJson("hello", { version: 1, big: "x".repeat(100_000) }, 5000);
    const hello = await new FrameReader(p.peer).expect("hello");
    assert.equal(jsonOf(hello).version, 1);
    await writeAll(p.peer, jsonFrame("ready", { ok: true }));
    const ready = await p.core.expect(5000, ["ready"]);
    assert.equal(ready.kind, "ready");
    assert.deepEqual(JSON.parse(new TextDecoder().decode(ready.payload)), { ok: true });
  } finally {
    p.close();
  }
});

Deno.test("the core refuses a flipped byte, pages with no VM, an oversized frame and an abort", async () => {
  const cases: [string, Uint8Array, RegExp, string][] = [
    [
      "flipped",
      (() => {
        const f = jsonFrame("ready", { ok: true });
        f[14] ^= 0x40;
        return f;
      })(),
      /checksum/,
      "INVALID_ARGUMENT",
    ],
    [
      "pages",
      encodeFrame("pages", new Uint8Array(4104)),
      /before the VM was built/,
      "INVALID_ARGUMENT",
    ],
    [
      "oversized",
      (() => {
        const f = jsonFrame("ready", {});
        new DataView(f.buffer).setUint32(4, 0xffff_ff00, true);
        return f;
      })(),
      /over the \d+-byte limit/,
      "INVALID_ARGUMENT",
    ],
    [
      "abort",
      jsonFrame("abort", { message: "no room here" }),
      /aborted: no room here/,
      "MIGRATION",
    ],
    ["cut", jsonFrame("ready", { ok: true }).subarray(0, 13), /ended inside a frame payload/, "IO"],
  ];
  for (const [name, bytes, message, code] of cases) {
    const p = await pair();
    try {
      await writeAll(p.peer, bytes);
      if (name === "cut") p.peer.closeWrite();
      await assert.rejects(
        p.core.expect(5000, ["ready"]),
        (e: DenovisorError) => e.code === code && message.test(e.message),
        name,
      );
    } finally {
      p.close();
    }
  }
});

Deno.test("a silent peer times out, and a listener accepts one source", async () => {
  const p = await pair();
  try {
    const t0 = performance.now();
    await assert.rejects(
      p.core.expect(200, ["ready"]),
      (e: DenovisorError) => e.code === "TIMEOUT",
    );
    assert.ok(performance.now() - t0 < 5000);
  } finally {
    p.close();
  }
  using listener = await MigrationListener.listen({
    transport: "tcp",
    hostname: "127.0.0.1",
    port: 0,
  });
  assert.ok(listener.port > 0);
  await assert.rejects(listener.accept(50), (e: DenovisorError) => e.code === "TIMEOUT");
  const conn = Deno.connect({ hostname: "127.0.0.1", port: listener.port });
  using accepted = await listener.accept(5000);
  using peer = await conn;
  await accepted.sendJson("running", {}, 5000);
  assert.equal((await new FrameReader(peer).expect("running")).kind, "running");
});
