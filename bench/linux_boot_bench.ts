/**
 * Linux boot with denovisor, side by side with QEMU.
 *
 * 1. Time from `Vm` creation to a Linux kernel's first instruction, for a
 *    256 MiB guest with Debian's kernel (fetched into `.cache/kernels/`), a
 *    1 MiB initrd and a command line. The target is 5 ms. The kernel's first
 *    instruction (`startup_64`) is overwritten with `out %al, $0xf4` after
 *    loading, so the run ends the moment the vCPU executes it: the measured
 *    span is `Vm.create` + `loadLinux` + the run up to that instruction's
 *    exit, all from TypeScript.
 * 2. The same Debian kernel and the same busybox initramfs (whose `/init`
 *    prints `DENOVISOR-BOOT-MARKER` on the serial console and reboots) booted
 *    to that marker by
 *    - denovisor as a subprocess (`deno run -A main.ts run --kernel ...`),
 *      from spawn to the marker on its stdout: the number to compare with QEMU;
 *    - denovisor in this process (`Vm.create` → `loadLinux` → `run`, the
 *      console buffer polled every 50 ms);
 *    - `qemu-system-x86_64 -accel kvm` with the machine types `microvm` and
 *      `q35`, from spawn to the marker on its stdout;
 *    with the same RAM, vCPUs and command line, the VMMs alternating run by
 *    run, and each subprocess's VmRSS/VmHWM read when the marker appears.
 *
 *   deno run -A bench/linux_boot_bench.ts [--runs N] [--mem M] [--cpus C] [--json]
 *   deno bench -A bench/linux_boot_bench.ts     # Deno's statistics (QEMU microvm the baseline)
 *
 * Both need `/dev/kvm`; on a host without one run them in kvmbox:
 *   ../shared/kvmbox/kvmbox --timeout 1500 -- /usr/local/bin/deno run -A bench/linux_boot_bench.ts --runs 3
 *
 * @module
 */

import { Vm } from "../mod.ts";
import { fetchBusybox, fetchDebianKernel, fetchDebianVmlinux } from "../src/linux/debian_kernel.ts";
import { checkKvmAccess, hashCoreSources } from "../src/build/core_build.ts";
import { pathOfFileUrl } from "../src/build/fs_util.ts";
import type { VcpuMetrics } from "../src/kvm/kvm.ts";
import {
  type BenchArgs,
  BOOT_CMDLINE,
  BOOT_MARKER,
  bootInitramfs,
  bootInProcess,
  bootProcess,
  parseBenchArgs,
  type ProcessBoot,
  summarize,
  type Summary,
} from "./_boot_compare.ts";
import {
  type BootSpec,
  denovisorCommand,
  formatTable,
  QEMU,
  qemuArgs,
  type QemuMachine,
  qemuVersion,
} from "./_qemu.ts";

const MEMORY_MIB = 256;
// Filler behind a gzip magic: the loader checks an initrd's format, the kernel
// does not get as far as unpacking it.
const INITRD = new Uint8Array(1 << 20).fill(0x5a);
INITRD.set([0x1f, 0x8b, 0x08]);
const CMDLINE = "console=ttyS0 earlyprintk=serial reboot=k panic=-1 root=/dev/ram0";
/** `out %al, $0xf4`: the debug-exit port ends the run at the first instruction. */
const EXIT_AT_ENTRY = new Uint8Array([0xe6, 0xf4]);
/** One boot to the marker may take this long (under kvmbox on a loaded host: minutes). */
const BOOT_TIMEOUT_MS = 600_000;
/** How long a VMM may take to exit by itself after the marker before it is killed. */
const EXIT_GRACE_MS = 3_000;
/**
 * The in-process boot polls the console buffer this often: the marker's time
 * is late by up to this much, negligible against a boot of seconds. Not much
 * faster: on a one-CPU host every wake-up of the JS thread preempts the vCPU
 * thread (a 2 ms poll was tried first; its one in-process sample, 187 s against
 * 87 s for the subprocess, did not repeat clearly enough to blame the poll:
 * with 50 ms the in-process samples were 83–160 s).
 */
const CONSOLE_POLL_MS = 50;
/** Boots to the first instruction (milliseconds each): more samples than full boots. */
const FIRST_INSN_RUNS = 30;
const CORE_DIR = pathOfFileUrl(new URL("../core/", import.meta.url));

const USAGE =
  "usage: deno run -A bench/linux_boot_bench.ts [--runs N] [--mem MiB] [--cpus C] [--json]";

