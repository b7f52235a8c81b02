/**
 * Debian's kernel modules for Linux test guests. Debian's kernel builds the
 * virtio drivers and ext4 as modules; its package holds the uncompressed
 * `.ko` files but no `modules.dep` (depmod runs at install time), so the
 * dependencies are read here from each module's `.modinfo` ELF section
 * (`name=`, `depends=`, `vermagic=`), and the package's `modules.builtin` and
 * `boot/config-*` say what is built in.
 *
 * {@link fetchDebianModules} downloads the kernel package once (the one whose
 * `vmlinuz` {@link fetchDebianKernel} fetched), keeps it with an index of every
 * module in `.cache/kernels/modules-VERSION/`, extracts the modules asked for
 * and their dependencies there, and returns them in load order.
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";
import {
  debianToolsProblem,
  downloadDeb,
  fetchDebianKernel,
  kernelCacheDir,
} from "./debian_kernel.ts";

/** What a module's `.modinfo` section says. */
export interface ModuleInfo {
  /** `name=`: the module's name as `/proc/modules` lists it (underscores). */
  name: string;
  /** `depends=`: the modules that must be loaded first (may be empty). */
  depends: string[];
  /** `vermagic=`: the kernel release and build options it was built for. */
  vermagic: string;
  /** Every `key=value` field, values in order (`alias`, `softdep`, `license`, ...). */
  fields: Record<string, string[]>;
}

/** One module extracted from the kernel package. */
export interface KernelModule {
  /** Its name as `/proc/modules` lists it (underscores, no `.ko`). */
  name: string;
  /** Its path on the host, under `.cache/kernels/modules-VERSION/`. */
  path: string;
  /** Its path under `lib/modules/VERSION/` in the package, e.g. `kernel/fs/ext4/ext4.ko`. */
  file: string;
  /** The modules it depends on (`depends=`). */
  depends: string[];
  /** `vermagic=`. */
  vermagic: string;
}

/** The outcome of {@link fetchDebianModules}: the modules, or why they cannot be had. */
export type ModulesFetchResult =
  | {
    ok: true;
    /** The kernel release, e.g. `6.1.0-50-amd64`. */
    version: string;
    /** The package they came from, e.g. `linux-image-6.1.0-50-amd64`. */
    package: string;
    /** The cache directory `.cache/kernels/modules-VERSION/`. */
    dir: string;
    /** The modules asked for and their dependencies, each after what it depends on. */
    modules: KernelModule[];
    /** The names asked for that the kernel has built in (nothing to load). */
    builtIn: string[];
    /** The kernel's configuration (`boot/config-VERSION`): `CONFIG_EXT4_FS` -> `m`. */
    config: Record<string, string>;
  }
  | { ok: false; reason: string };

/**
 * The name a module is known by (`/proc/modules`, `depends=`): its file name
 * without the directory and `.ko`, with `-` read as `_`.
 *
 * @param nameOrFile A module's name, file name or path.
 * @returns Its name.
 * @example
 * ```ts
 * import { moduleName } from "denovisor/src/linux/modules.ts";
 * console.log(moduleName("kernel/drivers/char/hw_random/virtio-rng.ko")); // virtio_rng
 * ```
 */
