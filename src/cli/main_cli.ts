/**
 * The command-line interface: `main.ts` only calls {@link main}. Commands:
 * the default (no arguments) runs the built-in guest; `run` runs any image.
 *
 * @module
 */

import type { DeviceConfig } from "../devices.ts";
import {
  DEVICE_FLAG_OPTIONS,
  DEVICE_FLAGS_HELP,
  DeviceFlagError,
  deviceFlags,
  type DeviceFlagValues,
} from "./device_flags.ts";
import { parseArgs } from "node:util";

import {
  DEFAULT_GUEST_LOAD_OPTIONS,
  DEFAULT_GUEST_SUCCESS_CODE,
  defaultGuestImage,
} from "../default_guest.ts";
import { DenovisorError } from "../errors.ts";
import type { EntryMode } from "../kvm/kvm.ts";
import { type MetricsReport, metricsReport, toPrometheus } from "../metrics.ts";
import { type LoadOptions, type RunResult, Vm } from "../vm.ts";
import { formatOverheadTable, measureOverhead, type WorkloadName, WORKLOADS } from "../overhead.ts";
import { ExitStatus, statusOfError, statusOfExit, statusOfResult } from "./exit_status.ts";
import {
  checkLinuxLoad,
  formatInspection,
  inspectImage,
  inspectionJson,
} from "../linux/inspect.ts";
import { ABI_VERSION } from "../ffi.ts";
import { UsageError } from "./usage_error.ts";
import {
  checkApiSocketOption,
  loadCommand,
  migrateCommand,
  parseIncoming,
  pauseCommand,
  restoreCommand,
  resumeCommand,
  runIncoming,
  snapshotCommand,
} from "./api_commands.ts";
import { runVm, type RunVmInput, summaryLine } from "./run_vm.ts";
import { serveCommand } from "./serve.ts";
import { fnBuildCommand } from "./fn_build_command.ts";
import denoConfig from "../../deno.json" with { type: "json" };
import {
  checkJailFlags,
  JAIL_FLAG_OPTIONS,
  JAIL_FLAGS_HELP,
  jailedRunCommand,
} from "../jail/cli.ts";
import { checkSeccompMode, configureSeccomp } from "../kvm/seccomp.ts";

const MAIN_HELP = `denovisor — a KVM hypervisor driven from TypeScript

Usage:
  deno run -A main.ts                 measure virtualization overhead: every
                                      workload natively and in a VM, as a table
  deno run -A main.ts overhead [--json] [--workload W] [--size N] [--runs R]
  deno run -A main.ts hello           run the built-in hello guest
  deno run -A main.ts run [options] IMAGE
                                      run a flat binary or static ELF64 image
  deno run -A main.ts run [options] --kernel bzImage [--initrd F] [--cmdline "..."]
                                      boot a Linux kernel (64-bit boot protocol)
  deno run -A main.ts inspect IMAGE [--json]
                                      show what the loaders see in an image
  deno run -A main.ts devices [device options] [--json]
                                      list the PCI devices a VM with these
                                      options gets (checks their host side)
  deno run -A main.ts run [options] --api-socket PATH IMAGE
                                      serve the control API while it runs
  deno run -A main.ts pause|resume --api-socket PATH
                                      pause or resume that VM
  deno run -A main.ts snapshot --api-socket PATH --to DIR [--stop] [--diff --parent PDIR]
  deno run -A main.ts load --api-socket PATH --from DIR [--lazy|--eager]
                                      replace that (paused) VM by a snapshot's
  deno run -A main.ts restore DIR [--lazy|--eager] [--api-socket PATH] [--no-stdin]
  deno run -A main.ts run --incoming tcp:HOST:PORT [--api-socket PATH]
  deno run -A main.ts migrate --api-socket PATH --to tcp:HOST:PORT
  deno run -A main.ts serve [--port N] [options] NAME=PATH...
                                      serve static Linux programs as functions
                                      over HTTP, each request in a micro-VM
  deno run -A main.ts fn-build SOURCE [-o OUT]
                                      build a C function against the function
                                      SDK (guest/fn/sdk/dv_fn.h): a static ELF
  deno run -A main.ts <command> --help
  deno run -A main.ts --version

Commands that start VMs (run, restore, serve, hello, overhead) also take
--seccomp off|log|kill (default kill) and --seccomp-deny SYSCALL,... (README
"Seccomp"); a security stop exits with status 148.

Exit status: odd = the guest's debug-exit code (v << 1) | 1; 130..254 = the
guest's EXIT hypercall status s != 0 as 128 + 2*min(s, 63) (0 for s = 0);
0 the hello guest succeeded or a guest halted; 2 bad arguments or a malformed
image or kernel; 10 guest crashed; 12 guest triple fault; 14 guest kernel
panic; 16 guest stopped answering; 20 bad initrd; 22 command line too long;
24 kernel or initrd does not fit in RAM; 26 more vCPUs than the host allows;
28 no control API answers at --api-socket; 30 the control API refused the
request; 70 VMM error; 124 timeout.
`;

