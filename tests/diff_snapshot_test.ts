/**
 * Diff snapshots (`vm.snapshot(dir, { diff: true, parent })`): a guest that
 * writes one page per round, snapshotted full -> diff -> diff while it runs,
 * restores from the last link, lazily and eagerly, to exactly the memory it
 * had then and ends as an uninterrupted run does; each diff file holds only
 * the pages changed since its parent. A VM restored from a link and tracked
 * from before its first run diffs against that link; a parent that is not
 * the VM's last snapshot is refused naming it. The format's chain checks
 * (missing, broken, replaced parents) are unit tests of
 * `core/src/snapshot/file.rs`.
 */

import assert from "node:assert/strict";

import { DenovisorError, inspectSnapshot, Vm, type VmConfig } from "../mod.ts";
import { kvmTest, testGuest } from "./_helpers.ts";

const CONFIG: VmConfig = { memoryMiB: 4 };
const RAM = 4 << 20;
const TIMEOUT_MS = 300_000;
/** snapshot_walk.S writes one character and fills one page per round. */
const ROUNDS = 256;
/** Pages a diff may hold beyond one per round: the page tables the CPU sets
 * accessed/dirty bits in, the stack and data pages. */
const SLACK_PAGES = 12;

async function waitFor(vm: Vm, seen: { text: string }, atLeast: number): Promise<void> {
  while (seen.text.length < atLeast) {
    await new Promise((r) => setTimeout(r, 2));
    seen.text += vm.readConsole();
  }
}

function diffFileBytes(dir: string): number {
  return Deno.statSync(`${dir}/memory`).size;
}

kvmTest(
  "a full -> diff -> diff chain restores to the exact memory and output of an uninterrupted run, and its diffs hold only changed pages",
  async () => {
    const image = await testGuest("snapshot_walk.S");
    let expected: { console: string; report: number[] };
    {
      using vm = await Vm.create(CONFIG);
      vm.load(image, { mode: "user" });
      const r = await vm.run({ timeoutMs: TIMEOUT_MS });
      assert.equal(r.reason, "guest_exit", r.summary);
      expected = { console: r.console, report: Array.from(r.report ?? []) };
    }
    assert.equal(expected.console.length, ROUNDS);

    const tmp = await Deno.makeTempDir({ prefix: "dv-diffsnap-" });
    try {
      const [base, d1, d2] = [`${tmp}/base`, `${tmp}/d1`, `${tmp}/d2`];
      const seen = { text: "" };
      let atD2: Uint8Array = new Uint8Array();
      const roundsAt: number[] = [];
      {
        using vm = await Vm.create(CONFIG);
        vm.load(image, { mode: "user" });
        vm.startDirtyLog();
        const run = vm.run({ timeoutMs: TIMEOUT_MS });
        for (
          const [dir, parent, at] of [[base, undefined, 8], [d1, base, 24], [d2, d1, 40]] as const
        ) {
          await waitFor(vm, seen, at);
          vm.pause();
          seen.text += vm.readConsole();
          roundsAt.push(seen.text.length);
          const stats = parent === undefined
            ? vm.snapshot(dir, { resume: false })
            : vm.snapshot(dir, { diff: true, parent, resume: false });
          if (parent === undefined) {
            assert.equal(stats.kind, "full");
          } else {
            const rounds = roundsAt[roundsAt.length - 1] - roundsAt[roundsAt.length - 2];
            assert.equal(stats.kind, "diff");
            const pages = stats.diffPages ?? -1;
            assert.ok(pages >= rounds, `${dir}: ${pages} pages for ${rounds} rounds`);
            assert.ok(
              pages <= rounds + 1 + SLACK_PAGES,
              `${dir}: ${pages} pages for ${rounds} rounds is more than changed`,
            );
            assert.equal(stats.memoryWritten, pages * 4096);
            assert.equal(diffFileBytes(dir), pages * 4096, "the diff file is the pages, packed");
          }
          if (dir === d2) {
            atD2 = vm.readMemory(0, RAM);
            // The last snapshot is d2: a diff against d1 is refused naming it.
            assert.throws(
              () => vm.snapshot(`${tmp}/stale`, { diff: true, parent: d1, resume: false }),
              (e: unknown) =>
                e instanceof DenovisorError && e.code === "INVALID_ARGUMENT" &&
                e.message.includes("d1") && e.message.includes("last snapshot"),
            );
          } else {
            vm.resume();
          }
        }
        assert.ok(seen.text.length < ROUNDS, `the chain ended mid-run (${seen.text.length})`);
        vm.stop();
        assert.equal((await run).reason, "stopped");
      }
      const info = await inspectSnapshot(d2);
      assert.equal(info.memory.kind, "diff");
      assert.equal(info.memory.parent?.dir, "../d1");

      for (const mode of ["lazy", "eager"] as const) {
        using vm = await Vm.restore(d2, { mode });
        assert.deepEqual(vm.readMemory(0, RAM), atD2, `${mode}: the memory at d2`);
        const r = await vm.run({ timeoutMs: TIMEOUT_MS });
        assert.equal(r.reason, "guest_exit", r.summary);
        assert.equal(seen.text + r.console, expected.console, `${mode}: the console`);
        assert.deepEqual(Array.from(r.report ?? []), expected.report, `${mode}: the RAM digest`);
      }

      // A VM restored from d1 and tracked before it runs diffs against d1.
      const d1b = `${tmp}/d1b`;
      let before = "";
      {
        using vm = await Vm.restore(d1, { mode: "lazy" });
        vm.startDirtyLog();
        const run = vm.run({ timeoutMs: TIMEOUT_MS });
        const more = { text: "" };
        await waitFor(vm, more, 10);
        vm.pause();
        more.text += vm.readConsole();
        assert.throws(
          () => vm.snapshot(`${tmp}/wrong`, { diff: true, parent: base, resume: false }),
          (e: unknown) => e instanceof DenovisorError && e.message.includes("base"),
        );
        const stats = vm.snapshot(d1b, { diff: true, parent: d1, resume: false });
        assert.ok((stats.diffPages ?? 0) <= more.text.length + 1 + SLACK_PAGES);
        before = seen.text.slice(0, roundsAt[1]) + more.text;
        vm.stop();
        await run;
      }
      {
        using vm = await Vm.restore(d1b, { mode: "eager" });
        const r = await vm.run({ timeoutMs: TIMEOUT_MS });
        assert.equal(before + r.console, expected.console, "d1 -> d1b: the console");
        assert.deepEqual(Array.from(r.report ?? []), expected.report, "d1 -> d1b: the digest");
      }
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  },
);
