/**
 * The host floor: `bench/c/kvm_floor.c`, a minimal C KVM program, built as a
 * shared library and loaded with `Deno.dlopen`. The benchmarks run the same guest
 * through it and through denovisor's Rust core; the difference is the core's own
 * overhead.
 *
 * Run it directly to print the floor on this host:
 *
 * ```sh
 * deno run -A bench/_floor.ts [iterations]
 * ```
 *
 * @module
 */

import { fileURLToPath } from "node:url";
import { DenovisorError } from "../src/errors.ts";
import { buildGuest } from "../src/build/guest_build.ts";

/** The C source of the floor. */
const SOURCE = new URL("./c/kvm_floor.c", import.meta.url);
/** Built libraries, named by a hash of the source and the compiler. */
const CACHE_DIR = new URL("../.cache/bench/", import.meta.url);

const SYMBOLS = {
  // int floor_exit_loop(const uint8_t* code, size_t len, uint64_t iterations,
  //                     uint64_t* out_ns, uint64_t* out_exits)
  floor_exit_loop: { parameters: ["buffer", "usize", "u64", "buffer", "buffer"], result: "i32" },
  // int floor_cold_start(const uint8_t* code, size_t len, uint64_t* out_ns)
  floor_cold_start: { parameters: ["buffer", "usize", "buffer"], result: "i32" },
  // const char* floor_last_error(void)
  floor_last_error: { parameters: [], result: "pointer" },
} as const satisfies Deno.ForeignLibraryInterface;

/** One run of {@link Floor.exitLoop}. */
export interface FloorExitLoop {
  /** Wall time from the first KVM_RUN to the guest's debug-exit, in nanoseconds. */
  ns: number;
  /** Port-0x80 exits handled. */
  exits: number;
}

/** The loaded floor library. */
export interface Floor {
  /**
   * Runs a flat 64-bit user-mode image (linked at 0x100000) with rdi = iterations
   * until it writes to the debug-exit port, counting its `out`s to port 0x80.
   */
  exitLoop(code: Uint8Array, iterations: number): FloorExitLoop;
  /**
   * Creates a VM for a flat 64-bit user-mode image, runs it to its first exit (the
   * debug-exit port), destroys it; returns the nanoseconds all of that took.
   */
  coldStart(code: Uint8Array): number;
  /** Unloads the library (the process-wide /dev/kvm fd stays open). */
  close(): void;
  /** Same as {@link Floor.close}, for `using`. */
  [Symbol.dispose](): void;
}

/**
 * Builds `bench/c/kvm_floor.c` if needed (cached under `.cache/bench/`, rebuilt
 * when the source or the compiler changes) and loads it.
 *
 * @returns The floor's functions.
 * @throws {DenovisorError} `BUILD_FAILED` when gcc is missing or the source does not
 *   compile.
 * @example
 * ```ts
 * import { openFloor } from "denovisor/bench/_floor.ts";
 * import { buildGuest } from "denovisor/src/build/guest_build.ts";
 * const guest = await buildGuest("tests/guests/io_loop.S", { format: "flat" });
 * using floor = await openFloor();
 * const { ns, exits } = floor.exitLoop(guest, 10_000);
 * console.log(`${(ns / exits).toFixed(0)} ns per exit`);
 * ```
 */
export async function openFloor(): Promise<Floor> {
  const path = await buildLibrary();
  const lib = Deno.dlopen(path, SYMBOLS);
  const ns = new BigUint64Array(1);
  const exits = new BigUint64Array(1);
  let closed = false;

  const check = (status: number, what: string): void => {
    if (status === 0) return;
    const ptr = lib.symbols.floor_last_error();
    const detail = ptr === null ? "" : new Deno.UnsafePointerView(ptr).getCString();
    const code = detail.startsWith("open /dev/kvm") ? "KVM_UNAVAILABLE" : "KVM";
    throw new DenovisorError(code, `Floor ${what} failed (${status}): ${detail}`);
  };
  const open = (): void => {
    if (closed) throw new DenovisorError("CLOSED", "The floor library is closed");
  };
  const close = (): void => {
    if (closed) return;
    closed = true;
    lib.close();
  };

  return {
    exitLoop(code, iterations) {
      open();
      if (!Number.isSafeInteger(iterations) || iterations < 0) {
        throw new DenovisorError(
          "INVALID_ARGUMENT",
          `Iterations ${iterations} is not a non-negative integer`,
        );
      }
      const status = lib.symbols.floor_exit_loop(
        code as Uint8Array<ArrayBuffer>,
        BigInt(code.length),
        BigInt(iterations),
        ns,
        exits,
      );
      check(status, "exit loop");
      return { ns: Number(ns[0]), exits: Number(exits[0]) };
    },
    coldStart(code) {
      open();
      check(
        lib.symbols.floor_cold_start(code as Uint8Array<ArrayBuffer>, BigInt(code.length), ns),
        "cold start",
      );
      return Number(ns[0]);
    },
    close,
    [Symbol.dispose]: close,
  };
}

