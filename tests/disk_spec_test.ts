/** `--disk path[,readonly][,serial=ID]` parsing (pure, no KVM). */

import assert from "node:assert/strict";

import { parseDiskSpec } from "../src/cli/disk_spec.ts";
import { DenovisorError } from "../src/errors.ts";

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
