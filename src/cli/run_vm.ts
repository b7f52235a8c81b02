/**
 * What `run` and `restore` share once their VM exists: standard input to the
 * guest's console, the control API while the VM runs, the run itself with its
 * `--watchdog`, and the summary line.
 *
 * @module
 */

import { type ApiHandlers, serveApi } from "../api/server.ts";
import { attachStdin } from "../console.ts";
import { lastLines } from "../console_driver.ts";
import { DenovisorError } from "../errors.ts";
import type { RunResult, Vm } from "../vm.ts";
import { CLI_ACTIONS } from "./api_commands.ts";

/** How {@link runVm} runs a VM. */
export interface RunVmInput {
  /** Forward standard input to the guest's console. */
  stdin: boolean;
  /** End the run when the console stays silent this long (0 or absent: never). */
  watchdogMs?: number;
  /** Serve the control API on this Unix socket while the VM runs. */
  apiSocket?: string;
  /** Track dirty pages from the start of every run (`--track-dirty-pages`):
   * what diff snapshots need. */
  trackDirtyPages?: boolean;
  /** Called with the VM whose run ended last (the one `PUT /snapshot/load`
   * put in place, if any) and its result, before {@link runVm} closes the VMs
   * it made: read its metrics here. */
  onRunEnd?(vm: Vm, result: RunResult): void;
}

/**
 * The run {@link runVm} drives, as the API's handlers see it: the VM that
 * runs now, and the one way to put another in its place.
 */
export interface RunSession {
  /** The VM that runs now (another one after {@link RunSession.replace}). */
  readonly vm: Vm;
  /** Whether every run tracks dirty pages from its start (`--track-dirty-pages`). */
  readonly trackDirtyPages: boolean;
  /**
   * Ends the current VM's run, closes it, and runs the VM `make` builds in
   * its place with the same console, standard input, API and exit statuses.
   * Validate everything that can be validated before calling this: once it
   * is called the current VM is gone, and if `make` throws the whole run
   * ends with that error.
   *
   * @param make Builds the new VM (e.g. `Vm.restore`).
   * @returns The new VM, running.
   * @throws {DenovisorError} `GUEST_STOPPED` when the run has already ended;
   *   whatever `make` throws.
   */
  replace(make: () => Promise<Vm>): Promise<Vm>;
}

/**
 * Runs a loaded (or restored) VM the way `run` does: standard input goes to
 * the guest (the terminal is restored however the run ends), the control API
 * is served until the run ends, and the watchdog stops a silent guest. A
 * `PUT /snapshot/load` replaces the VM (see {@link RunSession.replace}): the
 * run, the console and the API follow the new one, and the result is the
 * last VM's. The VMs loaded this way are closed here; `vm` stays the
 * caller's (closing it twice is harmless).
 *
 * @example
 * ```ts ignore
 * import { Vm } from "denovisor";
 * using vm = await Vm.restore("/tmp/snap", { console: "stdout" });
 * const result = await runVm(vm, { stdin: true, apiSocket: "/tmp/vm.sock" });
 * ```
 *
 * @param vm The VM, ready to run.
 * @param input Standard input, watchdog, API socket, dirty-page tracking.
 * @returns The last run's result.
 */