/** The command line's settings when run as a script, checked before any work. */
function mainArgs(): BenchArgs | undefined {
  if (!import.meta.main) return undefined;
  try {
    return parseBenchArgs(Deno.args);
  } catch (e) {
    console.error(`linux_boot_bench: ${e instanceof Error ? e.message : e}\n${USAGE}`);
    Deno.exit(2);
  }
}
const cliArgs = mainArgs();

const note = (line: string) => console.error(`note: ${line}`);
const fetched = await fetchDebianKernel({ log: note });
if (!fetched.ok) console.error(`linux_boot_bench: no Debian kernel (${fetched.reason})`);
const kernel = fetched.ok ? await Deno.readFile(fetched.file.path) : undefined;
// The same kernel as its vmlinux ELF: its load copies the uncompressed image
// (and never touches its BSS), where the bzImage's copies the compressed one.
const elfFetched = await fetchDebianVmlinux({ log: note });
const vmlinux = elfFetched.ok ? await Deno.readFile(elfFetched.file.path) : undefined;

/** One boot to the first instruction; returns the phases in milliseconds. */
interface Phases {
  create: number;
  load: number;
  run: number;
  total: number;
}

async function bootToFirstInstruction(image: Uint8Array): Promise<Phases> {
  const t0 = performance.now();
  using vm = await Vm.create({ memoryMiB: MEMORY_MIB });
  const t1 = performance.now();
  const layout = vm.loadLinux({ kernel: image, initrd: INITRD, cmdline: CMDLINE });
  vm.writeMemory(layout.entry, EXIT_AT_ENTRY);
  const t2 = performance.now();
  const result = await vm.run({ timeoutMs: 10_000 });
  const t3 = performance.now();
  if (result.exitCode !== 1) throw new Error(`unexpected end of run: ${result.summary}`);
  return { create: t1 - t0, load: t2 - t1, run: t3 - t2, total: t3 - t0 };
}

/** The VMMs compared, in the order of the first round. */
const VMMS = ["denovisor", "denovisor-in-process", "qemu-microvm", "qemu-q35"] as const;
type VmmName = typeof VMMS[number];

/** One boot to the marker by one VMM. */
interface Sample {
  vmm: VmmName;
  round: number;
  /** Spawn (or `Vm.create`) to the marker, ms. */
  markerMs: number;
  /** Spawn (or `Vm.create`) to the kernel's entry, ms, where it can be seen. */
  entryMs?: number;
  /** Spawn to the VMM's exit after the guest's reboot, ms, when it exited by itself. */
  exitMs?: number;
  /** The VMM process's VmRSS when the marker appeared, KiB (subprocesses only). */
  rssKiB?: number;
  /** Its VmHWM then, KiB. */
  hwmKiB?: number;
  /** In-process runs: the exit metrics when the marker appeared. */
  metrics?: VcpuMetrics[];
  /** Why the boot failed (then the times are not counted). */
  error?: string;
}

/** What the boots need: the files every VMM reads and the denovisor bytes. */
interface BootFiles {
  spec: BootSpec;
  kernel: Uint8Array;
  initrd: Uint8Array;
}

/** Builds the initramfs into a temporary file (removed at unload). */
async function prepareBoot(memMiB: number, cpus: number): Promise<BootFiles | string> {
  if (!fetched.ok || !kernel) return `no Debian kernel (${fetched.ok ? "" : fetched.reason})`;
  const busybox = await fetchBusybox({ log: note });
  if (!busybox.ok) return `no busybox (${busybox.reason})`;
  const initrd = bootInitramfs(await Deno.readFile(busybox.file.path), BOOT_MARKER);
  const path = await Deno.makeTempFile({ prefix: "denovisor-bench-", suffix: ".cpio" });
  globalThis.addEventListener("unload", () => {
    try {
      Deno.removeSync(path);
    } catch {
      // Already gone.
    }
  });
  await Deno.writeFile(path, initrd);
  return {
    spec: { kernel: fetched.file.path, initrd: path, cmdline: BOOT_CMDLINE, memMiB, cpus },
    kernel,
    initrd,
  };
}

/** `run --kernel` prints this on stderr after loading, just before vCPU 0 enters. */
const DENOVISOR_LOADED = /denovisor: \S+ loaded at /;

