/**
 * virtio-blk throughput, denovisor side by side with QEMU's virtio-blk-pci in
 * the same run: the same Debian kernel and virtio modules, the same busybox
 * initramfs, the same 256 MiB guest, a fresh raw image of the same size in the
 * same directory for each boot. In the guest, with direct I/O (no guest page
 * cache):
 *
 * - sequential write: `dd if=/dev/zero of=/dev/vda bs=1M count=256 oflag=direct`
 * - sequential read:  `dd if=/dev/vda of=/dev/null bs=1M count=256 iflag=direct`
 * - 4 KiB random reads at queue depth 1 for a few seconds (`guest/blk/blkbench.c`,
 *   built here with `gcc -static`: fio does not fit a busybox initramfs)
 *
 * timed inside the guest (`blkbench now`, CLOCK_MONOTONIC: busybox's dd prints
 * no rate). Both VMMs keep the image in the host's page cache (QEMU's default
 * `cache=writeback`, denovisor's plain pread/pwrite), so this measures the
 * virtio path, not the host's disk. The result is a ratio denovisor / QEMU per
 * metric (higher is better for both MB/s and IOPS).
 *
 *   deno run -A bench/blk_bench.ts [--runs N] [--json]
 *   deno bench -A bench/blk_bench.ts          # one boot per VMM, Deno's statistics
 *
 * Both need `/dev/kvm`; on a host without one run them in kvmbox:
 *   ../shared/kvmbox/kvmbox --timeout 3000 -- /usr/local/bin/deno run -A bench/blk_bench.ts --runs 3
 *
 * @module
 */

import { parseArgs } from "node:util";
import { checkKvmAccess } from "../src/build/core_build.ts";
import { pathOfFileUrl } from "../src/build/fs_util.ts";
import { fetchDebianKernel } from "../src/linux/debian_kernel.ts";
import { fetchDebianModules } from "../src/linux/modules.ts";
import { busyboxInitramfs, INSMOD_FAILED, VIRTIO_PCI_MODULE_NAMES } from "../tests/_linux.ts";
import { BOOT_CMDLINE, summarize, type Summary } from "./_boot_compare.ts";
import { denovisorCommand, formatTable, QEMU, qemuArgs, qemuVersion, runVmm } from "./_qemu.ts";

const BLKBENCH_C = pathOfFileUrl(new URL("../guest/blk/blkbench.c", import.meta.url));
/** Guest RAM, the same for both VMMs. */
const MEMORY_MIB = 256;
/** The image and the amount each dd moves. */
const IMAGE_MIB = 256;
/** Seconds of random reads per round. */
const RANDREAD_SECONDS = 5;
/** A whole boot with its measurements (kvmbox on a loaded host: minutes). */
const RUN_TIMEOUT_MS = 1_200_000;
const DONE = "BLK-BENCH-DONE";
const MODULE_NAMES = [...VIRTIO_PCI_MODULE_NAMES, "virtio_blk"];

const note = (line: string) => console.error(`note: ${line}`);

/** The VMMs compared. */
const VMMS = ["denovisor", "qemu-q35"] as const;
type VmmName = typeof VMMS[number];

/** One boot's measurements (guest-timed). */
interface Sample {
  vmm: VmmName;
  round: number;
  seqWriteMBps?: number;
  seqReadMBps?: number;
  randReadIops?: number;
  error?: string;
}

/** The rest of `/init` (after the modules): the three measurements, then power off. */
function benchInit(): string[] {
  const mb = IMAGE_MIB;
  const timed = (name: string, command: string) =>
    `t0=$(/bin/blkbench now); ${command} || echo "BLK-ERROR ${name} $?"; ` +
    `t1=$(/bin/blkbench now); echo "BLK-RESULT ${name} $t0 $t1"`;
  return [
    "/bin/busybox --install -s /bin",
    "mount -t sysfs sys /sys",
    "mount -t devtmpfs dev /dev",
    "i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done",
    timed("seqwrite", `dd if=/dev/zero of=/dev/vda bs=1M count=${mb} oflag=direct 2>/dev/null`),
    timed("seqread", `dd if=/dev/vda of=/dev/null bs=1M count=${mb} iflag=direct 2>/dev/null`),
    `/bin/blkbench randread /dev/vda ${RANDREAD_SECONDS} || echo "BLK-ERROR randread $?"`,
    `echo ${DONE.slice(0, 4)}''${DONE.slice(4)}`,
    "poweroff -f",
  ];
}