const HELLO_HELP = `Usage: deno run -A main.ts hello

Runs the built-in hello guest (guest/hello/hello.S) in a 16 MiB VM: it prints
a banner over the serial port and exits through the debug-exit port. Exit
status 0 when it succeeded.

Options:
  -h, --help     this help
`;

const OVERHEAD_HELP = `Usage: deno run -A main.ts overhead [options]

Runs each workload (guest/workloads/*.c) natively and inside a denovisor VM,
a few times each, and prints T_native, T_virt, the overhead T_virt - T_native,
and the VM's exit statistics. Both sides time the same region with the same
monotonic clock; their checksums must agree.

Options:
  --workload W   cpu | memory | io | syscall (repeatable; default: all)
  --size N       the workloads' size argument (default: each one's own)
  --runs R       runs per side (default 3; the median is reported)
  --json         print the full results as JSON instead of a table
  -h, --help     this help
`;

const RUN_HELP = `Usage: deno run -A main.ts run [options] IMAGE
       deno run -A main.ts run [options] --kernel bzImage [--initrd F] [--cmdline "..."]

Runs IMAGE (a static ELF64 x86-64 executable, or a flat binary) in a new VM.
The serial console (COM1) goes to stdout; a one-line summary goes to stderr.
The guest ends the run by writing a byte v to port 0xf4 (exit status
(v << 1) | 1, like QEMU's isa-debug-exit), by halting, or by crashing.

Options:
  --mem MiB          guest RAM in MiB (default 16)
  --cpus N           vCPUs, one thread each (default 1); every vCPU starts at
                     the entry point on its own stack, 64 KiB apart
  --mode MODE        real | long | user (default long): 16-bit real mode,
                     64-bit CPL0, or 64-bit CPL3 with port I/O allowed
  --format FORMAT    auto | elf | flat (default auto: ELF by its magic)
  --load-addr A      where a flat image goes (default 0x7c00 real, 0x100000 else)
  --entry A          first instruction (default: ELF entry or the load address)
  --timeout MS       stop the guest after MS milliseconds (default 0: never)
  --unhandled-io P   ignore | stop on port I/O or MMIO no device claims
                     (default ignore)
  --arg N            the guest's argument (rdi at entry; repeat for rsi, rdx, ...)
  --metrics FILE     write the run's exit metrics to FILE (- for stdout)
  --metrics-format F json (default) | prometheus
  --quiet            no summary line
  --irqchip          interrupt virtualization: KVM's in-kernel PIC, IOAPIC,
                     local APICs and PIT, COM1 on IRQ 4 (hlt then waits for
                     an interrupt instead of ending the run)
  --dedup            memory deduplication: guest RAM is marked mergeable for
                     the host's KSM, which shares identical pages while ksmd
                     runs (/sys/kernel/mm/ksm/run = 1); what it saved is in
                     --metrics (the "ksm" section)
  --no-stdin         do not forward standard input to the guest
  --watchdog MS      end the run (status 16) when the guest prints nothing on
                     its console for MS milliseconds (default 0: never)
  --api-socket PATH  serve the control API (HTTP/JSON) on the Unix socket
                     PATH while the VM runs: GET /vm, PUT /vm/state, GET
                     /metrics, PUT /balloon, ... (README "Control API"); a
                     stale socket is replaced, a live one refused (status 2)
  --track-dirty-pages
                     track the pages the guest and devices write from the
                     start, so that \`main.ts snapshot --diff --parent DIR\`
                     can write only what changed since the last snapshot
  --seccomp MODE     kill (default) | log | off: the seccomp filter of the
                     vCPU and device threads; kill = a syscall outside a
                     thread's list stops the process (status 148)
  --seccomp-deny L   syscalls (names or numbers, comma-separated) removed
                     from every thread's list: tighten further, or test
  --incoming tcp:HOST:PORT
                     instead of IMAGE: wait on HOST:PORT for a VM that
                     \`main.ts migrate\` sends, then run it (its configuration
                     comes with the stream)
  -h, --help         this help

Standard input goes to the guest's COM1 receive side. On a terminal it is put
in raw mode for the run (restored at the end): every key reaches the guest,
Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A, Ctrl-A h lists the keys (as QEMU).

${DEVICE_FLAGS_HELP}
${JAIL_FLAGS_HELP}
Linux (instead of IMAGE; the 64-bit boot protocol, no firmware):
  --kernel FILE      a bzImage (boot protocol 2.12+) or vmlinux ELF; --mem
                     defaults to 256, the irqchip is always on, and --mode,
                     --format, --load-addr, --entry, --arg do not apply
  --initrd FILE      an initramfs/initrd, placed high in RAM
  --cmdline TEXT     the kernel command line (default
                     "console=ttyS0 reboot=k panic=-1")
`;

