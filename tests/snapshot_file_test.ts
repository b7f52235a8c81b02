/**
 * Snapshot files from TypeScript (`vm.snapshot(dir)`, `Vm.restore(dir)`,
 * `inspectSnapshot(dir)`): a guest paused mid-run, written to a directory,
 * closed, and restored lazily and eagerly, here and in a new process, ends
 * exactly as an uninterrupted run does; a damaged snapshot is refused naming
 * the damaged section, with no VM, handle or fd left behind. The format's own
 * corner cases are unit-tested in the core (`core/src/snapshot/file.rs`).
 */

import assert from "node:assert/strict";

import { DenovisorError, inspectSnapshot, Kvm, Vm, type VmConfig } from "../mod.ts";
import { kvmTest, testGuest } from "./_helpers.ts";

const CONFIG: VmConfig = { memoryMiB: 4 };
const TIMEOUT_MS = 300_000;
/** The guest writes one character per round, 256 rounds. */
const ROUNDS = 256;

interface Outcome {
  reason: string;
  console: string;
  report: number[] | null;
}

async function uninterrupted(image: Uint8Array): Promise<Outcome> {
  using vm = await Vm.create(CONFIG);
  vm.load(image, { mode: "user" });
  const r = await vm.run({ timeoutMs: TIMEOUT_MS });
  return { reason: r.reason, console: r.console, report: r.report ? Array.from(r.report) : null };
}

/** Runs the guest until it has written `atLeast` characters, pauses it and
 * snapshots it into `dir`; returns the console written before the pause. */
async function pausedSnapshot(image: Uint8Array, dir: string, atLeast = 16): Promise<string> {
  using vm = await Vm.create(CONFIG);
  vm.load(image, { mode: "user" });
  const run = vm.run({ timeoutMs: TIMEOUT_MS });
  let before = "";
  while (before.length < atLeast) {
    await new Promise((r) => setTimeout(r, 2));
    before += vm.readConsole();
  }
  vm.pause();
  before += vm.readConsole();
  const stats = vm.snapshot(dir, { resume: false });
  assert.equal(stats.memoryBytes, 4 << 20);
  assert.ok(stats.memoryWritten < stats.memoryBytes, "zero pages are holes");
  assert.ok(before.length < ROUNDS, `the pause came mid-run (${before.length} rounds)`);
  vm.stop();
  const stopped = await run;
  assert.equal(stopped.reason, "stopped", stopped.summary);
  return before;
}

function fdCount(): number {
  return [...Deno.readDirSync("/proc/self/fd")].length;
}

async function restoreAndRun(dir: string, mode: "lazy" | "eager"): Promise<Outcome> {
  using vm = await Vm.restore(dir, { mode });
  assert.equal(vm.image?.format, "elf", "a restored VM counts as loaded");
  const r = await vm.run({ timeoutMs: TIMEOUT_MS });
  return { reason: r.reason, console: r.console, report: r.report ? Array.from(r.report) : null };
}

