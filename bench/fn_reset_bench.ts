/**
 * Function VMs (issue 10): a request on a warm VM (invoke = write input, run
 * to DONE, read output, reset to the checkpoint) against a cold micro-VM start
 * of the same guest and against fork+exec of a trivial static native binary,
 * as ratios (`deno bench` prints each row against the `fork+exec` baseline).
 * The same for a function in the guest function runtime: the SDK's echo
 * example (`guest/fn/examples/echo.c`), whose static ELF also runs natively,
 * so the baseline is fork+exec of that very binary with the same stdin.
 * Then density, for both: N function VMs restored lazily from one snapshot
 * taken at READY, each checkpointed, run once and trimmed: host memory per
 * idle VM (process PSS) and the creation rate.
 *
 *   deno bench -A bench/fn_reset_bench.ts            # N = 100
 *   DENOVISOR_FN_DENSITY=1000 deno bench -A bench/fn_reset_bench.ts
 *
 * @module
 */

import { buildFunction, startFunctionVm, Vm } from "../mod.ts";
import { buildGuest } from "../src/build/guest_build.ts";

const guest = await buildGuest(new URL("../tests/guests/fn_proto.S", import.meta.url));
const input = new TextEncoder().encode("abc");

/** A static `int main(){return 0;}` built with gcc (falls back to /bin/true). */
async function trivialNative(): Promise<string> {
  const dir = new URL("../.cache/bench/", import.meta.url).pathname;
  const out = `${dir}true_static`;
  try {
    await Deno.stat(out);
    return out;
  } catch {
    // Build it below.
  }
  await Deno.mkdir(dir, { recursive: true });
  const src = `${dir}true_static.c`;
  await Deno.writeTextFile(src, "int main(void) { return 0; }\n");
  const gcc = await new Deno.Command("gcc", {
    args: ["-static", "-O2", "-o", out, src],
    stderr: "null",
  }).output().catch(() => undefined);
  return gcc?.success ? out : "/bin/true";
}

/** Boots fn_proto to READY. */
async function bootToReady(): Promise<Vm> {
  const vm = await Vm.create({ memoryMiB: 4, unhandledIo: "stop" });
  vm.load(guest, { mode: "long" });
  const result = await vm.run({ timeoutMs: 60_000 });
  if (result.reason !== "guest_exit") throw new Error(`not READY: ${result.summary}`);
  return vm;
}

function check(result: { status: string; stdout: Uint8Array; reason?: string }): void {
  if (result.status !== "done" || result.stdout.length !== 3) {
    throw new Error(`request failed: ${result.status} ${result.reason}`);
  }
}

/** The host's MemAvailable (/proc/meminfo), in KiB: what the kernel could still give. */
function availableKiB(): number {
  const text = Deno.readTextFileSync("/proc/meminfo");
  return Number(/^MemAvailable:\s+(\d+) kB/m.exec(text)?.[1] ?? NaN);
}

function pssKiB(): number {
  const text = Deno.readTextFileSync("/proc/self/smaps_rollup");
  return Number(/^Pss:\s+(\d+) kB/m.exec(text)?.[1] ?? NaN);
}

