/**
 * The interactive serial console of `main.ts run`: the host's standard input
 * typed into the guest's COM1, with QEMU's escape key.
 *
 * On a terminal, standard input goes to raw mode for the run (every key,
 * Ctrl-C included, reaches the guest as typed) and is restored when the run
 * ends, however it ends. Ctrl-A is the escape key, as in QEMU's
 * `-serial mon:stdio`: Ctrl-A x quits (the VM stops), Ctrl-A Ctrl-A sends one
 * Ctrl-A to the guest, Ctrl-A h prints the keys. Piped input is forwarded the
 * same way (escapes included) until it ends; the run goes on after that.
 *
 * @module
 */

import { DenovisorError } from "./errors.ts";

/** The escape key: Ctrl-A. */
export const ESCAPE_KEY = 0x01;

/** What {@link ConsoleEscape.feed} made of some input. */
export interface EscapeResult {
  /** Bytes to send to the guest. */
  bytes: Uint8Array;
  /** The user asked to quit (Ctrl-A x). */
  quit: boolean;
  /** The user asked for the key help (Ctrl-A h). */
  help: boolean;
}

/** The escape keys, as {@link ConsoleEscape} understands them. */
export const ESCAPE_HELP = `C-a x    quit (stop the VM)
C-a C-a  send C-a to the guest
C-a h    this help
`;

/**
 * Splits host input into bytes for the guest and escape commands. Keeps its
 * state across calls, so an escape split between two reads still works.
 *
 * @example
 * ```ts
 * import { ConsoleEscape } from "denovisor/src/console.ts";
 * const escape = new ConsoleEscape();
 * console.log(escape.feed(new Uint8Array([0x68, 0x01, 0x01, 0x69])).bytes); // [104, 1, 105]
 * console.log(escape.feed(new Uint8Array([0x01, 0x78])).quit); // true
 * ```
 */
export class ConsoleEscape {
  #escaped = false;

  /**
   * Takes the next chunk of host input.
   *
   * @param input Bytes read from the host.
   * @returns What to forward, and whether quit or help was asked for. Input
   *   after a quit is dropped.
   */
  feed(input: Uint8Array): EscapeResult {
    const out: number[] = [];
    let quit = false;
    let help = false;
    for (const byte of input) {
      if (quit) break;
      if (!this.#escaped) {
        if (byte === ESCAPE_KEY) this.#escaped = true;
        else out.push(byte);
        continue;
      }
      this.#escaped = false;
      if (byte === ESCAPE_KEY) out.push(ESCAPE_KEY);
      else if (byte === 0x78 || byte === 0x58) quit = true; // x, X
      else if (byte === 0x68 || byte === 0x48 || byte === 0x3f) help = true; // h, H, ?
      // Anything else after the escape key is dropped, as QEMU does.
    }
    return { bytes: new Uint8Array(out), quit, help };
  }
}

/** Where the interactive console reads and what it drives. */
export interface ConsoleTarget {
  /** Queues bytes for the guest's COM1 (`Vm.sendConsoleInput`). */
  sendConsoleInput(input: Uint8Array): void;
  /** Stops the VM (`Vm.stop`). */
  stop(): void;
}

/** Options of {@link attachStdin}. */
export interface AttachOptions {
  /** The input (default `Deno.stdin`). */
  stdin?: {
    readonly readable: ReadableStream<Uint8Array>;
    isTerminal(): boolean;
    setRaw(mode: boolean, options?: { cbreak: boolean }): void;
  };
  /** Where the key help and notices go (default: standard error). */
  notice?: (text: string) => void;
}

/** A running console; {@link ConsoleSession.close} ends it. */
export interface ConsoleSession extends Disposable {
  /** Whether the user quit with Ctrl-A x. */
  readonly quit: boolean;
  /** Stops forwarding and restores the terminal. Idempotent. */
  close(): void;
}

const stderrNotice = (text: string) => Deno.stderr.writeSync(new TextEncoder().encode(text));

/** How long to wait before retrying input the guest had no room for. */
const RETRY_MS = 10;
/** How often a quit asks the VM to stop again until the run has ended. */
const STOP_RETRY_MS = 20;

/**
 * Forwards standard input to a VM's serial console until {@link ConsoleSession.close}
 * (or `using`): raw mode on a terminal, Ctrl-A escapes, the terminal restored
 * on close. SIGTERM and SIGHUP stop the VM (so the run ends and the caller
 * closes the session) instead of killing the process with the terminal raw.
 *
 * @param target The VM (anything with `sendConsoleInput` and `stop`).
 * @param options The input and where notices go.
 * @returns The session.
 * @example
 * ```ts
 * import { attachStdin, Vm } from "denovisor";
 * using vm = await Vm.create({ console: "stdout", interrupts: true });
 * // vm.load(...)
 * using _console = attachStdin(vm);
 * await vm.run();
 * ```
 */
export function attachStdin(target: ConsoleTarget, options: AttachOptions = {}): ConsoleSession {
  const stdin = options.stdin ?? Deno.stdin;
  const notice = options.notice ?? stderrNotice;
  const escape = new ConsoleEscape();
  const raw = stdin.isTerminal();
  let closed = false;
  let quit = false;
  if (raw) stdin.setRaw(true);
  const reader = stdin.readable.getReader();

  // A stop that lands before the run has started its vCPUs is lost, so keep
  // asking until the session is closed (when the run has ended).
  const stopUntilClosed = () => {
    if (closed) return;
    target.stop();
    setTimeout(stopUntilClosed, STOP_RETRY_MS);
  };
  // The run then ends, and closing the session restores the terminal.
  const onSignal = () => stopUntilClosed();
  const signals: Deno.Signal[] = ["SIGTERM", "SIGHUP"];
  for (const signal of signals) Deno.addSignalListener(signal, onSignal);

  const send = async (bytes: Uint8Array) => {
    while (!closed) {
      try {
        target.sendConsoleInput(bytes);
        return;
      } catch (e) {
        // The guest is not reading and over 1 MiB waits: hold the rest back.
        if (!(e instanceof DenovisorError && e.code === "BUSY")) throw e;
        await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
      }
    }
  };

  const pump = async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done || closed) return;
      const { bytes, quit: wantsQuit, help } = escape.feed(value);
      if (bytes.length > 0) await send(bytes);
      if (help) notice(`\r\n${ESCAPE_HELP.replaceAll("\n", "\r\n")}`);
      if (wantsQuit) {
        quit = true;
        stopUntilClosed();
        return;
      }
    }
  };
  // A closed VM or a read error after close ends forwarding; nothing to report.
  pump().catch(() => {});

  const session: ConsoleSession = {
    get quit() {
      return quit;
    },
    close() {
      if (closed) return;
      closed = true;
      for (const signal of signals) Deno.removeSignalListener(signal, onSignal);
      reader.cancel().catch(() => {});
      reader.releaseLock();
      if (raw) {
        try {
          stdin.setRaw(false);
        } catch {
          // The terminal went away (hangup): nothing left to restore.
        }
      }
    },
    [Symbol.dispose]() {
      session.close();
    },
  };
  return session;
}
