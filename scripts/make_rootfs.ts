/**
 * Makes a bootable root disk for Debian's kernel and the initramfs that mounts
 * it, from what the project fetches (Debian's kernel modules and
 * `busybox-static`, with `apt-get download` into `.cache/kernels/`):
 *
 * ```sh
 * deno run -A scripts/make_rootfs.ts --disk rootfs.img [--size 64] --initrd initrd.img \
 *   [--ip 10.0.2.15/24] [--gateway 10.0.2.1] [--hostname denovisor]
 * ```
 *
 * See `src/linux/rootfs.ts` for what the disk and the initramfs hold, and the
 * README's "A Debian kernel with a root disk and a network" for booting them.
 *
 * @module
 */

import { parseArgs } from "node:util";

import { DenovisorError } from "../src/errors.ts";
import { fetchBusybox, fetchDebianKernel } from "../src/linux/debian_kernel.ts";
import { fetchDebianModules } from "../src/linux/modules.ts";
import {
  checkRootfsNetwork,
  makeRootfsImage,
  ROOTFS_MODULE_NAMES,
  rootfsInitramfs,
} from "../src/linux/rootfs.ts";

const USAGE = `usage: deno run -A scripts/make_rootfs.ts --disk FILE [--size MiB] --initrd FILE
         [--ip A.B.C.D/N] [--gateway A.B.C.D] [--hostname NAME]

  --disk FILE       write the root disk: an ext4 image holding busybox, its init and
                    /etc/init.d/rcS (mounts /proc, /sys, /dev; brings up lo and eth0)
  --size MiB        the disk's size (default 64, at least 8)
  --initrd FILE     write the initramfs that inserts Debian's virtio and ext4 modules,
                    mounts root= (default /dev/vda) and switch_roots to it
  --ip A.B.C.D/N    eth0's address (default none; the kernel command line's
                    denovisor.ip= overrides it, denovisor.ip=off removes it)
  --gateway A.B.C.D the default route (denovisor.gw= overrides it)
  --hostname NAME   the host name (default denovisor; denovisor.hostname= overrides it)
`;

const log = (line: string) => console.error(`note: ${line}`);

function usage(message: string): never {
  console.error(`make_rootfs: ${message}\n\n${USAGE}`);
  Deno.exit(2);
}

async function main(): Promise<void> {
  let values;
  try {
    ({ values } = parseArgs({
      args: Deno.args,
      options: {
        disk: { type: "string" },
        size: { type: "string" },
        initrd: { type: "string" },
        ip: { type: "string" },
        gateway: { type: "string" },
        hostname: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (e) {
    usage(e instanceof Error ? e.message : String(e));
  }
  if (values.help) {
    console.log(USAGE);
    return;
  }
  if (values.disk === undefined && values.initrd === undefined) {
    usage("nothing to do: give --disk, --initrd or both");
  }
  const sizeMiB = values.size === undefined ? 64 : Number(values.size);
  if (!/^\d+$/.test(values.size ?? "64") || sizeMiB < 8 || sizeMiB > 1 << 20) {
    usage(`bad --size ${values.size} (MiB, at least 8)`);
  }
  const network = { address: values.ip, gateway: values.gateway, hostname: values.hostname };
  try {
    checkRootfsNetwork(network);
  } catch (e) {
    usage(e instanceof Error ? e.message : String(e));
  }

  const busybox = await fetchBusybox({ log });
  if (!busybox.ok) throw new DenovisorError("IO", `no busybox-static: ${busybox.reason}`);
  if (values.disk !== undefined) {
    await makeRootfsImage(values.disk, busybox.file.path, { sizeMiB, ...network });
    console.log(
      `wrote ${values.disk}: a ${sizeMiB} MiB ext4 root disk (busybox, init, ` +
        `eth0 ${network.address ?? "without an address"})`,
    );
  }
  if (values.initrd !== undefined) {
    const modules = await fetchDebianModules(ROOTFS_MODULE_NAMES, { log });
    if (!modules.ok) throw new DenovisorError("IO", `no kernel modules: ${modules.reason}`);
    const initrd = await rootfsInitramfs(await Deno.readFile(busybox.file.path), modules.modules);
    await Deno.writeFile(values.initrd, initrd);
    console.log(
      `wrote ${values.initrd}: an initramfs for Linux ${modules.version} that inserts ` +
        `${modules.modules.map((m) => m.name).join(" ")} and mounts root=`,
    );
  }
  const kernel = await fetchDebianKernel({ log });
  const kernelPath = kernel.ok ? kernel.file.path : "vmlinuz";
  console.log(
    `boot it: deno run -A main.ts run --kernel ${kernelPath} --initrd ${
      values.initrd ?? "initrd.img"
    } --disk ${values.disk ?? "rootfs.img"} --cmdline "console=ttyS0 root=/dev/vda"`,
  );
}

try {
  await main();
} catch (e) {
  console.error(`make_rootfs: ${e instanceof Error ? e.message : String(e)}`);
  Deno.exit(1);
}
