/**
 * Runs INSIDE a jail (as `/vm/probe.ts`, by the jailed Deno) and prints, as
 * one JSON line, what it can see and do: tests/jail_test.ts checks it.
 * With the argument `allocate MiB` it then touches that much memory (a
 * cgroup's memory.max must stop it); with `outputs`, it leaves a file and a
 * link to a host file in its run folder (the host must copy only the file).
 */

import { createSocket } from "node:dgram";

function attempt(fn: () => unknown): string {
  try {
    fn();
    return "ok";
  } catch (e) {
    return e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  }
}

async function attemptAsync(fn: () => Promise<unknown>): Promise<string> {
  try {
    await fn();
    return "ok";
  } catch (e) {
    return e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  }
}

function statusField(status: string, name: string): string {
  return new RegExp(`^${name}:[ \\t]*(.*)$`, "m").exec(status)?.[1].trim() ?? "";
}

function limit(limits: string, name: string): string {
  const line = limits.split("\n").find((l) => l.startsWith(name)) ?? "";
  return line.slice(name.length).trim().split(/\s+/)[0] ?? "";
}

const [hostPort] = Deno.args;
const status = Deno.readTextFileSync("/proc/self/status");
const limits = Deno.readTextFileSync("/proc/self/limits");
const udp = await new Promise<string>((resolve) => {
  const socket = createSocket("udp4");
  socket.on("error", (e) => {
    socket.close();
    resolve(`error: ${e.message}`);
  });
  socket.send(new Uint8Array([1]), 53, "8.8.8.8", (e) => {
    socket.close();
    resolve(e ? `error: ${e.message}` : "ok");
  });
});
const report = {
  pid: Deno.pid,
  hostname: Deno.hostname(),
  root: [...Deno.readDirSync("/")].map((e) => e.name).sort(),
  dev: [...Deno.readDirSync("/dev")].map((e) => e.name).sort(),
  hostFiles: Object.fromEntries(
    ["/etc/passwd", "/etc/shadow", "/work", "/root", "/home", "/usr/bin", "/proc/1/root/etc/passwd"]
      .map((path) => [path, attempt(() => Deno.statSync(path))]),
  ),
  tcpLoopback: await attemptAsync(() =>
    Deno.connect({ hostname: "127.0.0.1", port: Number(hostPort ?? 9) })
  ),
  tcpRemote: await attemptAsync(() => Deno.connect({ hostname: "1.1.1.1", port: 80 })),
  udp,
  writeRoot: attempt(() => Deno.writeTextFileSync("/escape", "x")),
  writeTmp: attempt(() => Deno.writeTextFileSync("/tmp/ok", "x")),
  writeSources: attempt(() => Deno.writeTextFileSync("/denovisor/main.ts", "x")),
  uid: statusField(status, "Uid"),
  gid: statusField(status, "Gid"),
  groups: statusField(status, "Groups"),
  capEff: statusField(status, "CapEff"),
  capPrm: statusField(status, "CapPrm"),
  capBnd: statusField(status, "CapBnd"),
  capAmb: statusField(status, "CapAmb"),
  noNewPrivs: statusField(status, "NoNewPrivs"),
  nofile: limit(limits, "Max open files"),
  fsize: limit(limits, "Max file size"),
  nproc: limit(limits, "Max processes"),
  cgroup: Deno.readTextFileSync("/proc/self/cgroup").trim(),
  kvm: attempt(() => Deno.openSync("/dev/kvm", { read: true, write: true }).close()),
};
console.log(JSON.stringify(report));

if (Deno.args[1] === "allocate") {
  const chunks: Uint8Array[] = [];
  for (let mib = 0; mib < Number(Deno.args[2]); mib += 16) {
    chunks.push(new Uint8Array(16 << 20).fill(1));
  }
  console.log(`allocated ${chunks.length * 16} MiB`);
}

if (Deno.args[1] === "outputs") {
  Deno.writeTextFileSync("/run/denovisor/good", "written in the jail\n");
  Deno.symlinkSync("/etc/hostname", "/run/denovisor/evil");
}

if (Deno.args[1] === "sleep") {
  console.log("sleeping");
  setInterval(() => {}, 1000);
}
