/**
 * A Linux guest with a virtio-balloon, for the balloon tests and bench:
 * Debian's kernel, a busybox shell with Debian's virtio_pci and
 * virtio_balloon modules, and helpers to make the guest touch its free
 * memory and to read this process's RSS (the VM runs in it).
 */

import { ConsoleDriver, Vm } from "../mod.ts";
import type { RunResult } from "../src/vm.ts";
import type { BalloonDevice } from "../src/devices.ts";
import { fetchDebianModules, type ModulesFetchResult } from "../src/linux/modules.ts";
import { busyboxInitramfs, debianVmlinux, fetchedModules, fetchedPath } from "./_linux.ts";

export const MIB = 1 << 20;
/** Boot to the shell: ~10-25 s inside kvmbox, a second or two on hardware. */
export const BOOT_MS = 480_000;
/** One command at the prompt (filling hundreds of MiB under emulation takes a while). */
export const COMMAND_MS = 240_000;
// deno-lint-ignore no-control-regex -- ESC is what the terminal query starts with
const PROMPT = /dv# (?:\x1b\[[0-9;]*[A-Za-z])*$/;

/** virtio_pci, virtio_balloon and what they need, fetched on the host. */
export const BALLOON_MODULES: ModulesFetchResult = await fetchDebianModules(
  ["virtio_pci", "virtio_balloon"],
  { log: (line) => console.error(`note: ${line}`) },
).catch((e) => ({ ok: false as const, reason: e instanceof Error ? e.message : String(e) }));

/** The initramfs: the modules, then a shell on the console. */
export function balloonInitramfs(): Promise<Uint8Array> {
  return busyboxInitramfs([
    "/bin/busybox --install -s /bin",
    "mount -t sysfs sys /sys",
    "mount -t devtmpfs dev /dev",
    "mkdir -p /mnt",
    "echo DENOVISOR-SHELL-READY",
    "export PS1='dv# '",
    "exec setsid cttyhack /bin/sh",
  ], { modules: fetchedModules(BALLOON_MODULES) });
}

/** A booted guest at its shell prompt. */
export interface BalloonGuest {
  vm: Vm;
  shell: ConsoleDriver;
  run: Promise<RunResult>;
  /** Stops the guest and closes the VM. */
  close(): Promise<void>;
}

/**
 * Boots a guest with a balloon to its prompt.
 *
 * @param memoryMiB Guest RAM.
 * @param balloon The balloon's options.
 * @param initrd The initramfs ({@link balloonInitramfs}; built once by the caller).
 */
export async function bootBalloonGuest(
  memoryMiB: number,
  balloon: Omit<BalloonDevice, "kind">,
  initrd: Uint8Array,
): Promise<BalloonGuest> {
  const vm = await Vm.create({
    memoryMiB,
    interrupts: true,
    devices: [{ kind: "balloon", ...balloon }],
  });
  vm.loadLinux({
    kernel: await Deno.readFile(fetchedPath(debianVmlinux, "Debian's vmlinux")),
    initrd,
    cmdline: "console=ttyS0 panic=-1 rdinit=/init quiet",
  });
  const shell = new ConsoleDriver(vm);
  const run = shell.watch(vm.run({ timeoutMs: 1_500_000 }));
  const close = async () => {
    vm.stop();
    await run.catch(() => undefined);
    vm.close();
  };
  try {
    await shell.waitFor("DENOVISOR-SHELL-READY", { timeoutMs: BOOT_MS });
    await shell.waitFor(PROMPT, { timeoutMs: BOOT_MS });
  } catch (e) {
    await close();
    throw e;
  }
  return { vm, shell, run, close };
}

/** Runs a command that must succeed; returns its output. */
export async function sh(shell: ConsoleDriver, command: string): Promise<string> {
  const { output, status } = await shell.exec(command, { timeoutMs: COMMAND_MS });
  if (status !== 0) throw new Error(`${command} failed (${status}):\n${output}`);
  return output;
}

/**
 * Fills all but `leaveMiB` of the guest's free memory with a tmpfs file at
 * `/mnt/f` (every page written, so the host holds it).
 *
 * @returns How many MiB were written.
 */
export async function fillMemory(shell: ConsoleDriver, leaveMiB: number): Promise<number> {
  const out = await sh(
    shell,
    `N=$(( $(sed -n 's/^MemFree: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo) / 1024 - ${leaveMiB} )); ` +
      `mount -t tmpfs -o size=$((N + 1))m fill /mnt && dd if=/dev/zero of=/mnt/f bs=1M count=$N 2>/dev/null; ` +
      `echo FILLED=$N`,
  );
  const m = /FILLED=(\d+)/.exec(out);
  if (!m) throw new Error(`no fill size in ${out}`);
  return Number(m[1]);
}

/** Frees what {@link fillMemory} wrote (the guest's memory is free again). */
export async function freeFill(shell: ConsoleDriver): Promise<void> {
  await sh(shell, "rm -f /mnt/f; umount /mnt");
}

/**
 * Makes the guest touch all but `leaveMiB` of its free memory and free it
 * again: afterwards the host holds those pages although the guest has them
 * free.
 *
 * @returns How many MiB were written.
 */
export async function touchFreeMemory(shell: ConsoleDriver, leaveMiB: number): Promise<number> {
  const filled = await fillMemory(shell, leaveMiB);
  await freeFill(shell);
  return filled;
}

/** This process's resident set (the VMM's: the VM runs in it), bytes. */
export function rssBytes(): number {
  const status = Deno.readTextFileSync("/proc/self/status");
  const kib = /VmRSS:\s+(\d+) kB/.exec(status)?.[1];
  if (kib === undefined) throw new Error("no VmRSS in /proc/self/status");
  return Number(kib) * 1024;
}

/**
 * Polls `check` every `everyMs` until it returns a value, or throws after `timeoutMs`.
 */
export async function poll<T>(
  what: string,
  check: () => T | undefined,
  timeoutMs: number,
  everyMs = 50,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = check();
    if (v !== undefined) return v;
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await new Promise((r) => setTimeout(r, everyMs));
  }
}
