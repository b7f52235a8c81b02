/**
 * The jail's policy: which options are valid, and what a jailed VMM may see.
 * `run_jailed.ts` turns a {@link JailLayout} into the arguments of the
 * `denovisor-jailer` program (`core/src/bin/denovisor-jailer.rs`), which only
 * applies it.
 *
 * The jailed VMM is Deno running `main.ts`, so the jail holds, read-only: the
 * Deno binary and the shared libraries `ldd` lists for it and for the core
 * library (only those files), denovisor's sources (`src/`, `main.ts`,
 * `mod.ts`, `deno.json`), the core library and the VM's files (a disk
 * writable when the VM writes it); writable: a tmpfs `/tmp`, a tmpfs
 * `DENO_DIR`, and the folder of the VM's sockets. Devices: `/dev/kvm`,
 * `/dev/null`, `/dev/zero`, `/dev/urandom`, and `/dev/net/tun` only with a
 * TAP (the VM then keeps the host's network namespace; otherwise it gets an
 * empty one).
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";

/** The cgroup v2 files a jail may set (each needs its controller delegated). */
export const CGROUP_KEYS = [
  "cpu.max",
  "cpu.weight",
  "memory.max",
  "memory.high",
  "memory.swap.max",
  "pids.max",
] as const;

/** A cgroup v2 file a jail may set. */
export type CgroupKey = (typeof CGROUP_KEYS)[number];

/** The largest user or group id (`(uid_t)-1` means "unchanged" to the kernel). */
export const MAX_ID = 0xffff_fffe;

/** Resource limits of the jailed process (`setrlimit`, soft = hard). */
export interface JailLimits {
  /** Open files (default 4096). */
  nofile?: number;
  /** Largest file it may write, in bytes (default 1 GiB, or the largest writable disk). */
  fsize?: number;
  /** Processes and threads of its user (default 1024; not enforced for uid 0). */
  nproc?: number;
}

/** Where and as whom a VMM runs jailed. */
export interface JailOptions {
  /** The jail's folder: absolute, absent, empty, or left by a previous jail. */
  dir: string;
  /** The user the VMM runs as (default 0, without any capability). */
  uid?: number;
  /** The group the VMM runs as (default 0). */
  gid?: number;
  /** cgroup v2 limits, e.g. `{ "memory.max": "512M", "cpu.max": "50000 100000" }`. */
  cgroups?: Partial<Record<CgroupKey, string>>;
  /** rlimits (defaults in {@link JailLimits}). */
  limits?: JailLimits;
}

/** A host file or folder visible inside the jail. */
export interface JailFile {
  /** Its absolute path on the host. */
  host: string;
  /** Its absolute path inside the jail. */
  jail: string;
  /** Whether the VMM may write it (default false). */
  writable?: boolean;
}

/** What the jailed process needs, decided from the VM's configuration. */
export interface JailLayout {
  /** Files and folders mounted into the jail, in mount order. */
  binds: JailFile[];
  /** Device names for the jailer (`kvm`, `net-tun`, `null`, `zero`, `urandom`). */
  devices: string[];
  /** tmpfs folders and their sizes in MiB. */
  tmpfs: { path: string; sizeMiB: number }[];
  /** A new, empty network namespace (false: the host's, for a TAP). */
  newNetns: boolean;
  /** The only environment the program gets. */
  env: Record<string, string>;
  /** The program (a jail path) and its arguments. */
  program: string;
  /** Its arguments, without argv[0]. */
  args: string[];
  /** Its working folder inside the jail. */
  chdir: string;
  /** The rlimits, all set. */
  limits: Required<JailLimits>;
}

/** Where the jailed files go. */
export const JAIL_PATHS = {
  deno: "/deno/deno",
  sources: "/denovisor",
  library: "/denovisor/lib/libdenovisor_core.so",
  denoDir: "/deno-dir",
  vm: "/vm",
  run: "/run/denovisor",
  sockets: "/sockets",
} as const;