async function bootOnce(vmm: VmmName, round: number, files: BootFiles): Promise<Sample> {
  const fromProcess = (boot: ProcessBoot): Sample => ({
    vmm,
    round,
    markerMs: boot.markerMs,
    entryMs: boot.loadedMs,
    exitMs: boot.exitMs,
    rssKiB: boot.memory?.rssKiB,
    hwmKiB: boot.memory?.hwmKiB,
  });
  const options = { marker: BOOT_MARKER, timeoutMs: BOOT_TIMEOUT_MS, exitGraceMs: EXIT_GRACE_MS };
  switch (vmm) {
    case "denovisor":
      return fromProcess(
        await bootProcess(...denovisorCommand(files.spec), {
          ...options,
          loadedLine: DENOVISOR_LOADED,
        }),
      );
    case "denovisor-in-process": {
      const boot = await bootInProcess(files.kernel, files.initrd, files.spec, {
        marker: BOOT_MARKER,
        pollMs: CONSOLE_POLL_MS,
        timeoutMs: BOOT_TIMEOUT_MS,
      });
      return {
        vmm,
        round,
        markerMs: boot.markerMs,
        entryMs: boot.createMs + boot.loadMs,
        exitMs: boot.endMs,
        metrics: boot.metrics,
      };
    }
    case "qemu-microvm":
    case "qemu-q35": {
      const machine = vmm.slice("qemu-".length) as QemuMachine;
      return fromProcess(await bootProcess(QEMU, qemuArgs(machine, files.spec), options));
    }
  }
}

/** The VMMs that can run here, and why the others cannot. */
async function availableVmms(): Promise<{ vmms: VmmName[]; skipped: string[] }> {
  const skipped: string[] = [];
  const kvm = checkKvmAccess();
  if (kvm) return { vmms: [], skipped: [`every VMM: ${kvm}`] };
  const vmms: VmmName[] = ["denovisor", "denovisor-in-process"];
  if (await qemuVersion()) vmms.push("qemu-microvm", "qemu-q35");
  else skipped.push(`QEMU: ${QEMU} is not installed`);
  return { vmms, skipped };
}

/** Round `r` runs the VMMs rotated by `r`, so none always goes first. */
function roundOrder(vmms: readonly VmmName[], round: number): VmmName[] {
  const k = round % vmms.length;
  return [...vmms.slice(k), ...vmms.slice(0, k)];
}

interface VmmSummary {
  vmm: VmmName;
  markerMs?: Summary;
  entryMs?: Summary;
  exitMs?: Summary;
  rssKiB?: Summary;
  hwmKiB?: Summary;
}

function summarizeVmm(vmm: VmmName, samples: Sample[]): VmmSummary {
  const of = samples.filter((s) => s.vmm === vmm && !s.error);
  const pick = (key: "markerMs" | "entryMs" | "exitMs" | "rssKiB" | "hwmKiB") =>
    summarize(of.map((s) => s[key]).filter((v): v is number => v !== undefined));
  return {
    vmm,
    markerMs: pick("markerMs"),
    entryMs: pick("entryMs"),
    exitMs: pick("exitMs"),
    rssKiB: pick("rssKiB"),
    hwmKiB: pick("hwmKiB"),
  };
}

/** Exits of one in-process boot up to the marker, summed over its vCPUs. */
function exitProfile(metrics: VcpuMetrics[]) {
  const sum = (f: (m: VcpuMetrics) => number) => metrics.reduce((a, m) => a + f(m), 0);
  return {
    exits: sum((m) => m.exits),
    ioIn: sum((m) => m.ioIn),
    ioOut: sum((m) => m.ioOut),
    serialIo: sum((m) => m.ioInByPort.serial + m.ioOutByPort.serial),
    otherIo: sum((m) => m.ioInByPort.other + m.ioOutByPort.other),
    mmio: sum((m) => m.mmioRead + m.mmioWrite),
    hlt: sum((m) => m.hlt),
    other: sum((m) => m.other),
    kvmRunMs: sum((m) => m.kvmRunNs) / 1e6,
    vmmMs: sum((m) => m.vmmNs) / 1e6,
  };
}

