/**
 * `deno task manifest`: writes `core/MANIFEST.json` (every core source with its
 * SHA-256 and size: what a remote import downloads and checks) and
 * `src/build/_core_manifest_hash.ts` (the manifest's own SHA-256, pinned in the
 * imported code). Run it after changing anything under `core/src/`,
 * `core/Cargo.*` or the version in `deno.json`, and commit both files.
 *
 *   deno task manifest
 *
 * @module
 */

import { fileURLToPath } from "node:url";
import { writeCoreManifest } from "../src/build/remote_core.ts";

if (import.meta.main) {
  const repoRoot = fileURLToPath(new URL("../", import.meta.url));
  for (const path of await writeCoreManifest(repoRoot)) console.log(`wrote ${path}`);
}
