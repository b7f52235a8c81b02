/**
 * The jailer, for real: bad options are refused with codes; a probe run by
 * the jailed Deno (tests/_jail_probe.ts) shows what the jail hides and which
 * limits hold; `main.ts run --jail` still runs a guest to completion; and the
 * jail folder is gone afterwards. Needs root (the suite runs as root on the
 * development machines and in kvmbox).
 */

import assert from "node:assert/strict";

import { DenovisorError } from "../src/errors.ts";
import { validateJailOptions } from "../src/jail/policy.ts";
import {
  cgroup2Mount,
  JAIL_MARKER,
  JAIL_SETUP_FAILED,
  runJailed,
  type RunJailedOptions,
} from "../src/jail/run_jailed.ts";
import { defaultGuestImage } from "../src/default_guest.ts";
import { cli, kvmTest } from "./_helpers.ts";
import { RAM_MIB } from "./_runtime_guest.ts";
import { checkHostSide, vsockHostSide } from "./_vsock_host.ts";
import { buildRuntimeGuest } from "../src/build/workload_build.ts";

const PROBE = new URL("./_jail_probe.ts", import.meta.url).pathname;

function rejects(options: Parameters<typeof validateJailOptions>[0], code: string, re: RegExp) {
  assert.throws(
    () => validateJailOptions(options),
    (e: unknown) => e instanceof DenovisorError && e.code === code && re.test(e.message),
  );
}

interface ProbeReport {
  pid: number;
  hostname: string;
  root: string[];
  dev: string[];
  hostFiles: Record<string, string>;
  tcpLoopback: string;
  tcpRemote: string;
  udp: string;
  writeRoot: string;
  writeTmp: string;
  writeSources: string;
  uid: string;
  gid: string;
  groups: string;
  capEff: string;
  capPrm: string;
  capBnd: string;
  capAmb: string;
  noNewPrivs: string;
  nofile: string;
  fsize: string;
  nproc: string;
  cgroup: string;
  kvm: string;
}

/** A fresh jail folder path (not created) and its parent, removed afterwards. */
async function jailPlace(): Promise<{ parent: string; dir: string } & AsyncDisposable> {
  const parent = await Deno.makeTempDir({ prefix: "jail_test_" });
  return {
    parent,
    dir: `${parent}/jail`,
    [Symbol.asyncDispose]: () => Deno.remove(parent, { recursive: true }),
  };
}

/** `main.ts run --jail DIR` as nobody (65534), with `args`. */
function jailedRun(dir: string, ...args: string[]) {
  return cli("run", "--jail", dir, "--uid", "65534", "--gid", "65534", ...args);
}

/** Runs the probe in a jail; the probe file is world-readable for --uid. */
async function probe(
  dir: string,
  options: Omit<RunJailedOptions, "dir" | "vm"> = {},
  probeArgs: string[] = [],
) {
  const file = await Deno.makeTempFile({ suffix: ".ts" });
  try {
    await Deno.copyFile(PROBE, file);
    await Deno.chmod(file, 0o644);
    const run = await runJailed({
      dir,
      ...options,
      vm: {
        script: "/vm/probe.ts",
        args: probeArgs,
        files: [{ host: file, jail: "/vm/probe.ts" }],
      },
      stdin: "null",
      output: "piped",
    });
    const stdout = new TextDecoder().decode(run.stdout);
    const stderr = new TextDecoder().decode(run.stderr);
    const line = stdout.split("\n").find((l) => l.startsWith("{"));
    return {
      code: run.code,
      stdout,
      stderr,
      report: line ? JSON.parse(line) as ProbeReport : undefined,
    };
  } finally {
    await Deno.remove(file);
  }
}

Deno.test("bad jail options are refused with INVALID_ARGUMENT and say which", () => {
  rejects({ dir: "relative/jail" }, "INVALID_ARGUMENT", /absolute path/);
  rejects({ dir: "/" }, "INVALID_ARGUMENT", /absolute path/);
  rejects({ dir: "/srv/../etc" }, "INVALID_ARGUMENT", /absolute path/);
  rejects({ dir: "/srv/jail", uid: -1 }, "INVALID_ARGUMENT", /uid must be an integer/);
  rejects({ dir: "/srv/jail", uid: 2 ** 32 - 1 }, "INVALID_ARGUMENT", /uid must be/);
  rejects({ dir: "/srv/jail", gid: 1.5 }, "INVALID_ARGUMENT", /gid must be/);
  rejects(
    { dir: "/srv/jail", cgroups: { "devices.allow": "a" } as Record<string, string> },
    "INVALID_ARGUMENT",
    /unknown cgroup key "devices.allow"/,
  );
  rejects(
    { dir: "/srv/jail", cgroups: { "memory.max": "1\n+cpu" } },
    "INVALID_ARGUMENT",
    /cgroup memory.max: the value/,
  );
  rejects({ dir: "/srv/jail", limits: { nofile: 0 } }, "INVALID_ARGUMENT", /nofile limit/);
  assert.deepEqual(validateJailOptions({ dir: "/srv/jail", limits: { nproc: 64 } }), {
    nofile: 4096,
    fsize: 1 << 30,
    nproc: 64,
  });
});

