/**
 * The `main.ts` child process the Linux CLI tests drive: a guest shell on
 * its serial console, reached through the child's standard input and output.
 *
 * @module
 */

import assert from "node:assert/strict";
import { MAIN } from "./_helpers.ts";

/** How long one shell command may take (kvmbox is slow). */
export const SHELL_COMMAND_MS = 120_000;

/**
 * A `main.ts` child process whose guest console a test drives through its
 * standard input and output (a guest shell on the serial console), its
 * standard error streamed too.
 */
export class CliShell {
  readonly child: Deno.ChildProcess;
  #out = "";
  #err = "";
  #writer: WritableStreamDefaultWriter<Uint8Array>;
  #reading: Promise<void>;
  #marks = 0;
  #exited = false;

  constructor(args: string[]) {
    this.child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", MAIN, ...args],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).spawn();
    this.#writer = this.child.stdin.getWriter();
    const pump = async (stream: ReadableStream<Uint8Array>, add: (t: string) => void) => {
      const decoder = new TextDecoder();
      for await (const chunk of stream) add(decoder.decode(chunk, { stream: true }));
    };
    this.#reading = Promise.all([
      pump(this.child.stdout, (t) => this.#out += t),
      pump(this.child.stderr, (t) => this.#err += t),
    ]).then(() => {});
    this.child.status.then(() => this.#exited = true);
  }

  /** Everything on its stdout so far. */
  get output(): string {
    return this.#out;
  }

  /** Everything on its stderr so far. */
  get stderr(): string {
    return this.#err;
  }

  /** Waits for `pattern` in stdout (or stderr) after offset `from`. */
  async waitFor(
    pattern: RegExp,
    from: number,
    timeoutMs: number,
    where: "stdout" | "stderr" = "stdout",
  ): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = (where === "stdout" ? this.#out : this.#err).slice(from).match(pattern);
      if (m) return m;
      if (this.#exited || Date.now() > deadline) {
        throw new Error(
          `no ${pattern} on ${where} (exited: ${this.#exited}); console:\n${
            this.#out.slice(-3000)
          }\nstderr:\n${this.#err.slice(-2000)}`,
        );
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** Types `text` on the guest's console. */
  async send(text: string): Promise<void> {
    await this.#writer.write(new TextEncoder().encode(text));
  }

  /** Runs a command that must exit 0; its output (between two marks). */
  async sh(command: string, timeoutMs = SHELL_COMMAND_MS): Promise<string> {
    const n = ++this.#marks;
    const from = this.#out.length;
    // The typed line echoes `$((6*7))`; only the shell's answer has `42`.
    await this.send(`echo B${n}@$((6*7)); ${command}; echo E${n}@$((6*7))@$?\n`);
    const m = await this.waitFor(
      new RegExp(`B${n}@42\\r?\\n([\\s\\S]*?)E${n}@42@(\\d+)`),
      from,
      timeoutMs,
    );
    assert.equal(m[2], "0", `${command} failed (${m[2]}):\n${m[1]}`);
    return m[1].replaceAll("\r", "");
  }

  /** A number the guest prints. */
  async number(command: string): Promise<number> {
    const out = (await this.sh(command)).trim();
    const n = Number(out);
    assert.ok(out !== "" && Number.isFinite(n), `${command}: ${out}`);
    return n;
  }

  /** Ends: standard input closes; the status and stderr once it exits. */
  async end(): Promise<{ code: number; stderr: string }> {
    await this.#writer.close().catch(() => {});
    const status = await this.child.status;
    await this.#reading;
    return { code: status.code, stderr: this.#err };
  }

  /** SIGKILL, unless it has exited. */
  kill(): void {
    if (this.#exited) return;
    try {
      this.child.kill("SIGKILL");
    } catch {
      // Already gone.
    }
  }
}
