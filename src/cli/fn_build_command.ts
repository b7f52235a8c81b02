/**
 * `main.ts fn-build SOURCE [-o OUT]`: builds a function written against the
 * function SDK (`guest/fn/sdk/dv_fn.h`) into a static x86-64 Linux ELF.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { buildFunction } from "../build/fn_build.ts";
import { ExitStatus } from "./exit_status.ts";
import { UsageError } from "./usage_error.ts";

/** `fn-build --help`. */
export const FN_BUILD_HELP = `Usage: deno run -A main.ts fn-build SOURCE [-o OUT]

Builds SOURCE, a C function written against the function SDK
(guest/fn/sdk/dv_fn.h: dv_fn_input, dv_fn_output, dv_fn_error, dv_fn_exit),
into a static x86-64 Linux ELF with gcc -static -nostdlib -ffreestanding. The
ELF runs in the function runtime (main.ts serve NAME=OUT) and natively.
Builds are cached in .cache/fn/; the path of the ELF is printed.

Options:
  -o, --output OUT   copy the ELF there (default: print the cached path)
  -h, --help         this help

Exit status: 0 built; 2 bad arguments; 70 the build failed (gcc's messages on
stderr).
`;

/** Where `fn-build` writes. */
export interface FnBuildIo {
  /** Writes to standard error. */
  error(text: string): void;
  /** Writes the help and the ELF's path (default: standard output). */
  output?(text: string): void;
}

/**
 * Runs `fn-build`.
 *
 * @param args The arguments after `fn-build`.
 * @param io Where messages go.
 * @returns The exit status.
 * @throws {UsageError} for bad arguments; `DenovisorError` `BUILD_FAILED` when
 *   the build fails.
 * @example
 * ```ts ignore
 * import { fnBuildCommand } from "denovisor/src/cli/fn_build_command.ts";
 * await fnBuildCommand(["guest/fn/examples/echo.c", "-o", "/tmp/echo"], { error: console.error });
 * ```
 */
export async function fnBuildCommand(args: string[], io: FnBuildIo): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    options: {
      output: { type: "string", short: "o" },
      help: { type: "boolean", short: "h" },
    },
    allowPositionals: true,
  });
  const print = (text: string) => {
    if (io.output) io.output(text);
    else Deno.stdout.writeSync(new TextEncoder().encode(text));
  };
  if (values.help) {
    print(FN_BUILD_HELP);
    return ExitStatus.ok;
  }
  if (positionals.length !== 1) {
    throw new UsageError("fn-build takes one SOURCE (see fn-build --help)");
  }
  const path = await buildFunction(positionals[0], values.output);
  print(`${path}\n`);
  return ExitStatus.ok;
}
