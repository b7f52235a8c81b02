/**
 * The virtio devices a VM can have, as plain JSON-able objects: the same
 * shapes `Vm.create({ devices })`, {@link Vm.addDevice}, the CLI and the core
 * (`core/src/virtio/devices.rs`) take. Every device sits on PCI bus 0 and
 * interrupts through MSI-X, so a VM with devices needs `interrupts: true`.
 *
 * @module
 */

import { DenovisorError } from "./errors.ts";
import { checkRateLimiter, type RateLimiter } from "./rate_limiter.ts";

/** virtio-rng: an entropy source the guest reads as `/dev/hwrng`. */
export interface RngDevice {
  /** The device kind. */
  kind: "rng";
  /** Its name in listings (default `rng0`, `rng1`...). */
  name?: string;
}

/**
 * virtio-blk: a disk backed by a raw image file (or a block device), `/dev/vda`,
 * `/dev/vdb`... in a Linux guest in the order given. The image is checked (it
 * exists, is not a directory, is at least one 512-byte sector) and locked
 * (exclusively, or shared when read-only) when the device is added.
 */
export interface BlockDevice {
  /** The device kind. */
  kind: "block";
  /** Its name in listings (default `block0`, `block1`...). */
  name?: string;
  /** The image's path. */
  path: string;
  /** Offer the disk read-only: the guest sees it read-only and every write fails. */
  readonly?: boolean;
  /** What the guest reads as the disk's serial: up to 20 printable ASCII characters. */
  serial?: string;
  /**
   * Limits on the disk's bytes (each request's data) and operations (one per
   * request) per refill period; requests over the limit wait in the queue.
   */
  rateLimiter?: RateLimiter;
}

/**
 * virtio-balloon: the host asks the guest for memory back ({@link Vm.balloon}),
 * reads its memory statistics, and gets its free pages reported.
 */
export interface BalloonDevice {
  /** The device kind. */
  kind: "balloon";
  /** Its name in listings (default `balloon0`). */
  name?: string;
  /** How often the guest is asked for fresh statistics, in ms (default 1000; 0: only on request). */
  statsIntervalMs?: number;
  /** Let the guest deflate when it runs out of memory (VIRTIO_BALLOON_F_DEFLATE_ON_OOM, default false). */
  deflateOnOom?: boolean;
  /** Free page reporting: the guest returns free memory on its own (default true). */
  freePageReporting?: boolean;
}

/**
 * virtio-vsock with Firecracker's Unix-socket host side: the guest's
 * connection to CID 2 port P reaches the host socket `PATH_P` (a host program
 * listens there); a host program connects to `PATH`, writes `CONNECT P\n` and
 * reads `OK <hostport>\n` once the guest's listener on port P accepted.
 */
export interface VsockDevice {
  /** The device kind. */
  kind: "vsock";
  /** Its name in listings (default `vsock0`). */
  name?: string;
  /** The guest's context id: 3 to 4294967294. */
  cid: number;
  /** The host socket the device listens on; its directory must exist and the path must not. */
  path: string;
}

/** The longest vsock `path`: `PATH_<port>` must fit a Unix socket address. */
export const VSOCK_PATH_MAX = 96;

/**
 * virtio-net on a TAP device: either an existing TAP (`tap`) or one denovisor
 * creates inside a network namespace (`netns`, as `ip netns add` makes it),
 * up and with `hostAddress` on the host side. Frames carry the virtio-net
 * header through the TAP (`IFF_VNET_HDR`), so checksum and TSO offloads pass
 * through.
 */
export interface NetDevice {
  /** The device kind. */
  kind: "net";
  /** Its name in listings (default `net0`, `net1`...). */
  name?: string;
  /** Attach this existing TAP device (exclusive with `netns`). */
  tap?: string;
  /** Create a TAP in this network namespace (`/run/netns/NAME`, or a path). */
  netns?: string;
  /** With `netns`: the created TAP's name (default: the kernel picks `dvN`). */
  tapName?: string;
  /** With `netns`: the TAP's IPv4 address and prefix, e.g. `10.0.2.1/24`. */
  hostAddress?: string;
  /** The guest's MAC address (default: random, locally administered). */
  mac?: string;
  /** Offer checksum and TSO offloads (default true). */
  offload?: boolean;
  /** Offer mergeable receive buffers (default true). */
  mrgRxbuf?: boolean;
  /** Limits on what the guest receives (bytes and frames); frames over it wait in the TAP. */
  rxRateLimiter?: RateLimiter;
  /** Limits on what the guest transmits (bytes and frames); frames over it wait in its queue. */
  txRateLimiter?: RateLimiter;
}

