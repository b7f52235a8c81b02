/**
 * `PUT /snapshot/load` and diff snapshots through the CLI and the API: a
 * `run --api-socket` process's VM replaced by a snapshot's (and refused when
 * it runs or the snapshot is bad), and full -> diff snapshots written by
 * `main.ts snapshot` that `main.ts restore` continues.
 *
 * The guest (`tests/guests/snapshot_count.S`) prints its round number as a
 * line of 8 hex digits per round, so its output is one known stream and any
 * stretch of it says where the guest was.
 */

import assert from "node:assert/strict";
import { ApiClient, ApiError } from "../src/api/client.ts";
import { handleApiRequest } from "../src/api/server.ts";
import { inspectSnapshot } from "../src/snapshot.ts";
import type { Vm } from "../src/vm.ts";
import { cli, kvmTest, MAIN, testGuest } from "./_helpers.ts";

/** The first `chars` characters of the guest's output. */
function countStream(chars: number): string {
  let s = "";
  for (let n = 1; s.length < chars; n++) s += n.toString(16).padStart(8, "0") + "\n";
  return s.slice(0, chars);
}

/** A `main.ts` process whose stdout is collected. */
class Child {
  readonly #proc: Deno.ChildProcess;
  out = "";
  readonly #reading: Promise<void>;
  readonly stderr: Promise<string>;
  exited = false;

  constructor(args: string[]) {
    const proc = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", MAIN, ...args],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).spawn();
    this.#proc = proc;
    const decoder = new TextDecoder();
    this.#reading = (async () => {
      for await (const chunk of proc.stdout) {
        this.out += decoder.decode(chunk, { stream: true });
      }
    })();
    this.stderr = new Response(proc.stderr).text();
    proc.status.then(() => (this.exited = true));
  }

  /** Waits for its API socket (its start takes a while in kvmbox); fails once it exits. */
  async socketUp(path: string): Promise<void> {
    const deadline = Date.now() + 300_000;
    for (;;) {
      try {
        if ((await Deno.lstat(path)).isSocket) return;
      } catch {
        // Not yet.
      }
      if (this.exited) throw new Error(`it exited before serving ${path}: ${await this.stderr}`);
      if (Date.now() > deadline) throw new Error(`no API socket at ${path}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  /** Waits for its output to pass `chars` characters. */
  async outputPast(chars: number, timeoutMs = 120_000): Promise<void> {
    await waitFor(`output past ${chars} characters`, () => this.out.length > chars, timeoutMs);
  }

  /** Its exit status, once its stdout is read to the end. */
  async status(): Promise<number> {
    const { code } = await this.#proc.status;
    await this.#reading;
    return code;
  }

  async kill(): Promise<void> {
    try {
      this.#proc.kill("SIGKILL");
    } catch {
      // Already exited.
    }
    await this.#proc.status;
    await this.#reading.catch(() => {});
    await this.stderr.catch(() => {});
  }
}

async function waitFor(what: string, ok: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Pauses over the API and waits for the console bytes already written to arrive. */
async function pauseAndSettle(client: ApiClient, child: Child): Promise<number> {
  await client.pause();
  await new Promise((r) => setTimeout(r, 700));
  return child.out.length;
}

function refused(status: number, code: string, message?: RegExp) {
  return (e: unknown) =>
    e instanceof ApiError && e.status === status && e.apiCode === code &&
    (message === undefined || message.test(e.message));
}

/** A VM that fails the test if anything reads it: bad requests must not reach the VM. */
const UNTOUCHABLE = new Proxy({}, {
  get(_target, key) {
    throw new Error(`the VM was touched (${String(key)})`);
  },
}) as unknown as Vm;

Deno.test("snapshot/create and snapshot/load check their bodies before any handler runs", async () => {
  const vm = UNTOUCHABLE;
  const calls: unknown[] = [];
  const handlers = {
    snapshot: (dir: string, o: unknown) => calls.push(["snapshot", dir, o]),
    restore: (dir: string, o: unknown) => calls.push(["restore", dir, o]),
  };
  const put = async (path: string, body: unknown) => {
    const r = await handleApiRequest(
      vm,
      new Request(`http://vm${path}`, { method: "PUT", body: JSON.stringify(body) }),
      { handlers },
    );
    return { status: r.status, body: await r.json() };
  };
  const bad: [string, unknown, RegExp][] = [
    ["/snapshot/create", { dir: "/d", diff: true }, /needs "parent"/],
    ["/snapshot/create", { dir: "/d", parent: "/p" }, /"parent" is for a diff/],
    ["/snapshot/create", { dir: "/d", snapshot_type: "Diff" }, /needs "parent"/],
    [
      "/snapshot/create",
      { dir: "/d", snapshot_type: "Full", diff: true, parent: "/p" },
      /disagree/,
    ],
    ["/snapshot/create", { dir: "/d", snapshot_type: "diff" }, /"Full" or "Diff"/],
    ["/snapshot/load", { dir: "/d", mode: "fast" }, /"lazy" or "eager"/],
    ["/snapshot/load", { mode: "lazy" }, /missing field "dir"/],
  ];
  for (const [path, body, message] of bad) {
    const r = await put(path, body);
    assert.equal(r.status, 400, JSON.stringify(body));
    assert.equal(r.body.code, "BAD_REQUEST");
    assert.match(r.body.message, message);
  }
  assert.deepEqual(calls, []);
  assert.equal(
    (await put("/snapshot/create", { dir: "/d", snapshot_type: "Diff", parent: "/p" })).status,
    200,
  );
  assert.equal(
    (await put("/snapshot/create", { dir: "/e", diff: true, parent: "/p" })).status,
    200,
  );
  assert.equal((await put("/snapshot/load", { dir: "/f" })).status, 200);
  assert.deepEqual(calls, [
    ["snapshot", "/d", { resume: true, parent: "/p" }],
    ["snapshot", "/e", { resume: true, parent: "/p" }],
    ["restore", "/f", { mode: "lazy" }],
  ]);
});

