/**
 * The project's test command (`deno task test`, what `.ci/run` runs): builds
 * the core, runs every Deno test in `tests/` and the core's `cargo test`, and
 * closes with one line `N passed, N failed[, N skipped]` summing both, which
 * is what CI reads.
 *
 * @module
 */

import { coreCrateSourceArgs, ensureCoreLibrary } from "../src/build/core_build.ts";
import { KVM_PROBLEM } from "./_helpers.ts";

interface Counts {
  passed: number;
  failed: number;
  skipped: number;
}

const ROOT = new URL("../", import.meta.url);

/** Runs a command with its output shown live, and returns that output as text. */
async function runShown(
  command: string,
  args: string[],
  cwd: URL,
): Promise<{ code: number; text: string }> {
  // NO_COLOR keeps the summary lines free of escape codes for parsing.
  const child = new Deno.Command(command, {
    args,
    cwd,
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  const decoder = new TextDecoder();
  let text = "";
  const pump = async (stream: ReadableStream<Uint8Array>, sink: typeof Deno.stdout) => {
    for await (const chunk of stream) {
      await sink.write(chunk);
      text += decoder.decode(chunk, { stream: true });
    }
  };
  await Promise.all([pump(child.stdout, Deno.stdout), pump(child.stderr, Deno.stderr)]);
  return { code: (await child.status).code, text };
}

/** Deno's summary: `ok | 12 passed (3 steps) | 0 failed | 2 ignored (4s)`. */
function denoCounts(text: string): Counts | undefined {
  const line = text.split("\n").reverse().find((l) => /\|\s*\d+ passed/.test(l));
  if (!line) return undefined;
  const count = (word: string) => Number(new RegExp(`(\\d+) ${word}`).exec(line)?.[1] ?? 0);
  return { passed: count("passed"), failed: count("failed"), skipped: count("ignored") };
}

/** Cargo's summaries: one `test result: ok. 36 passed; 0 failed; 0 ignored` per target. */
function cargoCounts(text: string): Counts | undefined {
  const lines = text.split("\n").filter((l) => l.startsWith("test result:"));
  if (lines.length === 0) return undefined;
  const sum = (word: string) =>
    lines.reduce((n, l) => n + Number(new RegExp(`(\\d+) ${word}`).exec(l)?.[1] ?? 0), 0);
  return { passed: sum("passed"), failed: sum("failed"), skipped: sum("ignored") };
}

const total: Counts = { passed: 0, failed: 0, skipped: 0 };
const add = (c: Counts) => {
  total.passed += c.passed;
  total.failed += c.failed;
  total.skipped += c.skipped;
};

if (KVM_PROBLEM) {
  const ci = Deno.env.get("CI") === "true";
  console.error(
    ci
      ? `KVM is required in CI and is not usable: ${KVM_PROBLEM}`
      : `KVM tests will be skipped: ${KVM_PROBLEM}`,
  );
}

console.error("== building the Rust core");
await ensureCoreLibrary();

console.error("== deno test");
const deno = await runShown(
  Deno.execPath(),
  ["test", "-A", "--v8-flags=--expose-gc", "tests/"],
  ROOT,
);
const denoResult = denoCounts(deno.text);
if (denoResult) add(denoResult);
else if (deno.code !== 0) total.failed += 1; // deno test failed before running tests

console.error("== cargo test (core)");
const coreDir = new URL("core/", ROOT);
const lockPath = new URL("Cargo.lock", coreDir);
const lockBefore = await Deno.readTextFile(lockPath);
let cargo: { code: number; text: string };
try {
  cargo = await runShown("cargo", ["test", "--release", ...coreCrateSourceArgs()], coreDir);
} finally {
  // Debian's crates make cargo write placeholder checksums into Cargo.lock.
  await Deno.writeTextFile(lockPath, lockBefore);
}
const cargoResult = cargoCounts(cargo.text);
if (cargoResult) add(cargoResult);
else if (cargo.code !== 0) total.failed += 1; // cargo failed to build the tests

console.log(`\n${total.passed} passed, ${total.failed} failed, ${total.skipped} skipped`);
Deno.exit(total.failed > 0 || deno.code !== 0 || cargo.code !== 0 ? 1 : 0);
