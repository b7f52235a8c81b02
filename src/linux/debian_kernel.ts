/**
 * Debian's own kernel and busybox, for tests on real images: downloaded with
 * `apt-get download` (no system install; the system's apt configuration is only
 * read) and unpacked with `dpkg-deb` into `.cache/kernels/` in the repository
 * (gitignored). Once cached, nothing is downloaded again.
 *
 * @module
 */

import { pathOfFileUrl } from "../build/fs_util.ts";
import { extractVmlinux } from "./vmlinux.ts";

const CACHE_DIR = new URL("../../.cache/kernels/", import.meta.url);
/** The metapackage whose dependency names the current kernel package. */
const KERNEL_METAPACKAGE = "linux-image-amd64";
/** A statically linked busybox, usable as an initramfs's only program. */
const BUSYBOX_PACKAGE = "busybox-static";

/** A file fetched from Debian's archive. */
export interface DebianFile {
  /** Where it is on disk. */
  path: string;
  /** The package it came from. */
  package: string;
}

/** The outcome of a fetch: the file, or why it could not be had. */
export type FetchResult =
  | { ok: true; file: DebianFile }
  | { ok: false; reason: string };

interface Output {
  code: number;
  signal: Deno.Signal | null;
  stdout: string;
  stderr: string;
}

/** No apt call may take longer than this (a download of ~70 MB included). */
const APT_TIMEOUT_MS = 300_000;

async function run(command: string, args: string[], cwd?: string): Promise<Output> {
  const output = await new Deno.Command(command, {
    args,
    cwd,
    stdin: "null",
    env: { LC_ALL: "C" },
    signal: AbortSignal.timeout(APT_TIMEOUT_MS),
  }).output();
  const text = new TextDecoder();
  return {
    code: output.code,
    signal: output.signal,
    stdout: text.decode(output.stdout),
    stderr: text.decode(output.stderr),
  };
}

async function hasTool(tool: string): Promise<boolean> {
  try {
    await run(tool, ["--version"]);
    return true;
  } catch {
    return false;
  }
}

function cachePath(): string {
  return pathOfFileUrl(CACHE_DIR);
}

