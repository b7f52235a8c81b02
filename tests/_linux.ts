/**
 * What the Linux tests share: Debian's kernel (as a bzImage and as its vmlinux
 * ELF) and busybox, fetched and extracted here, on the host, even where the
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
import { buildInitramfs } from "../src/linux/initramfs.ts";

const log = (line: string) => console.error(`note: ${line}`);

/** Debian's kernel (bzImage), or why it cannot be had. */
export const debianKernel: FetchResult = await fetchDebianKernel({ log });
/** The same kernel's vmlinux ELF, or why it cannot be had. */
export const debianVmlinux: FetchResult = await fetchDebianVmlinux({ log });
/** Debian's static busybox, or why it cannot be had. */
export const busybox: FetchResult = await fetchBusybox({ log });

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
 * A busybox initramfs whose `/init` mounts /proc, then runs `lines` (busybox
 * applets by full path, or plain names after `/bin/busybox --install -s /bin`).
 *
 * @param lines The rest of `/init`.
 * @returns The newc archive.
 */
export async function busyboxInitramfs(lines: string[]): Promise<Uint8Array> {
  const init = ["#!/bin/busybox sh", "/bin/busybox mount -t proc proc /proc", ...lines];
  return buildInitramfs([
    { path: "dev", kind: "dir" },
    { path: "dev/console", kind: "char", device: [5, 1] },
    { path: "proc", kind: "dir" },
    { path: "sys", kind: "dir" },
    { path: "bin", kind: "dir" },
    { path: "bin/busybox", data: await Deno.readFile(fetchedPath(busybox, "busybox-static")) },
    { path: "init", data: new TextEncoder().encode(init.join("\n") + "\n") },
  ]);
}
