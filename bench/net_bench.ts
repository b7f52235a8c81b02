/**
 * virtio-net TCP throughput, denovisor side by side with QEMU's virtio-net
 * (`-device virtio-net-pci` on `-netdev tap`, QEMU's own userspace backend),
 * same Debian kernel, same busybox initramfs, same TAP, same run.
 *
 * The bench makes a network namespace with a TAP (`10.77.0.1/24` on the host
 * side) and runs each VMM inside it (`ip netns exec`), attached to that TAP
 * (denovisor: `--net tap=NAME`). The guest's `/init` sets `10.77.0.2/24`,
 * sends MiB bytes to the host (`nc < file`: guest → host), then receives MiB
 * bytes (`nc > /dev/null`: host → guest), and powers off. The host ends are
 * Deno peers in the namespace (`tests/_net_peer.ts`), which time each
 * transfer: guest → host from the first byte to the last; host → guest from
 * the connection until the guest, its `nc` done, connects to a second port. The VMMs alternate run by run;
 * the result is MB/s per direction and the ratio denovisor / QEMU.
 *
 *   deno run -A bench/net_bench.ts [--runs N] [--mib M] [--offload on|off] [--json]
 *   deno bench -A bench/net_bench.ts       # one transfer pair per VMM, QEMU the baseline
 *
 * Needs root (namespaces, TAPs) and `/dev/kvm`; on a host without one:
 *   ../shared/kvmbox/kvmbox --timeout 1800 -- /usr/local/bin/deno run -A bench/net_bench.ts --runs 2
 *
 * Nothing leaves the namespace. Under kvmbox (TCG) both VMMs are slow; only
 * the ratio means something.
 *
 * @module
 */

import { parseArgs } from "node:util";

import { fetchDebianVmlinux } from "../src/linux/debian_kernel.ts";
import { fetchDebianModules, type KernelModule } from "../src/linux/modules.ts";
import { pathOfFileUrl } from "../src/build/fs_util.ts";
import { busybox, busyboxInitramfs, fetchedPath, VIRTIO_MODULES } from "../tests/_linux.ts";

const PEER = pathOfFileUrl(new URL("../tests/_net_peer.ts", import.meta.url));
const MAIN_TS = pathOfFileUrl(new URL("../main.ts", import.meta.url));
const HOST = "10.77.0.1";
const MEMORY_MIB = 256;
const CMDLINE = "console=ttyS0 reboot=k panic=-1 rdinit=/init quiet";
const RUN_TIMEOUT_MS = 900_000;

/** One VMM's transfers: MB/s each way. */
export interface NetSample {
  vmm: "denovisor" | "qemu";
  guestToHostMBps: number;
  hostToGuestMBps: number;
}

function initLines(mib: number): string[] {
  return [
    "/bin/busybox --install -s /bin",
    "mount -t sysfs sys /sys",
    "ip link set lo up; ip link set eth0 up; ip addr add 10.77.0.2/24 dev eth0",
    // The host side answers ARP once the link is up; wait for it.
    `for i in 1 2 3 4 5 6 7 8 9 10; do ping -c 1 -W 2 ${HOST} >/dev/null && break; done`,
    `mkdir -p /tmp && dd if=/dev/zero of=/tmp/out bs=65536 count=${mib * 16} 2>/dev/null`,
    `nc ${HOST} 5001 < /tmp/out`,
    `nc ${HOST} 5002 </dev/null >/dev/null; nc ${HOST} 5003 </dev/null`,
    "echo NET-BENCH-DONE",
    "poweroff -f",
  ];
}

async function sh(cmd: string, ...args: string[]): Promise<void> {
  const out = await new Deno.Command(cmd, { args, stdout: "null", stderr: "piped" }).output();
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
  }
}

