/**
 * Finds the core library for wherever denovisor was loaded from: a local
 * checkout builds `core/` in place; an import from an http(s) URL downloads
 * the core's sources (as listed in `core/MANIFEST.json`) into a per-version
 * cache folder and builds them there. `DENOVISOR_LIB` overrides both.
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";
import { denovisorCacheDir, ensureCoreLibrary, listCoreSources } from "./core_build.ts";
import { absolutePath, exists, joinPath, pathOfFileUrl, readEnv } from "./fs_util.ts";

/**
 * `core/MANIFEST.json`: what a remote import downloads to build the core.
 * Regenerate it with `deno task build --manifest`.
 */
export interface CoreManifest {
  /** The denovisor version (`version` in `deno.json`). */
  version: string;
  /** The core's build inputs, relative to the repository root, sorted. */
  files: string[];
}

/**
 * Returns the path of the core library for the denovisor tree rooted at
 * `moduleRootUrl`, building (and for http(s) roots downloading) it if needed.
 * The environment variable `DENOVISOR_LIB` overrides the search; it must then
 * name an existing file.
 *
 * @param moduleRootUrl The repository root: `new URL("../", import.meta.url)`
 * from `src/ffi.ts`.
 * @param options `quiet` suppresses progress output while building.
 * @returns The absolute path to pass to `Deno.dlopen`.
 * @throws {DenovisorError} `INVALID_ARGUMENT` when `DENOVISOR_LIB` names a
 * missing file or the root's scheme is unsupported; `BUILD_FAILED` otherwise.
 * @example
 * ```ts
 * import { locateCoreLibrary } from "./src/build/remote_core.ts";
 * const path = await locateCoreLibrary(new URL("./", import.meta.url));
 * console.log(path);
 * ```
 */
export async function locateCoreLibrary(
  moduleRootUrl: URL,
  options: { quiet?: boolean } = {},
): Promise<string> {
  const override = readEnv("DENOVISOR_LIB");
  if (override) {
    const path = absolutePath(override);
    try {
      if (Deno.statSync(path).isFile) return path;
    } catch {
      // Reported below, with the variable's name.
    }
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `DENOVISOR_LIB is set to ${path}, which does not exist or is not a file; ` +
        `unset it to build the core from source`,
    );
  }
  const root = asFolderUrl(moduleRootUrl);
  if (root.protocol === "file:") {
    return await ensureCoreLibrary({ coreDir: pathOfFileUrl(new URL("core/", root)), ...options });
  }
  if (root.protocol === "http:" || root.protocol === "https:") {
    return await ensureRemoteCore(root, options);
  }
  throw new DenovisorError(
    "INVALID_ARGUMENT",
    `cannot build the core for denovisor loaded from ${root.href}: ` +
      `set DENOVISOR_LIB to a built libdenovisor_core.so`,
  );
}

/**
 * For denovisor imported from an http(s) URL: downloads `core/MANIFEST.json`
 * and the files it lists (relative to `moduleUrl`, the repository root) into
 * `<cache>/<version>-<manifest hash>/core/`, where `<cache>` is
 * {@link denovisorCacheDir}, then builds them with `ensureCoreLibrary`.
 *
 * The manifest is loaded through Deno's module loader, so it is cached like
 * the TypeScript modules: later runs work offline and `--reload` refreshes it.
 *
 * @param moduleUrl The repository root URL (ending in `/`).
 * @param options `quiet` suppresses progress output.
 * @returns The absolute path of the built library.
 * @throws {DenovisorError} `BUILD_FAILED` when a download or the build fails.
 * @example
 * ```ts
 * import { ensureRemoteCore } from "./src/build/remote_core.ts";
 * const path = await ensureRemoteCore(new URL("https://example.com/denovisor/v0.1.0/"));
 * console.log(path);
 * ```
 */
export async function ensureRemoteCore(
  moduleUrl: URL,
  options: { quiet?: boolean } = {},
): Promise<string> {
  const root = asFolderUrl(moduleUrl);
  const manifestUrl = new URL("core/MANIFEST.json", root);
  let loaded: unknown;
  try {
    loaded = (await import(manifestUrl.href, { with: { type: "json" } })).default;
  } catch (error) {
    throw new DenovisorError(
      "BUILD_FAILED",
      `cannot load the core's manifest ${manifestUrl.href}: ${(error as Error).message}`,
      { cause: error },
    );
  }
  const manifest = parseCoreManifest(loaded, manifestUrl.href);
  const manifestHash = (await sha256Hex(JSON.stringify(manifest))).slice(0, 16);
  const versionDir = joinPath(denovisorCacheDir(), `${manifest.version}-${manifestHash}`);
  if (!exists(versionDir)) await download(root, manifest, versionDir, options.quiet ?? false);
  return await ensureCoreLibrary({ coreDir: joinPath(versionDir, "core"), ...options });
}

/**
 * Computes the manifest of the checkout at `repoRoot`: the version from its
 * `deno.json` and the core's build inputs.
 *
 * @param repoRoot The repository root folder.
 * @returns The manifest, with paths relative to `repoRoot`.
 * @example
 * ```ts
 * import { createCoreManifest } from "./src/build/remote_core.ts";
 * console.log(createCoreManifest(".").files.length);
 * ```
 */
