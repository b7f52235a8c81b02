/**
 * The CLI's device flags (`--rng`, `--device JSON`, ...) turned into
 * {@link DeviceConfig}s: one table, so each device kind adds its flag here.
 *
 * @module
 */

import { type DeviceConfig, deviceConfigJson, type VsockDevice } from "../devices.ts";
import { checkDiskImage, parseDiskSpec } from "./disk_spec.ts";

/** The `parseArgs` option specs of the device flags. */
export const DEVICE_FLAG_OPTIONS = {
  rng: { type: "boolean" },
  "no-rng": { type: "boolean" },
  balloon: { type: "boolean" },
  device: { type: "string", multiple: true },
  disk: { type: "string", multiple: true },
  vsock: { type: "string" },
} as const;

/** The values `parseArgs` gives for {@link DEVICE_FLAG_OPTIONS}. */
export interface DeviceFlagValues {
  rng?: boolean;
  "no-rng"?: boolean;
  balloon?: boolean;
  device?: string[];
  disk?: string[];
  vsock?: string;
}

/** The device flags' lines in `run --help`. */
export const DEVICE_FLAGS_HELP = `Devices (virtio on PCI bus 0, MSI-X: a micro-VM needs --irqchip):
  --rng              a virtio-rng entropy device (default on with --kernel)
  --no-rng           no virtio-rng device with --kernel
  --disk PATH[,readonly][,serial=ID]
                     a virtio-blk disk on a raw image (repeatable: /dev/vda,
                     /dev/vdb... in order)
  --balloon          a virtio-balloon (statistics every second, free page reporting)
  --vsock cid=N,path=PATH
                     a virtio-vsock device: the guest is CID N; its connections
                     to host port P reach the Unix socket PATH_P, and host
                     programs reach guest ports through PATH ("CONNECT P\n")
  --device JSON      any device as JSON, e.g. '{"kind":"rng","name":"rng9"}'
                     (repeatable; the kinds: see the README's Devices section)
`;

/** A bad device flag (the CLI prints it and exits with status 2). */
export class DeviceFlagError extends Error {}

/**
 * The devices the flags ask for.
 *
 * @example
 * ```ts
 * import { deviceFlags } from "./device_flags.ts";
 * console.log(deviceFlags({ rng: true }, { linux: false })); // [{ kind: "rng" }]
 * ```
 *
 * @param values The parsed flags.
 * @param context Whether Linux boots (the rng is then on by default).
 * @returns The devices, in flag order (rng, the disks, the balloon, then `--device`s).
 * @throws {DeviceFlagError} for a malformed or contradictory flag, or a disk
 *   image that is missing, a directory or not a file.
 */
export function deviceFlags(values: DeviceFlagValues, context: { linux: boolean }): DeviceConfig[] {
  if (values.rng && values["no-rng"]) throw new DeviceFlagError("--rng and --no-rng contradict");
  const devices: DeviceConfig[] = [];
  if (values.rng || (context.linux && !values["no-rng"])) devices.push({ kind: "rng" });
  for (const spec of values.disk ?? []) {
    try {
      const disk = parseDiskSpec(spec);
      checkDiskImage(disk.path);
      devices.push(disk);
    } catch (e) {
      throw new DeviceFlagError((e as Error).message);
    }
  }
  if (values.balloon) devices.push({ kind: "balloon" });
  for (const json of values.device ?? []) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(json);
    } catch (e) {
      throw new DeviceFlagError(`--device ${json}: not JSON (${(e as Error).message})`);
    }
    try {
      deviceConfigJson(parsed as DeviceConfig);
    } catch (e) {
      throw new DeviceFlagError(`--device ${json}: ${(e as Error).message}`);
    }
    devices.push(parsed as DeviceConfig);
  }
  if (values.vsock !== undefined) devices.push(vsockFlag(values.vsock));
  for (const d of devices) {
    if (d.kind === "vsock") checkVsockPath(d.path);
  }
  return devices;
}

/** `--vsock cid=N,path=PATH` as a device. */
function vsockFlag(value: string): VsockDevice {
  const fields = new Map<string, string>();
  for (const part of value.split(",")) {
    const eq = part.indexOf("=");
    const key = eq < 0 ? part : part.slice(0, eq);
    if (eq < 0 || !["cid", "path", "name"].includes(key) || fields.has(key)) {
      throw new DeviceFlagError(`--vsock ${value}: expected cid=N,path=PATH[,name=NAME]`);
    }
    fields.set(key, part.slice(eq + 1));
  }
  const cid = fields.get("cid");
  const path = fields.get("path");
  if (cid === undefined || path === undefined || !/^\d+$/.test(cid)) {
    throw new DeviceFlagError(`--vsock ${value}: expected cid=N,path=PATH[,name=NAME]`);
  }
  const device: VsockDevice = { kind: "vsock", cid: Number(cid), path };
  const name = fields.get("name");
  if (name !== undefined) device.name = name;
  try {
    deviceConfigJson(device);
  } catch (e) {
    throw new DeviceFlagError(`--vsock ${value}: ${(e as Error).message}`);
  }
  return device;
}

/** The vsock socket's directory must exist and its path be free, before the VM starts. */
function checkVsockPath(path: string): void {
  const slash = path.lastIndexOf("/");
  const dir = slash < 0 ? "." : slash === 0 ? "/" : path.slice(0, slash);
  let isDir = false;
  try {
    isDir = Deno.statSync(dir).isDirectory;
  } catch {
    isDir = false;
  }
  if (!isDir) throw new DeviceFlagError(`vsock path ${path}: its directory does not exist`);
  let exists = true;
  try {
    Deno.lstatSync(path);
  } catch {
    exists = false;
  }
  if (exists) {
    throw new DeviceFlagError(`vsock path ${path} already exists (remove a stale socket first)`);
  }
}
