/**
 * The QEMU side of the snapshot and migration benches: the QMP client against
 * a real QEMU (`-M none`, no KVM needed: these run on any host), the tables'
 * `n/a` for denovisor's side while it is not built, and, with KVM (`[linux]`:
 * inside kvmbox on a host without it), one save/restore and one live migration
 * of a small Linux guest that really complete with sane figures.
 */

import assert from "node:assert/strict";
import { DenovisorError } from "../src/errors.ts";
import { QmpClient } from "../bench/_qmp.ts";
import { QEMU } from "../bench/_qemu.ts";
import { measureQemuLiveMigration, measureQemuSnapshot } from "../bench/_qemu_migrate.ts";
import {
  attempt,
  benchGuest,
  cell,
  measureDenovisorSnapshot,
  ratioCell,
} from "../bench/_snapshot_compare.ts";
import { linuxTest } from "./_helpers.ts";

/**
 * The small guest: Debian's kernel needs 80 MiB (its `init_size`, see README, Linux guests); a
 * 64 MiB QEMU guest stopped printing after SeaBIOS's "Probing EDD" and never reached its shell.
 */
const SMALL_MIB = 128;

/** A QEMU without a machine or KVM, with its QMP socket in `dir`. */
function bareQemu(dir: string): { child: Deno.ChildProcess; socket: string } {
  const socket = `${dir}/qmp.sock`;
  const child = new Deno.Command(QEMU, {
    args: [
      "-M",
      "none",
      "-nodefaults",
      "-display",
      "none",
      "-qmp",
      `unix:${socket},server=on,wait=off`,
    ],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  return { child, socket };
}

Deno.test("the QMP client negotiates, runs commands, receives timestamped events and reports QEMU's errors", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dv-qmp-" });
  const { child, socket } = bareQemu(dir);
  try {
    using qmp = await QmpClient.connect(socket, { timeoutMs: 30_000 });
    assert.match(qmp.greeting.version, /^\d+\.\d+\.\d+$/);
    const status = await qmp.execute<{ status: string; running: boolean }>("query-status");
    assert.equal(status.running, true);
    const before = performance.timeOrigin + performance.now();
    await qmp.execute("stop");
    const stop = await qmp.waitEvent("STOP", { timeoutMs: 10_000 });
    const after = performance.timeOrigin + performance.now();
    // QEMU's timestamp is the host's real-time clock, the one the benches compare with.
    assert.ok(
      stop.timestampMs >= before - 50 && stop.timestampMs <= after + 50,
      `${stop.timestampMs}`,
    );
    assert.equal((await qmp.execute<{ status: string }>("query-status")).status, "paused");
    await assert.rejects(
      qmp.execute("no-such-command"),
      (e) =>
        e instanceof DenovisorError && e.code === "DEVICE" && /CommandNotFound/.test(e.message),
    );
    await assert.rejects(
      qmp.waitEvent("RESUME", { timeoutMs: 100 }),
      (e) => e instanceof DenovisorError && e.code === "TIMEOUT",
    );
    await qmp.execute("cont");
    await qmp.waitEvent("RESUME", { timeoutMs: 10_000 });
    await qmp.execute("quit").catch(() => {}); // QEMU may close before replying
    await qmp.ended;
    assert.equal(qmp.closed, true);
    await assert.rejects(
      qmp.execute("query-status"),
      (e) => e instanceof DenovisorError && e.code === "CLOSED",
    );
    assert.equal((await child.status).code, 0);
  } finally {
    try {
      child.kill("SIGKILL");
    } catch {
      // It quit.
    }
    await child.status;
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the QMP client gives up on a socket nobody serves", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dv-qmp-" });
  try {
    await assert.rejects(
      QmpClient.connect(`${dir}/none.sock`, { timeoutMs: 200 }),
      (e) => e instanceof DenovisorError && e.code === "TIMEOUT",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a side missing here prints n/a, a failed measurement failed, ratios need both", async () => {
  const missing = { ok: false as const, reason: "QEMU is not installed", missing: true };
  assert.equal(cell(missing, () => 1, String), "n/a");
  assert.equal(ratioCell(missing, { ok: true, value: 1 }, () => 1), "n/a");
  // denovisor's side with a kernel that does not exist fails as a measurement.
  const spec = {
    kernel: "/nonexistent/k",
    initrd: "/nonexistent/i",
    cmdline: "",
    memMiB: 64,
    cpus: 1,
  };
  const failed = await attempt(() => measureDenovisorSnapshot(spec, "lazy"));
  assert.equal(failed.ok, false);
  assert.equal(!failed.ok && failed.missing, false);
  assert.equal(cell(failed, () => 1, String), "failed");
  assert.equal(cell({ ok: true, value: 2.5 }, (v: number) => v, (v) => v.toFixed(1)), "2.5");
});

linuxTest(
  `QEMU saves a ${SMALL_MIB} MiB guest to a file and restores it in a new process, whose shell answers`,
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "dv-qsnap-" });
    try {
      const spec = await benchGuest(SMALL_MIB, dir);
      const { save, restore } = await measureQemuSnapshot({ spec, dir });
      console.error(JSON.stringify({ save, restore }));
      assert.ok(save.wallMs > 0 && save.qemuTotalMs > 0, JSON.stringify(save));
      assert.ok(save.qemuTotalMs <= save.wallMs + 1, JSON.stringify(save));
      // Zero pages cost a few bytes each: the file holds the pages the guest
      // used (kernel, initramfs, page cache), a few MiB up to about its RAM.
      assert.ok(save.bytes > 4 * 2 ** 20, `state file of ${save.bytes} bytes`);
      assert.ok(save.bytes < SMALL_MIB * 2 ** 20 * 1.1, `state file of ${save.bytes} bytes`);
      assert.ok(save.bytes >= save.ramTransferredBytes, JSON.stringify(save));
      assert.ok(restore.fromIncomingMs > 0, JSON.stringify(restore));
      assert.ok(restore.fromStartMs > restore.fromIncomingMs, JSON.stringify(restore));
      assert.ok(restore.fromStartMs > restore.qmpReadyMs, JSON.stringify(restore));
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

linuxTest(
  `QEMU live-migrates a ${SMALL_MIB} MiB guest dirtying memory over loopback TCP, and the target's shell answers`,
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "dv-qmig-" });
    try {
      const spec = await benchGuest(SMALL_MIB, dir);
      const m = await measureQemuLiveMigration({ spec, dir, dirty: { workingSetMiB: 16 } });
      console.error(JSON.stringify(m));
      assert.ok(m.totalMs > 0, JSON.stringify(m));
      assert.ok(m.downtimeMs >= 0 && m.downtimeMs <= m.totalMs, JSON.stringify(m));
      assert.ok(m.stopToResumeMs >= m.downtimeMs - 5, JSON.stringify(m));
      assert.ok(m.stopToResumeMs <= m.totalMs + 1000, JSON.stringify(m));
      // The used pages at least once, the 16 MiB being rewritten more than once.
      assert.ok(m.transferredBytes > 16 * 2 ** 20, JSON.stringify(m));
      assert.ok(m.transferredBytes < 20 * SMALL_MIB * 2 ** 20, JSON.stringify(m));
      assert.ok(m.rounds >= 2, JSON.stringify(m));
      // The pages the guest rewrote during the first pass went again, in full.
      assert.ok(m.resentBytes > 8 * 2 ** 20, JSON.stringify(m));
      assert.ok(m.maxDirtyPagesPerSec > 0, JSON.stringify(m));
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
