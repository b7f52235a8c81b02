/**
 * Driving a guest over its serial console, as a person at a terminal would:
 * wait for text, type a line, read a command's output. What the Linux tests use
 * to boot a kernel to a shell and run commands in it, and what a program can use
 * to script a guest.
 *
 * @module
 */

import { DenovisorError } from "./errors.ts";
import type { Vm } from "./vm.ts";

/** How often the console is polled while waiting (ms). */
const POLL_MS = 10;
/** How much of the console a session keeps to match against (characters). */
const KEPT_CHARS = 1 << 20;
/** How many lines of the console an error message quotes. */
const QUOTED_LINES = 15;

/** Options of {@link ConsoleDriver.waitFor} and {@link ConsoleDriver.exec}. */
export interface WaitOptions {
  /** Give up after this many milliseconds (default 60000). */
  timeoutMs?: number;
}

/** What a command printed and how it ended. */
export interface ExecResult {
  /** Its standard output and error as the terminal showed them, `\r\n` made `\n`. */
  output: string;
  /** The shell's `$?` after it. */
  status: number;
}

/** The last `n` lines of `text`, for error messages. */
export function lastLines(text: string, n = QUOTED_LINES): string {
  return text.replace(/\r/g, "").trimEnd().split("\n").slice(-n).join("\n");
}

/**
 * A scripted terminal on a running VM's serial console. Create it before
 * {@link Vm.run}, keep the run's promise, and drive the guest while it runs.
 * When the guest stops answering (a wait times out) or the run ends first, the
 * wait throws a `DenovisorError` (`GUEST_UNRESPONSIVE`, or `GUEST_STOPPED`)
 * whose message quotes the last console lines.
 *
 * @example
 * ```ts ignore
 * import { ConsoleDriver, Vm } from "denovisor";
 * using vm = await Vm.create({ memoryMiB: 256, interrupts: true });
 * vm.loadLinux({ kernel, initrd, cmdline: "console=ttyS0 rdinit=/init" });
 * const session = new ConsoleDriver(vm);
 * const run = session.watch(vm.run({ timeoutMs: 300_000 }));
 * await session.waitFor(/# $/m);
 * console.log((await session.exec("uname -r")).output);
 * session.send("poweroff -f\n");
 * console.log((await run).reason); // "power_off"
 * ```
 */
export class ConsoleDriver {
  #vm: Vm;
  #text = "";
  /** Where in `#text` the next wait starts matching. */
  #cursor = 0;
  #ended: string | undefined;
  #commands = 0;

  /**
   * Drives `vm`'s console; nothing is read until the first wait.
   *
   * @param vm The VM whose console to drive.
   */
  constructor(vm: Vm) {
    this.#vm = vm;
  }

  /** Everything the guest printed that this session has read (its last MiB). */
  get transcript(): string {
    return this.#text;
  }

  /**
   * Follows a run: once it ends, waits fail at once instead of timing out.
   *
   * @param run The promise of {@link Vm.run}.
   * @returns The same promise.
   */
  watch<T extends { summary: string }>(run: Promise<T>): Promise<T> {
    run.then(
      (r) => (this.#ended = r.summary),
      (e) => (this.#ended = e instanceof Error ? e.message : String(e)),
    );
    return run;
  }

  #poll(): void {
    const text = this.#vm.readConsole();
    if (text.length === 0) return;
    this.#text += text;
    if (this.#text.length > KEPT_CHARS) {
      const drop = this.#text.length - KEPT_CHARS;
      this.#text = this.#text.slice(drop);
      this.#cursor = Math.max(0, this.#cursor - drop);
    }
  }

  /**
   * Types `text` into the guest's console.
   *
   * @param text What to type (a line needs its `\n`).
   */
  send(text: string): void {
    this.#vm.sendConsoleInput(text);
  }

  /**
   * Waits until the console shows `pattern` after what earlier waits matched.
   *
   * @param pattern A string to find, or a regular expression to match.
   * @param options The timeout.
   * @returns The match (its groups for a regular expression).
   * @throws {DenovisorError} `GUEST_UNRESPONSIVE` on timeout, `GUEST_STOPPED`
   *   when the run ended first; both quote the last console lines.
   */
  async waitFor(pattern: string | RegExp, options: WaitOptions = {}): Promise<RegExpExecArray> {
    const timeoutMs = options.timeoutMs ?? 60_000;
    const regex = typeof pattern === "string"
      ? new RegExp(pattern.replace(/[\\^$.*+?()[\]{}|]/g, "\\$&"))
      : pattern;
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      this.#poll();
      const match = regex.exec(this.#text.slice(this.#cursor));
      if (match) {
        this.#cursor += match.index + match[0].length;
        return match;
      }
      const what = `waiting for ${regex}`;
      if (this.#ended !== undefined) {
        this.#poll();
        if (regex.test(this.#text.slice(this.#cursor))) continue;
        throw new DenovisorError(
          "GUEST_STOPPED",
          `the guest stopped (${this.#ended}) while ${what}; last console lines:\n` +
            lastLines(this.#text),
        );
      }
      if (performance.now() > deadline) {
        throw new DenovisorError(
          "GUEST_UNRESPONSIVE",
          `the guest stopped answering: ${timeoutMs} ms ${what}; last console lines:\n` +
            lastLines(this.#text),
        );
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }

  /**
   * Runs a shell command line in the guest (a POSIX shell at its prompt) and
   * returns what it printed and its status. The output is framed by markers the
   * shell prints (`printf`), so the echo of the typed line never matches them.
   *
   * @param command The command line (one line).
   * @param options The timeout.
   * @returns Its output and `$?`.
   */
  async exec(command: string, options: WaitOptions = {}): Promise<ExecResult> {
    if (command.includes("\n")) {
      throw new DenovisorError("INVALID_ARGUMENT", "exec takes one command line");
    }
    const id = ++this.#commands;
    this.send(`printf '@%s@\\n' B${id}; ${command}; printf '@%s@ %d\\n' E${id} $?\n`);
    await this.waitFor(new RegExp(`@B${id}@\\r?\\n`), options);
    const end = await this.waitFor(new RegExp(`([\\s\\S]*?)@E${id}@ (\\d+)\\r?\\n`), options);
    return { output: end[1].replace(/\r\n/g, "\n"), status: Number(end[2]) };
  }
}
