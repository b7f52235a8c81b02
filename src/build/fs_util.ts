/**
 * Small file, path and environment helpers shared by the builders (the
 * core's, the guests', the workloads', the functions').
 *
 * The path helpers are POSIX-only (denovisor is Linux-only). Importing
 * `node:path` instead would cost every importer of denovisor ~10 ms: the first
 * `node:` module of a process initializes Deno's Node compatibility layer.
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";

/**
 * Reads an environment variable without needing `--allow-env` for it.
 *
 * @param name The variable.
 * @returns Its value; undefined when unset or not permitted.
 * @example
 * ```ts
 * import { readEnv } from "denovisor/src/build/fs_util.ts";
 * console.log(readEnv("HOME") ?? "no HOME");
 * ```
 */
export function readEnv(name: string): string | undefined {
  try {
    return Deno.env.get(name);
  } catch {
    return undefined;
  }
}

/**
 * Whether a path exists (following links); any error, including a denied
 * permission, counts as no.
 *
 * @param path The path.
 * @returns True when `stat` succeeds.
 * @example
 * ```ts
 * import { exists } from "denovisor/src/build/fs_util.ts";
 * console.log(exists("/dev/kvm"));
 * ```
 */
export function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * Takes an exclusive lock on a file, creating it if needed, and waits for it
 * while another process holds it. Disposing the result closes the file, which
 * releases the lock.
 *
 * @param path The lock file.
 * @returns The held lock, for `using`.
 * @example
 * ```ts
 * import { lockFile } from "denovisor/src/build/fs_util.ts";
 * using _lock = await lockFile("/tmp/denovisor-example.lock");
 * // ... work no other process does at the same time ...
 * ```
 */
export async function lockFile(path: string): Promise<Disposable> {
  const file = await Deno.open(path, { create: true, write: true });
  await file.lock(true);
  return { [Symbol.dispose]: () => file.close() };
}

/**
 * Joins path segments with `/`, folding repeated slashes; `.` and `..` are kept.
 *
 * @param parts The segments.
 * @returns The joined path.
 * @example
 * ```ts
 * import { joinPath } from "denovisor/src/build/fs_util.ts";
 * console.log(joinPath("/var/cache/", "/denovisor")); // /var/cache/denovisor
 * ```
 */
export function joinPath(...parts: string[]): string {
  return parts.join("/").replace(/\/{2,}/g, "/");
}

/**
 * An absolute, normalized path: relative paths are taken from the current
 * folder, and `.`, `..` and empty segments are resolved away.
 *
 * @param parts The segments, joined as by {@link joinPath}.
 * @returns The absolute path, without a trailing slash.
 * @example
 * ```ts
 * import { absolutePath } from "denovisor/src/build/fs_util.ts";
 * console.log(absolutePath("/work/main/core/", "../src")); // /work/main/src
 * ```
 */
export function absolutePath(...parts: string[]): string {
  const joined = joinPath(...parts);
  const segments: string[] = [];
  for (const segment of (joined.startsWith("/") ? joined : `${Deno.cwd()}/${joined}`).split("/")) {
    if (segment === "..") segments.pop();
    else if (segment !== "" && segment !== ".") segments.push(segment);
  }
  return `/${segments.join("/")}`;
}

/**
 * The folder a path is in (`/` for a file at the root).
 *
 * @param path An absolute path.
 * @returns Its parent folder.
 * @example
 * ```ts
 * import { parentPath } from "denovisor/src/build/fs_util.ts";
 * console.log(parentPath("/work/main/guest/hello.S")); // /work/main/guest
 * ```
 */
export function parentPath(path: string): string {
  return path.slice(0, path.lastIndexOf("/")) || "/";
}

/**
 * The local path of a `file:` URL, with percent-escapes decoded.
 *
 * @param url A `file:` URL.
 * @returns Its path.
 * @example
 * ```ts
 * import { pathOfFileUrl } from "denovisor/src/build/fs_util.ts";
 * console.log(pathOfFileUrl(new URL("file:///tmp/a%20b"))); // /tmp/a b
 * ```
 */
export function pathOfFileUrl(url: URL): string {
  return decodeURIComponent(url.pathname);
}

/**
 * The `file:` URL of a source to compile: a path (relative to the working
 * directory; each part URL-encoded, so `#` and `%` stay part of the name) or
 * a `file:` URL.
 *
 * @param source The path or URL.
 * @returns Its `file:` URL.
 * @throws {DenovisorError} `BUILD_FAILED` for a URL that is not `file:`.
 * @example
 * ```ts
 * import { localFileUrl } from "denovisor/src/build/fs_util.ts";
 * console.log(localFileUrl("/tmp/a#b.c").pathname); // /tmp/a%23b.c
 * ```
 */
export function localFileUrl(source: string | URL): URL {
  if (typeof source !== "string") {
    if (source.protocol !== "file:") {
      throw new DenovisorError(
        "BUILD_FAILED",
        `Source ${source.href} is not a local file: only file: URLs can be compiled`,
      );
    }
    return source;
  }
  const base = new URL(`file://${Deno.cwd().replace(/\/?$/, "/")}`);
  return new URL(source.split("/").map(encodeURIComponent).join("/"), base);
}

/**
 * The SHA-256 of `data`, in lowercase hex.
 *
 * @param data The bytes.
 * @returns 64 hex digits.
 * @example
 * ```ts
 * import { sha256Hex } from "denovisor/src/build/fs_util.ts";
 * console.log(await sha256Hex(new TextEncoder().encode("abc"))); // ba7816bf...
 * ```
 */
export async function sha256Hex(data: Uint8Array): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", data as BufferSource));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Copies a freshly built file to `output` in a cache folder through a
 * temporary name in that folder and a rename, so a concurrent reader never
 * sees half a file; the temporary file goes if anything fails.
 *
 * @param built The built file.
 * @param output Where it goes (its folder is created).
 * @param mode Its permission bits.
 * @example
 * ```ts
 * import { installAtomically } from "denovisor/src/build/fs_util.ts";
 * const built = await Deno.makeTempFile();
 * const dir = await Deno.makeTempDir();
 * await installAtomically(built, new URL(`file://${dir}/out`), 0o644);
 * ```
 */
export async function installAtomically(built: string, output: URL, mode: number): Promise<void> {
  const dir = new URL("./", output);
  await Deno.mkdir(dir, { recursive: true });
  const name = pathOfFileUrl(output).split("/").pop()!;
  const temp = new URL(`${name}.${Deno.pid}.${crypto.randomUUID()}.tmp`, dir);
  try {
    await Deno.copyFile(built, temp);
    await Deno.chmod(temp, mode);
    await Deno.rename(temp, output);
  } catch (e) {
    await Deno.remove(temp).catch(() => {});
    throw e;
  }
}
