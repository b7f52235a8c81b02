/**
 * Builds the Rust core (`core/`) into `core/target/release/libdenovisor_core.so`
 * on demand, and says clearly what is missing when it cannot.
 *
 * {@link ensureCoreLibrary} runs on every import of denovisor, so its common
 * case, "nothing changed", only hashes the core's sources (~100 KB) and
 * compares the hash with the stamp written after the last successful build.
 *
 * Dependencies come from crates.io when cargo can reach it, otherwise from
 * Debian's packaged crates (see `debian_crates.ts`).
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";
import {
  type DebianCratesProblem,
  ensureDebianCrates,
  isDebianCacheReady,
} from "./debian_crates.ts";
import {
  absolutePath,
  exists,
  joinPath,
  lockFile,
  parentPath,
  pathOfFileUrl,
  readEnv,
} from "./fs_util.ts";

/** The file name of the core library that cargo produces. */
export const CORE_LIBRARY_FILE = "libdenovisor_core.so";

/**
 * The file name of the jailer program (`core/src/bin/denovisor-jailer.rs`),
 * which the same `cargo build --release` puts beside the library.
 */
export const JAILER_FILE = "denovisor-jailer";

/**
 * The jailer program built with a core library: the file beside it.
 *
 * @param libraryPath The path {@link ensureCoreLibrary} returned.
 * @returns The path of `denovisor-jailer` in the same folder (not checked).
 * @example
 * ```ts
 * import { ensureCoreLibrary, jailerPathOf } from "denovisor/src/build/core_build.ts";
 * console.log(jailerPathOf(await ensureCoreLibrary()));
 * ```
 */
export function jailerPathOf(libraryPath: string): string {
  return joinPath(parentPath(libraryPath), JAILER_FILE);
}

/** Where dependencies come from: `auto` tries crates.io, then Debian's packages. */
export type CrateSource = "auto" | "crates-io" | "debian";

/** Options of {@link ensureCoreLibrary}. */
export interface EnsureCoreOptions {
  /** The folder holding `Cargo.toml` (default: this checkout's `core/`). */
  coreDir?: string;
  /** Print nothing on stderr (default false: show progress while building). */
  quiet?: boolean;
  /** Rebuild even when the sources did not change (default false). */
  force?: boolean;
  /** Where dependencies come from (default `auto`). */
  crateSource?: CrateSource;
  /**
   * The cache of Debian's crates (default: `.cache/debian-crates/` at the
   * repository root, or `debian-crates/` in {@link denovisorCacheDir} when this
   * module was imported from a URL).
   */
  debianCacheDir?: string;
}

/**
 * Returns the absolute path of the core library, building it first when the
 * core's sources (`Cargo.toml`, `Cargo.lock`, `src/**`) changed since the last
 * build or it was never built. Progress goes to stderr unless `quiet`.
 *
 * @param options Which core to build and how.
 * @returns The absolute path of `libdenovisor_core.so`.
 * @throws {DenovisorError} `BUILD_FAILED` naming what is missing: cargo, a
 * reachable crate source, apt, or the tail of cargo's output.
 * @example
 * ```ts
 * import { ensureCoreLibrary } from "denovisor/src/build/core_build.ts";
 * const path = await ensureCoreLibrary();
 * const lib = Deno.dlopen(path, { dv_abi_version: { parameters: [], result: "u32" } });
 * console.log(lib.symbols.dv_abi_version());
 * lib.close();
 * ```
 */