/** N VMs restored from a READY snapshot of `boot()`'s VM, each serving one request, then idle. */
async function density(what: string, boot: () => Promise<Vm>): Promise<void> {
  const n = Number(Deno.env.get("DENOVISOR_FN_DENSITY") ?? 100);
  const dir = await Deno.makeTempDir({ prefix: "dv-fn-density-" });
  try {
    {
      using vm = await boot();
      vm.snapshot(`${dir}/snap`);
    }
    // One VM first, so one-time costs (the core, threads' stacks) are not per VM.
    const first = await Vm.restore(`${dir}/snap`, { mode: "lazy" });
    first.checkpoint();
    check(first.invoke(input));
    first.trim();
    const availableBefore = availableKiB();
    const started = performance.now();
    const vms: Vm[] = [first];
    let resetNs = 0;
    for (let i = 0; i < n; i++) {
      const vm = await Vm.restore(`${dir}/snap`, { mode: "lazy" });
      vm.checkpoint();
      const r = vm.invoke(input);
      check(r);
      resetNs += r.resetNs;
      vm.trim();
      vms.push(vm);
    }
    const seconds = (performance.now() - started) / 1000;
    const pssWith = pssKiB();
    // Everything N idle VMs take from the host, KVM's kernel structures
    // (vCPU, MMU pages, dirty bitmaps) and page tables included.
    const hostPerVm = (availableBefore - availableKiB()) / n;
    const resident = vms.reduce((sum, vm) => sum + vm.memory().residentBytes, 0) / vms.length;
    // What the N VMs cost is what closing them gives back (measured this way
    // round, the JS heap's growth while creating them is not counted).
    for (const vm of vms.slice(1)) vm.close();
    const pssWithout = pssKiB();
    console.log(
      `density (${what}): ${n} function VMs restored + checkpointed + 1 request + trimmed in ` +
        `${seconds.toFixed(2)} s (${(n / seconds).toFixed(0)} VMs/s on one core); ` +
        `process PSS per idle VM ${((pssWith - pssWithout) / n).toFixed(0)} KiB ` +
        `(freed by closing them); host memory per idle VM ${hostPerVm.toFixed(0)} KiB ` +
        `(MemAvailable's drop, kernel included); ` +
        `guest RAM resident per idle VM ${(resident / 1024).toFixed(0)} KiB; ` +
        `mean reset ${(resetNs / n / 1000).toFixed(1)} us`,
    );
    first.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const echoElf = await buildFunction(new URL("../guest/fn/examples/echo.c", import.meta.url));
const echoProgram = await Deno.readFile(echoElf);
/** Boots the SDK echo function in the guest runtime to READY. */
function bootEcho(): Promise<Vm> {
  return startFunctionVm({ program: echoProgram, argv: ["echo"], memoryMiB: 16 });
}

// Density first (before the benches churn memory).
await density("fn_proto", bootToReady);
await density("guest runtime, SDK echo", bootEcho);

const native = await trivialNative();
const warm = await bootToReady();
warm.checkpoint();
check(warm.invoke(input));

Deno.bench({
  name: `native: fork+exec ${native}`,
  group: "one trivial request",
  baseline: true,
  fn: () => {
    const out = new Deno.Command(native, { stdout: "null", stderr: "null" }).outputSync();
    if (!out.success) throw new Error("native failed");
  },
});

Deno.bench({
  name: "denovisor: invoke on a warm VM (run + reset, sync FFI)",
  group: "one trivial request",
  fn: () => {
    check(warm.invoke(input));
  },
});

Deno.bench({
  name: "denovisor: invokeAsync on a warm VM (run + reset, nonblocking FFI)",
  group: "one trivial request",
  fn: async () => {
    check(await warm.invokeAsync(input));
  },
});

Deno.bench({
  name: "denovisor: reset alone of a warm VM",
  group: "one trivial request",
  fn: () => {
    warm.reset();
  },
});

Deno.bench({
  name: "denovisor: cold micro-VM (create, load, run to READY, checkpoint, 1 request, close)",
  group: "one trivial request",
  fn: async () => {
    using vm = await bootToReady();
    vm.checkpoint();
    check(vm.invoke(input));
  },
});

const echoWarm = await bootEcho();
echoWarm.checkpoint();
check(echoWarm.invoke(input));

Deno.bench({
  name: `native: fork+exec of the same SDK echo ELF, stdin "abc"`,
  group: "SDK echo in the guest function runtime",
  baseline: true,
  fn: async () => {
    const child = new Deno.Command(echoElf, { stdin: "piped", stdout: "piped", stderr: "null" })
      .spawn();
    const writer = child.stdin.getWriter();
    await writer.write(input);
    await writer.close();
    const out = await child.output();
    if (!out.success || out.stdout.length !== 3) throw new Error("native echo failed");
  },
});

Deno.bench({
  name: "denovisor: invoke on a warm runtime VM (run + reset, sync FFI)",
  group: "SDK echo in the guest function runtime",
  fn: () => {
    check(echoWarm.invoke(input));
  },
});

Deno.bench({
  name: "denovisor: cold runtime VM (create, load runtime + ELF, READY, checkpoint, 1 request)",
  group: "SDK echo in the guest function runtime",
  fn: async () => {
    using vm = await bootEcho();
    vm.checkpoint();
    check(vm.invoke(input));
  },
});