/**
 * Parses the guest's result lines.
 *
 * @param out The console output of one boot.
 * @returns MB/s (10^6 bytes per second) and IOPS, or the error the guest printed.
 */
function parseResults(
  out: string,
): Pick<Sample, "seqWriteMBps" | "seqReadMBps" | "randReadIops" | "error"> {
  const error = /BLK-ERROR (.*)/.exec(out)?.[1] ??
    new RegExp(`${INSMOD_FAILED} (.*)`).exec(out)?.[0];
  if (error) return { error: `the guest failed: ${error}` };
  if (!out.includes(DONE)) return { error: "the guest did not finish" };
  const rate = (name: string) => {
    const m = new RegExp(`BLK-RESULT ${name} (\\d+) (\\d+)`).exec(out);
    if (!m) return undefined;
    const ns = Number(m[2]) - Number(m[1]);
    return ns > 0 ? (IMAGE_MIB * (1 << 20)) / (ns / 1e9) / 1e6 : undefined;
  };
  const iops = /RANDREAD ops=\d+ ns=\d+ iops=(\d+)/.exec(out);
  return {
    seqWriteMBps: rate("seqwrite"),
    seqReadMBps: rate("seqread"),
    randReadIops: iops ? Number(iops[1]) : undefined,
  };
}

/** Builds `guest/blk/blkbench.c` with `gcc -static`. */
async function buildBlkbench(dir: string): Promise<Uint8Array> {
  const out = `${dir}/blkbench`;
  const gcc = await new Deno.Command("gcc", {
    args: ["-static", "-O2", "-Wall", "-o", out, BLKBENCH_C],
    stdin: "null",
  }).output();
  if (!gcc.success) {
    throw new Error(
      `gcc -static guest/blk/blkbench.c failed: ${new TextDecoder().decode(gcc.stderr)}`,
    );
  }
  return await Deno.readFile(out);
}

/** What every boot shares. */
interface Files {
  dir: string;
  kernel: string;
  initrd: string;
}

async function prepare(): Promise<Files | string> {
  const kernel = await fetchDebianKernel({ log: note });
  if (!kernel.ok) return `no Debian kernel (${kernel.reason})`;
  const modules = await fetchDebianModules(MODULE_NAMES, { log: note });
  if (!modules.ok) return `no virtio modules (${modules.reason})`;
  const dir = await Deno.makeTempDir({ prefix: "denovisor-blk-bench-" });
  globalThis.addEventListener("unload", () => {
    try {
      Deno.removeSync(dir, { recursive: true });
    } catch {
      // Already gone.
    }
  });
  const initrd = `${dir}/initrd.cpio`;
  await Deno.writeFile(
    initrd,
    await busyboxInitramfs(benchInit(), {
      modules: modules.modules,
      files: [{ path: "bin/blkbench", data: await buildBlkbench(dir) }],
    }),
  );
  return { dir, kernel: kernel.file.path, initrd };
}

function vmmCommand(vmm: VmmName, files: Files, image: string): [string, string[]] {
  const spec = {
    kernel: files.kernel,
    initrd: files.initrd,
    cmdline: BOOT_CMDLINE,
    memMiB: MEMORY_MIB,
    cpus: 1,
  };
  switch (vmm) {
    case "denovisor":
      return denovisorCommand(spec, ["--disk", image]);
    case "qemu-q35":
      return [QEMU, [
        ...qemuArgs("q35", spec),
        "-drive",
        `file=${image},format=raw,if=none,id=d0`,
        "-device",
        "virtio-blk-pci,drive=d0,disable-legacy=on",
      ]];
  }
}

/** One boot of `vmm` on a fresh image; the guest's console is kept (bounded). */
async function runOnce(vmm: VmmName, round: number, files: Files): Promise<Sample> {
  const image = `${files.dir}/disk.img`;
  const file = await Deno.open(image, { write: true, create: true, truncate: true });
  await file.truncate(IMAGE_MIB << 20);
  file.close();
  const [command, args] = vmmCommand(vmm, files, image);
  try {
    const out = await runVmm(command, args, { timeoutMs: RUN_TIMEOUT_MS });
    const parsed = parseResults(out.stdout);
    if (parsed.error) {
      parsed.error += `\n${out.stdout.slice(-2000)}\n${out.stderr.slice(-2000)}`;
    }
    return { vmm, round, ...parsed };
  } finally {
    await Deno.remove(image).catch(() => {});
  }
}

interface Args {
  runs: number;
  json: boolean;
}

