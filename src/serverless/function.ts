/**
 * A function of the function service: its name, program (a static x86-64
 * Linux ELF), arguments, environment, read-only files, guest RAM and
 * per-request limits; checked and read into a {@link LoadedFunction} before
 * any VM exists, with a {@link DenovisorError} that says what is wrong.
 *
 * @module
 */

import { basename, isAbsolute, normalize } from "node:path";
import { DenovisorError } from "../errors.ts";
import type { BundleFile } from "./backend.ts";

/** Per-request limits of a function. */
export interface FunctionLimits {
  /** Wall-clock time of one run, in ms: the vCPU is kicked out and the VM reset. */
  timeoutMs: number;
  /** brk + mmap bytes the program may hold. */
  memoryBytes: number;
  /** stdout + stderr bytes the program may write. */
  outputBytes: number;
  /** The largest request body (stdin), in bytes. */
  inputBytes: number;
}

/** Production defaults of {@link FunctionLimits}. */
export const DEFAULT_LIMITS: Readonly<FunctionLimits> = Object.freeze({
  timeoutMs: 10_000,
  memoryBytes: 32 * 1024 * 1024,
  outputBytes: 1024 * 1024,
  inputBytes: 1024 * 1024,
});

/** The accepted range of each limit, inclusive (memory is also bounded by guest RAM). */
export const LIMIT_RANGES: Readonly<Record<keyof FunctionLimits, readonly [number, number]>> =
  Object.freeze({
    timeoutMs: [1, 3_600_000],
    memoryBytes: [64 * 1024, 4096 * 1024 * 1024],
    outputBytes: [1, 256 * 1024 * 1024],
    inputBytes: [0, 256 * 1024 * 1024],
  });

/** Guest RAM of a function VM unless its spec says otherwise, in MiB. */
export const DEFAULT_FUNCTION_MEMORY_MIB = 64;
/** The smallest and largest guest RAM of a function VM, in MiB (the runtime maps the first 4 GiB). */
export const FUNCTION_MEMORY_MIB_RANGE: readonly [number, number] = [4, 4096];
/** The largest program or file of a function, in bytes. */
export const MAX_FUNCTION_FILE_BYTES = 256 * 1024 * 1024;

/** What a function name may be: URL-safe, 1 to 64 characters, starting with a letter or digit. */
export const FUNCTION_NAME_PATTERN: RegExp = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

/** A function as a caller describes it (a file path for the program). */
export interface FunctionSpec {
  /** The name in `POST /fn/NAME` ({@link FUNCTION_NAME_PATTERN}). */
  name: string;
  /** The program's path on the host: a static x86-64 Linux ELF. */
  program: string;
  /** Its arguments, `argv[0]` first (default: `[basename(program)]`). */
  argv?: string[];
  /** Its environment, `NAME=value` strings (default: none). */
  env?: string[];
  /** Read-only files it sees, by absolute guest path: a host path, or the bytes. */
  files?: Record<string, string | Uint8Array>;
  /** Guest RAM in MiB (default {@link DEFAULT_FUNCTION_MEMORY_MIB}). */
  memoryMiB?: number;
  /** Per-request limits (each defaults to {@link DEFAULT_LIMITS}). */
  limits?: Partial<FunctionLimits>;
  /** The fraction of requests also run natively for the overhead model, 0 to 1
   * (default: the service's). Native runs are NOT isolated: opt-in for trusted code. */
  nativeSampleRate?: number;
}

/** A checked function with its program and files read. */
export interface LoadedFunction {
  /** Its name. */
  name: string;
  /** The program's host path (absolute). */
  programPath: string;
  /** The program's bytes. */
  program: Uint8Array;
  /** `argv[0]` first. */
  argv: string[];
  /** `NAME=value` strings. */
  env: string[];
  /** Its read-only file set. */
  files: BundleFile[];
  /** Guest RAM in MiB. */
  memoryMiB: number;
  /** Per-request limits, complete. */
  limits: FunctionLimits;
  /** The native sample rate, when the spec set one. */
  nativeSampleRate?: number;
}

function invalid(name: string, message: string): DenovisorError {
  return new DenovisorError("INVALID_ARGUMENT", `function ${name}: ${message}`);
}

/**
 * Checks a function name.
 *
 * @param name The name.
 * @throws {DenovisorError} `INVALID_ARGUMENT` naming what is wrong.
 * @example
 * ```ts
 * import { checkFunctionName } from "denovisor/src/serverless/function.ts";
 * checkFunctionName("sha256"); // fine
 * ```
 */
export function checkFunctionName(name: string): void {
  if (typeof name !== "string" || !FUNCTION_NAME_PATTERN.test(name)) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `bad function name ${JSON.stringify(name)}: 1 to 64 of A-Z a-z 0-9 _ . -, ` +
        "starting with a letter or digit",
    );
  }
}

