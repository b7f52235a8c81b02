/**
 * Builds the guest runtime's workloads (`guest/workloads/*.c`) twice from one C
 * source: as a guest image (a static ELF64 at 0x100000 with the runtime's CPL0
 * kernel, entered in `long` mode) and as a native Linux executable, so the same
 * code can be timed on the host and inside a VM. Any other C program written
 * against `guest/runtime/dv_guest.h` builds the same way with
 * {@link buildRuntimeGuest} and {@link buildRuntimeNative}.
 *
 * Outputs are cached under `.cache/workloads/` in the repository, keyed by a hash
 * of every input (the source, the files it includes, the runtime, the linker
 * script, the flags and the tool versions), so an unchanged build costs a few
 * file reads.
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
import { runTool, type RunToolOptions, type Toolchain, toolchainProbe } from "./toolchain.ts";

/** The workloads, by name: each is `guest/workloads/<name>.c`. */
export const WORKLOADS = ["cpu", "memory", "io", "syscall"] as const;

/** The name of a workload. */
export type WorkloadName = typeof WORKLOADS[number];

/** What a workload does with its argument, and its default size. */
export interface WorkloadInfo {
  /** The argument used when none (or 0) is given; the C source has the same default. */
  defaultArg: number;
  /** What the argument counts. */
  argUnit: string;
  /** What the report's `ops` counts. */
  opsUnit: string;
  /** One line on what is measured. */
  description: string;
}

/** The workloads' default sizes and units (the same table is in `guest/README.md`). */
export const WORKLOAD_INFO: Readonly<Record<WorkloadName, Readonly<WorkloadInfo>>> = {
  cpu: {
    defaultArg: 32,
    argUnit: "MiB hashed",
    opsUnit: "bytes hashed",
    description: "SHA-256 over generated data, all at CPL3",
  },
  memory: {
    defaultArg: 128,
    argUnit: "MiB of fresh memory",
    opsUnit: "bytes read or written",
    description: "touch every page of fresh memory, then stream over it",
  },
  io: {
    defaultArg: 20,
    argUnit: "thousands of 16-byte writes",
    opsUnit: "writes (hypercalls in a guest)",
    description: "WRITE hypercalls: one VM exit each",
  },
  syscall: {
    defaultArg: 200,
    argUnit: "thousands of system calls",
    opsUnit: "system calls",
    description: "SYSCALL into the guest kernel and back",
  },
};

/** Where the guest sources live. */
const GUEST_DIR = new URL("../../guest/", import.meta.url);
const RUNTIME_DIR = new URL("runtime/", GUEST_DIR);
const WORKLOAD_DIR = new URL("workloads/", GUEST_DIR);
const LINKER_SCRIPT = new URL("link.ld", GUEST_DIR);
/** Build outputs, keyed by a hash of their inputs. */
const CACHE_DIR = new URL("../../.cache/workloads/", import.meta.url);
/** Bumped whenever the build changes in a way the key does not show. */
const CACHE_FORMAT = 1;
/** Where guest images are linked and loaded (the VMM owns everything below 0x10000). */
const LOAD_ADDRESS = "0x100000";
/** Guest RAM a program needs besides its heap: 1 MiB below the image, the image,
 * the 1 MiB the allocator leaves for the stack, and slack. */
const BASE_MEMORY_MIB = 4;

/** The runtime's files, by target; every one of them is part of the cache key. */
const GUEST_RUNTIME = [
  "kernel.S",
  "crt0.S",
  "guest_rt.c",
  "irq.c",
  "pci.c",
  "virtio.c",
  "dv_common.c",
];
const NATIVE_RUNTIME = ["native_rt.c", "dv_common.c"];
const RUNTIME_HEADERS = ["dv_guest.h", "dv_pci.h", "dv_virtio.h"];

/**
 * Code generation flags shared by both targets, so the workload's own code is the
 * same machine code natively and in the guest: no stack protector or CET
 * instrumentation (the guest has neither), no PIE, and no loops turned into
 * calls to the C library's memset/memcpy (the guest's are simple loops).
 */
const COMMON_FLAGS = [
  "-O2",
  "-std=gnu11",
  "-Wall",
  "-Wextra",
  "-fno-stack-protector",
  "-fcf-protection=none",
  "-fno-pic",
  "-fno-pie",
  "-no-pie",
  "-fno-tree-loop-distribute-patterns",
  "-fno-asynchronous-unwind-tables",
];

/** Flags for the guest: freestanding, static, linked at the load address. */
function guestFlags(tools: Toolchain): string[] {
  return [
    ...COMMON_FLAGS,
    "-ffreestanding",
    "-static",
    "-nostdlib",
    `-DGUEST_LOAD_ADDRESS=${LOAD_ADDRESS}`,
    "-Wa,--noexecstack",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
    ...(tools.ldHasRwxSwitch ? ["-Wl,--no-warn-rwx-segments"] : []),
    `-Wl,-T,${pathOf(LINKER_SCRIPT)}`,
    `-Wl,--defsym=__load_address=${LOAD_ADDRESS}`,
  ];
}

const NATIVE_FLAGS = [...COMMON_FLAGS, "-DDV_NATIVE"];

