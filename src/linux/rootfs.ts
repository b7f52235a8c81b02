/**
 * A bootable root disk for Debian's kernel, from what the project already
 * fetches (the kernel's modules, Debian's `busybox-static`) and nothing else:
 *
 * - {@link makeRootfsImage} writes an ext4 image (`mkfs.ext4 -d`) holding a
 *   small busybox system: `/bin/busybox` and a link for each of its applets,
 *   busybox's `init` with an `/etc/inittab` that runs `/etc/init.d/rcS` (mount
 *   /proc, /sys, /dev; bring up `lo` and `eth0` with a static address; print a
 *   banner) and then a root shell on the console;
 * - {@link rootfsInitramfs} writes the initramfs that gets there: Debian's
 *   kernel builds the virtio drivers and ext4 as modules, so its `/init`
 *   inserts them ({@link ROOTFS_MODULE_NAMES} and their dependencies, in load
 *   order), waits for the root device, mounts it and `switch_root`s to it.
 *
 * The kernel command line steers both: `root=` (default `/dev/vda`),
 * `rootfstype=` (default `ext4`), `ro`/`rw` (default `rw`) and `init=`
 * (default `/sbin/init`) for the initramfs; `denovisor.ip=A.B.C.D/N` (or
 * `off`), `denovisor.gw=A.B.C.D` and `denovisor.hostname=NAME` override the
 * image's own network settings. `scripts/make_rootfs.ts` is the command line
 * for all of this.
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";
import { type Ext4Entry, makeExt4Image } from "./ext4_image.ts";
import { busyboxInitramfs } from "./initramfs.ts";
import type { KernelModule } from "./modules.ts";

/**
 * The modules the root disk needs from Debian's kernel (which builds them as
 * modules): the virtio-pci transport, the block and network drivers, ext4, and
 * crc32c for ext4's metadata checksums (the crypto API would load it on
 * demand, but the initramfs has no modprobe). Their dependencies come with
 * them when fetched with `fetchDebianModules`.
 */
export const ROOTFS_MODULE_NAMES: readonly string[] = [
  "virtio_pci",
  "virtio_blk",
  "virtio_net",
  "crc32c_generic",
  "ext4",
];

/** What the root disk's own settings are (the kernel command line can override them). */
export interface RootfsNetwork {
  /** `eth0`'s address with its prefix, e.g. `10.0.2.15/24`; omitted: none. */
  address?: string;
  /** The default route's gateway, e.g. `10.0.2.1`; omitted: none. */
  gateway?: string;
  /** The host name (default `denovisor`). */
  hostname?: string;
}

/** Options of {@link makeRootfsImage}. */
export interface RootfsImageOptions extends RootfsNetwork {
  /** The image's size in MiB (default 64). */
  sizeMiB?: number;
}

const IPV4 = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;

function invalid(message: string): DenovisorError {
  return new DenovisorError("INVALID_ARGUMENT", message);
}

/**
 * Checks the network settings (they end up in a shell script, so only their
 * plain forms pass).
 *
 * @param network The settings.
 * @returns Them, with the default host name.
 * @throws {DenovisorError} `INVALID_ARGUMENT` for an address that is not
 *   `A.B.C.D/N`, a gateway that is not `A.B.C.D` or a host name that is not
 *   1-63 letters, digits and hyphens.
 * @example
 * ```ts
 * import { checkRootfsNetwork } from "denovisor/src/linux/rootfs.ts";
 * console.log(checkRootfsNetwork({ address: "10.0.2.15/24" }).hostname); // denovisor
 * ```
 */
export function checkRootfsNetwork(network: RootfsNetwork): RootfsNetwork & { hostname: string } {
  const { address, gateway, hostname = "denovisor" } = network;
  if (address !== undefined) {
    const [ip, prefix, ...rest] = address.split("/");
    if (
      rest.length || !IPV4.test(ip) || prefix === undefined || !/^([12]?\d|3[0-2])$/.test(prefix)
    ) {
      throw invalid(`bad address ${JSON.stringify(address)} (want A.B.C.D/N, e.g. 10.0.2.15/24)`);
    }
  }
  if (gateway !== undefined && !IPV4.test(gateway)) {
    throw invalid(`bad gateway ${JSON.stringify(gateway)} (want A.B.C.D, e.g. 10.0.2.1)`);
  }
  if (!/^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$/.test(hostname)) {
    throw invalid(`bad host name ${JSON.stringify(hostname)} (letters, digits and -, at most 63)`);
  }
  return { address, gateway, hostname };
}

