/**
 * `deno task contract`: regenerates the TypeScript ↔ Rust contract from the
 * core — `src/_contract.generated.ts` and the JSON fixtures in
 * `tests/fixtures/contract/` — by running the core's unit test
 * `contract::tests::generated_files_are_fresh` with `DENOVISOR_WRITE_CONTRACT=1`
 * (see `core/src/contract.rs`). Without that variable the same test fails when
 * a checked-in file is stale. Run it after changing a status, a flag, an ABI
 * struct or a JSON shape of the core, and commit what it writes.
 *
 *   deno task contract
 *
 * @module
 */

import { fileURLToPath } from "node:url";
import { coreCrateSourceArgs } from "../src/build/core_build.ts";

if (import.meta.main) {
  const coreDir = fileURLToPath(new URL("../core/", import.meta.url));
  const lockPath = `${coreDir}Cargo.lock`;
  const lockBefore = await Deno.readTextFile(lockPath);
  let code: number;
  try {
    const args = [
      "test",
      "--release",
      "--lib",
      ...coreCrateSourceArgs(),
      "contract::tests::generated_files_are_fresh",
    ];
    ({ code } = await new Deno.Command("cargo", {
      args,
      cwd: coreDir,
      env: { DENOVISOR_WRITE_CONTRACT: "1" },
      stdout: "inherit",
      stderr: "inherit",
    }).output());
  } finally {
    // Debian's crates make cargo write placeholder checksums into Cargo.lock.
    await Deno.writeTextFile(lockPath, lockBefore);
  }
  if (code !== 0) Deno.exit(code);
  console.log("wrote src/_contract.generated.ts and tests/fixtures/contract/*.json");
}
