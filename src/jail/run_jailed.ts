/**
 * Runs a VMM (Deno running `main.ts`, or another script) inside a jail built
 * by `denovisor-jailer`: prepares and checks the jail folder, starts the
 * jailer with `Deno.Command`, forwards standard I/O, termination signals and
 * the exit status, and undoes everything it created on every path out (the
 * jail's mounts live in the jail's own mount namespace and vanish with it).
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";
import { jailerPathOf } from "../build/core_build.ts";
import { absolutePath, pathOfFileUrl, readEnv } from "../build/fs_util.ts";
import { locateCoreLibrary } from "../build/remote_core.ts";
import {
  buildJailLayout,
  isCleanAbsolute,
  type JailFile,
  type JailHost,
  type JailLayout,
  type JailOptions,
  type JailVm,
  sharedLibraries,
  validateJailOptions,
} from "./policy.ts";

/** The file a jail folder holds on the host while a jail uses it (the jailer's pid). */
export const JAIL_MARKER = ".denovisor-jail";

/** The largest file a jail may hand back through {@link RunJailedOptions}.outputs. */
export const MAX_OUTPUT_BYTES = 64 << 20;

/** Exit status of the jailer when the jail could not be set up. */
export const JAIL_SETUP_FAILED = 125;

/** Options of {@link runJailed}. */
export interface RunJailedOptions extends JailOptions {
  /** What runs in the jail. */
  vm: JailVm;
  /**
   * Host paths made symbolic links to files the VMM creates in its run folder
   * (`/run/denovisor/NAME` in the jail), e.g. the control API's socket.
   */
  links?: { host: string; name: string }[];
  /**
   * Files the VMM writes in its run folder (`/run/denovisor/NAME` in the
   * jail), copied to host paths once the jail has ended (e.g. `--metrics
   * FILE`): a regular file of at most {@link MAX_OUTPUT_BYTES}; anything else
   * the jail left there (a link, a folder) is refused, not followed.
   */
  outputs?: { host: string; name: string }[];
  /**
   * A host folder the VMM shares Unix sockets through, bound writable at
   * `/sockets` in the jail: a vsock device's `PATH` (host programs connect to
   * it) and `PATH_PORT` (host programs listen there for the guest). It must be
   * a folder of its own: one holding anything but sockets is refused, as the
   * jail could read and write it; and writable by `uid` (its owner, or `gid`'s
   * with group write, or anyone's).
   */
  socketDir?: string;
  /** Standard input: the caller's (default) or none. */
  stdin?: "inherit" | "null";
  /** Standard output and error: the caller's (default) or captured. */
  output?: "inherit" | "piped";
}

/** How a jailed run ended. */
export interface JailedRun {
  /** The VMM's exit status (128 + N when killed by signal N; 125 when the jail failed). */
  code: number;
  /** Its standard output, when captured. */
  stdout?: Uint8Array;
  /** Its standard error, when captured. */
  stderr?: Uint8Array;
}

const SIGNALS: Deno.Signal[] = ["SIGINT", "SIGTERM", "SIGHUP"];

/**
 * Runs `options.vm` in a jail at `options.dir` and returns its exit status.
 * The folder is created when absent and removed afterwards (left in place,
 * empty, when it existed). Needs root (see {@link validateJailOptions}).
 *
 * @param options The jail and the VM.
 * @returns The exit status (and the output when `output` is `piped`).
 * @throws {DenovisorError} `INVALID_ARGUMENT` for a bad option, a jail folder
 *   that is neither empty nor a previous jail's, or a missing VM file; `BUSY`
 *   when a live jail uses the folder; `NOT_AVAILABLE` without privileges or
 *   `ldd`; `BUILD_FAILED` when the jailer program is missing.
 * @example
 * ```ts ignore
 * import { runJailed } from "denovisor/src/jail/run_jailed.ts";
 * const { code } = await runJailed({
 *   dir: "/srv/jail/vm1",
 *   uid: 1000,
 *   gid: 1000,
 *   cgroups: { "memory.max": "512M" },
 *   vm: { args: ["run", "/vm/image"], files: [{ host: "/srv/guest.elf", jail: "/vm/image" }] },
 * });
 * console.log(code);
 * ```
 */
