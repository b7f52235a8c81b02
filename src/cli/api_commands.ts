/**
 * The CLI's control-API commands: `pause`, `resume`, `snapshot` and `migrate`
 * are clients of a `run --api-socket PATH` process; `restore` and
 * `run --incoming` continue a VM in this process. The parts other modules of
 * issue 9 provide (restoring a snapshot, receiving a migration, the snapshot
 * and migrate handlers `run --api-socket` serves) are wired in one place,
 * {@link CLI_ACTIONS}; until a part is there its command exits with a usage
 * error that says it is not available yet (snapshots and restore are there).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { resolve } from "node:path";
import { ApiClient, ApiError } from "../api/client.ts";
import { type MigrationAddress, parseMigrationAddress } from "../api/address.ts";
import { type ApiHandlers, checkApiSocketPath } from "../api/server.ts";
import { DenovisorError } from "../errors.ts";
import type { Vm } from "../vm.ts";
import { ExitStatus } from "./exit_status.ts";
import { UsageError } from "./usage_error.ts";
import { incomingFromCli, migrationHandlers } from "./migration_actions.ts";
import { restoreFromCli, snapshotHandlers } from "./snapshot_actions.ts";
import type { CloneIdentity } from "../vm.ts";
import type { RunSession } from "./run_vm.ts";

/** Where a command writes (the CLI's `CliIo`). */
export interface ApiCommandIo {
  /** Writes to standard error. */
  error(text: string): void;
  /** Writes help text (default: standard output). */
  output?(text: string): void;
}

/** `restore DIR`: what to restore and how. */
export interface RestoreRequest {
  /** The snapshot's directory (absolute). */
  dir: string;
  /** Map guest memory from the memory file copy-on-write (`lazy`), or copy it. */
  mode: "lazy" | "eager";
  /** Serve the control API of the restored VM here. */
  apiSocket?: string;
  /** Forward standard input to the guest's console. */
  stdin: boolean;
  /** A clone's own vsock CID and MAC (`--cid`, `--mac`). */
  identity?: CloneIdentity;
  /** Track dirty pages from the restored VM's first run (`--track-dirty-pages`):
   * the snapshot is then the parent of the next diff. */
  trackDirtyPages?: boolean;
}

/** `run --incoming tcp:HOST:PORT`: where to wait for a migrating VM. */
export interface IncomingRequest {
  /** The address to listen on. */
  address: Extract<MigrationAddress, { transport: "tcp" }>;
  /** Serve the control API of the VM here once it runs. */
  apiSocket?: string;
  /** Forward standard input to the guest's console. */
  stdin: boolean;
  /** No summary line. */
  quiet: boolean;
}

/**
 * The operations of issue 9 that other modules provide, for the CLI. Each one
 * resolves with the process exit status (`run`'s statuses for a VM that ran).
 */
export interface CliActions {
  /** `restore DIR`: continue a snapshot's VM in this process. */
  restore?(request: RestoreRequest, io: ApiCommandIo): Promise<number>;
  /** `run --incoming`: wait for a migrating VM, then run it. */
  incoming?(request: IncomingRequest, io: ApiCommandIo): Promise<number>;
  /** The snapshot, restore and migrate handlers `run --api-socket` serves for
   * `vm`, in `session`, the run that may replace it (`PUT /snapshot/load`). */
  apiHandlers?(vm: Vm, session?: RunSession): ApiHandlers;
}

/**
 * Where the snapshot and migration modules plug into the CLI: set a member
 * and its command works. The one place that knows what is not available yet.
 */
export const CLI_ACTIONS: CliActions = {
  // Snapshots (src/cli/snapshot_actions.ts): restore DIR, PUT /snapshot/create.
  restore: restoreFromCli,
  // Live migration (src/cli/migration_actions.ts): run --incoming, PUT /migrate.
  incoming: incomingFromCli,
  apiHandlers: (vm, session) => ({ ...snapshotHandlers(vm, session), ...migrationHandlers(vm) }),
};

/** Refuses a command whose implementation is not there yet. */
function notAvailable(what: string): never {
  throw new UsageError(`${what} is not available yet (snapshots and migration are being built)`);
}

