/**
 * Builds small guest programs from GNU-as `.S` sources with the machine's own
 * gcc/as/ld: freestanding, static, not position-independent, linked with
 * `guest/link.ld` at a chosen load address, as an ELF64 executable or a flat
 * binary. Outputs are cached under `.cache/guests/` in the repository, keyed by
 * everything that can change them, so a rebuild of an unchanged guest costs a
 * file read.
 *
 * @module
 */

import { absolutePath, parentPath, pathOfFileUrl, sha256Hex } from "./fs_util.ts";
import { DenovisorError } from "../errors.ts";
import { runTool, type RunToolOptions, type Toolchain, toolchainProbe } from "./toolchain.ts";

/** Options of {@link buildGuest}. */
export interface BuildGuestOptions {
  /**
   * `"elf"` (default): a static ELF64 x86-64 executable (ET_EXEC), loaded by its
   * program headers. `"flat"`: the raw bytes from the load address on
   * (`objcopy -O binary`); the entry point is the first byte.
   */
  format?: "elf" | "flat";
  /**
   * The guest-physical address the image is linked at. Default: 0x7c00 for
   * `bits: 16`, 0x100000 (1 MiB) for `bits: 64`. 64-bit images must stay at or
   * above 0x10000 (the VMM's boot structures live below), 16-bit images below
   * 1 MiB.
   */
  loadAddress?: number;
  /**
   * The code's entry mode width: 16 (real mode) or 64 (long/user mode, the
   * default). It selects the default load address and the address checks and is
   * visible to the source as the macro `GUEST_BITS`; a 16-bit source still says
   * `.code16` itself.
   */
  bits?: 16 | 64;
}

/** Where the repository's guest sources live. */
const GUEST_DIR = new URL("../../guest/", import.meta.url);
/** The linker script every guest is linked with. */
const LINKER_SCRIPT = new URL("link.ld", GUEST_DIR);
/** Build outputs, keyed by a hash of their inputs. */
const CACHE_DIR = new URL("../../.cache/guests/", import.meta.url);
/** Bumped whenever the build command changes in a way the key does not show. */
const CACHE_FORMAT = 1;
/** 64-bit images must not overlap the VMM's boot structures below this address. */
const RESERVED_END = 0x10000;
/** Real mode addresses end at 1 MiB. */
const REAL_MODE_END = 0x100000;
/** How the build tools are run: a missing one is reported as needed for guests. */
const TOOL_OPTIONS: RunToolOptions = { neededFor: "building guests" };
/** The build tools, probed once per process; their versions are part of the cache key. */
const probeToolchain = toolchainProbe(["gcc", "as", "ld", "objcopy"], TOOL_OPTIONS);

/**
 * Resolves a file under the repository's `guest/` directory, relative to this
 * module, so it works from any working directory of a `file:` checkout.
 *
 * @param name A path relative to `guest/`, e.g. `"hello/hello.S"`.
 * @returns The file's URL.
 * @throws {DenovisorError} `INVALID_ARGUMENT` when `name` leaves `guest/`.
 * @example
 * ```ts
 * import { buildGuest, guestSourceUrl } from "denovisor/src/build/guest_build.ts";
 * const image = await buildGuest(guestSourceUrl("hello/hello.S"));
 * console.log(`hello guest: ${image.length} bytes`);
 * ```
 */
export function guestSourceUrl(name: string): URL {
  const url = new URL(name, GUEST_DIR);
  if (!url.href.startsWith(GUEST_DIR.href)) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `Guest source ${JSON.stringify(name)} is outside the guest/ directory`,
    );
  }
  return url;
}

