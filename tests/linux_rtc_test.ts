/**
 * The CMOS real-time clock (ports 0x70/0x71) as a Linux guest sees it: Debian's
 * kernel sets its clock from the RTC at boot and binds `rtc_cmos` to it, so the
 * guest's wall-clock time is the host's.
 */

import assert from "node:assert/strict";

import { Vm } from "../mod.ts";
import { linuxTest } from "./_helpers.ts";
import { busyboxInitramfs, debianVmlinux, fetchedPath } from "./_linux.ts";

/** How far the guest's clock may be from the host's, in seconds. */
const TOLERANCE_S = 60;

linuxTest("a Linux guest reads the host's time from the CMOS RTC", async () => {
  using vm = await Vm.create({ memoryMiB: 256, interrupts: true });
  vm.loadLinux({
    kernel: await Deno.readFile(fetchedPath(debianVmlinux, "Debian's vmlinux")),
    initrd: await busyboxInitramfs([
      "/bin/busybox mount -t sysfs sysfs /sys",
      "/bin/busybox echo RTC-EPOCH=$(/bin/busybox date +%s)",
      // What rtc_cmos reads from the device itself, apart from the kernel's clock.
      "/bin/busybox echo RTC0-EPOCH=$(/bin/busybox cat /sys/class/rtc/rtc0/since_epoch)",
      "/bin/busybox dmesg | /bin/busybox grep -i rtc",
      "/bin/busybox echo RTC-DMESG-END",
      "/bin/busybox poweroff -f",
    ]),
    // With kvm-clock the kernel takes its boot time from KVM (kvm_get_wallclock);
    // the RTC's own time is checked through rtc0 below.
    cmdline: "console=ttyS0 panic=-1 rdinit=/init quiet",
  });
  const result = await vm.run({ timeoutMs: 300_000 });
  const hostEpoch = Date.now() / 1000;
  const context = `${result.summary}\n${result.console}`;
  assert.equal(result.reason, "power_off", context);
  const epoch = result.console.match(/RTC-EPOCH=(\d+)/);
  assert.ok(epoch, context);
  const rtc0 = result.console.match(/RTC0-EPOCH=(\d+)/);
  assert.ok(rtc0, context);
  for (const [what, value] of [["date +%s", epoch[1]], ["rtc0", rtc0[1]]]) {
    assert.ok(
      Math.abs(Number(value) - hostEpoch) <= TOLERANCE_S,
      `guest ${what} ${value}, host ${hostEpoch.toFixed(0)}\n${context}`,
    );
  }
  assert.doesNotMatch(result.console, /Unable to read current time from RTC/, context);
  assert.doesNotMatch(result.console, /rtc_cmos.*(broken|not accessible)/, context);
  // rtc_cmos bound to the DSDT's PNP0B00 device (a PNP name such as 00:01).
  assert.match(result.console, /rtc_cmos \d\d:\d\d: registered as rtc0/, context);
});
