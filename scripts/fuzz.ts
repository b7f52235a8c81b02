/**
 * `deno task fuzz [TARGET...] [--seconds N] [--jobs N] [--merge]`: builds the
 * core's coverage-guided fuzz targets (`core/fuzz/`, SanitizerCoverage +
 * Debian's libFuzzer, downloaded into `.cache/libfuzzer` on first use), runs
 * each for N seconds on its corpus, and prints executions, exec/s, coverage
 * and corpus size per target. The TypeScript targets (`ts_*`, see
 * `tests/_fuzz_ts.ts`) run in a Deno subprocess for the same time.
 *
 * Corpora: `core/fuzz/corpus/TARGET/` (committed seeds, read-only here) plus
 * `core/fuzz/target/corpus/TARGET/` (what runs find, kept between runs).
 * `--merge` folds what runs found back into the committed seeds, minimized.
 * A crash, timeout or out-of-memory exits non-zero, with the reproducer in
 * `core/fuzz/artifacts/` (run the target's binary on it to reproduce).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { ensureDebianCrates } from "../src/build/debian_crates.ts";

const ROOT = new URL("..", import.meta.url).pathname.replace(/\/$/, "");
const FUZZ_DIR = `${ROOT}/core/fuzz`;
const TARGET_DIR = `${FUZZ_DIR}/target`;
const TRIPLE = "x86_64-unknown-linux-gnu";
const BIN_DIR = `${TARGET_DIR}/${TRIPLE}/release`;
const LIBFUZZER_DIR = `${ROOT}/.cache/libfuzzer`;
/** Debian's libFuzzer packages, newest first (any works: the sancov ABI is stable). */
const LIBFUZZER_PACKAGES = ["libfuzzer-19-dev", "libfuzzer-16-dev", "libfuzzer-15-dev"];
const SANCOV_FLAGS = [
  "-Cpasses=sancov-module",
  "-Cllvm-args=-sanitizer-coverage-level=4",
  "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
  "-Cllvm-args=-sanitizer-coverage-pc-table",
  "-Cllvm-args=-sanitizer-coverage-trace-compares",
  "-Cdebug-assertions",
  "-Coverflow-checks",
];
/** The TypeScript targets, run by tests/_fuzz_ts.ts. */
const TS_TARGETS = ["ts_api_json", "ts_http_body", "ts_ffi_abi"];

/** One target's run. */
export interface FuzzResult {
  target: string;
  executions: number;
  execPerSecond: number;
  /** Edges (libFuzzer's `cov`) for the Rust targets; distinct outcomes for the TS ones. */
  coverage: number;
  /** libFuzzer's features (`ft`): edges, counters and compare values. */
  features: number;
  corpus: number;
  crashes: number;
  /** What went wrong (empty when nothing did). */
  problem: string;
  /** The reproducer, when one was written. */
  artifact?: string;
}

function rustTargets(): string[] {
  return [...Deno.readDirSync(`${FUZZ_DIR}/fuzz_targets`)]
    .filter((e) => e.isFile && e.name.endsWith(".rs"))
    .map((e) => e.name.slice(0, -3))
    .sort();
}

