/**
 * Live migration (`migrateVm` / `receiveMigration`, `main.ts run --incoming`,
 * `main.ts migrate`): a guest migrated mid-run over loopback TCP or a Unix
 * socket ends exactly as an unmigrated run does (console and a digest of its
 * RAM); a guest dirtying memory continuously takes several pre-copy rounds;
 * a refused, interrupted or corrupt migration leaves the source VM running
 * (its work completes, its dirty log is off) and the target process gone
 * with a non-zero status and its listener closed.
 */

import assert from "node:assert/strict";

import { DenovisorError, type DeviceConfig, Vm } from "../mod.ts";
import { migrateVm, receiveMigration } from "../src/migration/migrate.ts";
import { FrameReader, jsonFrame, jsonOf, writeAll } from "../src/migration/wire.ts";
import { kvmTest, MAIN, testGuest } from "./_helpers.ts";

const TIMEOUT_MS = 300_000;
const IO_TIMEOUT_MS = 120_000;

interface Outcome {
  reason: string;
  console: string;
  report: number[] | null;
}

function outcome(r: { reason: string; console: string; report?: Uint8Array }): Outcome {
  return { reason: r.reason, console: r.console, report: r.report ? Array.from(r.report) : null };
}

async function uninterrupted(image: Uint8Array, memoryMiB: number): Promise<Outcome> {
  using vm = await Vm.create({ memoryMiB });
  vm.load(image, { mode: "user" });
  return outcome(await vm.run({ timeoutMs: TIMEOUT_MS }));
}

/** The dirtying guest (8 MiB) and its unmigrated outcome, computed once: it runs long enough
 * (seconds, even under kvmbox) for a failed migration to end while it still runs. */
let dirtyGuest: Promise<{ image: Uint8Array; expected: Outcome }> | undefined;
function longGuest(): Promise<{ image: Uint8Array; expected: Outcome }> {
  dirtyGuest ??= (async () => {
    const image = await testGuest("migrate_dirty.S");
    return { image, expected: await uninterrupted(image, 8) };
  })();
  return dirtyGuest;
}

/** A free loopback TCP port. */
function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/** Starts `image` and waits until it has written `atLeast` console characters. */
async function started(
  image: Uint8Array,
  memoryMiB: number,
  atLeast: number,
  devices: DeviceConfig[] = [],
) {
  const vm = await Vm.create({ memoryMiB, devices, interrupts: devices.length > 0 });
  vm.load(image, { mode: "user" });
  const run = vm.run({ timeoutMs: TIMEOUT_MS });
  run.catch(() => {});
  let seen = 0;
  while (seen < atLeast) {
    await new Promise((r) => setTimeout(r, 5));
    seen += vm.readConsole().length;
  }
  return { vm, run };
}

/** Migrates `image` mid-run to a target in this process; returns both halves. */
async function migrateInProcess(
  image: Uint8Array,
  memoryMiB: number,
  address: string,
  options: Parameters<typeof migrateVm>[2] = {},
) {
  let listening!: () => void;
  const isListening = new Promise<void>((r) => (listening = r));
  const receiving = receiveMigration(address, {
    timeoutMs: IO_TIMEOUT_MS,
    onListening: () => listening(),
  });
  receiving.catch(() => {});
  await isListening;
  const { vm: source, run } = await started(image, memoryMiB, 4);
  try {
    const stats = await migrateVm(source, address, { timeoutMs: IO_TIMEOUT_MS, ...options });
    const before = await run;
    using target = await receiving;
    const after = await target.run({ timeoutMs: TIMEOUT_MS });
    return { stats, before: outcome(before), after: outcome(after) };
  } finally {
    source.close();
  }
}

