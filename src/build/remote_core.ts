/**
 * Finds the core library for wherever denovisor was loaded from: a local
 * checkout builds `core/` in place; an import from an http(s) URL downloads
 * the core's sources (as listed in `core/MANIFEST.json`, each checked against
 * its SHA-256 there, the manifest against the hash pinned in
 * `_core_manifest_hash.ts`) into a per-version cache folder and builds them
 * there. `DENOVISOR_LIB` overrides both.
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";
import { denovisorCacheDir, ensureCoreLibrary, listCoreSources } from "./core_build.ts";
import { absolutePath, exists, joinPath, pathOfFileUrl, readEnv } from "./fs_util.ts";
import { CORE_MANIFEST_SHA256, CORE_MANIFEST_VERSION } from "./_core_manifest_hash.ts";

/** One file of {@link CoreManifest}. */
export interface CoreManifestFile {
  /** The path relative to the repository root, under `core/`. */
  path: string;
  /** The SHA-256 of its content, lowercase hex. */
  sha256: string;
  /** Its size in bytes. */
  size: number;
}

/**
 * `core/MANIFEST.json`: what a remote import downloads to build the core, and
 * the hash each file must have. Regenerate it with `deno task manifest`.
 */
export interface CoreManifest {
  /** The denovisor version (`version` in `deno.json`). */
  version: string;
  /** The core's build inputs, sorted by path. */
  files: CoreManifestFile[];
}

/** The largest core source file a manifest may list (a guard, not a limit in practice). */
const MAX_FILE_BYTES = 16 << 20;
/** The largest manifest we read. */
const MAX_MANIFEST_BYTES = 1 << 20;

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
 * missing file, the root's scheme is unsupported or it is plain http from a
 * host that is not loopback; `BUILD_FAILED` otherwise.
 * @example
 * ```ts
 * import { locateCoreLibrary } from "denovisor/src/build/remote_core.ts";
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

/** Options of {@link ensureRemoteCore} and {@link downloadRemoteCore}. */
export interface RemoteCoreOptions {
  /** Print nothing on stderr (default false). */
  quiet?: boolean;
  /** Where downloads go (default {@link denovisorCacheDir}). */
  cacheDir?: string;
}

/**
 * For denovisor imported from an http(s) URL: downloads the core's sources
 * with {@link downloadRemoteCore}, then builds them with `ensureCoreLibrary`.
 *
 * @param moduleUrl The repository root URL (ending in `/`).
 * @param options `quiet` suppresses progress output; `cacheDir` overrides the cache.
 * @returns The absolute path of the built library.
 * @throws {DenovisorError} `INVALID_ARGUMENT` for plain http from a host that
 * is not loopback; `BUILD_FAILED` when a download, a hash check or the build fails.
 * @example
 * ```ts
 * import { ensureRemoteCore } from "denovisor/src/build/remote_core.ts";
 * const path = await ensureRemoteCore(new URL("https://example.com/denovisor/v0.1.0/"));
 * console.log(path);
 * ```
 */
export async function ensureRemoteCore(
  moduleUrl: URL,
  options: RemoteCoreOptions = {},
): Promise<string> {
  const coreDir = await downloadRemoteCore(moduleUrl, options);
  return await ensureCoreLibrary({ coreDir, quiet: options.quiet });
}

/**
 * Downloads `core/MANIFEST.json` and the files it lists (relative to
 * `moduleUrl`, the repository root) into
 * `<cache>/<version>-<manifest hash>/core/`, unless that folder exists.
 *
 * Trust is anchored in this module: `_core_manifest_hash.ts`, written with the
 * manifest by `deno task manifest`, pins the manifest's SHA-256, and the
 * manifest pins every file's SHA-256 and size. Each file is checked before it
 * is written, into a private folder that is renamed into place only when
 * complete, so the cache folder never holds a partial or tampered download.
 * Plain `http:` is refused unless the host is loopback.
 *
 * @param moduleUrl The repository root URL (ending in `/`).
 * @param options `quiet` suppresses progress output; `cacheDir` overrides the cache.
 * @returns The absolute path of the downloaded `core/` folder.
 * @throws {DenovisorError} `INVALID_ARGUMENT` for plain http from a host that
 * is not loopback; `BUILD_FAILED` when a download or a hash check fails.
 * @example
 * ```ts
 * import { downloadRemoteCore } from "denovisor/src/build/remote_core.ts";
 * const coreDir = await downloadRemoteCore(new URL("https://example.com/denovisor/v0.1.0/"));
 * console.log(coreDir);
 * ```
 */
export async function downloadRemoteCore(
  moduleUrl: URL,
  options: RemoteCoreOptions = {},
): Promise<string> {
  const root = asFolderUrl(moduleUrl);
  if (root.protocol === "http:" && !isLoopbackHost(root.hostname)) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `refusing to download the core from ${root.href}: plain http is only allowed from a ` +
        `loopback host (127.0.0.0/8, ::1, localhost); use https`,
    );
  }
  const cacheDir = options.cacheDir === undefined
    ? denovisorCacheDir()
    : absolutePath(options.cacheDir);
  const versionDir = joinPath(
    cacheDir,
    `${CORE_MANIFEST_VERSION}-${CORE_MANIFEST_SHA256.slice(0, 16)}`,
  );
  const coreDir = joinPath(versionDir, "core");
  // Complete or absent (see download): no network needed once downloaded.
  if (exists(versionDir)) return coreDir;

  const manifestUrl = new URL("core/MANIFEST.json", root);
  const manifestBytes = await fetchFile(manifestUrl, MAX_MANIFEST_BYTES);
  const manifestHash = await sha256Hex(manifestBytes);
  if (manifestHash !== CORE_MANIFEST_SHA256) {
    throw new DenovisorError(
      "BUILD_FAILED",
      `refusing the core's manifest ${manifestUrl.href}: its SHA-256 is ${manifestHash}, ` +
        `but this denovisor pins core/MANIFEST.json to ${CORE_MANIFEST_SHA256}`,
    );
  }
  let loaded: unknown;
  try {
    loaded = JSON.parse(new TextDecoder().decode(manifestBytes));
  } catch (error) {
    throw new DenovisorError(
      "BUILD_FAILED",
      `invalid core manifest ${manifestUrl.href}: ${(error as Error).message}`,
      { cause: error },
    );
  }
  const manifest = parseCoreManifest(loaded, manifestUrl.href);
  await download(root, manifest, manifestBytes, versionDir, options.quiet ?? false);
  return coreDir;
}

