/**
 * Balloon: time from setting the target to the VMM's RSS drop, for 256 MiB,
 * denovisor side by side with QEMU in the same run, the same Debian kernel
 * and the same guest (a busybox shell with Debian's virtio_pci and
 * virtio_balloon modules, 512 MiB of RAM).
 *
 * Each run: the guest touches all but 16 MiB of its free memory and frees it
 * again (so the host holds those pages), then the target is set to 256 MiB
 * (denovisor: `vm.balloon.setTarget(256)`; QEMU: QMP `balloon` with the
 * guest's new size, 256 MiB) and the VMM's VmRSS is polled every 2 ms until
 * it has dropped by 90 % of 256 MiB. Then the balloon is emptied again for
 * the next run. Reported: milliseconds per VMM (median, min) and the ratio
 * denovisor / QEMU.
 *
 *   deno run -A bench/balloon_bench.ts [--runs N] [--vmm both|denovisor|qemu] [--json]
 *
 * Needs `/dev/kvm`; on a host without one run it in kvmbox:
 *   ../shared/kvmbox/kvmbox --timeout 1800 -- /usr/local/bin/deno run -A bench/balloon_bench.ts --runs 3
 *
 * @module
 */

import { parseArgs } from "node:util";

import { fetchDebianKernel } from "../src/linux/debian_kernel.ts";
import { checkKvmAccess } from "../src/build/core_build.ts";
import { summarize } from "./_boot_compare.ts";
import { QEMU, qemuArgs, qemuVersion } from "./_qemu.ts";
import {
  balloonInitramfs,
  bootBalloonGuest,
  MIB,
  poll,
  rssBytes,
  touchFreeMemory,
} from "../tests/_balloon.ts";

const GUEST_MIB = 512;
const TARGET_MIB = 256;
const DROP_BYTES = 0.9 * TARGET_MIB * MIB;
const LEAVE_MIB = 16;
const TIMEOUT_MS = 600_000;
const POLL_MS = 2;
const CMDLINE = "console=ttyS0 panic=-1 rdinit=/init quiet";

/** One measurement. */
interface Sample {
  vmm: "denovisor" | "qemu";
  run: number;
  /** setTarget → RSS down by 90 % of the target, ms. */
  dropMs: number;
  /** RSS before and after, MiB. */
  rssBeforeMiB: number;
  rssAfterMiB: number;
}

function statusRss(pid: number | "self"): number {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1] ?? NaN) * 1024;
}

/** denovisor in this process: `runs` inflations of one guest. */
async function denovisorRuns(initrd: Uint8Array, runs: number): Promise<Sample[]> {
  const g = await bootBalloonGuest(
    GUEST_MIB,
    { freePageReporting: false, statsIntervalMs: 0 },
    initrd,
  );
  const samples: Sample[] = [];
  try {
    for (let run = 0; run < runs; run++) {
      await touchFreeMemory(g.shell, LEAVE_MIB);
      const before = rssBytes();
      const t0 = performance.now();
      g.vm.balloon.setTarget(TARGET_MIB);
      const after = await poll(
        "the RSS drop",
        () => {
          const r = rssBytes();
          return before - r >= DROP_BYTES ? r : undefined;
        },
        TIMEOUT_MS,
        POLL_MS,
      );
      samples.push({
        vmm: "denovisor",
        run,
        dropMs: performance.now() - t0,
        rssBeforeMiB: before / MIB,
        rssAfterMiB: after / MIB,
      });
      g.vm.balloon.setTarget(0);
      await poll(
        "the balloon to empty",
        () => {
          const s = g.vm.balloon.stats();
          return s.actualMib === 0 ? s : undefined;
        },
        TIMEOUT_MS,
        50,
      );
    }
  } finally {
    await g.close();
  }
  return samples;
}