/** The sources Deno needs to run `main.ts`, relative to the repository root. */
export const SOURCE_ENTRIES = ["src", "main.ts", "mod.ts", "deno.json"] as const;

const DEFAULT_LIMITS: Required<JailLimits> = {
  nofile: 4096,
  fsize: 1 << 30,
  nproc: 1024,
};

function invalid(message: string): DenovisorError {
  return new DenovisorError("INVALID_ARGUMENT", message);
}

/**
 * Tells whether `path` is absolute and normalized (no `.`, `..` or empty
 * segments, no trailing slash) and not `/`.
 *
 * @param path A path.
 * @returns Whether the jailer accepts it as a jail path.
 * @example
 * ```ts
 * import { isCleanAbsolute } from "denovisor/src/jail/policy.ts";
 * console.log(isCleanAbsolute("/srv/jail"), isCleanAbsolute("/srv/../etc")); // true false
 * ```
 */
export function isCleanAbsolute(path: string): boolean {
  if (!path.startsWith("/") || path === "/" || path.includes("\0")) return false;
  return path.slice(1).split("/").every((part) => part !== "" && part !== "." && part !== "..");
}

/**
 * Checks jail options before anything is created: the folder's path, the ids,
 * the cgroup keys and values, the limits, and that this process may build a
 * jail (root, or CAP_SYS_ADMIN with the other capabilities the jailer uses).
 *
 * @param options The options to check.
 * @returns The limits with their defaults filled in.
 * @throws {DenovisorError} `INVALID_ARGUMENT` for a bad value (the message
 *   names it); `NOT_AVAILABLE` when this process is not privileged.
 * @example
 * ```ts
 * import { validateJailOptions } from "denovisor/src/jail/policy.ts";
 * try {
 *   validateJailOptions({ dir: "relative/dir" });
 * } catch (e) {
 *   console.log((e as Error).message); // the jail folder must be an absolute path ...
 * }
 * ```
 */
export function validateJailOptions(options: JailOptions): Required<JailLimits> {
  if (!isCleanAbsolute(options.dir)) {
    throw invalid(
      `the jail folder must be an absolute path without . or .. segments (and not /), got ${
        JSON.stringify(options.dir)
      }`,
    );
  }
  for (const [name, id] of [["uid", options.uid], ["gid", options.gid]] as const) {
    if (id !== undefined && (!Number.isSafeInteger(id) || id < 0 || id > MAX_ID)) {
      throw invalid(`the jail's ${name} must be an integer from 0 to ${MAX_ID}, got ${id}`);
    }
  }
  for (const [key, value] of Object.entries(options.cgroups ?? {})) {
    if (!(CGROUP_KEYS as readonly string[]).includes(key)) {
      throw invalid(`unknown cgroup key ${JSON.stringify(key)} (${CGROUP_KEYS.join(", ")})`);
    }
    if (typeof value !== "string" || !/^[A-Za-z0-9 ]{1,64}$/.test(value)) {
      throw invalid(
        `cgroup ${key}: the value must be 1 to 64 letters, digits and spaces, got ${
          JSON.stringify(value)
        }`,
      );
    }
  }
  const limits = { ...DEFAULT_LIMITS };
  for (const [name, value] of Object.entries(options.limits ?? {})) {
    if (!(name in DEFAULT_LIMITS)) throw invalid(`unknown limit ${name} (nofile, fsize, nproc)`);
    if (value === undefined) continue;
    if (!Number.isSafeInteger(value) || value < 1) {
      throw invalid(`the ${name} limit must be a positive integer, got ${value}`);
    }
    limits[name as keyof JailLimits] = value;
  }
  const problem = privilegeProblem();
  if (problem) throw new DenovisorError("NOT_AVAILABLE", problem);
  return limits;
}

/** Capabilities the jailer uses: CHOWN, MKNOD, SETGID, SETUID, SETPCAP, SYS_ADMIN. */
const NEEDED_CAPABILITIES = [0, 27, 6, 7, 8, 21];

