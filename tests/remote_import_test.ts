/**
 * Importing `mod.ts` over http: the repository is served from 127.0.0.1 and a
 * fresh Deno process imports it with an empty denovisor cache, so the core's
 * sources are downloaded per core/MANIFEST.json, verified, built, and a
 * real-mode guest runs on the result. The other tests need no KVM: the
 * checked-in manifest matches the tree, and a tampered file or manifest, or
 * plain http from a remote host, is refused.
 */

import assert from "node:assert/strict";
import { join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { CORE_MANIFEST_SHA256 } from "../src/build/_core_manifest_hash.ts";
import {
  downloadRemoteCore,
  ensureRemoteCore,
  parseCoreManifest,
  writeCoreManifest,
} from "../src/build/remote_core.ts";
import { DenovisorError } from "../src/errors.ts";
import { ABI_VERSION } from "../src/ffi.ts";
import { kvmTest } from "./_helpers.ts";

const repoRoot = fileURLToPath(new URL("../", import.meta.url));

/**
 * The first build compiles every dependency: ~30-60 s on a 2-core machine, ~8x
 * that under kvmbox's emulator (which sets KVMBOX=1).
 */
const SUBPROCESS_TIMEOUT_MS = Deno.env.get("KVMBOX") === "1" ? 1_200_000 : 240_000;

const CONTENT_TYPES: Record<string, string> = {
  ts: "application/typescript; charset=utf-8",
  json: "application/json; charset=utf-8",
};

/** What {@link serveRepository} serves instead of the file, by URL path. */
type Overrides = Record<string, Uint8Array<ArrayBuffer>>;

/**
 * Serves files of the repository, nothing outside it, and no hidden paths
 * (`.git/`, `.cache/`); `overrides` replace files, and every requested path is
 * appended to `requests`.
 */
function serveRepository(
  overrides: Overrides = {},
  requests: string[] = [],
): Deno.HttpServer<Deno.NetAddr> {
  return Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (request) => {
    const pathname = decodeURIComponent(new URL(request.url).pathname);
    requests.push(pathname);
    const segments = pathname.split("/").filter((segment) => segment !== "");
    const path = resolve(repoRoot, ...segments);
    const inside = !relative(repoRoot, path).startsWith("..");
    if (!inside || segments.some((segment) => segment.startsWith("."))) {
      return new Response("not found", { status: 404 });
    }
    try {
      const content = overrides[pathname] ?? await Deno.readFile(path);
      const extension = path.split(".").at(-1) ?? "";
      return new Response(content, {
        headers: { "content-type": CONTENT_TYPES[extension] ?? "text/plain; charset=utf-8" },
      });
    } catch {
      return new Response("not found", { status: 404 });
    }
  });
}

/**
 * The denovisor cache both remote-import tests use: inside the checkout, so that
 * the build made on the host (no KVM needed) is what the guest test uses where
 * it runs inside kvmbox (whose emulated CPU would take many minutes to build it).
 */
const REMOTE_CACHE = join(repoRoot, ".cache", "remote-import-test");

/**
 * Runs `body` (a module's text) in a fresh Deno process that imports the
 * repository over http from 127.0.0.1, with {@link REMOTE_CACHE} as its cache.
 */
async function runRemote(body: (origin: string) => string) {
  const server = serveRepository();
  const tmp = await Deno.makeTempDir({ prefix: "denovisor-remote-test-" });
  try {
    const origin = `http://127.0.0.1:${server.addr.port}`;
    // Debian's crates are shared with the checkout so the test stays offline.
    const debianCrates = join(repoRoot, ".cache", "debian-crates");
    Deno.mkdirSync(debianCrates, { recursive: true });
    Deno.mkdirSync(REMOTE_CACHE, { recursive: true });
    try {
      Deno.symlinkSync(debianCrates, join(REMOTE_CACHE, "debian-crates"));
    } catch (e) {
      if (!(e instanceof Deno.errors.AlreadyExists)) throw e;
    }
    const script = join(tmp, "remote.ts");
    Deno.writeTextFileSync(script, body(origin));
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--no-config", "--no-lock", `--reload=${origin}`, script],
      cwd: tmp,
      // Inherited, except a DENOVISOR_LIB that would skip the remote build.
      clearEnv: true,
      env: { ...inheritedEnv(), DENOVISOR_CACHE_DIR: REMOTE_CACHE, NO_COLOR: "1" },
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
    return { stdout, stderr, context };
  } finally {
    await server.shutdown();
    await Deno.remove(tmp, { recursive: true });
  }
}