/** `/etc/init.d/rcS`: what busybox's init runs once at boot. */
function rcS(network: RootfsNetwork & { hostname: string }): string {
  return `#!/bin/sh
# The root disk's start-up (run once by busybox init, see /etc/inittab).
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
# (Debian's busybox has no mountpoint applet.)
mounted() { grep -q " $1 " /proc/mounts 2>/dev/null; }
mounted /proc || mount -t proc proc /proc
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mounted /dev/pts || mount -t devpts devpts /dev/pts
mounted /run || mount -t tmpfs -o mode=0755 tmpfs /run

# The image's settings (make_rootfs.ts --ip, --gateway, --hostname); the
# kernel command line's denovisor.ip= (or off), denovisor.gw= and
# denovisor.hostname= override them.
IP=${network.address ?? ""}
GATEWAY=${network.gateway ?? ""}
HOSTNAME=${network.hostname}
set -f
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    denovisor.ip=off) IP= ;;
    denovisor.ip=*) IP="\${arg#denovisor.ip=}" ;;
    denovisor.gw=*) GATEWAY="\${arg#denovisor.gw=}" ;;
    denovisor.hostname=*) HOSTNAME="\${arg#denovisor.hostname=}" ;;
  esac
done
set +f
hostname "$HOSTNAME"
ip link set lo up
NET="no eth0"
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up
  NET="eth0 up"
  if [ -n "$IP" ]; then
    ip addr add "$IP" dev eth0 && NET="eth0 $IP"
  fi
  if [ -n "$GATEWAY" ]; then
    ip route add default via "$GATEWAY" && NET="$NET via $GATEWAY"
  fi
fi

ROOT=$(awk '$2 == "/" { print $1 " " $3 }' /proc/mounts | tail -n 1)
echo
echo "denovisor root disk: $ROOT on /, $NET (Linux $(uname -r))"
echo "Commands run as root here; poweroff -f ends the VM."
`;
}

/** `/etc/inittab` for busybox's init. */
const INITTAB = `# busybox init: start-up, then a root shell on the console.
::sysinit:/etc/init.d/rcS
::respawn:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/sbin/reboot -f
::shutdown:/bin/umount -a -r
`;

/** `/etc/profile`, read by the console's login shell. */
const PROFILE = `export PATH=/sbin:/usr/sbin:/bin:/usr/bin
export HOME=/root
export PS1='\\h:\\w# '
cd "$HOME"
`;

/**
 * The busybox applets' paths (`bin/sh`, `sbin/ip`, `usr/bin/awk`, ...), as
 * the executable lists them with `busybox --list-full` (it runs on the host:
 * Debian's busybox is a static x86-64 executable).
 */
async function appletPaths(busyboxPath: string): Promise<string[]> {
  const output = await new Deno.Command(busyboxPath, {
    args: ["--list-full"],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(30_000),
  }).output().catch((e) => {
    throw new DenovisorError("IO", `cannot run ${busyboxPath} --list-full: ${e}`);
  });
  if (!output.success) {
    throw new DenovisorError(
      "IO",
      `${busyboxPath} --list-full failed: ${new TextDecoder().decode(output.stderr).trim()}`,
    );
  }
  const paths = new TextDecoder().decode(output.stdout).split("\n").map((l) => l.trim())
    .filter((l) => /^[a-z/]*[A-Za-z0-9_.[\]-]+$/.test(l) && !l.split("/").includes(".."));
  if (!paths.includes("sbin/init") || !paths.includes("bin/sh")) {
    throw new DenovisorError("IO", `${busyboxPath} has no init or sh applet`);
  }
  return paths;
}

/**
 * The files of the root disk: busybox and its applet links, `/etc` (inittab,
 * rcS, profile, passwd, group, hostname) and the empty mount points.
 *
 * @param busyboxPath A static busybox executable (Debian's `busybox-static`).
 * @param network The disk's own network settings.
 * @returns The entries by path, for {@link makeExt4Image}.
 * @throws {DenovisorError} `INVALID_ARGUMENT` for bad settings, `IO` when
 *   busybox cannot be read or run.
 * @example
 * ```ts ignore
 * import { rootfsFiles } from "denovisor/src/linux/rootfs.ts";
 * const files = await rootfsFiles(".cache/kernels/busybox-static", { address: "10.0.2.15/24" });
 * console.log(Object.keys(files).length);
 * ```
 */
export async function rootfsFiles(
  busyboxPath: string,
  network: RootfsNetwork = {},
): Promise<Record<string, Ext4Entry>> {
  const settings = checkRootfsNetwork(network);
  const files: Record<string, Ext4Entry> = {};
  for (const dir of ["dev", "proc", "sys", "run", "mnt", "etc/init.d"]) {
    files[dir] = { kind: "dir" };
  }
  files["root"] = { kind: "dir", mode: 0o700 };
  files["tmp"] = { kind: "dir", mode: 0o1777 };
  files["bin/busybox"] = { kind: "file", data: await Deno.readFile(busyboxPath), mode: 0o755 };
  for (const applet of await appletPaths(busyboxPath)) {
    if (applet !== "bin/busybox") files[applet] = { kind: "symlink", target: "/bin/busybox" };
  }
  files["etc/inittab"] = { kind: "file", data: INITTAB };
  files["etc/init.d/rcS"] = { kind: "file", data: rcS(settings), mode: 0o755 };
  files["etc/profile"] = { kind: "file", data: PROFILE };
  files["etc/hostname"] = { kind: "file", data: `${settings.hostname}\n` };
  files["etc/passwd"] = { kind: "file", data: "root:x:0:0:root:/root:/bin/sh\n" };
  files["etc/group"] = { kind: "file", data: "root:x:0:\n" };
  return files;
}

