/**
 * Importing `mod.ts` over http: the repository is served from 127.0.0.1 and a
 * fresh Deno process imports it with an empty denovisor cache, so the core's
 * sources are downloaded per core/MANIFEST.json, built, and a real-mode guest
 * runs on the result.
 */

import assert from "node:assert/strict";
import { join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { ensureRemoteCore } from "../src/build/remote_core.ts";
import { DenovisorError } from "../src/errors.ts";
import { kvmTest } from "./_helpers.ts";

const repoRoot = fileURLToPath(new URL("../", import.meta.url));

/** The first build compiles every dependency (~30-60 s on a 2-core machine). */
const SUBPROCESS_TIMEOUT_MS = 240_000;

const CONTENT_TYPES: Record<string, string> = {
  ts: "application/typescript; charset=utf-8",
  json: "application/json; charset=utf-8",
};

/**
 * Serves files of the repository, nothing outside it, and no hidden paths
 * (`.git/`, `.cache/`).
 */
function serveRepository(): Deno.HttpServer<Deno.NetAddr> {
  return Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (request) => {
    const segments = decodeURIComponent(new URL(request.url).pathname).split("/")
      .filter((segment) => segment !== "");
    const path = resolve(repoRoot, ...segments);
    const inside = !relative(repoRoot, path).startsWith("..");
    if (!inside || segments.some((segment) => segment.startsWith("."))) {
      return new Response("not found", { status: 404 });
    }
    try {
      const content = await Deno.readFile(path);
      const extension = path.split(".").at(-1) ?? "";
      return new Response(content, {
        headers: { "content-type": CONTENT_TYPES[extension] ?? "text/plain; charset=utf-8" },
      });
    } catch {
      return new Response("not found", { status: 404 });
    }
  });
}

kvmTest("mod.ts imported over http builds the core in the cache and runs a guest", async () => {
  const server = serveRepository();
  const tmp = await Deno.makeTempDir({ prefix: "denovisor-remote-test-" });
  try {
    const origin = `http://127.0.0.1:${server.addr.port}`;

    // The server serves the repository and refuses to leave it.
    for (
      const path of ["/%2e%2e/%2e%2e/etc/passwd", "/.git/config", "/src/..%2f..%2fetc%2fpasswd"]
    ) {
      const response = await fetch(`${origin}${path}`);
      await response.body?.cancel();
      assert.equal(response.status, 404, path);
    }

    // Debian's crates are shared with the checkout so the test stays offline;
    // the core itself is downloaded and built from scratch.
    const cacheDir = join(tmp, "cache");
    const debianCrates = join(repoRoot, ".cache", "debian-crates");
    Deno.mkdirSync(debianCrates, { recursive: true });
    Deno.mkdirSync(cacheDir);
    Deno.symlinkSync(debianCrates, join(cacheDir, "debian-crates"));

    const script = join(tmp, "guest.ts");
    Deno.writeTextFileSync(
      script,
      `import { Vm } from "${origin}/mod.ts";
using vm = await Vm.create({ memoryMiB: 2 });
// real mode: mov al,'H'; mov dx,0x3f8; out dx,al; mov al,'i'; out dx,al; mov al,3; out 0xf4,al
vm.load(new Uint8Array([0xb0,0x48,0xba,0xf8,0x03,0xee,0xb0,0x69,0xee,0xb0,0x03,0xe6,0xf4]), {
  mode: "real",
  loadAddress: 0x7c00,
});
const result = await vm.run({ timeoutMs: 5000 });
console.log(JSON.stringify({ exitCode: result.exitCode, console: result.console }));
`,
    );

    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--no-config", "--no-lock", `--reload=${origin}`, script],
      cwd: tmp,
      // Inherited, except a DENOVISOR_LIB that would skip the remote build.
      clearEnv: true,
      env: { ...inheritedEnv(), DENOVISOR_CACHE_DIR: cacheDir, NO_COLOR: "1" },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
    }, SUBPROCESS_TIMEOUT_MS);
    const output = await child.output().finally(() => clearTimeout(timer));
    const stdout = new TextDecoder().decode(output.stdout);
    const stderr = new TextDecoder().decode(output.stderr);
    const context = `exit code ${output.code}\nstdout:\n${stdout}\nstderr:\n${stderr}`;
    assert.ok(!timedOut, `killed after ${SUBPROCESS_TIMEOUT_MS} ms\n${context}`);
    assert.ok(output.success, context);

    const lastLine = stdout.trim().split("\n").at(-1) ?? "";
    assert.deepEqual(JSON.parse(lastLine), { exitCode: 7, console: "Hi" }, context);
    assert.match(stderr, /downloading the Rust core's sources/, context);

    // The core was built inside the cache, in a <version>-<hash> folder.
    const { version } = JSON.parse(Deno.readTextFileSync(join(repoRoot, "deno.json")));
    const builds = [...Deno.readDirSync(cacheDir)].map((entry) => entry.name)
      .filter((name) => name.startsWith(`${version}-`));
    assert.equal(builds.length, 1, `cache folder holds ${builds.join(", ")}`);
    const library = join(cacheDir, builds[0], "core", "target", "release", "libdenovisor_core.so");
    assert.ok(Deno.statSync(library).isFile);
  } finally {
    await server.shutdown();
    await Deno.remove(tmp, { recursive: true });
  }
});

function inheritedEnv(): Record<string, string> {
  const env = Deno.env.toObject();
  delete env.DENOVISOR_LIB;
  return env;
}

Deno.test("a remote root without a manifest is a clear error", async () => {
  const server = serveRepository();
  try {
    const root = new URL(`http://127.0.0.1:${server.addr.port}/no-such-folder/`);
    await assert.rejects(
      () => ensureRemoteCore(root, { quiet: true }),
      (error) =>
        error instanceof DenovisorError && error.code === "BUILD_FAILED" &&
        error.message.includes(`${root.href}core/MANIFEST.json`),
    );
  } finally {
    await server.shutdown();
  }
});
