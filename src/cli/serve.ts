/**
 * `main.ts serve`: the function service on HTTP (`src/serverless/service.ts`)
 * until SIGINT or SIGTERM, which close every VM before the process exits.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { type FunctionSpec, parseFunctionArg } from "../serverless/function.ts";
import { Service } from "../serverless/service.ts";
import { ExitStatus } from "./exit_status.ts";
import { UsageError } from "./usage_error.ts";

/** `serve --help`. */
export const SERVE_HELP = `Usage: deno run -A main.ts serve [options] NAME=PATH...

Serves each function over HTTP, every request in a hardware-isolated
micro-VM: PATH is a static x86-64 Linux ELF (e.g. Debian's busybox-static) or
a program built for the guest runtime. "NAME=PATH ARG..." as one shell word
gives the program arguments (argv is [basename(PATH), ARG...]).

  POST /fn/NAME      the body is the program's stdin; the answer its stdout,
                     with x-exit-status, x-denovisor-outcome,
                     x-denovisor-run-us and x-denovisor-reset-us; a crash or
                     signal 502, a timeout 504, memory over the limit 507,
                     output over the limit 502, a body over the input limit
                     413, every VM busy and the queue full 503, unknown NAME
                     404; errors are JSON {error, reason, function}
  GET /fn            the functions and their limits (JSON)
  GET /metrics       Prometheus text (?format=json for JSON): latency
                     histograms, requests by status, resets, pool size,
                     ENOSYS counts, the overhead model

Options:
  --port N             TCP port (default 8080; 0 picks a free one)
  --hostname H         address to listen on (default 127.0.0.1)
  --memory MiB         guest RAM of each function VM (default 64)
  --timeout MS         time limit of one request (default 10000)
  --pool-min N         warm VMs kept per function (default 1)
  --pool-max N         most VMs per function (default 16)
  --native-sample R    fraction of requests (0 to 1) also run natively for the
                       overhead model (default 0: off). The native run is NOT
                       isolated: it runs the program on this host as this
                       user. Use it only for programs you trust.
  -h, --help           this help

The service prints its URL on stdout once every function is warm. SIGINT or
SIGTERM stop it: requests in flight finish, every VM is closed, status 0.
Exit status: 2 bad arguments or a bad function (missing, not a static ELF);
70 a function did not initialize or the VMM failed.
`;

/** Where `serve` writes. */
export interface ServeIo {
  /** Writes to standard error. */
  error(text: string): void;
  /** Writes help and the URL (default: standard output). */
  output?(text: string): void;
}

function parseNumber(
  value: string | undefined,
  what: string,
  min: number,
  max: number,
  integer = true,
): number | undefined {
  if (value === undefined) return undefined;
  const n = (integer ? /^[0-9]+$/ : /^[0-9]+(\.[0-9]+)?$/).test(value) ? Number(value) : NaN;
  if (!(n >= min && n <= max) || (integer && !Number.isSafeInteger(n))) {
    throw new UsageError(
      `${what} must be ${
        integer ? "an integer" : "a number"
      } from ${min} to ${max}, got "${value}"`,
    );
  }
  return n;
}

/**
 * Runs `serve`: parses the options and functions, starts the service,
 * prints its URL and serves until SIGINT or SIGTERM.
 *
 * @param args The arguments after `serve`.
 * @param io Where messages go.
 * @param stop Resolves to stop the service (default: the first SIGINT or SIGTERM).
 * @returns The process exit status.
 * @throws {UsageError} For bad options; a `DenovisorError` for a bad function
 *   or one that does not initialize.
 * @example
 * ```ts ignore
 * import { serveCommand } from "denovisor/src/cli/serve.ts";
 * Deno.exit(await serveCommand(["--port", "8080", "echo=/bin/busybox echo hi"], { error: console.error }));
 * ```
 */
export async function serveCommand(
  args: string[],
  io: ServeIo,
  stop?: Promise<unknown>,
): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    strict: true,
    allowPositionals: true,
    options: {
      port: { type: "string" },
      hostname: { type: "string" },
      memory: { type: "string" },
      timeout: { type: "string" },
      "pool-min": { type: "string" },
      "pool-max": { type: "string" },
      "native-sample": { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  const print = (text: string) =>
    io.output ? io.output(text) : Deno.stdout.writeSync(new TextEncoder().encode(text));
  if (values.help) {
    print(SERVE_HELP);
    return ExitStatus.ok;
  }
  if (positionals.length === 0) throw new UsageError("missing NAME=PATH (see serve --help)");
  const port = parseNumber(values.port, "--port", 0, 65535) ?? 8080;
  const memoryMiB = parseNumber(values.memory, "--memory", 4, 4096);
  const timeoutMs = parseNumber(values.timeout, "--timeout", 1, 3_600_000);
  const min = parseNumber(values["pool-min"], "--pool-min", 0, 4096);
  const max = parseNumber(values["pool-max"], "--pool-max", 1, 4096);
  const nativeSampleRate = parseNumber(values["native-sample"], "--native-sample", 0, 1, false) ??
    0;
  if (min !== undefined && max !== undefined && max < min) {
    throw new UsageError(`--pool-max (${max}) is below --pool-min (${min})`);
  }
  const hostname = values.hostname ?? "127.0.0.1";
  if (hostname === "") throw new UsageError("--hostname must not be empty");
  const specs: FunctionSpec[] = positionals.map((arg) => ({
    ...parseFunctionArg(arg),
    ...(memoryMiB === undefined ? {} : { memoryMiB }),
    ...(timeoutMs === undefined ? {} : { limits: { timeoutMs } }),
  }));
  io.error(`denovisor: starting ${specs.map((s) => s.name).join(", ")}\n`);
  const service = await Service.start({
    port,
    hostname,
    functions: specs,
    pool: {
      ...(min === undefined ? {} : { min }),
      ...(max === undefined ? {} : { max }),
    },
    nativeSampleRate,
  });
  let onSignal: (() => void) | undefined;
  const signals: Deno.Signal[] = ["SIGINT", "SIGTERM"];
  const signalled = new Promise<void>((resolve) => {
    onSignal = () => resolve();
    for (const s of signals) Deno.addSignalListener(s, onSignal);
  });
  try {
    if (nativeSampleRate > 0) {
      io.error(
        `denovisor: --native-sample ${nativeSampleRate}: sampled requests also run natively, ` +
          "unisolated, on this host\n",
      );
    }
    io.error(`denovisor: serving ${service.functions.length} function(s) at ${service.url}\n`);
    print(`${service.url}\n`);
    await (stop ? Promise.race([stop, signalled]) : signalled);
    io.error("denovisor: stopping: closing every VM\n");
  } finally {
    for (const s of signals) Deno.removeSignalListener(s, onSignal!);
    await service.close();
  }
  return ExitStatus.ok;
}
