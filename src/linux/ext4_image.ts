/**
 * ext4 disk images for Linux guests, made and read on the host with
 * e2fsprogs: `mkfs.ext4 -d` fills a new ext4 image from a directory (files
 * with their modes, directories, symbolic links), `debugfs -R` reads files and
 * directories back out of one without mounting it (no root, no loop device).
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";

/** No e2fsprogs call may take longer than this. */
const TOOL_TIMEOUT_MS = 120_000;

/** Where e2fsprogs' tools may be when `PATH` lacks the sbin directories. */
const SBIN = ["", "/usr/sbin/", "/sbin/"];

const resolved = new Map<string, string>();

/** The tool's path (PATH first, then the sbin directories), or a clear error. */
async function tool(name: "mkfs.ext4" | "debugfs"): Promise<string> {
  const known = resolved.get(name);
  if (known) return known;
  for (const dir of SBIN) {
    try {
      // Both print their version to stderr and exit 0 with -V.
      const { success } = await new Deno.Command(`${dir}${name}`, {
        args: ["-V"],
        stdin: "null",
        stdout: "null",
        stderr: "null",
      }).output();
      if (success) {
        resolved.set(name, `${dir}${name}`);
        return `${dir}${name}`;
      }
    } catch {
      // Not there; try the next place.
    }
  }
  throw new DenovisorError(
    "IO",
    `${name} is not installed (it comes with e2fsprogs: apt-get install e2fsprogs)`,
  );
}

interface ToolOutput {
  stdout: Uint8Array;
  stderr: string;
}

async function runTool(name: "mkfs.ext4" | "debugfs", args: string[]): Promise<ToolOutput> {
  const command = await tool(name);
  const output = await new Deno.Command(command, {
    args,
    stdin: "null",
    env: { LC_ALL: "C", DEBUGFS_PAGER: "__none__" },
    signal: AbortSignal.timeout(TOOL_TIMEOUT_MS),
  }).output();
  const stderr = new TextDecoder().decode(output.stderr);
  if (output.signal !== null) {
    throw new DenovisorError("IO", `${name} ${args.join(" ")} was killed (${output.signal})`);
  }
  if (!output.success) {
    throw new DenovisorError(
      "IO",
      `${name} ${args.join(" ")} failed (${output.code}): ${stderr.trim()}`,
    );
  }
  return { stdout: output.stdout, stderr };
}

/** A path inside the image, without a leading slash, checked to stay inside it. */
function relativePath(path: string): string {
  const parts = path.split("/").filter((p) => p !== "");
  if (parts.length === 0 || parts.some((p) => p === "." || p === "..")) {
    throw new DenovisorError("INVALID_ARGUMENT", `bad path in the image: "${path}"`);
  }
  return parts.join("/");
}

/** A path for a debugfs request: absolute, and with nothing its parser would split on. */
function debugfsPath(path: string): string {
  if (/["\n\r\0]/.test(path)) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `debugfs cannot quote the path ${JSON.stringify(path)}`,
    );
  }
  return `"/${path.replace(/^\/+/, "")}"`;
}

/** One entry of an image made by {@link makeExt4Image}, when plain contents are not enough. */
export type Ext4Entry =
  | {
    /** A regular file. */
    kind: "file";
    /** Its contents (a string is written as UTF-8). */
    data: string | Uint8Array;
    /** Its permission bits (default 0o644). */
    mode?: number;
  }
  | {
    /** A directory (parents of other entries are made anyway, 0o755). */
    kind: "dir";
    /** Its permission bits (default 0o755). */
    mode?: number;
  }
  | {
    /** A symbolic link. */
    kind: "symlink";
    /** What it points to, e.g. `/bin/busybox`. */
    target: string;
  };

