/**
 * The cost of a rate limiter that never throttles: a runtime guest
 * (`tests/guests/virtio_blk.c`, mode 3) reads its disk's first 64 KiB again and
 * again for a few seconds, once on a disk without a limiter and once on one
 * whose buckets are far too large to empty (1 TiB/s, 1 G requests/s), in the
 * same process, alternating. The result is the limited disk's bytes per second
 * as a ratio of the unlimited one's (1.0: the check costs nothing visible).
 *
 *   deno run -A bench/rate_limit_bench.ts [--rounds N] [--seconds S]
 *   ../shared/kvmbox/kvmbox --timeout 900 -- /usr/bin/deno run -A bench/rate_limit_bench.ts
 *
 * @module
 */

import { parseArgs } from "node:util";
import { type RateLimiter, Vm } from "../mod.ts";
import { buildRuntimeGuest } from "../src/build/workload_build.ts";

const RAM_MIB = 16;
const HUGE: RateLimiter = {
  bandwidth: { size: 2 ** 40, refillTimeMs: 1000 },
  ops: { size: 2 ** 30, refillTimeMs: 1000 },
};

async function readRate(
  guest: Uint8Array,
  image: string,
  seconds: number,
  rateLimiter?: RateLimiter,
): Promise<{ bytesPerSecond: number; throttled: number }> {
  using vm = await Vm.create({
    memoryMiB: RAM_MIB,
    interrupts: true,
    devices: [{ kind: "block", path: image, ...(rateLimiter ? { rateLimiter } : {}) }],
  });
  vm.load(guest, {
    mode: "long",
    arguments: [3, RAM_MIB << 20],
    stack: (RAM_MIB << 20) - 0x1000,
  });
  const counters = () => {
    const f = vm.devices().pci.find((p) => p.name === "block0");
    return (f?.details as { device: { bytesRead: number; throttled: number } }).device;
  };
  const run = vm.run({ timeoutMs: 600_000 });
  // Start counting once the guest reads (its boot is not what is measured).
  while (counters().bytesRead === 0) await new Promise((r) => setTimeout(r, 20));
  const start = counters().bytesRead;
  const t0 = performance.now();
  await new Promise((r) => setTimeout(r, seconds * 1000));
  const end = counters();
  const elapsed = (performance.now() - t0) / 1000;
  vm.stop();
  await run;
  return { bytesPerSecond: (end.bytesRead - start) / elapsed, throttled: end.throttled };
}

if (import.meta.main) {
  const { values } = parseArgs({
    options: {
      rounds: { type: "string", default: "3" },
      seconds: { type: "string", default: "3" },
    },
  });
  const rounds = Number(values.rounds);
  const seconds = Number(values.seconds);
  const guest = await buildRuntimeGuest(new URL("../tests/guests/virtio_blk.c", import.meta.url));
  const dir = await Deno.makeTempDir({ prefix: "denovisor-rate-bench-" });
  try {
    const image = `${dir}/disk.img`;
    await Deno.writeFile(image, new Uint8Array(1 << 20));
    const ratios = [];
    for (let i = 0; i < rounds; i++) {
      const plain = await readRate(guest, image, seconds);
      const limited = await readRate(guest, image, seconds, HUGE);
      if (limited.throttled !== 0) throw new Error("the huge limiter throttled");
      const ratio = limited.bytesPerSecond / plain.bytesPerSecond;
      ratios.push(ratio);
      console.log(
        `round ${i + 1}: unlimited ${(plain.bytesPerSecond / 2 ** 20).toFixed(1)} MiB/s, ` +
          `limited (never throttling) ${(limited.bytesPerSecond / 2 ** 20).toFixed(1)} MiB/s, ` +
          `ratio ${ratio.toFixed(3)}`,
      );
    }
    ratios.sort((a, b) => a - b);
    console.log(
      `median ratio limited/unlimited: ${ratios[Math.floor(ratios.length / 2)].toFixed(3)}`,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}
