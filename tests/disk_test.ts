/**
 * The host side of the disk tests: ext4 images made with `mkfs.ext4 -d` and
 * read back with `debugfs` (pure: no KVM).
 */

import assert from "node:assert/strict";

import { DenovisorError } from "../src/errors.ts";
import { debugfsCat, debugfsLs, makeExt4Image } from "./_disk.ts";

const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes);

Deno.test("makeExt4Image writes files that debugfs reads back byte for byte", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovisor-disk-test-" });
  try {
    const image = `${dir}/disk.img`;
    const binary = new Uint8Array(300_000).map((_, i) => (i * 7919) & 0xff);
    await makeExt4Image(image, 16, {
      "hello.txt": "hello from the host\n",
      "/etc/motd": "welcome\n",
      "data/deep/blob.bin": binary,
      "empty": "",
    });
    assert.equal((await Deno.stat(image)).size, 16 << 20);
    assert.equal(text(await debugfsCat(image, "hello.txt")), "hello from the host\n");
    assert.equal(text(await debugfsCat(image, "/etc/motd")), "welcome\n");
    assert.deepEqual(await debugfsCat(image, "data/deep/blob.bin"), binary);
    assert.equal((await debugfsCat(image, "empty")).length, 0);

    const root = await debugfsLs(image, "/");
    const byName = new Map(root.map((e) => [e.name, e]));
    assert.deepEqual(
      [...byName.keys()].sort(),
      ["data", "empty", "etc", "hello.txt", "lost+found"],
    );
    assert.equal(byName.get("etc")?.type, "dir");
    assert.equal(byName.get("hello.txt")?.type, "file");
    assert.equal(byName.get("hello.txt")?.size, 20);
    assert.equal(byName.get("hello.txt")?.mode, 0o100644);
    const deep = await debugfsLs(image, "data/deep");
    assert.deepEqual(deep.map((e) => [e.name, e.size]), [["blob.bin", 300_000]]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("makeExt4Image keeps modes, makes directories and symbolic links", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovisor-disk-test-" });
  try {
    const image = `${dir}/disk.img`;
    await makeExt4Image(image, 8, {
      "bin/tool": { kind: "file", data: "#!/bin/sh\necho hi\n", mode: 0o755 },
      "bin/alias": { kind: "symlink", target: "/bin/tool" },
      "tmp": { kind: "dir", mode: 0o1777 },
      "tmp/inside.txt": "x",
      "root": { kind: "dir", mode: 0o700 },
      "etc/shadow": { kind: "file", data: "secret\n", mode: 0o600 },
    });
    const modes = async (path: string) =>
      new Map((await debugfsLs(image, path)).map((e) => [e.name, [e.type, e.mode]]));
    const root = await modes("/");
    assert.deepEqual(root.get("tmp"), ["dir", 0o041777]);
    assert.deepEqual(root.get("root"), ["dir", 0o040700]);
    const bin = await modes("/bin");
    assert.deepEqual(bin.get("tool"), ["file", 0o100755]);
    assert.deepEqual(bin.get("alias"), ["symlink", 0o120777]);
    assert.deepEqual((await modes("/etc")).get("shadow"), ["file", 0o100600]);
    assert.equal(text(await debugfsCat(image, "/tmp/inside.txt")), "x");
    await assert.rejects(
      makeExt4Image(image, 8, { "x": { kind: "file", data: "", mode: 0o10000 } }),
      (e) => e instanceof DenovisorError && /bad mode/.test(e.message),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("debugfs helpers report a missing file or directory instead of empty output", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovisor-disk-test-" });
  try {
    const image = `${dir}/disk.img`;
    await makeExt4Image(image, 4, { "a": "x" });
    await assert.rejects(
      () => debugfsCat(image, "missing.txt"),
      (e) =>
        e instanceof DenovisorError && e.code === "IO" && /missing\.txt.*not found/.test(e.message),
    );
    await assert.rejects(
      () => debugfsCat(image, "lost+found"),
      (e) => e instanceof DenovisorError && /not a regular file/.test(e.message),
    );
    await assert.rejects(
      () => debugfsLs(image, "nope"),
      (e) => e instanceof DenovisorError && e.code === "IO" && /not found/.test(e.message),
    );
    await assert.rejects(
      () => debugfsCat(`${dir}/no-such-image`, "a"),
      (e) => e instanceof DenovisorError && e.code === "IO",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("makeExt4Image refuses paths that leave the image and bad sizes", async () => {
  for (const path of ["../escape", "a/../../b", "/", ""]) {
    await assert.rejects(
      () => makeExt4Image("/nonexistent/never-written.img", 4, { [path]: "x" }),
      (e) => e instanceof DenovisorError && e.code === "INVALID_ARGUMENT",
      path,
    );
  }
  for (const size of [0, -1, 1.5, Number.NaN]) {
    await assert.rejects(
      () => makeExt4Image("/nonexistent/never-written.img", size, {}),
      (e) => e instanceof DenovisorError && e.code === "INVALID_ARGUMENT",
      String(size),
    );
  }
  await assert.rejects(
    () => makeExt4Image("/nonexistent-dir/disk.img", 4, { "a": "x" }),
    (e) => e instanceof DenovisorError && e.code === "IO" && /mkfs\.ext4/.test(e.message),
  );
});
