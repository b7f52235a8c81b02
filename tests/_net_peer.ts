/**
 * The host end of the network tests' TCP transfers, run inside the test's
 * network namespace (`ip netns exec NS deno run --allow-net _net_peer.ts ...`):
 *
 * - `sink ADDR PORT BYTES`: accepts one connection, reads until BYTES arrived
 *   (or EOF), closes, prints `BYTES_READ SHA256`;
 * - `source ADDR PORT BYTES`: accepts one connection, writes BYTES
 *   pseudo-random bytes, closes, prints `BYTES SHA256`.
 *
 * Prints `LISTENING` once it listens, so the test knows when to start the
 * guest side.
 *
 * @module
 */

async function sha256(data: Uint8Array): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  return [...digest].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Deterministic bytes (xorshift32), so a run can be reproduced. */
function pattern(n: number): Uint8Array {
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
  console.log("LISTENING");
  const conn = await listener.accept();
  listener.close();
  if (mode === "sink") {
    const data = new Uint8Array(total);
    let got = 0;
    while (got < total) {
      const n = await conn.read(data.subarray(got));
      if (n === null) break;
      got += n;
    }
    conn.close();
    console.log(`${got} ${await sha256(data.subarray(0, got))}`);
  } else {
    const data = pattern(total);
    for (let at = 0; at < total;) at += await conn.write(data.subarray(at));
    conn.close();
    console.log(`${total} ${await sha256(data)}`);
  }
}