async function compare(args: BenchArgs): Promise<void> {
  const files = await prepareBoot(args.memMiB, args.cpus);
  if (typeof files === "string") {
    console.error(`linux_boot_bench: cannot compare boots: ${files}`);
    return;
  }
  const { vmms, skipped } = await availableVmms();
  for (const why of skipped) console.error(`linux_boot_bench: skipping ${why}`);
  if (vmms.length === 0) return;
  const version = await qemuVersion();
  const samples: Sample[] = [];
  for (let round = 0; round < args.runs; round++) {
    for (const vmm of roundOrder(vmms, round)) {
      let sample: Sample;
      try {
        sample = await bootOnce(vmm, round, files);
      } catch (e) {
        // One failed boot (a timeout on a loaded host) must not lose the others.
        sample = { vmm, round, markerMs: NaN, error: e instanceof Error ? e.message : String(e) };
      }
      samples.push(sample);
      console.error(
        `  round ${round + 1}/${args.runs} ${vmm.padEnd(20)} ` +
          (sample.error ? `FAILED: ${sample.error}` : `marker ${ms(sample.markerMs)}` +
            (sample.entryMs === undefined ? "" : `  entry ${ms(sample.entryMs)}`) +
            (sample.rssKiB === undefined ? "" : `  RSS ${mib(sample.rssKiB)}`) +
            (sample.hwmKiB === undefined ? "" : `  HWM ${mib(sample.hwmKiB)}`)),
      );
    }
  }
  const hashStart = performance.now();
  await hashCoreSources(CORE_DIR);
  const coreHashMs = performance.now() - hashStart;
  const summaries = vmms.map((vmm) => summarizeVmm(vmm, samples));
  const median = (vmm: VmmName) => summaries.find((s) => s.vmm === vmm)?.markerMs?.median;
  const ratio = (a: VmmName, b: VmmName) => {
    const [x, y] = [median(a), median(b)];
    return x === undefined || y === undefined ? undefined : x / y;
  };
  const ratios = {
    "denovisor / qemu-microvm": ratio("denovisor", "qemu-microvm"),
    "denovisor / qemu-q35": ratio("denovisor", "qemu-q35"),
    "denovisor-in-process / qemu-microvm": ratio("denovisor-in-process", "qemu-microvm"),
  };
  const inProcess = samples.filter((s) => s.metrics).map((s) => exitProfile(s.metrics!));
  const profile = inProcess.length === 0 ? undefined : {
    exits: summarize(inProcess.map((p) => p.exits))?.median,
    serialIo: summarize(inProcess.map((p) => p.serialIo))?.median,
    otherIo: summarize(inProcess.map((p) => p.otherIo))?.median,
    mmio: summarize(inProcess.map((p) => p.mmio))?.median,
    hlt: summarize(inProcess.map((p) => p.hlt))?.median,
    kvmRunMs: summarize(inProcess.map((p) => p.kvmRunMs))?.median,
    vmmMs: summarize(inProcess.map((p) => p.vmmMs))?.median,
    coreSourceHashMs: coreHashMs,
  };
  const firstInstruction = kernel ? await firstInstructionSamples(kernel, FIRST_INSN_RUNS) : [];
  const firstInstructionElf = vmlinux
    ? await firstInstructionSamples(vmlinux, FIRST_INSN_RUNS)
    : [];
  if (args.json) {
    console.log(JSON.stringify(
      {
        args,
        qemu: version,
        cmdline: BOOT_CMDLINE,
        samples: samples.map((s) => ({ ...s, metrics: s.metrics && exitProfile(s.metrics) })),
        summaries,
        ratios,
        profile,
        firstInstruction: {
          total: summarize(firstInstruction.map((p) => p.total)),
          create: summarize(firstInstruction.map((p) => p.create)),
          load: summarize(firstInstruction.map((p) => p.load)),
          run: summarize(firstInstruction.map((p) => p.run)),
        },
        firstInstructionElf: {
          total: summarize(firstInstructionElf.map((p) => p.total)),
          load: summarize(firstInstructionElf.map((p) => p.load)),
        },
      },
      null,
      2,
    ));
    return;
  }
  console.log(
    `\nLinux boot to "${BOOT_MARKER}" on the serial console: Debian's kernel, a busybox ` +
      `initramfs, ${args.memMiB} MiB, ${args.cpus} vCPU(s), ${args.runs} run(s) each, alternating` +
      `\n${version ?? "QEMU not available"}; cmdline "${BOOT_CMDLINE}"\n`,
  );
  const cell = (s: Summary | undefined, f: (v: number) => string) => s ? f(s.median) : "—";
  const rows = summaries.map((s) => [
    s.vmm,
    cell(s.markerMs, ms),
    cell(s.markerMs && { ...s.markerMs, median: s.markerMs.min }, ms),
    cell(s.markerMs && { ...s.markerMs, median: s.markerMs.p90 }, ms),
    cell(s.entryMs, ms),
    cell(s.rssKiB, mib),
    cell(s.hwmKiB, mib),
  ]);
  console.log(
    formatTable(["VMM", "to marker p50", "min", "p90", "to kernel entry", "RSS", "HWM"], rows),
  );
  console.log();
  for (const [name, value] of Object.entries(ratios)) {
    if (value !== undefined) console.log(`  ${name.padEnd(38)} ${value.toFixed(2)}x`);
  }
  console.log(
    `\n  to kernel entry: denovisor = spawn → "loaded" on stderr (vCPU 0 enters next); ` +
      `in-process = Vm.create + loadLinux;\n  QEMU: not observable from outside ` +
      `(its firmware and the kernel's setup code run first; it would take a trace or a gdbstub).` +
      `\n  RSS/HWM: the VMM process's VmRSS/VmHWM when the marker appeared ` +
      `(denovisor: the deno process).`,
  );
  if (profile) {
    console.log(
      `\nWhere denovisor's boot goes (in-process runs, medians up to the marker): ` +
        `${profile.exits} exits (${profile.serialIo} serial port I/O, ${profile.otherIo} other ` +
        `port I/O, ${profile.mmio} MMIO, ${profile.hlt} hlt); ${ms(profile.kvmRunMs ?? 0)} in ` +
        `KVM_RUN, ${ms(profile.vmmMs ?? 0)} in the VMM's exit handling; hashing the core's ` +
        `sources at process start (main.ts) ${ms(coreHashMs)}.`,
    );
  }
  if (firstInstruction.length) {
    console.log();
    printFirstInstruction(firstInstruction, "bzImage");
  }
  if (firstInstructionElf.length) {
    console.log();
    printFirstInstruction(firstInstructionElf, "vmlinux ELF");
  }
}