/** QEMU's serial console on its stdio, driven like a terminal. */
class PipeShell {
  #text = "";
  #writer: WritableStreamDefaultWriter<Uint8Array>;
  #n = 0;
  constructor(child: Deno.ChildProcess) {
    this.#writer = child.stdin.getWriter();
    (async () => {
      const d = new TextDecoder();
      for await (const chunk of child.stdout) {
        this.#text = (this.#text + d.decode(chunk, { stream: true })).slice(-65536);
      }
    })();
  }
  async waitFor(re: RegExp, timeoutMs: number): Promise<string> {
    return await poll(
      `${re} on QEMU's console`,
      () => {
        const m = re.exec(this.#text);
        return m ? m[0] : undefined;
      },
      timeoutMs,
      20,
    );
  }
  async run(command: string, timeoutMs: number): Promise<string> {
    const id = ++this.#n;
    await this.#writer.write(
      new TextEncoder().encode(`${command}; echo "@E${id}@ $?"' done'\n`),
    );
    const end = await this.waitFor(new RegExp(`@E${id}@ (\\d+) done`), timeoutMs);
    const i = this.#text.lastIndexOf(end);
    return this.#text.slice(Math.max(0, i - 4096), i + end.length);
  }
}

/** A QMP connection: one command at a time. */
class Qmp {
  #conn: Deno.UnixConn;
  #buf = "";
  #reader: ReadableStreamDefaultReader<Uint8Array>;
  private constructor(conn: Deno.UnixConn) {
    this.#conn = conn;
    this.#reader = conn.readable.getReader();
  }
  static async connect(path: string): Promise<Qmp> {
    const conn = await poll("QEMU's QMP socket", () => {
      try {
        Deno.statSync(path);
        return true;
      } catch {
        return undefined;
      }
    }, 60_000).then(() => Deno.connect({ transport: "unix", path }));
    const q = new Qmp(conn);
    await q.#line(); // the greeting
    await q.execute("qmp_capabilities");
    return q;
  }
  async #line(): Promise<Record<string, unknown>> {
    for (;;) {
      const nl = this.#buf.indexOf("\n");
      if (nl >= 0) {
        const line = this.#buf.slice(0, nl);
        this.#buf = this.#buf.slice(nl + 1);
        if (line.trim()) return JSON.parse(line);
        continue;
      }
      const { value, done } = await this.#reader.read();
      if (done) throw new Error("QMP closed");
      this.#buf += new TextDecoder().decode(value);
    }
  }
  async execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    const msg = JSON.stringify(args ? { execute: command, arguments: args } : { execute: command });
    await this.#conn.write(new TextEncoder().encode(msg + "\n"));
    for (;;) {
      const r = await this.#line();
      if ("return" in r) return r.return;
      if ("error" in r) throw new Error(`QMP ${command}: ${JSON.stringify(r.error)}`);
    }
  }
  close(): void {
    try {
      this.#conn.close();
    } catch {
      // Already closed.
    }
  }
}

