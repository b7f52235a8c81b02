/**
 * seccomp on the core's guest-facing threads: argument validation on the
 * host; in `[kvm]` tests a child process runs a virtio-blk guest with a deny
 * list that removes a syscall its threads surely make when the guest writes,
 * so `kill` must end it as a security stop (status 148, one stderr line that
 * names the thread kind and the syscall), `log` must let it finish, and `off`
 * must install nothing.
 */

import assert from "node:assert/strict";

import { DenovisorError } from "../mod.ts";
import {
  checkDenyList,
  checkSeccompMode,
  configureSeccomp,
  seccompStatus,
  SECURITY_STOP_EXIT_STATUS,
} from "../src/kvm/seccomp.ts";
import { cli, kvmTest } from "./_helpers.ts";

const CHILD = new URL("./_seccomp_child.ts", import.meta.url).pathname;

async function child(mode: string, deny = "") {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--no-check", CHILD, mode, deny],
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
    env: { NO_COLOR: "1", DENOVISOR_SECCOMP: "", DENOVISOR_SECCOMP_DENY: "" },
  }).output();
  const decode = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: out.code, stdout: decode(out.stdout), stderr: decode(out.stderr) };
}

function invalid(f: () => unknown, pattern: RegExp): void {
  assert.throws(f, (e) =>
    e instanceof DenovisorError && e.code === "INVALID_ARGUMENT" &&
    pattern.test(e.message));
}

Deno.test("seccomp modes and deny lists are checked before the core sees them", () => {
  assert.equal(checkSeccompMode("kill"), "kill");
  assert.equal(checkSeccompMode("off"), "off");
  invalid(() => checkSeccompMode("strict"), /off, log or kill, got "strict"/);
  invalid(() => checkSeccompMode(2), /off, log or kill, got 2/);
  assert.equal(checkDenyList(["pwritev", 74, "fdatasync"]), "pwritev,74,fdatasync");
  assert.equal(checkDenyList([]), "");
  invalid(() => checkDenyList(["pwritev,fsync"]), /syscall name or number/);
  invalid(() => checkDenyList([-1]), /syscall name or number/);
  invalid(() => checkDenyList([1.5]), /syscall name or number/);
  invalid(() => checkDenyList(["Write"]), /syscall name or number/);
});

Deno.test("the core refuses an unknown syscall and keeps its mode", async () => {
  const before = await seccompStatus();
  await assert.rejects(
    configureSeccomp("log", { deny: ["no_such_syscall"] }),
    (e) =>
      e instanceof DenovisorError && e.code === "INVALID_ARGUMENT" &&
      /no_such_syscall/.test(e.message),
  );
  assert.deepEqual(await seccompStatus(), before);
  // The default policy is kill (unless the environment chose another for a test run).
  if (!Deno.env.get("DENOVISOR_SECCOMP")) assert.equal(before.mode, "kill");
  await configureSeccomp("kill", { deny: ["pwrite64", 75] });
  const now = await seccompStatus();
  assert.deepEqual([now.mode, now.deny], ["kill", ["pwrite64", "fdatasync"]]);
  await configureSeccomp(before.mode, { deny: before.deny });
});

Deno.test("the CLI refuses a bad --seccomp or --seccomp-deny with status 2", async () => {
  const mode = await cli("hello", "--seccomp", "strict");
  assert.equal(mode.code, 2, mode.stderr);
  assert.match(mode.stderr, /--seccomp must be off, log or kill/);
  const deny = await cli("hello", "--seccomp-deny", "nope");
  assert.equal(deny.code, 2, deny.stderr);
  assert.match(deny.stderr, /"nope", which is not an x86-64 syscall/);
  const missing = await cli("hello", "--seccomp");
  assert.equal(missing.code, 2, missing.stderr);
});

kvmTest(
  "kill: a virtio-blk worker denied pwritev is a security stop when the guest writes",
  async () => {
    const r = await child("kill", "pwritev");
    assert.equal(r.code, SECURITY_STOP_EXIT_STATUS, r.stderr);
    assert.match(
      r.stderr,
      /denovisor: security stop: virtio-blk thread made syscall 296 \(pwritev\), not in its seccomp list; exiting/,
    );
    assert.equal(r.stdout, "", "the guest never finished");
  },
);

kvmTest(
  "kill: a vCPU thread denied eventfd2 is a security stop when the guest starts a device",
  async () => {
    // Activating virtio-blk (the guest writes DRIVER_OK) creates its worker's
    // eventfd on the vCPU thread.
    const r = await child("kill", "eventfd2");
    assert.equal(r.code, SECURITY_STOP_EXIT_STATUS, r.stderr);
    assert.match(r.stderr, /security stop: vcpu thread made syscall 290 \(eventfd2\)/);
  },
);

kvmTest("log: the same stray syscall proceeds and the guest finishes", async () => {
  let before = "";
  try {
    before = new TextDecoder().decode(
      (await new Deno.Command("dmesg", { stdout: "piped", stderr: "null" }).output()).stdout,
    );
  } catch { /* no dmesg */ }
  const r = await child("log", "pwritev");
  assert.equal(r.code, 0, r.stderr);
  const status = JSON.parse(r.stdout);
  assert.equal(status.mode, "log");
  assert.deepEqual(status.deny, ["pwritev"]);
  assert.ok(status.installed.vcpu >= 1, r.stdout);
  assert.ok(status.installed["virtio-blk"] >= 1, r.stdout);
  assert.doesNotMatch(r.stderr, /security stop/);
  if (before) {
    const after = new TextDecoder().decode(
      (await new Deno.Command("dmesg", { stdout: "piped", stderr: "null" }).output()).stdout,
    );
    // printk rate limits may drop some lines, never all of a fresh burst.
    const fresh = after.slice(before.length);
    if (after.length > before.length) assert.match(fresh, /type=1326.*syscall=296/);
  }
});

kvmTest(
  "off: nothing is installed and the guest finishes; kill without a deny list finishes too",
  async () => {
    const off = await child("off", "pwritev");
    assert.equal(off.code, 0, off.stderr);
    const status = JSON.parse(off.stdout);
    assert.deepEqual([status.mode, status.installed.vcpu, status.installed["virtio-blk"]], [
      "off",
      0,
      0,
    ]);
    const kill = await child("kill");
    assert.equal(kill.code, 0, kill.stderr);
    const k = JSON.parse(kill.stdout);
    assert.ok(k.installed.vcpu >= 1 && k.installed["virtio-blk"] >= 1, kill.stdout);
    assert.equal(k.failed, 0);
  },
);