/** The commands that start VMs, which take `--seccomp` and `--seccomp-deny`. */
const VM_COMMANDS = new Set(["run", "restore", "serve", "hello", "overhead"]);

/**
 * Removes `--seccomp MODE` and `--seccomp-deny LIST` (also `--flag=value`)
 * from `args` and applies them to the core before any VM starts. Returns the
 * other arguments and the seccomp flags in `--flag=value` form (a jailed run
 * passes them on to the VMM it starts).
 */
async function takeSeccompFlags(args: string[]): Promise<{ rest: string[]; flags: string[] }> {
  let mode: string | undefined;
  let deny: string | undefined;
  const rest: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (arg === "--") {
      rest.push(...args.slice(i));
      break;
    }
    const [flag, inline] = arg.startsWith("--seccomp") && arg.includes("=")
      ? [arg.slice(0, arg.indexOf("=")), arg.slice(arg.indexOf("=") + 1)]
      : [arg, undefined];
    if (flag !== "--seccomp" && flag !== "--seccomp-deny") {
      rest.push(arg);
      continue;
    }
    const value = inline ?? args[++i];
    if (value === undefined) throw new UsageError(`${flag} needs a value`);
    if (flag === "--seccomp") mode = value;
    else deny = value;
  }
  if (mode === undefined && deny === undefined) return { rest, flags: [] };
  let checked;
  try {
    checked = checkSeccompMode(mode ?? "kill");
  } catch {
    throw new UsageError(`--seccomp must be off, log or kill, got ${JSON.stringify(mode)}`);
  }
  const list = (deny ?? "").split(",").map((s) => s.trim()).filter((s) => s !== "")
    .map((s) => /^[0-9]+$/.test(s) ? Number(s) : s);
  await configureSeccomp(checked, { deny: list });
  const flags = [`--seccomp=${checked}`];
  if (list.length > 0) flags.push(`--seccomp-deny=${list.join(",")}`);
  return { rest, flags };
}

/** Where the CLI writes; injectable so tests can capture it. */
export interface CliIo {
  /** Writes to standard error. */
  error(text: string): void;
  /** Writes help and version text (default: standard output). */
  output?(text: string): void;
}

const stderrIo: CliIo = {
  error: (text) => Deno.stderr.writeSync(new TextEncoder().encode(text)),
};

function output(io: CliIo, text: string): number {
  if (io.output) io.output(text);
  else writeAllSync(Deno.stdout, new TextEncoder().encode(text));
  return ExitStatus.ok;
}

function writeAllSync(w: { writeSync(p: Uint8Array): number }, bytes: Uint8Array): void {
  for (let at = 0; at < bytes.length;) at += w.writeSync(bytes.subarray(at));
}

/** The devices the run's flags ask for (a bad flag is a usage error). */
function cliDevices(values: DeviceFlagValues, linux: boolean): DeviceConfig[] {
  try {
    return deviceFlags(values, { linux });
  } catch (e) {
    if (e instanceof DeviceFlagError) throw new UsageError(e.message);
    throw e;
  }
}

/** The largest kernel, initrd or image file the CLI reads. */
export const MAX_INPUT_FILE_BYTES = 512 * 1024 * 1024;
/** The largest --mem, in MiB (as `Vm.create` accepts). */
const MAX_MEMORY_MIB = 1 << 20;
/** The most --cpus (as `Vm.create` accepts; the host's KVM may allow fewer). */
const MAX_VCPUS = 254;
/** Argument registers (rdi, rsi, rdx, rcx, r8, r9). */
const MAX_ARGUMENTS = 6;

