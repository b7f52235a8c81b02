/**
 * The project's test command (`deno task test`, what `.ci/run` runs): builds
 * the core, runs every Deno test in `tests/` and the core's `cargo test`, and
 * closes with one line `N passed, N failed, N skipped` summing every test
 * wherever it ran, which is what CI reads.
 *
 * Where each test runs depends on the host's KVM (see `tests/_host.ts`):
 * - hardware virtualization: everything runs here;
 * - PVM: everything but the Linux boots (`[linux]` tests) runs here, and those
 *   run inside kvmbox when it is available (skipped with the reason otherwise);
 * - no /dev/kvm: builds, downloads and the tests that need no KVM run here, then
 *   the `[kvm]` and `[linux]` tests and the core's KVM tests run inside kvmbox
 *   with CI=true; without kvmbox they are skipped with the reason (and fail
 *   under CI=true).
 *
 * Options: `--kvmbox auto|always|never` (default auto: only where the host
 * cannot run a group itself), `--filter TEXT` (only Deno tests whose name
 * contains TEXT), `--no-cargo`.
 *
 * @module
 */

import { parseArgs } from "node:util";

import { coreCrateSourceArgs, ensureCoreLibrary } from "../src/build/core_build.ts";
import { detectKvm, findKvmbox, TAG } from "./_host.ts";

interface Counts {
  passed: number;
  failed: number;
  skipped: number;
}

const ROOT = new URL("../", import.meta.url);
const CI = Deno.env.get("CI") === "true";
/** The whole kvmbox part must end in this time (CI's budget is 90 minutes). */
const KVMBOX_BUDGET_S = Number(Deno.env.get("DENOVISOR_KVMBOX_TIMEOUT") ?? 3000);
/** kvmbox's status when the emulated machine froze: rerun that part. */
const KVMBOX_FROZE = 126;

const { values: opts } = parseArgs({
  args: Deno.args,
  options: {
    kvmbox: { type: "string", default: "auto" },
    filter: { type: "string" },
    "no-cargo": { type: "boolean", default: false },
  },
});
if (!["auto", "always", "never"].includes(opts.kvmbox!)) {
  console.error(`--kvmbox must be auto, always or never, got ${JSON.stringify(opts.kvmbox)}`);
  Deno.exit(2);
}

