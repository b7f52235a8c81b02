/**
 * virtio-net TCP throughput, denovisor side by side with QEMU's virtio-net
 * (`-device virtio-net-pci` on `-netdev tap,vhost=off`: QEMU's own userspace
 * backend, as denovisor's device is userspace too), same Debian kernel (its
 * vmlinux ELF), same busybox initramfs, same TAP, same run.
 *
 * The bench makes a network namespace with a TAP (`10.77.0.1/24` on the host
 * side; `tests/_netns.ts`) and runs each VMM inside it (`ip netns exec`),
 * attached to that TAP (denovisor: `--net tap=NAME`). The guest's `/init` sets
 * `10.77.0.2/24`, waits for the host side to answer a ping, sends MiB bytes to
 * the host (`nc < file`: guest → host), then receives MiB bytes
 * (`nc > /dev/null`: host → guest), and powers off. The host ends are Deno
 * peers in the namespace (`tests/_net_peer.ts`), which time each transfer:
 * guest → host from the first byte to the last; host → guest from the
 * connection until the guest, its `nc` done, connects to a second port. The
 * VMMs alternate run by run; the result is MB/s per direction (median and
 * range) and the ratio denovisor / QEMU of the medians. A failed boot is
 * reported and left out; the bench exits 1 when a VMM has no sample.
 *
 *   deno run -A bench/net_bench.ts [--runs N] [--mib M] [--offload on|off] [--json] [--verbose]
 *   deno bench -A bench/net_bench.ts       # one transfer pair per VMM, QEMU the baseline
 *
 * `--offload off` turns off the checksum and TSO features on both VMMs;
 * `--verbose` copies each guest's console to stderr as it comes. Needs root
 * (namespaces, TAPs) and `/dev/kvm`; on a host without one:
 *   ../shared/kvmbox/kvmbox --timeout 2400 -- /usr/local/bin/deno run -A bench/net_bench.ts --runs 3
 *
 * Nothing leaves the namespace. Under kvmbox (TCG) both VMMs are slow; only
 * the ratio means something.
 *
 * @module
 */

import { parseArgs } from "node:util";

import { fetchDebianVmlinux } from "../src/linux/debian_kernel.ts";
import type { KernelModule } from "../src/linux/modules.ts";
import {
  busyboxInitramfs,
  fetchedPath,
  INSMOD_FAILED,
  VIRTIO_MODULES,
  VIRTIO_PCI_MODULE_NAMES,
} from "../tests/_linux.ts";
import { createNetns, ensureTun, type NetPeer, startNetPeer } from "../tests/_netns.ts";
import { BOOT_CMDLINE, summarize, type Summary } from "./_boot_compare.ts";
import { type BootSpec, denovisorCommand, formatTable, QEMU, qemuArgs, runVmm } from "./_qemu.ts";

const HOST = "10.77.0.1";
const note = (line: string) => console.error(`note: ${line}`);
/** MB/s with two significant decimals below 10 (kvmbox's rates are a few MB/s). */
const rate = (v: number) => v.toFixed(v < 10 ? 2 : 1);
const MEMORY_MIB = 256;
/** One boot with both transfers (kvmbox on a loaded host: minutes). */
const RUN_TIMEOUT_MS = 900_000;
/** How long the peers may take to report once the VMM has exited. */
const PEER_GRACE_MS = 10_000;
const DONE = "NET-BENCH-DONE";
/** The guest's modules: virtio over PCI and virtio-net. */
const MODULE_NAMES = [...VIRTIO_PCI_MODULE_NAMES, "failover", "net_failover", "virtio_net"];

/** One VMM's transfers: MB/s each way. */
export interface NetSample {
  vmm: "denovisor" | "qemu";
  guestToHostMBps: number;
  hostToGuestMBps: number;
}

/** The rest of `/init` (after the modules): address, both transfers, power off. */
function initLines(mib: number): string[] {
  const fail = (what: string) => `echo "NET-ERROR ${what} $?"`;
  return [
    "/bin/busybox --install -s /bin",
    "mount -t sysfs sys /sys",
    "mount -t devtmpfs dev /dev",
    `ip link set lo up; ip link set eth0 up && ip addr add 10.77.0.2/24 dev eth0 || ${
      fail("eth0")
    }`,
    // The host side answers ARP once the link is up; wait for it.
    "ok=0; for i in 1 2 3 4 5 6 7 8 9 10; do " +
    `ping -c 1 -W 2 ${HOST} >/dev/null && ok=1 && break; done; [ $ok = 1 ] || ${fail("ping")}`,
    `mkdir -p /tmp && dd if=/dev/zero of=/tmp/out bs=65536 count=${mib * 16} || ${fail("dd")}`,
    `nc ${HOST} 5001 < /tmp/out || ${fail("nc-send")}`,
    `nc ${HOST} 5002 </dev/null >/dev/null || ${fail("nc-receive")}`,
    `nc ${HOST} 5003 </dev/null || ${fail("nc-done")}`,
    // Split in two words: only the shell's echo prints the marker whole.
    `echo ${DONE.slice(0, 4)}''${DONE.slice(4)}`,
    "poweroff -f",
  ];
}