Deno.test("the repository server refuses paths outside it and hidden ones", async () => {
  const server = serveRepository();
  try {
    const origin = `http://127.0.0.1:${server.addr.port}`;
    for (
      const path of ["/%2e%2e/%2e%2e/etc/passwd", "/.git/config", "/src/..%2f..%2fetc%2fpasswd"]
    ) {
      const response = await fetch(`${origin}${path}`);
      await response.body?.cancel();
      assert.equal(response.status, 404, path);
    }
  } finally {
    await server.shutdown();
  }
});

Deno.test("the core imported over http is downloaded, verified and built in an empty cache", async () => {
  await Deno.remove(REMOTE_CACHE, { recursive: true }).catch(() => {});
  // Loading the core (its ABI version) builds it; no /dev/kvm is needed.
  const { stdout, stderr, context } = await runRemote((origin) =>
    `import { openCore } from "${origin}/src/ffi.ts";
console.log(JSON.stringify({ abi: (await openCore()).abiVersion() }));
`
  );
  const lastLine = stdout.trim().split("\n").at(-1) ?? "";
  assert.deepEqual(JSON.parse(lastLine), { abi: ABI_VERSION }, context);
  assert.match(stderr, /downloading the Rust core's sources/, context);
  // The core was built inside the cache, in a <version>-<hash> folder.
  const { version } = JSON.parse(Deno.readTextFileSync(join(repoRoot, "deno.json")));
  const builds = [...Deno.readDirSync(REMOTE_CACHE)].map((entry) => entry.name)
    .filter((name) => name.startsWith(`${version}-`));
  assert.equal(builds.length, 1, `cache folder holds ${builds.join(", ")}`);
  const library = join(
    REMOTE_CACHE,
    builds[0],
    "core",
    "target",
    "release",
    "libdenovisor_core.so",
  );
  assert.ok(Deno.statSync(library).isFile);
});

kvmTest("mod.ts imported over http runs a guest on the core built in the cache", async () => {
  // Uses the build of the test above when it ran first (always, under the
  // test command); builds it otherwise.
  const { stdout, context } = await runRemote((origin) =>
    `import { Vm } from "${origin}/mod.ts";
using vm = await Vm.create({ memoryMiB: 2 });
// real mode: mov al,'H'; mov dx,0x3f8; out dx,al; mov al,'i'; out dx,al; mov al,3; out 0xf4,al
vm.load(new Uint8Array([0xb0,0x48,0xba,0xf8,0x03,0xee,0xb0,0x69,0xee,0xb0,0x03,0xe6,0xf4]), {
  mode: "real",
  loadAddress: 0x7c00,
});
const result = await vm.run({ timeoutMs: 5000 });
console.log(JSON.stringify({ exitCode: result.exitCode, console: result.console }));
`
  );
  const lastLine = stdout.trim().split("\n").at(-1) ?? "";
  assert.deepEqual(JSON.parse(lastLine), { exitCode: 7, console: "Hi" }, context);
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

const REGENERATE =
  "run `deno task manifest` and commit core/MANIFEST.json and src/build/_core_manifest_hash.ts";

async function sha256Hex(bytes: Uint8Array<ArrayBuffer>): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  return Array.from(new Uint8Array(digest), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/**
 * What is wrong with the manifest of the tree at `root`, recomputed from the
 * files on disk (not with the code that writes the manifest): every hash and
 * size, every file under `core/src/` and every `core/Cargo.*` listed, and the
 * pinned hash of the manifest itself.
 */
async function manifestProblems(root: string): Promise<string[]> {
  const manifestBytes = Deno.readFileSync(join(root, "core", "MANIFEST.json"));
  let manifest;
  try {
    manifest = parseCoreManifest(
      JSON.parse(new TextDecoder().decode(manifestBytes)),
      "core/MANIFEST.json",
    );
  } catch (error) {
    return [(error as Error).message];
  }
  const problems: string[] = [];
  const { version } = JSON.parse(Deno.readTextFileSync(join(root, "deno.json")));
  if (manifest.version !== version) {
    problems.push(`the manifest's version ${manifest.version} is not deno.json's ${version}`);
  }

  const onDisk: string[] = [];
  for (const entry of Deno.readDirSync(join(root, "core"))) {
    if (entry.name.startsWith("Cargo.") && !entry.name.endsWith("~")) {
      onDisk.push(`core/${entry.name}`);
    }
  }
  const walk = (dir: string) => {
    for (const entry of Deno.readDirSync(join(root, dir))) {
      if (entry.name.startsWith(".") || entry.name.endsWith("~")) continue;
      if (entry.isDirectory) walk(`${dir}/${entry.name}`);
      else onDisk.push(`${dir}/${entry.name}`);
    }
  };
  walk("core/src");
  const listed = new Set(manifest.files.map((file) => file.path));
  for (const path of onDisk) {
    if (!listed.has(path)) problems.push(`${path} exists but is not listed`);
  }
  for (const file of manifest.files) {
    let content;
    try {
      content = Deno.readFileSync(join(root, file.path));
    } catch {
      problems.push(`${file.path} is listed but does not exist`);
      continue;
    }
    const sha256 = await sha256Hex(content);
    if (sha256 !== file.sha256 || content.length !== file.size) {
      problems.push(
        `${file.path} changed: it has SHA-256 ${sha256} (${content.length} bytes), ` +
          `the manifest lists ${file.sha256} (${file.size} bytes)`,
      );
    }
  }
  const paths = manifest.files.map((file) => file.path);
  if (paths.join("\n") !== [...paths].sort().join("\n")) problems.push("files are not sorted");

  const pinFile = Deno.readTextFileSync(join(root, "src", "build", "_core_manifest_hash.ts"));
  const pinned = /CORE_MANIFEST_SHA256 =\s*"([0-9a-f]{64})"/.exec(pinFile)?.[1];
  const actual = await sha256Hex(manifestBytes);
  if (pinned !== actual) {
    problems.push(
      `src/build/_core_manifest_hash.ts pins ${pinned}, core/MANIFEST.json has SHA-256 ${actual}`,
    );
  }
  return problems;
}

Deno.test("core/MANIFEST.json lists every core source with its SHA-256, and is pinned", async () => {
  const problems = await manifestProblems(repoRoot);
  assert.deepEqual(problems, [], `${problems.join("\n")}\n${REGENERATE}`);
  assert.equal(
    CORE_MANIFEST_SHA256,
    await sha256Hex(Deno.readFileSync(join(repoRoot, "core", "MANIFEST.json"))),
    REGENERATE,
  );

  // Whatever git tracks under core/ must be listed (or be the manifest itself):
  // a tracked build.rs or .cargo/config.toml would otherwise be missing remotely.
  // The fuzz package (core/fuzz/, its own crate) and clippy's settings are not
  // read by the core's build.
  const git = await new Deno.Command("git", {
    args: ["ls-files", "core/"],
    cwd: repoRoot,
    stdout: "piped",
    stderr: "null",
  }).output().catch(() => undefined);
  if (git?.success) {
    const listed = parseCoreManifest(
      JSON.parse(Deno.readTextFileSync(join(repoRoot, "core", "MANIFEST.json"))),
      "core/MANIFEST.json",
    ).files.map((file) => file.path);
    const tracked = new TextDecoder().decode(git.stdout).split("\n").filter((line) => line !== "");
    const unlisted = tracked.filter((file) =>
      file !== "core/MANIFEST.json" && file !== "core/clippy.toml" &&
      !file.startsWith("core/fuzz/") && !listed.includes(file)
    );
    assert.deepEqual(unlisted, [], `tracked under core/ but not in the manifest: ${REGENERATE}`);
  }
});

Deno.test("the manifest check catches a changed, an unlisted file and a stale pin", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "denovisor-manifest-test-" });
  try {
    const copy = (path: string) => {
      const from = join(repoRoot, path);
      if (Deno.statSync(from).isDirectory) {
        for (const entry of Deno.readDirSync(from)) copy(`${path}/${entry.name}`);
        return;
      }
      Deno.mkdirSync(join(tmp, path, ".."), { recursive: true });
      Deno.copyFileSync(from, join(tmp, path));
    };
    for (const path of ["deno.json", "core/Cargo.toml", "core/Cargo.lock", "core/MANIFEST.json"]) {
      copy(path);
    }
    copy("core/src");
    copy("src/build/_core_manifest_hash.ts");
    assert.deepEqual(await manifestProblems(tmp), []);

    const libRs = join(tmp, "core", "src", "lib.rs");
    Deno.writeTextFileSync(libRs, "// changed\n", { append: true });
    Deno.writeTextFileSync(join(tmp, "core", "src", "new.rs"), "");
    Deno.writeTextFileSync(join(tmp, "core", "Cargo.toml.orig"), "");
    const problems = await manifestProblems(tmp);
    assert.equal(problems.length, 3, problems.join("\n"));
    assert.match(problems[0], /^core\/Cargo\.toml\.orig exists but is not listed$/);
    assert.match(problems[1], /^core\/src\/new\.rs exists but is not listed$/);
    assert.match(problems[2], /^core\/src\/lib\.rs changed: it has SHA-256 [0-9a-f]{64}/);

    // `deno task manifest` on that tree fixes all three.
    await writeCoreManifest(tmp);
    assert.deepEqual(await manifestProblems(tmp), []);

    // An edited manifest no longer matches the pinned hash.
    Deno.writeTextFileSync(join(tmp, "core", "MANIFEST.json"), "\n", { append: true });
    assert.match((await manifestProblems(tmp)).join("\n"), /_core_manifest_hash\.ts pins [0-9a-f]/);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("a manifest cannot name files outside core/, an unsafe version or a bad hash", () => {
  const lib = { path: "core/src/lib.rs", sha256: "ab".repeat(32), size: 10 };
  const toml = { ...lib, path: "core/Cargo.toml" };
  const valid = { version: "0.1.0", files: [toml, lib] };
  assert.deepEqual(parseCoreManifest(valid, "test"), valid);
  for (
    const bad of [
      { ...valid, files: [toml, { ...lib, path: "core/../../etc/passwd" }] },
      { ...valid, files: [toml, { ...lib, path: "/etc/passwd" }] },
      { ...valid, files: [toml, { ...lib, path: "core//src/lib.rs" }] },
      { ...valid, files: [toml, { ...lib, path: "core/MANIFEST.json" }] },
      { ...valid, files: [toml, lib, lib] },
      { ...valid, files: [lib] },
      { ...valid, files: [toml, "core/src/lib.rs"] },
      { ...valid, files: [toml, { ...lib, sha256: "AB".repeat(32) }] },
      { ...valid, files: [toml, { ...lib, sha256: "ab" }] },
      { ...valid, files: [toml, { ...lib, size: -1 }] },
      { ...valid, files: [toml, { ...lib, size: 1.5 }] },
      { ...valid, files: [toml, { ...lib, size: 1 << 30 }] },
      { ...valid, version: "../0.1.0" },
      { files: valid.files },
      null,
    ]
  ) {
    assert.throws(
      () => parseCoreManifest(bad, "test"),
      (error) => error instanceof DenovisorError && error.code === "BUILD_FAILED",
      JSON.stringify(bad),
    );
  }
});

/** Runs `downloadRemoteCore` on the served repository with a fresh cache folder. */
async function downloadServed(
  overrides: Overrides,
  check: (error: unknown, requests: string[], cacheDir: string) => void | Promise<void>,
): Promise<void> {
  const requests: string[] = [];
  const server = serveRepository(overrides, requests);
  const cacheDir = await Deno.makeTempDir({ prefix: "denovisor-remote-test-" });
  try {
    const root = new URL(`http://127.0.0.1:${server.addr.port}/`);
    const error = await downloadRemoteCore(root, { quiet: true, cacheDir }).then(
      () => undefined,
      (error) => error,
    );
    await check(error, requests, cacheDir);
  } finally {
    await server.shutdown();
    await Deno.remove(cacheDir, { recursive: true });
  }
}

function cacheEntries(cacheDir: string): string[] {
  return [...Deno.readDirSync(cacheDir)].map((entry) => entry.name);
}

Deno.test("a tampered core source is refused with its name and both hashes", async () => {
  const original = Deno.readFileSync(join(repoRoot, "core", "src", "lib.rs"));
  const tampered = new Uint8Array([...original, ...new TextEncoder().encode("// tampered\n")]);
  await downloadServed({ "/core/src/lib.rs": tampered }, async (error, _requests, cacheDir) => {
    assert.ok(error instanceof DenovisorError, String(error));
    assert.equal(error.code, "BUILD_FAILED");
    assert.match(error.message, /core\/src\/lib\.rs/);
    assert.ok(error.message.includes(await sha256Hex(original)), error.message);
    assert.ok(error.message.includes(await sha256Hex(tampered)), error.message);
    // Nothing of the failed download is left for a later build to use.
    assert.deepEqual(cacheEntries(cacheDir), []);
  });
});

Deno.test("a tampered manifest is refused before any source is downloaded", async () => {
  // A consistent forgery: the manifest lists the tampered file's real hash.
  const manifest = JSON.parse(Deno.readTextFileSync(join(repoRoot, "core", "MANIFEST.json")));
  const tampered = new TextEncoder().encode('compile_error!("tampered");\n');
  const entry = manifest.files.find((file: { path: string }) => file.path === "core/src/lib.rs");
  entry.sha256 = await sha256Hex(tampered);
  entry.size = tampered.length;
  const forged = new TextEncoder().encode(`${JSON.stringify(manifest, null, 2)}\n`);
  await downloadServed(
    { "/core/MANIFEST.json": forged, "/core/src/lib.rs": tampered },
    async (error, requests, cacheDir) => {
      assert.ok(error instanceof DenovisorError, String(error));
      assert.equal(error.code, "BUILD_FAILED");
      assert.match(error.message, /core\/MANIFEST\.json/);
      assert.ok(error.message.includes(CORE_MANIFEST_SHA256), error.message);
      assert.ok(error.message.includes(await sha256Hex(forged)), error.message);
      assert.deepEqual(requests, ["/core/MANIFEST.json"]);
      assert.deepEqual(cacheEntries(cacheDir), []);
    },
  );
});

Deno.test({
  name: "plain http from a host other than loopback is refused before any network access",
  // Any fetch would fail with NotCapable instead of the refusal checked below.
  permissions: { net: false, read: true, write: true, env: true },
  async fn() {
    const cacheDir = await Deno.makeTempDir({ prefix: "denovisor-remote-test-" });
    try {
      for (const url of ["http://example.invalid/", "http://10.0.0.1/denovisor/"]) {
        for (const attempt of [downloadRemoteCore, ensureRemoteCore]) {
          await assert.rejects(
            () => attempt(new URL(url), { quiet: true, cacheDir }),
            (error) =>
              error instanceof DenovisorError && error.code === "INVALID_ARGUMENT" &&
              error.message.includes(url) && error.message.includes("loopback"),
            `${attempt.name} ${url}`,
          );
        }
      }
      // Loopback passes the check and gets as far as the network, which this
      // test may not use (port 1: nothing would answer anyway).
      for (
        const url of [
          "http://127.0.0.1:1/",
          "http://127.1.2.3:1/",
          "http://[::1]:1/",
          "http://localhost:1/",
        ]
      ) {
        await assert.rejects(
          () => downloadRemoteCore(new URL(url), { quiet: true, cacheDir }),
          (error) =>
            error instanceof DenovisorError && error.code === "BUILD_FAILED" &&
            error.message.includes(`cannot download ${url}core/MANIFEST.json`),
          url,
        );
      }
      assert.deepEqual(cacheEntries(cacheDir), []);
    } finally {
      await Deno.remove(cacheDir, { recursive: true });
    }
  },
});

Deno.test("http from loopback is allowed: a verified download lands complete in the cache", async () => {
  const requests: string[] = [];
  const server = serveRepository({}, requests);
  const cacheDir = await Deno.makeTempDir({ prefix: "denovisor-remote-test-" });
  try {
    const root = new URL(`http://127.0.0.1:${server.addr.port}/`);
    const coreDir = await downloadRemoteCore(root, { quiet: true, cacheDir });
    const manifestText = Deno.readTextFileSync(join(repoRoot, "core", "MANIFEST.json"));
    const manifest = parseCoreManifest(JSON.parse(manifestText), "core/MANIFEST.json");
    assert.equal(
      coreDir,
      join(cacheDir, `${manifest.version}-${CORE_MANIFEST_SHA256.slice(0, 16)}`, "core"),
    );
    assert.deepEqual(cacheEntries(cacheDir), [
      `${manifest.version}-${CORE_MANIFEST_SHA256.slice(0, 16)}`,
    ]);
    assert.equal(Deno.readTextFileSync(join(coreDir, "MANIFEST.json")), manifestText);
    for (const file of manifest.files) {
      assert.deepEqual(
        Deno.readFileSync(join(coreDir, "..", file.path)),
        Deno.readFileSync(join(repoRoot, file.path)),
        file.path,
      );
    }
    assert.equal(requests.length, manifest.files.length + 1);

    // A complete cache folder is used as it is: no network needed.
    assert.equal(await downloadRemoteCore(root, { quiet: true, cacheDir }), coreDir);
    assert.equal(requests.length, manifest.files.length + 1);
  } finally {
    await server.shutdown();
    await Deno.remove(cacheDir, { recursive: true });
  }
});
