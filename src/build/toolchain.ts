/**
 * The machine's GNU build tools (gcc, as, ld, objcopy) as the guest and workload
 * builders use them: run one with its output captured, and probe their versions
 * once per process. A missing tool becomes a `BUILD_FAILED` that names the
 * Debian package to install.
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";

/** What a tool printed and how it exited. */
export interface ToolOutput {
  /** The exit code. */
  code: number;
  /** Standard output, decoded as UTF-8. */
  stdout: string;
  /** Standard error, decoded as UTF-8. */
  stderr: string;
}

/** Options of {@link runTool} and {@link toolchainProbe}. */
export interface RunToolOptions {
  /**
   * What needs the tool, for the message when it is missing: `"building guests"`
   * gives "… building guests needs it …".
   */
  neededFor: string;
  /** The tool's working directory. Default: the current one. */
  cwd?: string;
  /** Environment variables set on top of the inherited ones. */
  env?: Record<string, string>;
}

/** The build tools' versions and abilities, as {@link toolchainProbe} found them. */
export interface Toolchain {
  /** First line of each tool's `--version`, in the order probed; part of cache keys. */
  versions: string[];
  /** Whether ld takes `--no-warn-rwx-segments` (binutils 2.39 and later). */
  ldHasRwxSwitch: boolean;
}

/** First ld release that warns about RWX segments (and has the switch to stop it). */
const LD_RWX_WARNING_VERSION = [2, 39];

/**
 * Runs a build tool to completion with stdin closed and its output captured.
 *
 * @param tool The program, looked up on PATH (`"gcc"`, `"objcopy"`, …).
 * @param args Its arguments.
 * @param options What needs the tool, and its working directory and environment.
 * @returns The exit code and the decoded output; a non-zero exit is not an error.
 * @throws {DenovisorError} `BUILD_FAILED` when the tool is not installed, naming
 *   its Debian package (`gcc` for gcc, `binutils` for the others).
 * @example
 * ```ts
 * import { runTool } from "denovisor/src/build/toolchain.ts";
 * const gcc = await runTool("gcc", ["--version"], { neededFor: "building guests" });
 * console.log(gcc.stdout.split("\n", 1)[0]);
 * ```
 */
export async function runTool(
  tool: string,
  args: string[],
  options: RunToolOptions,
): Promise<ToolOutput> {
  let output: Deno.CommandOutput;
  try {
    output = await new Deno.Command(tool, {
      args,
      cwd: options.cwd,
      stdin: "null",
      env: options.env,
    }).output();
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      const pkg = tool === "gcc" ? "gcc" : "binutils";
      throw new DenovisorError(
        "BUILD_FAILED",
        `${tool} is not installed or not on PATH; ${options.neededFor} needs it ` +
          `(Debian/Ubuntu: apt-get install ${pkg})`,
        { cause: e },
      );
    }
    throw e;
  }
  const text = new TextDecoder();
  return {
    code: output.code,
    stdout: text.decode(output.stdout),
    stderr: text.decode(output.stderr),
  };
}

/**
 * Makes a probe of a set of build tools that runs each one's `--version` once per
 * process and remembers the answer. A failed probe (say, gcc missing) is not
 * remembered: the next call tries again, as the user may have installed it.
 *
 * @param tools The tools to probe, in the order their versions are reported;
 *   include `"ld"` to learn whether it takes `--no-warn-rwx-segments`.
 * @param options What needs the tools, and their environment, as for
 *   {@link runTool}.
 * @returns A function that resolves to the tools' versions and abilities.
 * @example
 * ```ts
 * import { toolchainProbe } from "denovisor/src/build/toolchain.ts";
 * const probe = toolchainProbe(["gcc", "as", "ld"], { neededFor: "building workloads" });
 * const { versions, ldHasRwxSwitch } = await probe();
 * console.log(versions, ldHasRwxSwitch);
 * ```
 */
export function toolchainProbe(
  tools: readonly string[],
  options: RunToolOptions,
): () => Promise<Toolchain> {
  let toolchain: Promise<Toolchain> | undefined;
  return () => {
    toolchain ??= (async () => {
      const outputs = await Promise.all(tools.map((tool) => runTool(tool, ["--version"], options)));
      const versions = outputs.map((o) => o.stdout.split("\n", 1)[0].trim());
      const ldIndex = tools.indexOf("ld");
      const ld = ldIndex < 0 ? null : /GNU ld .*?(\d+)\.(\d+)/.exec(versions[ldIndex]);
      const ldHasRwxSwitch = ld !== null &&
        (Number(ld[1]) > LD_RWX_WARNING_VERSION[0] ||
          (Number(ld[1]) === LD_RWX_WARNING_VERSION[0] &&
            Number(ld[2]) >= LD_RWX_WARNING_VERSION[1]));
      return { versions, ldHasRwxSwitch };
    })();
    // A failed probe (say, gcc missing) must not stick: the user may install it.
    toolchain.catch(() => toolchain = undefined);
    return toolchain;
  };
}
