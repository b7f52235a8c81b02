/**
 * Writes initramfs images: uncompressed cpio archives in the `newc` format
 * the Linux kernel unpacks into its root file system at boot
 * (Documentation/driver-api/early-userspace/buffer-format.rst). Written in
 * TypeScript, so no `cpio` tool is needed.
 *
 * @module
 */

/** One file, directory or device node of an initramfs. */
export interface InitramfsEntry {
  /** Path without a leading slash, e.g. `bin/busybox`. Parents come first. */
  path: string;
  /** `file` (default when `data` is given), `dir`, or `char` (a character device). */
  kind?: "file" | "dir" | "char";
  /** Permission bits (default 0o755 for files and directories, 0o600 for devices). */
  mode?: number;
  /** File contents. */
  data?: Uint8Array;
  /** Device major and minor numbers of a `char` node. */
  device?: [number, number];
}

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFCHR = 0o020000;

function hex8(value: number): string {
  return value.toString(16).padStart(8, "0");
}

/**
 * Builds a `newc` cpio archive of `entries`, closed by the `TRAILER!!!` entry.
 *
 * @param entries Files, directories and device nodes, parents before children.
 * @returns The archive's bytes.
 * @example
 * ```ts
 * import { buildInitramfs } from "denovisor/src/linux/initramfs.ts";
 * const init = new TextEncoder().encode("#!/bin/busybox sh\necho hi\n");
 * const image = buildInitramfs([
 *   { path: "dev", kind: "dir" },
 *   { path: "dev/console", kind: "char", device: [5, 1] },
 *   { path: "init", data: init },
 * ]);
 * console.log(image.length);
 * ```
 */
export function buildInitramfs(entries: readonly InitramfsEntry[]): Uint8Array {
  const encoder = new TextEncoder();
  const chunks: Uint8Array[] = [];
  let length = 0;
  const push = (bytes: Uint8Array) => {
    chunks.push(bytes);
    length += bytes.length;
    const pad = (4 - (length % 4)) % 4;
    if (pad) {
      chunks.push(new Uint8Array(pad));
      length += pad;
    }
  };
  const all: InitramfsEntry[] = [...entries, { path: "TRAILER!!!", kind: "file", mode: 0 }];
  all.forEach((entry, i) => {
    const kind = entry.kind ?? (entry.data ? "file" : "dir");
    const type = kind === "dir" ? S_IFDIR : kind === "char" ? S_IFCHR : S_IFREG;
    const mode = type | (entry.mode ?? (kind === "char" ? 0o600 : 0o755));
    const data = entry.data ?? new Uint8Array();
    const name = encoder.encode(`${entry.path}\0`);
    const [major, minor] = entry.device ?? [0, 0];
    const isTrailer = entry.path === "TRAILER!!!";
    const header = "070701" + [
      isTrailer ? 0 : i + 1, // ino
      isTrailer ? 0 : mode,
      0, // uid
      0, // gid
      kind === "dir" ? 2 : 1, // nlink
      0, // mtime
      data.length,
      0, // devmajor
      0, // devminor
      major, // rdevmajor
      minor, // rdevminor
      name.length,
      0, // check
    ].map(hex8).join("");
    // The name pads the header + name to 4 bytes, the data pads itself.
    const head = new Uint8Array(header.length + name.length);
    head.set(encoder.encode(header));
    head.set(name, header.length);
    push(head);
    if (data.length) push(data);
  });
  const out = new Uint8Array(length);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}