export async function runJailed(options: RunJailedOptions): Promise<JailedRun> {
  const limits = validateJailOptions(options);
  const dir = options.dir;
  let largestWritable = 0;
  for (const file of options.vm.files) {
    largestWritable = Math.max(largestWritable, checkVmFile(file, dir));
  }
  if (options.limits?.fsize === undefined) limits.fsize = Math.max(limits.fsize, largestWritable);
  const runFiles = [...(options.links ?? []), ...(options.outputs ?? [])];
  for (const { name } of runFiles) {
    if (!/^[A-Za-z0-9._-]{1,64}$/.test(name) || name.startsWith(".")) {
      throw new DenovisorError("INVALID_ARGUMENT", `bad run-folder file name ${name}`);
    }
  }
  if (new Set(runFiles.map((f) => f.name)).size !== runFiles.length) {
    throw new DenovisorError("INVALID_ARGUMENT", "two run-folder files have one name");
  }
  for (const output of options.outputs ?? []) checkOutputPath(output.host);
  if (options.socketDir !== undefined) {
    checkSocketDir(options.socketDir, dir, options.uid ?? 0, options.gid ?? 0);
  }
  const hostPieces = await locateHostPieces();

  const cleanups: (() => void)[] = [];
  const cleanup = () => {
    for (const undo of cleanups.reverse()) {
      try {
        undo();
      } catch {
        // Best effort: the remaining steps still run.
      }
    }
  };
  try {
    claimJailDir(dir, cleanups);
    let runDir: string | undefined;
    if (runFiles.length > 0) {
      runDir = Deno.makeTempDirSync({ prefix: "denovisor-jail-run-" });
      cleanups.push(() => Deno.removeSync(runDir!, { recursive: true }));
      if (options.uid !== undefined || options.gid !== undefined) {
        Deno.chownSync(runDir, options.uid ?? 0, options.gid ?? 0);
      }
      for (const link of options.links ?? []) {
        const target = `${runDir}/${link.name}`;
        const host = absolutePath(link.host);
        try {
          Deno.symlinkSync(target, host);
        } catch (e) {
          throw new DenovisorError(
            "INVALID_ARGUMENT",
            `cannot create ${host} (a link to the jail's ${link.name}): ${
              e instanceof Error ? e.message : e
            }`,
          );
        }
        cleanups.push(() => {
          if (Deno.lstatSync(host).isSymlink && Deno.readLinkSync(host) === target) {
            Deno.removeSync(host);
          }
        });
      }
    }
    const host: JailHost = {
      ...hostPieces,
      ...(runDir === undefined ? {} : { runDir }),
      ...(options.socketDir === undefined ? {} : { socketDir: options.socketDir }),
    };
    const layout = buildJailLayout(options.vm, host, limits);
    const id = jailId(dir);
    cleanups.push(() => removeCgroupLeaf(id));
    const run = await spawnJailer(hostPieces.jailer, jailerArgs(layout, options, id), options);
    // The jail has ended (its PID 1 is gone, and every process with it):
    // nothing changes the run folder while its files are copied out.
    for (const output of options.outputs ?? []) copyOutput(`${runDir}/${output.name}`, output.host);
    return run;
  } finally {
    cleanup();
  }
}

/** An output's host path: absolute, in a folder that exists, not a folder itself. */
function checkOutputPath(path: string): void {
  const fail = (why: string): never => {
    throw new DenovisorError("INVALID_ARGUMENT", `cannot write ${path}: ${why}`);
  };
  if (!isCleanAbsolute(path)) fail("not a clean absolute path");
  const parent = path.slice(0, path.lastIndexOf("/")) || "/";
  let isDirectory = false;
  try {
    isDirectory = Deno.statSync(parent).isDirectory;
  } catch {
    isDirectory = false;
  }
  if (!isDirectory) fail(`its folder ${parent} does not exist`);
  try {
    if (Deno.statSync(path).isDirectory) fail("it is a folder");
  } catch (e) {
    if (e instanceof DenovisorError) throw e;
    // Absent: written at the end.
  }
}

/** Copies a file the jail wrote to the host, if it is a regular file of bounded size. */
function copyOutput(from: string, to: string): void {
  let info: Deno.FileInfo;
  try {
    info = Deno.lstatSync(from);
  } catch {
    return; // The VMM did not write it (it failed first, and said why).
  }
  if (!info.isFile || info.size > MAX_OUTPUT_BYTES) {
    throw new DenovisorError(
      "IO",
      `the jail left ${from.slice(from.lastIndexOf("/") + 1)} as ${
        info.isFile ? `${info.size} bytes` : "something other than a file"
      }; not copied to ${to}`,
    );
  }
  try {
    Deno.writeFileSync(to, Deno.readFileSync(from));
  } catch (e) {
    throw new DenovisorError("IO", `cannot write ${to}: ${e instanceof Error ? e.message : e}`);
  }
}

/** Checks a VM file exists and lies outside the jail folder; returns its size when writable. */
function checkVmFile(file: JailFile, dir: string): number {
  if (!isCleanAbsolute(file.host)) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `a VM file must be an absolute path: ${file.host}`,
    );
  }
  if (file.host === dir || file.host.startsWith(`${dir}/`)) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `${file.host} is inside the jail folder ${dir}, which the jail covers`,
    );
  }
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(file.host);
  } catch (e) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `cannot put ${file.host} in the jail: ${e instanceof Error ? e.message : e}`,
    );
  }
  return file.writable ? info.size : 0;
}