kvmTest(
  "a guest migrated mid-run over loopback TCP and over a Unix socket ends as an unmigrated run",
  async () => {
    const { image, expected } = await longGuest();
    assert.equal(expected.reason, "guest_exit");
    const dir = await Deno.makeTempDir({ prefix: "dv-migrate-" });
    try {
      for (const address of [`tcp:127.0.0.1:${freePort()}`, `unix:${dir}/m.sock`]) {
        // The guest dirties its pages faster than they move: bound the rounds so
        // the migration ends well before the guest does.
        const { stats, before, after } = await migrateInProcess(image, 8, address, {
          maxRounds: 2,
        });
        assert.equal(before.reason, "stopped", `${address}: the source stops once the target runs`);
        assert.equal(after.reason, "guest_exit", address);
        assert.ok(before.console.length < expected.console.length, "migrated mid-run");
        assert.equal(before.console + after.console, expected.console, `${address}: console`);
        assert.deepEqual(after.report, expected.report, `${address}: the digest of guest RAM`);
        assert.equal(stats.rounds[0].round, 0);
        assert.ok(
          stats.rounds[0].pages > 0 && stats.rounds[0].pages < 2048,
          "zero pages stay home",
        );
        assert.ok(stats.downtimeMs > 0 && stats.downtimeMs <= stats.totalMs);
        assert.equal(stats.pages, stats.rounds.reduce((n, r) => n + r.pages, 0));
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

kvmTest(
  "a VM with a vsock device migrates within one host: the target takes its socket path, the source's close leaves it",
  async () => {
    const { image, expected } = await longGuest();
    const dir = await Deno.makeTempDir({ prefix: "dv-migrate-vsock-" });
    const path = `${dir}/v.sock`;
    const address = `unix:${dir}/m.sock`;
    try {
      let listening!: () => void;
      const isListening = new Promise<void>((r) => (listening = r));
      const receiving = receiveMigration(address, {
        timeoutMs: IO_TIMEOUT_MS,
        onListening: () => listening(),
      });
      receiving.catch(() => {});
      await isListening;
      const { vm: source, run } = await started(image, 8, 4, [{ kind: "vsock", cid: 3, path }]);
      try {
        // The target is built while the source listens on `path`: it must not
        // need the path until the source hands it over at stop-and-copy.
        await migrateVm(source, address, { timeoutMs: IO_TIMEOUT_MS, maxRounds: 2 });
        const before = outcome(await run);
        using target = await receiving;
        source.close();
        assert.ok((await Deno.lstat(path)).isSocket, "the path survives the source's close");
        (await Deno.connect({ transport: "unix", path })).close();
        const after = outcome(await target.run({ timeoutMs: TIMEOUT_MS }));
        assert.equal(before.console + after.console, expected.console);
        assert.equal(after.reason, "guest_exit");
      } finally {
        source.close();
      }
      await assert.rejects(Deno.lstat(path), Deno.errors.NotFound, "the target's close removes it");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

kvmTest(
  "a guest dirtying its memory continuously takes several pre-copy rounds and ends as an unmigrated run",
  async () => {
    const { image, expected } = await longGuest();
    assert.equal(expected.reason, "guest_exit");
    const { stats, before, after } = await migrateInProcess(
      image,
      8,
      `tcp:127.0.0.1:${freePort()}`,
      { thresholdPages: 8, downtimeMs: 0, maxRounds: 3 },
    );
    assert.equal(before.reason, "stopped");
    assert.equal(after.reason, "guest_exit", after.console);
    assert.equal(before.console + after.console, expected.console);
    assert.deepEqual(after.report, expected.report, "the digest of every dirtied page");
    assert.ok(stats.rounds.length >= 3, `rounds: ${JSON.stringify(stats.rounds)}`);
    assert.ok(stats.rounds.slice(1, -1).every((r) => r.pages > 8), "dirty rounds moved pages");
  },
);

/** A source VM whose migration fails must end its work as if nothing happened. */
async function assertRunsOn(
  source: Vm,
  run: Promise<{ reason: string; console: string; report?: Uint8Array }>,
  expected: Outcome,
) {
  assert.equal(source.state, "running", "the source VM runs on");
  assert.throws(() => source.takeDirtyPages(), DenovisorError, "the dirty log is off");
  const result = outcome(await run);
  assert.equal(result.reason, "guest_exit", result.console);
  assert.equal(result.console, expected.console, "the guest's work completed here");
  assert.deepEqual(result.report, expected.report);
}

kvmTest("a target that refuses the migration leaves the source VM running", async () => {
  const { image, expected } = await longGuest();
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const fakeTarget = (async () => {
    using conn = await listener.accept();
    const hello = jsonOf(await new FrameReader(conn).expect("hello"));
    await writeAll(conn, jsonFrame("abort", { message: "this host has another CPU" }));
    return hello;
  })();
  const { vm: source, run } = await started(image, 8, 1);
  try {
    await assert.rejects(
      migrateVm(source, `tcp:127.0.0.1:${port}`, { timeoutMs: IO_TIMEOUT_MS }),
      (e: DenovisorError) => e.code === "MIGRATION" && /another CPU/.test(e.message),
    );
    const hello = await fakeTarget;
    assert.equal(hello.version, 1);
    assert.equal(hello.memoryBytes, 8 << 20);
    assert.equal((hello.host as { vendor: string }).vendor.length, 12, "the host section came");
    await assertRunsOn(source, run, expected);
  } finally {
    listener.close();
    source.close();
  }
});

/** A child process whose output is collected as it comes. */
interface Child {
  /** The output so far. */
  stdout(): string;
  /** The error output so far. */
  stderr(): string;
  /** Resolves once `text` shows on stderr. */
  waitStderr(text: string, timeoutMs?: number): Promise<void>;
  /** Its end: status and all its output. */
  done: Promise<{ code: number; stdout: string; stderr: string }>;
  kill(): void;
}

function spawnChild(args: string[]): Child {
  const proc = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
    env: { NO_COLOR: "1" },
  }).spawn();
  let out = "";
  let err = "";
  const pump = async (stream: ReadableStream<Uint8Array>, add: (t: string) => void) => {
    const decoder = new TextDecoder();
    for await (const chunk of stream) add(decoder.decode(chunk, { stream: true }));
  };
  const pumped = Promise.all([
    pump(proc.stdout, (t) => (out += t)),
    pump(proc.stderr, (t) => (err += t)),
  ]);
  let exited = false;
  const done = (async () => {
    const status = await proc.status;
    exited = true;
    await pumped;
    return { code: status.code, stdout: out, stderr: err };
  })();
  return {
    stdout: () => out,
    stderr: () => err,
    async waitStderr(text: string, timeoutMs = 120_000) {
      const until = performance.now() + timeoutMs;
      while (!err.includes(text)) {
        if (exited || performance.now() > until) {
          throw new Error(`no "${text}" on stderr (exited: ${exited}): ${err}`);
        }
        await new Promise((r) => setTimeout(r, 20));
      }
    },
    done,
    kill() {
      if (exited) return;
      try {
        proc.kill();
      } catch {
        // exited meanwhile
      }
    },
  };
}

/** `main.ts run --incoming ADDRESS`, once it listens (a probe connection would be taken
 * for the source: it waits for its stderr line instead). */
async function spawnTarget(address: string, extra: string[] = []): Promise<Child> {
  const target = spawnChild(["run", "--incoming", address, "--no-stdin", ...extra]);
  try {
    await target.waitStderr("waiting for a migrating VM");
  } catch (e) {
    target.kill();
    throw e;
  }
  return target;
}

/**
 * A TCP proxy in front of a target: forwards source → target, and after
 * `cutAfter` bytes either cuts both connections or flips one byte.
 */
function proxy(targetPort: number, cutAfter: number, mode: "cut" | "flip") {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const done = (async () => {
    const source = await listener.accept();
    listener.close();
    const target = await Deno.connect({ hostname: "127.0.0.1", port: targetPort });
    // Either side ending ends both, as a real cut would.
    let closed = false;
    const closeBoth = () => {
      if (closed) return;
      closed = true;
      for (const c of [source, target]) {
        try {
          c.close();
        } catch {
          // closed already
        }
      }
    };
    const back = (async () => {
      const buf = new Uint8Array(65536);
      for (;;) {
        const n = await target.read(buf).catch(() => null);
        if (n === null) break;
        if (!(await writeAll(source, buf.subarray(0, n)).then(() => true, () => false))) break;
      }
      closeBoth();
    })();
    let seen = 0;
    let flipped = false;
    const buf = new Uint8Array(65536);
    for (;;) {
      const n = await source.read(buf).catch(() => null);
      if (n === null) break;
      const chunk = buf.subarray(0, n);
      if (seen + n > cutAfter && !flipped) {
        if (mode === "cut") {
          await writeAll(target, chunk.subarray(0, cutAfter - seen)).catch(() => {});
          break;
        }
        chunk[cutAfter - seen] ^= 0x40;
        flipped = true;
      }
      seen += n;
      if (!(await writeAll(target, chunk).then(() => true, () => false))) break;
    }
    closeBoth();
    await back;
  })();
  done.catch(() => {});
  return { port: (listener.addr as Deno.NetAddr).port, done };
}

for (const mode of ["cut", "flip"] as const) {
  kvmTest(
    mode === "cut"
      ? "a migration whose connection is cut mid-stream leaves the source running and the target process gone"
      : "a migration corrupted by one flipped byte leaves the source running and the target process gone",
    async () => {
      const { image, expected } = await longGuest();
      const targetPort = freePort();
      const target = await spawnTarget(`tcp:127.0.0.1:${targetPort}`);
      // Past the hello, inside the first pages frame.
      const p = proxy(targetPort, 20_000, mode);
      const { vm: source, run } = await started(image, 8, 1);
      try {
        await assert.rejects(
          migrateVm(source, `tcp:127.0.0.1:${p.port}`, { timeoutMs: 60_000 }),
          (e: DenovisorError) => e.code === "MIGRATION",
        );
        await assertRunsOn(source, run, expected);
        const out = await target.done;
        const stderr = out.stderr;
        assert.notEqual(out.code, 0, stderr);
        assert.equal(out.stdout, "", "the target ran nothing");
        if (mode === "flip") assert.match(stderr, /checksum|refused/);
        await assert.rejects(
          Deno.connect({ hostname: "127.0.0.1", port: targetPort }),
          "the target's listener is closed",
        );
        await p.done;
      } finally {
        source.close();
        target.kill();
      }
    },
  );
}

kvmTest(
  "run --incoming refuses a migration from another host before any memory moves, and exits non-zero",
  async () => {
    const port = freePort();
    const target = await spawnTarget(`tcp:127.0.0.1:${port}`);
    // A source whose host section says another CPU vendor.
    using vm = await Vm.create({ memoryMiB: 4 });
    vm.load(await testGuest("snapshot_walk.S"), { mode: "user" });
    vm.pause();
    const host = vm.kvm.migrationHost() as { vendor: string };
    host.vendor = "NotThisCpu!!";
    using conn = await Deno.connect({ hostname: "127.0.0.1", port });
    await writeAll(
      conn,
      jsonFrame("hello", {
        version: 1,
        config: JSON.parse(vm.migrationConfig()),
        memoryBytes: vm.memoryBytes,
        host,
      }),
    );
    const answer = await new FrameReader(conn).expect("abort");
    assert.match(String(jsonOf(answer).message), /NotThisCpu/);
    const out = await target.done;
    assert.notEqual(out.code, 0);
    assert.match(out.stderr, /vendor/);
  },
);

kvmTest(
  "main.ts migrate moves a running guest from run --api-socket to run --incoming; the source exits 0",
  async () => {
    // ticker.S writes '.' forever: the test does not race the guest's end.
    const image = await testGuest("ticker.S", { format: "flat" });
    const dir = await Deno.makeTempDir({ prefix: "dv-migrate-cli-" });
    try {
      await Deno.writeFile(`${dir}/ticker.bin`, image);
      const port = freePort();
      const targetSock = `${dir}/target.sock`;
      const target = await spawnTarget(`tcp:127.0.0.1:${port}`, ["--api-socket", targetSock]);
      const sock = `${dir}/vm.sock`;
      const source = spawnChild([
        "run",
        "--mem",
        "4",
        "--format",
        "flat",
        "--mode",
        "user",
        "--no-stdin",
        "--api-socket",
        sock,
        `${dir}/ticker.bin`,
      ]);
      try {
        while (source.stdout().length < 3) {
          await new Promise((r) => setTimeout(r, 20));
        }
        const migrate = await new Deno.Command(Deno.execPath(), {
          args: [
            "run",
            "-A",
            MAIN,
            "migrate",
            "--api-socket",
            sock,
            "--to",
            `tcp:127.0.0.1:${port}`,
          ],
          stdout: "piped",
          stderr: "piped",
          stdin: "null",
        }).output();
        assert.equal(migrate.code, 0, new TextDecoder().decode(migrate.stderr));
        const src = await source.done;
        assert.equal(src.code, 0, src.stderr);
        assert.match(src.stdout, /^\.+$/);
        // The target ticks on where the source stopped.
        const until = performance.now() + 120_000;
        while (target.stdout().length < 3 && performance.now() < until) {
          await new Promise((r) => setTimeout(r, 20));
        }
        assert.match(target.stdout(), /^\.{3,}$/, target.stderr());
        // The migrated VM is run's in every way: its API snapshots it too.
        const snapshot = await new Deno.Command(Deno.execPath(), {
          args: ["run", "-A", MAIN, "snapshot", "--api-socket", targetSock, "--to", `${dir}/s`],
          stdout: "piped",
          stderr: "piped",
          stdin: "null",
        }).output();
        assert.equal(snapshot.code, 0, new TextDecoder().decode(snapshot.stderr));
        assert.ok((await Deno.stat(`${dir}/s/state`)).isFile);
        target.kill();
        await target.done;
      } finally {
        source.kill();
        target.kill();
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
