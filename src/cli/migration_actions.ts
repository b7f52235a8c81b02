/**
 * The CLI's side of live migration: `run --incoming tcp:HOST:PORT` (wait for
 * a migrating VM, then run it like `run`) and the `PUT /migrate` handler that
 * `run --api-socket` serves (the source process then exits 0 once the target
 * runs). Plugged into the CLI through `CLI_ACTIONS` in `api_commands.ts`.
 *
 * @module
 */

import type { ApiHandlers } from "../api/server.ts";
import { DenovisorError } from "../errors.ts";
import { migrateVm, receiveMigration } from "../migration/migrate.ts";
import type { Vm } from "../vm.ts";
import type { ApiCommandIo, IncomingRequest } from "./api_commands.ts";
import { ExitStatus, statusOfError, statusOfResult } from "./exit_status.ts";
import { runVm, summaryLine } from "./run_vm.ts";

/**
 * `run --incoming`: waits for one migrating VM on the request's address,
 * then runs it as `run` does ({@link runVm}): console to stdout, standard
 * input, the control API with all its handlers (snapshot, load, migrate
 * on), the summary line and the exit statuses. A migration that fails before the VM runs leaves no VM
 * and exits non-zero (70) with the reason on stderr.
 *
 * @example
 * ```ts ignore
 * import { incomingFromCli } from "denovisor/src/cli/migration_actions.ts";
 * const status = await incomingFromCli(
 *   { address: { transport: "tcp", hostname: "127.0.0.1", port: 4444 }, stdin: false, quiet: false },
 *   { error: (t) => Deno.stderr.writeSync(new TextEncoder().encode(t)) },
 * );
 * ```
 *
 * @param request Where to listen, the API socket, stdin, quiet.
 * @param io Where messages go.
 * @returns The process exit status.
 */
export async function incomingFromCli(request: IncomingRequest, io: ApiCommandIo): Promise<number> {
  let vm: Vm;
  try {
    vm = await receiveMigration(request.address, {
      console: "stdout",
      onListening: (address) => {
        if (!request.quiet) io.error(`denovisor: waiting for a migrating VM on ${address}\n`);
      },
    });
  } catch (e) {
    io.error(`denovisor: ${(e as Error).message}\n`);
    return e instanceof DenovisorError ? statusOfError(e) : ExitStatus.vmmError;
  }
  try {
    // run's loop: stdin, the control API with every handler (snapshot, load,
    // migrate on), the summary and the statuses.
    const result = await runVm(vm, {
      stdin: request.stdin,
      ...(request.apiSocket === undefined ? {} : { apiSocket: request.apiSocket }),
    });
    if (!request.quiet) io.error(summaryLine(result));
    return statusOfResult(result);
  } finally {
    vm.close();
  }
}

/**
 * The `PUT /migrate` handler for a VM `run --api-socket` serves: migrates it
 * to the address and answers the migration's figures; the VM here then stops
 * (its run ends with status 0). A failed migration answers an error and the
 * VM runs on.
 *
 * @example
 * ```ts ignore
 * import { migrationHandlers } from "denovisor/src/cli/migration_actions.ts";
 * await serveApi(vm, { path: "/tmp/vm.sock", handlers: migrationHandlers(vm) });
 * ```
 *
 * @param vm The VM served.
 * @returns The handlers.
 */
export function migrationHandlers(vm: Vm): Pick<ApiHandlers, "migrate"> {
  return { migrate: (to: string) => migrateVm(vm, to) };
}
