/**
 * Debian's packaged Rust crates as a cargo directory source, for building the
 * core on machines that reach Debian's package archive but not crates.io.
 *
 * Debian ships crate sources in `librust-*-dev` packages under
 * `usr/share/cargo/registry/`. We resolve the dependency closure with apt's
 * simulator and unpack the packages with `dpkg-deb -x` into a private cache
 * folder: nothing is installed and the system's apt configuration is only read
 * (to find the archive it already uses), never changed.
 *
 * @module
 */

import { joinPath, lockFile } from "./fs_util.ts";

/** The Debian suite whose crate versions match `core/Cargo.toml`. */
export const DEBIAN_SUITE = "trixie";

/**
 * The packages of the core's direct dependencies; apt adds their closure.
 * When `core/Cargo.toml` gains a dependency, add its package here.
 */
export const DEBIAN_CRATE_PACKAGES: readonly string[] = [
  "librust-kvm-ioctls-dev",
  "librust-kvm-bindings-dev",
  "librust-vm-memory-dev",
  "librust-vmm-sys-util-dev",
  "librust-vm-superio-dev",
  "librust-libc-dev",
  "librust-thiserror-dev",
  "librust-serde-dev",
  "librust-serde-json-dev",
  "librust-virtio-queue-dev",
  "librust-virtio-bindings-dev",
];

/** Options of {@link ensureDebianCrates}. */
export interface DebianCratesOptions {
  /** Print progress on stderr (default true). */
  progress?: boolean;
  /** The root packages (default {@link DEBIAN_CRATE_PACKAGES}). */
  packages?: readonly string[];
  /**
   * The archive to download from (default: the Debian archive the system's
   * apt already uses, as `apt-get indextargets` reports it).
   */
  archiveUri?: string;
}

/** Why Debian's crates could not be made available. */
export type DebianCratesProblem =
  /** `apt-get` or `dpkg-deb` is not installed (not a Debian-like host). */
  | "apt-missing"
  /** No Debian archive is configured, or it could not be reached. */
  | "archive-unreachable"
  /** Anything else: a package missing from the suite, a broken download. */
  | "failed";

/** The outcome of {@link ensureDebianCrates}. */
export type DebianCratesResult =
  | {
    /** The crates are ready. */
    ok: true;
    /** The folder to use as cargo's `source.<name>.directory`. */
    registryDir: string;
    /** Whether this call downloaded them (false: the cache was reused). */
    downloaded: boolean;
  }
  | {
    /** The crates are not available. */
    ok: false;
    /** The kind of failure, to phrase the final error. */
    problem: DebianCratesProblem;
    /** What went wrong, in one or a few lines. */
    detail: string;
  };

/**
 * Makes Debian's packaged crates available in `cacheDir`, downloading them
 * once (~4 MB, a few seconds) and reusing the folder afterwards. Safe to call
 * from several processes at once: they serialize on a lock file.
 *
 * The folder's layout: `sources.list`, `status`, `lists/` and `cache/` for apt;
 * `pkgs.txt` (the dependency closure), `debs/` (the packages) and `root/`
 * (their unpacked contents, renamed into place once complete).
 *
 * @param cacheDir The cache folder (created if needed).
 * @param options Progress, packages and archive.
 * @returns Where the crates are, or why they are not.
 * @example
 * ```ts
 * import { ensureDebianCrates } from "denovisor/src/build/debian_crates.ts";
 * const crates = await ensureDebianCrates(".cache/debian-crates");
 * if (crates.ok) console.log(crates.registryDir);
 * else console.error(crates.problem, crates.detail);
 * ```
 */
export async function ensureDebianCrates(
  cacheDir: string,
  options: DebianCratesOptions = {},
): Promise<DebianCratesResult> {
  const packages = options.packages ?? DEBIAN_CRATE_PACKAGES;
  // apt runs in other working folders below, so a relative path would break.
  if (!cacheDir.startsWith("/")) cacheDir = joinPath(Deno.cwd(), cacheDir);
  const registryDir = joinPath(cacheDir, "root", "usr", "share", "cargo", "registry");
  if (isPopulated(cacheDir, packages)) return { ok: true, registryDir, downloaded: false };

  Deno.mkdirSync(cacheDir, { recursive: true });
  using _lock = await lockFile(joinPath(cacheDir, ".lock"));
  // Another process may have populated the cache while we waited for the lock.
  if (isPopulated(cacheDir, packages)) return { ok: true, registryDir, downloaded: false };

  const say = (line: string) => {
    if (options.progress ?? true) console.error(`denovisor: ${line}`);
  };
  const failure = await populate(cacheDir, packages, options.archiveUri, say);
  return failure ?? { ok: true, registryDir, downloaded: true };
}