export async function ensureCoreLibrary(options: EnsureCoreOptions = {}): Promise<string> {
  const coreDir = options.coreDir === undefined ? defaultCoreDir() : absolutePath(options.coreDir);
  const libraryPath = joinPath(coreDir, "target", "release", CORE_LIBRARY_FILE);
  const stampPath = `${libraryPath}.stamp`;
  if (!options.force && isUpToDate(libraryPath, stampPath, await hashCoreSources(coreDir))) {
    return libraryPath;
  }

  Deno.mkdirSync(joinPath(coreDir, "target"), { recursive: true });
  using _lock = await lockFile(joinPath(coreDir, "target", ".denovisor-build.lock"));
  // Another process may have finished the same build while we waited; its
  // result counts unless the caller asked for a rebuild.
  const sourceHash = await hashCoreSources(coreDir);
  if (!options.force && isUpToDate(libraryPath, stampPath, sourceHash)) return libraryPath;

  const progress = (line: string) => {
    if (!options.quiet) console.error(`denovisor: ${line}`);
  };
  const firstBuild = !exists(libraryPath);
  progress(
    firstBuild
      ? "building the Rust core (first run, ~30 s)..."
      : options.force
      ? "rebuilding the Rust core..."
      : "the Rust core's sources changed, rebuilding...",
  );
  const started = performance.now();
  // A failed build must not leave the old stamp vouching for the old library.
  // The new stamp holds the hash taken before the build: if a source changes
  // meanwhile, the next call sees a mismatch and rebuilds rather than trusting
  // a library that may predate the edit.
  removeIfPresent(stampPath);
  await build(coreDir, options, progress);
  if (!exists(libraryPath)) {
    throw new DenovisorError(
      "BUILD_FAILED",
      `cargo reported success but ${libraryPath} does not exist (does a cargo config set build.target?)`,
    );
  }
  Deno.writeTextFileSync(stampPath, `${sourceHash}\n`);
  progress(`built ${libraryPath} in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  return libraryPath;
}

/**
 * Tells whether this process can use KVM: undefined when `/dev/kvm` opens
 * read-write, otherwise a message saying what to fix.
 *
 * @returns undefined, or why KVM cannot be used.
 * @example
 * ```ts
 * import { checkKvmAccess } from "denovisor/src/build/core_build.ts";
 * const problem = checkKvmAccess();
 * if (problem) console.error(problem);
 * ```
 */
export function checkKvmAccess(): string | undefined {
  try {
    Deno.openSync("/dev/kvm", { read: true, write: true }).close();
    return undefined;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      return "/dev/kvm does not exist: this host offers no KVM; enable VT-x/AMD-V in the " +
        "firmware and load kvm_intel or kvm_amd (in a VM: enable nested virtualization)";
    }
    if (error instanceof Deno.errors.PermissionDenied) {
      return "permission denied on /dev/kvm: add your user to the kvm group " +
        "(sudo usermod -aG kvm $USER) and log in again";
    }
    if (error instanceof Deno.errors.NotCapable) {
      return "Deno may not open /dev/kvm: run with --allow-read=/dev/kvm --allow-write=/dev/kvm";
    }
    return `cannot open /dev/kvm: ${(error as Error).message}`;
  }
}

/**
 * The folder where denovisor caches downloaded and built things for remote
 * imports: `$DENOVISOR_CACHE_DIR`, else `$XDG_CACHE_HOME/denovisor`, else
 * `~/.cache/denovisor`.
 *
 * @returns An absolute path (not created).
 * @example
 * ```ts
 * import { denovisorCacheDir } from "denovisor/src/build/core_build.ts";
 * console.log(denovisorCacheDir()); // e.g. /home/me/.cache/denovisor
 * ```
 */
export function denovisorCacheDir(): string {
  const explicit = readEnv("DENOVISOR_CACHE_DIR");
  if (explicit) return absolutePath(explicit);
  const xdg = readEnv("XDG_CACHE_HOME");
  if (xdg) return absolutePath(xdg, "denovisor");
  const home = readEnv("HOME");
  if (home) return absolutePath(home, ".cache", "denovisor");
  throw new DenovisorError(
    "IO",
    "cannot choose a cache folder: HOME is not set; set DENOVISOR_CACHE_DIR",
  );
}

/**
 * Lists the files the core's build reads, relative to `coreDir` with `/`
 * separators, sorted: `Cargo.toml`, `Cargo.lock` (and any other `Cargo.*`)
 * and every file under `src/` (hidden files such as editor swap files and
 * `~` backups excepted).
 *
 * @param coreDir The folder holding `Cargo.toml`.
 * @returns The relative paths.
 * @example
 * ```ts
 * import { listCoreSources } from "denovisor/src/build/core_build.ts";
 * console.log(listCoreSources("core")); // ["Cargo.lock", "Cargo.toml", "src/abi.rs", ...]
 * ```
 */
export function listCoreSources(coreDir: string): string[] {
  const files: string[] = [];
  for (const entry of exists(coreDir) ? Deno.readDirSync(coreDir) : []) {
    if (entry.name.startsWith("Cargo.") && !entry.name.endsWith("~")) files.push(entry.name);
  }
  const walk = (relativeDir: string) => {
    for (const entry of Deno.readDirSync(joinPath(coreDir, relativeDir))) {
      if (entry.name.startsWith(".") || entry.name.endsWith("~")) continue;
      const path = `${relativeDir}/${entry.name}`;
      if (entry.isDirectory) walk(path);
      else files.push(path);
    }
  };
  if (exists(joinPath(coreDir, "src"))) walk("src");
  // Code-unit order, not localeCompare: the hash must not depend on the locale.
  return files.sort((a, b) => a < b ? -1 : a > b ? 1 : 0);
}

/**
 * Hashes the core's sources (see {@link listCoreSources}): the value the
 * build stamp is compared with.
 *
 * @param coreDir The folder holding `Cargo.toml`.
 * @returns A hex SHA-256 over the paths and contents.
 * @throws {DenovisorError} `BUILD_FAILED` when `coreDir` has no `Cargo.toml`.
 * @example
 * ```ts
 * import { hashCoreSources } from "denovisor/src/build/core_build.ts";
 * console.log(await hashCoreSources("core"));
 * ```
 */
export async function hashCoreSources(coreDir: string): Promise<string> {
  const files = exists(coreDir) ? listCoreSources(coreDir) : [];
  if (!files.includes("Cargo.toml")) {
    throw new DenovisorError(
      "BUILD_FAILED",
      `${joinPath(coreDir, "Cargo.toml")} does not exist: not the denovisor core's folder`,
    );
  }
  const encoder = new TextEncoder();
  const parts: Uint8Array[] = [encoder.encode("denovisor-core-sources-v1\0")];
  for (const path of files) {
    const content = Deno.readFileSync(joinPath(coreDir, path));
    parts.push(encoder.encode(`${path}\0${content.length}\0`), content);
  }
  const all = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
  let offset = 0;
  for (const part of parts) {
    all.set(part, offset);
    offset += part.length;
  }
  return hex(await crypto.subtle.digest("SHA-256", all));
}