/** The VMM's command, run inside the namespace, attached to `tap`. */
function vmmCommand(
  vmm: NetSample["vmm"],
  tap: string,
  spec: BootSpec,
  offload: boolean,
): [string, string[]] {
  if (vmm === "denovisor") {
    return denovisorCommand(spec, [
      "--no-rng",
      "--quiet",
      "--net",
      `tap=${tap}${offload ? "" : ",offload=off"}`,
    ]);
  }
  const off = offload
    ? ""
    : ",csum=off,guest_csum=off,host_tso4=off,host_tso6=off,guest_tso4=off,guest_tso6=off";
  return [QEMU, [
    ...qemuArgs("q35", spec),
    "-netdev",
    `tap,id=n0,ifname=${tap},script=no,downscript=no,vhost=off`,
    "-device",
    `virtio-net-pci,netdev=n0,disable-legacy=on,romfile=${off}`,
  ]];
}

/** The namespace, its TAP and what every boot reads. */
interface Setup {
  ns: string;
  tap: string;
  kernel: string;
  initrd: string;
}

/** One boot: both transfers, timed by the peers. */
async function sample(
  vmm: NetSample["vmm"],
  setup: Setup,
  mib: number,
  offload: boolean,
  verbose = false,
): Promise<NetSample> {
  const bytes = mib << 20;
  const peers: NetPeer[] = [];
  try {
    const sink = await startNetPeer(setup.ns, "sink", HOST, 5001, bytes);
    peers.push(sink);
    const source = await startNetPeer(setup.ns, "source", HOST, 5002, bytes);
    peers.push(source);
    const spec = {
      kernel: setup.kernel,
      initrd: setup.initrd,
      cmdline: BOOT_CMDLINE,
      memMiB: MEMORY_MIB,
      cpus: 1,
    };
    const [cmd, args] = vmmCommand(vmm, setup.tap, spec, offload);
    note(`${vmm}: booting (${cmd === QEMU ? "qemu-system-x86_64" : "main.ts run"})`);
    const t0 = performance.now();
    const run = await runVmm("ip", ["netns", "exec", setup.ns, cmd, ...args], {
      timeoutMs: RUN_TIMEOUT_MS,
      echo: verbose,
    });
    note(`${vmm}: exited with ${run.code} after ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    const console = `${run.stdout}\n${run.stderr}`;
    const error = /NET-ERROR .*/.exec(run.stdout)?.[0] ??
      new RegExp(`${INSMOD_FAILED} .*`).exec(run.stdout)?.[0];
    if (error) throw new Error(`${vmm}: the guest failed: ${error}\n${console.slice(-3000)}`);
    if (!run.stdout.includes(DONE)) {
      throw new Error(
        `${vmm} did not finish (status ${run.code}${run.timedOut ? ", timed out" : ""}):\n` +
          console.slice(-3000),
      );
    }
    const tail = `\n${vmm}'s console:\n${console.slice(-2000)}`;
    // The guest has powered off: a peer still waiting for it never gets its connection.
    const late = setTimeout(() => peers.forEach((p) => p.kill()), PEER_GRACE_MS);
    const [up, down] = await Promise.all([sink.done, source.done]).catch((e) => {
      throw new Error(`${e instanceof Error ? e.message : e}${tail}`);
    }).finally(() => clearTimeout(late));
    if (up.bytes !== bytes || down.bytes !== bytes) {
      throw new Error(`${vmm}: short transfer: ${up.bytes} and ${down.bytes} of ${bytes}${tail}`);
    }
    const mbps = (ms: number) => bytes / 1e6 / (ms / 1000);
    return { vmm, guestToHostMBps: mbps(up.ms), hostToGuestMBps: mbps(down.ms) };
  } finally {
    for (const p of peers) p.kill();
  }
}

/** Sets up the namespace, TAP, kernel and initramfs; `run` gets the rest. */
async function withSetup<T>(mib: number, run: (setup: Setup) => Promise<T>): Promise<T> {
  await ensureTun();
  note("/dev/net/tun is there");
  const kernel = fetchedPath(await fetchDebianVmlinux(), "Debian's vmlinux");
  if (!VIRTIO_MODULES.ok) throw new Error(`no virtio modules: ${VIRTIO_MODULES.reason}`);
  const modules: KernelModule[] = VIRTIO_MODULES.modules.filter((m) =>
    MODULE_NAMES.includes(m.name)
  );
  const dir = await Deno.makeTempDir({ prefix: "dv-net-bench-" });
  try {
    const initrd = `${dir}/initrd.cpio`;
    await Deno.writeFile(initrd, await busyboxInitramfs(initLines(mib), { modules }));
    const tap = "dvbtap0";
    await using ns = await createNetns(`dvbench${Deno.pid}`, {
      name: tap,
      address: `${HOST}/24`,
    });
    note(`namespace ${ns.name} with ${tap} (${HOST}/24)`);
    return await run({ ns: ns.name, tap, kernel, initrd });
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

const USAGE =
  "usage: deno run -A bench/net_bench.ts [--runs N] [--mib M] [--offload on|off] [--json] [--verbose]";

interface NetArgs {
  runs: number;
  mib: number;
  offload: boolean;
  json: boolean;
  /** Copy each guest's console to stderr as it comes. */
  verbose: boolean;
}

function parseNetArgs(args: string[]): NetArgs {
  const { values } = parseArgs({
    args,
    options: {
      runs: { type: "string", default: "2" },
      mib: { type: "string", default: "16" },
      offload: { type: "string", default: "on" },
      json: { type: "boolean", default: false },
      verbose: { type: "boolean", default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  const runs = Number(values.runs);
  const mib = Number(values.mib);
  if (!Number.isInteger(runs) || runs < 1 || runs > 100) {
    throw new Error(`--runs must be an integer from 1 to 100, got ${values.runs}`);
  }
  // The guest keeps the file it sends in its 256 MiB of RAM.
  if (!Number.isInteger(mib) || mib < 1 || mib > 128) {
    throw new Error(`--mib must be an integer from 1 to 128, got ${values.mib}`);
  }
  if (values.offload !== "on" && values.offload !== "off") {
    throw new Error(`--offload must be on or off, got ${values.offload}`);
  }
  return {
    runs,
    mib,
    offload: values.offload === "on",
    json: values.json,
    verbose: values.verbose,
  };
}

if (import.meta.main) {
  let args;
  try {
    args = parseNetArgs(Deno.args);
  } catch (e) {
    console.error(`net_bench: ${e instanceof Error ? e.message : e}\n${USAGE}`);
    Deno.exit(2);
  }
  const { runs, mib, offload } = args;
  const failures: string[] = [];
  const samples = await withSetup(mib, async (setup) => {
    const out: NetSample[] = [];
    for (let i = 0; i < runs; i++) {
      for (const vmm of i % 2 ? ["qemu", "denovisor"] as const : ["denovisor", "qemu"] as const) {
        try {
          const s = await sample(vmm, setup, mib, offload, args.verbose);
          console.error(
            `run ${i + 1}/${runs} ${vmm}: guest → host ${rate(s.guestToHostMBps)} MB/s, ` +
              `host → guest ${rate(s.hostToGuestMBps)} MB/s`,
          );
          out.push(s);
        } catch (e) {
          // One failed boot must not lose the others.
          const why = e instanceof Error ? e.message : String(e);
          console.error(`run ${i + 1}/${runs} ${vmm}: FAILED: ${why}`);
          failures.push(`run ${i + 1} ${vmm}: ${why.split("\n")[0]}`);
        }
      }
    }
    return out;
  });
  const stats = (vmm: NetSample["vmm"], key: "guestToHostMBps" | "hostToGuestMBps") =>
    summarize(samples.filter((s) => s.vmm === vmm).map((s) => s[key]));
  const table = (["guestToHostMBps", "hostToGuestMBps"] as const).map((key) => {
    const denovisor = stats("denovisor", key);
    const qemu = stats("qemu", key);
    return {
      direction: key === "guestToHostMBps" ? "guest → host" : "host → guest",
      denovisor,
      qemu,
      ratio: denovisor && qemu ? denovisor.median / qemu.median : undefined,
    };
  });
  if (args.json) {
    console.log(JSON.stringify({ mib, runs, offload, samples, failures, table }, null, 2));
  } else {
    const median = (s: Summary | undefined) => s ? rate(s.median) : "—";
    const range = (s: Summary | undefined) =>
      !s || s.min === s.max ? "" : `${rate(s.min)}–${rate(s.max)}`;
    console.log(
      `\nTCP throughput over virtio-net, ${mib} MiB each way, ${runs} run(s) per VMM, ` +
        `alternating, offloads ${offload ? "on" : "off"}; MB/s, median (range)\n`,
    );
    console.log(formatTable(
      ["direction", "denovisor", "(range)", "QEMU", "(range)", "denovisor/QEMU"],
      table.map((r) => [
        r.direction,
        median(r.denovisor),
        range(r.denovisor),
        median(r.qemu),
        range(r.qemu),
        r.ratio === undefined ? "—" : `${r.ratio.toFixed(2)}x`,
      ]),
    ));
    for (const f of failures) console.log(`failed: ${f}`);
  }
  if (table.some((r) => r.ratio === undefined)) Deno.exit(1);
} else {
  // `deno bench`: one boot with both transfers per VMM; QEMU the baseline.
  for (const vmm of ["qemu", "denovisor"] as const) {
    Deno.bench({
      name: `net: 4 MiB each way (${vmm})`,
      group: "virtio-net TCP",
      baseline: vmm === "qemu",
      n: 1,
      warmup: 0,
      async fn() {
        await withSetup(4, (setup) => sample(vmm, setup, 4, true));
      },
    });
  }
}