Deno.test("a process without the capabilities to jail gets NOT_AVAILABLE", async () => {
  // Root's uid, but no capabilities left after exec: what a non-root user has.
  const code = `import { validateJailOptions } from ${
    JSON.stringify(new URL("../src/jail/policy.ts", import.meta.url).href)
  };
try { validateJailOptions({ dir: "/srv/jail" }); console.log("accepted"); }
catch (e) { console.log(e.code, e.message); }`;
  const out = await new Deno.Command("setpriv", {
    args: ["--bounding-set=-all", "--inh-caps=-all", "--", Deno.execPath(), "eval", code],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  assert.match(text, /^NOT_AVAILABLE a jail needs root/);
});

Deno.test("a jail folder that holds other files or a live jail is refused", async () => {
  await using place = await jailPlace();
  await Deno.mkdir(place.dir);
  await Deno.writeTextFile(`${place.dir}/data`, "keep me");
  await assert.rejects(
    probe(place.dir),
    (e: unknown) =>
      e instanceof DenovisorError && e.code === "INVALID_ARGUMENT" &&
      /is not empty and not a previous jail's \(it holds data\)/.test(e.message),
  );
  assert.equal(await Deno.readTextFile(`${place.dir}/data`), "keep me");
  await Deno.remove(`${place.dir}/data`);
  // This test's own pid stands for a jailer still running there.
  await Deno.writeTextFile(`${place.dir}/${JAIL_MARKER}`, `${Deno.pid}\n`);
  await assert.rejects(
    probe(place.dir),
    (e: unknown) => e instanceof DenovisorError && e.code === "BUSY",
  );
  await Deno.writeTextFile(`${place.dir}/${JAIL_MARKER}`, "999999999\n");
  const { code, stderr } = await probe(place.dir);
  assert.equal(code, 0, stderr);
  assert.deepEqual([...Deno.readDirSync(place.dir)], [], "a folder that existed is left empty");
});

Deno.test("a jail hands files back only as regular files: a link it leaves is refused, not followed", async () => {
  await using place = await jailPlace();
  const good = `${place.parent}/good.txt`;
  const evil = `${place.parent}/evil.txt`;
  await assert.rejects(
    probe(place.dir, {
      outputs: [{ host: good, name: "good" }, { host: evil, name: "evil" }],
    }, ["9", "outputs"]),
    (e: unknown) =>
      e instanceof DenovisorError && e.code === "IO" &&
      /the jail left evil as something other than a file; not copied/.test(e.message),
  );
  assert.equal(await Deno.readTextFile(good), "written in the jail\n");
  await assert.rejects(Deno.lstat(evil), Deno.errors.NotFound);
  await assert.rejects(Deno.stat(place.dir), Deno.errors.NotFound, "the jail is gone");
});

Deno.test("inside the jail: PID 1, no host files, no network, no capabilities, the rlimits", async () => {
  await using place = await jailPlace();
  // A host service on loopback the jail must not reach.
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { code, stderr, report } = await probe(place.dir, {
    uid: 65534,
    gid: 65534,
    limits: { nofile: 200, fsize: 5_000_000, nproc: 4000 },
  }, [String(listener.addr.port)]);
  assert.equal(code, 0, stderr);
  assert.ok(report, stderr);
  assert.equal(report.pid, 1);
  assert.equal(report.hostname, "denovisor-jail");
  assert.deepEqual(report.root, [
    "deno",
    "deno-dir",
    "denovisor",
    "dev",
    "lib",
    "lib64",
    "proc",
    "tmp",
    "vm",
  ]);
  assert.deepEqual(report.dev, ["kvm", "null", "urandom", "zero"]);
  for (const [path, result] of Object.entries(report.hostFiles)) {
    assert.notEqual(result, "ok", `${path} is visible in the jail`);
  }
  assert.match(report.tcpLoopback, /Network is unreachable|Connection refused/);
  assert.match(report.tcpRemote, /Network is unreachable/);
  assert.match(report.udp, /^error: send /, "a UDP datagram leaves the jail");
  assert.match(report.writeRoot, /Read-only file system/);
  assert.equal(report.writeTmp, "ok");
  assert.notEqual(report.writeSources, "ok");
  assert.match(report.uid, /^65534\s+65534\s+65534\s+65534$/);
  assert.match(report.gid, /^65534\s+65534\s+65534\s+65534$/);
  assert.equal(report.groups, "");
  for (const set of [report.capEff, report.capPrm, report.capBnd, report.capAmb]) {
    assert.match(set, /^0+$/);
  }
  assert.equal(report.noNewPrivs, "1");
  assert.deepEqual([report.nofile, report.fsize, report.nproc], ["200", "5000000", "4000"]);
  await assert.rejects(Deno.stat(place.dir), Deno.errors.NotFound, "the jail folder is removed");
});

Deno.test("a jail as root still has no capabilities, and the default limits", async () => {
  await using place = await jailPlace();
  const { code, stderr, report } = await probe(place.dir);
  assert.equal(code, 0, stderr);
  assert.ok(report);
  assert.match(report.uid, /^0\s+0\s+0\s+0$/);
  assert.match(report.capEff, /^0+$/);
  assert.match(report.capBnd, /^0+$/);
  assert.deepEqual([report.nofile, report.fsize, report.nproc], ["4096", String(1 << 30), "1024"]);
  // Root without CAP_DAC_OVERRIDE still cannot write a read-only mount.
  assert.match(report.writeRoot, /Read-only file system/);
});

/**
 * Whether the host delegates cgroup v2 memory and pids to root. Inside kvmbox
 * (a throw-away VM, KVMBOX=1) cgroup2 is mounted and delegated first, as a
 * systemd host has it.
 */
function cgroupDelegated(): boolean {
  const read = () => {
    const mount = cgroup2Mount();
    if (mount === undefined) return false;
    try {
      const enabled = Deno.readTextFileSync(`${mount}/cgroup.subtree_control`).split(/\s+/);
      return enabled.includes("memory") && enabled.includes("pids") && enabled.includes("cpu");
    } catch {
      return false;
    }
  };
  if (read() || Deno.env.get("KVMBOX") !== "1") return read();
  const mounted = new Deno.Command("mount", { args: ["-t", "cgroup2", "none", "/sys/fs/cgroup"] })
    .outputSync();
  if (mounted.code !== 0) return false;
  Deno.writeTextFileSync("/sys/fs/cgroup/cgroup.subtree_control", "+cpu +memory +pids");
  return read();
}

Deno.test("cgroup limits hold where the host delegates them, and are refused where not", async () => {
  await using place = await jailPlace();
  const cgroups = { "memory.max": "300M", "pids.max": "200" };
  if (!cgroupDelegated()) {
    const { code, stderr } = await probe(place.dir, { cgroups });
    assert.equal(code, JAIL_SETUP_FAILED);
    assert.match(stderr, /cgroups not delegated/);
    await assert.rejects(Deno.stat(place.dir), Deno.errors.NotFound);
    return;
  }
  const mount = cgroup2Mount()!;
  // Within the limit: the probe runs, in its own leaf.
  let run = await probe(place.dir, { cgroups });
  assert.equal(run.code, 0, run.stderr);
  assert.match(run.report!.cgroup, /^0::\/denovisor\/jail-\d+$/);
  const leaf = `${mount}${run.report!.cgroup.slice(3)}`;
  await assert.rejects(Deno.stat(leaf), Deno.errors.NotFound, "the leaf is removed");
  // Past memory.max: the kernel kills the jail (SIGKILL: 128 + 9).
  run = await probe(place.dir, { cgroups }, ["9", "allocate", "1024"]);
  assert.equal(run.code, 137, run.stdout + run.stderr);
  assert.doesNotMatch(run.stdout, /allocated/);
  await assert.rejects(Deno.stat(leaf), Deno.errors.NotFound);
});

Deno.test("run --jail refuses bad flags with status 2 and a message", async () => {
  let r = await cli("run", "--jail", "relative/dir", "/nonexistent.img");
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /the jail folder must be an absolute path/);
  r = await cli("run", "--uid", "1000", "/nonexistent.img");
  assert.equal(r.code, 2);
  assert.match(r.stderr, /--uid needs --jail DIR/);
  r = await cli("run", "--jail", "/tmp/j", "--cgroup", "cpuset.cpus=0", "/nonexistent.img");
  assert.equal(r.code, 2);
  assert.match(r.stderr, /--cgroup must be KEY=VALUE with KEY one of cpu.max/);
  r = await cli("run", "--jail", "/tmp/j", "--uid", "-3", "/nonexistent.img");
  assert.equal(r.code, 2);
  r = await cli("run", "--jail", "/tmp/j", "--incoming", "tcp:127.0.0.1:9", "/nonexistent.img");
  assert.equal(r.code, 2);
  assert.match(r.stderr, /--incoming is not available with --jail/);
  // --device JSON: checked, and its host paths put in the jail like the flags'.
  r = await cli("run", "--jail", "/tmp/j", "--device", "{}", "/nonexistent.img");
  assert.equal(r.code, 2);
  assert.match(r.stderr, /--device \{\}: unknown device kind/);
  r = await cli("run", "--jail", "/tmp/j", "--device", '{"kind":"net","netns":"n"}', "/x.img");
  assert.equal(r.code, 2);
  assert.match(r.stderr, /a net device with netns is not available with --jail/);
  // A vsock's socket folder is shared with the jail: one holding anything but
  // sockets is refused, and so are a socket name and a path the jail cannot use.
  const place = await Deno.makeTempDir({ prefix: "jail_test_" });
  try {
    await Deno.mkdir(`${place}/sockets`);
    await Deno.writeTextFile(`${place}/sockets/secret.txt`, "host data");
    await Deno.writeFile(`${place}/image`, new Uint8Array(16));
    const vsock = (path: string) =>
      cli("run", "--jail", `${place}/jail`, "--vsock", `cid=3,path=${path}`, `${place}/image`);
    r = await vsock(`${place}/sockets/v.sock`);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /socket folder .*\/sockets: holds secret.txt, which is not a socket/);
    r = await vsock(`${place}/sockets/secret.txt`);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /vsock path .*secret.txt already exists/);
    r = await vsock(`${place}/sockets/v:sock`);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /the socket's name must be 1-64 of/);
    r = await cli(
      "run",
      "--jail",
      `${place}/jail`,
      "--vsock",
      `cid=3,path=${place}/v.sock`,
      "--device",
      `{"kind":"vsock","cid":4,"path":"${place}/sockets/w.sock"}`,
      `${place}/image`,
    );
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /every vsock socket must be in one folder/);
    r = await cli(
      "run",
      "--jail",
      `${place}/jail`,
      "--device",
      `{"kind":"block","path":"${place}/nothere.img"}`,
      `${place}/image`,
    );
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /cannot put .*\/nothere.img in the jail/);
    r = await vsock(`${place}/nothere/v.sock`);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /socket folder .*\/nothere: No such file/);
    r = await cli(
      "run",
      "--jail",
      `${place}/jail`,
      "--metrics",
      `${place}/nothere/m.json`,
      `${place}/image`,
    );
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /cannot write .*\/nothere\/m.json: its folder .* does not exist/);
    assert.deepEqual([...Deno.readDirSync(place)].map((e) => e.name).sort(), ["image", "sockets"]);
  } finally {
    await Deno.remove(place, { recursive: true });
  }
  r = await cli("run", "--jail", "/tmp/jail_test_absent", "/nonexistent.img");
  assert.equal(r.code, 2);
  assert.match(r.stderr, /cannot put \/nonexistent.img in the jail/);
});

