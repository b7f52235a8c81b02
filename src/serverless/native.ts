/**
 * The same function run natively: a host subprocess per request (fork + exec
 * of the same static ELF, the same argv, env and stdin), with the time and
 * output limits enforced from outside. It is what the overhead model compares
 * the VM against, and the "served natively" side of `bench/fn_http_bench.ts`.
 *
 * **A native run is not isolated**: the program runs on the host as this
 * process's user, sees the host's files (not the function's file set) and
 * has no memory limit. Use it only for code you trust.
 *
 * {@link NATIVE_BACKEND} has the shape of the KVM backend, so the pool and
 * the service serve native functions the same way.
 *
 * @module
 */

import { basename, join } from "node:path";
import { DenovisorError } from "../errors.ts";
import type {
  FunctionBackend,
  FunctionReady,
  FunctionStartOptions,
  FunctionVm,
  InvokeOptions,
  InvokeResult,
} from "./backend.ts";

/** Linux x86-64 numbers of the signals a program may die of. */
const SIGNAL_NUMBERS: Partial<Record<Deno.Signal, number>> = {
  SIGHUP: 1,
  SIGINT: 2,
  SIGQUIT: 3,
  SIGILL: 4,
  SIGTRAP: 5,
  SIGABRT: 6,
  SIGBUS: 7,
  SIGFPE: 8,
  SIGKILL: 9,
  SIGUSR1: 10,
  SIGSEGV: 11,
  SIGUSR2: 12,
  SIGPIPE: 13,
  SIGALRM: 14,
  SIGTERM: 15,
  SIGXCPU: 24,
  SIGXFSZ: 25,
  SIGSYS: 31,
};

/** The buffers a native run has: as large as the limits it is given. */
const NATIVE_CAPACITY = 256 * 1024 * 1024;

/** The file the snapshot of a native function keeps its settings in. */
const META_FILE = "native.json";

interface NativeMeta {
  executable: string;
  argv: string[];
  env: string[];
}