/** The status lines every API client command documents. */
const CLIENT_STATUSES = `Exit status: 0 done; 2 bad arguments, or the operation is not available
yet (the server answered 501); 28 no control API answers at PATH; 30 the
API refused the request (its code and message are printed, e.g. GUEST_STOPPED
when the VM's run has ended).`;

/** Help of the commands in this file, by command. */
export const API_COMMAND_HELP: Readonly<Record<string, string>> = {
  pause: `Usage: deno run -A main.ts pause --api-socket PATH

Pauses the VM that a \`main.ts run --api-socket PATH\` process runs: every
vCPU leaves the guest and parks (PUT /vm/state {"state":"paused"}). Its
devices' host sides keep their state; \`resume\` continues.

Options:
  --api-socket PATH  the control API's Unix socket
  -h, --help         this help

${CLIENT_STATUSES}
`,
  resume: `Usage: deno run -A main.ts resume --api-socket PATH

Lets the VM that a \`main.ts run --api-socket PATH\` process paused continue
(PUT /vm/state {"state":"running"}).

Options:
  --api-socket PATH  the control API's Unix socket
  -h, --help         this help

${CLIENT_STATUSES}
`,
  snapshot: `Usage: deno run -A main.ts snapshot --api-socket PATH --to DIR [--stop]
                                       [--diff --parent PDIR]

Snapshots the VM that a \`main.ts run --api-socket PATH\` process runs: it
pauses the VM, writes its state and memory into DIR (resolved here, written
by the server), and resumes it (PUT /snapshot/create).

Options:
  --api-socket PATH  the control API's Unix socket
  --to DIR           the snapshot's directory
  --stop             leave the VM paused after the snapshot
  --diff             write only the pages changed since PDIR, the VM's last
                     snapshot (the process must run with --track-dirty-pages);
                     restoring DIR reads its chain of parents, which must stay
  --parent PDIR      the diff's parent (with --diff)
  -h, --help         this help

${CLIENT_STATUSES}
`,
  restore: `Usage: deno run -A main.ts restore DIR [--lazy|--eager] [--api-socket PATH] [--no-stdin]
                                      [--cid N] [--mac MAC] [--track-dirty-pages]

Restores the VM of the snapshot in DIR and continues it in this process, with
\`run\`'s console (stdout; standard input to the guest) and exit statuses.
Each vsock device tells the guest its host connections are gone (a transport
reset); a clone takes its own identity with --cid and --mac.

Options:
  --lazy             map guest memory from the snapshot's memory file
                     copy-on-write: restore time does not grow with RAM (default)
  --eager            copy guest memory from the memory file
  --api-socket PATH  serve the control API on the Unix socket PATH
  --no-stdin         do not forward standard input to the guest
  --cid N            the vsock device's CID (3 to 4294967294) for this clone
  --mac MAC          the net device's MAC (xx:xx:xx:xx:xx:xx) for this clone
  --track-dirty-pages
                     track written pages from the first run: DIR is then the
                     parent a \`snapshot --diff --parent DIR\` may name
  -h, --help         this help

Exit status: as \`run\` (see main.ts run --help); 2 also when DIR is not a
snapshot (the section that is missing, truncated, corrupt or of another
version is named), is of another host CPU, or --cid/--mac is malformed or
has no device to take it.
`,
  load: `Usage: deno run -A main.ts load --api-socket PATH --from DIR [--lazy|--eager]

Replaces the VM that a \`main.ts run --api-socket PATH\` (or \`restore\`)
process runs by the VM of the snapshot in DIR (PUT /snapshot/load): that
process closes its VM and continues the snapshot's in its place, with the
same console, API socket and exit statuses. The VM must be paused first
(\`main.ts pause\`); the snapshot is checked before anything is closed: a
missing, corrupt or foreign one is refused and the VM stays as it was.

Options:
  --api-socket PATH  the control API's Unix socket
  --from DIR         the snapshot's directory (resolved here)
  --lazy             map guest memory from the memory file copy-on-write (default)
  --eager            copy guest memory from the memory file
  -h, --help         this help

${CLIENT_STATUSES}
`,
  migrate: `Usage: deno run -A main.ts migrate --api-socket PATH --to tcp:HOST:PORT

Migrates the VM that a \`main.ts run --api-socket PATH\` process runs, live, to
a \`main.ts run --incoming tcp:HOST:PORT\` process (PUT /migrate). The source
keeps running until the target confirms; then the source process exits 0 and
so does this command.

Options:
  --api-socket PATH  the source's control API socket
  --to tcp:HOST:PORT the target (HOST a name, IPv4, or [IPv6]; PORT 1-65535)
  -h, --help         this help

${CLIENT_STATUSES}
`,
};