/**
 * A socket folder must be a real folder outside the jail, writable by the
 * jail's user, and hold sockets only.
 */
function checkSocketDir(path: string, dir: string, uid: number, gid: number): void {
  const fail = (why: string): never => {
    throw new DenovisorError("INVALID_ARGUMENT", `socket folder ${path}: ${why}`);
  };
  if (!isCleanAbsolute(path)) fail("must be a clean absolute path");
  if (path === dir || path.startsWith(`${dir}/`) || dir.startsWith(`${path}/`)) {
    fail(`overlaps the jail folder ${dir}`);
  }
  let info: Deno.FileInfo;
  try {
    info = Deno.lstatSync(path);
  } catch (e) {
    return fail(e instanceof Error ? e.message : String(e));
  }
  if (!info.isDirectory) fail("is not a folder (a link is not followed)");
  const mode = info.mode ?? 0;
  // No capabilities in the jail: root there is bound by the mode bits too.
  const writable = (info.uid === uid && (mode & 0o200) !== 0) ||
    (info.gid === gid && (mode & 0o020) !== 0) || (mode & 0o002) !== 0;
  if (!writable) fail(`the jail's user ${uid} (group ${gid}) cannot create sockets in it`);
  for (const entry of Deno.readDirSync(path)) {
    let isSocket = false;
    try {
      isSocket = Deno.lstatSync(`${path}/${entry.name}`).isSocket === true;
    } catch {
      // Gone meanwhile: nothing to expose.
      isSocket = true;
    }
    if (!isSocket) {
      fail(
        `holds ${entry.name}, which is not a socket; the jail could read and write it ` +
          "(give the sockets a folder of their own)",
      );
    }
  }
}

/** Finds Deno, the sources, the core library, its jailer and their shared libraries. */
async function locateHostPieces(): Promise<Omit<JailHost, "runDir"> & { jailer: string }> {
  const root = new URL("../../", import.meta.url);
  if (root.protocol !== "file:") {
    throw new DenovisorError(
      "NOT_AVAILABLE",
      `a jail needs denovisor's sources on disk; it was loaded from ${root.href}`,
    );
  }
  const sourceRoot = pathOfFileUrl(root).replace(/\/+$/, "");
  const library = Deno.realPathSync(await locateCoreLibrary(root, { quiet: true }));
  const jailer = readEnv("DENOVISOR_JAILER") ?? jailerPathOf(library);
  try {
    if (!Deno.statSync(jailer).isFile) throw new Error("not a file");
  } catch {
    throw new DenovisorError(
      "BUILD_FAILED",
      `the jailer ${jailer} does not exist: build the core with \`deno task build\` ` +
        `(or set DENOVISOR_JAILER)`,
    );
  }
  const deno = Deno.realPathSync(Deno.execPath());
  const libraries = new Set([...await sharedLibraries(deno), ...await sharedLibraries(library)]);
  return { deno, sourceRoot, library, sharedLibraries: [...libraries], jailer };
}

/**
 * Makes `dir` the jail's folder: creates it when absent; else it must be an
 * empty folder or one a previous (dead) jail left. Registers the undo steps.
 */
function claimJailDir(dir: string, cleanups: (() => void)[]): void {
  let info: Deno.FileInfo | undefined;
  try {
    info = Deno.lstatSync(dir);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  const marker = `${dir}/${JAIL_MARKER}`;
  if (info === undefined) {
    try {
      Deno.mkdirSync(dir, { mode: 0o755 });
    } catch (e) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `cannot create the jail folder ${dir}: ${e instanceof Error ? e.message : e}`,
      );
    }
    cleanups.push(() => Deno.removeSync(dir));
  } else {
    if (!info.isDirectory) {
      throw new DenovisorError("INVALID_ARGUMENT", `the jail folder ${dir} is not a folder`);
    }
    const entries = [...Deno.readDirSync(dir)].map((e) => e.name);
    if (entries.some((name) => name !== JAIL_MARKER)) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `the jail folder ${dir} is not empty and not a previous jail's (it holds ${
          entries.slice(0, 3).join(", ")
        })`,
      );
    }
    if (entries.includes(JAIL_MARKER)) {
      const pid = Number(Deno.readTextFileSync(marker).trim());
      if (Number.isSafeInteger(pid) && pid > 0 && isAlive(pid)) {
        throw new DenovisorError("BUSY", `a jail (process ${pid}) is using ${dir}`);
      }
    }
  }
  Deno.writeTextFileSync(marker, `${Deno.pid}\n`);
  cleanups.push(() => Deno.removeSync(marker));
}

