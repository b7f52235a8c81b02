/**
 * Snapshots through the CLI and the control API: the `snapshot` handler a
 * `run --api-socket` process serves (`main.ts snapshot --api-socket PATH --to
 * DIR`), and `main.ts restore DIR`, which continues the snapshot's VM in this
 * process with `run`'s console and exit statuses. Both plug into
 * `CLI_ACTIONS` (`./api_commands.ts`).
 *
 * @module
 */

import type { ApiHandlers } from "../api/server.ts";
import { DenovisorError } from "../errors.ts";
import { inspectSnapshot, parseSnapshotConfig, type SnapshotInfo } from "../snapshot.ts";
import { Vm } from "../vm.ts";
import type { ApiCommandIo, RestoreRequest } from "./api_commands.ts";
import { statusOfResult } from "./exit_status.ts";
import { type RunSession, runVm, summaryLine } from "./run_vm.ts";

/** The longest chain of diffs a restore follows (as the core's reader). */
const MAX_CHAIN = 64;

/**
 * The snapshot handlers for `vm`. `PUT /snapshot/create`: pause, write the
 * snapshot into the (absolute) directory, resume unless `resume: false`; with
 * a `parent`, a diff against it (the run must track dirty pages,
 * `--track-dirty-pages`). `PUT /snapshot/load` (only with a `session`, the
 * run `runVm` drives): {@link loadSnapshot}.
 *
 * @example
 * ```ts ignore
 * await serveApi(vm, { path: "/tmp/vm.sock", handlers: snapshotHandlers(vm) });
 * ```
 *
 * @param vm The VM the API serves.
 * @param session The run that can replace it (absent: no `PUT /snapshot/load`).
 * @returns The handlers.
 */
export function snapshotHandlers(vm: Vm, session?: RunSession): ApiHandlers {
  return {
    snapshot: (dir, options) => {
      if (options.parent === undefined) return vm.snapshot(dir, { resume: options.resume });
      if (session !== undefined && !session.trackDirtyPages) {
        throw new DenovisorError(
          "INVALID_ARGUMENT",
          "a diff snapshot needs dirty-page tracking, which this VM does not have: " +
            "start it with --track-dirty-pages (run or restore)",
        );
      }
      return vm.snapshot(dir, { resume: options.resume, diff: true, parent: options.parent });
    },
    ...(session === undefined ? {} : {
      restore: (dir: string, options: { mode: "lazy" | "eager" }) =>
        loadSnapshot(session, dir, options.mode),
    }),
  };
}

/**
 * Checks everything about the snapshot in `dir` that can be checked without
 * building its VM: its state file (every section's checksum and contents)
 * and memory file's size, that this host can run it, its `config` section,
 * and each parent of a diff back to its full base (present, valid, the same
 * RAM size). What is left to the restore itself: the memory files'
 * checksums (an eager restore reads them) and each parent's state checksum
 * against the one its diff recorded.
 *
 * @example
 * ```ts ignore
 * const info = await checkSnapshot("/tmp/snap");
 * ```
 *
 * @param dir The snapshot directory (absolute).
 * @returns What {@link inspectSnapshot} found in it.
 * @throws {DenovisorError} `SNAPSHOT_INVALID` (a missing directory or state
 *   file included), `SNAPSHOT_WRONG_HOST`.
 */
export async function checkSnapshot(dir: string): Promise<SnapshotInfo> {
  const info = await inspectOne(dir, dir);
  if (!info.hostCheck.ok) {
    throw new DenovisorError(
      "SNAPSHOT_WRONG_HOST",
      `snapshot ${dir} is of another host: ${info.hostCheck.problems.join("; ")}`,
    );
  }
  parseSnapshotConfig(info.config);
  let link = info;
  let linkDir = dir;
  for (let depth = 0; link.memory.kind === "diff"; depth++) {
    if (depth >= MAX_CHAIN) {
      throw new DenovisorError(
        "SNAPSHOT_INVALID",
        `snapshot ${dir}: a chain of over ${MAX_CHAIN} diffs`,
      );
    }
    const parent = link.memory.parent?.dir;
    if (parent === undefined) {
      throw new DenovisorError(
        "SNAPSHOT_INVALID",
        `snapshot memory: ${linkDir} is a diff with no parent`,
      );
    }
    const parentDir = parent.startsWith("/") ? parent : `${linkDir}/${parent}`;
    const next = await inspectOne(parentDir, dir);
    if (next.memory.size !== info.memory.size) {
      throw new DenovisorError(
        "SNAPSHOT_INVALID",
        `snapshot parent: ${parentDir} has ${next.memory.size} bytes of RAM, ${dir} ${info.memory.size}`,
      );
    }
    link = next;
    linkDir = parentDir;
  }
  return info;
}