/** Runs a command with its output shown live, and returns that output as text. */
async function runShown(
  command: string,
  args: string[],
  cwd: URL,
  env: Record<string, string> = {},
): Promise<{ code: number; text: string }> {
  // NO_COLOR keeps the summary lines free of escape codes for parsing.
  const child = new Deno.Command(command, {
    args,
    cwd,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1", ...env },
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
const problems: string[] = [];
function add(what: string, c: Counts | undefined, code: number, countSkipped = true): void {
  if (c) {
    total.passed += c.passed;
    total.failed += c.failed;
    if (countSkipped) total.skipped += c.skipped;
  }
  if (!c) {
    total.failed += 1; // the runner failed before it could report tests
    problems.push(`${what}: exited ${code} without a test summary`);
  } else if (code !== 0 && c.failed === 0) {
    total.failed += 1;
    problems.push(`${what}: exited ${code} although no test failed`);
  }
}

/**
 * A Deno `--filter` regex: tests whose names start with one of `tags`, and
 * contain `text` if given. (Deno's filter regexes have no lookahead.)
 */
function tagFilter(tags: string[], text?: string): string {
  const escape = (s: string) => s.replace(/[\\^$.*+?()[\]{}|/]/g, "\\$&");
  const alternatives = tags.map((t) => escape(t.trimEnd())).join("|");
  const rest = text ? `.*${escape(text)}` : "";
  return `/^(${alternatives}) ${rest}/`;
}

/** `[kvm] and [linux] tests`. */
function groups(tags: string[]): string {
  return `${tags.map((t) => t.trim()).join(" and ")} tests`;
}

const host = detectKvm();
const kvmbox = opts.kvmbox === "never" ? undefined : findKvmbox(ROOT);
/** Groups of tests the host cannot run itself, which go to kvmbox when it is there. */
const elsewhere: string[] = host.kind === "none"
  ? [TAG.kvm, TAG.linux]
  : host.kind === "pvm"
  ? [TAG.linux]
  : [];
if (opts.kvmbox === "always") elsewhere.splice(0, elsewhere.length, TAG.kvm, TAG.linux);
const inKvmbox = kvmbox ? elsewhere : [];
const rustKvmHere = host.kind !== "none" && !inKvmbox.includes(TAG.kvm);

console.error(`== host: KVM ${host.kind}${host.problem ? ` (${host.problem})` : ""}`);
if (inKvmbox.length > 0) {
  console.error(`== ${groups(inKvmbox)} run inside ${kvmbox}`);
} else if (elsewhere.length > 0) {
  const reason = opts.kvmbox === "never"
    ? "--kvmbox never"
    : "no kvmbox (../shared/kvmbox/kvmbox or $DENOVISOR_KVMBOX)";
  console.error(
    `== ${groups(elsewhere)} cannot run on this host and ${reason}: ` +
      (CI && host.kind === "none" ? "they fail under CI=true" : "they are skipped"),
  );
}

console.error("== building the Rust core");
await ensureCoreLibrary();

const denoArgs = ["test", "-A", "--v8-flags=--expose-gc"];
const nameFilter = opts.filter;

console.error("== deno test");
// The groups that run in kvmbox are not registered here (tests/_helpers.ts).
const hostArgs = nameFilter ? ["--filter", nameFilter] : [];
const deno = await runShown(Deno.execPath(), [...denoArgs, ...hostArgs, "tests/"], ROOT, {
  DENOVISOR_TESTS_ELSEWHERE: inKvmbox.map((t) => t.trim()).join(","),
});
add("deno test", denoCounts(deno.text), deno.code);

const coreDir = new URL("core/", ROOT);
let rustKvmTestBinary: string | undefined;
if (!opts["no-cargo"]) {
  console.error("== cargo test (core)");
  const lockPath = new URL("Cargo.lock", coreDir);
  const lockBefore = await Deno.readTextFile(lockPath);
  try {
    const extra = rustKvmHere ? ["--", "--include-ignored"] : [];
    const cargo = await runShown(
      "cargo",
      ["test", "--release", ...coreCrateSourceArgs(), ...extra],
      coreDir,
    );
    // The KVM tests cargo ignored here run in kvmbox, counted there.
    add("cargo test", cargoCounts(cargo.text), cargo.code, !inKvmbox.includes(TAG.kvm));
    if (inKvmbox.includes(TAG.kvm)) {
      const built = await new Deno.Command("cargo", {
        args: [
          "test",
          "--release",
          "--lib",
          "--no-run",
          "--message-format=json",
          ...coreCrateSourceArgs(),
        ],
        cwd: coreDir,
        stdout: "piped",
        stderr: "null",
      }).output();
      for (const line of new TextDecoder().decode(built.stdout).split("\n")) {
        if (!line.startsWith("{")) continue;
        const message = JSON.parse(line);
        if (message.reason === "compiler-artifact" && message.executable && message.profile?.test) {
          rustKvmTestBinary = message.executable;
        }
      }
      if (!rustKvmTestBinary) {
        add("cargo test --no-run", undefined, built.code);
      }
    }
  } finally {
    // Debian's crates make cargo write placeholder checksums into Cargo.lock.
    await Deno.writeTextFile(lockPath, lockBefore);
  }
}

/** Runs `command` inside kvmbox with CI=true, again (up to 3 times) if the emulator froze. */
async function inBox(
  what: string,
  command: string[],
  deadline: number,
): Promise<{ code: number; text: string }> {
  let result = { code: KVMBOX_FROZE, text: "" };
  for (const attempt of [1, 2, 3]) {
    const left = Math.floor((deadline - Date.now()) / 1000);
    if (left < 60) {
      problems.push(`${what}: no time left in the kvmbox budget (${KVMBOX_BUDGET_S} s)`);
      return { code: 124, text: result.text };
    }
    console.error(`== ${what} inside kvmbox (attempt ${attempt}, timeout ${left} s)`);
    result = await runShown(kvmbox!, [
      "--timeout",
      String(left),
      "--env",
      "CI=true",
      "--env",
      "NO_COLOR=1",
      "--",
      ...command,
    ], ROOT);
    if (result.code !== KVMBOX_FROZE) return result;
    console.error(`== the emulated machine froze (kvmbox exit ${KVMBOX_FROZE})`);
  }
  problems.push(`${what}: the emulated machine froze three times (kvmbox exit ${KVMBOX_FROZE})`);
  return result;
}

/** The helper that registers each group's tests (`tests/_helpers.ts`). */
const REGISTRAR: Record<string, string> = { [TAG.kvm]: "kvmTest(", [TAG.linux]: "linuxTest(" };

/**
 * The test files, in chunks of about equal weight in tests of `tags` (a
 * Linux boot weighs more than a micro-VM): each chunk is one kvmbox run, so an
 * emulator that freezes costs one chunk's rerun, not the whole suite's.
 */
function kvmboxChunks(tags: string[], count: number): string[][] {
  const weighted: { file: string; weight: number }[] = [];
  for (
    const entry of [...Deno.readDirSync(new URL("tests/", ROOT))].sort((a, b) =>
      a.name < b.name ? -1 : 1
    )
  ) {
    if (!entry.isFile || !entry.name.endsWith("_test.ts")) continue;
    const source = Deno.readTextFileSync(new URL(`tests/${entry.name}`, ROOT));
    const uses = (tag: string) => source.split(REGISTRAR[tag]).length - 1;
    // Every file goes in (a file may register its tests through another
    // helper); the filter leaves each run only its groups' tests.
    const weight = tags.reduce((w, tag) => w + uses(tag) * (tag === TAG.linux ? 6 : 1), 0.2);
    weighted.push({ file: `tests/${entry.name}`, weight });
  }
  const target = weighted.reduce((sum, f) => sum + f.weight, 0) / count;
  const chunks: string[][] = [[]];
  let load = 0;
  for (const { file, weight } of weighted) {
    if (load > 0 && load + weight > target * 1.2) {
      chunks.push([]);
      load = 0;
    }
    chunks.at(-1)!.push(file);
    load += weight;
  }
  return chunks.filter((c) => c.length > 0);
}

if (inKvmbox.length > 0) {
  const deadline = Date.now() + KVMBOX_BUDGET_S * 1000;
  const boxArgs = ["--filter", tagFilter(inKvmbox, nameFilter)];
  // The host type-checked every test file above; the emulator need not again.
  const chunks = kvmboxChunks(inKvmbox, 6);
  for (const [i, files] of chunks.entries()) {
    const what = `deno test (part ${i + 1} of ${chunks.length})`;
    const boxed = await inBox(
      what,
      [Deno.execPath(), ...denoArgs, "--no-check", ...boxArgs, ...files],
      deadline,
    );
    add(`${what} in kvmbox`, denoCounts(boxed.text), boxed.code);
  }
  if (rustKvmTestBinary) {
    const rust = await inBox("cargo's KVM tests", [rustKvmTestBinary, "--ignored"], deadline);
    add("cargo's KVM tests in kvmbox", cargoCounts(rust.text), rust.code);
  }
}

for (const problem of problems) console.error(`problem: ${problem}`);
console.log(`\n${total.passed} passed, ${total.failed} failed, ${total.skipped} skipped`);
Deno.exit(total.failed > 0 ? 1 : 0);