async function run(
  cmd: string,
  args: string[],
  options: { cwd?: string; env?: Record<string, string> } = {},
): Promise<{ code: number; out: string }> {
  const child = new Deno.Command(cmd, {
    args,
    cwd: options.cwd,
    env: options.env,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const { code, stdout, stderr } = await child.output();
  const d = new TextDecoder();
  return { code, out: d.decode(stdout) + d.decode(stderr) };
}

function findLibFuzzer(): string | undefined {
  try {
    for (const llvm of Deno.readDirSync(`${LIBFUZZER_DIR}/root/usr/lib`)) {
      const path = `${LIBFUZZER_DIR}/root/usr/lib/${llvm.name}/lib/libFuzzer.a`;
      try {
        if (Deno.statSync(path).isFile) return path;
      } catch {
        // Not this LLVM version.
      }
    }
  } catch {
    // Not downloaded yet.
  }
  return undefined;
}

/** Downloads Debian's libFuzzer into .cache/libfuzzer (once). */
export async function ensureLibFuzzer(): Promise<string> {
  const found = findLibFuzzer();
  if (found) return found;
  const debs = `${LIBFUZZER_DIR}/debs`;
  Deno.mkdirSync(debs, { recursive: true });
  const errors: string[] = [];
  for (const pkg of LIBFUZZER_PACKAGES) {
    const got = await run("apt-get", ["download", pkg], { cwd: debs });
    if (got.code !== 0) {
      errors.push(`${pkg}: ${got.out.trim().split("\n").at(-1)}`);
      continue;
    }
    for (const e of Deno.readDirSync(debs)) {
      if (!e.name.startsWith(pkg.replace(/-dev$/, ""))) continue;
      const x = await run("dpkg-deb", ["-x", `${debs}/${e.name}`, `${LIBFUZZER_DIR}/root`]);
      if (x.code !== 0) errors.push(`dpkg-deb -x ${e.name}: ${x.out.trim()}`);
    }
    const path = findLibFuzzer();
    if (path) return path;
  }
  throw new Error(`cannot download libFuzzer from Debian's archive:\n${errors.join("\n")}`);
}

/** Builds every Rust target (instrumented, release, debug assertions on). */
export async function buildTargets(): Promise<void> {
  const libFuzzer = await ensureLibFuzzer();
  const env: Record<string, string> = {
    DENOVISOR_LIBFUZZER: libFuzzer,
    RUSTFLAGS: SANCOV_FLAGS.join(" "),
    CARGO_TARGET_DIR: TARGET_DIR,
  };
  const args = ["build", "--release", "--target", TRIPLE];
  let built = await run("cargo", args, { cwd: FUZZ_DIR, env });
  if (built.code !== 0 && /crates\.io|index|download|registry/i.test(built.out)) {
    // No crates.io: Debian's packaged crates, as the core's own build does.
    const crates = await ensureDebianCrates(`${ROOT}/.cache/debian-crates`);
    if (!crates.ok) throw new Error(`no crate source: ${crates.detail}`);
    built = await run("cargo", [
      ...args,
      "--offline",
      "--config",
      'source.crates-io.replace-with="debian"',
      "--config",
      `source.debian.directory="${crates.registryDir}"`,
    ], { cwd: FUZZ_DIR, env });
  }
  if (built.code !== 0) {
    throw new Error(
      `building the fuzz targets failed:\n${built.out.split("\n").slice(-30).join("\n")}`,
    );
  }
}

function countFiles(dir: string): number {
  try {
    return [...Deno.readDirSync(dir)].filter((e) => e.isFile).length;
  } catch {
    return 0;
  }
}

/** Parses libFuzzer's last status line and final stats. */
function parseLibFuzzer(target: string, out: string, code: number): FuzzResult {
  const status = [...out.matchAll(/#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)\//g)].at(-1);
  const executed = /stat::number_of_executed_units:\s+(\d+)/.exec(out);
  const rate = /stat::average_exec_per_sec:\s+(\d+)/.exec(out);
  const artifact = /Test unit written to (\S+)/.exec(out)?.[1];
  const crashed = code !== 0;
  const kind = /ERROR: libFuzzer: ([^\n]+)/.exec(out)?.[1] ??
    (/SUMMARY: libFuzzer: ([^\n]+)/.exec(out)?.[1]);
  const panic = /panicked at [^\n]+\n[^\n]*/.exec(out)?.[0];
  return {
    target,
    executions: Number(executed?.[1] ?? status?.[1] ?? 0),
    execPerSecond: Number(rate?.[1] ?? 0),
    coverage: Number(status?.[2] ?? 0),
    features: Number(status?.[3] ?? 0),
    corpus: Number(status?.[4] ?? 0),
    crashes: crashed ? 1 : 0,
    problem: crashed
      ? [kind ?? `exit code ${code}`, panic].filter(Boolean).join(": ").slice(0, 400)
      : "",
    artifact,
  };
}

/** Runs one Rust target for `seconds` on its committed seeds and its work corpus. */
export async function runRustTarget(target: string, seconds: number): Promise<FuzzResult> {
  const seeds = `${FUZZ_DIR}/corpus/${target}`;
  const work = `${TARGET_DIR}/corpus/${target}`;
  const artifacts = `${FUZZ_DIR}/artifacts`;
  for (const d of [seeds, work, artifacts]) Deno.mkdirSync(d, { recursive: true });
  const { code, out } = await run(`${BIN_DIR}/${target}`, [
    `-max_total_time=${seconds}`,
    "-timeout=10",
    "-rss_limit_mb=2048",
    "-max_len=70000",
    "-print_final_stats=1",
    `-artifact_prefix=${artifacts}/${target}-`,
    work,
    seeds,
  ]);
  const result = parseLibFuzzer(target, out, code);
  if (result.corpus === 0) result.corpus = countFiles(work);
  if (result.execPerSecond === 0) result.execPerSecond = Math.round(result.executions / seconds);
  return result;
}

/** Folds a target's work corpus into its committed seeds (libFuzzer's -merge: a minimal set). */
async function mergeCorpus(target: string): Promise<number> {
  const seeds = `${FUZZ_DIR}/corpus/${target}`;
  const work = `${TARGET_DIR}/corpus/${target}`;
  Deno.mkdirSync(seeds, { recursive: true });
  const { code, out } = await run(`${BIN_DIR}/${target}`, [
    "-merge=1",
    "-max_len=70000",
    seeds,
    work,
  ]);
  if (code !== 0) throw new Error(`merging ${target}'s corpus failed:\n${out.slice(-2000)}`);
  return countFiles(seeds);
}

/** Runs one TypeScript target in a subprocess (tests/_fuzz_ts.ts prints one JSON line). */
async function runTsTarget(target: string, seconds: number): Promise<FuzzResult> {
  const artifacts = `${FUZZ_DIR}/artifacts`;
  Deno.mkdirSync(artifacts, { recursive: true });
  const { code, out } = await run(Deno.execPath(), [
    "run",
    "-A",
    `${ROOT}/tests/_fuzz_ts.ts`,
    target,
    String(seconds),
    artifacts,
  ]);
  const line = out.split("\n").find((l) => l.startsWith('{"target"'));
  if (code !== 0 || !line) {
    return {
      target,
      executions: 0,
      execPerSecond: 0,
      coverage: 0,
      features: 0,
      corpus: 0,
      crashes: 1,
      problem: `exit code ${code}: ${out.slice(-600)}`,
    };
  }
  return JSON.parse(line) as FuzzResult;
}

function row(r: FuzzResult): string {
  const cells = [
    r.target.padEnd(16),
    String(r.executions).padStart(11),
    String(r.execPerSecond).padStart(8),
    String(r.coverage).padStart(6),
    String(r.features).padStart(7),
    String(r.corpus).padStart(6),
    String(r.crashes).padStart(7),
  ];
  return cells.join(" ");
}

async function main(): Promise<number> {
  const { values, positionals } = parseArgs({
    args: Deno.args,
    allowPositionals: true,
    options: {
      seconds: { type: "string", default: "60" },
      jobs: { type: "string", default: "1" },
      merge: { type: "boolean", default: false },
      list: { type: "boolean", default: false },
    },
  });
  const seconds = Number(values.seconds);
  const jobs = Math.max(1, Number(values.jobs));
  if (!Number.isInteger(seconds) || seconds < 1) {
    console.error(`--seconds must be a positive integer, got ${values.seconds}`);
    return 2;
  }
  const all = [...rustTargets(), ...TS_TARGETS];
  if (values.list) {
    console.log(all.join("\n"));
    return 0;
  }
  const chosen = positionals.length > 0 ? positionals : all;
  const unknown = chosen.filter((t) => !all.includes(t));
  if (unknown.length > 0) {
    console.error(`unknown fuzz target(s) ${unknown.join(", ")}; targets: ${all.join(", ")}`);
    return 2;
  }
  if (chosen.some((t) => !TS_TARGETS.includes(t))) {
    console.error("fuzz: building the targets (SanitizerCoverage + libFuzzer)...");
    await buildTargets();
  }
  console.log(
    `${"target".padEnd(16)} ${"executions".padStart(11)} ${"exec/s".padStart(8)} ${
      "cov".padStart(6)
    } ${"ft".padStart(7)} ${"corpus".padStart(6)} ${"crashes".padStart(7)}`,
  );
  const results: FuzzResult[] = [];
  const queue = [...chosen];
  await Promise.all(
    Array.from({ length: Math.min(jobs, queue.length) }, async () => {
      for (let t = queue.shift(); t !== undefined; t = queue.shift()) {
        const r = TS_TARGETS.includes(t)
          ? await runTsTarget(t, seconds)
          : await runRustTarget(t, seconds);
        results.push(r);
        console.log(row(r));
        if (r.problem) {
          console.log(`  ${t}: ${r.problem}`);
          if (r.artifact) console.log(`  reproduce: ${BIN_DIR}/${t} ${r.artifact}`);
        }
        if (values.merge && !TS_TARGETS.includes(t) && !r.problem) {
          console.log(`  ${t}: ${await mergeCorpus(t)} seed(s) in core/fuzz/corpus/${t}`);
        }
      }
    }),
  );
  const failed = results.filter((r) => r.crashes > 0);
  const total = results.reduce((n, r) => n + r.executions, 0);
  console.log(`fuzz: ${results.length} target(s), ${total} executions, ${failed.length} failed`);
  return failed.length > 0 ? 1 : 0;
}

if (import.meta.main) Deno.exit(await main());