/**
 * The limits of a spec, each checked against {@link LIMIT_RANGES} and the
 * guest's RAM.
 *
 * @param name The function's name (for messages).
 * @param limits What the spec sets.
 * @param memoryMiB The function's guest RAM.
 * @returns Every limit, defaults filled in.
 * @throws {DenovisorError} `INVALID_ARGUMENT` for a limit out of range.
 * @example
 * ```ts
 * import { functionLimits } from "denovisor/src/serverless/function.ts";
 * console.log(functionLimits("f", { timeoutMs: 500 }, 64).timeoutMs); // 500
 * ```
 */
export function functionLimits(
  name: string,
  limits: Partial<FunctionLimits> = {},
  memoryMiB: number,
): FunctionLimits {
  const out = { ...DEFAULT_LIMITS };
  for (const key of Object.keys(limits) as (keyof FunctionLimits)[]) {
    if (!(key in LIMIT_RANGES)) throw invalid(name, `unknown limit ${JSON.stringify(key)}`);
    const value = limits[key];
    if (value === undefined) continue;
    const [min, max] = LIMIT_RANGES[key];
    if (!Number.isSafeInteger(value) || value < min || value > max) {
      throw invalid(name, `limit ${key} must be an integer from ${min} to ${max}, got ${value}`);
    }
    out[key] = value;
  }
  const ram = memoryMiB * 1024 * 1024;
  if (limits.memoryBytes === undefined) out.memoryBytes = Math.min(out.memoryBytes, ram / 2);
  if (out.memoryBytes >= ram) {
    throw invalid(
      name,
      `limit memoryBytes (${out.memoryBytes}) must be below the guest's RAM (${memoryMiB} MiB)`,
    );
  }
  return out;
}

/**
 * Why `bytes` is not a program the runtime can load (a static x86-64 Linux
 * ELF executable), or undefined when it is one.
 *
 * @param bytes The file's content.
 * @returns The problem, in words.
 * @example
 * ```ts
 * import { staticElfProblem } from "denovisor/src/serverless/function.ts";
 * console.log(staticElfProblem(new TextEncoder().encode("#!/bin/sh"))); // "not an ELF file"
 * ```
 */
export function staticElfProblem(bytes: Uint8Array): string | undefined {
  if (
    bytes.length < 64 || bytes[0] !== 0x7f || bytes[1] !== 0x45 || bytes[2] !== 0x4c ||
    bytes[3] !== 0x46
  ) {
    return "not an ELF file";
  }
  if (bytes[4] !== 2) return "not a 64-bit ELF";
  if (bytes[5] !== 1) return "not a little-endian ELF";
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const type = view.getUint16(16, true);
  if (type !== 2 && type !== 3) return `not an executable (ELF type ${type})`;
  const machine = view.getUint16(18, true);
  if (machine !== 0x3e) return `not an x86-64 program (ELF machine ${machine})`;
  const phoff = Number(view.getBigUint64(32, true));
  const phentsize = view.getUint16(54, true);
  const phnum = view.getUint16(56, true);
  if (phnum === 0) return "no program headers";
  if (phentsize < 56 || phoff > bytes.length || phoff + phnum * phentsize > bytes.length) {
    return "its program headers lie outside the file";
  }
  let loads = 0;
  for (let i = 0; i < phnum; i++) {
    const type = view.getUint32(phoff + i * phentsize, true);
    if (type === 3) return "dynamically linked (it names an interpreter): link it statically";
    if (type === 1) loads++;
  }
  if (loads === 0) return "no loadable segment";
  return undefined;
}

/** Reads a regular file of at most {@link MAX_FUNCTION_FILE_BYTES}. */
async function readRegularFile(name: string, path: string, what: string): Promise<Uint8Array> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(path);
  } catch (e) {
    throw invalid(name, `cannot read ${what} ${path}: ${e instanceof Error ? e.message : e}`);
  }
  if (!info.isFile) throw invalid(name, `${what} ${path} is not a regular file`);
  if (info.size > MAX_FUNCTION_FILE_BYTES) {
    throw invalid(name, `${what} ${path} has more than ${MAX_FUNCTION_FILE_BYTES} bytes`);
  }
  try {
    return await Deno.readFile(path);
  } catch (e) {
    throw invalid(name, `cannot read ${what} ${path}: ${e instanceof Error ? e.message : e}`);
  }
}

function checkStrings(name: string, what: string, values: unknown, needsEquals: boolean): string[] {
  if (!Array.isArray(values)) throw invalid(name, `${what} must be an array of strings`);
  for (const v of values) {
    if (typeof v !== "string" || v.includes("\0")) {
      throw invalid(name, `${what} must hold strings without NUL, got ${JSON.stringify(v)}`);
    }
    if (needsEquals && !/^[^=]+=/.test(v)) {
      throw invalid(name, `${what} entries are NAME=value, got ${JSON.stringify(v)}`);
    }
  }
  return [...values];
}