function ms(v: number): string {
  return v >= 10_000 ? `${(v / 1000).toFixed(1)} s` : `${v.toFixed(v >= 100 ? 0 : 2)} ms`;
}

function mib(kib: number): string {
  return `${(kib / 1024).toFixed(1)} MiB`;
}

async function firstInstructionSamples(image: Uint8Array, runs: number): Promise<Phases[]> {
  const samples: Phases[] = [];
  for (let i = 0; i < runs + 1; i++) samples.push(await bootToFirstInstruction(image));
  return samples;
}

function printFirstInstruction(all: Phases[], format: string): void {
  const [cold, ...samples] = all;
  const stat = (key: keyof Phases) => {
    const s = summarize(samples.map((p) => p[key]))!;
    return `median ${ms(s.median)}  p90 ${ms(s.p90)}  min ${ms(s.min)}`;
  };
  console.log(
    `Vm creation → first kernel instruction (${format}), ${samples.length} runs ` +
      "(+1 cold run not counted)",
  );
  console.log(`  Vm.create            ${stat("create")}`);
  console.log(`  loadLinux            ${stat("load")}`);
  console.log(`  run to 1st insn      ${stat("run")}`);
  console.log(`  total                ${stat("total")}   (target ≤ 5 ms)`);
  console.log(`  cold first run       ${ms(cold.total)} (core load, first /dev/kvm use)`);
}

if (kernel) {
  Deno.bench({
    name:
      `Vm.create → loadLinux → first instruction (${MEMORY_MIB} MiB, Debian kernel, 1 MiB initrd)`,
    ignore: checkKvmAccess() !== undefined,
    async fn(b) {
      b.start();
      const t0 = performance.now();
      using vm = await Vm.create({ memoryMiB: MEMORY_MIB });
      const layout = vm.loadLinux({ kernel, initrd: INITRD, cmdline: CMDLINE });
      vm.writeMemory(layout.entry, EXIT_AT_ENTRY);
      const result = await vm.run({ timeoutMs: 10_000 });
      b.end();
      if (result.exitCode !== 1 || performance.now() - t0 > 1000) {
        throw new Error(`unexpected end of run: ${result.summary}`);
      }
    },
  });
}

// `deno bench`: the boot to the marker, one group, QEMU microvm the baseline.
// A boot takes seconds (tens under kvmbox), so a few iterations each.
if (kernel) {
  const { vmms } = await availableVmms();
  let files: BootFiles | string | undefined;
  const boot = (vmm: VmmName) => async () => {
    files ??= await prepareBoot(MEMORY_MIB, 1);
    if (typeof files === "string") throw new Error(files);
    await bootOnce(vmm, 0, files);
  };
  for (const vmm of VMMS) {
    Deno.bench({
      name: `boot to marker: ${vmm} (${MEMORY_MIB} MiB, 1 vCPU)`,
      group: "linux boot to marker",
      baseline: vmm === "qemu-microvm",
      ignore: !vmms.includes(vmm),
      n: 3,
      warmup: 0,
      fn: boot(vmm),
    });
  }
}

if (cliArgs && kernel) await compare(cliArgs);