function parseAddress(value: string | undefined, what: string): number | undefined {
  if (value === undefined) return undefined;
  const n = /^0x[0-9a-f]+$/i.test(value) || /^[0-9]+$/.test(value) ? Number(value) : NaN;
  if (!Number.isSafeInteger(n) || n < 0) {
    throw new UsageError(
      `${what} must be a non-negative integer (decimal or 0x hex), got "${value}"`,
    );
  }
  return n;
}

function parseCount(
  value: string | undefined,
  what: string,
  fallback: number,
  min: number,
  max?: number,
): number {
  if (value === undefined) return fallback;
  const n = /^[0-9]+$/.test(value) ? Number(value) : NaN;
  if (!Number.isSafeInteger(n) || n < min || (max !== undefined && n > max)) {
    throw new UsageError(
      max === undefined
        ? `${what} must be an integer >= ${min}, got "${value}"`
        : `${what} must be an integer from ${min} to ${max}, got "${value}"`,
    );
  }
  return n;
}

function oneOf<T extends string>(
  value: string | undefined,
  what: string,
  allowed: readonly T[],
  fallback: T,
): T {
  if (value === undefined) return fallback;
  if (!(allowed as readonly string[]).includes(value)) {
    throw new UsageError(`${what} must be one of ${allowed.join(", ")}, got "${value}"`);
  }
  return value as T;
}

interface ImageRun {
  result: RunResult;
  metrics: MetricsReport;
}

async function runImage(
  image: Uint8Array,
  vmOptions: {
    memoryMiB: number;
    timeoutMs: number;
    unhandledIo: "ignore" | "stop";
    vcpus?: number;
    interrupts?: boolean;
    devices?: DeviceConfig[];
    dedup?: boolean;
  },
  load: LoadOptions | ((vm: Vm) => unknown),
  input: RunVmInput = { stdin: false },
): Promise<ImageRun> {
  if (vmOptions.devices?.length && !vmOptions.interrupts) {
    throw new UsageError("devices interrupt through MSI-X: add --irqchip");
  }
  using vm = await Vm.create({ ...vmOptions, console: "stdout" });
  if (typeof load === "function") load(vm);
  else vm.load(image, load);
  // Forwarding starts once the image is loaded, so a load error leaves the
  // terminal as it was. The metrics are the last VM's (PUT /snapshot/load
  // may have replaced this one).
  let metrics: MetricsReport | undefined;
  const result = await runVm(vm, { ...input, onRunEnd: (last) => (metrics = metricsReport(last)) });
  return { result, metrics: metrics ?? metricsReport(vm) };
}

async function writeMetrics(
  path: string,
  format: "json" | "prometheus",
  report: MetricsReport,
): Promise<void> {
  const text = format === "json" ? JSON.stringify(report, null, 2) + "\n" : toPrometheus(report);
  const bytes = new TextEncoder().encode(text);
  if (path === "-") {
    await Deno.stdout.write(bytes);
    return;
  }
  try {
    await Deno.writeFile(path, bytes);
  } catch (e) {
    throw new UsageError(`cannot write metrics to ${path}: ${e instanceof Error ? e.message : e}`);
  }
}

