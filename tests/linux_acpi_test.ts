/**
 * ACPI for Linux guests: Debian's kernel boots to a busybox initramfs, finds the
 * tables the loader wrote (RSDP, XSDT, FADT, DSDT, MADT) without an ACPI error,
 * finds KVM's paravirtual leaves (kvm-clock), sees every vCPU through the MADT,
 * and ends the run through the ACPI PM device: `poweroff -f` as `power_off`,
 * `reboot -f` as `reset` through the FADT's reset register.
 *
 * These need guest kernel code at hardware speed (a boot to init takes ~10-25 s
 * inside kvmbox); on PVM hosts they are not registered unless DENOVISOR_SLOW=1.
 */

import assert from "node:assert/strict";

import { type RunResult, Vm } from "../mod.ts";
import { fetchBusybox, fetchDebianKernel } from "../src/linux/debian_kernel.ts";
import { buildInitramfs } from "../src/linux/initramfs.ts";
import { KVM_PROBLEM, kvmTest } from "./_helpers.ts";

const onPvm = (() => {
  try {
    Deno.statSync("/sys/module/kvm_pvm");
    return true;
  } catch {
    return false;
  }
})();
const slow = Deno.env.get("DENOVISOR_SLOW") === "1";
const RUN_BUDGET_MS = 240_000;
const MARKER = "DENOVISOR-ACPI-INIT";

/** Boots Debian's kernel on `vcpus` vCPUs; `/init` prints the online CPUs, then runs `finish`. */
async function boot(vcpus: number, finish: string[]): Promise<RunResult> {
  const kernel = await fetchDebianKernel();
  if (!kernel.ok) throw new Error(`Debian's kernel cannot be fetched: ${kernel.reason}`);
  const busybox = await fetchBusybox();
  if (!busybox.ok) throw new Error(`busybox-static cannot be fetched: ${busybox.reason}`);
  const init = [
    "#!/bin/busybox sh",
    "/bin/busybox mount -t proc proc /proc",
    "/bin/busybox mount -t sysfs sys /sys",
    `/bin/busybox echo ${MARKER} online=$(/bin/busybox cat /sys/devices/system/cpu/online)`,
    ...finish,
  ].join("\n") + "\n";
  const initrd = buildInitramfs([
    { path: "dev", kind: "dir" },
    { path: "dev/console", kind: "char", device: [5, 1] },
    { path: "proc", kind: "dir" },
    { path: "sys", kind: "dir" },
    { path: "bin", kind: "dir" },
    { path: "bin/busybox", data: await Deno.readFile(busybox.file.path) },
    { path: "init", data: new TextEncoder().encode(init) },
  ]);
  using vm = await Vm.create({ memoryMiB: 256, vcpus, interrupts: true });
  vm.loadLinux({
    kernel: await Deno.readFile(kernel.file.path),
    initrd,
    // No reboot=k: the kernel's default reboot method is ACPI's reset register.
    cmdline: "console=ttyS0 panic=-1 rdinit=/init",
  });
  return await vm.run({ timeoutMs: RUN_BUDGET_MS });
}

function onlineCpus(result: RunResult): string | undefined {
  return new RegExp(`${MARKER} online=(\\S+)`).exec(result.console)?.[1];
}

if (KVM_PROBLEM === undefined && onPvm && !slow) {
  console.error(
    "note: skipping the ACPI boots: /sys/module/kvm_pvm shows guest kernel code is emulated " +
      "here; DENOVISOR_SLOW=1 runs them anyway",
  );
} else {
  kvmTest(
    "Linux finds the ACPI tables and kvm-clock, and poweroff -f ends the run as power_off",
    async () => {
      const result = await boot(1, ["/bin/busybox poweroff -f"]);
      const log = result.console;
      assert.equal(result.reason, "power_off", `${result.summary}\n${log}`);
      assert.equal(onlineCpus(result), "0", log);
      for (const table of ["RSDP", "XSDT", "FACP", "DSDT", "APIC"]) {
        assert.match(log, new RegExp(`ACPI: ${table} 0x`), `the ${table} table\n${log}`);
      }
      assert.match(log, /Using ACPI \(MADT\) for SMP configuration information/);
      assert.doesNotMatch(log, /ACPI (BIOS )?(Error|Warning)|ACPI Exception|RSDP was not found/);
      assert.match(log, /Booting paravirtualized kernel on KVM/);
      assert.match(log, /clocksource: Switched to clocksource kvm-clock/);
      assert.doesNotMatch(log, /Fast TSC calibration failed/);
      assert.doesNotMatch(log, /System halted/);
    },
  );

  kvmTest("reboot -f resets the VM through the FADT's reset register", async () => {
    // Debug messages on the console, to see which reset path the kernel took.
    const result = await boot(1, [
      "/bin/busybox echo 8 > /proc/sys/kernel/printk",
      "/bin/busybox reboot -f",
    ]);
    assert.equal(result.reason, "reset", `${result.summary}\n${result.console}`);
    assert.match(result.console, /ACPI MEMORY or I\/O RESET_REG/, result.console);
  });

  for (const vcpus of [2, 4]) {
    kvmTest(`with ${vcpus} vCPUs Linux brings every CPU online from the MADT`, async () => {
      const result = await boot(vcpus, ["/bin/busybox poweroff -f"]);
      assert.equal(result.reason, "power_off", `${result.summary}\n${result.console}`);
      assert.equal(onlineCpus(result), `0-${vcpus - 1}`, result.console);
      assert.match(result.console, /ACPI: APIC 0x/);
      assert.match(result.console, new RegExp(`smp: Brought up 1 node, ${vcpus} CPUs`));
    });
  }
}