/**
 * Computes the manifest of the checkout at `repoRoot`: the version from its
 * `deno.json` and the core's build inputs with their hashes and sizes.
 *
 * @param repoRoot The repository root folder.
 * @returns The manifest, with paths relative to `repoRoot`.
 * @example
 * ```ts
 * import { createCoreManifest } from "denovisor/src/build/remote_core.ts";
 * console.log((await createCoreManifest(".")).files.length);
 * ```
 */
export async function createCoreManifest(repoRoot: string): Promise<CoreManifest> {
  const { version } = JSON.parse(Deno.readTextFileSync(joinPath(repoRoot, "deno.json")));
  const files: CoreManifestFile[] = [];
  for (const path of listCoreSources(joinPath(repoRoot, "core"))) {
    const content = Deno.readFileSync(joinPath(repoRoot, "core", ...path.split("/")));
    files.push({ path: `core/${path}`, sha256: await sha256Hex(content), size: content.length });
  }
  return parseCoreManifest({ version, files }, joinPath(repoRoot, "deno.json"));
}

/**
 * Renders a manifest as the text of `core/MANIFEST.json` (stable under `deno fmt`).
 *
 * @param manifest The manifest.
 * @returns JSON text ending in a newline.
 * @example
 * ```ts
 * import { createCoreManifest, formatCoreManifest } from "denovisor/src/build/remote_core.ts";
 * console.log(formatCoreManifest(await createCoreManifest(".")));
 * ```
 */