async function runCommand(
  args: string[],
  io: CliIo,
  seccompFlags: readonly string[] = [],
): Promise<number> {
  const { values, positionals, tokens } = parseArgs({
    args,
    strict: true,
    allowPositionals: true,
    tokens: true,
    options: {
      ...JAIL_FLAG_OPTIONS,
      mem: { type: "string" },
      mode: { type: "string" },
      format: { type: "string" },
      "load-addr": { type: "string" },
      entry: { type: "string" },
      timeout: { type: "string" },
      "unhandled-io": { type: "string" },
      kernel: { type: "string" },
      initrd: { type: "string" },
      cmdline: { type: "string" },
      cpus: { type: "string" },
      quiet: { type: "boolean" },
      irqchip: { type: "boolean" },
      dedup: { type: "boolean" },
      "no-stdin": { type: "boolean" },
      watchdog: { type: "string" },
      arg: { type: "string", multiple: true },
      metrics: { type: "string" },
      "metrics-format": { type: "string" },
      "api-socket": { type: "string" },
      "track-dirty-pages": { type: "boolean" },
      incoming: { type: "string" },
      help: { type: "boolean", short: "h" },
      ...DEVICE_FLAG_OPTIONS,
    },
  });
  if (values.help) return output(io, RUN_HELP);
  checkJailFlags(values);
  if (values.jail !== undefined) return await jailedRunCommand(tokens, values, seccompFlags);
  if (values.incoming !== undefined) return await incomingCommand(values, positionals, io);
  if (values["api-socket"] !== undefined) await checkApiSocketOption(values["api-socket"]);
  if (values.kernel !== undefined) return await runLinuxCommand(values, positionals, io);
  if (positionals.length !== 1) {
    throw new UsageError(
      positionals.length === 0
        ? "missing IMAGE (see run --help)"
        : `expected one IMAGE, got ${positionals.length}`,
    );
  }
  const path = positionals[0];
  const vmOptions = {
    memoryMiB: parseCount(values.mem, "--mem", 16, 1, MAX_MEMORY_MIB),
    vcpus: parseCount(values.cpus, "--cpus", 1, 1, MAX_VCPUS),
    interrupts: values.irqchip ?? false,
    devices: cliDevices(values, false),
    dedup: values.dedup ?? false,
    timeoutMs: parseCount(values.timeout, "--timeout", 0, 0),
    unhandledIo: oneOf(
      values["unhandled-io"],
      "--unhandled-io",
      ["ignore", "stop"] as const,
      "ignore",
    ),
  };
  const load: LoadOptions = {
    mode: oneOf<EntryMode>(values.mode, "--mode", ["real", "long", "user"], "long"),
    format: oneOf(values.format, "--format", ["auto", "elf", "flat"] as const, "auto"),
    loadAddress: parseAddress(values["load-addr"], "--load-addr"),
    entry: parseAddress(values.entry, "--entry"),
    arguments: (values.arg ?? []).map((a) => parseAddress(a, "--arg")!),
  };
  if (load.arguments!.length > MAX_ARGUMENTS) {
    throw new UsageError(
      `at most ${MAX_ARGUMENTS} arguments fit in registers (rdi ... r9), got ${
        load.arguments!.length
      } --arg`,
    );
  }
  const metricsFormat = oneOf(
    values["metrics-format"],
    "--metrics-format",
    ["json", "prometheus"] as const,
    "json",
  );
  const image = await readInput(path, "image");
  await checkImage(image, load.format!);
  const { result, metrics } = await runImage(image, vmOptions, load, {
    stdin: !values["no-stdin"],
    watchdogMs: parseCount(values.watchdog, "--watchdog", 0, 0),
    apiSocket: values["api-socket"],
    trackDirtyPages: values["track-dirty-pages"] ?? false,
  });
  if (values.metrics !== undefined) await writeMetrics(values.metrics, metricsFormat, metrics);
  if (!values.quiet) io.error(summaryLine(result));
  return statusOfResult(result);
}

/** The `run` options a Linux boot reads. */
interface LinuxRunValues extends DeviceFlagValues {
  kernel?: string;
  cpus?: string;
  initrd?: string;
  cmdline?: string;
  mem?: string;
  timeout?: string;
  "unhandled-io"?: string;
  quiet?: boolean;
  metrics?: string;
  "metrics-format"?: string;
  mode?: string;
  format?: string;
  "load-addr"?: string;
  entry?: string;
  arg?: string[];
  irqchip?: boolean;
  dedup?: boolean;
  "no-stdin"?: boolean;
  watchdog?: string;
  "api-socket"?: string;
  "track-dirty-pages"?: boolean;
  incoming?: string;
}

/** The `run` options that make no sense with `--incoming` (the stream brings the VM). */
const NOT_WITH_INCOMING = [
  "kernel",
  "initrd",
  "cmdline",
  "mem",
  "cpus",
  "mode",
  "format",
  "load-addr",
  "entry",
  "arg",
  "irqchip",
  "dedup",
  "track-dirty-pages",
] as const;

/** `run --incoming tcp:HOST:PORT`: waits for a migrating VM, then runs it. */
async function incomingCommand(
  values: LinuxRunValues,
  positionals: string[],
  io: CliIo,
): Promise<number> {
  if (positionals.length > 0) {
    throw new UsageError(
      `--incoming replaces IMAGE (the VM comes with the stream); unexpected argument "${
        positionals[0]
      }"`,
    );
  }
  for (const flag of NOT_WITH_INCOMING) {
    if (values[flag] !== undefined) {
      throw new UsageError(`--${flag} does not apply to --incoming (the VM comes with the stream)`);
    }
  }
  const address = parseIncoming(values.incoming!);
  const apiSocket = values["api-socket"];
  if (apiSocket !== undefined) await checkApiSocketOption(apiSocket);
  return await runIncoming({
    address,
    ...(apiSocket === undefined ? {} : { apiSocket }),
    stdin: !values["no-stdin"],
    quiet: values.quiet ?? false,
  }, io);
}

