/**
 * The `--disk path[,readonly][,serial=ID]` flag of `run`, parsed into the
 * block device's JSON configuration.
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";

/** A virtio-blk disk: `{"kind": "block", path, readonly, serial}`. */
export interface DiskSpec {
  /** The device kind. */
  kind: "block";
  /** The raw image file (or block device). */
  path: string;
  /** Offer the disk read-only: every write is refused with an I/O error. */
  readonly: boolean;
  /** What GET_ID returns: up to 20 printable ASCII characters, no commas ("" for none). */
  serial: string;
}

/** The longest serial virtio-blk's GET_ID carries. */
export const MAX_SERIAL_LENGTH = 20;

function bad(spec: string, why: string): DenovisorError {
  return new DenovisorError("INVALID_ARGUMENT", `--disk ${JSON.stringify(spec)}: ${why}`);
}

/**
 * Parses one `--disk` value: an image path, then optional `readonly` and
 * `serial=ID` (at most once each, in either order).
 *
 * @param spec The flag's value.
 * @returns The block device's configuration.
 * @throws {DenovisorError} `INVALID_ARGUMENT` (one line naming the flag) for an
 *   empty path, an unknown or repeated option, or a serial that is empty,
 *   longer than 20 characters, or not printable ASCII.
 * @example
 * ```ts
 * import { parseDiskSpec } from "denovisor/src/cli/disk_spec.ts";
 * console.log(parseDiskSpec("root.img,readonly,serial=root"));
 * // { kind: "block", path: "root.img", readonly: true, serial: "root" }
 * ```
 */
export function parseDiskSpec(spec: string): DiskSpec {
  const [path, ...options] = spec.split(",");
  if (path === "") throw bad(spec, "the image path is empty");
  let readonly: boolean | undefined;
  let serial: string | undefined;
  for (const option of options) {
    if (option === "readonly") {
      if (readonly !== undefined) throw bad(spec, "readonly is given twice");
      readonly = true;
    } else if (option.startsWith("serial=")) {
      if (serial !== undefined) throw bad(spec, "serial is given twice");
      serial = option.slice("serial=".length);
      if (!/^[\x21-\x7e]{1,20}$/.test(serial)) {
        throw bad(
          spec,
          `the serial must be 1 to ${MAX_SERIAL_LENGTH} printable ASCII characters without ` +
            "spaces or commas",
        );
      }
    } else {
      throw bad(
        spec,
        `unknown option ${JSON.stringify(option)} (expected readonly or serial=ID)`,
      );
    }
  }
  return { kind: "block", path, readonly: readonly ?? false, serial: serial ?? "" };
}

/**
 * Checks a disk image on the host before any VM exists, so a bad path is a
 * one-line usage error even where `/dev/kvm` is missing (the core checks it
 * again, and locks it, when the device is added).
 *
 * @param path The image's path.
 * @throws {DenovisorError} `INVALID_ARGUMENT` when it does not exist, is a
 *   directory, or is neither a regular file nor a block device.
 * @example
 * ```ts
 * import { checkDiskImage } from "denovisor/src/cli/disk_spec.ts";
 * try {
 *   checkDiskImage("/nonexistent.img");
 * } catch (e) {
 *   console.log((e as Error).message); // disk image /nonexistent.img does not exist
 * }
 * ```
 */
export function checkDiskImage(path: string): void {
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new DenovisorError("INVALID_ARGUMENT", `disk image ${path} does not exist`);
    }
    throw new DenovisorError("INVALID_ARGUMENT", `disk image ${path}: ${(e as Error).message}`);
  }
  if (info.isDirectory) {
    throw new DenovisorError("INVALID_ARGUMENT", `disk image ${path} is a directory`);
  }
  if (!info.isFile && !info.isBlockDevice) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `disk image ${path} is not a regular file or block device`,
    );
  }
}