/**
 * Reports whether `cacheDir` already holds the unpacked closure of `packages`.
 *
 * @param cacheDir The cache folder of {@link ensureDebianCrates}.
 * @param packages The root packages that must be part of the closure.
 * @returns True when the crates can be used without downloading.
 * @example
 * ```ts
 * import { isDebianCacheReady } from "denovisor/src/build/debian_crates.ts";
 * console.log(isDebianCacheReady(".cache/debian-crates"));
 * ```
 */
export function isDebianCacheReady(
  cacheDir: string,
  packages: readonly string[] = DEBIAN_CRATE_PACKAGES,
): boolean {
  return isPopulated(cacheDir, packages);
}

function isPopulated(cacheDir: string, packages: readonly string[]): boolean {
  // `root/` is renamed into place only after every package was unpacked, so its
  // presence means "complete"; `pkgs.txt` tells which roots the closure covers.
  try {
    Deno.statSync(joinPath(cacheDir, "root", "usr", "share", "cargo", "registry"));
    const closure = new Set(Deno.readTextFileSync(joinPath(cacheDir, "pkgs.txt")).split("\n"));
    return packages.every((name) => closure.has(name));
  } catch {
    return false;
  }
}

/** Runs the recipe; returns undefined on success, else the failure. */
async function populate(
  dir: string,
  packages: readonly string[],
  archiveUri: string | undefined,
  say: (line: string) => void,
): Promise<DebianCratesResult | undefined> {
  const uri = archiveUri ?? await systemDebianArchive();
  if (typeof uri !== "string") return uri;

  // Packages of an earlier, different closure would be unpacked too: start afresh.
  removeIfPresent(joinPath(dir, "debs"));
  for (const sub of ["lists/partial", "cache/archives/partial", "debs"]) {
    Deno.mkdirSync(joinPath(dir, sub), { recursive: true });
  }
  Deno.writeTextFileSync(
    joinPath(dir, "sources.list"),
    `deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${uri} ${DEBIAN_SUITE} main\n`,
  );
  // An empty dpkg status makes apt resolve the full closure, as on an empty system.
  Deno.writeTextFileSync(joinPath(dir, "status"), "");
  const aptOptions = [
    ["Dir::Etc::sourcelist", joinPath(dir, "sources.list")],
    ["Dir::Etc::sourceparts", "/nonexistent"],
    ["Dir::State::Lists", joinPath(dir, "lists")],
    ["Dir::State::status", joinPath(dir, "status")],
    ["Dir::Cache", joinPath(dir, "cache")],
    // Fail fast on a dead network instead of apt's default retries.
    ["Acquire::Retries", "0"],
    ["Acquire::http::Timeout", "20"],
    ["Acquire::https::Timeout", "20"],
  ].flatMap(([key, value]) => ["-o", `${key}=${value}`]);
  if (currentUid() === 0) {
    // As root, apt drops to the `_apt` user for downloads, which cannot write
    // into a root-owned cache folder and warns about it; stay root instead.
    aptOptions.push("-o", "APT::Sandbox::User=root");
  }

  say(`downloading Debian's Rust crate packages (${DEBIAN_SUITE}) from ${uri} (~4 MB, once)...`);
  const update = await run("apt-get", [...aptOptions, "update"], dir);
  if (update === undefined) return aptMissing("apt-get");
  // `apt-get update` exits 0 even when every download failed, so look for the index.
  const fetchedIndex = [...Deno.readDirSync(joinPath(dir, "lists"))]
    .some((entry) =>
      entry.name.includes(`_dists_${DEBIAN_SUITE}_`) && /_Packages/.test(entry.name)
    );
  if (update.code !== 0 || !fetchedIndex) {
    return {
      ok: false,
      problem: "archive-unreachable",
      detail: `apt-get update from ${uri} ${DEBIAN_SUITE} failed: ${aptErrors(update.output)}`,
    };
  }

  const simulated = await run(
    "apt-get",
    [...aptOptions, "-s", "install", "--no-install-recommends", ...packages],
    dir,
  );
  if (simulated === undefined) return aptMissing("apt-get");
  if (simulated.code !== 0) {
    return {
      ok: false,
      problem: "failed",
      detail: `apt-get could not resolve ${packages.join(" ")} in ${DEBIAN_SUITE}: ${
        aptErrors(simulated.output)
      }`,
    };
  }
  // Only the crate sources matter; the closure also names rustc, binutils etc.
  const closure = simulated.output.split("\n")
    .map((line) => /^Inst (librust-\S+)/.exec(line)?.[1])
    .filter((name): name is string => name !== undefined);

  const debsDir = joinPath(dir, "debs");
  const download = await run("apt-get", [...aptOptions, "download", ...closure], debsDir);
  if (download === undefined) return aptMissing("apt-get");
  if (download.code !== 0) {
    return {
      ok: false,
      problem: download.output.includes("Could not") ? "archive-unreachable" : "failed",
      detail: `apt-get download failed: ${aptErrors(download.output)}`,
    };
  }

  say(`unpacking ${closure.length} crate packages...`);
  const partialRoot = joinPath(dir, "root.partial");
  removeIfPresent(partialRoot);
  for (const entry of Deno.readDirSync(debsDir)) {
    if (!entry.name.endsWith(".deb")) continue;
    const unpacked = await run("dpkg-deb", ["-x", joinPath(debsDir, entry.name), partialRoot], dir);
    if (unpacked === undefined) return aptMissing("dpkg-deb");
    if (unpacked.code !== 0) {
      return {
        ok: false,
        problem: "failed",
        detail: `dpkg-deb -x ${entry.name}: ${unpacked.output}`,
      };
    }
  }
  removeIfPresent(joinPath(dir, "root"));
  Deno.renameSync(partialRoot, joinPath(dir, "root"));
  // Written last: `pkgs.txt` plus `root/` is what isPopulated() trusts.
  Deno.writeTextFileSync(joinPath(dir, "pkgs.txt"), closure.join("\n") + "\n");
  return undefined;
}