/** QEMU q35 with a virtio-balloon-pci: `runs` inflations of one guest. */
async function qemuRuns(bzImage: string, initrd: Uint8Array, runs: number): Promise<Sample[]> {
  const dir = await Deno.makeTempDir({ prefix: "denovisor-balloon-bench-" });
  const initrdPath = `${dir}/initrd.cpio`;
  await Deno.writeFile(initrdPath, initrd);
  const qmpPath = `${dir}/qmp.sock`;
  const child = new Deno.Command(QEMU, {
    args: [
      ...qemuArgs("q35", {
        kernel: bzImage,
        initrd: initrdPath,
        cmdline: CMDLINE,
        memMiB: GUEST_MIB,
        cpus: 1,
      }),
      ...["-device", "virtio-balloon-pci,disable-legacy=on"],
      ...["-qmp", `unix:${qmpPath},server=on,wait=off`],
    ],
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const samples: Sample[] = [];
  let qmp: Qmp | undefined;
  try {
    const shell = new PipeShell(child);
    await shell.waitFor(/DENOVISOR-SHELL-READY/, TIMEOUT_MS);
    qmp = await Qmp.connect(qmpPath);
    const fillCommand =
      `N=$(( $(sed -n 's/^MemFree: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo) / 1024 - ${LEAVE_MIB} )); ` +
      `mount -t tmpfs -o size=$((N + 1))m fill /mnt && dd if=/dev/zero of=/mnt/f bs=1M count=$N 2>/dev/null; ` +
      `rm -f /mnt/f; umount /mnt`;
    for (let run = 0; run < runs; run++) {
      await shell.run(fillCommand, TIMEOUT_MS);
      const before = statusRss(child.pid);
      const t0 = performance.now();
      // QEMU's value is the guest's new size, not the balloon's.
      await qmp.execute("balloon", { value: (GUEST_MIB - TARGET_MIB) * MIB });
      const after = await poll(
        "QEMU's RSS drop",
        () => {
          const r = statusRss(child.pid);
          return before - r >= DROP_BYTES ? r : undefined;
        },
        TIMEOUT_MS,
        POLL_MS,
      );
      samples.push({
        vmm: "qemu",
        run,
        dropMs: performance.now() - t0,
        rssBeforeMiB: before / MIB,
        rssAfterMiB: after / MIB,
      });
      await qmp.execute("balloon", { value: GUEST_MIB * MIB });
      const deadline = Date.now() + TIMEOUT_MS;
      for (;;) {
        const r = await qmp.execute("query-balloon") as { actual: number };
        if (r.actual >= GUEST_MIB * MIB) break;
        if (Date.now() > deadline) throw new Error("QEMU's balloon did not empty");
        await new Promise((res) => setTimeout(res, 50));
      }
    }
  } finally {
    qmp?.close();
    try {
      child.kill("SIGKILL");
    } catch {
      // Exited already.
    }
    await child.status;
    await Deno.remove(dir, { recursive: true });
  }
  return samples;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      runs: { type: "string", default: "3" },
      vmm: { type: "string", default: "both" },
      json: { type: "boolean", default: false },
    },
    strict: true,
  });
  const runs = Number(values.runs);
  const vmm = values.vmm;
  if (
    !Number.isSafeInteger(runs) || runs < 1 || runs > 100 || !/^(both|denovisor|qemu)$/.test(vmm)
  ) {
    console.error(
      "usage: deno run -A bench/balloon_bench.ts [--runs N (1-100)] [--vmm both|denovisor|qemu] [--json]",
    );
    Deno.exit(2);
  }
  const kvm = checkKvmAccess();
  if (kvm !== undefined) {
    console.error(`balloon_bench: ${kvm}`);
    Deno.exit(70);
  }
  const kernel = await fetchDebianKernel({ log: (l) => console.error(`note: ${l}`) });
  const initrd = await balloonInitramfs();
  const samples: Sample[] = vmm === "qemu" ? [] : [...await denovisorRuns(initrd, runs)];
  if (vmm === "denovisor") {
    // Alone, as asked.
  } else if (kernel.ok && await qemuVersion() !== undefined) {
    samples.push(...await qemuRuns(kernel.file.path, initrd, runs));
  } else {
    console.error("balloon_bench: no QEMU or no bzImage: denovisor alone");
  }
  if (values.json) {
    console.log(JSON.stringify({ samples }, null, 2));
    return;
  }
  console.log(
    `Balloon ${TARGET_MIB} MiB out of a ${GUEST_MIB} MiB guest: setTarget → VMM RSS down by ` +
      `${(DROP_BYTES / MIB).toFixed(0)} MiB (${runs} runs each)`,
  );
  const med: Record<string, number> = {};
  for (const vmm of ["denovisor", "qemu"] as const) {
    const s = summarize(samples.filter((x) => x.vmm === vmm).map((x) => x.dropMs));
    if (!s) continue;
    med[vmm] = s.median;
    console.log(
      `  ${vmm.padEnd(10)} median ${s.median.toFixed(1)} ms  min ${s.min.toFixed(1)} ms  max ${
        s.max.toFixed(1)
      } ms`,
    );
  }
  if (med.denovisor && med.qemu) {
    console.log(`  denovisor / QEMU: ${(med.denovisor / med.qemu).toFixed(2)}x (lower is faster)`);
  }
}

if (import.meta.main) await main();