export function createCoreManifest(repoRoot: string): CoreManifest {
  const { version } = JSON.parse(Deno.readTextFileSync(joinPath(repoRoot, "deno.json")));
  const files = listCoreSources(joinPath(repoRoot, "core")).map((path) => `core/${path}`);
  return parseCoreManifest({ version, files }, joinPath(repoRoot, "deno.json"));
}

/**
 * Renders a manifest as the text of `core/MANIFEST.json` (stable under `deno fmt`).
 *
 * @param manifest The manifest.
 * @returns JSON text ending in a newline.
 * @example
 * ```ts
 * import { createCoreManifest, formatCoreManifest } from "./src/build/remote_core.ts";
 * Deno.writeTextFileSync("core/MANIFEST.json", formatCoreManifest(createCoreManifest(".")));
 * ```
 */
export function formatCoreManifest(manifest: CoreManifest): string {
  return `${JSON.stringify({ version: manifest.version, files: manifest.files }, null, 2)}\n`;
}

/**
 * Checks that a value has the manifest's shape, with a version usable in a
 * folder name and paths that stay inside `core/`: a remote manifest must not be
 * able to make us write anywhere else.
 *
 * @param value The parsed JSON.
 * @param source Where it came from, for the error message.
 * @returns The value, typed.
 * @throws {DenovisorError} `BUILD_FAILED` naming the first problem.
 * @example
 * ```ts
 * import { parseCoreManifest } from "./src/build/remote_core.ts";
 * const manifest = parseCoreManifest(
 *   JSON.parse(Deno.readTextFileSync("core/MANIFEST.json")),
 *   "core/MANIFEST.json",
 * );
 * console.log(manifest.version);
 * ```
 */
export function parseCoreManifest(value: unknown, source: string): CoreManifest {
  const invalid = (why: string) =>
    new DenovisorError("BUILD_FAILED", `invalid core manifest ${source}: ${why}`);
  if (typeof value !== "object" || value === null) throw invalid("not a JSON object");
  const { version, files } = value as Record<string, unknown>;
  if (typeof version !== "string" || !/^[0-9A-Za-z][0-9A-Za-z.+_-]*$/.test(version)) {
    throw invalid(`version ${JSON.stringify(version)} is not a plain version string`);
  }
  if (!Array.isArray(files)) throw invalid("files is not an array");
  for (const file of files) {
    const safe = typeof file === "string" && /^core\/[0-9A-Za-z._/-]+$/.test(file) &&
      file.split("/").every((part) => part !== "" && part !== "." && part !== "..");
    if (!safe) throw invalid(`file ${JSON.stringify(file)} is not a plain path under core/`);
  }
  if (!files.includes("core/Cargo.toml")) throw invalid("core/Cargo.toml is not listed");
  return { version, files: files as string[] };
}

/**
 * Downloads every listed file into a private folder, then renames it into
 * place, so `versionDir` either is complete or does not exist, even when
 * several processes race.
 */
async function download(root: URL, manifest: CoreManifest, versionDir: string, quiet: boolean) {
  if (!quiet) {
    console.error(
      `denovisor: downloading the Rust core's sources (${manifest.files.length} files) ` +
        `from ${root.href}...`,
    );
  }
  const partial = `${versionDir}.partial-${crypto.randomUUID()}`;
  try {
    const queue = [...manifest.files];
    let failed = false;
    const worker = async () => {
      for (let file = queue.shift(); file !== undefined && !failed; file = queue.shift()) {
        try {
          const target = joinPath(partial, ...file.split("/"));
          const content = await fetchFile(new URL(file, root));
          Deno.mkdirSync(target.slice(0, target.lastIndexOf("/")), { recursive: true });
          Deno.writeFileSync(target, content);
        } catch (error) {
          failed = true;
          throw error;
        }
      }
    };
    // A few downloads in flight hide latency and stay polite to the server.
    // allSettled, not all: no worker may still write once we clean up.
    const outcomes = await Promise.allSettled(Array.from({ length: 6 }, worker));
    const failure = outcomes.find((outcome) => outcome.status === "rejected");
    if (failure) throw failure.reason;
    Deno.writeTextFileSync(
      joinPath(partial, "core", "MANIFEST.json"),
      formatCoreManifest(manifest),
    );
    try {
      Deno.renameSync(partial, versionDir);
    } catch (error) {
      // Another process completed the same download first: use its copy.
      if (!exists(versionDir)) throw error;
    }
  } finally {
    try {
      Deno.removeSync(partial, { recursive: true });
    } catch {
      // Already renamed into place.
    }
  }
}

async function fetchFile(url: URL): Promise<Uint8Array> {
  let response: Response;
  try {
    response = await fetch(url);
  } catch (error) {
    throw new DenovisorError(
      "BUILD_FAILED",
      `cannot download ${url.href}: ${(error as Error).message}`,
      { cause: error },
    );
  }
  // Read the body even on errors: an unread body leaks its resource.
  const content = new Uint8Array(await response.arrayBuffer());
  if (!response.ok) {
    throw new DenovisorError(
      "BUILD_FAILED",
      `cannot download ${url.href}: HTTP ${response.status} ${response.statusText}`,
    );
  }
  return content;
}

function asFolderUrl(url: URL): URL {
  return url.href.endsWith("/") ? url : new URL(`${url.href}/`);
}

async function sha256Hex(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (byte) => byte.toString(16).padStart(2, "0")).join("");
}
