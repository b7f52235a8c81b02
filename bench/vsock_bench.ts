/**
 * vsock throughput, denovisor side by side with QEMU in the same run: the
 * same Debian kernel and busybox initramfs, whose `/init` runs
 * `guest/vsock/vsock_peer.c` to send BYTES to the host RUNS times (guest →
 * host, timed in the guest from `connect` to the host's answer after EOF) and
 * then to receive BYTES RUNS times (host → guest, timed in the guest from
 * `accept` to EOF). The host side is the same C program for both
 * (`bench/c/vsock_host.c`): on denovisor's Unix sockets (Firecracker's
 * convention), on QEMU's vhost-vsock (`AF_VSOCK` on the host, so this loads
 * Debian's `vhost_vsock` module into the host kernel when `/dev/vhost-vsock`
 * is missing: run it as root). Prints MB/s per VMM and direction (median of
 * the runs over every round) and denovisor's throughput as a ratio of QEMU's.
 *
 *   deno run -A bench/vsock_bench.ts [--rounds N] [--runs R] [--mib M] [--json]
 *
 * Needs `/dev/kvm`; on a host without one run it in kvmbox (as root):
 *   ../shared/kvmbox/kvmbox --timeout 1800 -- /usr/local/bin/deno run -A bench/vsock_bench.ts
 *
 * @module
 */

import { parseArgs } from "node:util";

import { fetchBusybox, fetchDebianKernel } from "../src/linux/debian_kernel.ts";
import { fetchDebianModules } from "../src/linux/modules.ts";
import { pathOfFileUrl } from "../src/build/fs_util.ts";
import { busyboxInitramfs, VIRTIO_PCI_MODULE_NAMES } from "../tests/_linux.ts";
import { BOOT_CMDLINE, summarize } from "./_boot_compare.ts";
import { denovisorCommand, QEMU, qemuArgs, runVmm } from "./_qemu.ts";

const PEER_C = pathOfFileUrl(new URL("../guest/vsock/vsock_peer.c", import.meta.url));
const HOST_C = pathOfFileUrl(new URL("./c/vsock_host.c", import.meta.url));
const CID = 3;
const G2H_PORT = 5000;
const H2G_PORT = 5001;
const MEMORY_MIB = 512;
/** The guest modules: virtio over PCI and vsock over virtio. */
const GUEST_MODULES = [
  ...VIRTIO_PCI_MODULE_NAMES,
  "vsock",
  "vmw_vsock_virtio_transport_common",
  "vmw_vsock_virtio_transport",
];

type Vmm = "denovisor" | "qemu";
type Direction = "g2h" | "h2g";

interface Sample {
  vmm: Vmm;
  round: number;
  direction: Direction;
  bytes: number;
  ns: number;
}

const log = (line: string) => console.error(`note: ${line}`);

function need<T>(r: { ok: true; file: T } | { ok: false; reason: string }, what: string): T {
  if (!r.ok) throw new Error(`${what} cannot be had: ${r.reason}`);
  return r.file;
}

async function run(cmd: string, args: string[]): Promise<void> {
  const out = await new Deno.Command(cmd, { args, stderr: "piped", stdout: "null" }).output();
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
  }
}

