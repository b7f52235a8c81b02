/**
 * What the benches that compare denovisor with QEMU share: the command lines
 * that boot one kernel and initramfs with either VMM (the device under test
 * appended by each bench), a bounded run of such a VMM to its end, QEMU's
 * version, and the text table the results are printed in.
 *
 * @module
 */

import { pathOfFileUrl } from "../src/build/fs_util.ts";

/** QEMU's executable (Debian's `qemu-system-x86`). */
export const QEMU = "qemu-system-x86_64";

const MAIN_TS = pathOfFileUrl(new URL("../main.ts", import.meta.url));

/** The QEMU machine types compared. */
export type QemuMachine = "microvm" | "q35";

/** What a VMM boots: the same for every VMM. */
export interface BootSpec {
  /** The kernel's path (a bzImage, or for denovisor also a vmlinux ELF). */
  kernel: string;
  /** The initramfs's path. */
  initrd: string;
  /** The kernel command line. */
  cmdline: string;
  /** Guest RAM in MiB. */
  memMiB: number;
  /** vCPUs. */
  cpus: number;
}

/**
 * QEMU's arguments for booting `spec` on `machine` with KVM: no default
 * devices, no configuration files, no display, COM1 on stdio, the host's CPU
 * model (denovisor too passes KVM's supported CPUID through), and an exit
 * instead of a reset when the guest reboots. `microvm` boots through qboot
 * without option ROMs, with an ISA serial port and no RTC; `q35` through
 * SeaBIOS and its linuxboot option ROM.
 *
 * @param machine The machine type.
 * @param spec Kernel, initrd, command line, RAM and vCPUs.
 * @returns The arguments after `qemu-system-x86_64` (append the devices).
 * @example
 * ```ts
 * import { qemuArgs } from "denovisor/bench/_qemu.ts";
 * const spec = { kernel: "bzImage", initrd: "initrd", cmdline: "console=ttyS0", memMiB: 256, cpus: 1 };
 * console.log(["qemu-system-x86_64", ...qemuArgs("microvm", spec)].join(" "));
 * ```
 */
export function qemuArgs(machine: QemuMachine, spec: BootSpec): string[] {
  const machineArg = machine === "microvm"
    ? "microvm,x-option-roms=off,isa-serial=on,rtc=off"
    : "q35";
  return [
    "-M",
    machineArg,
    "-accel",
    "kvm",
    "-cpu",
    "host",
    "-m",
    String(spec.memMiB),
    "-smp",
    String(spec.cpus),
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-no-reboot",
    "-serial",
    "stdio",
    "-kernel",
    spec.kernel,
    "-initrd",
    spec.initrd,
    "-append",
    spec.cmdline,
  ];
}

/**
 * The command that boots `spec` with denovisor's CLI in a subprocess
 * (`deno run -A main.ts run --kernel ... --no-stdin`), the same Deno as this
 * one.
 *
 * @param spec Kernel, initrd, command line, RAM and vCPUs.
 * @param extra More `run` options: the devices under test, `--no-rng`, ...
 * @returns The executable and its arguments.
 * @example
 * ```ts
 * import { denovisorCommand } from "denovisor/bench/_qemu.ts";
 * const spec = { kernel: "bzImage", initrd: "initrd", cmdline: "console=ttyS0", memMiB: 256, cpus: 1 };
 * const [cmd, args] = denovisorCommand(spec, ["--disk", "disk.img"]);
 * console.log(cmd, args.join(" "));
 * ```
 */
export function denovisorCommand(
  spec: BootSpec,
  extra: readonly string[] = [],
): [string, string[]] {
  return [Deno.execPath(), [
    "run",
    "-A",
    MAIN_TS,
    "run",
    "--kernel",
    spec.kernel,
    "--initrd",
    spec.initrd,
    "--cmdline",
    spec.cmdline,
    "--mem",
    String(spec.memMiB),
    "--cpus",
    String(spec.cpus),
    "--no-stdin",
    ...extra,
  ]];
}

/**
 * QEMU's version line.
 *
 * @returns `QEMU emulator version ...`, or `undefined` when QEMU is not installed.
 * @example
 * ```ts
 * import { qemuVersion } from "denovisor/bench/_qemu.ts";
 * console.log(await qemuVersion() ?? "no QEMU");
 * ```
 */
export async function qemuVersion(): Promise<string | undefined> {
  try {
    const out = await new Deno.Command(QEMU, { args: ["--version"], stderr: "null" }).output();
    return out.success ? new TextDecoder().decode(out.stdout).split("\n")[0] : undefined;
  } catch {
    return undefined;
  }
}

/** How a VMM run by {@link runVmm} ended. */
export interface VmmRun {
  /** The end of its stdout (the guest's console): at most `keepChars` characters. */
  stdout: string;
  /** The end of its stderr, at most `keepChars` characters. */
  stderr: string;
  /** Its exit status (signalled: 128 + the signal). */
  code: number;
  /** Whether it was killed for running past `timeoutMs`. */
  timedOut: boolean;
}

/** Options of {@link runVmm}. */
export interface RunVmmOptions {
  /** Kill it (SIGKILL) after this many milliseconds. */
  timeoutMs: number;
  /** How much of the end of each stream to keep (default 64 Ki characters). */
  keepChars?: number;
  /** Also copy both streams to this process's stderr as they come (to watch a guest). */
  echo?: boolean;
}

async function tail(
  stream: ReadableStream<Uint8Array>,
  keep: number,
  echo: boolean,
): Promise<string> {
  let text = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    if (echo) Deno.stderr.writeSync(new TextEncoder().encode(chunk));
    text += chunk;
    if (text.length > 2 * keep) text = text.slice(-keep);
  }
  return text.slice(-keep);
}

/**
 * Runs a VMM (or anything) to its end with stdin closed, keeping only the end
 * of its output, so a guest that prints without end costs bounded memory.
 *
 * @param command The executable.
 * @param args Its arguments.
 * @param options The timeout and how much output to keep.
 * @returns Its output's ends and how it ended.
 * @example
 * ```ts
 * import { runVmm } from "denovisor/bench/_qemu.ts";
 * const run = await runVmm("sh", ["-c", "echo DONE"], { timeoutMs: 5000 });
 * console.log(run.code, run.stdout); // 0 "DONE\n"
 * ```
 */
export async function runVmm(
  command: string,
  args: readonly string[],
  options: RunVmmOptions,
): Promise<VmmRun> {
  const keep = options.keepChars ?? 65536;
  const child = new Deno.Command(command, {
    args: [...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      child.kill("SIGKILL");
    } catch {
      // It ended meanwhile.
    }
  }, options.timeoutMs);
  try {
    const [stdout, stderr, status] = await Promise.all([
      tail(child.stdout, keep, options.echo ?? false),
      tail(child.stderr, keep, options.echo ?? false),
      child.status,
    ]);
    return { stdout, stderr, code: status.code, timedOut };
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A plain text table: the first column left-aligned, the others right-aligned,
 * a rule under the head.
 *
 * @param head The column titles.
 * @param rows The cells, as text.
 * @returns The table's lines joined with newlines.
 * @example
 * ```ts
 * import { formatTable } from "denovisor/bench/_qemu.ts";
 * console.log(formatTable(["metric", "denovisor", "QEMU"], [["MB/s", "10", "12"]]));
 * ```
 */
export function formatTable(head: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (r: readonly string[]) =>
    r.map((c, i) => i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i])).join("  ").trimEnd();
  return [line(head), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)].join("\n");
}