Deno.test("load and snapshot --diff check their arguments: status 2 and one line", async () => {
  const cases: [string[], RegExp][] = [
    [["load", "--from", "/d"], /missing --api-socket PATH \(see load --help\)/],
    [["load", "--api-socket", "/x.sock"], /missing --from DIR/],
    [
      ["load", "--api-socket", "/x.sock", "--from", "/d", "--lazy", "--eager"],
      /exclude each other/,
    ],
    [["snapshot", "--api-socket", "/x.sock", "--to", "/d", "--diff"], /--diff needs --parent PDIR/],
    [["snapshot", "--api-socket", "/x.sock", "--to", "/d", "--parent", "/p"], /add --diff/],
    [["run", "--incoming", "tcp:127.0.0.1:4444", "--track-dirty-pages"], /does not apply/],
  ];
  for (const [args, message] of cases) {
    const r = await cli(...args);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, message, args.join(" "));
    assert.equal(r.stderr.trim().split("\n").length, 1, `one line: ${r.stderr}`);
  }
  const help = await cli("load", "--help");
  assert.equal(help.code, 0);
  assert.match(help.stdout, /^Usage: deno run -A main.ts load --api-socket PATH --from DIR/);
  assert.match(help.stdout, /Exit status:/);
  assert.match((await cli("--help")).stdout, /main.ts load --api-socket PATH --from DIR/);
  assert.match((await cli("run", "--help")).stdout, /--track-dirty-pages/);
});

kvmTest(
  "PUT /snapshot/load replaces a paused run --api-socket VM by the snapshot's, which continues from its point; a running VM or a bad snapshot is refused and the VM runs on",
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "dvload" });
    const socket = `${dir}/vm.sock`;
    const image = `${dir}/count.elf`;
    await Deno.writeFile(image, await testGuest("snapshot_count.S"));
    const child = new Child([
      "run",
      "--mode",
      "user",
      "--mem",
      "4",
      "--no-stdin",
      "--timeout",
      "600000",
      "--api-socket",
      socket,
      image,
    ]);
    try {
      await child.socketUp(socket);
      using client = new ApiClient(socket, { timeoutMs: 300_000 });
      await child.outputPast(3 * 9);

      // Running: refused before the snapshot is even looked at.
      await assert.rejects(
        client.load(`${dir}/none`),
        refused(409, "BUSY", /the VM is running: pause it/),
      );

      const k = await pauseAndSettle(client, child);
      await client.snapshot(`${dir}/snap`, { resume: false });
      await client.resume();
      await child.outputPast(k + 10 * 9);

      // A diff needs tracking, which this process does not have.
      const diff = await cli(
        "snapshot",
        "--api-socket",
        socket,
        "--to",
        `${dir}/d1`,
        "--diff",
        "--parent",
        `${dir}/snap`,
      );
      assert.equal(diff.code, 30, diff.stderr);
      assert.match(diff.stderr, /needs dirty-page tracking.*--track-dirty-pages/);

      // A corrupted copy, a missing directory: refused, the VM stays.
      await Deno.mkdir(`${dir}/bad`);
      const state = await Deno.readFile(`${dir}/snap/state`);
      state[Math.floor(state.length / 2)] ^= 0xff;
      await Deno.writeFile(`${dir}/bad/state`, state);
      await Deno.copyFile(`${dir}/snap/memory`, `${dir}/bad/memory`);
      await client.pause();
      await assert.rejects(
        client.load(`${dir}/bad`),
        refused(400, "SNAPSHOT_INVALID", /corrupted|checksum/),
      );
      await assert.rejects(client.load(`${dir}/none`), refused(400, "SNAPSHOT_INVALID"));
      const r = await cli("load", "--api-socket", socket, "--from", `${dir}/bad`);
      assert.equal(r.code, 30, r.stderr);
      assert.match(r.stderr, /load refused: SNAPSHOT_INVALID/);
      assert.equal((await client.vm()).state, "paused");
      await client.resume();
      const before = child.out.length;
      await child.outputPast(before + 5 * 9);

      // The load: the process runs the snapshot's VM from its point.
      const m = await pauseAndSettle(client, child);
      assert.ok(m > k + 10 * 9);
      const loaded = await cli("load", "--api-socket", socket, "--from", `${dir}/snap`);
      assert.equal(loaded.code, 0, loaded.stderr);
      assert.match(loaded.stderr, /the VM now runs the snapshot .*snap \(lazy\)/);
      await child.outputPast(m + 10 * 9);
      const info = await client.vm();
      assert.equal(info.state, "running");
      // The API serves the new VM: it pauses and resumes.
      const p = await pauseAndSettle(client, child);
      await client.resume();
      await child.outputPast(p + 3 * 9);
      await client.stop();
      assert.equal(await child.status(), 0, await child.stderr);
      const out = child.out;
      assert.equal(out.slice(0, m), countStream(m), "the output before the load");
      const after = out.slice(m);
      assert.equal(after, countStream(k + after.length).slice(k), "the output after the load");
      assert.doesNotMatch(out, /MISMATCH/);
    } finally {
      await child.kill();
      await Deno.remove(dir, { recursive: true });
    }
  },
);