/** How the build tools are run: a missing one is reported as needed for workloads. */
const TOOL_OPTIONS: RunToolOptions = {
  neededFor: "building workloads",
  // LC_ALL=C: plain ASCII quotes in the messages a BUILD_FAILED carries.
  env: { LC_ALL: "C" },
};
/** The build tools, probed once per process; their versions are part of the cache key. */
const probeToolchain = toolchainProbe(["gcc", "as", "ld"], TOOL_OPTIONS);

/**
 * The source file of a workload.
 *
 * @param name The workload.
 * @returns The `file:` URL of `guest/workloads/<name>.c`.
 * @throws {DenovisorError} `INVALID_ARGUMENT` for an unknown workload.
 * @example
 * ```ts
 * import { workloadSourceUrl } from "denovisor/src/build/workload_build.ts";
 * console.log(workloadSourceUrl("cpu").pathname); // .../guest/workloads/cpu.c
 * ```
 */
export function workloadSourceUrl(name: WorkloadName): URL {
  checkName(name);
  return new URL(`${name}.c`, WORKLOAD_DIR);
}

/**
 * The guest RAM a workload needs for an argument: its heap plus the image, the
 * stack and the VMM's low memory. Only `memory` allocates (its argument in MiB
 * plus 4); the others get 16 MiB.
 *
 * @param name The workload.
 * @param arg Its argument (0 or absent: the default).
 * @returns MiB of guest RAM to create the VM with.
 * @example
 * ```ts
 * import { workloadMemoryMiB } from "denovisor/src/build/workload_build.ts";
 * console.log(workloadMemoryMiB("memory", 64)); // 68
 * ```
 */
export function workloadMemoryMiB(name: WorkloadName, arg = 0): number {
  checkName(name);
  const effective = arg > 0 ? arg : WORKLOAD_INFO[name].defaultArg;
  return name === "memory" ? effective + BASE_MEMORY_MIB : 16;
}

/**
 * Builds a workload as a guest image: a static ELF64 x86-64 executable linked at
 * 0x100000 whose entry point is the runtime kernel's `_start`. Load it with
 * `mode: "long"` and pass the argument in rdi and the RAM size in rsi.
 *
 * @param name The workload.
 * @returns The image's bytes.
 * @throws {DenovisorError} `BUILD_FAILED` when gcc is missing or the build fails
 *   (with the compiler's output).
 * @example Run the cpu workload in a VM
 * ```ts
 * import { Vm } from "denovisor";
 * import { buildWorkloadGuest } from "denovisor/src/build/workload_build.ts";
 * using vm = await Vm.create({ memoryMiB: 16 });
 * vm.load(await buildWorkloadGuest("cpu"), { mode: "long", arguments: [8, 16 << 20] });
 * const result = await vm.run();
 * console.log(result.reportText); // {"workload":"cpu","arg":8,...}
 * ```
 */
export async function buildWorkloadGuest(name: WorkloadName): Promise<Uint8Array> {
  return await buildRuntimeGuest(workloadSourceUrl(name));
}

/**
 * Builds a workload as a native Linux executable. It takes the argument as its
 * only command-line argument and prints the same one-line JSON report as the
 * guest to stdout.
 *
 * @param name The workload.
 * @returns The absolute path of the executable (in the cache; do not modify it).
 * @throws {DenovisorError} `BUILD_FAILED` when gcc is missing or the build fails.
 * @example
 * ```ts
 * import { buildWorkloadNative } from "denovisor/src/build/workload_build.ts";
 * const path = await buildWorkloadNative("cpu");
 * const out = await new Deno.Command(path, { args: ["8"] }).output();
 * console.log(new TextDecoder().decode(out.stdout)); // {"workload":"cpu","arg":8,...}
 * ```
 */
export async function buildWorkloadNative(name: WorkloadName): Promise<string> {
  return await buildRuntimeNative(workloadSourceUrl(name));
}

/**
 * Builds any C program written against `guest/runtime/dv_guest.h` (it defines
 * `int main(uint64_t arg)`) as a guest image, linked with the runtime's kernel,
 * crt0 and support code. Quoted `#include`s are resolved next to the source and
 * in `guest/runtime/` and take part in the cache key.
 *
 * @param source Path (relative to the working directory) or `file:` URL of the
 *   `.c` file.
 * @returns The image's bytes (static ELF64, entry `_start` of `kernel.S`).
 * @throws {DenovisorError} `BUILD_FAILED` when gcc is missing, the source cannot
 *   be read or the build fails.
 * @example Build a test guest that faults
 * ```ts
 * import { buildRuntimeGuest } from "denovisor/src/build/workload_build.ts";
 * const image = await buildRuntimeGuest("tests/guests/fault_ud.c");
 * console.log(image.length);
 * ```
 */
export async function buildRuntimeGuest(source: string | URL): Promise<Uint8Array> {
  const path = await build("guest", toFileUrl(source));
  return await Deno.readFile(path);
}

