/**
 * virtio-balloon with Debian's kernel and its virtio_balloon driver: the
 * guest gives memory back when the host sets a target (the VMM's RSS drops by
 * at least 90 % of it), takes it back when the target falls (and can use it),
 * reports its statistics to TypeScript, and returns free memory on its own
 * through free page reporting. Last, a MemoryManager over three guests moves
 * memory from two idle ones to a busy one. Needs guest kernel code at
 * hardware speed (`[linux]`: VT-x/AMD-V, or kvmbox).
 */

import assert from "node:assert/strict";

import { MemoryManager } from "../mod.ts";
import { linuxTest } from "./_helpers.ts";
import {
  type BalloonGuest,
  balloonInitramfs,
  bootBalloonGuest,
  fillMemory,
  freeFill,
  MIB,
  poll,
  rssBytes,
  sh,
  touchFreeMemory,
} from "./_balloon.ts";

const SETTLE_MS = 300_000;

linuxTest(
  "a Linux guest inflates its balloon to the target, the VMM's RSS drops by 90 % of it, and deflating gives the memory back",
  async () => {
    const initrd = await balloonInitramfs();
    // Without free page reporting, so only the balloon returns memory.
    const g = await bootBalloonGuest(
      512,
      { freePageReporting: false, statsIntervalMs: 200 },
      initrd,
    );
    try {
      assert.match(await sh(g.shell, "ls /sys/bus/virtio/drivers/virtio_balloon"), /virtio\d+/);
      // Statistics reach TypeScript.
      const first = await poll("the first statistics", () => {
        const s = g.vm.balloon.stats();
        return s.statsUpdates > 0 && s.stats.totalMemory ? s : undefined;
      }, SETTLE_MS);
      const total0 = first.stats.totalMemory!;
      assert.ok(total0 > 400 * MIB && total0 <= 512 * MIB, `MemTotal ${total0}`);
      assert.ok(first.stats.freeMemory! > 0 && first.stats.availableMemory! > 0);

      // The guest touches (almost) all its free memory, then frees it: the host still holds it.
      const filled = await touchFreeMemory(g.shell, 16);
      assert.ok(filled > 300, `filled ${filled} MiB`);
      const rss0 = rssBytes();

      const TARGET = 256;
      const t0 = performance.now();
      g.vm.balloon.setTarget(TARGET);
      const inflated = await poll("the balloon to reach its target", () => {
        const s = g.vm.balloon.stats();
        return s.actualMib >= TARGET ? s : undefined;
      }, SETTLE_MS);
      const ms = performance.now() - t0;
      const dropped = rss0 - rssBytes();
      console.error(
        `inflate ${TARGET} MiB: ${ms.toFixed(0)} ms, RSS ${(rss0 / MIB).toFixed(0)} MiB -> ` +
          `${((rss0 - dropped) / MIB).toFixed(0)} MiB (dropped ${(dropped / MIB).toFixed(1)} MiB)`,
      );
      assert.ok(dropped >= 0.9 * TARGET * MIB, `RSS dropped by ${dropped / MIB} MiB`);
      assert.ok(inflated.inflatedPages >= TARGET * 256);
      assert.equal(inflated.targetMib, TARGET);
      // The guest sees less memory (fresh statistics, then /proc/meminfo).
      const smaller = await poll("statistics after inflating", () => {
        const s = g.vm.balloon.stats();
        return s.statsUpdates > inflated.statsUpdates && s.stats.totalMemory! <= total0 - 250 * MIB
          ? s
          : undefined;
      }, SETTLE_MS);
      assert.ok(smaller.stats.totalMemory! >= total0 - 260 * MIB);
      const memTotalKib = Number(
        /MemTotal:\s+(\d+)/.exec(await sh(g.shell, "cat /proc/meminfo"))?.[1],
      );
      assert.ok(Math.abs(memTotalKib * 1024 - smaller.stats.totalMemory!) < 4 * MIB);

      // Deflate: the balloon empties and the guest can allocate the memory again.
      g.vm.balloon.setTarget(0);
      const deflated = await poll("the balloon to empty", () => {
        const s = g.vm.balloon.stats();
        return s.actualMib === 0 ? s : undefined;
      }, SETTLE_MS);
      assert.ok(deflated.deflatedPages >= TARGET * 256);
      const ram1 = g.vm.memory().residentBytes;
      const again = await touchFreeMemory(g.shell, 16);
      assert.ok(again > filled - 32, `filled ${again} MiB after deflating, ${filled} before`);
      // The second fill may reach up to 32 MiB less than the first (the guest's own use
      // drifts), and those MiB may be ballooned ones: only what it touched must come back.
      // Measured on guest RAM alone (vm.memory(): mincore): the JavaScript heap's own
      // collections in between move the process's RSS by tens of MiB.
      const regrown = g.vm.memory().residentBytes - ram1;
      const expected = 0.9 * TARGET * MIB - Math.max(0, filled - again) * MIB;
      console.error(
        `deflate: refilled ${again} MiB (first fill ${filled}), RSS grew ${
          (regrown / MIB).toFixed(1)
        } MiB`,
      );
      assert.ok(
        regrown >= expected,
        `the guest's pages are backed by host memory again: RSS grew ${
          (regrown / MIB).toFixed(1)
        } MiB, expected ${(expected / MIB).toFixed(1)}`,
      );
      // Targets beyond the guest's RAM are refused before reaching the device.
      assert.throws(() => g.vm.balloon.setTarget(513), /balloon target/);
    } finally {
      await g.close();
    }
  },
);

