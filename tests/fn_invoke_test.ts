/**
 * Function VMs' checkpoint / reset / invoke path (issue 10), with
 * `tests/guests/fn_proto.S`, a guest that speaks the mailbox protocol itself.
 */

import assert from "node:assert/strict";
import { DenovisorError, Vm } from "../mod.ts";
import { kvmTest, testGuest, text } from "./_helpers.ts";

const enc = (s: string) => new TextEncoder().encode(s);

/** A VM running fn_proto to READY, checkpointed. */
async function readyVm(): Promise<Vm> {
  const vm = await Vm.create({ memoryMiB: 4, unhandledIo: "stop" });
  vm.load(await testGuest("fn_proto.S"), { mode: "long" });
  const result = await vm.run({ timeoutMs: 30_000 });
  assert.equal(result.reason, "guest_exit", result.summary);
  return vm;
}

function openFds(): number {
  return [...Deno.readDirSync("/proc/self/fd")].length;
}

kvmTest(
  "function VM: echo, and state written by one request is invisible to the next",
  async () => {
    using vm = await readyVm();
    assert.throws(
      () => vm.invoke(enc("x")),
      (e) => e instanceof DenovisorError && e.code === "INVALID_ARGUMENT",
    );
    assert.equal(vm.checkpoint(), false);
    assert.deepEqual(vm.functionReady(), {
      inputCapacity: 4096,
      stdoutCapacity: 65536,
      stderrCapacity: 4096,
    });
    const echo = await vm.invokeAsync(enc("hello, World"));
    assert.equal(echo.status, "done", echo.reason);
    assert.equal(echo.outcome, "exited");
    assert.equal(text(echo.stdout), "HELLO, WORLD");
    assert.equal(echo.exitStatus, 0);
    assert.ok(echo.resetPages >= 3, `pages restored: ${echo.resetPages}`);
    // The static counter and the far page's counter start from the checkpoint each time.
    for (let i = 0; i < 3; i++) {
      const r = vm.invoke(enc("count"));
      assert.equal(r.status, "done", r.reason);
      assert.equal(text(r.stdout), "11");
    }
    // The far page (0x150000) reads back as at the checkpoint, between requests too.
    assert.deepEqual(vm.readMemory(0x150000, 8), new Uint8Array(8));
    const fail = vm.invoke(enc("fail"));
    assert.equal(fail.exitStatus, 3);
    assert.equal(text(fail.stderr), "bad\n");
    // An explicit reset of a VM at its checkpoint restores nothing but what the host wrote.
    vm.writeMemory(0x150000, enc("dirty"));
    const reset = vm.reset();
    assert.ok(reset.pages >= 1);
    assert.deepEqual(vm.readMemory(0x150000, 5), new Uint8Array(5));
  },
);

kvmTest(
  "function VM: a loop is kicked out at the time limit, a crash and a lie are reported, and the next request works",
  async () => {
    using vm = await readyVm();
    vm.checkpoint();
    const loop = await vm.invokeAsync(enc("loop"), { timeoutMs: 200 });
    assert.equal(loop.status, "timeout");
    assert.equal(text((await vm.invokeAsync(enc("count"))).stdout), "11");
    const crash = await vm.invokeAsync(enc("crash"));
    assert.equal(crash.status, "crashed");
    assert.match(crash.reason ?? "", /shutdown/);
    assert.equal(text((await vm.invokeAsync(enc("abc"))).stdout), "ABC");
    const lie = await vm.invokeAsync(enc("lie"));
    assert.equal(lie.status, "protocol_error");
    assert.match(lie.reason ?? "", /stdout length 65537 exceeds its capacity 65536/);
    assert.equal(lie.stdout.length, 0);
    const flood = await vm.invokeAsync(enc("flood"));
    assert.equal(flood.status, "done");
    assert.equal(flood.stdout.length, 65536);
    const big = await vm.invokeAsync(new Uint8Array(4097));
    assert.equal(big.status, "input_too_large");
    assert.equal(text((await vm.invokeAsync(enc("count"))).stdout), "11");
  },
);

kvmTest("function VM: bad arguments and closed VMs are errors", async () => {
  const vm = await readyVm();
  vm.checkpoint();
  const bad = (e: unknown) => e instanceof DenovisorError && e.code === "INVALID_ARGUMENT";
  assert.throws(() => vm.invoke(enc("x"), { timeoutMs: -1 }), bad);
  assert.throws(() => vm.invoke(enc("x"), { memoryLimit: 1.5 }), bad);
  assert.throws(() => vm.invoke("x" as unknown as Uint8Array), bad);
  // Two requests at once: the second one is refused, not interleaved (polled:
  // the first one's thread picks its request up when it gets to it).
  const first = vm.invokeAsync(enc("loop"), { timeoutMs: 5_000 });
  let refused = false;
  for (let i = 0; i < 40 && !refused; i++) {
    await new Promise((r) => setTimeout(r, 100));
    try {
      vm.invoke(enc("x"));
    } catch (e) {
      assert.ok(e instanceof DenovisorError && e.code === "BUSY", String(e));
      refused = true;
    }
  }
  assert.ok(refused, "a second request while one runs was not refused");
  const loop = await first;
  assert.equal(loop.status, "timeout");
  assert.equal(text((await vm.invokeAsync(enc("count"))).stdout), "11");
  vm.close();
  assert.throws(
    () => vm.invoke(enc("x")),
    (e) => e instanceof DenovisorError && e.code === "CLOSED",
  );
});

kvmTest(
  "function VM: 1000 requests leak no fds and keep memory bounded; trim gives pages back",
  async () => {
    using vm = await readyVm();
    vm.checkpoint();
    const input = enc("count");
    for (let i = 0; i < 50; i++) vm.invoke(input);
    const fds = openFds();
    const rss = Deno.memoryUsage().rss;
    let pages = 0;
    for (let i = 0; i < 1000; i++) {
      const r = vm.invoke(input);
      if (text(r.stdout) !== "11") assert.fail(`request ${i}: ${text(r.stdout)} ${r.reason}`);
      pages = Math.max(pages, r.resetPages);
    }
    assert.equal(openFds(), fds);
    const grown = Deno.memoryUsage().rss - rss;
    assert.ok(grown < 16 << 20, `RSS grew by ${grown} bytes over 1000 requests`);
    assert.ok(pages < 32, `a request restores ${pages} pages`);
    const resident = vm.trim();
    assert.equal(resident, vm.memory().residentBytes);
    assert.ok(resident <= 1 << 20, `resident after trim: ${resident}`);
    assert.equal(text(vm.invoke(input).stdout), "11");
  },
);

kvmTest(
  "function VM: a lazy restore of a snapshot taken at READY checkpoints on the snapshot's file and serves",
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "dv-fn-snap-" });
    try {
      {
        using vm = await readyVm();
        vm.snapshot(`${dir}/snap`);
      }
      for (let i = 0; i < 2; i++) {
        using vm = await Vm.restore(`${dir}/snap`, { mode: "lazy" });
        assert.equal(vm.checkpoint(), true);
        for (let j = 0; j < 3; j++) {
          const r = await vm.invokeAsync(enc("count"));
          assert.equal(r.status, "done", r.reason);
          assert.equal(text(r.stdout), "11");
        }
        assert.equal(text((await vm.invokeAsync(enc("snap"))).stdout), "SNAP");
        vm.trim();
        assert.equal(text((await vm.invokeAsync(enc("count"))).stdout), "11");
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