/** A device's configuration. */
export type DeviceConfig = RngDevice | BlockDevice | BalloonDevice | VsockDevice | NetDevice;

/** The device kinds, as in {@link DeviceConfig}'s `kind`. */
export const DEVICE_KINDS: readonly DeviceConfig["kind"][] = [
  "rng",
  "block",
  "balloon",
  "vsock",
  "net",
];

/** A PCI function in a {@link DeviceListing}. */
export interface PciFunction {
  /** `00:SS.0`: bus 0, slot, function 0. */
  address: string;
  /** The device's name. */
  name: string;
  /** PCI vendor ID (0x1af4 for virtio). */
  vendor: number;
  /** PCI device ID (0x1040 + the virtio type for modern virtio devices). */
  device: number;
  /** Class code (class, subclass, interface). */
  class: number;
  /** Memory BARs: size, and the address the guest decodes them at (null: off). */
  bars: { index: number; size: number; address: number | null }[];
  /** The device's own state (virtio status, queues, counters), or null. */
  details: Record<string, unknown> | null;
}

/** What one bus range handled. */
export interface BusRange {
  /** The device's name. */
  name: string;
  /** Port I/O or MMIO. */
  space: "pio" | "mmio";
  /** The first address of its range. */
  base: number;
  /** The range's length in bytes. */
  len: number;
  /** Guest reads it handled (one per exit). */
  reads: number;
  /** Guest writes it handled. */
  writes: number;
}

/** A VM's devices, as {@link Vm.devices} returns them. */
export interface DeviceListing {
  /** PCI bus 0: the host bridge and every virtio device. */
  pci: PciFunction[];
  /** Each bus's ranges and the accesses no device claimed. */
  buses: Record<
    "pio" | "mmio",
    { devices: BusRange[]; unclaimed: { reads: number; writes: number } }
  >;
}

/** A PCI function's saved state in a {@link DeviceState}. */
export interface PciFunctionState {
  /** Its slot (device number) on bus 0. */
  slot: number;
  /** The name it was added with. */
  name: string;
  /** Its configuration space, or for virtio the whole transport's state. */
  state: Record<string, unknown>;
}

/**
 * Every device's state, as {@link Vm.deviceState} returns it: plain data the
 * core can restore onto a VM built with the same devices. Field names below
 * the first level follow the core's structs (snake case).
 */
export interface DeviceState {
  /** COM1: the UART's registers and FIFO, and host input queued behind it. */
  com1: { uart: Record<string, unknown>; pending: number[] };
  /** The i8042 controller. */
  i8042: Record<string, unknown>;
  /** The PM1a control register. */
  pm1aControl: { value: number };
  /** The CMOS RTC: index register, guest-minus-host offset, 128 CMOS bytes. */
  rtc: { index: number; offset_secs: number; cmos: number[] };
  /** The debug-exit port (no state). */
  debugExit: Record<string, never>;
  /** The ACPI PM registers (no state), `null` when not attached. */
  acpiPm: Record<string, never> | null;
  /** PCI bus 0: the address register and every function. */
  pci: { address: number; functions: PciFunctionState[] };
}

function fail(message: string): never {
  throw new DenovisorError("INVALID_ARGUMENT", message);
}

function checkBlock(config: BlockDevice): void {
  if (typeof config.path !== "string" || config.path === "") {
    fail(`a block device needs a path, got ${JSON.stringify(config.path)}`);
  }
  if (config.readonly !== undefined && typeof config.readonly !== "boolean") {
    fail(`a block device's readonly must be a boolean, got ${JSON.stringify(config.readonly)}`);
  }
  if (
    config.serial !== undefined &&
    (typeof config.serial !== "string" || !/^[\x21-\x2b\x2d-\x7e]{0,20}$/.test(config.serial))
  ) {
    fail(
      `a block device's serial must be at most 20 printable ASCII characters without spaces ` +
        `or commas, got ${JSON.stringify(config.serial)}`,
    );
  }
  if (config.rateLimiter !== undefined) checkRateLimiter(config.rateLimiter, "a block device");
}

/**
 * Checks a device configuration and returns the JSON the core takes.
 *
 * @example
 * ```ts
 * import { deviceConfigJson } from "denovisor";
 * console.log(deviceConfigJson({ kind: "rng" })); // {"kind":"rng"}
 * ```
 *
 * @param config The device.
 * @returns Its JSON.
 * @throws {DenovisorError} `INVALID_ARGUMENT` for an unknown kind or field.
 */
