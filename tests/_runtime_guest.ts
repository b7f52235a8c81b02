/**
 * Runtime guests (`tests/guests/*.c`, on the guest runtime's PCI and virtio
 * driver) run to their EXIT hypercall for the fast device tests.
 */

import assert from "node:assert/strict";

import type { Vm } from "../mod.ts";
import { buildRuntimeGuest } from "../src/build/workload_build.ts";

const GUESTS = new URL("./guests/", import.meta.url);

/** Guest RAM of the fast device tests' VMs. */
export const RAM_MIB = 16;

/**
 * Loads `tests/guests/SOURCE` into `vm` (long mode, `arg` and the RAM size as
 * its arguments), runs it to its EXIT and returns its parsed REPORT. The stack
 * starts a page below the top of RAM: hostile cases hand a device a buffer that
 * straddles the end of RAM, and the device may write the part inside RAM
 * before it finds the rest outside.
 *
 * @param vm A VM of {@link RAM_MIB} MiB.
 * @param source The guest's C file under `tests/guests/`.
 * @param arg The guest's first argument (which case to run).
 * @returns The guest's REPORT, parsed as JSON.
 */
export async function runGuest(vm: Vm, source: string, arg: bigint | number): Promise<unknown> {
  vm.load(await buildRuntimeGuest(new URL(source, GUESTS)), {
    mode: "long",
    arguments: [arg, RAM_MIB << 20],
    stack: (RAM_MIB << 20) - 0x1000,
  });
  const result = await vm.run({ timeoutMs: 120_000 });
  assert.equal(result.reason, "guest_exit", `${result.summary}\n${result.console}`);
  assert.equal(result.exitCode, 0, `${result.reportText}\n${result.console}`);
  return JSON.parse(result.reportText!);
}
