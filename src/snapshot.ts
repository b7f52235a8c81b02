/**
 * Snapshot files: what `Vm.snapshot` writes and `Vm.restore`
 * reads, and {@link inspectSnapshot} to look inside one without a VM.
 *
 * A snapshot is a directory of two files, in a format the Rust core owns
 * (`core/src/snapshot/file.rs`): `state` — a magic, a format version, then the
 * sections `host`, `config`, `vm`, `devices` and `memory`, each with its length
 * and a CRC-64 — and `memory`, guest RAM byte for byte (a sparse file). The
 * `config` section is this module's: the VM's configuration and loaded image.
 *
 * @module
 */

import type { LoadedImage, VmConfig } from "./vm.ts";
import { DenovisorError } from "./errors.ts";
import { openCore } from "./ffi.ts";

/** The kind tag of the `config` section this module writes. */
const CONFIG_KIND = "denovisor-vm";
/** Its version. */
const CONFIG_VERSION = 1;

/** A section of a snapshot's state file. */
export interface SnapshotSection {
  /** `host`, `config`, `vm`, `devices` or `memory`. */
  name: string;
  /** Where its payload starts in the state file. */
  offset: number;
  /** Its payload's length. */
  length: number;
  /** Its CRC-64/XZ (of name, length and payload), 16 hex digits. */
  crc64: string;
}

/** What {@link inspectSnapshot} finds in a snapshot directory. */
export interface SnapshotInfo {
  /** The state file's magic and format version. */
  format: { magic: string; version: number };
  /** Every section, in file order. */
  sections: SnapshotSection[];
  /** The CPU the snapshot was taken on and the CPUID feature registers its
   * guest was given. */
  host: {
    vendor: string;
    family: number;
    model: number;
    stepping: number;
    features: { function: number; index: number; register: string; bits: number }[];
  };
  /** Whether this host can restore it (`problems` says why not). */
  hostCheck: { ok: boolean; problems: string[] };
  /** The `config` section: what `Vm.restore` rebuilds the VM from. */
  config: unknown;
  /** vCPUs in the snapshot. */
  vcpus: number;
  /** Whether it has the in-kernel irqchip. */
  irqchip: boolean;
  /** Guest RAM: size, guest-physical ranges (in file order), the memory
   * file's name, length and CRC-64 (16 hex digits; verified by an eager
   * restore). */
  memory: {
    size: number;
    ranges: [number, number][];
    file: string;
    length: number;
    crc64: string;
    /** `full`, or `diff`: the memory file holds only `pages`, packed. */
    kind: "full" | "diff";
    /** A diff's parent: its directory relative to this one and the
     * CRC-64 of its whole state file. */
    parent?: { dir: string; stateCrc64: string };
    /** A diff's pages, as runs `[first page, pages]` in RAM order. */
    pages?: [number, number][];
  };
}

/**
 * Reads and verifies a snapshot directory without creating a VM: the state
 * file's version and every section's checksum and contents, and the memory
 * file's size (not its checksum, which only an eager restore reads).
 *
 * @example
 * ```ts ignore
 * import { inspectSnapshot } from "denovisor";
 * const info = await inspectSnapshot("/tmp/snap");
 * console.log(info.vcpus, info.memory.size, info.hostCheck.ok);
 * ```
 *
 * @param dir The snapshot directory.
 * @returns What it holds.
 * @throws {DenovisorError} `SNAPSHOT_INVALID` naming the section that is
 *   truncated, corrupted, missing, malformed or of another version; `IO` when
 *   the state file cannot be read.
 */
export async function inspectSnapshot(dir: string): Promise<SnapshotInfo> {
  const core = await openCore();
  return core.snapshotInspect<SnapshotInfo>(dir);
}

/**
 * The `config` section `Vm.snapshot` writes for a VM: its
 * configuration and the image it loaded (addresses as decimal strings).
 *
 * @example
 * ```ts
 * import { snapshotConfig } from "denovisor/src/snapshot.ts";
 * console.log(snapshotConfig({ memoryMiB: 4 }, undefined).config.memoryMiB); // 4
 * ```
 *
 * @param config The VM's configuration.
 * @param loaded The image it loaded, if any.
 * @returns Plain JSON data.
 */
export function snapshotConfig(
  config: VmConfig,
  loaded: LoadedImage | undefined,
): { kind: string; version: number; config: VmConfig; loaded: unknown } {
  return {
    kind: CONFIG_KIND,
    version: CONFIG_VERSION,
    config,
    loaded: loaded === undefined
      ? null
      : { ...loaded, entry: loaded.entry.toString(), stack: loaded.stack.toString() },
  };
}

function bad(message: string): DenovisorError {
  return new DenovisorError("SNAPSHOT_INVALID", `snapshot config: ${message}`);
}

/**
 * Reads back a `config` section written by {@link snapshotConfig}.
 *
 * @example
 * ```ts
 * import { parseSnapshotConfig, snapshotConfig } from "denovisor/src/snapshot.ts";
 * const { config } = parseSnapshotConfig(snapshotConfig({ vcpus: 2 }, undefined));
 * console.log(config.vcpus); // 2
 * ```
 *
 * @param value The parsed section.
 * @returns The VM's configuration and its loaded image.
 * @throws {DenovisorError} `SNAPSHOT_INVALID` for a section of another kind or version.
 */
export function parseSnapshotConfig(
  value: unknown,
): { config: VmConfig; loaded: LoadedImage | undefined } {
  if (typeof value !== "object" || value === null) throw bad("not an object");
  const v = value as Record<string, unknown>;
  if (v.kind !== CONFIG_KIND) throw bad(`kind ${JSON.stringify(v.kind)} is not ${CONFIG_KIND}`);
  if (v.version !== CONFIG_VERSION) {
    throw bad(`version ${JSON.stringify(v.version)}; this denovisor reads ${CONFIG_VERSION}`);
  }
  if (typeof v.config !== "object" || v.config === null) throw bad("no VM configuration");
  let loaded: LoadedImage | undefined;
  if (v.loaded !== null) {
    const l = v.loaded as Record<string, unknown>;
    const formats = ["elf", "flat", "linux"];
    const modes = ["real", "long", "user"];
    if (
      typeof l !== "object" || !formats.includes(l.format as string) ||
      !modes.includes(l.mode as string) || typeof l.entry !== "string" ||
      !/^\d+$/.test(l.entry) || typeof l.stack !== "string" || !/^\d+$/.test(l.stack) ||
      !Number.isSafeInteger(l.size)
    ) {
      throw bad("the loaded image is malformed");
    }
    loaded = {
      format: l.format as LoadedImage["format"],
      mode: l.mode as LoadedImage["mode"],
      entry: BigInt(l.entry),
      stack: BigInt(l.stack),
      size: l.size as number,
    };
  }
  return { config: v.config as VmConfig, loaded };
}