/**
 * Why this process cannot build a jail, or undefined when it can: it needs
 * the capabilities to mount, make device nodes and change users (root has
 * them).
 *
 * @returns A message, or undefined.
 * @example
 * ```ts
 * import { privilegeProblem } from "denovisor/src/jail/policy.ts";
 * console.log(privilegeProblem() ?? "can jail");
 * ```
 */
export function privilegeProblem(): string | undefined {
  let effective: bigint;
  try {
    const status = Deno.readTextFileSync("/proc/self/status");
    const hex = /^CapEff:\s*([0-9a-f]+)$/m.exec(status)?.[1];
    if (hex === undefined) return "cannot read CapEff in /proc/self/status";
    effective = BigInt(`0x${hex}`);
  } catch (e) {
    return `cannot read /proc/self/status: ${e instanceof Error ? e.message : e}`;
  }
  const missing = NEEDED_CAPABILITIES.filter((cap) => ((effective >> BigInt(cap)) & 1n) === 0n);
  if (missing.length === 0) return undefined;
  return `a jail needs root (or CAP_SYS_ADMIN, CAP_MKNOD, CAP_SETUID, CAP_SETGID, CAP_SETPCAP ` +
    `and CAP_CHOWN); this process lacks capabilities ${missing.join(", ")}`;
}

/**
 * The shared libraries a dynamically linked program loads, as `ldd` lists
 * them (the loader included); none for a static program.
 *
 * @param binary An absolute path.
 * @returns Absolute paths of the libraries.
 * @throws {DenovisorError} `NOT_AVAILABLE` when `ldd` cannot run.
 * @example
 * ```ts
 * import { sharedLibraries } from "denovisor/src/jail/policy.ts";
 * console.log(await sharedLibraries(Deno.execPath())); // ["/lib/x86_64-linux-gnu/libc.so.6", ...]
 * ```
 */
export async function sharedLibraries(binary: string): Promise<string[]> {
  let output: Deno.CommandOutput;
  try {
    output = await new Deno.Command("ldd", {
      args: [binary],
      stdout: "piped",
      stderr: "piped",
      stdin: "null",
      env: { LC_ALL: "C" },
    }).output();
  } catch (e) {
    throw new DenovisorError(
      "NOT_AVAILABLE",
      `cannot run ldd to list ${binary}'s libraries: ${e instanceof Error ? e.message : e}`,
    );
  }
  const text = new TextDecoder().decode(output.stdout);
  if (output.code !== 0) {
    if (/not a dynamic executable/.test(text + new TextDecoder().decode(output.stderr))) return [];
    throw new DenovisorError("NOT_AVAILABLE", `ldd ${binary} failed with status ${output.code}`);
  }
  const libraries = new Set<string>();
  for (const line of text.split("\n")) {
    // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
    const match = /(?:=>\s*)?(\/\S+)\s+\(0x[0-9a-f]+\)/.exec(line);
    if (match) libraries.add(match[1]);
    else if (/=>\s*not found/.test(line)) {
      throw new DenovisorError(
        "NOT_AVAILABLE",
        `${binary} needs a missing library: ${line.trim()}`,
      );
    }
  }
  return [...libraries];
}

/** The host side of a jailed run: where Deno, the sources and the library are. */
export interface JailHost {
  /** The Deno binary (resolved, not a symlink). */
  deno: string;
  /** The repository root holding {@link SOURCE_ENTRIES}. */
  sourceRoot: string;
  /** The built core library. */
  library: string;
  /** Shared libraries of Deno and of the core library. */
  sharedLibraries: string[];
  /** The host folder bound writable at {@link JAIL_PATHS}.run, if the VM has sockets. */
  runDir?: string;
  /**
   * A host folder of Unix sockets shared with host programs (a vsock device's
   * `PATH` and `PATH_PORT`), bound writable at {@link JAIL_PATHS}.sockets.
   */
  socketDir?: string;
}