/** {@link inspectSnapshot}, with a directory that cannot be read a SNAPSHOT_INVALID too. */
async function inspectOne(dir: string, of: string): Promise<SnapshotInfo> {
  try {
    return await inspectSnapshot(dir);
  } catch (e) {
    if (e instanceof DenovisorError && e.code.startsWith("SNAPSHOT_")) throw e;
    const what = dir === of ? `snapshot ${dir}` : `snapshot ${of}: its parent ${dir}`;
    throw new DenovisorError(
      "SNAPSHOT_INVALID",
      `${what} cannot be read: ${e instanceof Error ? e.message : e}`,
    );
  }
}

/**
 * `PUT /snapshot/load`: replaces the run's VM by the one restored from `dir`,
 * which then runs in its place (same console, standard input, API and exit
 * statuses). The VM must be paused (or its run stopped): a running guest
 * would lose what it does after the request. The snapshot is checked first
 * ({@link checkSnapshot}): a bad one is refused and the VM stays as it was.
 *
 * @example
 * ```ts ignore
 * await loadSnapshot(session, "/tmp/snap", "lazy"); // { state: "running", ... }
 * ```
 *
 * @param session The run (from `runVm`).
 * @param dir The snapshot directory (absolute).
 * @param mode Lazy (memory mapped copy-on-write) or eager (copied).
 * @returns The new VM's state, the snapshot loaded and the restore's time.
 * @throws {DenovisorError} `BUSY` when the VM runs, `INVALID_ARGUMENT` for
 *   a relative path, `SNAPSHOT_INVALID` / `SNAPSHOT_WRONG_HOST` for a
 *   snapshot this host cannot load.
 */
export async function loadSnapshot(
  session: RunSession,
  dir: string,
  mode: "lazy" | "eager",
): Promise<{ state: string; dir: string; mode: string; restoreMs: number }> {
  if (!dir.startsWith("/")) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `the snapshot directory must be absolute, got ${dir}`,
    );
  }
  const state = session.vm.state;
  if (state !== "paused" && state !== "stopped") {
    throw new DenovisorError(
      "BUSY",
      `the VM is ${state}: pause it (PUT /vm/state {"state":"paused"}) before loading a snapshot`,
    );
  }
  await checkSnapshot(dir);
  const started = performance.now();
  const vm = await session.replace(() => Vm.restore(dir, { mode, console: "stdout" }));
  return { state: vm.state, dir, mode, restoreMs: performance.now() - started };
}

/**
 * `main.ts restore DIR`: rebuilds the snapshot's VM (its console to stdout, a
 * clone's identity if asked) and runs it as `run` does.
 *
 * @example
 * ```ts ignore
 * const status = await restoreFromCli({ dir: "/tmp/snap", mode: "lazy", stdin: false }, {
 *   error: (t) => Deno.stderr.writeSync(new TextEncoder().encode(t)),
 * });
 * ```
 *
 * @param request The snapshot, mode, API socket, stdin and identity.
 * @param io Where the summary line goes.
 * @returns The exit status, as `run`'s.
 */
export async function restoreFromCli(request: RestoreRequest, io: ApiCommandIo): Promise<number> {
  using vm = await Vm.restore(request.dir, {
    mode: request.mode,
    console: "stdout",
    ...(request.identity ? { identity: request.identity } : {}),
  });
  const result = await runVm(vm, {
    stdin: request.stdin,
    ...(request.apiSocket === undefined ? {} : { apiSocket: request.apiSocket }),
    ...(request.trackDirtyPages ? { trackDirtyPages: true } : {}),
  });
  io.error(summaryLine(result));
  return statusOfResult(result);
}