/**
 * The Debian archive the system's apt already uses, with the suite left out.
 * Security and update archives are skipped: they hold only a suite's fixes.
 */
async function systemDebianArchive(): Promise<string | DebianCratesResult> {
  const listed = await run(
    "apt-get",
    ["indextargets", "--format", "$(REPO_URI) $(RELEASE)"],
    Deno.cwd(),
  );
  if (listed === undefined) return aptMissing("apt-get");
  const debianSuites = /^(trixie|bookworm|bullseye|forky|sid|stable|testing|unstable|oldstable)$/;
  for (const line of listed.output.split("\n")) {
    const [uri, release] = line.trim().split(/\s+/);
    if (uri && release && debianSuites.test(release)) return uri;
  }
  return {
    ok: false,
    problem: "archive-unreachable",
    detail: "apt has no Debian archive configured (`apt-get indextargets` lists none)",
  };
}

function currentUid(): number | null {
  try {
    return Deno.uid();
  } catch {
    return null; // Without --allow-sys; apt's default then applies.
  }
}

function aptMissing(tool: string): DebianCratesResult {
  return {
    ok: false,
    problem: "apt-missing",
    detail: `${tool} is not installed, so Debian's packaged crates cannot be used`,
  };
}

/** The lines of apt's output that explain a failure (its `E:`, `W:` and `Err:` lines). */
function aptErrors(output: string): string {
  const lines = output.split("\n").filter((line) => /^(E|W|Err):/.test(line.trim()));
  return (lines.length > 0 ? lines : output.trim().split("\n").slice(-3)).join("; ");
}

function removeIfPresent(path: string): void {
  try {
    Deno.removeSync(path, { recursive: true });
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
}

/**
 * Runs a program to completion with its output captured; undefined when the
 * program is not installed.
 */
async function run(
  program: string,
  args: string[],
  cwd: string,
): Promise<{ code: number; output: string } | undefined> {
  try {
    const { code, stdout, stderr } = await new Deno.Command(program, {
      args,
      cwd,
      stdin: "null",
      // apt translates its messages; we match on the English ones.
      env: { LC_ALL: "C" },
    }).output();
    const text = new TextDecoder();
    return { code, output: text.decode(stdout) + text.decode(stderr) };
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw error;
  }
}