kvmTest(
  "run --track-dirty-pages: snapshot --to full, then snapshot --diff --parent full through the CLI; restore of the diff continues from its point, and loads the full one over the API",
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "dvdiff" });
    const socket = `${dir}/vm.sock`;
    const image = `${dir}/count.elf`;
    await Deno.writeFile(image, await testGuest("snapshot_count.S"));
    const child = new Child([
      "run",
      "--mode",
      "user",
      "--mem",
      "4",
      "--no-stdin",
      "--timeout",
      "600000",
      "--track-dirty-pages",
      "--api-socket",
      socket,
      image,
    ]);
    let restored: Child | undefined;
    try {
      await child.socketUp(socket);
      using client = new ApiClient(socket, { timeoutMs: 300_000 });
      await child.outputPast(3 * 9);
      const kFull = await pauseAndSettle(client, child);
      let r = await cli("snapshot", "--api-socket", socket, "--to", `${dir}/full`, "--stop");
      assert.equal(r.code, 0, r.stderr);
      await client.resume();
      await child.outputPast(kFull + 5 * 9);
      const k = await pauseAndSettle(client, child);
      r = await cli(
        "snapshot",
        "--api-socket",
        socket,
        "--to",
        `${dir}/d1`,
        "--diff",
        "--parent",
        `${dir}/full`,
        "--stop",
      );
      assert.equal(r.code, 0, r.stderr);
      assert.match(
        r.stderr,
        /diff snapshot \(against .*full\) written to .*d1 \(the VM stays paused\)/,
      );
      const info = await inspectSnapshot(`${dir}/d1`);
      assert.equal(info.memory.kind, "diff");
      // The guest wrote one page of data (and its stack, page tables): a few pages.
      const pages = (info.memory.pages ?? []).reduce((n, [, count]) => n + count, 0);
      assert.ok(pages >= 1 && pages <= 16, `pages in the diff: ${pages}`);
      assert.equal((await Deno.stat(`${dir}/d1/memory`)).size, pages * 4096);
      await client.stop();
      assert.equal(await child.status(), 0, await child.stderr);
      assert.equal(child.out.slice(0, k), countStream(k));

      const socket2 = `${dir}/vm2.sock`;
      restored = new Child(["restore", `${dir}/d1`, "--no-stdin", "--api-socket", socket2]);
      await restored.socketUp(socket2);
      await restored.outputPast(10 * 9);
      using client2 = new ApiClient(socket2, { timeoutMs: 300_000 });
      // A restore --api-socket process loads too: back to the full snapshot's point.
      const k2 = await pauseAndSettle(client2, restored);
      await client2.load(`${dir}/full`, { mode: "eager" });
      await restored.outputPast(k2 + 5 * 9);
      await client2.stop();
      assert.equal(await restored.status(), 0, await restored.stderr);
      const out = restored.out;
      assert.equal(out.slice(0, k2), countStream(k + k2).slice(k), "the restored diff's output");
      const loaded = out.slice(k2);
      assert.equal(loaded, countStream(kFull + loaded.length).slice(kFull), "after the load");
    } finally {
      await child.kill();
      await restored?.kill();
      await Deno.remove(dir, { recursive: true });
    }
  },
);