/** Guest RAM of a Linux boot unless --mem says otherwise. */
const LINUX_DEFAULT_MEMORY_MIB = 256;
/** The command line of a Linux boot unless --cmdline says otherwise: the console
 * on COM1, and a reboot (or a panic, at once) ends the VM through the i8042. */
const LINUX_DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1";

/**
 * Reads a kernel, initrd or image: only a regular file (a device such as
 * /dev/zero, a FIFO or a directory would be read forever or not at all), and at
 * most {@link MAX_INPUT_FILE_BYTES}. The type and size come from the open file
 * itself, and the read stops at the cap even if the file grows meanwhile.
 */
async function readInput(path: string, what: string): Promise<Uint8Array> {
  const fail = (why: string) => new UsageError(`cannot read ${what} ${path}: ${why}`);
  let file: Deno.FsFile;
  try {
    // A FIFO would block in open(2) until a writer came: refuse it by its type first.
    const info = await Deno.stat(path);
    if (!info.isFile) throw fail("not a regular file");
    file = await Deno.open(path, { read: true });
  } catch (e) {
    if (e instanceof UsageError) throw e;
    throw fail(e instanceof Error ? e.message : String(e));
  }
  using f = file;
  const info = await f.stat();
  if (!info.isFile) throw fail("not a regular file");
  if (info.size > MAX_INPUT_FILE_BYTES) {
    throw fail(`${info.size} bytes, more than the ${MAX_INPUT_FILE_BYTES >> 20} MiB limit`);
  }
  const bytes = new Uint8Array(info.size);
  let at = 0;
  while (at < bytes.length) {
    const n = await f.read(bytes.subarray(at));
    if (n === null) break;
    at += n;
  }
  return bytes.subarray(0, at);
}

/** Refuses a malformed ELF image before a VM exists (the core parses it
 * without KVM); flat images have no format to check. */
async function checkImage(image: Uint8Array, format: "auto" | "elf" | "flat"): Promise<void> {
  if (image.length === 0) throw new DenovisorError("IMAGE", "the image is empty");
  const elfMagic = image[0] === 0x7f && image[1] === 0x45 && image[2] === 0x4c &&
    image[3] === 0x46;
  if (format === "flat" || (format === "auto" && !elfMagic)) return;
  const inspection = await inspectImage(image);
  if (inspection.format !== "elf") {
    throw new DenovisorError("IMAGE", "image: not an ELF file (bad magic)");
  }
  if (inspection.elf === null) {
    throw new DenovisorError("IMAGE", `image: ${inspection.problem ?? "malformed ELF"}`);
  }
}

/** `run --kernel`: boots a Linux kernel by the 64-bit boot protocol. */
async function runLinuxCommand(
  values: LinuxRunValues,
  positionals: string[],
  io: CliIo,
): Promise<number> {
  if (positionals.length > 0) {
    throw new UsageError(`--kernel replaces IMAGE; unexpected argument "${positionals[0]}"`);
  }
  for (const flag of ["mode", "format", "load-addr", "entry", "arg"] as const) {
    if (values[flag] !== undefined) {
      throw new UsageError(
        `--${flag} does not apply to --kernel (Linux enters at its 64-bit entry)`,
      );
    }
  }
  const cmdline = values.cmdline ?? LINUX_DEFAULT_CMDLINE;
  const vmOptions = {
    memoryMiB: parseCount(values.mem, "--mem", LINUX_DEFAULT_MEMORY_MIB, 1, MAX_MEMORY_MIB),
    // vCPU 0 boots; the others wait in KVM for the kernel's INIT/SIPI, and the
    // kernel finds them in the MP table the loader writes.
    vcpus: parseCount(values.cpus, "--cpus", 1, 1, MAX_VCPUS),
    // A kernel needs its timer and interrupt controllers: the irqchip is always on.
    interrupts: true,
    devices: cliDevices(values, true),
    dedup: values.dedup ?? false,
    timeoutMs: parseCount(values.timeout, "--timeout", 0, 0),
    unhandledIo: oneOf(
      values["unhandled-io"],
      "--unhandled-io",
      ["ignore", "stop"] as const,
      "ignore",
    ),
  };
  const metricsFormat = oneOf(
    values["metrics-format"],
    "--metrics-format",
    ["json", "prometheus"] as const,
    "json",
  );
  const watchdogMs = parseCount(values.watchdog, "--watchdog", 0, 0);
  const kernel = await readInput(values.kernel!, "kernel");
  const initrd = values.initrd === undefined ? undefined : await readInput(values.initrd, "initrd");
  // Every check of the load, before /dev/kvm is opened.
  await checkLinuxLoad({ kernel, initrd, cmdline }, vmOptions.memoryMiB);
  const { result, metrics } = await runImage(kernel, vmOptions, (vm) => {
    const layout = vm.loadLinux({ kernel, initrd, cmdline });
    if (!values.quiet) {
      const hex = (n: number) => `0x${n.toString(16)}`;
      io.error(
        `denovisor: ${layout.format} loaded at ${hex(layout.kernel.address)}, entry ` +
          `${hex(layout.entry)}, zero page ${hex(layout.zeroPage)}` +
          (layout.initrd ? `, initrd at ${hex(layout.initrd.address)}` : "") + "\n",
      );
    }
  }, {
    stdin: !values["no-stdin"],
    watchdogMs,
    apiSocket: values["api-socket"],
    trackDirtyPages: values["track-dirty-pages"] ?? false,
  });
  if (values.metrics !== undefined) await writeMetrics(values.metrics, metricsFormat, metrics);
  if (!values.quiet) io.error(summaryLine(result));
  return statusOfResult(result);
}