/**
 * Writes the root disk: an ext4 image of {@link rootfsFiles}.
 *
 * @param path The image file (replaced if it exists).
 * @param busyboxPath A static busybox executable (Debian's `busybox-static`).
 * @param options The size (default 64 MiB) and the disk's network settings.
 * @throws {DenovisorError} `INVALID_ARGUMENT` for bad settings, `IO` when
 *   busybox cannot be run or mkfs.ext4 fails (or e2fsprogs is missing).
 * @example
 * ```ts ignore
 * import { fetchBusybox } from "denovisor/src/linux/debian_kernel.ts";
 * import { makeRootfsImage } from "denovisor/src/linux/rootfs.ts";
 * const busybox = await fetchBusybox();
 * if (busybox.ok) {
 *   await makeRootfsImage("rootfs.img", busybox.file.path, { address: "10.0.2.15/24" });
 * }
 * ```
 */
export async function makeRootfsImage(
  path: string,
  busyboxPath: string,
  options: RootfsImageOptions = {},
): Promise<void> {
  const { sizeMiB = 64, ...network } = options;
  if (!Number.isInteger(sizeMiB) || sizeMiB < 8 || sizeMiB > 1 << 20) {
    throw invalid(`bad root disk size ${sizeMiB} MiB (at least 8)`);
  }
  await makeExt4Image(path, sizeMiB, await rootfsFiles(busyboxPath, network));
}

/**
 * The lines of the initramfs's `/init` after the modules are in: find the root
 * device on the command line, wait for it, mount it and switch to it; a shell
 * on the console when it cannot be mounted.
 */
const SWITCH_ROOT_LINES = [
  "/bin/busybox --install -s /bin",
  "export PATH=/bin",
  "mount -t sysfs sysfs /sys",
  "mount -t devtmpfs devtmpfs /dev",
  "root=/dev/vda fstype=ext4 flags=rw init=/sbin/init",
  "set -f",
  "for arg in $(cat /proc/cmdline); do",
  '  case "$arg" in',
  '    root=*) root="${arg#root=}" ;;',
  '    rootfstype=*) fstype="${arg#rootfstype=}" ;;',
  '    ro|rw) flags="$arg" ;;',
  '    init=*) init="${arg#init=}" ;;',
  "  esac",
  "done",
  "set +f",
  // virtio_blk probes as it is inserted, but the node may lag behind it.
  "i=0",
  'while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done',
  "mkdir -p /newroot",
  'if ! mount -t "$fstype" -o "$flags" "$root" /newroot; then',
  '  echo "denovisor initramfs: cannot mount root=$root (rootfstype=$fstype); here is a shell"',
  "  exec setsid cttyhack sh",
  "fi",
  "umount /sys",
  "umount /proc",
  "mount --move /dev /newroot/dev || umount /dev",
  'exec switch_root /newroot "$init"',
];

/**
 * The root disk's initramfs: busybox, the modules (inserted in the order
 * given: pass what `fetchDebianModules(ROOTFS_MODULE_NAMES)` returns), and an
 * `/init` that mounts the root device (`root=`, default `/dev/vda`; waits up
 * to 10 s for it) as `rootfstype=` (default ext4), `rw` unless the command
 * line says `ro`, moves `/dev` there and runs `switch_root` to `init=`
 * (default `/sbin/init`). When the root cannot be mounted it says so on the
 * console and starts a shell there instead.
 *
 * @param busybox A static busybox executable's bytes (Debian's `busybox-static`).
 * @param modules The kernel modules to insert, in load order.
 * @returns The newc archive.
 * @throws {Error} When a module cannot be read.
 * @example
 * ```ts ignore
 * import { fetchBusybox } from "denovisor/src/linux/debian_kernel.ts";
 * import { fetchDebianModules } from "denovisor/src/linux/modules.ts";
 * import { ROOTFS_MODULE_NAMES, rootfsInitramfs } from "denovisor/src/linux/rootfs.ts";
 * const busybox = await fetchBusybox();
 * const modules = await fetchDebianModules(ROOTFS_MODULE_NAMES);
 * if (busybox.ok && modules.ok) {
 *   const initrd = await rootfsInitramfs(await Deno.readFile(busybox.file.path), modules.modules);
 *   await Deno.writeFile("initrd.img", initrd);
 * }
 * ```
 */
export function rootfsInitramfs(
  busybox: Uint8Array,
  modules: readonly KernelModule[],
): Promise<Uint8Array> {
  return busyboxInitramfs(busybox, SWITCH_ROOT_LINES, { modules });
}