function isUpToDate(libraryPath: string, stampPath: string, sourceHash: string): boolean {
  try {
    return exists(libraryPath) && Deno.readTextFileSync(stampPath).trim() === sourceHash;
  } catch {
    return false;
  }
}

/** Fetches the dependencies (crates.io, else Debian) and runs `cargo build --release`. */
async function build(
  coreDir: string,
  options: EnsureCoreOptions,
  progress: (line: string) => void,
): Promise<void> {
  const cargo = findCargo();
  const lockPath = joinPath(coreDir, "Cargo.lock");
  const lockBefore = readTextIfPresent(lockPath);
  // Building from `coreDir/target` whatever CARGO_TARGET_DIR says: the library
  // must end up where ensureCoreLibrary looks for it.
  const env = { CARGO_TARGET_DIR: joinPath(coreDir, "target") };
  try {
    const buildArgs = ["build", "--release"];
    let source = options.crateSource ?? "auto";
    let cratesIoProblem = "";
    if (source !== "debian") {
      // Fetching first tells "no network" apart from "does not compile". The
      // short budget keeps an offline machine from waiting on retries.
      const fetched = await runCargo(cargo, ["fetch"], coreDir, {
        ...env,
        CARGO_NET_RETRY: "0",
        CARGO_HTTP_TIMEOUT: "15",
      }, false);
      if (fetched.code === 0) {
        source = "crates-io";
      } else if (source === "crates-io") {
        throw new DenovisorError(
          "BUILD_FAILED",
          `cargo fetch failed with exit code ${fetched.code}:\n${tail(fetched.lines)}`,
        );
      } else {
        cratesIoProblem = lastError(fetched.lines);
        progress(
          `cannot fetch from crates.io (${cratesIoProblem}); using Debian's packaged crates`,
        );
        source = "debian";
      }
    }
    if (source === "debian") {
      const crates = await ensureDebianCrates(
        options.debianCacheDir ?? defaultDebianCacheDir(),
        { progress: !options.quiet },
      );
      if (!crates.ok) throw noCrateSource(crates.problem, crates.detail, cratesIoProblem);
      buildArgs.push(
        "--offline",
        "--config",
        'source.crates-io.replace-with="debian"',
        "--config",
        // A TOML basic string: JSON's escaping of a path is valid TOML.
        `source.debian.directory=${JSON.stringify(crates.registryDir)}`,
      );
    }
    const built = await runCargo(cargo, buildArgs, coreDir, env, !options.quiet);
    if (built.code !== 0) {
      const hint = source === "debian" && built.lines.some((l) => l.includes("no matching package"))
        ? " (a dependency Debian does not package? see DEBIAN_CRATE_PACKAGES in " +
          "src/build/debian_crates.ts)"
        : "";
      throw new DenovisorError(
        "BUILD_FAILED",
        `cargo build --release failed with exit code ${built.code}${hint}:\n${tail(built.lines)}`,
      );
    }
  } finally {
    restoreLockfile(lockPath, lockBefore);
  }
}