function output(io: ApiCommandIo, text: string): number {
  if (io.output) io.output(text);
  else Deno.stdout.writeSync(new TextEncoder().encode(text));
  return ExitStatus.ok;
}

/**
 * Checks an `--api-socket` value before anything starts: a usage error for a
 * path that is too long, not a socket, or where a server already listens.
 *
 * @param path The option's value.
 * @returns The path.
 * @example
 * ```ts ignore
 * await checkApiSocketOption("/tmp/vm.sock");
 * ```
 */
export async function checkApiSocketOption(path: string): Promise<string> {
  try {
    await checkApiSocketPath(path);
  } catch (e) {
    if (e instanceof DenovisorError && e.code !== "IO") {
      throw new UsageError(`--api-socket: ${e.message}`);
    }
    throw e;
  }
  return path;
}

/**
 * Parses `run --incoming`'s value: `tcp:HOST:PORT` only (QEMU's convention).
 *
 * @param value The option's value.
 * @returns The address.
 * @example
 * ```ts
 * import { parseIncoming } from "denovisor/src/cli/api_commands.ts";
 * console.log(parseIncoming("tcp:0.0.0.0:4444").port); // 4444
 * ```
 */
export function parseIncoming(value: string): Extract<MigrationAddress, { transport: "tcp" }> {
  const address = migrationAddress(value, "--incoming");
  if (address.transport !== "tcp") {
    throw new UsageError(`--incoming must be tcp:HOST:PORT, got "${value}"`);
  }
  return address;
}

function migrationAddress(value: string, flag: string): MigrationAddress {
  try {
    return parseMigrationAddress(value);
  } catch (e) {
    if (e instanceof DenovisorError) throw new UsageError(`${flag}: ${e.message}`);
    throw e;
  }
}

/** `run --incoming`: waits for a migrating VM (when that exists). */
export function runIncoming(request: IncomingRequest, io: ApiCommandIo): Promise<number> {
  if (!CLI_ACTIONS.incoming) notAvailable("run --incoming (receiving a migration)");
  return CLI_ACTIONS.incoming(request, io);
}

function requireSocket(value: string | undefined, command: string): string {
  if (value === undefined || value === "") {
    throw new UsageError(`missing --api-socket PATH (see ${command} --help)`);
  }
  return value;
}

/** Runs one API call, turning its error answers into the CLI's errors. */
async function call<T>(
  path: string,
  what: string,
  fn: (client: ApiClient) => Promise<T>,
): Promise<T> {
  using client = new ApiClient(path);
  try {
    return await fn(client);
  } catch (e) {
    if (e instanceof ApiError) {
      if (e.status === 501) throw new UsageError(`${what} is not available yet: ${e.message}`);
      throw new DenovisorError("API_REFUSED", `${what} refused: ${e.apiCode}: ${e.message}`);
    }
    throw e;
  }
}

function parse(
  args: string[],
  options: Record<string, { type: "string" | "boolean" }>,
): { values: Record<string, string | boolean | undefined>; positionals: string[] } {
  const { values, positionals } = parseArgs({
    args,
    strict: true,
    allowPositionals: true,
    options: { ...options, help: { type: "boolean", short: "h" } },
  });
  return { values: values as Record<string, string | boolean | undefined>, positionals };
}

async function stateCommand(
  command: "pause" | "resume",
  args: string[],
  io: ApiCommandIo,
): Promise<number> {
  const { values, positionals } = parse(args, { "api-socket": { type: "string" } });
  if (values.help) return output(io, API_COMMAND_HELP[command]);
  if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"`);
  const path = requireSocket(values["api-socket"] as string | undefined, command);
  const { state } = await call(
    path,
    command,
    (c) => command === "pause" ? c.pause() : c.resume(),
  );
  io.error(`denovisor: the VM is ${state}\n`);
  return ExitStatus.ok;
}

/**
 * `main.ts pause --api-socket PATH`.
 *
 * @param args The command's arguments.
 * @param io Where messages go.
 * @returns The exit status.
 * @example
 * ```ts ignore
 * Deno.exit(await pauseCommand(["--api-socket", "/tmp/vm.sock"], { error: console.error }));
 * ```
 */