/**
 * Checks a spec and reads its program and files: the name, an existing,
 * readable static x86-64 ELF, argv and env, absolute guest paths, RAM and
 * limits in range.
 *
 * @param spec The function.
 * @returns The function, ready for a pool.
 * @throws {DenovisorError} `INVALID_ARGUMENT` saying what is wrong (bad name,
 *   missing, unreadable or non-ELF program, limits out of range, ...).
 * @example
 * ```ts ignore
 * import { loadFunction } from "denovisor/src/serverless/function.ts";
 * const fn = await loadFunction({ name: "echo", program: "/bin/busybox", argv: ["busybox", "echo"] });
 * console.log(fn.limits.timeoutMs); // 10000
 * ```
 */
export async function loadFunction(spec: FunctionSpec): Promise<LoadedFunction> {
  if (spec === null || typeof spec !== "object") {
    throw new DenovisorError("INVALID_ARGUMENT", "a function spec must be an object");
  }
  checkFunctionName(spec.name);
  const name = spec.name;
  if (typeof spec.program !== "string" || spec.program === "" || spec.program.includes("\0")) {
    throw invalid(name, "program must be a path");
  }
  const memoryMiB = spec.memoryMiB ?? DEFAULT_FUNCTION_MEMORY_MIB;
  const [minMiB, maxMiB] = FUNCTION_MEMORY_MIB_RANGE;
  if (!Number.isSafeInteger(memoryMiB) || memoryMiB < minMiB || memoryMiB > maxMiB) {
    throw invalid(
      name,
      `memoryMiB must be an integer from ${minMiB} to ${maxMiB}, got ${memoryMiB}`,
    );
  }
  const limits = functionLimits(name, spec.limits, memoryMiB);
  const rate = spec.nativeSampleRate;
  if (rate !== undefined && !(typeof rate === "number" && rate >= 0 && rate <= 1)) {
    throw invalid(name, `nativeSampleRate must be from 0 to 1, got ${rate}`);
  }
  const argv = checkStrings(name, "argv", spec.argv ?? [basename(spec.program)], false);
  if (argv.length === 0) throw invalid(name, "argv needs at least argv[0]");
  const env = checkStrings(name, "env", spec.env ?? [], true);
  const programPath = await Deno.realPath(spec.program).catch((e) => {
    throw invalid(
      name,
      `cannot read program ${spec.program}: ${e instanceof Error ? e.message : e}`,
    );
  });
  const program = await readRegularFile(name, programPath, "program");
  const problem = staticElfProblem(program);
  if (problem) throw invalid(name, `program ${spec.program}: ${problem}`);
  const files: BundleFile[] = [];
  for (const [path, source] of Object.entries(spec.files ?? {})) {
    if (!isAbsolute(path) || normalize(path) !== path || path.includes("\0")) {
      throw invalid(name, `file path ${JSON.stringify(path)} must be absolute and normalized`);
    }
    const data = typeof source === "string"
      ? await readRegularFile(name, source, `file ${path} from`)
      : source instanceof Uint8Array
      ? source
      : (() => {
        throw invalid(name, `file ${path} must be a host path or bytes`);
      })();
    files.push({ path, data, mode: 0o644 });
  }
  const total = program.length + files.reduce((n, f) => n + f.data.length, 0);
  if (total >= memoryMiB * 1024 * 1024 / 2) {
    throw invalid(
      name,
      `the program and its files (${total} bytes) need more than half the guest's ${memoryMiB} MiB`,
    );
  }
  return {
    name,
    programPath,
    program,
    argv,
    env,
    files,
    memoryMiB,
    limits,
    ...(rate === undefined ? {} : { nativeSampleRate: rate }),
  };
}

/**
 * Parses the command line's function argument: `NAME=PATH`, or `NAME=PATH ARG...`
 * as one shell word (split on spaces): `argv` is `[basename(PATH), ARG...]`.
 *
 * @param arg The argument.
 * @returns The spec (its program is not read yet: {@link loadFunction} does).
 * @throws {DenovisorError} `INVALID_ARGUMENT` for a missing `=`, a bad name
 *   or a missing path.
 * @example
 * ```ts
 * import { parseFunctionArg } from "denovisor/src/serverless/function.ts";
 * const spec = parseFunctionArg("wc=/bin/busybox wc -l");
 * console.log(spec.name, spec.program, spec.argv); // wc /bin/busybox [ "busybox", "wc", "-l" ]
 * ```
 */
export function parseFunctionArg(arg: string): FunctionSpec {
  const eq = arg.indexOf("=");
  if (eq < 0) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `a function is NAME=PATH [ARG...], got ${JSON.stringify(arg)}`,
    );
  }
  const name = arg.slice(0, eq);
  checkFunctionName(name);
  const words = arg.slice(eq + 1).split(" ").filter((w) => w !== "");
  if (words.length === 0) {
    throw new DenovisorError("INVALID_ARGUMENT", `function ${name}: missing PATH after "="`);
  }
  const [program, ...args] = words;
  return { name, program, argv: [basename(program), ...args] };
}