function noCrateSource(
  problem: DebianCratesProblem,
  debianDetail: string,
  cratesIoProblem: string,
): DenovisorError {
  const cratesIo = cratesIoProblem ? `cargo fetch: ${cratesIoProblem}` : "not tried";
  if (problem === "archive-unreachable") {
    return new DenovisorError(
      "BUILD_FAILED",
      `cannot get the Rust core's dependencies: neither crates.io nor the Debian archive is ` +
        `reachable (crates.io: ${cratesIo}; Debian: ${debianDetail})`,
    );
  }
  if (problem === "apt-missing") {
    return new DenovisorError(
      "BUILD_FAILED",
      `cannot get the Rust core's dependencies: crates.io is not reachable (${cratesIo}) and ` +
        `${debianDetail}; connect to crates.io or build on a Debian-like host with apt`,
    );
  }
  return new DenovisorError(
    "BUILD_FAILED",
    `cannot get the Rust core's dependencies from Debian's packages: ${debianDetail} ` +
      `(crates.io: ${cratesIo})`,
  );
}

/**
 * Puts Cargo.lock back the way the repository keeps it.
 *
 * Cargo adds a `checksum` line to every registry package it resolves: Debian's
 * crates carry the placeholder "Could not get crate checksum", crates.io's the
 * real one. The committed file has no placeholders and must work with both
 * sources, so checksum lines the old file did not have are dropped. When the
 * set of packages is unchanged this restores the old content byte for byte;
 * when a dependency was added, its new entries are kept.
 */
function restoreLockfile(lockPath: string, before: string | undefined): void {
  const after = readTextIfPresent(lockPath);
  if (after === undefined) {
    if (before !== undefined) Deno.writeTextFileSync(lockPath, before);
    return;
  }
  // Placeholders in the old file are leftovers of an interrupted build.
  const committed = withoutPlaceholders(before ?? "");
  const packageKey = (block: string) =>
    ["name", "version", "source"]
      .map((field) => new RegExp(`^${field} = (.*)$`, "m").exec(block)?.[1] ?? "")
      .join(" ");
  const committedBlocks = committed.split("\n\n");
  const committedKeys = new Set(committedBlocks.map(packageKey));
  const hadChecksum = new Set(
    committedBlocks.filter((block) => /^checksum = /m.test(block)).map(packageKey),
  );
  const afterBlocks = withoutPlaceholders(after).split("\n\n");
  const samePackages = afterBlocks.length === committedBlocks.length &&
    afterBlocks.every((block) => committedKeys.has(packageKey(block)));
  const restored = samePackages ? committed : afterBlocks.map((block) => {
    if (!committedKeys.has(packageKey(block)) || hadChecksum.has(packageKey(block))) return block;
    return block.split("\n").filter((line) => !line.startsWith("checksum = ")).join("\n");
  }).join("\n\n");
  if (restored !== after) Deno.writeTextFileSync(lockPath, restored);
}

function withoutPlaceholders(lockfile: string): string {
  return lockfile.replaceAll('checksum = "Could not get crate checksum"\n', "");
}

/**
 * Runs cargo with its output captured (and echoed to stderr when `echo`).
 * Cargo writes its progress to stderr; both streams go into one tail.
 */