/** What the VM run inside the jail needs. */
export interface JailVm {
  /** The script Deno runs, a jail path (default `/denovisor/main.ts`). */
  script?: string;
  /** Its arguments (jail paths). */
  args: string[];
  /** The VM's files (images, kernel, disks) with their jail paths. */
  files: JailFile[];
  /** The VM attaches a TAP: keep the host's network namespace, add /dev/net/tun. */
  tap?: boolean;
  /** Extra environment (e.g. NO_COLOR). */
  env?: Record<string, string>;
}

/**
 * Builds the jail's layout: every mount, device, limit and the command.
 *
 * @param vm What the VM needs.
 * @param host Where the host's pieces are.
 * @param limits The rlimits (from {@link validateJailOptions}).
 * @returns The layout.
 * @throws {DenovisorError} `INVALID_ARGUMENT` when a VM file's jail path is
 *   not clean or collides with the jail's own folders.
 * @example
 * ```ts
 * import { buildJailLayout } from "denovisor/src/jail/policy.ts";
 * const layout = buildJailLayout(
 *   { args: ["run", "/vm/image"], files: [{ host: "/tmp/guest.elf", jail: "/vm/image" }] },
 *   { deno: "/usr/bin/deno", sourceRoot: "/opt/denovisor", library: "/opt/lib.so", sharedLibraries: [] },
 *   { nofile: 4096, fsize: 1 << 30, nproc: 1024 },
 * );
 * console.log(layout.binds.length);
 * ```
 */
export function buildJailLayout(
  vm: JailVm,
  host: JailHost,
  limits: Required<JailLimits>,
): JailLayout {
  const binds: JailFile[] = [];
  for (const library of host.sharedLibraries) binds.push({ host: library, jail: library });
  binds.push({ host: host.deno, jail: JAIL_PATHS.deno });
  for (const entry of SOURCE_ENTRIES) {
    binds.push({ host: `${host.sourceRoot}/${entry}`, jail: `${JAIL_PATHS.sources}/${entry}` });
  }
  binds.push({ host: host.library, jail: JAIL_PATHS.library });
  const taken = new Set(binds.map((b) => b.jail));
  for (const file of vm.files) {
    if (!isCleanAbsolute(file.jail) || !file.jail.startsWith(`${JAIL_PATHS.vm}/`)) {
      throw invalid(`a VM file's jail path must be under ${JAIL_PATHS.vm}/, got ${file.jail}`);
    }
    if (taken.has(file.jail)) throw invalid(`two files would be mounted at ${file.jail}`);
    taken.add(file.jail);
    binds.push({ host: file.host, jail: file.jail, writable: file.writable ?? false });
  }
  if (host.runDir !== undefined) {
    binds.push({ host: host.runDir, jail: JAIL_PATHS.run, writable: true });
  }
  if (host.socketDir !== undefined) {
    binds.push({ host: host.socketDir, jail: JAIL_PATHS.sockets, writable: true });
  }
  const libraryDirs = [...new Set(host.sharedLibraries.map((l) => l.slice(0, l.lastIndexOf("/"))))];
  return {
    binds,
    devices: ["kvm", "null", "zero", "urandom", ...(vm.tap ? ["net-tun"] : [])],
    tmpfs: [{ path: "/tmp", sizeMiB: 64 }, { path: JAIL_PATHS.denoDir, sizeMiB: 256 }],
    newNetns: !vm.tap,
    env: {
      ...vm.env,
      DENO_DIR: JAIL_PATHS.denoDir,
      HOME: "/tmp",
      PATH: "/deno",
      DENO_NO_UPDATE_CHECK: "1",
      DENOVISOR_LIB: JAIL_PATHS.library,
      LD_LIBRARY_PATH: libraryDirs.join(":"),
    },
    program: JAIL_PATHS.deno,
    args: [
      "run",
      "--allow-all",
      "--no-lock",
      "--no-prompt",
      `--config=${JAIL_PATHS.sources}/deno.json`,
      vm.script ?? `${JAIL_PATHS.sources}/main.ts`,
      ...vm.args,
    ],
    chdir: "/tmp",
    limits,
  };
}
