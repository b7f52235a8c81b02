/**
 * What the Linux tests share: Debian's kernel (as a bzImage and as its vmlinux
 * ELF), busybox and the kernel's virtio and ext4 modules, fetched and extracted here, on the host, even where the
 * tests that boot them run inside kvmbox (which has no network); and the
 * busybox initramfs they boot.
 *
 * @module
 */

import {
  fetchBusybox,
  fetchDebianKernel,
  fetchDebianVmlinux,
  type FetchResult,
} from "../src/linux/debian_kernel.ts";
import {
  busyboxInitramfs as buildBusyboxInitramfs,
  type BusyboxInitramfsOptions,
  INSMOD_FAILED,
} from "../src/linux/initramfs.ts";
import {
  fetchDebianModules,
  type KernelModule,
  type ModulesFetchResult,
} from "../src/linux/modules.ts";

export { type BusyboxInitramfsOptions, INSMOD_FAILED };

const log = (line: string) => console.error(`note: ${line}`);

/** Debian's kernel (bzImage), or why it cannot be had. */
export const debianKernel: FetchResult = await fetchDebianKernel({ log });
/** The same kernel's vmlinux ELF, or why it cannot be had. */
export const debianVmlinux: FetchResult = await fetchDebianVmlinux({ log });
/** Debian's static busybox, or why it cannot be had. */
export const busybox: FetchResult = await fetchBusybox({ log });

/** The virtio-pci transport's modules, which every virtio driver below needs, in load order. */
export const VIRTIO_PCI_MODULE_NAMES: readonly string[] = [
  "virtio",
  "virtio_ring",
  "virtio_pci_modern_dev",
  "virtio_pci_legacy_dev",
  "virtio_pci",
];

/**
 * The modules the virtio device tests load into Debian's kernel (which builds
 * them as modules): the virtio-pci transport, the block, network, entropy and
 * balloon drivers, vsock over virtio, and ext4 with crc32c (ext4's checksums
 * need the crypto driver, which nothing would load on demand).
 */
export const VIRTIO_MODULE_NAMES: readonly string[] = [
  ...VIRTIO_PCI_MODULE_NAMES,
  "virtio_blk",
  "failover",
  "net_failover",
  "virtio_net",
  "virtio_rng",
  "virtio_balloon",
  "vsock",
  "vmw_vsock_virtio_transport_common",
  "vmw_vsock_virtio_transport",
  "crc16",
  "mbcache",
  "jbd2",
  "crc32c_generic",
  "ext4",
];

/** {@link VIRTIO_MODULE_NAMES} and their dependencies, in load order, or why they cannot be had. */
export const VIRTIO_MODULES: ModulesFetchResult = await fetchDebianModules(VIRTIO_MODULE_NAMES, {
  log,
}).catch((e) => ({ ok: false, reason: e instanceof Error ? e.message : String(e) }));

/**
 * The modules of a fetch; a test that needs them fails with the reason they
 * are missing.
 *
 * @param result What {@link fetchDebianModules} returned.
 * @returns The modules, in load order.
 */
export function fetchedModules(result: ModulesFetchResult): KernelModule[] {
  if (!result.ok) throw new Error(`Debian's kernel modules cannot be had: ${result.reason}`);
  return result.modules;
}

/**
 * The path of a fetched file; a test that needs it fails with the reason it is
 * missing.
 *
 * @param result What a fetch returned.
 * @param what What the file is, for the message.
 * @returns The file's path.
 */
export function fetchedPath(result: FetchResult, what: string): string {
  if (!result.ok) throw new Error(`${what} cannot be had: ${result.reason}`);
  return result.file.path;
}

/**
 * A busybox initramfs (Debian's busybox) whose `/init` mounts /proc, inserts
 * `modules`, then runs `lines`: `busyboxInitramfs` of `src/linux/initramfs.ts`
 * with the fetched busybox.
 *
 * @param lines The rest of `/init`.
 * @param options The modules to insert first, and more files.
 * @returns The newc archive.
 */
export async function busyboxInitramfs(
  lines: string[],
  options: BusyboxInitramfsOptions = {},
): Promise<Uint8Array> {
  const bb = await Deno.readFile(fetchedPath(busybox, "busybox-static"));
  return buildBusyboxInitramfs(bb, lines, options);
}
