/**
 * A helper process for `console_output_test.ts` (not a test itself): runs
 * `console_flood.S` forever with `console: "stdout"`, stops it after a second,
 * closes the VM, and prints on stderr, as JSON, how long `stop()`, the end of the
 * run and `close()` took and what the run and the metrics counted. Its parent
 * gives it a stdout pipe that nobody reads.
 *
 * Usage: deno run -A tests/_stuck_stdout_run.ts FLOOD_IMAGE
 *
 * @module
 */

import { Vm } from "../mod.ts";

const image = await Deno.readFile(Deno.args[0]);
const vm = await Vm.create({ memoryMiB: 16, console: "stdout" });
vm.load(image, { mode: "long", arguments: [0] });
const run = vm.run();
await new Promise((resolve) => setTimeout(resolve, 1000));
let t = performance.now();
vm.stop();
const stopMs = performance.now() - t;
const result = await run;
const runEndMs = performance.now() - t;
const metrics = vm.metrics()[0].console;
t = performance.now();
vm.close();
const closeMs = performance.now() - t;
Deno.stderr.writeSync(
  new TextEncoder().encode(
    JSON.stringify({
      reason: result.reason,
      stopMs,
      runEndMs,
      closeMs,
      consoleStreamDropped: result.consoleStreamDropped,
      metrics,
    }) + "\n",
  ),
);
