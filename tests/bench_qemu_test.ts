/**
 * The benches' shared VMM helpers (`bench/_qemu.ts`) that need no KVM: the
 * denovisor command line, the bounded run of a subprocess with its timeout,
 * and the result table.
 */

import assert from "node:assert/strict";
import { denovisorCommand, formatTable, qemuArgs, runVmm } from "../bench/_qemu.ts";

const SPEC = { kernel: "/k", initrd: "/i", cmdline: "console=ttyS0 quiet", memMiB: 256, cpus: 2 };

Deno.test("denovisor's bench command boots the same kernel, initrd, command line, RAM and vCPUs as QEMU's", () => {
  const [cmd, args] = denovisorCommand(SPEC, ["--net", "tap=t0"]);
  assert.equal(cmd, Deno.execPath());
  assert.deepEqual(args.slice(0, 2), ["run", "-A"]);
  assert.match(args[2], /\/main\.ts$/);
  const at = (list: string[], flag: string) => list[list.indexOf(flag) + 1];
  const qemu = qemuArgs("q35", SPEC);
  assert.equal(at(args, "--kernel"), at(qemu, "-kernel"));
  assert.equal(at(args, "--initrd"), at(qemu, "-initrd"));
  assert.equal(at(args, "--cmdline"), at(qemu, "-append"));
  assert.equal(at(args, "--mem"), at(qemu, "-m"));
  assert.equal(at(args, "--cpus"), at(qemu, "-smp"));
  assert.ok(args.includes("--no-stdin"));
  assert.deepEqual(args.slice(-2), ["--net", "tap=t0"]);
});

Deno.test("a VMM run keeps only the end of a long output, with its status", async () => {
  const run = await runVmm(
    "sh",
    ["-c", "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done; echo err >&2; exit 3"],
    { timeoutMs: 30_000, keepChars: 100 },
  );
  assert.equal(run.code, 3);
  assert.equal(run.timedOut, false);
  assert.equal(run.stdout.length, 100);
  assert.ok(run.stdout.endsWith("line1999\n"), run.stdout);
  assert.equal(run.stderr, "err\n");
});

Deno.test("a VMM run that outlives its timeout is killed and says so", async () => {
  const t0 = performance.now();
  const run = await runVmm("sleep", ["30"], { timeoutMs: 200 });
  assert.equal(run.timedOut, true);
  assert.equal(run.code, 137); // SIGKILL
  assert.ok(performance.now() - t0 < 10_000);
});

Deno.test("the result table aligns the first column left and the others right", () => {
  assert.equal(
    formatTable(["metric", "denovisor", "QEMU"], [["seq read MB/s", "9", "12"], [
      "IOPS",
      "180",
      "1",
    ]]),
    [
      "metric         denovisor  QEMU",
      "-------------  ---------  ----",
      "seq read MB/s          9    12",
      "IOPS                 180     1",
    ].join("\n"),
  );
});