const DEVICES_HELP = `Usage: deno run -A main.ts devices [device options] [--json]

Creates a VM (with the irqchip) carrying the devices the options ask for,
without running a guest, and lists its PCI bus: address, vendor:device, class,
name and where each BAR is decoded. Every device's host side (image files,
sockets, TAP devices) is checked as \`run\` would check it.

${DEVICE_FLAGS_HELP}
  --json             print the whole listing as JSON (bus ranges included)
  -h, --help         this help
`;

async function devicesCommand(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      json: { type: "boolean" },
      help: { type: "boolean", short: "h" },
      ...DEVICE_FLAG_OPTIONS,
    },
  });
  if (values.help) return output(io, DEVICES_HELP);
  if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"`);
  using vm = await Vm.create({ interrupts: true, devices: cliDevices(values, false) });
  const listing = vm.devices();
  if (values.json) return output(io, JSON.stringify(listing, null, 2) + "\n");
  const hex = (n: number, width: number) => n.toString(16).padStart(width, "0");
  const lines = listing.pci.map((f) => {
    const bars = f.bars.map((b) =>
      `BAR${b.index} ${b.size / 1024} KiB @ ${
        b.address === null ? "off" : `0x${hex(b.address, 8)}`
      }`
    );
    return `${f.address} ${hex(f.vendor, 4)}:${hex(f.device, 4)} ${hex(f.class, 6)} ` +
      `${f.name.padEnd(12)} ${bars.join(", ")}`.trimEnd();
  });
  return output(io, lines.join("\n") + "\n");
}

const INSPECT_HELP = `Usage: deno run -A main.ts inspect IMAGE [--json]

Shows what denovisor's loaders see in IMAGE, without running it: the format
(bzImage, ELF or unknown); for a bzImage the boot protocol version and every
setup header field (setup_sects, loadflags, xloadflags, init_size,
pref_address, initrd_addr_max, cmdline_size, ...); for an ELF its segments;
where it would be loaded and entered, the RAM it needs, and why it would be
refused. Exit status 0 when it is loadable as a Linux kernel, 2 when not.

Options:
  --json         print the inspection as JSON
  -h, --help     this help
`;

async function inspectCommand(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    strict: true,
    allowPositionals: true,
    options: { json: { type: "boolean" }, help: { type: "boolean", short: "h" } },
  });
  if (values.help) return output(io, INSPECT_HELP);
  if (positionals.length !== 1) {
    throw new UsageError(
      positionals.length === 0
        ? "missing IMAGE (see inspect --help)"
        : `expected one IMAGE, got ${positionals.length}`,
    );
  }
  const inspection = await inspectImage(await readInput(positionals[0], "image"));
  const text = values.json
    ? inspectionJson(inspection)
    : formatInspection(inspection, positionals[0]);
  await Deno.stdout.write(new TextEncoder().encode(text));
  return inspection.loadable ? ExitStatus.ok : ExitStatus.usage;
}

