/**
 * The host side of `tests/guests/virtio_vsock.c` over the vsock device's Unix
 * sockets, shared by the device test (a `Vm` in this process) and the jail
 * test (a `run --jail` child): what the host sends and expects, and the
 * checks on what it saw.
 */

import assert from "node:assert/strict";

/** The patterns and sizes of virtio_vsock.c. */
export const G2H_BYTES = 320 << 10;
export const REPLY_BYTES = 48 << 10;
export const H2G_BYTES = 40 << 10;
const ECHO_XOR = 0x3c;
const vsockGuestByte = (i: number) => (i * 7 + Math.floor(i / 1024)) & 0xff;
const replyByte = (i: number) => (i * 11 + 3) & 0xff;

/** Reads `conn` until EOF, at most `limit` bytes (more fails the test). */
async function readAll(conn: Deno.Conn, limit: number): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  let total = 0;
  const buf = new Uint8Array(64 << 10);
  for (;;) {
    const n = await conn.read(buf);
    if (n === null) break;
    chunks.push(buf.slice(0, n));
    total += n;
    assert.ok(total <= limit, `more than ${limit} bytes`);
  }
  const all = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    all.set(c, at);
    at += c.length;
  }
  return all;
}

/** Reads exactly `n` bytes (EOF before that fails the test). */
async function readExactly(conn: Deno.Conn, n: number): Promise<Uint8Array> {
  const all = new Uint8Array(n);
  let at = 0;
  while (at < n) {
    const got = await conn.read(all.subarray(at));
    assert.notEqual(got, null, `EOF after ${at} of ${n} bytes`);
    at += got!;
  }
  return all;
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let at = 0; at < bytes.length;) at += await conn.write(bytes.subarray(at));
}

function firstMismatch(bytes: Uint8Array, expected: (i: number) => number): number {
  return bytes.findIndex((b, i) => b !== expected(i));
}

/** What the host saw of the guest, for {@link checkHostSide}. */
export interface VsockHostSide {
  fromGuest: Uint8Array;
  rest: Uint8Array;
  refusal: Uint8Array;
  back: Uint8Array;
  sent: Uint8Array;
}

/**
 * Plays the host's part: accepts the guest's connection on `listener` (its
 * `PATH_P`), reads the guest's bytes, replies and closes; then connects to
 * `path` twice, `CONNECT guestPort+1` (refused) and `connect guestPort`
 * (echoed back xored).
 */
export async function vsockHostSide(
  listener: Deno.Listener,
  path: string,
  guestPort: number,
): Promise<VsockHostSide> {
  // Guest -> host: all the guest's bytes, then the reply, then our EOF.
  const conn = await listener.accept();
  const fromGuest = await readExactly(conn, G2H_BYTES);
  const reply = new Uint8Array(REPLY_BYTES).map((_, i) => replyByte(i));
  await writeAll(conn, reply);
  await conn.closeWrite();
  const rest = await readAll(conn, 0); // the guest's close is EOF here
  conn.close();

  // Host -> guest: a port nobody listens on is refused (no OK line)...
  const refused = await Deno.connect({ transport: "unix", path });
  await writeAll(refused, new TextEncoder().encode(`CONNECT ${guestPort + 1}\n`));
  const refusal = await readAll(refused, 64);
  refused.close();
  // ...the guest's listening port answers OK and echoes.
  const stream = await Deno.connect({ transport: "unix", path });
  await writeAll(stream, new TextEncoder().encode(`connect ${guestPort}\n`));
  const sent = new Uint8Array(H2G_BYTES).map((_, i) => (i * 5 + 1) & 0xff);
  const reading = readAll(stream, 64 + H2G_BYTES);
  await writeAll(stream, sent);
  await stream.closeWrite();
  const back = await reading;
  stream.close();
  return { fromGuest, rest, refusal, back, sent };
}

/**
 * Checks what the host saw: every guest byte in order, nothing after its
 * close, the refused CONNECT closed without a byte, and the accepted one read
 * `OK <hostport>` and got every byte back, xored. Returns that host port.
 */
export function checkHostSide(seen: VsockHostSide): number {
  assert.equal(firstMismatch(seen.fromGuest, vsockGuestByte), -1, "the guest's bytes");
  assert.equal(seen.rest.length, 0);
  assert.equal(seen.refusal.length, 0, new TextDecoder().decode(seen.refusal));
  const text = new TextDecoder("latin1").decode(seen.back);
  const newline = text.indexOf("\n");
  const ok = /^OK (\d+)$/.exec(text.slice(0, newline));
  assert.ok(ok, `the answer to CONNECT: ${JSON.stringify(text.slice(0, 64))}`);
  const echoed = seen.back.subarray(newline + 1);
  assert.equal(echoed.length, H2G_BYTES);
  assert.equal(firstMismatch(echoed, (i) => seen.sent[i] ^ ECHO_XOR), -1, "the echo");
  return Number(ok[1]);
}
