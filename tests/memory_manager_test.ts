// The overcommit policy against simulated guests: each answers its balloon's
// statistics the way Linux's virtio_balloon does (available memory shrinks as
// the balloon and the workload grow; the balloon follows the target by the
// next statistics update). Pure: no VM, no /dev/kvm. The Linux test in
// linux_balloon_test.ts runs the same manager over real guests.

import assert from "node:assert/strict";
import {
  type BalloonControl,
  type BalloonStats,
  DenovisorError,
  MemoryManager,
  parseBalloonStats,
} from "../mod.ts";

const MIB = 1 << 20;

class SimGuest implements BalloonControl {
  target = 0;
  actual = 0;
  updates = 0;
  constructor(readonly memoryMiB: number, public usedMiB: number) {}
  setTarget(mib: number): BalloonStats {
    this.target = mib;
    return this.#report();
  }
  stats(): BalloonStats {
    // The driver reaches the target between two statistics updates.
    const r = this.#report();
    this.actual = this.target;
    this.updates++;
    return r;
  }
  #report(): BalloonStats {
    const available = Math.max(0, this.memoryMiB - this.actual - this.usedMiB);
    return parseBalloonStats({
      targetMib: this.target,
      targetPages: this.target * 256,
      actualMib: this.actual,
      actualPages: this.actual * 256,
      stats: {
        availableMemory: available * MIB,
        freeMemory: available * MIB,
        totalMemory: (this.memoryMiB - this.actual) * MIB,
      },
      statsUpdates: this.updates,
      inflatedPages: 0,
      deflatedPages: 0,
      reportedBytes: 0,
    });
  }
}

Deno.test("the manager inflates idle guests until the guests fit the host budget", () => {
  const guests = ["a", "b", "c"].map((name) => ({ name, sim: new SimGuest(512, 40) }));
  const manager = new MemoryManager(
    guests.map(({ name, sim }) => ({ name, memoryMiB: 512, balloon: sim })),
    { hostBudgetMiB: 1024, stepMiB: 64 },
  );
  // The first statistics are not in yet: nothing is decided.
  assert.deepEqual(manager.step(), []);
  assert.equal(manager.metrics().guests.a.state, "unknown");
  for (let i = 0; i < 10; i++) manager.step();
  const m = manager.metrics();
  assert.ok(m.committedMiB <= 1024, `committed ${m.committedMiB}`);
  assert.ok(m.inflations >= 8, `inflations ${m.inflations}`);
  assert.equal(m.deflations, 0);
  assert.equal(m.reclaimedMiB, 512);
  for (const d of m.decisions) {
    assert.equal(d.action, "inflate");
    assert.equal(d.reason, "over budget");
    assert.ok(d.toMiB - d.fromMiB <= 64);
  }
  // Every guest keeps more than the high water mark available.
  for (const { sim } of guests) assert.ok(512 - sim.target - sim.usedMiB >= 128);
});

Deno.test("a busy guest gets memory back from idle ones, under the budget", () => {
  const sims = {
    idle1: new SimGuest(512, 40),
    idle2: new SimGuest(512, 40),
    busy: new SimGuest(512, 40),
  };
  const manager = new MemoryManager(
    Object.entries(sims).map(([name, sim]) => ({ name, memoryMiB: 512, balloon: sim })),
    { hostBudgetMiB: 1024, lowWaterMiB: 64, highWaterMiB: 128, stepMiB: 64 },
  );
  for (let i = 0; i < 12; i++) manager.step();
  const before = { ...Object.fromEntries(Object.entries(sims).map(([k, s]) => [k, s.target])) };
  assert.ok(before.busy > 0, "the busy guest's balloon took some of its memory first");
  // The workload grows until the guest has almost nothing available.
  sims.busy.usedMiB = 512 - sims.busy.target - 16;
  for (let i = 0; i < 20; i++) {
    manager.step();
    assert.ok(manager.metrics().committedMiB <= 1024);
  }
  const m = manager.metrics();
  assert.ok(sims.busy.target < before.busy, `busy target ${before.busy} -> ${sims.busy.target}`);
  assert.ok(
    sims.idle1.target + sims.idle2.target > before.idle1 + before.idle2,
    "the idle guests gave",
  );
  assert.ok(
    512 - sims.busy.actual - sims.busy.usedMiB >= 64,
    "the busy guest is no longer starved",
  );
  assert.ok(m.deflations > 0 && m.grantedMiB > 0);
  assert.ok(m.decisions.some((d) => d.guest !== "busy" && /gives \d+ MiB to busy/.test(d.reason)));
  assert.ok(m.decisions.some((d) => d.guest === "busy" && d.action === "deflate"));
  // Idle guests never drop below the high water mark to pay for it.
  for (const s of [sims.idle1, sims.idle2]) assert.ok(512 - s.target - s.usedMiB >= 128);
  assert.equal(m.guests.busy.state === "busy" || m.guests.busy.state === "steady", true);
});

Deno.test("bad manager options and bad balloon JSON are refused", () => {
  const g = { name: "a", memoryMiB: 64, balloon: new SimGuest(64, 0) };
  for (
    const opts of [
      { hostBudgetMiB: 0 },
      { hostBudgetMiB: 1.5 },
      { hostBudgetMiB: 64, lowWaterMiB: 200, highWaterMiB: 100 },
      { hostBudgetMiB: 64, stepMiB: -1 },
    ]
  ) {
    assert.throws(
      () => new MemoryManager([g], opts),
      (e) => e instanceof DenovisorError && e.code === "INVALID_ARGUMENT",
    );
  }
  assert.throws(() => new MemoryManager([g, g], { hostBudgetMiB: 64 }), /used twice/);
  assert.throws(
    () => parseBalloonStats({ targetMib: 1 }),
    (e) => e instanceof DenovisorError && e.code === "ABI_MISMATCH",
  );
  assert.throws(() =>
    parseBalloonStats({
      targetMib: 0,
      targetPages: 0,
      actualMib: 0,
      actualPages: 0,
      statsUpdates: 0,
      inflatedPages: 0,
      deflatedPages: 0,
      reportedBytes: 0,
      stats: { freeMemory: "x" },
    }), /stats.freeMemory/);
});

Deno.test("a step that throws is counted by start() and the manager keeps going", async () => {
  let fail = true;
  const sim = new SimGuest(256, 0);
  const flaky: BalloonControl = {
    setTarget: (mib) => sim.setTarget(mib),
    stats: () => {
      if (fail) {
        fail = false;
        throw new DenovisorError("CLOSED", "the VM is closed");
      }
      return sim.stats();
    },
  };
  using manager = new MemoryManager([{ name: "a", memoryMiB: 256, balloon: flaky }], {
    hostBudgetMiB: 128,
    intervalMs: 5,
  });
  manager.start();
  const deadline = Date.now() + 5000;
  while (manager.metrics().steps < 3 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 5));
  }
  manager.stop();
  const m = manager.metrics();
  assert.equal(m.errors, 1);
  assert.equal(m.lastError, "the VM is closed");
  assert.ok(m.steps >= 2);
});