async function overheadCommand(args: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    strict: true,
    allowPositionals: true,
    options: {
      workload: { type: "string", multiple: true },
      size: { type: "string" },
      runs: { type: "string" },
      json: { type: "boolean" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) return output(io, OVERHEAD_HELP);
  if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"`);
  const workloads = (values.workload ?? []).map((w) =>
    oneOf<WorkloadName>(w, "--workload", WORKLOADS, "cpu")
  );
  const results = await measureOverhead({
    workloads: workloads.length > 0 ? workloads : WORKLOADS,
    size: values.size === undefined ? undefined : parseCount(values.size, "--size", 1, 1),
    runs: parseCount(values.runs, "--runs", 3, 1),
    onProgress: (line) => io.error(`denovisor: ${line}\n`),
  });
  if (values.json) {
    await Deno.stdout.write(new TextEncoder().encode(JSON.stringify(results, null, 2) + "\n"));
  } else {
    const table = formatOverheadTable(results);
    await Deno.stdout.write(new TextEncoder().encode(`\n${table}\n\n${OVERHEAD_LEGEND}`));
  }
  return ExitStatus.ok;
}

const OVERHEAD_LEGEND =
  `T_native, T_virt: median time of the measured region (same C source, same clock).
overhead = T_virt - T_native. time/exit = (time in KVM_RUN + time in the VMM) / exits:
the exit round trip for exit-bound workloads. VMM/exit: the VMM's own share of it.
`;

async function helloCommand(args: string[], io: CliIo): Promise<number> {
  const { values } = parseArgs({
    args,
    strict: true,
    allowPositionals: false,
    options: { help: { type: "boolean", short: "h" } },
  });
  if (values.help) return output(io, HELLO_HELP);
  io.error("denovisor: running the built-in hello guest (guest/hello/hello.S) in a new VM\n");
  const { result } = await runImage(await defaultGuestImage(), {
    memoryMiB: 16,
    timeoutMs: 10_000,
    unhandledIo: "stop",
  }, DEFAULT_GUEST_LOAD_OPTIONS);
  io.error(summaryLine(result));
  if (result.exitCode === DEFAULT_GUEST_SUCCESS_CODE) return ExitStatus.ok;
  return statusOfExit(result.exit);
}

/**
 * Runs the CLI.
 *
 * @param args The command-line arguments (without the program name).
 * @param io Where messages go (default: stderr).
 * @returns The process exit status.
 * @example
 * ```ts
 * import { main } from "denovisor/src/cli/main_cli.ts";
 * Deno.exit(await main(["run", "--mode", "real", "boot.bin"]));
 * ```
 */
export async function main(args: string[], io: CliIo = stderrIo): Promise<number> {
  try {
    const [command, ...rest] = args;
    let seccompFlags: string[] = [];
    if (VM_COMMANDS.has(command)) {
      const taken = await takeSeccompFlags(rest);
      rest.splice(0, rest.length, ...taken.rest);
      seccompFlags = taken.flags;
    }
    if (command === undefined) return await overheadCommand([], io);
    if (command === "overhead") return await overheadCommand(rest, io);
    if (command === "hello") return await helloCommand(rest, io);
    if (command === "-h" || command === "--help" || command === "help") {
      return output(io, MAIN_HELP);
    }
    if (command === "--version" || command === "-V" || command === "version") {
      return output(
        io,
        `denovisor ${denoConfig.version}\ncore ABI ${ABI_VERSION}\ndeno ${Deno.version.deno}\n`,
      );
    }
    if (command === "run") return await runCommand(rest, io, seccompFlags);
    if (command === "inspect") return await inspectCommand(rest, io);
    if (command === "devices") return await devicesCommand(rest, io);
    if (command === "pause") return await pauseCommand(rest, io);
    if (command === "resume") return await resumeCommand(rest, io);
    if (command === "snapshot") return await snapshotCommand(rest, io);
    if (command === "restore") return await restoreCommand(rest, io);
    if (command === "load") return await loadCommand(rest, io);
    if (command === "migrate") return await migrateCommand(rest, io);
    if (command === "serve") return await serveCommand(rest, io);
    if (command === "fn-build") return await fnBuildCommand(rest, io);
    throw new UsageError(`unknown command "${command}" (see --help)`);
  } catch (e) {
    if (
      e instanceof UsageError ||
      (e instanceof TypeError && "code" in e && String(e.code).startsWith("ERR_PARSE_ARGS"))
    ) {
      io.error(`denovisor: ${e.message}\n`);
      return ExitStatus.usage;
    }
    if (e instanceof DenovisorError) {
      // One line: a core message never spans lines, but a host error might.
      io.error(`denovisor: ${e.message.split("\n")[0]}\n`);
      return statusOfError(e);
    }
    throw e;
  }
}
