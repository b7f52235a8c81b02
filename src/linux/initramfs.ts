/**
 * Writes initramfs images: uncompressed cpio archives in the `newc` format
 * the Linux kernel unpacks into its root file system at boot
 * (Documentation/driver-api/early-userspace/buffer-format.rst). Written in
 * TypeScript, so no `cpio` tool is needed.
 *
 * @module
 */

import type { KernelModule } from "./modules.ts";

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

/** Printed on the console for each module `insmod` refuses, before insmod's own message. */
export const INSMOD_FAILED = "DENOVISOR-INSMOD-FAILED";

/** What goes into a busybox initramfs besides `/init`. */
export interface BusyboxInitramfsOptions {
  /**
   * Kernel modules, in load order (as `fetchDebianModules` returns them): put
   * into `/lib/modules/` and inserted with `insmod` before the rest of `/init`.
   * A module insmod refuses prints `DENOVISOR-INSMOD-FAILED NAME STATUS`
   * ({@link INSMOD_FAILED}) and insmod's message on the console, and `/init`
   * goes on.
   */
  modules?: readonly Pick<KernelModule, "name" | "path">[];
  /** More entries (a static program under `bin/`, say), after busybox and the modules. */
  files?: readonly InitramfsEntry[];
}

/**
 * A busybox initramfs: `/bin/busybox`, `/dev/console`, empty `/proc` and
 * `/sys`, and an `/init` shell script that mounts /proc, inserts `modules`,
 * then runs `lines` (busybox applets by full path, or plain names after
 * `/bin/busybox --install -s /bin`).
 *
 * @param busybox A static busybox executable (Debian's `busybox-static`).
 * @param lines The rest of `/init`.
 * @param options The modules to insert first.
 * @returns The newc archive.
 * @throws {Error} When a module's name is not a plain module name or its file
 *   cannot be read.
 * @example
 * ```ts ignore
 * import { busyboxInitramfs } from "denovisor/src/linux/initramfs.ts";
 * const initrd = await busyboxInitramfs(await Deno.readFile("busybox"), [
 *   "/bin/busybox --install -s /bin",
 *   "echo hello from the initramfs",
 *   "poweroff -f",
 * ]);
 * ```
 */
export async function busyboxInitramfs(
  busybox: Uint8Array,
  lines: readonly string[],
  options: BusyboxInitramfsOptions = {},
): Promise<Uint8Array> {
  const modules = options.modules ?? [];
  const insmod = modules.map((m) => {
    if (!/^[A-Za-z0-9_]+$/.test(m.name)) throw new Error(`bad module name ${m.name}`);
    return `/bin/busybox insmod /lib/modules/${m.name}.ko || echo "${INSMOD_FAILED} ${m.name} $?"`;
  });
  const init = [
    "#!/bin/busybox sh",
    "/bin/busybox mount -t proc proc /proc",
    ...insmod,
    ...lines,
  ];
  const moduleEntries: InitramfsEntry[] = modules.length === 0 ? [] : [
    { path: "lib", kind: "dir" },
    { path: "lib/modules", kind: "dir" },
    ...await Promise.all(modules.map(async (m) => ({
      path: `lib/modules/${m.name}.ko`,
      mode: 0o644,
      data: await Deno.readFile(m.path),
    }))),
  ];
  return buildInitramfs([
    { path: "dev", kind: "dir" },
    { path: "dev/console", kind: "char", device: [5, 1] },
    { path: "proc", kind: "dir" },
    { path: "sys", kind: "dir" },
    { path: "bin", kind: "dir" },
    { path: "bin/busybox", data: busybox },
    ...moduleEntries,
    ...options.files ?? [],
    { path: "init", data: new TextEncoder().encode(init.join("\n") + "\n") },
  ]);
}
