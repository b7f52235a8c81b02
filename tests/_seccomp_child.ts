/**
 * Child process of `seccomp_test.ts`: sets the seccomp mode and deny list
 * given as arguments (`MODE [SYSCALL,...]`), runs the virtio-blk runtime
 * guest (writes, reads, flushes to a fresh image) and prints the core's
 * seccomp status as JSON on stdout. A security stop ends it first (status 148).
 */

import { Vm } from "../mod.ts";
import { configureSeccomp, type SeccompMode, seccompStatus } from "../src/kvm/seccomp.ts";
import { RAM_MIB, runGuest } from "./_runtime_guest.ts";

const [mode, deny = ""] = Deno.args;
await configureSeccomp(mode as SeccompMode, {
  deny: deny.split(",").filter((s) => s !== ""),
});
const dir = await Deno.makeTempDir({ prefix: "denovisor-seccomp-" });
try {
  await Deno.writeFile(`${dir}/disk.img`, new Uint8Array(1 << 20));
  using vm = await Vm.create({
    memoryMiB: RAM_MIB,
    interrupts: true,
    devices: [{ kind: "block", path: `${dir}/disk.img` }],
  });
  await runGuest(vm, "virtio_blk.c", 0);
  console.log(JSON.stringify(await seccompStatus()));
} finally {
  await Deno.remove(dir, { recursive: true });
}