export function moduleName(nameOrFile: string): string {
  return nameOrFile.replace(/^.*\//, "").replace(/\.ko$/, "").replaceAll("-", "_");
}

function imageError(what: string, message: string): DenovisorError {
  return new DenovisorError("IMAGE", `${what}: ${message}`);
}

/**
 * The bytes of the section `name` of a little-endian ELF64 file, or undefined
 * when it has none. Every offset and size is checked against the file.
 *
 * @param elf The file's bytes.
 * @param name The section's name, e.g. `.modinfo`.
 * @param what What the file is, for error messages.
 * @returns The section's bytes (a view into `elf`), or undefined.
 * @throws {DenovisorError} `IMAGE` when it is not an ELF64 little-endian file or
 *   its section headers lie outside it.
 * @example
 * ```ts ignore
 * import { elfSection } from "denovisor/src/linux/modules.ts";
 * const modinfo = elfSection(await Deno.readFile("ext4.ko"), ".modinfo");
 * ```
 */
export function elfSection(
  elf: Uint8Array,
  name: string,
  what = "ELF file",
): Uint8Array | undefined {
  if (elf.length < 64 || elf[0] !== 0x7f || elf[1] !== 0x45 || elf[2] !== 0x4c || elf[3] !== 0x46) {
    throw imageError(what, "not an ELF file");
  }
  if (elf[4] !== 2 || elf[5] !== 1) throw imageError(what, "not a little-endian ELF64 file");
  const view = new DataView(elf.buffer, elf.byteOffset, elf.byteLength);
  const shoff = view.getBigUint64(0x28, true);
  const shentsize = view.getUint16(0x3a, true);
  let shnum = view.getUint16(0x3c, true);
  let shstrndx = view.getUint16(0x3e, true);
  if (shoff === 0n) return undefined;
  if (shentsize < 64) throw imageError(what, `section header size ${shentsize} < 64`);
  const header = (index: number) => {
    const at = shoff + BigInt(index) * BigInt(shentsize);
    if (at + 64n > BigInt(elf.length)) {
      throw imageError(what, `section header ${index} lies outside the file`);
    }
    const h = Number(at);
    return {
      name: view.getUint32(h, true),
      type: view.getUint32(h + 4, true),
      offset: view.getBigUint64(h + 0x18, true),
      size: view.getBigUint64(h + 0x20, true),
      link: view.getUint32(h + 0x28, true),
    };
  };
  // Extended numbering: the real counts live in section header 0.
  if (shnum === 0) shnum = Number(header(0).size);
  if (shstrndx === 0xffff) shstrndx = header(0).link;
  if (shnum > 0x10000) throw imageError(what, `${shnum} section headers`);
  const bytes = (h: ReturnType<typeof header>, index: number) => {
    if (h.type === 8) return new Uint8Array(0); // SHT_NOBITS
    if (h.offset + h.size > BigInt(elf.length)) {
      throw imageError(what, `section ${index} lies outside the file`);
    }
    return elf.subarray(Number(h.offset), Number(h.offset + h.size));
  };
  if (shstrndx >= shnum) throw imageError(what, `section name table ${shstrndx} >= ${shnum}`);
  const names = bytes(header(shstrndx), shstrndx);
  const wanted = new TextEncoder().encode(name);
  for (let i = 0; i < shnum; i++) {
    const h = header(i);
    const at = h.name;
    if (at + wanted.length >= names.length) continue;
    if (wanted.every((b, k) => names[at + k] === b) && names[at + wanted.length] === 0) {
      return bytes(h, i);
    }
  }
  return undefined;
}

/**
 * Parses a kernel module's `.modinfo` section: NUL-separated `key=value`
 * strings. `name=` is required; `depends=` and `vermagic=` default to empty.
 *
 * @param ko The module's bytes (a relocatable ELF64 `.ko`).
 * @param what What the file is, for error messages (default `kernel module`).
 * @returns Its name, dependencies, vermagic and every field.
 * @throws {DenovisorError} `IMAGE` when it is not an ELF64 file, has no
 *   `.modinfo` section or no `name=` in it.
 * @example
 * ```ts ignore
 * import { parseModinfo } from "denovisor/src/linux/modules.ts";
 * const info = parseModinfo(await Deno.readFile("virtio_pci.ko"));
 * console.log(info.name, info.depends); // virtio_pci [ "virtio_ring", ... ]
 * ```
 */
export function parseModinfo(ko: Uint8Array, what = "kernel module"): ModuleInfo {
  const section = elfSection(ko, ".modinfo", what);
  if (section === undefined) throw imageError(what, "no .modinfo section");
  const fields: Record<string, string[]> = {};
  const text = new TextDecoder();
  let start = 0;
  for (let i = 0; i <= section.length; i++) {
    if (i < section.length && section[i] !== 0) continue;
    if (i > start) {
      const entry = text.decode(section.subarray(start, i));
      const eq = entry.indexOf("=");
      if (eq > 0) (fields[entry.slice(0, eq)] ??= []).push(entry.slice(eq + 1));
    }
    start = i + 1;
  }
  const name = fields.name?.[0];
  if (!name) throw imageError(what, "no name= in .modinfo");
  const depends = (fields.depends?.[0] ?? "").split(",").filter((d) => d !== "");
  return { name, depends, vermagic: fields.vermagic?.[0] ?? "", fields };
}

/**
 * Orders modules so that each comes after every module it depends on: the
 * closure of `names` under `depends`, depth first, in the order asked.
 *
 * @param graph Each known module's dependencies, by name.
 * @param names The modules wanted.
 * @returns The wanted modules and their dependencies, in load order.
 * @throws {DenovisorError} `INVALID_ARGUMENT` for a name the graph does not
 *   know (a dependency too) or a dependency cycle.
 * @example
 * ```ts
 * import { loadOrder } from "denovisor/src/linux/modules.ts";
 * const graph = new Map([["ext4", ["jbd2", "mbcache"]], ["jbd2", []], ["mbcache", []]]);
 * console.log(loadOrder(graph, ["ext4"])); // [ "jbd2", "mbcache", "ext4" ]
 * ```
 */
export function loadOrder(
  graph: ReadonlyMap<string, readonly string[]>,
  names: readonly string[],
): string[] {
  const order: string[] = [];
  const state = new Map<string, "visiting" | "done">();
  const visit = (name: string, path: string[]) => {
    const seen = state.get(name);
    if (seen === "done") return;
    if (seen === "visiting") {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `module dependency cycle: ${[...path, name].join(" -> ")}`,
      );
    }
    const depends = graph.get(name);
    if (depends === undefined) {
      const needer = path.at(-1);
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        needer ? `module ${needer} depends on ${name}, which does not exist` : `no module ${name}`,
      );
    }
    state.set(name, "visiting");
    for (const dep of depends) visit(dep, [...path, name]);
    state.set(name, "done");
    order.push(name);
  };
  for (const name of names) visit(name, []);
  return order;
}