kvmTest(
  "run --jail runs the hello guest to completion in the jail, then removes the jail",
  async () => {
    await using place = await jailPlace();
    const image = `${place.parent}/hello.elf`;
    await Deno.writeFile(image, await defaultGuestImage(), { mode: 0o644 });
    const metrics = `${place.parent}/metrics.json`;
    const r = await jailedRun(
      place.dir,
      "--mode",
      "user",
      "--metrics",
      metrics,
      image,
    );
    // The hello guest writes 0 to the debug-exit port: status (0 << 1) | 1.
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stdout, /500500/);
    assert.match(r.stderr, /guest exited with code 1 · \d+ exits/);
    // --metrics FILE: written in the jail's run folder, copied out at the end.
    const report = JSON.parse(await Deno.readTextFile(metrics));
    assert.equal(report.vcpus.length, 1);
    assert.ok(report.total.ioOut > 0, JSON.stringify(report.total));
    await assert.rejects(Deno.stat(place.dir), Deno.errors.NotFound);
  },
);

kvmTest(
  "run --jail --vsock: a guest and host programs talk both ways through the socket folder shared with the jail",
  async () => {
    await using place = await jailPlace();
    const image = `${place.parent}/vsock.elf`;
    await Deno.writeFile(
      image,
      await buildRuntimeGuest(new URL("./guests/virtio_vsock.c", import.meta.url)),
      { mode: 0o644 },
    );
    // The socket folder, the jail's user's; the host listens for the guest
    // at PATH_5000 (a socket that user may connect to).
    const sockets = `${place.parent}/sockets`;
    await Deno.mkdir(sockets, { mode: 0o755 });
    await Deno.chown(sockets, 65534, 65534);
    const path = `${sockets}/v.sock`;
    const [hostPort, guestPort] = [5000, 6000];
    const listener = Deno.listen({ transport: "unix", path: `${path}_${hostPort}` });
    // Once the VMM ends, the listener closes: a host side still waiting fails, not hangs.
    const closeListener = () => {
      try {
        listener.close();
      } catch {
        // Closed already.
      }
    };
    try {
      await Deno.chown(`${path}_${hostPort}`, 65534, 65534);
      const vm = jailedRun(
        place.dir,
        "--irqchip",
        "--vsock",
        `cid=3,path=${path}`,
        "--mem",
        `${RAM_MIB}`,
        "--arg",
        `${BigInt(hostPort) | BigInt(guestPort) << 32n}`,
        "--arg",
        `${RAM_MIB << 20}`,
        "--timeout",
        "120000",
        image,
      ).finally(closeListener);
      // The guest connects first; by then the jailed device has bound PATH.
      const [r, seen] = await Promise.all([vm, vsockHostSide(listener, path, guestPort)]);
      assert.equal(r.code, 0, r.stderr);
      assert.ok(checkHostSide(seen) >= 2 ** 30);
      // The jailed VMM removed its socket when it closed the device.
      await assert.rejects(Deno.lstat(path), Deno.errors.NotFound);
      await assert.rejects(Deno.stat(place.dir), Deno.errors.NotFound);
    } finally {
      closeListener();
    }
  },
);