kvmTest(
  "a guest snapshotted mid-run ends as an uninterrupted run after a lazy or eager restore, here and in a new process",
  async () => {
    const image = await testGuest("snapshot_walk.S");
    const expected = await uninterrupted(image);
    assert.equal(expected.reason, "guest_exit");
    assert.equal(expected.console.length, ROUNDS);
    assert.equal(expected.report?.length, 8);

    const tmp = await Deno.makeTempDir({ prefix: "dv-snapfile-" });
    try {
      const dir = `${tmp}/snap`;
      const before = await pausedSnapshot(image, dir);
      assert.deepEqual([...Deno.readDirSync(tmp)].map((e) => e.name), ["snap"], "no temp dir left");

      const info = await inspectSnapshot(dir);
      assert.deepEqual(info.sections.map((s) => s.name), [
        "host",
        "config",
        "vm",
        "devices",
        "memory",
      ]);
      assert.equal(info.format.version, 2);
      assert.equal(info.vcpus, 1);
      assert.equal(info.memory.size, 4 << 20);
      assert.ok(info.hostCheck.ok, info.hostCheck.problems.join("; "));

      for (const mode of ["lazy", "eager"] as const) {
        const after = await restoreAndRun(dir, mode);
        assert.equal(after.reason, "guest_exit", mode);
        assert.equal(before + after.console, expected.console, `${mode}: the console continues`);
        assert.deepEqual(after.report, expected.report, `${mode}: the digest of guest RAM`);
      }
      // Two lazy VMs from one snapshot at once: each its own copy-on-write RAM.
      {
        using a = await Vm.restore(dir);
        using b = await Vm.restore(dir);
        const [ra, rb] = await Promise.all([
          a.run({ timeoutMs: TIMEOUT_MS }),
          b.run({ timeoutMs: TIMEOUT_MS }),
        ]);
        assert.equal(before + ra.console, expected.console);
        assert.deepEqual(ra.report ? Array.from(ra.report) : null, expected.report);
        assert.deepEqual(rb.report ? Array.from(rb.report) : null, expected.report);
      }

      for (const mode of ["lazy", "eager"]) {
        const child = new URL("./_snapshot_restore_child.ts", import.meta.url).pathname;
        const out = await new Deno.Command(Deno.execPath(), {
          args: ["run", "-A", child, dir, mode],
          stdout: "piped",
          stderr: "piped",
          stdin: "null",
        }).output();
        const stderr = new TextDecoder().decode(out.stderr);
        assert.equal(out.code, 0, stderr);
        const got = JSON.parse(new TextDecoder().decode(out.stdout)) as Outcome;
        assert.equal(got.reason, "guest_exit", `${mode} in a new process`);
        assert.equal(before + got.console, expected.console, `${mode} in a new process`);
        assert.deepEqual(got.report, expected.report, `${mode} in a new process`);
      }
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  },
);

async function copySnapshot(from: string, to: string): Promise<void> {
  await Deno.mkdir(to);
  for (const name of ["state", "memory"]) await Deno.copyFile(`${from}/${name}`, `${to}/${name}`);
}

async function flipByte(path: string, at: number): Promise<void> {
  const file = await Deno.open(path, { read: true, write: true });
  try {
    const b = new Uint8Array(1);
    await file.seek(at, Deno.SeekMode.Start);
    await file.read(b);
    b[0] ^= 0x40;
    await file.seek(at, Deno.SeekMode.Start);
    await file.write(b);
  } finally {
    file.close();
  }
}

function refusedNaming(section: string, code = "SNAPSHOT_INVALID") {
  return (e: unknown) => {
    assert.ok(e instanceof DenovisorError, String(e));
    assert.equal(e.code, code, e.message);
    assert.ok(e.message.includes(`snapshot ${section}:`), e.message);
    return true;
  };
}

kvmTest(
  "a snapshot with one corrupted byte in any section is refused naming it, leaving no VM, handle or fd",
  async () => {
    const image = await testGuest("snapshot_walk.S");
    const tmp = await Deno.makeTempDir({ prefix: "dv-snapfile-" });
    const kvm = await Kvm.open();
    try {
      const good = `${tmp}/good`;
      await pausedSnapshot(image, good);
      const { sections } = await inspectSnapshot(good);
      const handles = kvm.liveHandles;
      const fds = fdCount();
      for (const s of sections) {
        const dir = `${tmp}/bad-${s.name}`;
        await copySnapshot(good, dir);
        await flipByte(`${dir}/state`, s.offset + Math.floor(s.length / 2));
        await assert.rejects(inspectSnapshot(dir), refusedNaming(s.name));
        for (const mode of ["lazy", "eager"] as const) {
          await assert.rejects(Vm.restore(dir, { mode }), refusedNaming(s.name));
        }
      }
      // The version in the header; a state file cut short; a missing memory file.
      const version = `${tmp}/bad-version`;
      await copySnapshot(good, version);
      await flipByte(`${version}/state`, 8);
      await assert.rejects(Vm.restore(version), refusedNaming("header"));
      const cut = `${tmp}/bad-cut`;
      await copySnapshot(good, cut);
      const last = sections[sections.length - 1];
      await Deno.truncate(`${cut}/state`, last.offset + 3);
      await assert.rejects(Vm.restore(cut), refusedNaming("memory"));
      const noMemory = `${tmp}/bad-no-memory`;
      await copySnapshot(good, noMemory);
      await Deno.remove(`${noMemory}/memory`);
      await assert.rejects(Vm.restore(noMemory), refusedNaming("memory"));
      // Guest RAM: an eager restore verifies the memory file's checksum; a
      // lazy one cannot without reading it all (its length is checked).
      const ram = `${tmp}/bad-ram`;
      await copySnapshot(good, ram);
      await flipByte(`${ram}/memory`, 0x100000 + 12345);
      await assert.rejects(Vm.restore(ram, { mode: "eager" }), refusedNaming("memory"));
      (await Vm.restore(ram, { mode: "lazy" })).close();
      await Deno.truncate(`${ram}/memory`, (4 << 20) - 4096);
      await assert.rejects(Vm.restore(ram, { mode: "lazy" }), refusedNaming("memory"));

      assert.equal(kvm.liveHandles, handles, "no VM or vCPU handle left behind");
      assert.equal(fdCount(), fds, "no fd left behind");
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  },
);

kvmTest(
  "a snapshot is refused into a directory that is not empty, and vm.snapshot pauses and resumes a running VM",
  async () => {
    const image = await testGuest("snapshot_walk.S");
    const tmp = await Deno.makeTempDir({ prefix: "dv-snapfile-" });
    try {
      await Deno.writeTextFile(`${tmp}/taken`, "x");
      using vm = await Vm.create(CONFIG);
      vm.load(image, { mode: "user" });
      const run = vm.run({ timeoutMs: TIMEOUT_MS });
      assert.throws(
        () => vm.snapshot(tmp),
        (e) => e instanceof DenovisorError && /not an empty directory/.test(e.message),
      );
      // Running: paused for the snapshot, resumed after (the default).
      vm.snapshot(`${tmp}/snap`);
      const result = await run;
      assert.equal(result.reason, "guest_exit", result.summary);
      assert.deepEqual(
        [...Deno.readDirSync(tmp)].map((e) => e.name).sort(),
        ["snap", "taken"],
        "no temp dir left",
      );
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  },
);