/**
 * Makes an ext4 image of `sizeMiB` MiB at `path` holding `files` (paths inside
 * the image, parents created as needed), with `mkfs.ext4 -q -F -d`. A string or
 * bytes is a regular file with mode 0o644; an {@link Ext4Entry} says what else
 * an entry is (an executable, a directory, a symbolic link). The root
 * directory belongs to root (`-E root_owner=0:0`), the rest to whoever makes
 * the image, as `mkfs.ext4 -d` copies owners.
 *
 * @param path The image file to write (replaced if it exists).
 * @param sizeMiB Its size.
 * @param files The entries by path inside the image, e.g. `{ "etc/motd": "hi\n" }`.
 * @throws {DenovisorError} `IO` when e2fsprogs is missing or mkfs.ext4 fails,
 *   `INVALID_ARGUMENT` for a bad size, mode or symlink target, or a path that
 *   leaves the image.
 * @example
 * ```ts ignore
 * import { makeExt4Image } from "denovisor/src/linux/ext4_image.ts";
 * await makeExt4Image("disk.img", 16, {
 *   "etc/motd": "hello\n",
 *   "bin/tool": { kind: "file", data: await Deno.readFile("tool"), mode: 0o755 },
 *   "bin/alias": { kind: "symlink", target: "tool" },
 *   "tmp": { kind: "dir", mode: 0o1777 },
 * });
 * ```
 */