export function formatCoreManifest(manifest: CoreManifest): string {
  const files = manifest.files.map(({ path, sha256, size }) => ({ path, sha256, size }));
  return `${JSON.stringify({ version: manifest.version, files }, null, 2)}\n`;
}

/**
 * The files `deno task manifest` writes for the checkout at `repoRoot`, by
 * path relative to it: `core/MANIFEST.json` and `src/build/_core_manifest_hash.ts`,
 * which pins the manifest's SHA-256 for remote imports.
 *
 * @param repoRoot The repository root folder.
 * @returns Their texts, by relative path.
 * @example
 * ```ts
 * import { renderCoreManifestFiles } from "denovisor/src/build/remote_core.ts";
 * const files = await renderCoreManifestFiles(".");
 * console.log(files["core/MANIFEST.json"] === Deno.readTextFileSync("core/MANIFEST.json"));
 * ```
 */
export async function renderCoreManifestFiles(repoRoot: string): Promise<Record<string, string>> {
  const manifest = await createCoreManifest(repoRoot);
  const text = formatCoreManifest(manifest);
  const sha256 = await sha256Hex(new TextEncoder().encode(text));
  return {
    "core/MANIFEST.json": text,
    "src/build/_core_manifest_hash.ts": formatManifestPin(manifest.version, sha256),
  };
}

/**
 * `deno task manifest`: writes the files of {@link renderCoreManifestFiles}.
 *
 * @param repoRoot The repository root folder.
 * @returns The relative paths written.
 * @example
 * ```ts
 * import { writeCoreManifest } from "denovisor/src/build/remote_core.ts";
 * console.log(await writeCoreManifest("."));
 * ```
 */
export async function writeCoreManifest(repoRoot: string): Promise<string[]> {
  const files = await renderCoreManifestFiles(repoRoot);
  for (const [path, text] of Object.entries(files)) {
    Deno.writeTextFileSync(joinPath(repoRoot, ...path.split("/")), text);
  }
  return Object.keys(files);
}

/**
 * Renders `src/build/_core_manifest_hash.ts` (stable under `deno fmt`).
 *
 * @param version The manifest's version.
 * @param sha256 The manifest's SHA-256, hex.
 * @returns TypeScript source text.
 * @example
 * ```ts
 * import { formatManifestPin } from "denovisor/src/build/remote_core.ts";
 * console.log(formatManifestPin("0.1.0", "0".repeat(64)));
 * ```
 */
export function formatManifestPin(version: string, sha256: string): string {
  return `/**
 * Generated by \`deno task manifest\` with core/MANIFEST.json: do not edit. A
 * remote import refuses a manifest whose SHA-256 differs from this pin.
 *
 * @module
 */

/**
 * The SHA-256 (hex) of core/MANIFEST.json.
 *
 * @example
 * \`\`\`ts
 * import { CORE_MANIFEST_SHA256 } from "denovisor/src/build/_core_manifest_hash.ts";
 * console.log(CORE_MANIFEST_SHA256);
 * \`\`\`
 */
export const CORE_MANIFEST_SHA256 =
  ${JSON.stringify(sha256)};

/**
 * The version core/MANIFEST.json names: with the hash, the cache folder's name.
 *
 * @example
 * \`\`\`ts
 * import { CORE_MANIFEST_VERSION } from "denovisor/src/build/_core_manifest_hash.ts";
 * console.log(CORE_MANIFEST_VERSION);
 * \`\`\`
 */
export const CORE_MANIFEST_VERSION = ${JSON.stringify(version)};
`;
}

