/**
 * The bundle a function VM boots with: the program, its argv and environment
 * and its read-only file set, laid out as the function ABI says
 * (`core/src/function/abi.rs`, `CONSTANTS.FN_*`). The host writes it at the top
 * of guest RAM; the guest runtime checks every offset in it again.
 *
 * Layout: the header (`FN_BN_HEADER_SIZE` bytes), the file table (`FN_FILE_SIZE`
 * bytes per file), the argv and envp strings, the paths, then each file's data
 * 8-byte aligned. The program is file `FN_BN_EXEC_INDEX`.
 *
 * @module
 */

import { CONSTANTS } from "../_contract.generated.ts";
import { DenovisorError } from "../errors.ts";
import type { BundleFile } from "./backend.ts";

/** What {@link encodeBundle} lays out. */
export interface BundleSpec {
  /** The program: a static x86-64 Linux ELF. */
  program: Uint8Array;
  /** Where the program appears in the file set (default `/bin/function`). */
  programPath?: string;
  /** Its arguments, `argv[0]` first (at least one). */
  argv: string[];
  /** Its environment, `NAME=value` strings. */
  env?: string[];
  /** The read-only files it sees, besides the program. */
  files?: BundleFile[];
}

/** The most argv + envp strings a bundle carries (the runtime's table). */
const BUNDLE_MAX_STRINGS = 4096;
/** The most files a bundle carries, the program included (the runtime's table). */
const BUNDLE_MAX_FILES = 4096;
/** The longest path, NUL excluded (the runtime's path buffers hold 256 bytes). */
const BUNDLE_MAX_PATH = 255;

const encoder = new TextEncoder();

function bad(message: string): never {
  throw new DenovisorError("INVALID_ARGUMENT", message);
}

function checkString(value: unknown, what: string): Uint8Array {
  if (typeof value !== "string") bad(`${what} must be a string`);
  const bytes = encoder.encode(value);
  if (bytes.includes(0)) bad(`${what} contains a NUL byte`);
  return bytes;
}

function checkPath(path: unknown, what: string): Uint8Array {
  const bytes = checkString(path, what);
  const text = path as string;
  if (!text.startsWith("/")) bad(`${what} ${JSON.stringify(text)} is not an absolute path`);
  if (text.length > 1 && text.endsWith("/")) bad(`${what} ${JSON.stringify(text)} ends with /`);
  if (text.split("/").some((c, i) => i > 0 && (c === "" || c === "." || c === ".."))) {
    bad(`${what} ${JSON.stringify(text)} is not normalized (empty, . or .. components)`);
  }
  if (bytes.length > BUNDLE_MAX_PATH) bad(`${what} is longer than ${BUNDLE_MAX_PATH} bytes`);
  return bytes;
}

/**
 * Lays out a function's bundle.
 *
 * @param spec The program, its argv, env and files.
 * @returns The bundle's bytes (`FN_BN_TOTAL_LEN` of them).
 * @throws {DenovisorError} `INVALID_ARGUMENT` for an empty argv, a string with a
 *   NUL byte, a relative, unnormalized, too long or duplicate path, a bad mode,
 *   or too many strings or files.
 * @example
 * ```ts
 * import { encodeBundle } from "denovisor/src/serverless/bundle.ts";
 * const bytes = encodeBundle({
 *   program: await Deno.readFile("/bin/true"),
 *   argv: ["true"],
 *   files: [{ path: "/data/words.txt", data: new TextEncoder().encode("a b\n") }],
 * });
 * console.log(bytes.length);
 * ```
 */
