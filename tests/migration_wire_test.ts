/**
 * The migration stream's framing on the host (no KVM): frames round-trip
 * over a real socket, and every kind of damage is refused naming the frame.
 */

import assert from "node:assert/strict";
import { DenovisorError } from "../src/errors.ts";
import {
  crc32,
  encodeFrame,
  FRAME_HEADER_BYTES,
  FrameReader,
  jsonFrame,
  jsonOf,
  MAX_FRAME_BYTES,
  writeAll,
} from "../src/migration/wire.ts";

/** A source that hands out `bytes` in chunks of `step`. */
function chunked(bytes: Uint8Array, step = 7) {
  let at = 0;
  return {
    read(p: Uint8Array): Promise<number | null> {
      if (at >= bytes.length) return Promise.resolve(null);
      const n = Math.min(step, p.length, bytes.length - at);
      p.set(bytes.subarray(at, at + n));
      at += n;
      return Promise.resolve(n);
    },
  };
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

async function refusal(bytes: Uint8Array, pattern: RegExp, frames = 1): Promise<void> {
  const reader = new FrameReader(chunked(bytes));
  for (let i = 1; i < frames; i++) await reader.next();
  await assert.rejects(reader.next(), (e: unknown) => {
    assert.ok(e instanceof DenovisorError, String(e));
    assert.equal(e.code, "MIGRATION");
    assert.match(e.message, pattern);
    return true;
  });
}

Deno.test("crc32 matches the standard check value and zlib's results", () => {
  const text = new TextEncoder();
  assert.equal(crc32(text.encode("123456789")), 0xcbf43926);
  assert.equal(crc32(new Uint8Array()), 0);
  assert.equal(crc32(text.encode("The quick brown fox jumps over the lazy dog")), 0x414fa339);
  // Lengths around the 8-byte stride agree with a bytewise reference.
  const bytewise = (b: Uint8Array) => {
    let c = 0xffffffff;
    for (const x of b) {
      c ^= x;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    }
    return (c ^ 0xffffffff) >>> 0;
  };
  const data = Uint8Array.from({ length: 37 }, (_, i) => (i * 131 + 7) & 0xff);
  for (let n = 0; n <= data.length; n++) {
    assert.equal(crc32(data.subarray(0, n)), bytewise(data.subarray(0, n)), `length ${n}`);
  }
});

Deno.test("frames round-trip over a TCP connection in order", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr as Deno.NetAddr;
  const big = Uint8Array.from({ length: 3 << 20 }, (_, i) => (i * 2654435761) >>> 24);
  const sending = (async () => {
    using conn = await Deno.connect({ hostname: "127.0.0.1", port });
    await writeAll(conn, jsonFrame("hello", { version: 1 }));
    await writeAll(conn, encodeFrame("pages", big));
    await writeAll(conn, encodeFrame("state", new Uint8Array()));
  })();
  using conn = await listener.accept();
  listener.close();
  const reader = new FrameReader(conn);
  assert.deepEqual(jsonOf(await reader.expect("hello")), { version: 1 });
  const pages = await reader.expect("pages");
  assert.deepEqual(pages.payload, big);
  assert.equal((await reader.expect("state")).payload.length, 0);
  assert.equal(reader.count, 3);
  await sending;
  await assert.rejects(reader.next(), /ended before frame 4/);
});

Deno.test("a corrupt, cut, oversized or unknown frame is refused naming it", async () => {
  const good = jsonFrame("hello", { version: 1 });
  const pages = encodeFrame("pages", new Uint8Array(4096).fill(0xaa));
  // One bit flipped anywhere in the payload.
  for (const at of [FRAME_HEADER_BYTES, FRAME_HEADER_BYTES + 100, pages.length - 1]) {
    const bad = pages.slice();
    bad[at] ^= 0x10;
    await refusal(concat(good, bad), /frame 2 \(pages\): checksum mismatch/, 2);
  }
  // The checksum itself damaged.
  const badSum = pages.slice();
  badSum[9] ^= 1;
  await refusal(badSum, /frame 1 \(pages\): checksum mismatch/);
  // Cut in the header and in the payload.
  await refusal(pages.subarray(0, 5), /ended inside frame 1 \(header: 5 of 12 bytes\)/);
  await refusal(pages.subarray(0, 100), /ended inside frame 1 \(pages: 88 of 4096 bytes\)/);
  // An unknown kind, and nonzero reserved bytes.
  const unknown = good.slice();
  unknown[0] = 99;
  await refusal(unknown, /frame 1: not a migration frame \(kind byte 99\)/);
  const reserved = good.slice();
  reserved[2] = 1;
  await refusal(reserved, /frame 1: not a migration frame/);
  // A length over the limit is refused before anything is allocated.
  const huge = good.slice(0, FRAME_HEADER_BYTES);
  new DataView(huge.buffer).setUint32(4, MAX_FRAME_BYTES + 1, true);
  await refusal(huge, /frame 1 \(hello\): 67108865 bytes is over the 67108864-byte limit/);
  assert.throws(
    () => encodeFrame("pages", new Uint8Array(MAX_FRAME_BYTES + 1)),
    /over the 67108864-byte limit/,
  );
});

Deno.test("expect() names the wrong kind and turns an abort into its message", async () => {
  const reader = new FrameReader(chunked(concat(
    jsonFrame("ready", {}),
    jsonFrame("abort", { message: "the target has no room for 4096 MiB" }),
    jsonFrame("abort", { nothing: 1 }),
  )));
  await assert.rejects(reader.expect("hello"), /frame 1: expected hello, got ready/);
  await assert.rejects(
    reader.expect("running"),
    /the other side aborted: the target has no room for 4096 MiB/,
  );
  await assert.rejects(reader.expect("running"), /aborted: \(no reason given\)/);
});

Deno.test("jsonOf refuses what is not a JSON object", () => {
  const frame = (text: string) => ({
    kind: "hello" as const,
    payload: new TextEncoder().encode(text),
  });
  assert.deepEqual(jsonOf(frame('{"a":1}')), { a: 1 });
  for (const text of ["", "[1]", "null", "3", "{", '"x"']) {
    assert.throws(() => jsonOf(frame(text)), /the hello frame is not (JSON|a JSON object)/, text);
  }
  assert.throws(
    () => jsonOf({ kind: "hello", payload: new Uint8Array([0x7b, 0xff, 0x7d]) }),
    /not JSON/,
  );
});