async function runCargo(
  cargo: string,
  args: string[],
  cwd: string,
  env: Record<string, string>,
  echo: boolean,
): Promise<{ code: number; lines: string[] }> {
  const child = new Deno.Command(cargo, {
    args,
    cwd,
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const lines: string[] = [];
  const pump = async (stream: ReadableStream<Uint8Array>) => {
    let pending = "";
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
      if (echo) writeAllToStderr(chunk);
      pending += chunk;
      const complete = pending.split("\n");
      pending = complete.pop() ?? "";
      lines.push(...complete);
      // Only the tail is ever shown; a long build must not grow memory.
      if (lines.length > 400) lines.splice(0, lines.length - 200);
    }
    if (pending) lines.push(pending);
  };
  const [status] = await Promise.all([child.status, pump(child.stdout), pump(child.stderr)]);
  return { code: status.code, lines };
}

function writeAllToStderr(text: string): void {
  const bytes = new TextEncoder().encode(text);
  for (let written = 0; written < bytes.length;) {
    written += Deno.stderr.writeSync(bytes.subarray(written));
  }
}

function tail(lines: string[], count = 40): string {
  return lines.filter((line) => line.trim() !== "").slice(-count).join("\n");
}

/** The most specific line of a failed cargo command: its last `Caused by` cause. */
function lastError(lines: string[]): string {
  const meaningful = lines.map((line) => line.trim()).filter((line) => line !== "");
  return meaningful.at(-1) ?? "no output";
}

/**
 * Finds cargo: on PATH, else in rustup's default location (rustup's PATH
 * change only reaches new login shells).
 */
function findCargo(): string {
  const candidates = (readEnv("PATH") ?? "").split(":").filter((dir) => dir !== "")
    .map((dir) => joinPath(dir, "cargo"));
  const cargoHome = readEnv("CARGO_HOME") ??
    (readEnv("HOME") ? joinPath(readEnv("HOME")!, ".cargo") : undefined);
  if (cargoHome) candidates.push(joinPath(cargoHome, "bin", "cargo"));
  for (const candidate of candidates) {
    try {
      const info = Deno.statSync(candidate);
      if (info.isFile && ((info.mode ?? 0o111) & 0o111) !== 0) return candidate;
    } catch {
      // Not in this folder; try the next.
    }
  }
  throw new DenovisorError(
    "BUILD_FAILED",
    "cargo is not installed (not on PATH, not in ~/.cargo/bin): install Rust with rustup " +
      "(https://rustup.rs) or with apt (`apt-get install cargo`), then retry",
  );
}

function defaultCoreDir(): string {
  if (!import.meta.url.startsWith("file:")) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `ensureCoreLibrary needs coreDir when denovisor is loaded from ${import.meta.url}`,
    );
  }
  return pathOfFileUrl(new URL("../../core", import.meta.url));
}

/**
 * The extra cargo arguments that make a cargo command in `core/` use the same
 * crates as the last build: Debian's packaged crates (offline) when their cache
 * is populated, nothing otherwise (cargo's own registry).
 *
 * @returns Arguments to put after cargo's subcommand.
 * @example
 * ```ts
 * import { coreCrateSourceArgs } from "denovisor/src/build/core_build.ts";
 * const args = ["test", "--release", ...coreCrateSourceArgs()];
 * console.log(args);
 * ```
 */
export function coreCrateSourceArgs(): string[] {
  const cacheDir = defaultDebianCacheDir();
  if (!isDebianCacheReady(cacheDir)) return [];
  const registry = joinPath(cacheDir, "root", "usr", "share", "cargo", "registry");
  return [
    "--offline",
    "--config",
    'source.crates-io.replace-with="debian"',
    "--config",
    `source.debian.directory="${registry}"`,
  ];
}

function defaultDebianCacheDir(): string {
  if (import.meta.url.startsWith("file:")) {
    return pathOfFileUrl(new URL("../../.cache/debian-crates", import.meta.url));
  }
  return joinPath(denovisorCacheDir(), "debian-crates");
}

function readTextIfPresent(path: string): string | undefined {
  try {
    return Deno.readTextFileSync(path);
  } catch {
    return undefined;
  }
}

function removeIfPresent(path: string): void {
  try {
    Deno.removeSync(path);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
}

function hex(digest: ArrayBuffer): string {
  return Array.from(new Uint8Array(digest), (byte) => byte.toString(16).padStart(2, "0")).join("");
}