linuxTest(
  "free page reporting returns memory the guest freed without any target",
  async () => {
    const initrd = await balloonInitramfs();
    const g = await bootBalloonGuest(512, { freePageReporting: true }, initrd);
    try {
      const rssBefore = rssBytes();
      // Filled and kept: the host holds the pages; then freed, and reported.
      const filled = await fillMemory(g.shell, 16);
      const rssFilled = rssBytes();
      assert.ok(rssFilled - rssBefore >= (filled / 2) * MIB, "the fill is backed by host memory");
      const before = g.vm.balloon.stats().reportedBytes;
      await freeFill(g.shell);
      // Linux reports free 2 MiB blocks a couple of seconds after they are freed.
      const reported = await poll(
        "free page reports",
        () => {
          const s = g.vm.balloon.stats();
          return s.reportedBytes - before >= (filled / 2) * MIB ? s : undefined;
        },
        SETTLE_MS,
        200,
      );
      const dropped = rssFilled - rssBytes();
      console.error(
        `reported ${((reported.reportedBytes - before) / MIB).toFixed(0)} MiB, RSS dropped ${
          (dropped / MIB).toFixed(0)
        } MiB after filling ${filled} MiB`,
      );
      assert.ok(dropped >= (filled / 2) * MIB, `RSS dropped by ${dropped / MIB} MiB`);
      assert.equal(reported.actualMib, 0, "no balloon was involved");
    } finally {
      await g.close();
    }
  },
);

linuxTest(
  "a MemoryManager moves memory from two idle guests to a busy one under a host budget",
  async () => {
    const initrd = await balloonInitramfs();
    const guests: { name: string; g: BalloonGuest }[] = [];
    try {
      for (const name of ["idle1", "idle2", "busy"]) {
        guests.push({
          name,
          g: await bootBalloonGuest(
            384,
            { freePageReporting: false, statsIntervalMs: 200 },
            initrd,
          ),
        });
      }
      using manager = new MemoryManager(
        guests.map(({ name, g }) => ({ name, memoryMiB: 384, balloon: g.vm.balloon })),
        {
          hostBudgetMiB: 3 * 384 - 256,
          lowWaterMiB: 64,
          highWaterMiB: 128,
          stepMiB: 64,
          intervalMs: 500,
        },
      );
      manager.start();
      // Over budget at first: the idle guests (all three, now) give until it fits.
      await poll(
        "the guests to fit the budget",
        () => {
          const m = manager.metrics();
          return m.committedMiB <= m.budgetMiB &&
              guests.every(({ g }) => {
                const s = g.vm.balloon.stats();
                return s.actualMib === s.targetMib;
              })
            ? m
            : undefined;
        },
        SETTLE_MS,
        200,
      );
      const busy = guests[2].g;
      const targetBefore = busy.vm.balloon.stats().targetMib;
      assert.ok(targetBefore > 0, "the busy guest gave memory while it was idle");
      const idleBefore = guests[0].g.vm.balloon.stats().targetMib +
        guests[1].g.vm.balloon.stats().targetMib;

      // The busy guest's workload takes all but 40 MiB of its available memory and keeps
      // it (less would leave the emulated guest thrashing in reclaim for minutes).
      await sh(
        busy.shell,
        `N=$(( $(sed -n 's/^MemAvailable: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo) / 1024 - 40 )); ` +
          `mount -t tmpfs -o size=400m work /mnt && dd if=/dev/zero of=/mnt/work bs=1M count=$N 2>/dev/null; echo $N`,
      );
      const m = await poll(
        "the busy guest to get memory back",
        () => {
          const m = manager.metrics();
          return m.guests.busy.targetMiB <= targetBefore - 64 ? m : undefined;
        },
        SETTLE_MS,
        200,
      );
      manager.stop();
      const idleAfter = m.guests.idle1.targetMiB + m.guests.idle2.targetMiB;
      console.error(JSON.stringify(m.decisions.slice(-8)));
      assert.ok(idleAfter > idleBefore, `idle balloons ${idleBefore} -> ${idleAfter} MiB`);
      assert.ok(m.committedMiB <= m.budgetMiB, `committed ${m.committedMiB} MiB`);
      assert.ok(m.decisions.some((d) => d.guest === "busy" && d.action === "deflate"));
      assert.ok(m.decisions.some((d) => /gives \d+ MiB to busy/.test(d.reason)));
      // The busy guest can use what it got: its balloon shrinks for real.
      await poll(
        "the busy guest's balloon to shrink",
        () => {
          const s = busy.vm.balloon.stats();
          return s.actualMib === s.targetMib && s.actualMib < targetBefore ? s : undefined;
        },
        SETTLE_MS,
        200,
      );
    } finally {
      for (const { g } of guests) await g.close();
    }
  },
);
