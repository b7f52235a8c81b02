/**
 * What `run` and `restore` share once their VM exists: standard input to the
 * guest's console, the control API while the VM runs, the run itself with its
 * `--watchdog`, and the summary line.
 *
 * @module
 */

import { serveApi } from "../api/server.ts";
import { attachStdin } from "../console.ts";
import { lastLines } from "../console_driver.ts";
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
}

/**
 * Runs a loaded (or restored) VM the way `run` does: standard input goes to
 * the guest (the terminal is restored however the run ends), the control API
 * is served until the run ends, and the watchdog stops a silent guest.
 *
 * @example
 * ```ts ignore
 * import { Vm } from "denovisor";
 * using vm = await Vm.restore("/tmp/snap", { console: "stdout" });
 * const result = await runVm(vm, { stdin: true, apiSocket: "/tmp/vm.sock" });
 * ```
 *
 * @param vm The VM, ready to run.
 * @param input Standard input, watchdog and API socket.
 * @returns The run's result.
 */
export async function runVm(vm: Vm, input: RunVmInput): Promise<RunResult> {
  using _stdin = input.stdin ? attachStdin(vm) : undefined;
  // The API is served until the run ends (closed before the VM).
  await using _api = input.apiSocket === undefined
    ? undefined
    : await serveApi(vm, { path: input.apiSocket, handlers: CLI_ACTIONS.apiHandlers?.(vm) });
  const running = vm.run();
  const watchdog = input.watchdogMs ? watchConsole(vm, running, input.watchdogMs) : undefined;
  const result = await running;
  const silentMs = await watchdog;
  if (silentMs !== undefined) {
    result.unresponsive = true;
    result.summary = `the guest stopped answering: no console output for ${silentMs} ms` +
      (result.console ? `; last console lines:\n${lastLines(result.console, 10)}` : "");
  }
  return result;
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