/** Starts a peer in `ns`; resolves when it listens; `done` gives (bytes, ms). */
async function peer(ns: string, mode: "sink" | "source", port: number, bytes: number) {
  const child = new Deno.Command("ip", {
    args: [
      "netns",
      "exec",
      ns,
      Deno.execPath(),
      "run",
      "--allow-net",
      PEER,
      mode,
      HOST,
      `${port}`,
      `${bytes}`,
    ],
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  while (!text.includes("LISTENING\n")) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`the ${mode} peer ended: ${text}`);
    text += value;
  }
  const done = (async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text += value;
    }
    await child.status;
    const m = text.match(/^(\d+) [0-9a-f]{64} ([\d.]+)$/m);
    if (!m) throw new Error(`the ${mode} peer said: ${text}`);
    return { bytes: Number(m[1]), ms: Number(m[2]) };
  })();
  return { child, done };
}

function vmmCommand(
  vmm: NetSample["vmm"],
  tap: string,
  kernel: string,
  initrd: string,
  offload: boolean,
) {
  if (vmm === "denovisor") {
    return [
      Deno.execPath(),
      "run",
      "-A",
      MAIN_TS,
      "run",
      "--kernel",
      kernel,
      "--initrd",
      initrd,
      "--mem",
      `${MEMORY_MIB}`,
      "--cmdline",
      CMDLINE,
      "--no-stdin",
      "--no-rng",
      "--quiet",
      "--net",
      `tap=${tap}${offload ? "" : ",offload=off"}`,
    ];
  }
  const off = offload
    ? ""
    : ",csum=off,guest_csum=off,host_tso4=off,host_tso6=off,guest_tso4=off,guest_tso6=off";
  return [
    "qemu-system-x86_64",
    "-accel",
    "kvm",
    "-machine",
    "q35",
    "-cpu",
    "host",
    "-m",
    `${MEMORY_MIB}`,
    "-smp",
    "1",
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-serial",
    "stdio",
    "-no-reboot",
    "-kernel",
    kernel,
    "-initrd",
    initrd,
    "-append",
    CMDLINE,
    "-netdev",
    `tap,id=n0,ifname=${tap},script=no,downscript=no,vhost=off`,
    "-device",
    `virtio-net-pci,netdev=n0,disable-legacy=on${off}`,
  ];
}