export async function runVm(vm: Vm, input: RunVmInput): Promise<RunResult> {
  let current = vm;
  const loaded: Vm[] = [];
  // Replacements so far, the latest one (settled or not), and whether one is under way.
  let swaps = 0;
  let swap: Promise<void> = Promise.resolve();
  let swapping = false;
  let swapFailure: unknown;
  let ended = false;
  let running!: Promise<RunResult>;
  let watchdog: Promise<number | undefined> | undefined;
  const start = (v: Vm) => {
    // Before the first run: a VM restored from a snapshot is then that
    // snapshot, the base of the next diff.
    if (input.trackDirtyPages) v.startDirtyLog();
    running = v.run();
    watchdog = input.watchdogMs ? watchConsole(v, running, input.watchdogMs) : undefined;
  };
  const session: RunSession = {
    get vm() {
      return current;
    },
    trackDirtyPages: input.trackDirtyPages ?? false,
    async replace(make) {
      if (ended || swapping) {
        throw new DenovisorError(
          ended ? "GUEST_STOPPED" : "BUSY",
          ended ? "the VM's run has ended" : "the VM is being replaced",
        );
      }
      let done!: () => void;
      swapping = true;
      swaps++;
      swap = new Promise((resolve) => (done = resolve));
      try {
        const old = current;
        old.stop();
        await running.catch(() => {});
        old.close();
        const next = await make();
        loaded.push(next);
        current = next;
        start(next);
        return next;
      } catch (e) {
        swapFailure = e;
        throw e;
      } finally {
        swapping = false;
        done();
      }
    },
  };
  // One standard input session for every VM of the run: input typed while a
  // VM is being replaced is dropped.
  using _stdin = input.stdin
    ? attachStdin({
      sendConsoleInput: (bytes) => {
        if (!swapping) current.sendConsoleInput(bytes);
      },
      stop: () => current.stop(),
    })
    : undefined;
  try {
    // The API is served until the run ends (closed before the VMs).
    await using _api = input.apiSocket === undefined ? undefined : await serveApi(() => current, {
      path: input.apiSocket,
      handlers: sessionHandlers(session),
    });
    start(current);
    for (;;) {
      const seen = swaps;
      const result = await running.catch((e) => {
        if (swaps !== seen) return undefined;
        throw e;
      });
      const silentMs = await watchdog;
      if (swaps !== seen) {
        // This run was ended to replace its VM: follow the new one.
        await swap;
        if (swapFailure !== undefined) throw swapFailure;
        continue;
      }
      ended = true;
      // Only a run that did not fail reaches here.
      const last = result!;
      if (silentMs !== undefined) {
        last.unresponsive = true;
        last.summary = `the guest stopped answering: no console output for ${silentMs} ms` +
          (last.console ? `; last console lines:\n${lastLines(last.console, 10)}` : "");
      }
      input.onRunEnd?.(current, last);
      return last;
    }
  } finally {
    ended = true;
    for (const v of loaded) v.close();
  }
}

/**
 * The API handlers of a run: the CLI's ({@link CLI_ACTIONS}), each applied
 * to the VM that runs when the request is served.
 */
function sessionHandlers(session: RunSession): ApiHandlers {
  const handlers = CLI_ACTIONS.apiHandlers?.(session.vm, session) ?? {};
  const follow = <K extends keyof ApiHandlers>(key: K): Partial<ApiHandlers> => {
    if (!handlers[key]) return {};
    const call = (...args: unknown[]) => {
      const now = CLI_ACTIONS.apiHandlers?.(session.vm, session)[key];
      if (!now) throw new DenovisorError("INVALID_ARGUMENT", `no ${key} handler`);
      return (now as (...a: unknown[]) => unknown)(...args);
    };
    return { [key]: call };
  };
  return { ...follow("snapshot"), ...follow("restore"), ...follow("migrate") };
}

/**
 * The one-line summary `run` and `restore` print to stderr.
 *
 * @example
 * ```ts ignore
 * Deno.stderr.writeSync(new TextEncoder().encode(summaryLine(result)));
 * ```
 *
 * @param result A run's result.
 * @returns The line, with its newline.
 */
export function summaryLine(result: RunResult): string {
  const ms = (v: number) => `${v.toFixed(2)} ms`;
  const dropped = result.consoleStreamDropped > 0
    ? ` · ${result.consoleStreamDropped} console bytes dropped (stdout did not drain)`
    : "";
  return `denovisor: ${result.summary} · ${result.exits} exits · run ${ms(result.timings.runMs)} ` +
    `(VM created in ${ms(result.timings.createMs)})${dropped}\n`;
}

/**
 * The `--watchdog`: stops the VM when its console stays silent for `limitMs`.
 * Resolves with the silence that stopped it, or undefined when the run ended
 * by itself.
 */
async function watchConsole(
  vm: Vm,
  run: Promise<RunResult>,
  limitMs: number,
): Promise<number | undefined> {
  let ended = false;
  run.finally(() => (ended = true)).catch(() => {});
  let lastOutput = performance.now();
  while (!ended) {
    await new Promise((resolve) => setTimeout(resolve, Math.min(250, limitMs)));
    if (ended) return undefined;
    if (vm.readConsole().length > 0) lastOutput = performance.now();
    const silent = performance.now() - lastOutput;
    if (silent >= limitMs) {
      vm.stop();
      return Math.round(silent);
    }
  }
  return undefined;
}
