/**
 * The host side of the network tests and of `bench/net_bench.ts`: `/dev/net/tun`
 * (inside kvmbox, Debian's `tun.ko` is inserted first), a network namespace of
 * the caller's own with an optional TAP in it, removed on dispose, and the
 * TCP peer (`tests/_net_peer.ts`) started inside that namespace. Needs root.
 *
 * @module
 */

import { fetchDebianModules } from "../src/linux/modules.ts";
import { busybox, fetchedModules, fetchedPath } from "./_linux.ts";

const PEER = new URL("./_net_peer.ts", import.meta.url).pathname;

/**
 * Debian's `tun` module, fetched when this module loads: on the host, where
 * the network is (the test command loads every test module there before the
 * `[linux]` tests run inside kvmbox, which has none).
 */
const TUN_MODULE = await fetchDebianModules(["tun"]).catch((e) => ({
  ok: false as const,
  reason: e instanceof Error ? e.message : String(e),
}));

/**
 * Runs a command to its end.
 *
 * @param cmd The executable.
 * @param args Its arguments.
 * @returns Its stdout and stderr, together.
 * @throws {Error} When it fails, with that output.
 * @example
 * ```ts
 * import { runChecked } from "./_netns.ts";
 * console.log(await runChecked("ip", "netns", "list"));
 * ```
 */
export async function runChecked(cmd: string, ...args: string[]): Promise<string> {
  const out = await new Deno.Command(cmd, { args, stdin: "null", stdout: "piped", stderr: "piped" })
    .output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  if (!out.success) throw new Error(`${cmd} ${args.join(" ")} failed (${out.code}): ${text}`);
  return text;
}

function haveTun(): boolean {
  try {
    Deno.statSync("/dev/net/tun");
    return true;
  } catch {
    return false;
  }
}

/**
 * Makes sure `/dev/net/tun` exists: where it does not (kvmbox's kernel loads
 * no `tun` module), inserts Debian's `tun.ko` for the same kernel with
 * busybox's `insmod` and waits for the device node.
 *
 * @throws {Error} When the module cannot be had or the node does not appear.
 * @example
 * ```ts
 * import { ensureTun } from "./_netns.ts";
 * await ensureTun();
 * ```
 */
export async function ensureTun(): Promise<void> {
  if (haveTun()) return;
  const bb = fetchedPath(busybox, "busybox");
  for (const m of fetchedModules(TUN_MODULE)) await runChecked(bb, "insmod", m.path);
  for (let i = 0; i < 100; i++) {
    if (haveTun()) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error("/dev/net/tun did not appear after inserting tun.ko");
}

/** A TAP to create inside a namespace. */
export interface NetnsTap {
  /** The TAP's name. */
  name: string;
  /** Its address on the host side, `A.B.C.D/N`. */
  address: string;
}

/** A network namespace made by {@link createNetns}; disposing of it deletes it. */
export interface Netns extends AsyncDisposable {
  /** Its name (`/run/netns/NAME`). */
  readonly name: string;
  /**
   * The argument vector that runs `cmd args` inside the namespace
   * (`ip netns exec NAME cmd args`), for `Deno.Command`.
   *
   * @param cmd The executable.
   * @param args Its arguments.
   * @returns `["ip", [...]]`.
   */
  exec(cmd: string, args: readonly string[]): [string, string[]];
}

/**
 * Creates network namespace `name` with its loopback up and, when asked, a TAP
 * in it that is up and has an address. `await using` deletes the namespace
 * again (with every device in it), also when the caller throws.
 *
 * @param name The namespace's name.
 * @param tap A TAP to create inside it.
 * @returns The namespace.
 * @throws {Error} When `ip` refuses (not root, the name is taken); nothing is
 *   left behind then.
 * @example
 * ```ts
 * import { createNetns } from "./_netns.ts";
 * await using ns = await createNetns("demo", { name: "tap0", address: "10.77.0.1/24" });
 * const [cmd, args] = ns.exec("ip", ["addr"]);
 * console.log(await new Deno.Command(cmd, { args }).output());
 * ```
 */
export async function createNetns(name: string, tap?: NetnsTap): Promise<Netns> {
  await runChecked("ip", "netns", "add", name);
  const netns: Netns = {
    name,
    exec: (cmd, args) => ["ip", ["netns", "exec", name, cmd, ...args]],
    async [Symbol.asyncDispose]() {
      await runChecked("ip", "netns", "del", name).catch(() => {});
    },
  };
  try {
    await runChecked("ip", "-n", name, "link", "set", "lo", "up");
    if (tap) {
      await runChecked("ip", "-n", name, "tuntap", "add", "dev", tap.name, "mode", "tap");
      await runChecked("ip", "-n", name, "addr", "add", tap.address, "dev", tap.name);
      await runChecked("ip", "-n", name, "link", "set", tap.name, "up");
    }
  } catch (e) {
    await netns[Symbol.asyncDispose]();
    throw e;
  }
  return netns;
}

/** What a peer reports at its end. */
export interface NetPeerResult {
  /** Bytes it read (sink) or wrote (source). */
  bytes: number;
  /** Their SHA-256, hex. */
  sha256: string;
  /** Milliseconds: sink, first byte to last; source, connection to the guest's second connection. */
  ms: number;
}

/** A running {@link startNetPeer}. */
export interface NetPeer {
  /** Its report, once it has ended. */
  done: Promise<NetPeerResult>;
  /** Ends it early. */
  kill(): void;
}

/**
 * Starts `tests/_net_peer.ts` inside namespace `ns` listening on
 * `address:port`, and resolves once it listens: a `sink` that reads `bytes`
 * from one connection, or a `source` that writes `bytes` to one connection and
 * then waits for a connection on `port + 1` (the guest's "I have it all").
 *
 * @param ns The namespace (its name).
 * @param mode `sink` or `source`.
 * @param address The address to listen on (the TAP's).
 * @param port The TCP port.
 * @param bytes How many bytes to expect or send.
 * @returns The running peer.
 * @throws {Error} When it ends before listening.
 * @example
 * ```ts
 * import { startNetPeer } from "./_netns.ts";
 * const sink = await startNetPeer("demo", "sink", "10.77.0.1", 5001, 1 << 20);
 * console.log(await sink.done); // { bytes, sha256, ms }
 * ```
 */
export async function startNetPeer(
  ns: string,
  mode: "sink" | "source",
  address: string,
  port: number,
  bytes: number,
): Promise<NetPeer> {
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
      address,
      `${port}`,
      `${bytes}`,
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  while (!text.includes("LISTENING\n")) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`the ${mode} peer ended before listening: ${text}`);
    text += value;
  }
  const done = (async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text = (text + value).slice(-4096);
    }
    await child.status;
    const m = /^(\d+) ([0-9a-f]{64}) ([\d.]+)$/m.exec(text);
    if (!m) throw new Error(`the ${mode} peer said: ${text}`);
    return { bytes: Number(m[1]), sha256: m[2], ms: Number(m[3]) };
  })();
  return {
    done,
    kill() {
      done.catch(() => {}); // killed: its report is not wanted
      try {
        child.kill("SIGKILL");
      } catch {
        // It ended already.
      }
    },
  };
}