export function pauseCommand(args: string[], io: ApiCommandIo): Promise<number> {
  return stateCommand("pause", args, io);
}

/**
 * `main.ts resume --api-socket PATH`.
 *
 * @param args The command's arguments.
 * @param io Where messages go.
 * @returns The exit status.
 * @example
 * ```ts ignore
 * Deno.exit(await resumeCommand(["--api-socket", "/tmp/vm.sock"], { error: console.error }));
 * ```
 */
export function resumeCommand(args: string[], io: ApiCommandIo): Promise<number> {
  return stateCommand("resume", args, io);
}

/**
 * `main.ts snapshot --api-socket PATH --to DIR [--stop]`.
 *
 * @param args The command's arguments.
 * @param io Where messages go.
 * @returns The exit status.
 * @example
 * ```ts ignore
 * await snapshotCommand(["--api-socket", "/tmp/vm.sock", "--to", "snap"], { error: console.error });
 * ```
 */
export async function snapshotCommand(args: string[], io: ApiCommandIo): Promise<number> {
  const { values, positionals } = parse(args, {
    "api-socket": { type: "string" },
    to: { type: "string" },
    stop: { type: "boolean" },
    diff: { type: "boolean" },
    parent: { type: "string" },
  });
  if (values.help) return output(io, API_COMMAND_HELP.snapshot);
  if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"`);
  const path = requireSocket(values["api-socket"] as string | undefined, "snapshot");
  const to = values.to as string | undefined;
  if (to === undefined || to === "") throw new UsageError("missing --to DIR (see snapshot --help)");
  const parentArg = values.parent as string | undefined;
  if (values.diff && (parentArg === undefined || parentArg === "")) {
    throw new UsageError(
      "--diff needs --parent PDIR, the VM's last snapshot (see snapshot --help)",
    );
  }
  if (!values.diff && parentArg !== undefined) {
    throw new UsageError("--parent is for a diff snapshot: add --diff");
  }
  // The server may run in another directory: it gets absolute paths.
  const dir = resolve(to);
  const parent = parentArg === undefined ? undefined : resolve(parentArg);
  await call(
    path,
    "snapshot",
    (c) => c.snapshot(dir, { resume: !values.stop, ...(parent ? { parent } : {}) }),
  );
  io.error(
    `denovisor: ${parent ? `diff snapshot (against ${parent})` : "snapshot"} written to ${dir}` +
      `${values.stop ? " (the VM stays paused)" : ""}\n`,
  );
  return ExitStatus.ok;
}

/**
 * `main.ts load --api-socket PATH --from DIR [--lazy|--eager]`.
 *
 * @param args The command's arguments.
 * @param io Where messages go.
 * @returns The exit status.
 * @example
 * ```ts ignore
 * await loadCommand(["--api-socket", "/tmp/vm.sock", "--from", "snap"], { error: console.error });
 * ```
 */
export async function loadCommand(args: string[], io: ApiCommandIo): Promise<number> {
  const { values, positionals } = parse(args, {
    "api-socket": { type: "string" },
    from: { type: "string" },
    lazy: { type: "boolean" },
    eager: { type: "boolean" },
  });
  if (values.help) return output(io, API_COMMAND_HELP.load);
  if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"`);
  const path = requireSocket(values["api-socket"] as string | undefined, "load");
  const from = values.from as string | undefined;
  if (from === undefined || from === "") {
    throw new UsageError("missing --from DIR (see load --help)");
  }
  if (values.lazy && values.eager) throw new UsageError("--lazy and --eager exclude each other");
  const dir = resolve(from);
  const mode = values.eager ? "eager" : "lazy";
  await call(path, "load", (c) => c.load(dir, { mode }));
  io.error(`denovisor: the VM now runs the snapshot ${dir} (${mode})\n`);
  return ExitStatus.ok;
}

/**
 * `main.ts restore DIR [--lazy|--eager] [--api-socket PATH] [--no-stdin]`.
 *
 * @param args The command's arguments.
 * @param io Where messages go.
 * @returns The exit status.
 * @example
 * ```ts ignore
 * Deno.exit(await restoreCommand(["snap", "--eager"], { error: console.error }));
 * ```
 */