export function deviceConfigJson(config: DeviceConfig): string {
  if (typeof config !== "object" || config === null) {
    fail(`a device must be an object, got ${JSON.stringify(config)}`);
  }
  const kind = (config as { kind?: unknown }).kind;
  if (!DEVICE_KINDS.includes(kind as DeviceConfig["kind"])) {
    fail(`unknown device kind ${JSON.stringify(kind)} (known: ${DEVICE_KINDS.join(", ")})`);
  }
  if (config.name !== undefined && (typeof config.name !== "string" || config.name === "")) {
    fail(`a device name must be a non-empty string, got ${JSON.stringify(config.name)}`);
  }
  if (config.kind === "block") checkBlock(config);
  if (config.kind === "balloon") {
    const ms = config.statsIntervalMs;
    if (ms !== undefined && (!Number.isSafeInteger(ms) || ms < 0 || ms > 0xffff_ffff)) {
      fail(`statsIntervalMs must be an integer from 0 to 2^32 - 1, got ${JSON.stringify(ms)}`);
    }
    for (const flag of ["deflateOnOom", "freePageReporting"] as const) {
      if (config[flag] !== undefined && typeof config[flag] !== "boolean") {
        fail(`${flag} must be a boolean, got ${JSON.stringify(config[flag])}`);
      }
    }
  }
  if (config.kind === "vsock") {
    const { cid, path } = config;
    if (!Number.isInteger(cid) || cid < 3 || cid > 0xffff_fffe) {
      fail(`vsock cid ${JSON.stringify(cid)} is reserved or out of range: use 3 to 4294967294`);
    }
    if (typeof path !== "string" || path === "") fail("vsock needs a socket path");
    if (new TextEncoder().encode(path).length > VSOCK_PATH_MAX) {
      fail(`vsock path ${path} is too long: at most ${VSOCK_PATH_MAX} bytes`);
    }
  }
  if (config.kind === "net") checkNetDevice(config);
  return JSON.stringify(config);
}

const NET_STRINGS = ["tap", "netns", "tapName", "hostAddress", "mac"] as const;
const NET_FIELDS = new Set<string>([
  "kind",
  "name",
  ...NET_STRINGS,
  "offload",
  "mrgRxbuf",
  "rxRateLimiter",
  "txRateLimiter",
]);

function checkNetDevice(config: NetDevice): void {
  for (const key of Object.keys(config)) {
    if (!NET_FIELDS.has(key)) fail(`a net device has no field ${JSON.stringify(key)}`);
  }
  for (const key of NET_STRINGS) {
    const v = config[key];
    if (v !== undefined && (typeof v !== "string" || v === "")) {
      fail(`a net device's ${key} must be a non-empty string, got ${JSON.stringify(v)}`);
    }
  }
  for (const key of ["offload", "mrgRxbuf"] as const) {
    const v = config[key];
    if (v !== undefined && typeof v !== "boolean") {
      fail(`a net device's ${key} must be true or false, got ${JSON.stringify(v)}`);
    }
  }
  for (const key of ["rxRateLimiter", "txRateLimiter"] as const) {
    if (config[key] !== undefined) checkRateLimiter(config[key], "a net device", key);
  }
  if ((config.tap === undefined) === (config.netns === undefined)) {
    fail("a net device needs exactly one of tap (an existing TAP) or netns (a namespace)");
  }
  if (config.tap !== undefined && (config.tapName ?? config.hostAddress) !== undefined) {
    fail("tapName and hostAddress go with netns (denovisor creates that TAP), not with tap");
  }
}

/**
 * Checks that a net device's host side exists, without opening anything: the
 * TAP (in `/sys/class/net`) or the network namespace (`/run/netns/NAME`). The
 * core checks again when the device is added; this lets the CLI refuse before
 * it opens `/dev/kvm`.
 *
 * @example
 * ```ts
 * import { netHostProblem } from "denovisor";
 * console.log(netHostProblem({ kind: "net", netns: "no-such-ns" }));
 * // network namespace no-such-ns does not exist (no /run/netns/no-such-ns; ...)
 * ```
 *
 * @param config The device.
 * @returns Why it cannot be had, or null.
 */
export function netHostProblem(config: NetDevice): string | null {
  const exists = (path: string) => {
    try {
      Deno.statSync(path);
      return true;
    } catch {
      return false;
    }
  };
  if (config.tap !== undefined) {
    if (config.tap.includes("/") || !exists(`/sys/class/net/${config.tap}`)) {
      return `TAP device ${config.tap} does not exist (create it with \`ip tuntap add dev ${config.tap} mode tap\`)`;
    }
  } else if (config.netns !== undefined) {
    const path = config.netns.includes("/") ? config.netns : `/run/netns/${config.netns}`;
    if (!exists(path)) {
      return `network namespace ${config.netns} does not exist (no ${path}; create it with \`ip netns add ${config.netns}\`)`;
    }
  }
  return null;
}
