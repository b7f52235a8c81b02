/**
 * Builds the two kinds of program issue 10's functions are made of:
 *
 * - the **function runtime** (`guest/fn/runtime/`): the small kernel a function
 *   VM boots, which runs a static Linux ELF at CPL3 and serves its system calls
 *   ({@link buildFunctionRuntime});
 * - **SDK functions**: C programs written against `guest/fn/sdk/dv_fn.h`, built
 *   as static, freestanding x86-64 Linux executables (raw system calls, no C
 *   library), so the same ELF runs in the runtime and natively
 *   ({@link buildFunction}).
 *
 * Outputs are cached under `.cache/fn/` in the repository, keyed by a hash of
 * every input file, the flags and the tool versions.
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";
import {
  installAtomically,
  localFileUrl as toFileUrl,
  pathOfFileUrl as pathOf,
  sha256Hex,
} from "./fs_util.ts";
import { runTool, type RunToolOptions, toolchainProbe } from "./toolchain.ts";

const GUEST_DIR = new URL("../../guest/", import.meta.url);
const CACHE_DIR = new URL("../../.cache/fn/", import.meta.url);
/** Bumped whenever the build changes in a way the key does not show. */
const CACHE_FORMAT = 1;

/** The runtime's sources, in link order (the kernel first: its stubs lead the image). */
const RUNTIME_SOURCES = [
  "fn/runtime/fn_kernel.S",
  "fn/runtime/fn_entry.S",
  "fn/runtime/fn_runtime.c",
];
/** Files the runtime's sources include (part of the key). */
const RUNTIME_INCLUDES = ["runtime/kernel.S", "fn/abi.h", "link.ld"];
const SDK_SOURCE = "fn/sdk/dv_fn.c";
const SDK_HEADER = "fn/sdk/dv_fn.h";

const COMMON_FLAGS = [
  "-O2",
  "-std=gnu11",
  "-Wall",
  "-Wextra",
  "-fno-stack-protector",
  "-fcf-protection=none",
  "-fno-asynchronous-unwind-tables",
  "-ffreestanding",
  "-static",
  "-nostdlib",
  "-fno-tree-loop-distribute-patterns",
  "-Wa,--noexecstack",
  "-Wl,--build-id=none",
  "-Wl,-z,noexecstack",
];

const TOOL_OPTIONS: RunToolOptions = { neededFor: "building functions", env: { LC_ALL: "C" } };
const probeToolchain = toolchainProbe(["gcc", "as", "ld"], TOOL_OPTIONS);

/**
 * Builds the function runtime: a static ELF64 linked at 0x100000 whose entry is
 * `_start` of `guest/fn/runtime/fn_kernel.S`, to be loaded in `long` mode with
 * rdi = the bundle's address and rsi = the RAM size.
 *
 * @returns The runtime image's bytes.
 * @throws {DenovisorError} `BUILD_FAILED` when gcc is missing or the build fails.
 * @example
 * ```ts
 * import { buildFunctionRuntime } from "denovisor/src/build/fn_build.ts";
 * const image = await buildFunctionRuntime();
 * console.log(image.length);
 * ```
 */
export async function buildFunctionRuntime(): Promise<Uint8Array> {
  const tools = await probeToolchain();
  const flags = [
    ...COMMON_FLAGS,
    "-mgeneral-regs-only",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-DGUEST_LOAD_ADDRESS=0x100000",
    ...(tools.ldHasRwxSwitch ? ["-Wl,--no-warn-rwx-segments"] : []),
    `-Wl,-T,${pathOf(new URL("link.ld", GUEST_DIR))}`,
    "-Wl,--defsym=__load_address=0x100000",
  ];
  const sources = RUNTIME_SOURCES.map((f) => new URL(f, GUEST_DIR));
  const keyed = [...sources, ...RUNTIME_INCLUDES.map((f) => new URL(f, GUEST_DIR))];
  const path = await cachedBuild(
    "fn-runtime",
    ".elf",
    keyed,
    [...flags, ...tools.versions],
    (out) => [
      ...flags,
      "-o",
      out,
      ...sources.map(pathOf),
      "-lgcc",
    ],
  );
  return await Deno.readFile(path);
}

/**
 * Builds a function written against the SDK (`guest/fn/sdk/dv_fn.h`) into a
 * static x86-64 Linux executable: `gcc -static -nostdlib -ffreestanding` with
 * the SDK's `dv_fn.c`. It runs in the function runtime and natively.
 *
 * @param source The C source (a path relative to the working directory, or a
 *   `file:` URL). Quoted includes resolve next to it and in `guest/fn/sdk/`.
 * @param out Where to copy the executable (default: its cache path).
 * @returns The executable's path.
 * @throws {DenovisorError} `BUILD_FAILED` when gcc is missing, the source cannot
 *   be read or it does not compile.
 * @example
 * ```ts
 * import { buildFunction } from "denovisor/src/build/fn_build.ts";
 * const elf = await buildFunction(new URL("../../guest/fn/examples/echo.c", import.meta.url));
 * console.log(elf);
 * ```
 */
export async function buildFunction(source: string | URL, out?: string): Promise<string> {
  const tools = await probeToolchain();
  const src = toFileUrl(source);
  const flags = [
    ...COMMON_FLAGS,
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    `-I${pathOf(new URL("fn/sdk/", GUEST_DIR))}`,
  ];
  const keyed = [src, new URL(SDK_SOURCE, GUEST_DIR), new URL(SDK_HEADER, GUEST_DIR)];
  const stem = pathOf(src).split("/").pop()!.replace(/\.c$/, "");
  const path = await cachedBuild(stem, "", keyed, [...flags, ...tools.versions], (o) => [
    ...flags,
    "-o",
    o,
    pathOf(src),
    pathOf(new URL(SDK_SOURCE, GUEST_DIR)),
    "-lgcc",
  ]);
  if (out === undefined) return path;
  await Deno.copyFile(path, out);
  await Deno.chmod(out, 0o755);
  return out;
}

/** Builds with gcc unless the cache has the output for these inputs. */
async function cachedBuild(
  stem: string,
  suffix: string,
  inputs: URL[],
  settings: string[],
  args: (out: string) => string[],
): Promise<string> {
  const parts = [`format ${CACHE_FORMAT}`, ...settings];
  for (const file of inputs) {
    let bytes: Uint8Array;
    try {
      bytes = await Deno.readFile(file);
    } catch (e) {
      throw new DenovisorError(
        "BUILD_FAILED",
        `Cannot read ${pathOf(file)}: ${e instanceof Error ? e.message : e}`,
        { cause: e },
      );
    }
    parts.push(`${pathOf(file)} ${await sha256Hex(bytes)}`);
  }
  const key = (await sha256Hex(new TextEncoder().encode(parts.join("\n")))).slice(0, 32);
  const output = new URL(`${stem}-${key}${suffix}`, CACHE_DIR);
  try {
    await Deno.stat(output);
    return pathOf(output);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  const dir = await Deno.makeTempDir({ prefix: "denovisor-fn-" });
  try {
    const built = `${dir}/${stem}`;
    const gcc = await runTool("gcc", args(built), TOOL_OPTIONS);
    if (gcc.code !== 0) {
      throw new DenovisorError(
        "BUILD_FAILED",
        `Building ${stem} failed (gcc exited with ${gcc.code}):\n` +
          (gcc.stderr.trim() || gcc.stdout.trim()),
      );
    }
    await installAtomically(built, output, 0o755);
    return pathOf(output);
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}