export async function restoreCommand(args: string[], io: ApiCommandIo): Promise<number> {
  const { values, positionals } = parse(args, {
    lazy: { type: "boolean" },
    eager: { type: "boolean" },
    "api-socket": { type: "string" },
    "no-stdin": { type: "boolean" },
    cid: { type: "string" },
    mac: { type: "string" },
    "track-dirty-pages": { type: "boolean" },
  });
  if (values.help) return output(io, API_COMMAND_HELP.restore);
  if (positionals.length !== 1) {
    throw new UsageError(
      positionals.length === 0
        ? "missing DIR (see restore --help)"
        : `expected one DIR, got ${positionals.length}`,
    );
  }
  if (values.lazy && values.eager) throw new UsageError("--lazy and --eager exclude each other");
  const identity = cloneIdentity(
    values.cid as string | undefined,
    values.mac as string | undefined,
  );
  const dir = resolve(positionals[0]);
  let isDirectory = false;
  try {
    isDirectory = (await Deno.stat(dir)).isDirectory;
  } catch (e) {
    throw new UsageError(`cannot read snapshot ${dir}: ${e instanceof Error ? e.message : e}`);
  }
  if (!isDirectory) throw new UsageError(`snapshot ${dir} is not a directory`);
  try {
    await Deno.stat(`${dir}/state`);
  } catch {
    throw new UsageError(`${dir} is not a snapshot: it has no state file`);
  }
  const apiSocket = values["api-socket"] as string | undefined;
  if (apiSocket !== undefined) await checkApiSocketOption(apiSocket);
  if (!CLI_ACTIONS.restore) notAvailable("restore");
  return await CLI_ACTIONS.restore({
    dir,
    mode: values.eager ? "eager" : "lazy",
    ...(apiSocket === undefined ? {} : { apiSocket }),
    stdin: !values["no-stdin"],
    ...(identity ? { identity } : {}),
    ...(values["track-dirty-pages"] ? { trackDirtyPages: true } : {}),
  }, io);
}

/** `restore --cid N --mac MAC`: checked here, before the snapshot is read. */
function cloneIdentity(
  cid: string | undefined,
  mac: string | undefined,
): CloneIdentity | undefined {
  if (cid === undefined && mac === undefined) return undefined;
  const identity: CloneIdentity = {};
  if (cid !== undefined) {
    const n = /^[0-9]+$/.test(cid) ? Number(cid) : NaN;
    if (!Number.isSafeInteger(n) || n < 3 || n > 4294967294) {
      throw new UsageError(`--cid must be an integer from 3 to 4294967294, got "${cid}"`);
    }
    identity.cid = n;
  }
  if (mac !== undefined) {
    const m = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i.test(mac) ? parseInt(mac.slice(0, 2), 16) : NaN;
    if (Number.isNaN(m) || (m & 1) !== 0) {
      throw new UsageError(`--mac must be a unicast xx:xx:xx:xx:xx:xx, got "${mac}"`);
    }
    identity.mac = mac;
  }
  return identity;
}

/**
 * `main.ts migrate --api-socket PATH --to tcp:HOST:PORT`.
 *
 * @param args The command's arguments.
 * @param io Where messages go.
 * @returns The exit status.
 * @example
 * ```ts ignore
 * await migrateCommand(["--api-socket", "/tmp/vm.sock", "--to", "tcp:127.0.0.1:4444"], {
 *   error: console.error,
 * });
 * ```
 */
export async function migrateCommand(args: string[], io: ApiCommandIo): Promise<number> {
  const { values, positionals } = parse(args, {
    "api-socket": { type: "string" },
    to: { type: "string" },
  });
  if (values.help) return output(io, API_COMMAND_HELP.migrate);
  if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"`);
  const path = requireSocket(values["api-socket"] as string | undefined, "migrate");
  const to = values.to as string | undefined;
  if (to === undefined) throw new UsageError("missing --to tcp:HOST:PORT (see migrate --help)");
  const address = migrationAddress(to, "--to");
  if (address.transport !== "tcp") {
    throw new UsageError(`--to must be tcp:HOST:PORT, got "${to}"`);
  }
  await call(path, "migrate", (c) => c.migrate(to));
  io.error(`denovisor: the VM migrated to ${to}\n`);
  return ExitStatus.ok;
}