function isAlive(pid: number): boolean {
  try {
    Deno.statSync(`/proc/${pid}`);
    return true;
  } catch {
    return false;
  }
}

/** The jail's cgroup name: the folder's last segment and this process's pid. */
function jailId(dir: string): string {
  const base = dir.slice(dir.lastIndexOf("/") + 1).replace(/[^A-Za-z0-9_-]/g, "_").slice(0, 40);
  return `${base || "jail"}-${Deno.pid}`;
}

/** The jailer's command line for a layout. */
function jailerArgs(layout: JailLayout, options: JailOptions, id: string): string[] {
  const args = ["--root", options.dir, "--id", id];
  if (options.uid !== undefined) args.push("--uid", String(options.uid));
  if (options.gid !== undefined) args.push("--gid", String(options.gid));
  for (const [key, value] of Object.entries(options.cgroups ?? {})) {
    args.push("--cgroup", `${key}=${value}`);
  }
  for (const bind of layout.binds) args.push(bind.writable ? "--rw" : "--ro", bind.host, bind.jail);
  for (const device of layout.devices) args.push("--dev", device);
  for (const { path, sizeMiB } of layout.tmpfs) args.push("--tmpfs", path, String(sizeMiB));
  args.push("--netns", layout.newNetns ? "new" : "keep");
  for (const [name, value] of Object.entries(layout.limits)) {
    args.push("--rlimit", `${name}=${value}`);
  }
  args.push("--chdir", layout.chdir);
  for (const [name, value] of Object.entries(layout.env)) args.push("--env", `${name}=${value}`);
  args.push("--", layout.program, ...layout.args);
  return args;
}

/** Runs the jailer; SIGINT, SIGTERM and SIGHUP reach it (it then kills the VMM). */
async function spawnJailer(
  jailer: string,
  args: string[],
  options: RunJailedOptions,
): Promise<JailedRun> {
  const piped = options.output === "piped";
  const child = new Deno.Command(jailer, {
    args,
    clearEnv: true,
    env: { LC_ALL: "C" },
    stdin: options.stdin ?? "inherit",
    stdout: piped ? "piped" : "inherit",
    stderr: piped ? "piped" : "inherit",
  }).spawn();
  const forward = () => {
    try {
      child.kill("SIGTERM");
    } catch {
      // Already gone.
    }
  };
  for (const signal of SIGNALS) Deno.addSignalListener(signal, forward);
  try {
    const collect = async (stream: ReadableStream<Uint8Array> | null) => {
      if (!piped || stream === null) return undefined;
      return new Uint8Array(await new Response(stream).arrayBuffer());
    };
    const [status, stdout, stderr] = await Promise.all([
      child.status,
      collect(piped ? child.stdout : null),
      collect(piped ? child.stderr : null),
    ]);
    const code = status.signal === null ? status.code : 128 + signalNumber(status.signal);
    return { code, ...(stdout ? { stdout } : {}), ...(stderr ? { stderr } : {}) };
  } finally {
    for (const signal of SIGNALS) Deno.removeSignalListener(signal, forward);
  }
}

function signalNumber(signal: Deno.Signal): number {
  const numbers: Partial<Record<Deno.Signal, number>> = {
    SIGHUP: 1,
    SIGINT: 2,
    SIGQUIT: 3,
    SIGABRT: 6,
    SIGKILL: 9,
    SIGSEGV: 11,
    SIGPIPE: 13,
    SIGTERM: 15,
  };
  return numbers[signal] ?? 0;
}

/**
 * The cgroup2 mount point, from `/proc/self/mountinfo`, or undefined.
 *
 * @returns An absolute path, or undefined when no cgroup2 is mounted.
 * @example
 * ```ts
 * import { cgroup2Mount } from "denovisor/src/jail/run_jailed.ts";
 * console.log(cgroup2Mount()); // e.g. /sys/fs/cgroup
 * ```
 */
export function cgroup2Mount(): string | undefined {
  try {
    for (const line of Deno.readTextFileSync("/proc/self/mountinfo").split("\n")) {
      const [left, right] = line.split(" - ");
      if (right?.split(" ")[0] === "cgroup2") return left.split(" ")[4];
    }
  } catch {
    // No /proc: no cgroup either.
  }
  return undefined;
}

/** Removes a jail's cgroup leaf the jailer could not (it was killed). */
function removeCgroupLeaf(id: string): void {
  const mount = cgroup2Mount();
  if (mount === undefined) return;
  try {
    Deno.removeSync(`${mount}/denovisor/${id}`);
  } catch {
    // Already removed by the jailer, or never made.
  }
}