/** Host processes running a jailed probe (the jailed Deno's command line, `pgrep -f`). */
async function probeProcesses(): Promise<string[]> {
  const out = await new Deno.Command("pgrep", {
    args: ["-f", "^/deno/deno run .*/vm/probe.ts 9 sleep"],
    stdin: "null",
    stdout: "piped",
  }).output();
  return new TextDecoder().decode(out.stdout).split("\n").filter((line) => line !== "");
}

Deno.test("SIGTERM to a jailed run stops the VMM and leaves no process or folder behind", async () => {
  await using place = await jailPlace();
  const probeFile = `${place.parent}/probe.ts`;
  await Deno.copyFile(PROBE, probeFile);
  await Deno.chmod(probeFile, 0o644);
  const module = new URL("../src/jail/run_jailed.ts", import.meta.url).href;
  const script = `import { runJailed } from ${JSON.stringify(module)};
const r = await runJailed({ dir: ${JSON.stringify(place.dir)}, stdin: "null",
  vm: { script: "/vm/probe.ts", args: ["9", "sleep"],
        files: [{ host: ${JSON.stringify(probeFile)}, jail: "/vm/probe.ts" }] } });
console.log("jailed run ended", r.code);`;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["eval", script],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  let stdout = "";
  const decoder = new TextDecoder();
  const reader = child.stdout.getReader();
  while (!stdout.includes("sleeping")) {
    const { done, value } = await reader.read();
    if (done) break;
    stdout += decoder.decode(value, { stream: true });
  }
  assert.match(stdout, /sleeping/);
  assert.equal((await probeProcesses()).length, 1, "the jailed probe runs");
  child.kill("SIGTERM");
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    stdout += decoder.decode(value, { stream: true });
  }
  const [status, errors] = await Promise.all([child.status, stderr]);
  assert.equal(status.code, 0, errors);
  // The jailer turns the termination into SIGKILL for the namespace's init.
  assert.match(stdout, /jailed run ended 137/);
  assert.deepEqual(await probeProcesses(), [], "no jailed process is left");
  await assert.rejects(Deno.stat(place.dir), Deno.errors.NotFound);
});
