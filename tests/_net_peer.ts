/**
 * The host end of the network tests' TCP transfers, run inside the test's
 * network namespace (`ip netns exec NS deno run --allow-net _net_peer.ts ...`):
 *
 * - `sink ADDR PORT BYTES`: accepts one connection, reads until BYTES arrived
 *   (or EOF), closes, prints `BYTES_READ SHA256 MS` (MS: from the first byte
 *   to the last);
 * - `source ADDR PORT BYTES`: accepts one connection, writes BYTES
 *   pseudo-random bytes, closes, then waits for a connection on PORT + 1 (the
 *   guest's "I have it all") and prints `BYTES SHA256 MS` (MS: from the first
 *   connection to the second).
 *
 * Prints `LISTENING` once it listens, so the test knows when to start the
 * guest side.
 *
 * @module
 */

async function sha256(data: Uint8Array<ArrayBuffer>): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  return [...digest].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Deterministic bytes (xorshift32), so a run can be reproduced. */
function pattern(n: number): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(n);
  let x = 0x9e3779b9;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

if (import.meta.main) {
  const [mode, hostname, port, bytes] = Deno.args;
  const total = Number(bytes);
  const listener = Deno.listen({ hostname, port: Number(port) });
  const done = mode === "source" ? Deno.listen({ hostname, port: Number(port) + 1 }) : undefined;
  console.log("LISTENING");
  const conn = await listener.accept();
  listener.close();
  if (mode === "sink") {
    const data = new Uint8Array(total);
    let got = 0;
    let start = 0;
    try {
      while (got < total) {
        const n = await conn.read(data.subarray(got));
        if (n === null) break;
        if (got === 0) start = performance.now();
        got += n;
      }
    } catch (e) {
      // A reset: report what arrived (the caller compares the count).
      console.error(`sink: ${e}`);
    }
    const ms = performance.now() - start;
    conn.close();
    console.log(`${got} ${await sha256(data.subarray(0, got))} ${ms.toFixed(1)}`);
  } else {
    const data = pattern(total);
    const start = performance.now();
    for (let at = 0; at < total;) at += await conn.write(data.subarray(at));
    conn.close();
    (await done!.accept()).close();
    const ms = performance.now() - start;
    done!.close();
    console.log(`${total} ${await sha256(data)} ${ms.toFixed(1)}`);
  }
}