/** One boot: both transfers, timed by the peers. */
async function sample(
  vmm: NetSample["vmm"],
  ns: string,
  tap: string,
  files: { kernel: string; initrd: string },
  mib: number,
  offload: boolean,
): Promise<NetSample> {
  const bytes = mib << 20;
  const sink = await peer(ns, "sink", 5001, bytes);
  const source = await peer(ns, "source", 5002, bytes);
  const [cmd, ...args] = vmmCommand(vmm, tap, files.kernel, files.initrd, offload);
  const child = new Deno.Command("ip", {
    args: ["netns", "exec", ns, cmd, ...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => child.kill("SIGKILL"), RUN_TIMEOUT_MS);
  const out = await child.output();
  clearTimeout(timer);
  const console = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  if (!console.includes("NET-BENCH-DONE")) {
    sink.child.kill();
    source.child.kill();
    throw new Error(`${vmm} did not finish:\n${console.slice(-3000)}`);
  }
  const tail = `\n${vmm}'s console:\n${console.slice(-2000)}`;
  const up = await sink.done.catch((e) => {
    throw new Error(`${e.message}${tail}`);
  });
  const down = await source.done.catch((e) => {
    throw new Error(`${e.message}${tail}`);
  });
  if (up.bytes !== bytes || down.bytes !== bytes) {
    throw new Error(
      `${vmm}: short transfer: ${up.bytes} and ${down.bytes} of ${bytes}\n${console.slice(-2000)}`,
    );
  }
  const mbps = (ms: number) => bytes / 1e6 / (ms / 1000);
  return { vmm, guestToHostMBps: mbps(up.ms), hostToGuestMBps: mbps(down.ms) };
}

/** Sets up the namespace, TAP, kernel and initramfs; `run` gets the rest. */
async function withSetup<T>(
  mib: number,
  run: (ns: string, tap: string, files: { kernel: string; initrd: string }) => Promise<T>,
): Promise<T> {
  try {
    Deno.statSync("/dev/net/tun");
  } catch {
    const tun = await fetchDebianModules(["tun"]);
    if (!tun.ok) throw new Error(`no /dev/net/tun and no tun module: ${tun.reason}`);
    for (const m of tun.modules) await sh(fetchedPath(busybox, "busybox"), "insmod", m.path);
    await new Promise((r) => setTimeout(r, 200));
  }
  const vmlinux = await fetchDebianVmlinux();
  if (!VIRTIO_MODULES.ok) throw new Error(`no virtio modules: ${VIRTIO_MODULES.reason}`);
  const modules: KernelModule[] = VIRTIO_MODULES.modules.filter((m) =>
    [
      "virtio",
      "virtio_ring",
      "virtio_pci_modern_dev",
      "virtio_pci_legacy_dev",
      "virtio_pci",
      "failover",
      "net_failover",
      "virtio_net",
    ]
      .includes(m.name)
  );
  const dir = await Deno.makeTempDir({ prefix: "dv-net-bench-" });
  const initrd = `${dir}/initrd.cpio`;
  await Deno.writeFile(initrd, await busyboxInitramfs(initLines(mib), { modules }));
  const ns = `dvbench${Deno.pid}`;
  const tap = "dvbtap0";
  await sh("ip", "netns", "add", ns);
  try {
    await sh("ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap");
    await sh("ip", "-n", ns, "addr", "add", `${HOST}/24`, "dev", tap);
    await sh("ip", "-n", ns, "link", "set", tap, "up");
    await sh("ip", "-n", ns, "link", "set", "lo", "up");
    return await run(ns, tap, { kernel: fetchedPath(vmlinux, "Debian's vmlinux"), initrd });
  } finally {
    await sh("ip", "netns", "del", ns).catch(() => {});
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[s.length >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      runs: { type: "string", default: "2" },
      mib: { type: "string", default: "16" },
      offload: { type: "string", default: "on" },
      json: { type: "boolean", default: false },
    },
  });
  const runs = Number(values.runs);
  const mib = Number(values.mib);
  const offload = values.offload !== "off";
  const samples = await withSetup(mib, async (ns, tap, files) => {
    const out: NetSample[] = [];
    for (let i = 0; i < runs; i++) {
      for (const vmm of i % 2 ? ["qemu", "denovisor"] as const : ["denovisor", "qemu"] as const) {
        const s = await sample(vmm, ns, tap, files, mib, offload);
        console.error(
          `run ${i + 1} ${vmm}: guest→host ${s.guestToHostMBps.toFixed(1)} MB/s, host→guest ${
            s.hostToGuestMBps.toFixed(1)
          } MB/s`,
        );
        out.push(s);
      }
    }
    return out;
  });
  const med = (vmm: string, key: "guestToHostMBps" | "hostToGuestMBps") =>
    median(samples.filter((s) => s.vmm === vmm).map((s) => s[key]));
  const table = (["guestToHostMBps", "hostToGuestMBps"] as const).map((key) => ({
    direction: key === "guestToHostMBps" ? "guest → host" : "host → guest",
    denovisor: med("denovisor", key),
    qemu: med("qemu", key),
    ratio: med("denovisor", key) / med("qemu", key),
  }));
  if (values.json) console.log(JSON.stringify({ mib, runs, offload, samples, table }, null, 2));
  else {
    console.log(
      `TCP throughput, ${mib} MiB each way, ${runs} runs, offloads ${
        offload ? "on" : "off"
      } (medians, MB/s)`,
    );
    console.log("direction       denovisor      QEMU   denovisor/QEMU");
    for (const r of table) {
      console.log(
        `${r.direction.padEnd(14)} ${r.denovisor.toFixed(1).padStart(10)} ${
          r.qemu.toFixed(1).padStart(9)
        }   ${r.ratio.toFixed(2)}x`,
      );
    }
  }
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
        await withSetup(4, (ns, tap, files) => sample(vmm, ns, tap, files, 4, true));
      },
    });
  }
}