export async function makeExt4Image(
  path: string,
  sizeMiB: number,
  files: Record<string, string | Uint8Array | Ext4Entry>,
): Promise<void> {
  if (!Number.isInteger(sizeMiB) || sizeMiB < 1 || sizeMiB > 1 << 20) {
    throw new DenovisorError("INVALID_ARGUMENT", `bad image size ${sizeMiB} MiB`);
  }
  const entries = Object.entries(files).map(([p, entry]) => {
    const file = relativePath(p);
    const e: Ext4Entry = typeof entry === "string" || entry instanceof Uint8Array
      ? { kind: "file", data: entry }
      : entry;
    if (e.kind !== "symlink" && e.mode !== undefined) {
      if (!Number.isInteger(e.mode) || e.mode < 0 || e.mode > 0o7777) {
        throw new DenovisorError("INVALID_ARGUMENT", `bad mode ${e.mode} for ${file}`);
      }
    }
    if (e.kind === "symlink" && (e.target === "" || e.target.includes("\0"))) {
      throw new DenovisorError("INVALID_ARGUMENT", `bad symlink target for ${file}`);
    }
    return [file, e] as const;
  });
  // Directories first (shortest paths first), so a directory's mode is not
  // overwritten by the mkdir -p of an entry inside it.
  entries.sort(([a, x], [b, y]) =>
    Number(y.kind === "dir") - Number(x.kind === "dir") || a.split("/").length - b.split("/").length
  );
  const root = await Deno.makeTempDir({ prefix: "denovisor-ext4-" });
  try {
    for (const [file, entry] of entries) {
      const at = `${root}/${file}`;
      const parent = file.includes("/") ? file.replace(/\/[^/]*$/, "") : "";
      if (parent) await Deno.mkdir(`${root}/${parent}`, { recursive: true });
      if (entry.kind === "dir") {
        await Deno.mkdir(at, { recursive: true });
        await Deno.chmod(at, entry.mode ?? 0o755);
      } else if (entry.kind === "symlink") {
        await Deno.symlink(entry.target, at);
      } else {
        const bytes = typeof entry.data === "string"
          ? new TextEncoder().encode(entry.data)
          : entry.data;
        await Deno.writeFile(at, bytes);
        // Exactly these bits, whatever the umask.
        await Deno.chmod(at, entry.mode ?? 0o644);
      }
    }
    await Deno.remove(path).catch((e) => {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    });
    await runTool("mkfs.ext4", [
      "-q",
      "-F",
      "-E",
      "root_owner=0:0",
      "-d",
      root,
      path,
      `${sizeMiB}M`,
    ]);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}

/** debugfs's banner on stderr (`debugfs 1.47.0 (5-Feb-2023)`), which is not an error. */
const BANNER = /^debugfs \d[^\n]*$/;

/** The request's complaints: debugfs reports them on stderr and still exits 0. */
function complaints(stderr: string): string[] {
  return stderr.split("\n").map((l) => l.trim()).filter((l) => l !== "" && !BANNER.test(l));
}

/**
 * A file's contents from an ext4 image, read with `debugfs -R cat`.
 *
 * @param image The image file.
 * @param guestPath The file's path inside the image.
 * @returns Its bytes.
 * @throws {DenovisorError} `IO` when the file is not there (or debugfs fails).
 * @example
 * ```ts ignore
 * import { debugfsCat } from "denovisor/src/linux/ext4_image.ts";
 * const motd = new TextDecoder().decode(await debugfsCat("disk.img", "/etc/motd"));
 * ```
 */
export async function debugfsCat(image: string, guestPath: string): Promise<Uint8Array> {
  const path = debugfsPath(guestPath);
  // `cat` of a missing file prints nothing and exits 0: stat first.
  const stat = await runTool("debugfs", ["-R", `stat ${path}`, image]);
  const problems = complaints(stat.stderr);
  if (problems.length) {
    throw new DenovisorError("IO", `${guestPath} in ${image}: ${problems.join("; ")}`);
  }
  if (!/Type: regular/.test(new TextDecoder().decode(stat.stdout))) {
    throw new DenovisorError("IO", `${guestPath} in ${image} is not a regular file`);
  }
  const cat = await runTool("debugfs", ["-R", `cat ${path}`, image]);
  const catProblems = complaints(cat.stderr);
  if (catProblems.length) {
    throw new DenovisorError("IO", `${guestPath} in ${image}: ${catProblems.join("; ")}`);
  }
  return cat.stdout;
}

/** One entry of a directory in an ext4 image. */
export interface DebugfsEntry {
  /** Its name in the directory. */
  name: string;
  /** Its inode number. */
  inode: number;
  /** Its mode, type bits included (0o100644 for a plain file). */
  mode: number;
  /** `file`, `dir`, `symlink` or `other`. */
  type: "file" | "dir" | "symlink" | "other";
  /** Its size in bytes. */
  size: number;
}

/**
 * The entries of a directory in an ext4 image (without `.` and `..`), read with
 * `debugfs -R "ls -p"`.
 *
 * @param image The image file.
 * @param dir The directory's path inside the image (`/` for the root).
 * @returns Its entries, in directory order.
 * @throws {DenovisorError} `IO` when the directory is not there.
 * @example
 * ```ts ignore
 * import { debugfsLs } from "denovisor/src/linux/ext4_image.ts";
 * for (const entry of await debugfsLs("disk.img", "/etc")) console.log(entry.name, entry.size);
 * ```
 */
export async function debugfsLs(image: string, dir: string): Promise<DebugfsEntry[]> {
  const path = dir.replace(/^\/+/, "") === "" ? '"/"' : debugfsPath(dir);
  const { stdout, stderr } = await runTool("debugfs", ["-R", `ls -p ${path}`, image]);
  const problems = complaints(stderr);
  if (problems.length) throw new DenovisorError("IO", `${dir} in ${image}: ${problems.join("; ")}`);
  const entries: DebugfsEntry[] = [];
  // Each line: /inode/mode(octal)/uid/gid/name/size/
  for (const line of new TextDecoder().decode(stdout).split("\n")) {
    const match = /^\/(\d+)\/([0-7]+)\/\d+\/\d+\/(.*)\/(\d*)\/$/.exec(line.trim());
    if (!match) continue;
    const [, inode, mode, name, size] = match;
    if (name === "." || name === ".." || Number(inode) === 0) continue;
    const bits = parseInt(mode, 8);
    const kind = bits & 0o170000;
    entries.push({
      name,
      inode: Number(inode),
      mode: bits,
      type: kind === 0o100000
        ? "file"
        : kind === 0o040000
        ? "dir"
        : kind === 0o120000
        ? "symlink"
        : "other",
      size: Number(size || 0),
    });
  }
  return entries;
}