/** Compiles the floor unless a library for this source and compiler is cached. */
async function buildLibrary(): Promise<URL> {
  const source = await Deno.readFile(SOURCE);
  const compiler = await run("gcc", ["--version"]);
  const key = await sha256Hex(
    new TextEncoder().encode(`${compiler.split("\n", 1)[0]}\n${await sha256Hex(source)}`),
  );
  const target = new URL(`kvm_floor-${key.slice(0, 32)}.so`, CACHE_DIR);
  try {
    await Deno.stat(target);
    return target;
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  await Deno.mkdir(CACHE_DIR, { recursive: true });
  const temp = new URL(`${target.pathname.split("/").pop()}.${Deno.pid}.tmp`, target);
  try {
    await run("gcc", [
      "-O2",
      "-shared",
      "-fPIC",
      "-Wall",
      "-Wextra",
      "-o",
      fileURLToPath(temp),
      fileURLToPath(SOURCE),
    ]);
    await Deno.rename(temp, target);
  } catch (e) {
    await Deno.remove(temp).catch(() => {});
    throw e;
  }
  // Libraries built from older sources are dead weight (unlinking one that another
  // process has loaded is harmless on Linux).
  for await (const entry of Deno.readDir(CACHE_DIR)) {
    if (
      /^kvm_floor-[0-9a-f]+\.so$/.test(entry.name) &&
      new URL(entry.name, CACHE_DIR).href !== target.href
    ) {
      await Deno.remove(new URL(entry.name, CACHE_DIR)).catch(() => {});
    }
  }
  return target;
}

async function run(tool: string, args: string[]): Promise<string> {
  let out: Deno.CommandOutput;
  try {
    out = await new Deno.Command(tool, { args, stdin: "null" }).output();
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new DenovisorError(
        "BUILD_FAILED",
        `${tool} is not installed; the floor benchmark needs it (Debian/Ubuntu: apt-get install gcc)`,
        { cause: e },
      );
    }
    throw e;
  }
  const text = new TextDecoder();
  if (out.code !== 0) {
    throw new DenovisorError(
      "BUILD_FAILED",
      `${tool} ${args.join(" ")} failed (exit ${out.code}):\n${text.decode(out.stderr).trim()}`,
    );
  }
  return text.decode(out.stdout);
}

async function sha256Hex(data: Uint8Array): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", data as BufferSource));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

if (import.meta.main) {
  const iterations = Number(Deno.args[0] ?? 100_000);
  const guest = await buildGuest(new URL("../tests/guests/io_loop.S", import.meta.url), {
    format: "flat",
  });
  using floor = await openFloor();
  floor.exitLoop(guest, 1000); // warm-up
  const loop = floor.exitLoop(guest, iterations);
  console.log(
    `exit loop: ${loop.exits} exits in ${(loop.ns / 1e6).toFixed(1)} ms = ` +
      `${(loop.ns / loop.exits).toFixed(0)} ns/exit`,
  );
  const colds = Array.from({ length: 50 }, () => floor.coldStart(guest)).sort((a, b) => a - b);
  const mean = colds.reduce((a, b) => a + b, 0) / colds.length;
  console.log(
    `cold start (${colds.length} runs): min ${(colds[0] / 1e3).toFixed(0)} us, ` +
      `median ${(colds[colds.length >> 1] / 1e3).toFixed(0)} us, mean ${
        (mean / 1e3).toFixed(0)
      } us`,
  );
}
