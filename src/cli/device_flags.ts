/**
 * The CLI's device flags (`--rng`, `--device JSON`, ...) turned into
 * {@link DeviceConfig}s: one table, so each device kind adds its flag here.
 *
 * @module
 */

import {
  type DeviceConfig,
  deviceConfigJson,
  type NetDevice,
  netHostProblem,
  type VsockDevice,
} from "../devices.ts";
import { checkDiskImage, parseDiskSpec } from "./disk_spec.ts";

/** The `parseArgs` option specs of the device flags. */
export const DEVICE_FLAG_OPTIONS = {
  rng: { type: "boolean" },
  "no-rng": { type: "boolean" },
  balloon: { type: "boolean" },
  device: { type: "string", multiple: true },
  disk: { type: "string", multiple: true },
  vsock: { type: "string" },
  net: { type: "string", multiple: true },
} as const;

/** The values `parseArgs` gives for {@link DEVICE_FLAG_OPTIONS}. */
export interface DeviceFlagValues {
  rng?: boolean;
  "no-rng"?: boolean;
  balloon?: boolean;
  device?: string[];
  disk?: string[];
  vsock?: string;
  net?: string[];
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
  --net SPEC         a virtio-net device on a TAP (repeatable). SPEC is
                     tap=NAME[,mac=M] to attach an existing TAP, or
                     netns=NS[,tap=NAME][,host=A.B.C.D/N][,mac=M] to have
                     denovisor create the TAP in network namespace NS (up,
                     with the host address; gone when the VM ends); also
                     offload=off (no checksum/TSO offloads), mrg=off
                     (no mergeable RX buffers), name=N
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
  for (const spec of values.net ?? []) devices.push(netFlag(spec));
  for (const json of values.device ?? []) devices.push(deviceJsonFlag(json));
  if (values.vsock !== undefined) devices.push(vsockFlag(values.vsock));
  for (const d of devices) {
    if (d.kind === "vsock") checkVsockPath(d.path);
    const problem = d.kind === "net" ? netHostProblem(d) : null;
    if (problem) throw new DeviceFlagError(problem);
  }
  return devices;
}

/**
 * One `--device JSON` flag as a {@link DeviceConfig}, checked as `Vm.create`
 * would (its host paths not checked on disk).
 *
 * @example
 * ```ts
 * import { deviceJsonFlag } from "./device_flags.ts";
 * console.log(deviceJsonFlag('{"kind":"rng"}')); // { kind: "rng" }
 * ```
 *
 * @param json The flag's value.
 * @returns The device.
 * @throws {DeviceFlagError} for text that is not JSON or not a valid device.
 */
export function deviceJsonFlag(json: string): DeviceConfig {
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
  return parsed as DeviceConfig;
}

/**
 * One `--vsock` flag as a {@link VsockDevice} (its path not checked on disk).
 *
 * @example
 * ```ts
 * import { vsockFlag } from "./device_flags.ts";
 * console.log(vsockFlag("cid=3,path=/run/vm1/v.sock")); // { kind: "vsock", cid: 3, path: ... }
 * ```
 *
 * @param value `cid=N,path=PATH[,name=NAME]`.
 * @returns The device.
 * @throws {DeviceFlagError} for a malformed value.
 */
export function vsockFlag(value: string): VsockDevice {
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
function onOff(flag: string, key: string, value: string): boolean {
  if (value === "on") return true;
  if (value === "off") return false;
  throw new DeviceFlagError(
    `--net ${flag}: ${key} must be on or off, got ${JSON.stringify(value)}`,
  );
}

/**
 * One `--net` flag as a {@link NetDevice}.
 *
 * @example
 * ```ts
 * import { netFlag } from "./device_flags.ts";
 * console.log(netFlag("netns=ns1,host=10.0.2.1/24"));
 * // { kind: "net", netns: "ns1", hostAddress: "10.0.2.1/24" }
 * ```
 *
 * @param spec `tap=NAME[,mac=M]` or `netns=NS[,tap=NAME][,host=A/N][,mac=M]`,
 *   plus `offload=on|off`, `mrg=on|off`, `name=N`.
 * @returns The device.
 * @throws {DeviceFlagError} for an unknown key or a malformed value.
 */
export function netFlag(spec: string): NetDevice {
  const pairs = spec.split(",").map((kv) => {
    const eq = kv.indexOf("=");
    if (eq <= 0) {
      throw new DeviceFlagError(`--net ${spec}: expected key=value, got ${JSON.stringify(kv)}`);
    }
    return [kv.slice(0, eq), kv.slice(eq + 1)] as const;
  });
  const keys = new Map(pairs);
  if (keys.size !== pairs.length) throw new DeviceFlagError(`--net ${spec}: a key is repeated`);
  const device: NetDevice = { kind: "net" };
  const netns = keys.get("netns");
  for (const [key, value] of pairs) {
    if (key === "tap") {
      if (netns !== undefined) device.tapName = value;
      else device.tap = value;
    } else if (key === "netns") device.netns = value;
    else if (key === "host") device.hostAddress = value;
    else if (key === "mac") device.mac = value;
    else if (key === "name") device.name = value;
    else if (key === "offload") device.offload = onOff(spec, key, value);
    else if (key === "mrg") device.mrgRxbuf = onOff(spec, key, value);
    else {
      throw new DeviceFlagError(
        `--net ${spec}: unknown key ${key} (tap, netns, host, mac, offload, mrg, name)`,
      );
    }
  }
  try {
    deviceConfigJson(device);
  } catch (e) {
    throw new DeviceFlagError(`--net ${spec}: ${(e as Error).message}`);
  }
  return device;
}