/**
 * Builds any C program written against `guest/runtime/dv_guest.h` as a native
 * Linux executable, with `guest/runtime/native_rt.c` in place of the guest
 * runtime.
 *
 * @param source Path (relative to the working directory) or `file:` URL of the
 *   `.c` file.
 * @returns The absolute path of the executable (in the cache; do not modify it).
 * @throws {DenovisorError} `BUILD_FAILED` when gcc is missing, the source cannot
 *   be read or the build fails.
 * @example
 * ```ts
 * import { buildRuntimeNative, workloadSourceUrl } from "denovisor/src/build/workload_build.ts";
 * console.log(await buildRuntimeNative(workloadSourceUrl("io")));
 * ```
 */
export async function buildRuntimeNative(source: string | URL): Promise<string> {
  return await build("native", toFileUrl(source));
}

type Target = "guest" | "native";

function checkName(name: string): void {
  if (!(WORKLOADS as readonly string[]).includes(name)) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `Unknown workload ${JSON.stringify(name)}; the workloads are ${WORKLOADS.join(", ")}`,
    );
  }
}

async function build(target: Target, source: URL): Promise<string> {
  const tools = await probeToolchain();
  const runtime = (target === "guest" ? GUEST_RUNTIME : NATIVE_RUNTIME).map((f) =>
    new URL(f, RUNTIME_DIR)
  );
  const flags = target === "guest" ? guestFlags(tools) : NATIVE_FLAGS;
  const key = await cacheKey(target, source, runtime, flags, tools);
  const stem = pathOf(source).split("/").pop()!.replace(/\.c$/, "");
  const output = new URL(`${stem}-${key}${target === "guest" ? ".elf" : ""}`, cacheDir());
  try {
    await Deno.stat(output);
    return pathOf(output);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }

  const dir = await Deno.makeTempDir({ prefix: "denovisor-workload-" });
  try {
    const built = `${dir}/${stem}`;
    // The kernel comes first, so its exception stubs lead the image.
    const inputs = target === "guest" ? [...runtime, source] : [source, ...runtime];
    const args = [
      ...flags,
      `-I${pathOf(RUNTIME_DIR)}`,
      "-o",
      built,
      ...inputs.map(pathOf),
      ...(target === "guest" ? ["-lgcc"] : []),
    ];
    const gcc = await runTool("gcc", args, TOOL_OPTIONS);
    if (gcc.code !== 0) {
      throw new DenovisorError(
        "BUILD_FAILED",
        `Building ${
          pathOf(source)
        } for the ${target} target failed (gcc exited with ${gcc.code}):\n` +
          (gcc.stderr.trim() || gcc.stdout.trim()),
      );
    }
    await installAtomically(built, output, target === "native" ? 0o755 : 0o644);
    return pathOf(output);
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** Files a source pulls in by a quoted path. */
const INCLUDE_PATTERN = /^\s*#\s*include\s+"([^"]+)"/gm;

/**
 * Hashes the target, the flags, the tool versions, the linker script, the
 * runtime's files and the source with what it includes (transitively).
 */
async function cacheKey(
  target: Target,
  source: URL,
  runtime: URL[],
  flags: string[],
  tools: Toolchain,
): Promise<string> {
  const parts = [`format ${CACHE_FORMAT}`, `target ${target}`, ...flags, ...tools.versions];
  const files = [
    ...(target === "guest" ? [LINKER_SCRIPT] : []),
    ...RUNTIME_HEADERS.map((f) => new URL(f, RUNTIME_DIR)),
    ...runtime,
  ];
  for (const file of files) {
    parts.push(`${pathOf(file)} ${await sha256Hex(await Deno.readFile(file))}`);
  }
  let sourceBytes: Uint8Array;
  try {
    sourceBytes = await Deno.readFile(source);
  } catch (e) {
    throw new DenovisorError(
      "BUILD_FAILED",
      `Cannot read ${pathOf(source)}: ${e instanceof Error ? e.message : e}`,
      { cause: e },
    );
  }
  parts.push(`source ${pathOf(source)} ${await sha256Hex(sourceBytes)}`);
  const seen = new Set<string>([source.href, ...files.map((f) => f.href)]);
  const pending: Array<[URL, Uint8Array]> = [[source, sourceBytes]];
  while (pending.length > 0) {
    const [file, bytes] = pending.pop()!;
    for (const match of new TextDecoder().decode(bytes).matchAll(INCLUDE_PATTERN)) {
      for (const candidate of [new URL(match[1], file), new URL(match[1], RUNTIME_DIR)]) {
        if (seen.has(candidate.href)) break;
        try {
          const data = await Deno.readFile(candidate);
          seen.add(candidate.href);
          parts.push(`include ${pathOf(candidate)} ${await sha256Hex(data)}`);
          pending.push([candidate, data]);
          break;
        } catch {
          // Not here; the next candidate, or gcc reports the missing file.
        }
      }
    }
  }
  return (await sha256Hex(new TextEncoder().encode(parts.join("\n")))).slice(0, 32);
}

function cacheDir(): URL {
  if (CACHE_DIR.protocol !== "file:") {
    throw new DenovisorError(
      "BUILD_FAILED",
      `Workloads can only be built from a local checkout, this module is at ${import.meta.url}`,
    );
  }
  return CACHE_DIR;
}
