/**
 * Restores the snapshot in `Deno.args[0]` with mode `Deno.args[1]` in a fresh
 * process, runs it to the end and prints `{ reason, console, report }` as
 * JSON (for tests/snapshot_file_test.ts).
 */

import { Vm } from "../mod.ts";

const [dir, mode] = Deno.args;
using vm = await Vm.restore(dir, { mode: mode as "lazy" | "eager" });
const result = await vm.run({ timeoutMs: 300_000 });
console.log(JSON.stringify({
  reason: result.reason,
  console: result.console,
  report: result.report ? Array.from(result.report) : null,
  image: vm.image ? { ...vm.image, entry: String(vm.image.entry), stack: "" } : null,
}));
