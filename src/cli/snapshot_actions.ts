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
import { Vm } from "../vm.ts";
import type { ApiCommandIo, RestoreRequest } from "./api_commands.ts";
import { statusOfResult } from "./exit_status.ts";
import { runVm, summaryLine } from "./run_vm.ts";

/**
 * The snapshot handler of `PUT /snapshot/create` for `vm`: pause, write the
 * snapshot into the (absolute) directory, resume unless `resume: false`.
 *
 * @example
 * ```ts ignore
 * await serveApi(vm, { path: "/tmp/vm.sock", handlers: snapshotHandlers(vm) });
 * ```
 *
 * @param vm The VM the API serves.
 * @returns The handlers.
 */
export function snapshotHandlers(vm: Vm): ApiHandlers {
  return {
    snapshot: (dir, options) => vm.snapshot(dir, { resume: options.resume }),
  };
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
  });
  io.error(summaryLine(result));
  return statusOfResult(result);
}
