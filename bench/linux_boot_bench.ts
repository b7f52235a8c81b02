/**
 * Time from `Vm` creation to a Linux kernel's first instruction, for a 256 MiB
 * guest with Debian's kernel (fetched into `.cache/kernels/`), a 1 MiB initrd
 * and a command line. The target is 5 ms.
 *
 * The kernel's first instruction (`startup_64`) is overwritten with
 * `out %al, $0xf4` after loading, so the run ends the moment the vCPU executes
 * it: the measured span is `Vm.create` + `loadLinux` + the run up to that
 * instruction's exit, all from TypeScript.
 *
 *   deno bench -A bench/linux_boot_bench.ts      # Deno's statistics
 *   deno run -A bench/linux_boot_bench.ts        # a breakdown by phase
 *
 * @module
 */

import { Vm } from "../mod.ts";
import { fetchDebianKernel } from "../src/linux/debian_kernel.ts";

const MEMORY_MIB = 256;
const INITRD = new Uint8Array(1 << 20).fill(0x5a);
const CMDLINE = "console=ttyS0 earlyprintk=serial reboot=k panic=-1 root=/dev/ram0";
/** `out %al, $0xf4`: the debug-exit port ends the run at the first instruction. */
const EXIT_AT_ENTRY = new Uint8Array([0xe6, 0xf4]);

const fetched = await fetchDebianKernel({ log: (line) => console.error(`note: ${line}`) });
if (!fetched.ok) console.error(`linux_boot_bench: no Debian kernel (${fetched.reason})`);
const kernel = fetched.ok ? await Deno.readFile(fetched.file.path) : undefined;

/** One boot to the first instruction; returns the phases in milliseconds. */
interface Phases {
  create: number;
  load: number;
  run: number;
  total: number;
}

async function bootToFirstInstruction(image: Uint8Array): Promise<Phases> {
  const t0 = performance.now();
  using vm = await Vm.create({ memoryMiB: MEMORY_MIB });
  const t1 = performance.now();
  const layout = vm.loadLinux({ kernel: image, initrd: INITRD, cmdline: CMDLINE });
  vm.writeMemory(layout.entry, EXIT_AT_ENTRY);
  const t2 = performance.now();
  const result = await vm.run({ timeoutMs: 10_000 });
  const t3 = performance.now();
  if (result.exitCode !== 1) throw new Error(`unexpected end of run: ${result.summary}`);
  return { create: t1 - t0, load: t2 - t1, run: t3 - t2, total: t3 - t0 };
}

if (kernel) {
  Deno.bench({
    name:
      `Vm.create → loadLinux → first instruction (${MEMORY_MIB} MiB, Debian kernel, 1 MiB initrd)`,
    async fn(b) {
      b.start();
      const t0 = performance.now();
      using vm = await Vm.create({ memoryMiB: MEMORY_MIB });
      const layout = vm.loadLinux({ kernel, initrd: INITRD, cmdline: CMDLINE });
      vm.writeMemory(layout.entry, EXIT_AT_ENTRY);
      const result = await vm.run({ timeoutMs: 10_000 });
      b.end();
      if (result.exitCode !== 1 || performance.now() - t0 > 1000) {
        throw new Error(`unexpected end of run: ${result.summary}`);
      }
    },
  });
}

if (import.meta.main && kernel) {
  const runs = Number(Deno.args[0] ?? 30);
  const samples: Phases[] = [];
  for (let i = 0; i < runs + 1; i++) samples.push(await bootToFirstInstruction(kernel));
  const cold = samples.shift()!;
  const ms = (v: number) => `${v.toFixed(2)} ms`;
  const stat = (key: keyof Phases) => {
    const sorted = samples.map((s) => s[key]).sort((a, b) => a - b);
    const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
    return `median ${ms(at(0.5))}  p90 ${ms(at(0.9))}  min ${ms(sorted[0])}`;
  };
  console.log(`Vm creation → first kernel instruction, ${runs} runs (+1 cold run not counted)`);
  console.log(`  Vm.create            ${stat("create")}`);
  console.log(`  loadLinux            ${stat("load")}`);
  console.log(`  run to 1st insn      ${stat("run")}`);
  console.log(`  total                ${stat("total")}   (target ≤ 5 ms)`);
  console.log(`  cold first run       ${ms(cold.total)} (core load, first /dev/kvm use)`);
}