/** Reads `stream` into `chunks` while the shared budget lasts; true when it ran out. */
async function drain(
  stream: ReadableStream<Uint8Array>,
  chunks: Uint8Array[],
  budget: { left: number },
  onOverflow: () => void,
): Promise<boolean> {
  const reader = stream.getReader();
  try {
    while (true) {
      const { done, value } = await reader.read();
      if (done) return false;
      if (value.length > budget.left) {
        chunks.push(value.subarray(0, budget.left));
        budget.left = 0;
        onOverflow();
        await reader.cancel().catch(() => {});
        return true;
      }
      budget.left -= value.length;
      chunks.push(value);
    }
  } catch {
    return false;
  }
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/**
 * Runs a program once as a host subprocess with `input` as its stdin, within
 * a time and an output limit (the process is killed at either).
 *
 * @param executable The program's path.
 * @param argv Its arguments; `argv[0]` is not passed (the process sees the path).
 * @param env Its whole environment, `NAME=value` strings.
 * @param input Its stdin.
 * @param options `timeoutMs` (default 10 s) and `outputLimit` (stdout + stderr, default 1 MiB).
 * @returns What it did, in the shape of an invocation (`runNs` = spawn to exit).
 * @throws {DenovisorError} `IO` when the program cannot be started.
 * @example
 * ```ts
 * import { runNative } from "denovisor/src/serverless/native.ts";
 * const r = await runNative("/bin/cat", ["cat"], [], new TextEncoder().encode("hi"));
 * console.log(r.status, new TextDecoder().decode(r.stdout)); // done hi
 * ```
 */
export async function runNative(
  executable: string,
  argv: readonly string[],
  env: readonly string[],
  input: Uint8Array,
  options: InvokeOptions = {},
): Promise<InvokeResult> {
  const timeoutMs = options.timeoutMs || 10_000;
  const outputLimit = options.outputLimit || 1024 * 1024;
  const started = performance.now();
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command(executable, {
      args: argv.slice(1),
      clearEnv: true,
      env: Object.fromEntries(env.map((e) => {
        const eq = e.indexOf("=");
        return [e.slice(0, eq), e.slice(eq + 1)];
      })),
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
  } catch (e) {
    throw new DenovisorError(
      "IO",
      `cannot run ${executable}: ${e instanceof Error ? e.message : e}`,
    );
  }
  let killedFor: "timeout" | "output_limit" | undefined;
  const kill = (why: "timeout" | "output_limit") => {
    if (killedFor !== undefined) return;
    killedFor = why;
    try {
      child.kill("SIGKILL");
    } catch {
      // Already gone.
    }
  };
  const timer = setTimeout(() => kill("timeout"), timeoutMs);
  const writing = (async () => {
    const writer = child.stdin.getWriter();
    try {
      await writer.write(input);
      await writer.close();
    } catch {
      // The program exited without reading all of its input: as on a pipe.
    }
  })();
  const budget = { left: outputLimit };
  const out: Uint8Array[] = [];
  const err: Uint8Array[] = [];
  try {
    await Promise.all([
      drain(child.stdout, out, budget, () => kill("output_limit")),
      drain(child.stderr, err, budget, () => kill("output_limit")),
      writing,
    ]);
    const status = await child.status;
    const runNs = Math.round((performance.now() - started) * 1e6);
    const base = {
      stdout: concat(out),
      stderr: concat(err),
      runNs,
      resetNs: 0,
      resetPages: 0,
      exits: 0,
      syscalls: 0,
      memoryUsed: 0,
      enosys: [],
    };
    if (killedFor === "timeout") {
      return {
        ...base,
        status: "timeout",
        outcome: null,
        exitStatus: 0,
        reason: `ran over ${timeoutMs} ms`,
      };
    }
    if (killedFor === "output_limit") {
      return {
        ...base,
        status: "done",
        outcome: "output_limit",
        exitStatus: 0,
        reason: `wrote over ${outputLimit} bytes`,
      };
    }
    if (status.signal !== null) {
      return {
        ...base,
        status: "done",
        outcome: "signal",
        exitStatus: SIGNAL_NUMBERS[status.signal] ?? 0,
        reason: `killed by ${status.signal}`,
      };
    }
    return { ...base, status: "done", outcome: "exited", exitStatus: status.code };
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A function as a host program, with the methods of a function VM: each
 * {@link NativeFunction.invokeAsync} is one subprocess; checkpoint, reset and
 * trim have nothing to do. Not isolated (see the module's documentation).
 *
 * @example
 * ```ts
 * import { NATIVE_BACKEND } from "denovisor/src/serverless/native.ts";
 * const fn = await NATIVE_BACKEND.start({ program: await Deno.readFile("/bin/cat"), argv: ["cat"] });
 * const r = await fn.invokeAsync(new TextEncoder().encode("hi"));
 * console.log(new TextDecoder().decode(r.stdout)); // hi
 * fn.close();
 * ```
 */
export class NativeFunction implements FunctionVm {
  readonly #meta: NativeMeta;
  readonly #ownDir: string | undefined;

  /** @internal Use {@link NATIVE_BACKEND}. */
  constructor(meta: NativeMeta, ownDir: string | undefined) {
    this.#meta = meta;
    this.#ownDir = ownDir;
  }

  /** Nothing to take: every run starts a fresh process. */
  checkpoint(): void {}

  /**
   * Nothing to restore.
   *
   * @returns No pages, no time.
   */
  reset(): { pages: number; ns: number } {
    return { pages: 0, ns: 0 };
  }

  /** Nothing to give back. */
  trim(): void {}

  /**
   * A native run's buffers: its limits.
   *
   * @returns 256 MiB each.
   */
  functionReady(): FunctionReady {
    return {
      inputCapacity: NATIVE_CAPACITY,
      stdoutCapacity: NATIVE_CAPACITY,
      stderrCapacity: NATIVE_CAPACITY,
    };
  }

  /**
   * Runs the program once ({@link runNative}).
   *
   * @param input Its stdin.
   * @param options Time and output limits (`memoryLimit` is not enforced natively).
   * @returns What it did.
   */
  invokeAsync(input: Uint8Array, options?: InvokeOptions): Promise<InvokeResult> {
    const { executable, argv, env } = this.#meta;
    return runNative(executable, argv, env, input, options);
  }

  /**
   * Copies the program and its settings into `dir` (created), for
   * {@link NATIVE_BACKEND}'s `restore`.
   *
   * @param dir The directory to create.
   */
  snapshot(dir: string): void {
    Deno.mkdirSync(dir, { recursive: true });
    const executable = join(dir, basename(this.#meta.executable));
    Deno.copyFileSync(this.#meta.executable, executable);
    Deno.chmodSync(executable, 0o755);
    Deno.writeTextFileSync(
      join(dir, META_FILE),
      JSON.stringify({ ...this.#meta, executable } satisfies NativeMeta),
    );
  }

  /** Removes the program's private copy (not a snapshot's). */
  close(): void {
    if (this.#ownDir === undefined) return;
    try {
      Deno.removeSync(this.#ownDir, { recursive: true });
    } catch {
      // Already gone.
    }
  }
}

/** The name the program's copy gets: `argv[0]`'s base name when it is a plain file name. */
function executableName(argv0: string | undefined): string {
  const name = basename(argv0 ?? "");
  return /^[A-Za-z0-9_.+-]{1,64}$/.test(name) && name !== "." && name !== ".." ? name : "program";
}

/**
 * Functions as host subprocesses: `start` writes the program into a private
 * temporary directory, named after `argv[0]` (multi-call programs such as
 * busybox pick their applet by it); `restore` reads what
 * {@link NativeFunction.snapshot} wrote. Not isolated: trusted code only.
 *
 * @example
 * ```ts ignore
 * import { Service } from "denovisor";
 * import { NATIVE_BACKEND } from "denovisor/src/serverless/native.ts";
 * await using service = await Service.start({
 *   port: 0,
 *   functions: [{ name: "cat", program: "/bin/cat" }],
 *   backend: NATIVE_BACKEND,
 * });
 * ```
 */
export const NATIVE_BACKEND: FunctionBackend = {
  kind: "native",
  async start(options: FunctionStartOptions): Promise<FunctionVm> {
    const dir = await Deno.makeTempDir({ prefix: "denovisor-native-" });
    const executable = join(dir, executableName(options.argv[0]));
    await Deno.writeFile(executable, options.program, { mode: 0o755 });
    await Deno.chmod(executable, 0o755);
    return new NativeFunction({
      executable,
      argv: [...options.argv],
      env: [...(options.env ?? [])],
    }, dir);
  },
  async restore(dir: string): Promise<FunctionVm> {
    let meta: NativeMeta;
    try {
      meta = JSON.parse(await Deno.readTextFile(join(dir, META_FILE)));
    } catch (e) {
      throw new DenovisorError(
        "SNAPSHOT_INVALID",
        `not a native function's snapshot: ${dir}: ${e instanceof Error ? e.message : e}`,
      );
    }
    return new NativeFunction(meta, undefined);
  },
};