/** The cached file whose name starts with `prefix`, newest name last. */
async function cached(prefix: string): Promise<string | undefined> {
  const names: string[] = [];
  try {
    for await (const entry of Deno.readDir(CACHE_DIR)) {
      if (entry.isFile && entry.name.startsWith(prefix)) names.push(entry.name);
    }
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  names.sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
  const last = names.at(-1);
  return last === undefined ? undefined : `${cachePath()}${last}`;
}

/** The kernel package `linux-image-amd64` depends on, refreshing apt's lists once
 * if they are missing. */
async function kernelPackage(log: (line: string) => void): Promise<string | undefined> {
  for (const attempt of [1, 2]) {
    const deps = await run("apt-cache", ["depends", KERNEL_METAPACKAGE]);
    const match = /Depends:\s*(linux-image-[0-9][^\s]*-amd64)\b/.exec(deps.stdout);
    if (match) return match[1];
    if (attempt === 1) {
      log("apt has no package lists for the kernel; running apt-get update");
      await run("apt-get", ["update", "-qq"]);
    }
  }
  return undefined;
}

/**
 * Downloads the Debian package `pkg` into `dir` with `apt-get download` (the
 * system's apt configuration is only read).
 *
 * @param pkg The package's name, e.g. `linux-image-6.1.0-50-amd64`.
 * @param dir An existing directory to download into.
 * @returns The `.deb`'s path.
 * @throws {Error} When apt-get fails, times out or produces no `.deb`.
 * @example
 * ```ts ignore
 * import { downloadDeb } from "denovisor/src/linux/debian_kernel.ts";
 * const deb = await downloadDeb("busybox-static", await Deno.makeTempDir());
 * ```
 */
export async function downloadDeb(pkg: string, dir: string): Promise<string> {
  const download = await run("apt-get", ["download", "-q", pkg], dir);
  if (download.signal !== null) {
    throw new Error(`apt-get download ${pkg} did not finish in ${APT_TIMEOUT_MS / 1000} s`);
  }
  if (download.code !== 0) {
    throw new Error(`apt-get download ${pkg} failed: ${download.stderr.trim()}`);
  }
  for await (const entry of Deno.readDir(dir)) {
    if (entry.name.startsWith(`${pkg}_`) && entry.name.endsWith(".deb")) {
      return `${dir}/${entry.name}`;
    }
  }
  throw new Error(`apt-get download ${pkg} produced no .deb`);
}

/**
 * Why packages cannot be downloaded and unpacked here (a tool apt-get download
 * and dpkg-deb need is missing), or undefined when they can.
 *
 * @returns The problem, or undefined.
 * @example
 * ```ts
 * import { debianToolsProblem } from "denovisor/src/linux/debian_kernel.ts";
 * console.log((await debianToolsProblem()) ?? "apt-get and dpkg-deb are here");
 * ```
 */
export async function debianToolsProblem(): Promise<string | undefined> {
  for (const tool of ["apt-get", "apt-cache", "dpkg-deb", "tar"]) {
    if (!(await hasTool(tool))) return `${tool} is not installed (not a Debian-like host)`;
  }
  return undefined;
}

/**
 * The directory the fetched kernels, busybox and modules are cached in
 * (`.cache/kernels/` in the repository), with a trailing slash.
 *
 * @returns Its path.
 * @example
 * ```ts
 * import { kernelCacheDir } from "denovisor/src/linux/debian_kernel.ts";
 * console.log(kernelCacheDir()); // .../.cache/kernels/
 * ```
 */
export function kernelCacheDir(): string {
  return cachePath();
}

/** Downloads `pkg` and extracts its member `pattern` into `dir`. */
async function downloadAndExtract(pkg: string, pattern: string, dir: string): Promise<void> {
  const deb = await downloadDeb(pkg, dir);
  // dpkg-deb --fsys-tarfile | tar -x: only the wanted member, not the whole package.
  const dpkg = new Deno.Command("dpkg-deb", {
    args: ["--fsys-tarfile", deb],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const tar = new Deno.Command("tar", {
    args: ["-x", "-C", dir, pattern],
    stdin: "piped",
    stderr: "piped",
  }).spawn();
  await dpkg.stdout.pipeTo(tar.stdin);
  const [dpkgStatus, tarOutput] = await Promise.all([dpkg.output(), tar.output()]);
  if (!dpkgStatus.success || !tarOutput.success) {
    throw new Error(
      `extracting ${pattern} from ${deb} failed: ${new TextDecoder().decode(tarOutput.stderr)}`,
    );
  }
  await Deno.remove(deb);
}

/** How one file is fetched. */
interface FetchPlan {
  /** Prefix of its name in the cache (a cached file with it is reused). */
  prefix: string;
  /** The package to download. */
  pkg: (log: (line: string) => void) => Promise<string | undefined>;
  /** The file's path inside the package. */
  member: (pkg: string) => string;
  /** Its name in the cache. */
  name: (pkg: string) => string;
}

async function fetchInto(plan: FetchPlan, log: (line: string) => void): Promise<FetchResult> {
  const have = await cached(plan.prefix);
  if (have) return { ok: true, file: { path: have, package: "(cached)" } };
  const problem = await debianToolsProblem();
  if (problem) return { ok: false, reason: problem };
  const pkg = await plan.pkg(log);
  if (!pkg) return { ok: false, reason: "apt knows no package to download it from" };
  await Deno.mkdir(CACHE_DIR, { recursive: true });
  const dir = await Deno.makeTempDir({ dir: cachePath(), prefix: "download-" });
  try {
    log(`downloading ${pkg} with apt-get download`);
    const member = plan.member(pkg);
    await downloadAndExtract(pkg, member, dir);
    const target = `${cachePath()}${plan.name(pkg)}`;
    await Deno.rename(`${dir}/${member}`, target);
    return { ok: true, file: { path: target, package: pkg } };
  } catch (e) {
    return { ok: false, reason: e instanceof Error ? e.message : String(e) };
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/**
 * Fetches Debian's current amd64 kernel (the package `linux-image-amd64` depends
 * on, e.g. `linux-image-6.1.0-50-amd64`) and caches its `boot/vmlinuz-*` in
 * `.cache/kernels/`. Never throws for a host that cannot download it: the
 * result says why.
 *
 * @param options `log` receives progress lines (default: none).
 * @returns The bzImage's path, or the reason it is unavailable.
 * @example
 * ```ts
 * import { fetchDebianKernel } from "denovisor/src/linux/debian_kernel.ts";
 * const result = await fetchDebianKernel({ log: console.error });
 * if (result.ok) console.log(result.file.path);
 * else console.error(`no Debian kernel: ${result.reason}`);
 * ```
 */
export function fetchDebianKernel(
  options: { log?: (line: string) => void } = {},
): Promise<FetchResult> {
  const version = (pkg: string) => pkg.replace(/^linux-image-/, "");
  return fetchInto({
    prefix: "vmlinuz-",
    pkg: kernelPackage,
    member: (pkg) => `./boot/vmlinuz-${version(pkg)}`,
    name: (pkg) => `vmlinuz-${version(pkg)}`,
  }, options.log ?? (() => {}));
}

/**
 * Fetches Debian's `busybox-static` and caches its `bin/busybox` (a static
 * x86-64 executable) in `.cache/kernels/`.
 *
 * @param options `log` receives progress lines (default: none).
 * @returns The executable's path, or the reason it is unavailable.
 * @example
 * ```ts
 * import { fetchBusybox } from "denovisor/src/linux/debian_kernel.ts";
 * const result = await fetchBusybox();
 * console.log(result.ok ? result.file.path : result.reason);
 * ```
 */
export function fetchBusybox(
  options: { log?: (line: string) => void } = {},
): Promise<FetchResult> {
  return fetchInto({
    prefix: "busybox-",
    pkg: () => Promise.resolve(BUSYBOX_PACKAGE),
    member: () => "./bin/busybox",
    name: () => "busybox-static",
  }, options.log ?? (() => {}));
}

/**
 * Debian's kernel as an uncompressed `vmlinux` ELF: fetches the bzImage
 * ({@link fetchDebianKernel}) and extracts its payload once into
 * `.cache/kernels/vmlinux-VERSION.elf`. Booting the ELF skips the kernel's
 * decompressor (seconds under an emulator).
 *
 * @param options `log` receives progress lines (default: none).
 * @returns The ELF's path, or the reason it is unavailable.
 * @example
 * ```ts
 * import { fetchDebianVmlinux } from "denovisor/src/linux/debian_kernel.ts";
 * const result = await fetchDebianVmlinux();
 * console.log(result.ok ? result.file.path : result.reason);
 * ```
 */
export async function fetchDebianVmlinux(
  options: { log?: (line: string) => void } = {},
): Promise<FetchResult> {
  const kernel = await fetchDebianKernel(options);
  if (!kernel.ok) return kernel;
  const path = kernel.file.path.replace(/vmlinuz-([^/]+)$/, "vmlinux-$1.elf");
  try {
    await Deno.stat(path);
    return { ok: true, file: { path, package: kernel.file.package } };
  } catch {
    // Not extracted yet.
  }
  try {
    (options.log ?? (() => {}))(`extracting ${path} from ${kernel.file.path}`);
    const elf = await extractVmlinux(await Deno.readFile(kernel.file.path));
    await Deno.writeFile(`${path}.part`, elf);
    await Deno.rename(`${path}.part`, path);
    return { ok: true, file: { path, package: kernel.file.package } };
  } catch (e) {
    return { ok: false, reason: e instanceof Error ? e.message : String(e) };
  }
}
