/**
 * The function runtime (guest/fn/runtime/) against the same static programs
 * run natively: a request of busybox sha256sum over 1 MiB, and 200,000 system
 * calls of a static glibc program (getppid: what a system call costs when the
 * runtime serves it at CPL3). VM boots are outside the timed region (the
 * reset path of the core replaces them); `deno bench` prints each runtime row
 * as a ratio to its native baseline.
 *
 *   deno bench -A bench/fn_runtime_bench.ts
 *
 * @module
 */

import { runTool } from "../src/build/toolchain.ts";
import { fetchBusybox } from "../src/linux/debian_kernel.ts";
import { runRequest, startFunctionVm } from "../src/serverless/runtime_vm.ts";

const SYSCALLS = 200_000;
const INPUT = new Uint8Array(1 << 20).map((_, i) => (i * 2654435761) >>> 24);

const busybox = await fetchBusybox();
if (!busybox.ok) throw new Error(`busybox-static is unavailable: ${busybox.reason}`);
const bbPath = busybox.file.path;
const bb = await Deno.readFile(bbPath);
const dir = await Deno.makeTempDir({ prefix: "fn-bench-" });
const libcPath = `${dir}/fn_libc`;
const gcc = await runTool("gcc", [
  "-static",
  "-O2",
  "-o",
  libcPath,
  new URL("../tests/guests/fn_libc.c", import.meta.url).pathname,
], { neededFor: "this bench" });
if (gcc.code !== 0) throw new Error(gcc.stderr);
const libc = await Deno.readFile(libcPath);

async function native(path: string, args: string[], input: Uint8Array): Promise<void> {
  const child = new Deno.Command(path, { args, stdin: "piped", stdout: "piped" }).spawn();
  const w = child.stdin.getWriter();
  await w.write(input);
  await w.close();
  const out = await child.output();
  if (out.code !== 0) throw new Error(`${path} exited with ${out.code}`);
}

async function request(
  b: Deno.BenchContext,
  program: Uint8Array,
  argv: string[],
  input: Uint8Array,
): Promise<void> {
  using vm = await startFunctionVm({ program, argv });
  b.start();
  const r = await runRequest(vm, input);
  b.end();
  if (r.outcome !== "exited" || r.exitStatus !== 0) throw new Error(`${r.status} ${r.reason}`);
}

Deno.bench({
  name: "native: busybox sha256sum of 1 MiB (fork+exec)",
  group: "sha256sum",
  baseline: true,
  fn: () => native(bbPath, ["sha256sum"], INPUT),
});

Deno.bench({
  name: "function runtime: busybox sha256sum of 1 MiB (one request, boot excluded)",
  group: "sha256sum",
  fn: (b) => request(b, bb, ["busybox", "sha256sum"], INPUT),
});

Deno.bench({
  name: `native: ${SYSCALLS} getppid (static glibc, fork+exec)`,
  group: "syscalls",
  baseline: true,
  fn: () => native(libcPath, ["syscalls", String(SYSCALLS)], new Uint8Array()),
});

Deno.bench({
  name: `function runtime: ${SYSCALLS} getppid (one request, boot excluded)`,
  group: "syscalls",
  fn: (b) => request(b, libc, ["fn_libc", "syscalls", String(SYSCALLS)], new Uint8Array()),
});