/** Every module of one kernel package, as the cache keeps it (`index.json`). */
interface ModuleIndex {
  package: string;
  version: string;
  /** The package's file name, kept beside the index. */
  deb: string;
  modules: Record<string, { file: string; depends: string[]; vermagic: string }>;
  /** Names of the modules built into the kernel (`modules.builtin`). */
  builtIn: string[];
  config: Record<string, string>;
}

/** Reads a byte stream in exact-size pieces. */
class StreamReader {
  #reader: ReadableStreamDefaultReader<Uint8Array>;
  #chunks: Uint8Array[] = [];
  #buffered = 0;
  #ended = false;

  constructor(stream: ReadableStream<Uint8Array>) {
    this.#reader = stream.getReader();
  }

  async #fill(n: number): Promise<void> {
    while (this.#buffered < n && !this.#ended) {
      const { value, done } = await this.#reader.read();
      if (done) this.#ended = true;
      else if (value.length) {
        this.#chunks.push(value);
        this.#buffered += value.length;
      }
    }
  }

  /** `n` bytes, or undefined at the end of the stream (a partial read is an error). */
  async read(n: number): Promise<Uint8Array | undefined> {
    await this.#fill(n);
    if (this.#buffered === 0 && n > 0) return undefined;
    if (this.#buffered < n) throw new Error("the package's tar stream is truncated");
    const out = new Uint8Array(n);
    let at = 0;
    while (at < n) {
      const chunk = this.#chunks[0];
      const take = Math.min(chunk.length, n - at);
      out.set(chunk.subarray(0, take), at);
      at += take;
      if (take === chunk.length) this.#chunks.shift();
      else this.#chunks[0] = chunk.subarray(take);
    }
    this.#buffered -= n;
    return out;
  }

  /** Discards `n` bytes. */
  async skip(n: number): Promise<void> {
    while (n > 0) {
      if (this.#buffered === 0) await this.#fill(1);
      if (this.#buffered === 0) throw new Error("the package's tar stream is truncated");
      const chunk = this.#chunks[0];
      const take = Math.min(chunk.length, n);
      if (take === chunk.length) this.#chunks.shift();
      else this.#chunks[0] = chunk.subarray(take);
      this.#buffered -= take;
      n -= take;
    }
  }

  async cancel(): Promise<void> {
    await this.#reader.cancel().catch(() => {});
  }
}

function cString(bytes: Uint8Array): string {
  const end = bytes.indexOf(0);
  return new TextDecoder().decode(end < 0 ? bytes : bytes.subarray(0, end));
}

function tarSize(field: Uint8Array): number {
  if (field[0] & 0x80) { // base-256
    let value = 0;
    for (const [i, b] of field.entries()) value = value * 256 + (i === 0 ? b & 0x7f : b);
    return value;
  }
  const text = cString(field).trim();
  const value = text === "" ? 0 : parseInt(text, 8);
  if (!Number.isSafeInteger(value) || value < 0) throw new Error(`bad tar size "${text}"`);
  return value;
}

/**
 * Streams the files of a `.deb` (`dpkg-deb --fsys-tarfile`) and hands each
 * regular file `wanted` accepts to `take` with its bytes; the rest are skipped
 * without being kept.
 */
async function scanDeb(
  deb: string,
  wanted: (path: string) => boolean,
  take: (path: string, data: Uint8Array) => void | Promise<void>,
): Promise<void> {
  const child = new Deno.Command("dpkg-deb", {
    args: ["--fsys-tarfile", deb],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const reader = new StreamReader(child.stdout);
  try {
    let longName: string | undefined;
    for (;;) {
      const header = await reader.read(512);
      if (header === undefined || header.every((b) => b === 0)) break;
      const size = tarSize(header.subarray(124, 136));
      const type = String.fromCharCode(header[156]);
      let path = cString(header.subarray(0, 100));
      if (cString(header.subarray(257, 262)) === "ustar") {
        const prefix = cString(header.subarray(345, 500));
        if (prefix) path = `${prefix}/${path}`;
      }
      const padded = Math.ceil(size / 512) * 512;
      if (type === "L" || type === "x") {
        const body = (await reader.read(padded)) ?? new Uint8Array(0);
        if (type === "L") longName = cString(body.subarray(0, size));
        else {
          const pax = /(?:^|\n)\d+ path=([^\n]*)\n/.exec(
            new TextDecoder().decode(body.subarray(0, size)),
          );
          if (pax) longName = pax[1];
        }
        continue;
      }
      if (longName !== undefined) [path, longName] = [longName, undefined];
      if ((type === "0" || type === "\0") && wanted(path)) {
        const body = await reader.read(padded);
        if (body === undefined) throw new Error("the package's tar stream is truncated");
        await take(path, body.subarray(0, size));
      } else {
        await reader.skip(padded);
      }
    }
  } finally {
    await reader.cancel();
  }
  const status = await child.status;
  if (!status.success) {
    throw new Error(`dpkg-deb --fsys-tarfile ${deb} failed: ${(await stderr).trim()}`);
  }
}

/** `CONFIG_X=value` lines of a kernel configuration (`# ... is not set` lines are left out). */
function parseConfig(text: string): Record<string, string> {
  const config: Record<string, string> = {};
  for (const line of text.split("\n")) {
    const match = /^(CONFIG_[A-Za-z0-9_]+)=(.*)$/.exec(line);
    if (match) config[match[1]] = match[2].replace(/^"(.*)"$/, "$1");
  }
  return config;
}

/** Builds the index of every module in the package: one pass over its files. */
async function indexDeb(deb: string, pkg: string, version: string): Promise<ModuleIndex> {
  const root = `./lib/modules/${version}/`;
  const index: ModuleIndex = {
    package: pkg,
    version,
    deb: deb.replace(/^.*\//, ""),
    modules: {},
    builtIn: [],
    config: {},
  };
  let sawConfig = false;
  const text = new TextDecoder();
  await scanDeb(
    deb,
    (path) =>
      (path.startsWith(`${root}kernel/`) && path.endsWith(".ko")) ||
      path === `${root}modules.builtin` || path === `./boot/config-${version}`,
    (path, data) => {
      if (path === `${root}modules.builtin`) {
        index.builtIn = text.decode(data).split("\n").filter((l) => l !== "").map(moduleName);
      } else if (path === `./boot/config-${version}`) {
        index.config = parseConfig(text.decode(data));
        sawConfig = true;
      } else {
        const file = path.slice(root.length);
        const info = parseModinfo(data, `${pkg}:${file}`);
        index.modules[info.name] = { file, depends: info.depends, vermagic: info.vermagic };
      }
    },
  );
  if (!sawConfig) throw new Error(`${pkg} has no boot/config-${version}`);
  if (Object.keys(index.modules).length === 0) throw new Error(`${pkg} holds no modules`);
  return index;
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/** Writes a file whole or not at all (a temporary name, then a rename). */
async function writeAtomically(path: string, data: Uint8Array): Promise<void> {
  await Deno.mkdir(path.replace(/\/[^/]*$/, ""), { recursive: true });
  const part = `${path}.part-${Deno.pid}`;
  await Deno.writeFile(part, data);
  await Deno.rename(part, path);
}

/** Options of {@link fetchDebianModules}. */
export interface FetchModulesOptions {
  /** Receives progress lines (downloads, scans, extractions); default: none. */
  log?: (line: string) => void;
  /** The cache directory (default `.cache/kernels/`, where the kernel is). */
  cacheDir?: string;
}

/**
 * Fetches kernel modules of Debian's current kernel (the one
 * {@link fetchDebianKernel} fetches): the named modules and every module they
 * depend on, in load order. The kernel package is downloaded once with
 * `apt-get download` (on the host: kvmbox has no network) and kept in
 * `.cache/kernels/modules-VERSION/` with an index of all its modules; the
 * modules are extracted there as they are asked for, so a second call
 * downloads nothing.
 *
 * @param names Module names (`virtio_blk`, `virtio-rng`, `ext4.ko` all work).
 *   A name the kernel has built in is reported in `builtIn` and skipped.
 * @param options `log` receives progress lines; `cacheDir` moves the cache.
 * @returns The modules, or why they cannot be had (no apt, no network, ...).
 * @throws {DenovisorError} `INVALID_ARGUMENT` for a name that is neither a
 *   module of the package nor built into the kernel.
 * @example
 * ```ts ignore
 * import { fetchDebianModules } from "denovisor/src/linux/modules.ts";
 * const result = await fetchDebianModules(["virtio_blk", "ext4"], { log: console.error });
 * if (result.ok) console.log(result.modules.map((m) => m.name)); // [ "virtio", ..., "ext4" ]
 * else console.error(`no modules: ${result.reason}`);
 * ```
 */
export async function fetchDebianModules(
  names: readonly string[],
  options: FetchModulesOptions = {},
): Promise<ModulesFetchResult> {
  const log = options.log ?? (() => {});
  const kernel = await fetchDebianKernel({ log });
  if (!kernel.ok) return { ok: false, reason: `no kernel to match: ${kernel.reason}` };
  const version = kernel.file.path.replace(/^.*vmlinuz-/, "");
  const pkg = `linux-image-${version}`;
  const cacheDir = (options.cacheDir ?? kernelCacheDir()).replace(/\/?$/, "/");
  const dir = `${cacheDir}modules-${version}`;
  const indexPath = `${dir}/index.json`;

  let index: ModuleIndex;
  /** The package's path, downloading it when it is not kept yet. */
  const debPath = async (known?: string): Promise<string> => {
    if (known && await exists(`${dir}/${known}`)) return `${dir}/${known}`;
    const problem = await debianToolsProblem();
    if (problem) throw new Error(problem);
    log(`downloading ${pkg} with apt-get download (for its modules)`);
    const tmp = await Deno.makeTempDir({ dir, prefix: "download-" });
    try {
      const deb = await downloadDeb(pkg, tmp);
      const kept = `${dir}/${deb.replace(/^.*\//, "")}`;
      await Deno.rename(deb, kept);
      return kept;
    } finally {
      await Deno.remove(tmp, { recursive: true }).catch(() => {});
    }
  };
  try {
    await Deno.mkdir(dir, { recursive: true });
    if (await exists(indexPath)) {
      index = JSON.parse(await Deno.readTextFile(indexPath));
    } else {
      const deb = await debPath();
      log(`indexing the modules of ${deb}`);
      index = await indexDeb(deb, pkg, version);
      await writeAtomically(indexPath, new TextEncoder().encode(JSON.stringify(index)));
    }
  } catch (e) {
    return { ok: false, reason: e instanceof Error ? e.message : String(e) };
  }

  const builtIn = new Set(index.builtIn);
  const graph = new Map(Object.entries(index.modules).map(([n, m]) => [n, m.depends]));
  const wanted: string[] = [];
  const reportedBuiltIn: string[] = [];
  for (const raw of names) {
    const name = moduleName(raw);
    if (graph.has(name)) wanted.push(name);
    else if (builtIn.has(name)) reportedBuiltIn.push(name);
    else {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `no kernel module "${raw}" in ${pkg}: neither a .ko under lib/modules/${version}/ ` +
          `nor built into the kernel (modules.builtin)`,
      );
    }
  }
  const order = loadOrder(graph, wanted);
  const modules: KernelModule[] = order.map((name) => {
    const m = index.modules[name];
    return {
      name,
      path: `${dir}/${m.file}`,
      file: m.file,
      depends: m.depends,
      vermagic: m.vermagic,
    };
  });

  try {
    const missing = new Set<string>();
    for (const m of modules) {
      if (!(await exists(m.path))) missing.add(`./lib/modules/${version}/${m.file}`);
    }
    if (missing.size) {
      const deb = await debPath(index.deb);
      log(`extracting ${missing.size} modules from ${deb}`);
      await scanDeb(deb, (path) => missing.has(path), async (path, data) => {
        missing.delete(path);
        await writeAtomically(`${dir}/${path.slice(`./lib/modules/${version}/`.length)}`, data);
      });
      if (missing.size) throw new Error(`${pkg} lacks ${[...missing].join(", ")}`);
    }
  } catch (e) {
    return { ok: false, reason: e instanceof Error ? e.message : String(e) };
  }
  return {
    ok: true,
    version,
    package: pkg,
    dir,
    modules,
    builtIn: reportedBuiltIn,
    config: index.config,
  };
}
