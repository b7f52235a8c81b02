/**
 * `deno task build`: builds the Rust core when its sources changed and prints
 * the library's path on stdout (progress goes to stderr).
 *
 * @example
 * ```sh
 * deno task build              # build if needed, print the path
 * deno task build --force      # rebuild even if nothing changed
 * deno task build --manifest   # also rewrite core/MANIFEST.json (as deno task manifest)
 * ```
 *
 * @module
 */

import { parseArgs } from "node:util";
import { fileURLToPath } from "node:url";
import { DenovisorError } from "../errors.ts";
import { checkKvmAccess, type CrateSource, ensureCoreLibrary } from "./core_build.ts";
import { renderCoreManifestFiles, writeCoreManifest } from "./remote_core.ts";

const USAGE = `Usage: deno task build [options]

Builds the Rust core (core/) into core/target/release/libdenovisor_core.so if its
sources changed since the last build, then prints the library's path.
Dependencies come from crates.io, or from Debian's packaged crates when
crates.io is unreachable (cached in .cache/debian-crates/).

Options:
  --force            rebuild even if nothing changed
  --quiet            print only the path (no progress on stderr)
  --crates SOURCE    where dependencies come from: auto (default), crates-io, debian
  --manifest         rewrite core/MANIFEST.json, the files and hashes that
                     remote imports download and check, and its pinned hash
                     (as \`deno task manifest\`: after changing a core file or
                     the version in deno.json)
  -h, --help         show this help

Environment:
  DENOVISOR_LIB      a prebuilt library to use instead (skips building at import)`;

/**
 * Runs the build command line.
 *
 * @param args The command-line arguments.
 * @returns The process exit code: 0 built, 1 failed, 2 bad usage.
 * @example
 * ```ts
 * import { main } from "denovisor/src/build/build_cli.ts";
 * Deno.exit(await main(["--quiet"]));
 * ```
 */
export async function main(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: {
        force: { type: "boolean" },
        quiet: { type: "boolean" },
        crates: { type: "string" },
        manifest: { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
    }).values;
  } catch (error) {
    console.error(`${(error as Error).message}\n\n${USAGE}`);
    return 2;
  }
  if (parsed.help) {
    console.log(USAGE);
    return 0;
  }
  const crateSource = parsed.crates ?? "auto";
  if (!["auto", "crates-io", "debian"].includes(crateSource)) {
    console.error(`--crates must be auto, crates-io or debian, not ${crateSource}\n\n${USAGE}`);
    return 2;
  }

  const repoRoot = fileURLToPath(new URL("../../", import.meta.url));
  try {
    const path = await ensureCoreLibrary({
      force: parsed.force,
      quiet: parsed.quiet,
      crateSource: crateSource as CrateSource,
    });
    console.log(path);
  } catch (error) {
    if (!(error instanceof DenovisorError)) throw error;
    console.error(`denovisor: ${error.message}`);
    return 1;
  }

  if (parsed.manifest) {
    await writeCoreManifest(repoRoot);
  } else if (
    Object.entries(await renderCoreManifestFiles(repoRoot))
      .some(([path, text]) => readText(`${repoRoot}${path}`) !== text)
  ) {
    console.error(
      "denovisor: warning: core/MANIFEST.json is out of date (remote imports would refuse " +
        "or miss files); run `deno task manifest` and commit it with " +
        "src/build/_core_manifest_hash.ts",
    );
  }
  const kvmProblem = checkKvmAccess();
  if (kvmProblem && !parsed.quiet) console.error(`denovisor: warning: ${kvmProblem}`);
  return 0;
}

function readText(path: string): string | undefined {
  try {
    return Deno.readTextFileSync(path);
  } catch {
    return undefined;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
