/**
 * The serial console's output side: a stdout that does not drain never blocks
 * the guest, the VM or the process (the CLI and the API); the captured console
 * keeps the newest 1 MiB and says how much it dropped; string port I/O
 * (`rep outsb`, `rep insb`) on COM1 moves every byte.
 */

import assert from "node:assert/strict";

import { Vm } from "../mod.ts";
import { kvmTest, MAIN, testGuest } from "./_helpers.ts";

const STUCK_STDOUT_RUN = new URL("./_stuck_stdout_run.ts", import.meta.url).pathname;
const MIB = 1 << 20;
const CHUNK = 4096;
/** How long a process with a stuck stdout may take before the test calls it hung
 * (kvmbox runs ~8x slower than hardware; a hang is forever). */
const HANG_MS = 120_000;

async function tempImage(bytes: Uint8Array): Promise<string> {
  const path = await Deno.makeTempFile({ suffix: ".img" });
  await Deno.writeFile(path, bytes);
  return path;
}

/**
 * Runs `deno run -A ARGS` with a stdout pipe that nobody reads; returns its
 * status and stderr, or fails when it has not exited within {@link HANG_MS}.
 */
async function runWithStuckStdout(args: string[]): Promise<{ code: number; stderr: string }> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", ...args],
    stdin: "null",
    stdout: "piped", // never read: it fills after 64 KiB
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  const stderr = new Response(child.stderr).text();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const hung = new Promise<"hung">((resolve) => timer = setTimeout(() => resolve("hung"), HANG_MS));
  const status = await Promise.race([child.status, hung]);
  clearTimeout(timer);
  if (status === "hung") {
    child.kill("SIGKILL");
    await child.status;
    await child.stdout.cancel();
    throw new Error(`the process did not exit within ${HANG_MS} ms: ${await stderr}`);
  }
  await child.stdout.cancel();
  return { code: status.code, stderr: await stderr };
}

function droppedInSummary(stderr: string): number {
  const m = stderr.match(/· (\d+) console bytes dropped \(stdout did not drain\)/);
  assert.ok(m, `no dropped-bytes note in the summary: ${stderr}`);
  return Number(m[1]);
}

kvmTest("run with a stdout nobody reads still ends, by the guest's exit or --timeout", async () => {
  const flood = await tempImage(await testGuest("console_flood.S"));
  try {
    // 4 MiB of output, then EXIT(0): into a 64 KiB pipe nobody reads.
    let r = await runWithStuckStdout([MAIN, "run", "--no-stdin", "--arg", "1024", flood]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /guest exited with status 0/);
    let dropped = droppedInSummary(r.stderr);
    // At most the pipe's buffer (64 KiB by default) got out.
    assert.ok(dropped >= 4 * MIB - 256 * 1024 && dropped <= 4 * MIB, `dropped ${dropped}`);
    // Output forever: the timeout ends it.
    r = await runWithStuckStdout([MAIN, "run", "--no-stdin", "--timeout", "2000", flood]);
    assert.equal(r.code, 124, r.stderr);
    assert.match(r.stderr, /timed out/);
    dropped = droppedInSummary(r.stderr);
    assert.ok(dropped > 0, `dropped ${dropped}`);
  } finally {
    await Deno.remove(flood);
  }
});

kvmTest("stop() and close() return promptly while stdout does not drain", async () => {
  const flood = await tempImage(await testGuest("console_flood.S"));
  try {
    const r = await runWithStuckStdout([STUCK_STDOUT_RUN, flood]);
    assert.equal(r.code, 0, r.stderr);
    const line = r.stderr.trim().split("\n").at(-1)!;
    const got = JSON.parse(line);
    assert.equal(got.reason, "stopped", line);
    // Budgets hold on one emulated CPU shared with the spinning vCPU (kvmbox);
    // before the repair the run never ended and close() never returned.
    assert.ok(got.stopMs < 2000, `stop() took ${got.stopMs} ms: ${line}`);
    // The run waits at most a second for a stdout that makes no progress.
    assert.ok(got.runEndMs < 10_000, `the run ended ${got.runEndMs} ms after stop(): ${line}`);
    assert.ok(got.closeMs < 2000, `close() took ${got.closeMs} ms: ${line}`);
    assert.ok(got.consoleStreamDropped > 0, line);
    assert.ok(
      got.metrics.streamDropped > 0 && got.metrics.streamDropped <= got.metrics.bytes,
      line,
    );
  } finally {
    await Deno.remove(flood);
  }
});

kvmTest("a flooded console keeps its newest 1 MiB and reports what it dropped", async () => {
  using vm = await Vm.create({ memoryMiB: 16 });
  const chunks = 768; // 3 MiB
  vm.load(await testGuest("console_flood.S"), { mode: "long", arguments: [chunks] });
  const result = await vm.run({ timeoutMs: 60_000 });
  assert.equal(result.reason, "guest_exit", result.summary);
  assert.equal(result.console.length, MIB);
  assert.equal(result.consoleDropped, 2 * MIB);
  assert.equal(result.consoleStreamDropped, 0);
  // The newest 1 MiB: chunks 512..767, each its own letter.
  for (let i = 0; i < MIB / CHUNK; i++) {
    const chunk = chunks - MIB / CHUNK + i;
    const letter = String.fromCharCode(65 + chunk % 26);
    assert.equal(result.console.slice(i * CHUNK, (i + 1) * CHUNK), letter.repeat(CHUNK), `${i}`);
  }
  assert.deepEqual(vm.metrics()[0].console, {
    bytes: 3 * MIB,
    captureDropped: 2 * MIB,
    streamDropped: 0,
  });
  // A second run starts counting afresh.
  vm.load(await testGuest("console_flood.S"), { mode: "long", arguments: [1] });
  const again = await vm.run({ timeoutMs: 60_000 });
  assert.deepEqual([again.console, again.consoleDropped], ["A".repeat(CHUNK), 0]);
});

const MESSAGE = "rep outsb: every byte of this string reaches COM1, in order.\n";

kvmTest("rep outsb to COM1 delivers every byte of the string", async () => {
  using vm = await Vm.create({ memoryMiB: 4 });
  vm.load(await testGuest("string_io.S"), { mode: "long", arguments: [0] });
  const result = await vm.run({ timeoutMs: 60_000 });
  assert.equal(result.reason, "guest_exit", result.summary);
  assert.equal(result.console, MESSAGE);
  assert.equal(vm.metrics()[0].console.bytes, MESSAGE.length);
});

for (const length of [40, 100]) {
  kvmTest(`rep insb from COM1 reads all ${length} typed bytes in order`, async () => {
    using vm = await Vm.create({ memoryMiB: 4 });
    const typed = Array.from({ length }, (_, i) => String.fromCharCode(33 + (i * 7) % 94)).join("");
    vm.load(await testGuest("string_io.S"), { mode: "long", arguments: [1, length] });
    vm.sendConsoleInput(typed); // beyond 64 bytes, the FIFO refills as the guest reads
    const result = await vm.run({ timeoutMs: 60_000 });
    assert.equal(result.reason, "guest_exit", result.summary);
    assert.equal(result.console, typed);
  });
}