function parseBenchArgs(args: string[]): Args {
  const { values } = parseArgs({
    args,
    options: { runs: { type: "string", default: "3" }, json: { type: "boolean", default: false } },
    strict: true,
    allowPositionals: false,
  });
  const runs = Number(values.runs);
  if (!Number.isInteger(runs) || runs < 1 || runs > 100) {
    throw new Error(`--runs must be an integer from 1 to 100, got ${values.runs}`);
  }
  return { runs, json: values.json };
}

const METRICS = [
  ["seqWriteMBps", "seq write MB/s"],
  ["seqReadMBps", "seq read MB/s"],
  ["randReadIops", "4K rand read IOPS"],
] as const;

async function compare(args: Args): Promise<void> {
  const kvm = checkKvmAccess();
  if (kvm) {
    console.error(`blk_bench: ${kvm}`);
    return;
  }
  const version = await qemuVersion();
  const vmms: VmmName[] = version ? [...VMMS] : ["denovisor"];
  if (!version) console.error(`blk_bench: ${QEMU} is not installed; denovisor only`);
  const files = await prepare();
  if (typeof files === "string") {
    console.error(`blk_bench: ${files}`);
    return;
  }
  const samples: Sample[] = [];
  for (let round = 0; round < args.runs; round++) {
    // Alternate which VMM goes first.
    const order = round % 2 ? [...vmms].reverse() : vmms;
    for (const vmm of order) {
      const s: Sample = await runOnce(vmm, round, files).catch((e) => ({
        vmm,
        round,
        error: e instanceof Error ? e.message : String(e),
      }));
      samples.push(s);
      console.error(
        `  round ${round + 1}/${args.runs} ${vmm.padEnd(10)} ` +
          (s.error
            ? `FAILED: ${s.error}`
            : `write ${s.seqWriteMBps?.toFixed(0)} MB/s  read ${s.seqReadMBps?.toFixed(0)} MB/s  ` +
              `randread ${s.randReadIops} IOPS`),
      );
    }
  }
  const stats = (vmm: VmmName, key: typeof METRICS[number][0]): Summary | undefined =>
    summarize(
      samples.filter((s) => s.vmm === vmm && !s.error).map((s) => s[key]).filter((
        v,
      ): v is number => v !== undefined),
    );
  const table = METRICS.map(([key, label]) => {
    const d = stats("denovisor", key);
    const q = stats("qemu-q35", key);
    return {
      metric: label,
      denovisor: d,
      qemu: q,
      ratio: d && q ? d.median / q.median : undefined,
    };
  });
  if (args.json) {
    console.log(JSON.stringify({ qemu: version, imageMiB: IMAGE_MIB, samples, table }, null, 2));
    return;
  }
  console.log(
    `\nvirtio-blk, ${IMAGE_MIB} MiB raw image, guest direct I/O, ${args.runs} run(s) each, ` +
      `alternating; ${version ?? "no QEMU"}\n`,
  );
  const rows = table.map((r) => [
    r.metric,
    r.denovisor ? r.denovisor.median.toFixed(0) : "—",
    r.qemu ? r.qemu.median.toFixed(0) : "—",
    r.ratio === undefined ? "—" : `${r.ratio.toFixed(2)}x`,
  ]);
  console.log(formatTable(["metric (median)", "denovisor", "QEMU q35", "denovisor/QEMU"], rows));
}

if (import.meta.main) {
  let args: Args;
  try {
    args = parseBenchArgs(Deno.args);
  } catch (e) {
    console.error(`blk_bench: ${e instanceof Error ? e.message : e}`);
    console.error("usage: deno run -A bench/blk_bench.ts [--runs N] [--json]");
    Deno.exit(2);
  }
  await compare(args);
} else {
  // `deno bench`: one boot per VMM and iteration (each runs all three measurements).
  const kvmProblem = checkKvmAccess();
  const haveQemu = kvmProblem === undefined && await qemuVersion() !== undefined;
  let files: Files | string | undefined;
  for (const vmm of VMMS) {
    Deno.bench({
      name:
        `virtio-blk: ${vmm} (seq write + seq read ${IMAGE_MIB} MiB, ${RANDREAD_SECONDS} s randread)`,
      group: "virtio-blk boot with I/O",
      baseline: vmm === "qemu-q35",
      ignore: kvmProblem !== undefined || (vmm === "qemu-q35" && !haveQemu),
      n: 1,
      warmup: 0,
      async fn() {
        files ??= await prepare();
        if (typeof files === "string") throw new Error(files);
        const s = await runOnce(vmm, 0, files);
        if (s.error) throw new Error(s.error);
      },
    });
  }
}
