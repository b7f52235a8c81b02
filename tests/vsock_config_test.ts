/**
 * The vsock device's configuration from TypeScript and the CLI: the shapes
 * `deviceConfigJson` accepts, `--vsock cid=N,path=PATH`, and a bad host side
 * (a socket path in a missing directory, a path already taken) as a one-line
 * usage error before the VM starts. No KVM needed.
 */

import assert from "node:assert/strict";

import { DenovisorError, deviceConfigJson, type VsockDevice } from "../mod.ts";
import { DeviceFlagError, deviceFlags } from "../src/cli/device_flags.ts";
import { cli } from "./_helpers.ts";

Deno.test("deviceConfigJson takes a vsock device with a cid and a path, and refuses bad ones", () => {
  assert.equal(
    deviceConfigJson({ kind: "vsock", cid: 3, path: "/tmp/v.sock" }),
    '{"kind":"vsock","cid":3,"path":"/tmp/v.sock"}',
  );
  const bad: [unknown, RegExp][] = [
    [{ kind: "vsock", cid: 2, path: "/tmp/v.sock" }, /cid 2 is reserved/],
    [{ kind: "vsock", cid: 0xffff_ffff, path: "/tmp/v.sock" }, /out of range/],
    [{ kind: "vsock", cid: 3.5, path: "/tmp/v.sock" }, /cid 3.5/],
    [{ kind: "vsock", cid: 3 }, /needs a socket path/],
    [{ kind: "vsock", cid: 3, path: "" }, /needs a socket path/],
    [{ kind: "vsock", cid: 3, path: `/tmp/${"x".repeat(100)}` }, /too long: at most 96 bytes/],
  ];
  for (const [config, message] of bad) {
    assert.throws(
      () => deviceConfigJson(config as VsockDevice),
      (e) =>
        e instanceof DenovisorError && e.code === "INVALID_ARGUMENT" && message.test(e.message),
      JSON.stringify(config),
    );
  }
});

Deno.test("--vsock cid=N,path=PATH is a vsock device; a malformed flag is refused", async () => {
  const dir = await Deno.makeTempDir();
  try {
    assert.deepEqual(deviceFlags({ vsock: `cid=3,path=${dir}/v.sock` }, { linux: false }), [
      { kind: "vsock", cid: 3, path: `${dir}/v.sock` },
    ]);
    assert.deepEqual(
      deviceFlags({ vsock: `cid=7,path=${dir}/v.sock,name=vs` }, { linux: true }),
      [{ kind: "rng" }, { kind: "vsock", cid: 7, path: `${dir}/v.sock`, name: "vs" }],
    );
    const bad: [string, RegExp][] = [
      ["cid=3", /expected cid=N,path=PATH/],
      [`path=${dir}/v.sock`, /expected cid=N,path=PATH/],
      [`cid=x,path=${dir}/v.sock`, /expected cid=N,path=PATH/],
      [`cid=3,path=${dir}/v.sock,port=5`, /expected cid=N,path=PATH/],
      [`cid=3,cid=4,path=${dir}/v.sock`, /expected cid=N,path=PATH/],
      [`cid=1,path=${dir}/v.sock`, /cid 1 is reserved/],
    ];
    for (const [flag, message] of bad) {
      assert.throws(
        () => deviceFlags({ vsock: flag }, { linux: false }),
        (e) => e instanceof DeviceFlagError && message.test(e.message),
        flag,
      );
    }
    // The same host checks for a vsock given as --device JSON.
    await Deno.writeTextFile(`${dir}/taken`, "");
    assert.throws(
      () =>
        deviceFlags({
          device: [JSON.stringify({ kind: "vsock", cid: 3, path: `${dir}/taken` })],
        }, { linux: false }),
      /vsock path .*\/taken already exists/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a vsock path in a missing directory is a one-line error, status 2, before the VM starts", async () => {
  const r = await cli(
    "run",
    "--kernel",
    "/etc/passwd",
    "--vsock",
    "cid=3,path=/nonexistent-denovisor-dir/v.sock",
  );
  assert.equal(r.code, 2, r.stderr);
  assert.match(
    r.stderr,
    /vsock path \/nonexistent-denovisor-dir\/v\.sock: its directory does not exist/,
  );
  assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
});
