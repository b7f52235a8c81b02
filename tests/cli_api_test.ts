/**
 * The CLI's control-API commands: their argument checks and statuses (no KVM
 * needed), and `run --api-socket` driven by `pause` / `resume` from other
 * processes.
 */

import assert from "node:assert/strict";
import { ApiClient, ApiError } from "../src/api/client.ts";
import { cli, kvmTest, linuxTest, MAIN, testGuest } from "./_helpers.ts";

Deno.test("the control-API commands check their arguments: status 2 and one line", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvcli" });
  try {
    await Deno.writeTextFile(`${dir}/file`, "x");
    const snap = `${dir}/snap`;
    await Deno.mkdir(snap);
    await Deno.writeTextFile(`${snap}/state`, "not a snapshot");
    const cases: [string[], RegExp][] = [
      [["pause"], /missing --api-socket PATH \(see pause --help\)/],
      [["resume", "--api-socket"], /argument missing|Option '--api-socket <value>'/],
      [["pause", "--api-socket", "/x.sock", "extra"], /unexpected argument "extra"/],
      [["snapshot", "--api-socket", "/x.sock"], /missing --to DIR/],
      [["snapshot", "--to", "d"], /missing --api-socket PATH/],
      [["restore"], /missing DIR/],
      [["restore", `${dir}/file`], /is not a directory/],
      [["restore", `${dir}/none`], /cannot read snapshot/],
      [["restore", dir, "--lazy", "--eager"], /--lazy and --eager exclude each other/],
      [["restore", snap, "--api-socket", `${dir}/file`], /--api-socket: .* is not a socket/],
      [["restore", dir], /is not a snapshot: it has no state file/],
      [["restore", snap], /snapshot header: truncated/],
      [["restore", dir, "--cid", "2"], /--cid must be an integer from 3 to 4294967294/],
      [["restore", dir, "--mac", "01:00:00:00:00:01"], /--mac must be a unicast/],
      [["migrate", "--api-socket", "/x.sock"], /missing --to tcp:HOST:PORT/],
      [["migrate", "--api-socket", "/x.sock", "--to", "tcp:h:0"], /port out of 1..65535/],
      [["migrate", "--api-socket", "/x.sock", "--to", "unix:/m"], /--to must be tcp:HOST:PORT/],
      [["run", "--incoming", "tcp:localhost"], /--incoming: .*expected HOST:PORT/],
      [["run", "--incoming", "unix:/m.sock"], /--incoming must be tcp:HOST:PORT/],
      [["run", "--incoming", "tcp:127.0.0.1:4444", "x.bin"], /--incoming replaces IMAGE/],
      [["run", "--incoming", "tcp:127.0.0.1:4444", "--mem", "64"], /--mem does not apply/],
      [["run", "--api-socket", `${dir}/file`, "x.bin"], /--api-socket: .* is not a socket/],
      [["run", "--api-socket", `${dir}/${"s".repeat(110)}`, "x.bin"], /more than 107 bytes/],
    ];
    for (const [args, message] of cases) {
      const r = await cli(...args);
      assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
      assert.match(r.stderr, message, args.join(" "));
      assert.equal(r.stderr.trim().split("\n").length, 1, `one line: ${r.stderr}`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("pause with nobody on the socket exits 28; every command has help with its statuses", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvcli" });
  try {
    const r = await cli("pause", "--api-socket", `${dir}/none.sock`);
    assert.equal(r.code, 28, r.stderr);
    assert.match(r.stderr, /no control API answers at .*none\.sock/);
    for (const command of ["pause", "resume", "snapshot", "restore", "migrate"]) {
      const help = await cli(command, "--help");
      assert.equal(help.code, 0);
      assert.match(help.stdout, new RegExp(`^Usage: deno run -A main.ts ${command} `));
      assert.match(help.stdout, /Exit status:/);
    }
    const main = await cli("--help");
    assert.match(main.stdout, /main.ts pause\|resume --api-socket PATH/);
    assert.match(main.stdout, /28 no control API answers/);
    assert.match((await cli("run", "--help")).stdout, /--api-socket PATH/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

async function waitFor(what: string, ok: () => Promise<boolean>, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await ok())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * Waits for a `run --api-socket` child's socket. Generous: in kvmbox on a
 * loaded machine the child's start (Deno, the core, the image) has taken
 * over a minute.
 */
function waitForSocket(socket: string): Promise<void> {
  return waitFor("the API socket", async () => {
    try {
      return (await Deno.lstat(socket)).isSocket === true;
    } catch {
      return false;
    }
  }, 300_000);
}

kvmTest(
  "run --api-socket is paused and resumed by pause and resume from other processes",
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "dvcli" });
    const socket = `${dir}/vm.sock`;
    const image = `${dir}/ticker.bin`;
    await Deno.writeFile(image, await testGuest("ticker.S", { format: "flat" }));
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        MAIN,
        "run",
        "--mode",
        "user",
        "--no-stdin",
        "--timeout",
        "300000",
        "--api-socket",
        socket,
        image,
      ],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    // The guest's dots, as they arrive on the child's stdout.
    let dots = 0;
    const stdout = (async () => {
      for await (const chunk of child.stdout) dots += chunk.filter((b) => b === 0x2e).length;
    })();
    const stderr = new Response(child.stderr).text();
    try {
      await waitForSocket(socket);
      using client = new ApiClient(socket);
      await waitFor("the guest's output", () => Promise.resolve(dots > 2));
      assert.equal((await client.vm()).state, "running");

      // A second server on the live socket is refused before any VM starts.
      const second = await cli("run", "--mode", "user", "--api-socket", socket, image);
      assert.equal(second.code, 2, second.stderr);
      assert.match(second.stderr, /--api-socket: another server is listening on/);

      let r = await cli("pause", "--api-socket", socket);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stderr, /the VM is paused/);
      assert.equal((await client.vm()).state, "paused");
      const exits = (await client.metrics()).total.exits;
      const dotsWhenPaused = dots;
      await new Promise((r) => setTimeout(r, 1000));
      assert.equal((await client.metrics()).total.exits, exits, "no exits while paused");
      assert.equal(dots, dotsWhenPaused, "no output while paused");

      // A snapshot of the paused VM that leaves it paused.
      r = await cli("snapshot", "--api-socket", socket, "--to", `${dir}/snap`, "--stop");
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stderr, /snapshot written to .*snap \(the VM stays paused\)/);
      assert.equal((await client.vm()).state, "paused");
      assert.ok((await Deno.stat(`${dir}/snap/state`)).isFile);

      r = await cli("resume", "--api-socket", socket);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stderr, /the VM is running/);
      await waitFor("output after the resume", () => Promise.resolve(dots > dotsWhenPaused));
      assert.ok((await client.metrics()).total.exits > exits);

      await client.stop();
      const status = await child.status;
      await stdout;
      const log = await stderr;
      assert.equal(status.code, 0, log);
      assert.match(log, /stopped/);
      await assert.rejects(() => Deno.lstat(socket), Deno.errors.NotFound);
      r = await cli("resume", "--api-socket", socket);
      assert.equal(r.code, 28, r.stderr);
    } finally {
      try {
        child.kill("SIGKILL");
      } catch {
        // Already exited.
      }
      await child.status;
      await Deno.remove(dir, { recursive: true });
    }
  },
);