/**
 * Assembles and links a GNU-as `.S` guest source (run through the C preprocessor)
 * into a static ELF64 image or a flat binary.
 *
 * The source's `_start` is the entry point; for flat images it must be the first
 * byte of `.text` (or be placed in `.text.entry`). Quoted `#include`, `.include`
 * and `.incbin` files are resolved relative to the source's directory and take
 * part in the cache key.
 *
 * Needs `--allow-run` (gcc, objcopy), `--allow-read` and `--allow-write` (the
 * cache in `.cache/guests/` and a temporary directory).
 *
 * @param source Path (relative to the working directory) or `file:` URL of the
 *   `.S` file.
 * @param options Output format, load address and code width.
 * @returns The image's bytes.
 * @throws {DenovisorError} `BUILD_FAILED` when a tool is missing, the source
 *   cannot be read, or the assembler or linker fail (with their output);
 *   `INVALID_ARGUMENT` for an impossible load address.
 * @example Build the built-in guest and a flat real-mode test guest
 * ```ts
 * import { buildGuest, guestSourceUrl } from "denovisor/src/build/guest_build.ts";
 * const hello = await buildGuest(guestSourceUrl("hello/hello.S"));
 * const boot = await buildGuest("tests/guests/real_hello.S", { bits: 16, format: "flat" });
 * console.log(hello.length, boot.length);
 * ```
 */
export async function buildGuest(
  source: string | URL,
  options: BuildGuestOptions = {},
): Promise<Uint8Array> {
  const bits = options.bits ?? 64;
  const format = options.format ?? "elf";
  const loadAddress = options.loadAddress ?? (bits === 16 ? 0x7c00 : 0x100000);
  checkOptions(bits, format, loadAddress);

  const sourcePath = toPath(source);
  const sourceBytes = await readSource(sourcePath);
  const tools = await probeToolchain();
  const key = await cacheKey(sourcePath, sourceBytes, tools, { bits, format, loadAddress });
  const cached = new URL(key, cacheDir());
  try {
    return await Deno.readFile(cached);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }

  const image = await assemble(sourcePath, tools, { bits, format, loadAddress });
  await storeAtomically(cached, image);
  return image;
}

function checkOptions(bits: number, format: string, loadAddress: number): void {
  if (bits !== 16 && bits !== 64) {
    throw new DenovisorError("INVALID_ARGUMENT", `Guest bits ${bits} is not 16 or 64`);
  }
  if (format !== "elf" && format !== "flat") {
    throw new DenovisorError("INVALID_ARGUMENT", `Guest format ${format} is not elf or flat`);
  }
  if (!Number.isSafeInteger(loadAddress) || loadAddress < 0) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `Load address ${loadAddress} is not a non-negative integer`,
    );
  }
  const hex = `0x${loadAddress.toString(16)}`;
  if (bits === 16 && loadAddress >= REAL_MODE_END) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `Load address ${hex} is above the 1 MiB a 16-bit guest can address`,
    );
  }
  if (bits === 64 && loadAddress < RESERVED_END) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `Load address ${hex} overlaps the VMM's boot structures below 0x10000`,
    );
  }
}

function toPath(source: string | URL): string {
  if (typeof source === "string") return absolutePath(source);
  if (source.protocol !== "file:") {
    throw new DenovisorError(
      "BUILD_FAILED",
      `Guest source ${source.href} is not a local file: only file: URLs can be assembled`,
    );
  }
  return pathOfFileUrl(source);
}

async function readSource(path: string): Promise<Uint8Array> {
  try {
    return await Deno.readFile(path);
  } catch (e) {
    throw new DenovisorError(
      "BUILD_FAILED",
      `Cannot read guest source ${path}: ${e instanceof Error ? e.message : e}`,
      { cause: e },
    );
  }
}

function cacheDir(): URL {
  if (CACHE_DIR.protocol !== "file:") {
    throw new DenovisorError(
      "BUILD_FAILED",
      `Guests can only be built from a local checkout, this module is at ${import.meta.url}`,
    );
  }
  return CACHE_DIR;
}

interface ResolvedOptions {
  bits: 16 | 64;
  format: "elf" | "flat";
  loadAddress: number;
}