export function encodeBundle(spec: BundleSpec): Uint8Array {
  if (spec === null || typeof spec !== "object") bad("the bundle spec must be an object");
  if (!(spec.program instanceof Uint8Array)) bad("program must be a Uint8Array");
  if (!Array.isArray(spec.argv) || spec.argv.length === 0) bad("argv must hold at least argv[0]");
  const env = spec.env ?? [];
  if (!Array.isArray(env)) bad("env must be an array of strings");
  const extra = spec.files ?? [];
  if (!Array.isArray(extra)) bad("files must be an array");
  if (spec.argv.length + env.length > BUNDLE_MAX_STRINGS) {
    bad(`at most ${BUNDLE_MAX_STRINGS} argv + env strings, got ${spec.argv.length + env.length}`);
  }
  if (extra.length + 1 > BUNDLE_MAX_FILES) {
    bad(`at most ${BUNDLE_MAX_FILES - 1} files besides the program`);
  }
  const strings = [
    ...spec.argv.map((s, i) => checkString(s, `argv[${i}]`)),
    ...env.map((s, i) => checkString(s, `env[${i}]`)),
  ];
  const programPath = spec.programPath ?? "/bin/function";
  const files = [{ path: programPath, data: spec.program, mode: 0o755 }, ...extra];
  const seen = new Set<string>();
  const paths = files.map((f, i) => {
    if (f === null || typeof f !== "object") bad(`files[${i - 1}] must be an object`);
    const bytes = checkPath(f.path, i === 0 ? "programPath" : `files[${i - 1}].path`);
    if (seen.has(f.path)) bad(`the path ${f.path} appears twice in the file set`);
    seen.add(f.path);
    if (!(f.data instanceof Uint8Array)) bad(`the data of ${f.path} must be a Uint8Array`);
    const mode = f.mode ?? 0o644;
    if (!Number.isInteger(mode) || mode < 0 || mode > 0o7777) {
      bad(`the mode of ${f.path} must be 0..0o7777`);
    }
    return bytes;
  });
  // Directories are implied by the files' paths: no file may sit where another has children.
  for (const p of seen) {
    for (let cut = p.lastIndexOf("/"); cut > 0; cut = p.lastIndexOf("/", cut - 1)) {
      if (seen.has(p.slice(0, cut))) bad(`${p.slice(0, cut)} is a file and a directory (of ${p})`);
    }
  }

  const header = CONSTANTS.FN_BN_HEADER_SIZE;
  const table = files.length * CONSTANTS.FN_FILE_SIZE;
  const stringsOff = header + table;
  const stringsLen = strings.reduce((n, s) => n + s.length + 1, 0);
  let at = stringsOff + stringsLen;
  const pathOffs = paths.map((p) => {
    const off = at;
    at += p.length + 1;
    return off;
  });
  const dataOffs = files.map((f) => {
    at = align8(at);
    const off = at;
    at += f.data.length;
    return off;
  });
  const total = align8(at);
  if (total > Number.MAX_SAFE_INTEGER || total > 2 ** 32) {
    bad(`the bundle would be ${total} bytes (4 GiB at most)`);
  }

  const bytes = new Uint8Array(total);
  const view = new DataView(bytes.buffer);
  view.setUint32(CONSTANTS.FN_BN_MAGIC, CONSTANTS.FN_BUNDLE_MAGIC, true);
  view.setUint32(CONSTANTS.FN_BN_VERSION, CONSTANTS.FN_ABI_VERSION, true);
  view.setBigUint64(CONSTANTS.FN_BN_TOTAL_LEN, BigInt(total), true);
  view.setUint32(CONSTANTS.FN_BN_ARGC, spec.argv.length, true);
  view.setUint32(CONSTANTS.FN_BN_ENVC, env.length, true);
  view.setUint32(CONSTANTS.FN_BN_FILE_COUNT, files.length, true);
  view.setUint32(CONSTANTS.FN_BN_EXEC_INDEX, 0, true);
  view.setBigUint64(CONSTANTS.FN_BN_STRINGS_OFF, BigInt(stringsOff), true);
  view.setBigUint64(CONSTANTS.FN_BN_STRINGS_LEN, BigInt(stringsLen), true);
  view.setBigUint64(CONSTANTS.FN_BN_FILES_OFF, BigInt(header), true);
  files.forEach((f, i) => {
    const e = header + i * CONSTANTS.FN_FILE_SIZE;
    view.setBigUint64(e + CONSTANTS.FN_FILE_PATH_OFF, BigInt(pathOffs[i]), true);
    view.setBigUint64(e + CONSTANTS.FN_FILE_DATA_OFF, BigInt(dataOffs[i]), true);
    view.setBigUint64(e + CONSTANTS.FN_FILE_DATA_LEN, BigInt(f.data.length), true);
    view.setUint32(e + CONSTANTS.FN_FILE_MODE, f.mode ?? 0o644, true);
    bytes.set(paths[i], pathOffs[i]);
    bytes.set(f.data, dataOffs[i]);
  });
  let s = stringsOff;
  for (const str of strings) {
    bytes.set(str, s);
    s += str.length + 1;
  }
  return bytes;
}

function align8(n: number): number {
  return Math.ceil(n / 8) * 8;
}
