/**
 * Validation before /dev/kvm is opened, bad Linux input, exit statuses and CLI
 * hygiene. None of these tests needs KVM: they must pass on a host without it.
 */

import assert from "node:assert/strict";

import { ExitStatus, statusOfError, statusOfExit, statusOfResult } from "../src/cli/exit_status.ts";
import { buildConformanceGuest } from "../src/linux/conformance_guest.ts";
import { buildInitramfs } from "../src/linux/initramfs.ts";
import { DenovisorError, Vm } from "../mod.ts";
import { openCore } from "../src/ffi.ts";
import { cli } from "./_helpers.ts";

// Build the core (if needed) here, so that no CLI run below prints the build.
await openCore();

function oneLine(r: { stderr: string }): void {
  assert.equal(r.stderr.trim().split("\n").length, 1, `one line: ${r.stderr}`);
}

Deno.test("run --kernel with a file that is no kernel is status 2, before /dev/kvm", async () => {
  const r = await cli("run", "--kernel", "/etc/passwd");
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /not a Linux kernel/);
  oneLine(r);
});

Deno.test("bad Linux input: each problem its own status and one line, before /dev/kvm", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const kernel = `${dir}/bzImage`;
    const guest = await buildConformanceGuest();
    await Deno.writeFile(kernel, guest);
    const cpio = buildInitramfs([{ path: "init", data: new TextEncoder().encode("#!/bin/sh\n") }]);
    await Deno.writeFile(`${dir}/good.cpio`, cpio);
    await Deno.writeFile(`${dir}/truncated.cpio`, cpio.subarray(0, cpio.length - 40));
    await Deno.writeFile(`${dir}/junk`, new TextEncoder().encode("not an archive at all"));
    await Deno.writeFile(
      `${dir}/big.gz`,
      Uint8Array.from({ length: 9 << 20 }, (_, i) => i === 0 ? 0x1f : i === 1 ? 0x8b : 0),
    );
    await Deno.writeFile(`${dir}/truncated`, guest.subarray(0, 3000));
    const cases: [string[], number, RegExp][] = [
      [["--kernel", `${dir}/truncated`], ExitStatus.usage, /truncated/],
      [["--kernel", kernel, "--initrd", `${dir}/junk`], ExitStatus.badInitrd, /unknown magic/],
      [
        ["--kernel", kernel, "--initrd", `${dir}/truncated.cpio`],
        ExitStatus.badInitrd,
        /cpio archive is truncated/,
      ],
      [
        ["--kernel", kernel, "--cmdline", "x".repeat(300)],
        ExitStatus.cmdlineTooLong,
        /cmdline_size/,
      ],
      [["--kernel", kernel, "--mem", "1"], ExitStatus.doesNotFit, /give the VM at least/],
      [
        ["--kernel", kernel, "--mem", "8", "--initrd", `${dir}/big.gz`],
        ExitStatus.doesNotFit,
        /initrd .* (does not fit|larger than guest RAM)/,
      ],
      [
        ["--kernel", kernel, "--cpus", "300"],
        ExitStatus.usage,
        /--cpus must be an integer from 1 to 254/,
      ],
      [["--kernel", kernel, "--cpus", "2x"], ExitStatus.usage, /--cpus must be an integer/],
      [["--kernel", kernel, "--initrd", dir], ExitStatus.usage, /not a regular file/],
    ];
    for (const [args, status, message] of cases) {
      const r = await cli("run", "--no-stdin", ...args);
      assert.equal(r.code, status, `${args.join(" ")}: ${r.stderr}`);
      assert.match(r.stderr, message);
      oneLine(r);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("run validates every option and the image before /dev/kvm", async () => {
  const cases: [string[], RegExp][] = [
    [["run", "--unhandled-io", "explode", "/etc/passwd"], /--unhandled-io must be one of/],
    [["run", "--metrics-format", "xml", "/etc/passwd"], /--metrics-format must be one of/],
    [["run", "--mem", "2000000", "/etc/passwd"], /--mem must be an integer from 1 to/],
    [["run", "--cpus", "0", "/etc/passwd"], /--cpus must be an integer from 1/],
    [[
      "run",
      "--mode",
      "user",
      "--arg",
      "1",
      "--arg",
      "2",
      "--arg",
      "3",
      "--arg",
      "4",
      "--arg",
      "5",
      "--arg",
      "6",
      "--arg",
      "7",
      "/etc/passwd",
    ], /at most 6 arguments/],
    [["run", "/dev/zero"], /not a regular file/],
    [["run", "/tmp"], /not a regular file/],
  ];
  for (const [args, message] of cases) {
    const r = await cli(...args);
    assert.equal(r.code, ExitStatus.usage, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, message);
    oneLine(r);
  }
});

Deno.test("inspect refuses devices, FIFOs and directories instead of reading forever", async () => {
  for (const path of ["/dev/zero", "/tmp"]) {
    const r = await cli("inspect", path);
    assert.equal(r.code, ExitStatus.usage, r.stderr);
    assert.match(r.stderr, /not a regular file/);
    oneLine(r);
  }
  const dir = await Deno.makeTempDir();
  try {
    const fifo = `${dir}/fifo`;
    await new Deno.Command("mkfifo", { args: [fifo] }).output();
    let r = await cli("inspect", fifo);
    assert.equal(r.code, ExitStatus.usage, r.stderr);
    assert.match(r.stderr, /not a regular file/);
    const huge = `${dir}/huge`; // sparse: no disk space used
    await Deno.writeFile(huge, new Uint8Array());
    await Deno.truncate(huge, 513 * 2 ** 20);
    r = await cli("inspect", huge);
    assert.equal(r.code, ExitStatus.usage, r.stderr);
    assert.match(r.stderr, /more than the 512 MiB limit/);
    oneLine(r);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("--help goes to stdout with status 0 for every command", async () => {
  for (
    const args of [["--help"], ["run", "--help"], ["overhead", "--help"], ["inspect", "--help"], [
      "hello",
      "--help",
    ], ["hello", "-h"]]
  ) {
    const r = await cli(...args);
    assert.equal(r.code, 0, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stdout, /Usage/, args.join(" "));
    assert.equal(r.stderr, "", args.join(" "));
  }
  const r = await cli("hello", "--bogus");
  assert.equal(r.code, 2, r.stderr);
});

Deno.test("--version prints denovisor's, the core ABI's and Deno's versions", async () => {
  const config = JSON.parse(await Deno.readTextFile(new URL("../deno.json", import.meta.url)));
  const r = await cli("--version");
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, new RegExp(`^denovisor ${config.version.replaceAll(".", "\\.")}\n`));
  assert.match(r.stdout, /core ABI \d+/);
  assert.ok(r.stdout.includes(`deno ${Deno.version.deno}`), r.stdout);
});

Deno.test("exit statuses never collide: debug-exit odd, guest EXIT statuses in 130..254", () => {
  const own = Object.values(ExitStatus);
  assert.equal(new Set(own).size, own.length, "distinct");
  for (const s of own) assert.equal(s % 2, 0, `${s} is even`);
  for (const s of own) assert.ok(s < 130 || s > 254, `${s} outside the guests' range`);
  assert.equal(statusOfExit({ reason: "guest_exit", status: 0 }), 0);
  assert.equal(statusOfExit({ reason: "guest_exit", status: 1 }), 130);
  assert.equal(statusOfExit({ reason: "guest_exit", status: 2 }), 132);
  assert.equal(statusOfExit({ reason: "guest_exit", status: 62 }), 252);
  assert.equal(statusOfExit({ reason: "guest_exit", status: 63 }), 254);
  assert.equal(statusOfExit({ reason: "guest_exit", status: 0xffff_ffff }), 254);
  for (const status of [2, 10, 70, 124, 256 + 2, 256 + 124]) {
    const s = statusOfExit({ reason: "guest_exit", status });
    assert.ok(!own.includes(s as never), `EXIT ${status} -> ${s} aliases a denovisor status`);
  }
  assert.equal(statusOfExit({ reason: "debug_exit", exitCode: (0x7f << 1) | 1 }), 0xff);
  const registers = {} as never;
  assert.equal(statusOfExit({ reason: "shutdown", registers }), ExitStatus.guestTripleFault);
  assert.equal(ExitStatus.guestTripleFault, 12);
  assert.equal(ExitStatus.guestPanic, 14);
  assert.equal(ExitStatus.guestUnresponsive, 16);
  assert.equal(statusOfExit({ reason: "internal_error", suberror: 1 }), ExitStatus.guestCrashed);
  const codes = ["IMAGE", "INITRD", "CMDLINE_TOO_LONG", "DOES_NOT_FIT", "VCPU_LIMIT"] as const;
  const statuses = codes.map((c) => statusOfError(new DenovisorError(c, "x")));
  assert.equal(new Set(statuses).size, codes.length, `distinct: ${statuses}`);
  assert.equal(statusOfError(new DenovisorError("KVM_UNAVAILABLE", "x")), ExitStatus.vmmError);
});

Deno.test("Vm.create validates its whole configuration before /dev/kvm", async () => {
  const bad: [Parameters<typeof Vm.create>[0], RegExp][] = [
    // deno-lint-ignore no-explicit-any
    [{ interrupts: "yes" as any }, /interrupts must be a boolean/],
    // deno-lint-ignore no-explicit-any
    [{ console: "tty" as any }, /console/],
    [{ memoryMiB: 2 ** 21 }, /memoryMiB/],
    // deno-lint-ignore no-explicit-any
    [{ msrs: { default: "maybe" as any } }, /default must be "allow" or "deny"/],
    [{ msrs: { deny: Array.from({ length: 17 }, (_, i) => i * 2) } }, /separate ranges/],
    // deno-lint-ignore no-explicit-any
    [{ cpuid: { hide: "avx2" as any } }, /hide must be an array/],
  ];
  for (const [config, message] of bad) {
    await assert.rejects(Vm.create(config), (e: unknown) => {
      assert.ok(e instanceof DenovisorError, String(e));
      assert.equal(e.code, "INVALID_ARGUMENT", e.message);
      assert.match(e.message, message);
      return true;
    });
  }
});

Deno.test("a panic and a guest that stopped answering have their own statuses", () => {
  assert.equal(statusOfResult({ exit: { reason: "reset" }, panic: "sysrq triggered crash" }), 14);
  assert.equal(statusOfResult({ exit: { reason: "timed_out" }, panic: "Fatal exception" }), 14);
  assert.equal(statusOfResult({ exit: { reason: "stopped" }, unresponsive: true }), 16);
  assert.equal(statusOfResult({ exit: { reason: "reset" } }), 0);
  assert.equal(statusOfResult({ exit: { reason: "timed_out" } }), 124);
});