/** Loads vhost_vsock (and what it needs) into the host kernel for QEMU, with busybox's insmod. */
async function hostVhostVsock(busybox: string): Promise<void> {
  try {
    Deno.statSync("/dev/vhost-vsock");
    return;
  } catch { /* load it */ }
  const mods = await fetchDebianModules(["vhost_vsock"], { log });
  if (!mods.ok) throw new Error(`vhost_vsock cannot be had: ${mods.reason}`);
  const loaded = await Deno.readTextFile("/proc/modules").catch(() => "");
  for (const m of mods.modules) {
    if (new RegExp(`^${m.name} `, "m").test(loaded)) continue;
    await run(busybox, ["insmod", m.path]);
  }
  for (let i = 0; i < 50; i++) {
    try {
      Deno.statSync("/dev/vhost-vsock");
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  throw new Error("/dev/vhost-vsock did not appear after loading vhost_vsock");
}

/** The rest of `/init`, after the modules: both directions, then reboot. */
function init(bytes: number, runs: number): string[] {
  return [
    "/bin/busybox --install -s /bin",
    "mount -t sysfs sys /sys",
    "mount -t devtmpfs dev /dev",
    "echo VSOCK-BENCH-START",
    `vsock_peer source ${G2H_PORT} ${bytes} ${runs}`,
    `vsock_peer sink ${H2G_PORT} ${runs}`,
    "echo VSOCK-BENCH-END",
    "reboot -f",
  ];
}

/** Runs one VMM boot with its host helpers; the guest's BENCH lines. */
async function boot(
  vmm: Vmm,
  round: number,
  files: { kernel: string; initrd: string; host: string; dir: string },
  bytes: number,
  runs: number,
): Promise<Sample[]> {
  const path = `${files.dir}/v${round}.sock`;
  const sinkArgs = vmm === "denovisor"
    ? ["sink", "unix", `${path}_${G2H_PORT}`]
    : ["sink", "vsock", String(G2H_PORT)];
  const sourceArgs = vmm === "denovisor"
    ? ["source", "unix", path, String(H2G_PORT), String(bytes), String(runs)]
    : ["source", "vsock", String(CID), String(H2G_PORT), String(bytes), String(runs)];
  const sink = new Deno.Command(files.host, { args: sinkArgs, stderr: "piped", stdout: "null" })
    .spawn();
  const reader = sink.stderr.getReader();
  const first = await reader.read();
  if (!new TextDecoder().decode(first.value).includes("SINK-READY")) {
    throw new Error(`the host sink did not start: ${new TextDecoder().decode(first.value)}`);
  }
  reader.releaseLock();
  sink.stderr.cancel().catch(() => {});
  const spec = {
    kernel: files.kernel,
    initrd: files.initrd,
    cmdline: BOOT_CMDLINE,
    memMiB: MEMORY_MIB,
    cpus: 1,
  };
  const [cmd, args] = vmm === "denovisor"
    ? denovisorCommand(spec, ["--no-rng", "--vsock", `cid=${CID},path=${path}`])
    : [QEMU, [
      ...qemuArgs("q35", spec),
      "-device",
      `vhost-vsock-pci,guest-cid=${CID},disable-legacy=on`,
    ]];
  const source = new Deno.Command(files.host, { args: sourceArgs, stdout: "null", stderr: "null" })
    .spawn();
  const { stdout: out, stderr: err } = await runVmm(cmd, args, { timeoutMs: 900_000 });
  try {
    source.kill("SIGKILL");
  } catch { /* done */ }
  try {
    sink.kill("SIGKILL");
  } catch { /* done */ }
  await Promise.all([source.status, sink.status]);
  const samples = [...out.matchAll(/BENCH (g2h|h2g) (\d+) (\d+)/g)].map((m) => ({
    vmm,
    round,
    direction: m[1] as Direction,
    bytes: Number(m[2]),
    ns: Number(m[3]),
  }));
  if (!out.includes("VSOCK-BENCH-END")) {
    throw new Error(`${vmm} did not finish:\n${out.slice(-2000)}\n${err.slice(-2000)}`);
  }
  return samples;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      rounds: { type: "string", default: "1" },
      runs: { type: "string", default: "3" },
      mib: { type: "string", default: "32" },
      json: { type: "boolean", default: false },
    },
    strict: true,
  });
  const rounds = Number(values.rounds);
  const runs = Number(values.runs);
  const bytes = Number(values.mib) << 20;
  for (const [name, v] of [["rounds", rounds], ["runs", runs], ["mib", Number(values.mib)]]) {
    if (!Number.isInteger(v) || (v as number) < 1) throw new Error(`--${name} must be >= 1`);
  }
  const kernel = need(await fetchDebianKernel({ log }), "Debian's kernel").path;
  const busybox = need(await fetchBusybox({ log }), "busybox-static").path;
  const modules = await fetchDebianModules(GUEST_MODULES, { log });
  if (!modules.ok) throw new Error(`the guest modules cannot be had: ${modules.reason}`);
  await hostVhostVsock(busybox);

  const dir = await Deno.makeTempDir({ prefix: "denovisor-vsock-bench-" });
  try {
    await run("gcc", ["-static", "-O2", "-o", `${dir}/vsock_peer`, PEER_C]);
    await run("gcc", ["-O2", "-o", `${dir}/vsock_host`, HOST_C]);
    const initrd = await busyboxInitramfs(init(bytes, runs), {
      modules: modules.modules,
      files: [{ path: "bin/vsock_peer", data: await Deno.readFile(`${dir}/vsock_peer`) }],
    });
    await Deno.writeFile(`${dir}/initrd`, initrd);
    const files = { kernel, initrd: `${dir}/initrd`, host: `${dir}/vsock_host`, dir };
    const samples: Sample[] = [];
    for (let round = 0; round < rounds; round++) {
      // Alternate which VMM goes first, round by round.
      const order: Vmm[] = round % 2 === 0 ? ["denovisor", "qemu"] : ["qemu", "denovisor"];
      for (const vmm of order) {
        log(`round ${round + 1}/${rounds}: ${vmm}`);
        samples.push(...await boot(vmm, round, files, bytes, runs));
      }
    }
    const mbps = (vmm: Vmm, d: Direction) =>
      summarize(
        samples.filter((s) => s.vmm === vmm && s.direction === d).map((s) =>
          s.bytes / (s.ns / 1e9) / 1e6
        ),
      )?.median ?? NaN;
    const rows = (["g2h", "h2g"] as const).map((d) => ({
      direction: d,
      denovisorMBps: mbps("denovisor", d),
      qemuMBps: mbps("qemu", d),
      ratio: mbps("denovisor", d) / mbps("qemu", d),
    }));
    if (values.json) {
      console.log(JSON.stringify({ bytes, runs, rounds, samples, rows }, null, 2));
      return;
    }
    console.log(`vsock throughput, ${bytes >> 20} MiB x ${runs} runs x ${rounds} rounds (median)`);
    console.log("direction       denovisor        QEMU vhost-vsock   denovisor / QEMU");
    for (const r of rows) {
      console.log(
        `${r.direction === "g2h" ? "guest -> host" : "host -> guest"}   ` +
          `${r.denovisorMBps.toFixed(1).padStart(8)} MB/s   ${
            r.qemuMBps.toFixed(1).padStart(8)
          } MB/s` +
          `      ${r.ratio.toFixed(2)}x`,
      );
    }
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

if (import.meta.main) await main();
