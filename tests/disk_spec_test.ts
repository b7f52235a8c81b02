/** `--disk path[,readonly][,serial=ID]` parsing (pure, no KVM). */

import assert from "node:assert/strict";

import { DeviceFlagError, deviceFlags } from "../src/cli/device_flags.ts";
import { checkDiskImage, parseDiskSpec } from "../src/cli/disk_spec.ts";
import { DenovisorError } from "../src/errors.ts";
import { cli } from "./_helpers.ts";
import { debianKernel, fetchedPath } from "./_linux.ts";

Deno.test("--disk: a path, readonly and a serial, in any order after the path", () => {
  assert.deepEqual(parseDiskSpec("disk.img"), {
    kind: "block",
    path: "disk.img",
    readonly: false,
    serial: "",
  });
  assert.deepEqual(parseDiskSpec("/images/root.img,readonly,serial=root-1"), {
    kind: "block",
    path: "/images/root.img",
    readonly: true,
    serial: "root-1",
  });
  assert.deepEqual(parseDiskSpec("a.img,serial=X,readonly"), {
    kind: "block",
    path: "a.img",
    readonly: true,
    serial: "X",
  });
  assert.equal(parseDiskSpec("a.img,serial=12345678901234567890").serial.length, 20);
});

Deno.test("--disk: bad specs are one-line INVALID_ARGUMENT errors", () => {
  for (
    const bad of [
      "",
      ",readonly",
      "a.img,",
      "a.img,rw",
      "a.img,readonly,readonly",
      "a.img,serial=",
      "a.img,serial=a,serial=b",
      "a.img,serial=123456789012345678901",
      "a.img,serial=has space",
      "a.img,serial=é",
    ]
  ) {
    assert.throws(
      () => parseDiskSpec(bad),
      (e) =>
        e instanceof DenovisorError && e.code === "INVALID_ARGUMENT" &&
        !e.message.includes("\n") && e.message.includes("--disk"),
      bad,
    );
  }
});

Deno.test("--disk: a missing image, a directory or a device file is refused before any VM", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovisor-disk-spec-" });
  try {
    const image = `${dir}/disk.img`;
    await Deno.writeFile(image, new Uint8Array(4096));
    checkDiskImage(image);
    const cases: [string, RegExp][] = [
      [`${dir}/missing.img`, /^disk image .*missing\.img does not exist$/],
      [dir, /^disk image .* is a directory$/],
      ["/dev/null", /^disk image \/dev\/null is not a regular file or block device$/],
    ];
    for (const [path, message] of cases) {
      assert.throws(
        () => checkDiskImage(path),
        (e) =>
          e instanceof DenovisorError && e.code === "INVALID_ARGUMENT" && message.test(e.message),
        path,
      );
      assert.throws(
        () => deviceFlags({ disk: [`${path},serial=x`] }, { linux: true }),
        (e) => e instanceof DeviceFlagError && message.test(e.message),
        path,
      );
    }
    assert.deepEqual(deviceFlags({ disk: [image, `${image},readonly`] }, { linux: true }), [
      { kind: "rng" },
      { kind: "block", path: image, readonly: false, serial: "" },
      { kind: "block", path: image, readonly: true, serial: "" },
    ]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("run --disk with a bad image or spec is status 2 and one line, before /dev/kvm", async () => {
  const kernel = fetchedPath(debianKernel, "Debian's kernel");
  for (
    const [spec, message] of [
      ["/nonexistent/disk.img", /^denovisor: disk image \/nonexistent\/disk\.img does not exist$/],
      ["/tmp,readonly", /^denovisor: disk image \/tmp is a directory$/],
      ["x.img,rw", /unknown option "rw"/],
    ] as const
  ) {
    const r = await cli("run", "--kernel", kernel, "--disk", spec);
    assert.equal(r.code, 2, r.stderr);
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
    assert.match(r.stderr.trim(), message);
  }
});