linuxTest(
  "run --kernel --api-socket: a Linux guest with a balloon is paused, resumed and stopped over the API",
  async () => {
    // Imported here: it fetches Debian's kernel, which only this test needs.
    const { busyboxInitramfs, debianVmlinux, fetchedPath } = await import("./_linux.ts");
    const dir = await Deno.makeTempDir({ prefix: "dvcli" });
    const socket = `${dir}/vm.sock`;
    const initrd = `${dir}/initrd.img`;
    await Deno.writeFile(
      initrd,
      await busyboxInitramfs([
        "/bin/busybox --install -s /bin",
        "i=0; while true; do i=$((i + 1)); echo tick-$i; sleep 0.2; done",
      ]),
    );
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        MAIN,
        "run",
        "--kernel",
        fetchedPath(debianVmlinux, "Debian's vmlinux"),
        "--initrd",
        initrd,
        "--cmdline",
        "console=ttyS0 panic=-1 rdinit=/init quiet",
        "--mem",
        "256",
        "--balloon",
        "--no-stdin",
        "--timeout",
        "600000",
        "--api-socket",
        socket,
      ],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    let out = "";
    const decoder = new TextDecoder();
    const reading = (async () => {
      for await (const chunk of child.stdout) out += decoder.decode(chunk, { stream: true });
    })();
    const stderr = new Response(child.stderr).text();
    const lastTick = () => Number([...out.matchAll(/tick-(\d+)/g)].at(-1)?.[1] ?? 0);
    try {
      await waitForSocket(socket);
      using client = new ApiClient(socket);
      await waitFor("the guest's ticks", () => Promise.resolve(lastTick() >= 3), 480_000);
      const info = await client.vm();
      assert.equal(info.state, "running");
      assert.equal(info.image?.format, "linux");
      assert.equal(info.config.interrupts, true);
      assert.ok(info.devices.pci.some((f) => f.name === "balloon0"), JSON.stringify(info.devices));

      let r = await cli("pause", "--api-socket", socket);
      assert.equal(r.code, 0, r.stderr);
      const paused = lastTick();
      await new Promise((r) => setTimeout(r, 1500));
      assert.ok(lastTick() <= paused + 1, `ticks went on while paused: ${paused} -> ${lastTick()}`);
      // A paused VM's devices take no runtime request (they may not touch
      // guest memory): the balloon answers BUSY until the resume.
      await assert.rejects(
        () => client.balloon(16),
        (e: unknown) =>
          e instanceof ApiError && e.status === 409 && e.apiCode === "BUSY" &&
          /the device is paused: resume the VM first/.test(e.message),
      );
      r = await cli("resume", "--api-socket", socket);
      assert.equal(r.code, 0, r.stderr);
      await waitFor("ticks after the resume", () => Promise.resolve(lastTick() > paused + 2));
      const stats = await client.balloon(16);
      assert.equal(stats.targetMib, 16);

      await client.stop();
      const status = await child.status;
      await reading;
      const log = await stderr;
      assert.equal(status.code, 0, `${log}\n${out.slice(-2000)}`);
      await assert.rejects(() => Deno.lstat(socket), Deno.errors.NotFound);
    } finally {
      try {
        child.kill("SIGKILL");
      } catch {
        // Already exited.
      }
      await child.status;
      await Deno.remove(dir, { recursive: true });
    }
  },
);
