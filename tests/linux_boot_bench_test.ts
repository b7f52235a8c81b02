/**
 * The Linux boot bench's pure helpers (`bench/_boot_compare.ts`): its argument
 * parser, the `/proc/PID/status` reader, the statistics and the marker scanner
 * over a stream split at arbitrary points. Nothing here needs `/dev/kvm` and
 * nothing timed is asserted.
 */

import assert from "node:assert/strict";
import {
  bootInit,
  MarkerScanner,
  parseBenchArgs,
  parseProcStatusMemory,
  summarize,
} from "../bench/_boot_compare.ts";
import { qemuArgs } from "../bench/_qemu.ts";
import { DenovisorError } from "../src/errors.ts";

Deno.test("the bench's arguments default to 5 runs, 256 MiB, 1 vCPU, text output", () => {
  assert.deepEqual(parseBenchArgs([]), { runs: 5, memMiB: 256, cpus: 1, json: false });
});

Deno.test("the bench's arguments take --runs, --mem, --cpus and --json", () => {
  assert.deepEqual(
    parseBenchArgs(["--runs", "3", "--mem", "512", "--cpus=2", "--json"]),
    { runs: 3, memMiB: 512, cpus: 2, json: true },
  );
});

Deno.test("the bench refuses a run count, memory size or vCPU count that is not a positive integer", () => {
  for (
    const args of [
      ["--runs", "0"],
      ["--runs", "2.5"],
      ["--runs", "x"],
      ["--mem", "-1"],
      ["--mem", "64"], // Debian's kernel needs 80 MiB
      ["--cpus", "0"],
      ["--cpus", "300"],
      ["--bogus"],
      ["stray"],
    ]
  ) {
    assert.throws(
      () => parseBenchArgs(args),
      (e: unknown) => e instanceof DenovisorError && e.code === "INVALID_ARGUMENT",
      args.join(" "),
    );
  }
});

const STATUS = `Name:\tqemu-system-x86
Umask:\t0022
State:\tS (sleeping)
VmPeak:\t 1234567 kB
VmSize:\t 1200000 kB
VmHWM:\t   45678 kB
VmRSS:\t   40960 kB
RssAnon:\t   30000 kB
Threads:\t4
`;

Deno.test("/proc/PID/status gives VmRSS and VmHWM in KiB", () => {
  assert.deepEqual(parseProcStatusMemory(STATUS), { rssKiB: 40960, hwmKiB: 45678 });
});

Deno.test("a /proc/PID/status without VmRSS (a zombie) gives undefined, not zero", () => {
  assert.equal(parseProcStatusMemory("Name:\tdeno\nState:\tZ (zombie)\n"), undefined);
  assert.equal(parseProcStatusMemory("VmRSS:\t   12 MB\nVmHWM:\t 13 kB\n"), undefined);
});

Deno.test("summarize gives median, min, p90 and max of unsorted samples", () => {
  const s = summarize([5, 1, 4, 2, 3]);
  assert.deepEqual(s, { n: 5, median: 3, min: 1, p90: 5, max: 5 });
  assert.equal(summarize([4, 1, 3, 2])?.median, 2.5);
  assert.equal(summarize([7])?.p90, 7);
  assert.equal(summarize([]), undefined);
});

Deno.test("the marker scanner finds a marker split across chunks and nowhere else", () => {
  const enc = new TextEncoder();
  const scanner = new MarkerScanner("DENOVISOR-BOOT-MARKER");
  assert.equal(scanner.push(enc.encode("noise DENOVISOR-BO")), false);
  assert.equal(scanner.push(enc.encode("OT-MAR")), false);
  assert.equal(scanner.push(enc.encode("KER\r\n")), true);
  assert.equal(scanner.found, true);

  const once = new MarkerScanner("ABCA");
  for (const c of "xxABCxABxABCBCA") assert.equal(once.push(enc.encode(c)), false, c);
  assert.equal(once.push(enc.encode("AB")), false);
  assert.equal(once.push(enc.encode("CA")), true);
});

Deno.test("the marker scanner keeps a bounded tail and counts every byte", () => {
  const scanner = new MarkerScanner("END");
  const big = new Uint8Array(1 << 20).fill(0x41);
  for (let i = 0; i < 8; i++) scanner.push(big);
  assert.ok(scanner.tail.length < 4096, `tail ${scanner.tail.length}`);
  assert.equal(scanner.bytes, 8 << 20);
  assert.equal(scanner.push(new TextEncoder().encode("EN")), false);
  assert.equal(scanner.push(new TextEncoder().encode("D")), true);
});

Deno.test("the initramfs's /init prints the marker and reboots, and never contains it verbatim", () => {
  const init = bootInit("DENOVISOR-BOOT-MARKER");
  assert.match(init, /^#!\/bin\/busybox sh\n/);
  assert.match(init, /reboot -f\n$/);
  assert.ok(!init.includes("DENOVISOR-BOOT-MARKER"), init);
});

Deno.test("QEMU's command lines: the same kernel, initrd, command line, memory and CPUs on both machines", () => {
  const common = {
    kernel: "/k",
    initrd: "/i",
    cmdline: "console=ttyS0 quiet",
    memMiB: 256,
    cpus: 2,
  };
  const micro = qemuArgs("microvm", common);
  const q35 = qemuArgs("q35", common);
  for (const args of [micro, q35]) {
    const at = (flag: string) => args[args.indexOf(flag) + 1];
    assert.equal(at("-kernel"), "/k");
    assert.equal(at("-initrd"), "/i");
    assert.equal(at("-append"), "console=ttyS0 quiet");
    assert.equal(at("-m"), "256");
    assert.equal(at("-smp"), "2");
    assert.equal(at("-accel"), "kvm");
    assert.equal(at("-serial"), "stdio");
    for (const flag of ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]) {
      assert.ok(args.includes(flag), `${flag} in ${args.join(" ")}`);
    }
  }
  assert.match(micro[micro.indexOf("-M") + 1], /^microvm,.*x-option-roms=off.*isa-serial=on/);
  assert.equal(q35[q35.indexOf("-M") + 1], "q35");
});