/**
 * Checks that a value has the manifest's shape, with a version usable in a
 * folder name, paths that stay inside `core/` (a remote manifest must not be
 * able to make us write anywhere else), each listed once, with a hex SHA-256
 * and a bounded size.
 *
 * @param value The parsed JSON.
 * @param source Where it came from, for the error message.
 * @returns The value, typed.
 * @throws {DenovisorError} `BUILD_FAILED` naming the first problem.
 * @example
 * ```ts
 * import { parseCoreManifest } from "denovisor/src/build/remote_core.ts";
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
  const seen = new Set<string>();
  for (const file of files) {
    if (typeof file !== "object" || file === null) throw invalid("a file is not an object");
    const { path, sha256, size } = file as Record<string, unknown>;
    const safe = typeof path === "string" && /^core\/[0-9A-Za-z._/-]+$/.test(path) &&
      path.split("/").every((part) => part !== "" && part !== "." && part !== "..");
    if (!safe) throw invalid(`file ${JSON.stringify(path)} is not a plain path under core/`);
    if (path === "core/MANIFEST.json" || seen.has(path)) {
      throw invalid(`file ${path} is listed twice or is the manifest itself`);
    }
    seen.add(path);
    if (typeof sha256 !== "string" || !/^[0-9a-f]{64}$/.test(sha256)) {
      throw invalid(`file ${path} has no lowercase hex sha256`);
    }
    if (
      typeof size !== "number" || !Number.isSafeInteger(size) || size < 0 || size > MAX_FILE_BYTES
    ) {
      throw invalid(`file ${path} has no size from 0 to ${MAX_FILE_BYTES} bytes`);
    }
  }
  if (!seen.has("core/Cargo.toml")) throw invalid("core/Cargo.toml is not listed");
  return { version, files: files as CoreManifestFile[] };
}

/**
 * Downloads and checks every listed file into a private folder, then renames
 * it into place, so `versionDir` either is complete or does not exist, even
 * when several processes race.
 */
async function download(
  root: URL,
  manifest: CoreManifest,
  manifestBytes: Uint8Array,
  versionDir: string,
  quiet: boolean,
) {
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
          const target = joinPath(partial, ...file.path.split("/"));
          const url = new URL(file.path, root);
          const content = await fetchFile(url, file.size);
          const sha256 = await sha256Hex(content);
          if (sha256 !== file.sha256 || content.length !== file.size) {
            throw new DenovisorError(
              "BUILD_FAILED",
              `refusing ${file.path} from ${url.href}: its SHA-256 is ${sha256} ` +
                `(${content.length} bytes), but core/MANIFEST.json lists ${file.sha256} ` +
                `(${file.size} bytes)`,
            );
          }
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
    Deno.writeFileSync(joinPath(partial, "core", "MANIFEST.json"), manifestBytes);
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

/**
 * Downloads a file, reading at most `expectedSize` + 1 MiB of its body: enough
 * to hash a tampered file for the error message, not enough to exhaust memory.
 */
async function fetchFile(url: URL, expectedSize: number): Promise<Uint8Array<ArrayBuffer>> {
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
  if (!response.ok) {
    // Cancel the body: an unread body leaks its resource.
    await response.body?.cancel();
    throw new DenovisorError(
      "BUILD_FAILED",
      `cannot download ${url.href}: HTTP ${response.status} ${response.statusText}`,
    );
  }
  const limit = expectedSize + (1 << 20);
  const chunks: Uint8Array[] = [];
  let length = 0;
  if (response.body) {
    for await (const chunk of response.body) {
      length += chunk.length;
      if (length > limit) {
        // Leaving the loop early cancels the body.
        throw new DenovisorError(
          "BUILD_FAILED",
          `cannot download ${url.href}: it is larger than ${limit} bytes`,
        );
      }
      chunks.push(chunk);
    }
  }
  const content = new Uint8Array(length);
  let offset = 0;
  for (const chunk of chunks) {
    content.set(chunk, offset);
    offset += chunk.length;
  }
  return content;
}

/** Whether `hostname` (as `URL` normalizes it) is a loopback address or `localhost`. */
function isLoopbackHost(hostname: string): boolean {
  return hostname === "localhost" || hostname === "[::1]" ||
    /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(hostname);
}

function asFolderUrl(url: URL): URL {
  return url.href.endsWith("/") ? url : new URL(`${url.href}/`);
}

async function sha256Hex(bytes: Uint8Array<ArrayBuffer>): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  return Array.from(new Uint8Array(digest), (byte) => byte.toString(16).padStart(2, "0")).join("");
}
