/**
 * A helper process for `limits_test.ts` (not a test itself): creates a VM with
 * a vCPU that has run, drops it without closing it, collects garbage and
 * prints on stdout, as JSON, the live core handles before the drop, right
 * after it and once the finalizer had a chance to run.
 *
 * Usage: deno run -A --v8-flags=--expose-gc tests/_unclosed_vm_child.ts
 *
 * @module
 */

import { Kvm } from "../mod.ts";

const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) throw new Error("run with --v8-flags=--expose-gc");
const kvm = await Kvm.open();
const before = kvm.liveHandles;

async function dropOne(): Promise<number> {
  const vm = kvm.createVm({ memoryBytes: 2 << 20 });
  const vcpu = vm.createVcpu();
  vm.writeMemory(0x7c00, new Uint8Array([0xb0, 0x00, 0xe6, 0xf4]));
  vcpu.setupEntry("real", 0x7c00);
  await vcpu.run({ timeoutMs: 30_000 });
  return kvm.liveHandles; // the VM and its vCPU
}

const alive = await dropOne();
let after = alive;
// Finalizers run in a later task after a collection: collect and yield until
// the handles are gone (or give up; the parent then reports what it saw).
for (let i = 0; i < 100 && after > before; i++) {
  gc();
  await new Promise((resolve) => setTimeout(resolve, 10));
  after = kvm.liveHandles;
}
console.log(JSON.stringify({ before, alive, after }));
