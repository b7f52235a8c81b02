/**
 * Tests of the core's build system: the manifest, the no-op fast path, the
 * `DENOVISOR_LIB` override and rebuilds after a source change.
 *
 * The rebuild test works on a copy of `core/` in a temporary folder; it copies
 * `target/release` with timestamps preserved so cargo only recompiles the
 * changed crate (seconds, instead of the dependencies' ~30 s).
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import {
  checkKvmAccess,
  CORE_LIBRARY_FILE,
  ensureCoreLibrary,
  hashCoreSources,
} from "../src/build/core_build.ts";
import { locateCoreLibrary } from "../src/build/remote_core.ts";
import { ensureDebianCrates } from "../src/build/debian_crates.ts";
import { DenovisorError } from "../src/errors.ts";

const repoRoot = fileURLToPath(new URL("../", import.meta.url));
const coreDir = join(repoRoot, "core");

Deno.test("an unchanged core is not rebuilt: fast, and cargo is not needed", async () => {
  const path = await ensureCoreLibrary({ quiet: true });
  assert.equal(path, join(coreDir, "target", "release", CORE_LIBRARY_FILE));

  const builtAt = Deno.statSync(path).mtime!.getTime();
  assert.equal(await ensureCoreLibrary({ quiet: true }), path);
  assert.equal(Deno.statSync(path).mtime!.getTime(), builtAt, "the library was rebuilt");

  // In a process where cargo cannot be found, the no-op path must still work
  // and print nothing: any build attempt would fail with "cargo is not installed".
  const script = `
    import { ensureCoreLibrary } from ${
    JSON.stringify(import.meta.resolve("../src/build/core_build.ts"))
  };
    console.log(await ensureCoreLibrary());`;
  const child = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--no-config", script],
    env: { PATH: "/nonexistent", CARGO_HOME: "/nonexistent" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(child.stderr);
  assert.ok(child.success, stderr);
  assert.equal(new TextDecoder().decode(child.stdout).trim(), path);
  assert.equal(stderr, "", "the no-op path printed progress, so it tried to build");
});

Deno.test("DENOVISOR_LIB overrides the search and must name an existing file", async () => {
  const previous = Deno.env.get("DENOVISOR_LIB");
  const root = new URL("../", import.meta.url);
  const dir = await Deno.makeTempDir();
  try {
    const missing = join(dir, "missing.so");
    Deno.env.set("DENOVISOR_LIB", missing);
    await assert.rejects(
      () => locateCoreLibrary(root),
      (error) =>
        error instanceof DenovisorError && error.code === "INVALID_ARGUMENT" &&
        error.message.includes("DENOVISOR_LIB") && error.message.includes(missing),
    );

    const existing = join(dir, "prebuilt.so");
    Deno.writeFileSync(existing, new Uint8Array());
    Deno.env.set("DENOVISOR_LIB", existing);
    assert.equal(await locateCoreLibrary(root), existing);
  } finally {
    if (previous === undefined) Deno.env.delete("DENOVISOR_LIB");
    else Deno.env.set("DENOVISOR_LIB", previous);
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a changed source triggers a rebuild (on a copy of core/)", async () => {
  await ensureCoreLibrary({ quiet: true });
  const copy = await Deno.makeTempDir({ prefix: "denovisor-build-test-" });
  try {
    Deno.mkdirSync(join(copy, "target"));
    const copied = await new Deno.Command("cp", {
      // -a keeps timestamps, which cargo's freshness checks compare.
      args: ["-a", "Cargo.toml", "Cargo.lock", "src", copy],
      cwd: coreDir,
    }).output();
    assert.ok(copied.success, "cp of the sources failed");
    await new Deno.Command("cp", {
      args: ["-a", "target/release", `${copy}/target/`],
      cwd: coreDir,
    })
      .output();

    const library = await ensureCoreLibrary({ coreDir: copy, quiet: true });
    assert.equal(library, join(copy, "target", "release", CORE_LIBRARY_FILE));
    const stampPath = `${library}.stamp`;
    const builtBefore = Deno.statSync(library).mtime!.getTime();

    Deno.writeTextFileSync(
      join(copy, "src", "lib.rs"),
      "\n// build_test: a change that must trigger a rebuild\n",
      { append: true },
    );
    await ensureCoreLibrary({ coreDir: copy, quiet: true });

    assert.ok(Deno.statSync(library).mtime!.getTime() > builtBefore, "the library was not rebuilt");
    assert.equal(Deno.readTextFileSync(stampPath).trim(), await hashCoreSources(copy));
    assert.equal(
      Deno.readTextFileSync(join(copy, "Cargo.lock")),
      Deno.readTextFileSync(join(coreDir, "Cargo.lock")),
      "the build left Cargo.lock changed",
    );

    const rebuiltAt = Deno.statSync(library).mtime!.getTime();
    await ensureCoreLibrary({ coreDir: copy, quiet: true });
    assert.equal(Deno.statSync(library).mtime!.getTime(), rebuiltAt, "rebuilt once more");
  } finally {
    await Deno.remove(copy, { recursive: true });
  }
});

Deno.test("a folder without Cargo.toml is a clear build error", async () => {
  const empty = await Deno.makeTempDir();
  try {
    await assert.rejects(
      () => ensureCoreLibrary({ coreDir: empty, quiet: true }),
      (error) =>
        error instanceof DenovisorError && error.code === "BUILD_FAILED" &&
        error.message.includes("Cargo.toml"),
    );
  } finally {
    await Deno.remove(empty, { recursive: true });
  }
});

Deno.test("checkKvmAccess returns undefined or says what to fix", () => {
  const problem = checkKvmAccess();
  if (problem !== undefined) {
    assert.match(problem, /^(\/dev\/kvm does not exist|permission denied on \/dev\/kvm|Deno may)/);
  }
});

Deno.test("deno task build prints the library path", async () => {
  const cli = fileURLToPath(new URL("../src/build/build_cli.ts", import.meta.url));
  const help = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", cli, "--help"],
    stdout: "piped",
  }).output();
  assert.ok(help.success);
  assert.match(new TextDecoder().decode(help.stdout), /^Usage: deno task build/);

  const built = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", cli, "--quiet"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.ok(built.success, new TextDecoder().decode(built.stderr));
  assert.equal(
    new TextDecoder().decode(built.stdout).trim(),
    join(coreDir, "target", "release", CORE_LIBRARY_FILE),
  );
});

Deno.test("an unreachable Debian archive is reported as such", async () => {
  const cache = await Deno.makeTempDir();
  try {
    // Port 9 (discard) on the loopback: refused at once, no network involved.
    const archiveUri = "http://127.0.0.1:9/debian";
    const result = await ensureDebianCrates(cache, { archiveUri, progress: false });
    assert.equal(result.ok, false);
    assert.ok(!result.ok && result.problem === "archive-unreachable", JSON.stringify(result));
    assert.ok(!result.ok && result.detail.includes(archiveUri), result.detail);
  } finally {
    await Deno.remove(cache, { recursive: true });
  }
});
