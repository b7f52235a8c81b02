/**
 * Boots Debian's kernel (the vmlinux) with the busybox initramfs, the virtio
 * and ext4 modules and the devices a test asks for, to a root shell on the
 * serial console, for tests that drive the guest with commands.
 *
 * @module
 */

import assert from "node:assert/strict";

import { ConsoleDriver, type DeviceConfig, type RunResult, Vm } from "../mod.ts";
import { buildInitramfs, type InitramfsEntry } from "../src/linux/initramfs.ts";
import type { KernelModule } from "../src/linux/modules.ts";
import {
  busyboxInitramfs,
  debianVmlinux,
  fetchedModules,
  fetchedPath,
  VIRTIO_MODULES,
} from "./_linux.ts";

/** Boot to the shell: ~10-25 s inside kvmbox, a second or two on hardware. */
export const BOOT_MS = 480_000;
/** One command at the prompt. */
export const COMMAND_MS = 120_000;
// deno-lint-ignore no-control-regex -- ESC is what the terminal query starts with
const PROMPT = /dv# (?:\x1b\[[0-9;]*[A-Za-z])*$/;

/** What {@link bootLinuxShell} boots. */
export interface LinuxShellOptions {
  /** Devices for `Vm.create` (default none). */
  devices?: DeviceConfig[];
  /** Modules to insert (default: Debian's virtio, vsock and ext4 modules). */
  modules?: KernelModule[];
  /** Guest RAM (default 512 MiB). */
  memoryMiB?: number;
  /** vCPUs (default 1). */
  vcpus?: number;
  /** More files for the initramfs (a second archive, unpacked over the first). */
  files?: InitramfsEntry[];
  /** Extra kernel command line. */
  cmdline?: string;
  /** The whole run's limit (default 10 minutes). */
  timeoutMs?: number;
}

/** A booted guest at its shell prompt. */
export interface LinuxShell extends AsyncDisposable {
  /** The VM. */
  vm: Vm;
  /** Its console. */
  shell: ConsoleDriver;
  /** Runs a command that must exit 0; returns its output. */
  sh(command: string, timeoutMs?: number): Promise<string>;
  /** Runs a command; returns its output and exit status. */
  exec(command: string, timeoutMs?: number): Promise<{ output: string; status: number }>;
  /** `poweroff -f` and the run's result (which must be a power-off). */
  powerOff(): Promise<RunResult>;
}

/**
 * Boots Debian's kernel to a busybox shell with the modules inserted and
 * sysfs, devtmpfs and /proc mounted.
 *
 * @param options Devices, modules, memory.
 * @returns The shell; dispose it to stop the VM.
 */
export async function bootLinuxShell(options: LinuxShellOptions = {}): Promise<LinuxShell> {
  const modules = options.modules ?? fetchedModules(VIRTIO_MODULES);
  const initrd = await busyboxInitramfs([
    "/bin/busybox --install -s /bin",
    "mount -t sysfs sys /sys",
    "mount -t devtmpfs dev /dev",
    "echo DENOVISOR-SHELL-READY",
    "export PS1='dv# '",
    "exec setsid cttyhack /bin/sh",
  ], { modules });
  let archive = initrd;
  if (options.files?.length) {
    const extra = buildInitramfs(options.files);
    archive = new Uint8Array(initrd.length + extra.length);
    archive.set(initrd);
    archive.set(extra, initrd.length);
  }
  const vm = await Vm.create({
    memoryMiB: options.memoryMiB ?? 512,
    vcpus: options.vcpus ?? 1,
    interrupts: true,
    devices: options.devices ?? [],
  });
  let run: Promise<RunResult> | undefined;
  try {
    vm.loadLinux({
      kernel: await Deno.readFile(fetchedPath(debianVmlinux, "Debian's vmlinux")),
      initrd: archive,
      cmdline: `console=ttyS0 panic=-1 rdinit=/init ${options.cmdline ?? ""}`.trim(),
    });
    const shell = new ConsoleDriver(vm);
    run = shell.watch(vm.run({ timeoutMs: options.timeoutMs ?? 600_000 }));
    await shell.waitFor("DENOVISOR-SHELL-READY", { timeoutMs: BOOT_MS });
    await shell.waitFor(PROMPT, { timeoutMs: COMMAND_MS });
    const running = run;
    const exec = (command: string, timeoutMs = COMMAND_MS) => shell.exec(command, { timeoutMs });
    return {
      vm,
      shell,
      exec,
      async sh(command, timeoutMs) {
        const { output, status } = await exec(command, timeoutMs);
        assert.equal(status, 0, `${command} failed (${status}):\n${output}`);
        return output;
      },
      async powerOff() {
        shell.send("poweroff -f\n");
        const result = await running;
        assert.equal(
          result.reason,
          "power_off",
          `${result.summary}\n${shell.transcript.slice(-2000)}`,
        );
        return result;
      },
      async [Symbol.asyncDispose]() {
        vm.stop();
        await running.catch(() => {});
        vm.close();
      },
    };
  } catch (e) {
    vm.stop();
    await run?.catch(() => {});
    vm.close();
    throw e;
  }
}