/** Files a source pulls in by a quoted path, relative to its directory. */
const INCLUDE_PATTERN = /^\s*(?:#\s*include|\.include|\.incbin)\s+"([^"]+)"/gm;

/**
 * Hashes the source, the files it includes (transitively), the linker script,
 * the options and the tool versions.
 */
async function cacheKey(
  sourcePath: string,
  sourceBytes: Uint8Array,
  tools: Toolchain,
  options: ResolvedOptions,
): Promise<string> {
  const parts: string[] = [
    `format ${CACHE_FORMAT}`,
    JSON.stringify(options),
    ...tools.versions,
    `link.ld ${await sha256Hex(await Deno.readFile(LINKER_SCRIPT))}`,
    `source ${await sha256Hex(sourceBytes)}`,
  ];
  const seen = new Set<string>([sourcePath]);
  const pending: Array<[string, Uint8Array]> = [[sourcePath, sourceBytes]];
  while (pending.length > 0) {
    const [path, bytes] = pending.pop()!;
    const text = new TextDecoder().decode(bytes);
    for (const match of text.matchAll(INCLUDE_PATTERN)) {
      const included = absolutePath(parentPath(path), match[1]);
      if (seen.has(included)) continue;
      seen.add(included);
      try {
        const data = await Deno.readFile(included);
        parts.push(`include ${match[1]} ${await sha256Hex(data)}`);
        if (!match[0].includes(".incbin")) pending.push([included, data]);
      } catch {
        // The build itself reports the missing file; just keep the key distinct.
        parts.push(`include ${match[1]} missing`);
      }
    }
  }
  return await sha256Hex(new TextEncoder().encode(parts.join("\n")));
}

async function assemble(
  sourcePath: string,
  tools: Toolchain,
  options: ResolvedOptions,
): Promise<Uint8Array> {
  const dir = await Deno.makeTempDir({ prefix: "denovisor-guest-" });
  try {
    const elf = `${dir}/guest.elf`;
    const address = `0x${options.loadAddress.toString(16)}`;
    const args = [
      "-nostdlib",
      "-static",
      "-no-pie",
      "-ffreestanding",
      `-DGUEST_BITS=${options.bits}`,
      `-DGUEST_LOAD_ADDRESS=${address}`,
      "-Wa,--noexecstack",
      "-Wl,--build-id=none",
      "-Wl,-z,noexecstack",
      ...(tools.ldHasRwxSwitch ? ["-Wl,--no-warn-rwx-segments"] : []),
      `-Wl,-T,${pathOfFileUrl(LINKER_SCRIPT)}`,
      `-Wl,--defsym=__load_address=${address}`,
      "-o",
      elf,
      sourcePath,
    ];
    // cwd = the source's directory, so .incbin paths resolve like #include paths.
    const gcc = await runTool("gcc", args, { ...TOOL_OPTIONS, cwd: parentPath(sourcePath) });
    if (gcc.code !== 0) {
      throw new DenovisorError(
        "BUILD_FAILED",
        `Assembling ${sourcePath} failed (gcc exited with ${gcc.code}):\n` +
          (gcc.stderr.trim() || gcc.stdout.trim()),
      );
    }
    if (options.format === "elf") return await Deno.readFile(elf);

    const bin = `${dir}/guest.bin`;
    const objcopy = await runTool("objcopy", ["-O", "binary", elf, bin], TOOL_OPTIONS);
    if (objcopy.code !== 0) {
      throw new DenovisorError(
        "BUILD_FAILED",
        `Converting ${sourcePath} to a flat binary failed (objcopy exited with ${objcopy.code}):\n` +
          objcopy.stderr.trim(),
      );
    }
    return await Deno.readFile(bin);
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** Writes then renames, so a concurrent reader never sees half an image. */
async function storeAtomically(target: URL, data: Uint8Array): Promise<void> {
  await Deno.mkdir(new URL(".", target), { recursive: true });
  const temp = new URL(
    `${target.pathname.split("/").pop()}.${Deno.pid}.${crypto.randomUUID()}.tmp`,
    target,
  );
  try {
    await Deno.writeFile(temp, data);
    await Deno.rename(temp, target);
  } catch (e) {
    await Deno.remove(temp).catch(() => {});
    throw e;
  }
}
