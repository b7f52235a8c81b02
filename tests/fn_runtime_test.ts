/**
 * The guest function runtime (issue 10): the bundle encoding on the host, and
 * `[kvm]` tests that run unmodified static Linux programs in it — Debian's
 * busybox-static and a `gcc -static` glibc program — comparing their output
 * byte for byte with the same programs run natively, plus the SDK, the limits,
 * faults, ENOSYS counting and init failures.
 */

import assert from "node:assert/strict";
import { CONSTANTS as C } from "../src/_contract.generated.ts";
import { buildFunction } from "../src/build/fn_build.ts";
import { runTool } from "../src/build/toolchain.ts";
import { DenovisorError } from "../src/errors.ts";
import { fetchBusybox } from "../src/linux/debian_kernel.ts";
import type { BundleFile, InvokeOptions, InvokeResult } from "../src/serverless/backend.ts";
import { encodeBundle } from "../src/serverless/bundle.ts";
import {
  functionReadyOf,
  runRequest,
  startBundleVm,
  startFunctionVm,
} from "../src/serverless/runtime_vm.ts";
import { cli, kvmTest } from "./_helpers.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();

// ---- host tests: the bundle --------------------------------------------------

Deno.test("encodeBundle lays out the header, the file table, the strings and the data", () => {
  const program = new Uint8Array([0x7f, 0x45, 0x4c, 0x46, 1, 2, 3]);
  const bytes = encodeBundle({
    program,
    argv: ["prog", "-x"],
    env: ["A=1"],
    files: [{ path: "/data/in.txt", data: enc.encode("hello"), mode: 0o600 }],
  });
  const v = new DataView(bytes.buffer);
  assert.equal(v.getUint32(C.FN_BN_MAGIC, true), C.FN_BUNDLE_MAGIC);
  assert.equal(v.getUint32(C.FN_BN_VERSION, true), C.FN_ABI_VERSION);
  assert.equal(Number(v.getBigUint64(C.FN_BN_TOTAL_LEN, true)), bytes.length);
  assert.equal(bytes.length % 8, 0);
  assert.equal(v.getUint32(C.FN_BN_ARGC, true), 2);
  assert.equal(v.getUint32(C.FN_BN_ENVC, true), 1);
  assert.equal(v.getUint32(C.FN_BN_FILE_COUNT, true), 2);
  const exec = v.getUint32(C.FN_BN_EXEC_INDEX, true);
  const soff = Number(v.getBigUint64(C.FN_BN_STRINGS_OFF, true));
  const slen = Number(v.getBigUint64(C.FN_BN_STRINGS_LEN, true));
  assert.equal(dec.decode(bytes.subarray(soff, soff + slen)), "prog\0-x\0A=1\0");
  const table = Number(v.getBigUint64(C.FN_BN_FILES_OFF, true));
  const file = (i: number) => {
    const e = table + i * C.FN_FILE_SIZE;
    const pathOff = Number(v.getBigUint64(e + C.FN_FILE_PATH_OFF, true));
    const dataOff = Number(v.getBigUint64(e + C.FN_FILE_DATA_OFF, true));
    const len = Number(v.getBigUint64(e + C.FN_FILE_DATA_LEN, true));
    return {
      path: dec.decode(bytes.subarray(pathOff, bytes.indexOf(0, pathOff))),
      data: bytes.subarray(dataOff, dataOff + len),
      mode: v.getUint32(e + C.FN_FILE_MODE, true),
      dataOff,
    };
  };
  assert.deepEqual(file(exec).data, program);
  assert.equal(file(exec).mode, 0o755);
  const other = file(1 - exec);
  assert.equal(other.path, "/data/in.txt");
  assert.equal(dec.decode(other.data), "hello");
  assert.equal(other.mode, 0o600);
  assert.equal(other.dataOff % 8, 0);
});

Deno.test("encodeBundle refuses what the runtime could not serve", () => {
  const program = new Uint8Array(8);
  const bad = (spec: Parameters<typeof encodeBundle>[0], pattern: RegExp) =>
    assert.throws(() => encodeBundle(spec), (e) => {
      assert.ok(e instanceof DenovisorError);
      assert.equal(e.code, "INVALID_ARGUMENT");
      assert.match(e.message, pattern);
      return true;
    });
  const file = (path: string, extra: Partial<BundleFile> = {}): BundleFile => ({
    path,
    data: new Uint8Array(1),
    ...extra,
  });
  bad({ program, argv: [] }, /argv/);
  bad({ program, argv: ["a\0b"] }, /NUL/);
  bad({ program, argv: ["p"], env: ["X=\0"] }, /NUL/);
  bad({ program, argv: ["p"], files: [file("data/x")] }, /absolute/);
  bad({ program, argv: ["p"], files: [file("/data/../x")] }, /normalized/);
  bad({ program, argv: ["p"], files: [file("/data//x")] }, /normalized/);
  bad({ program, argv: ["p"], files: [file("/x/")] }, /ends with/);
  bad({ program, argv: ["p"], files: [file("/" + "a".repeat(300))] }, /longer/);
  bad({ program, argv: ["p"], files: [file("/x"), file("/x")] }, /twice/);
  bad({ program, argv: ["p"], files: [file("/bin/function")] }, /twice/);
  bad({ program, argv: ["p"], files: [file("/d"), file("/d/e")] }, /file and a directory/);
  bad({ program, argv: ["p"], files: [file("/x", { mode: 0o10000 })] }, /mode/);
  bad({ program, argv: Array(5000).fill("a") }, /at most/);
});

Deno.test("SDK functions are static executables that also run natively", async () => {
  const echo = await buildFunction(new URL("../guest/fn/examples/echo.c", import.meta.url));
  const input = enc.encode("native echo\x00\xff\n".repeat(5000));
  const out = await native(echo, [], input);
  assert.equal(out.code, 0);
  assert.deepEqual(out.stdout, input);
  const file = await runTool("file", [echo], { neededFor: "this test" }).catch(() => undefined);
  if (file && file.code === 0) assert.match(file.stdout, /statically linked/);
});

Deno.test("main.ts fn-build builds an SDK function; bad arguments are usage errors", async () => {
  const dir = await Deno.makeTempDir({ prefix: "fn-build-" });
  const out = `${dir}/echo`;
  const echo = new URL("../guest/fn/examples/echo.c", import.meta.url).pathname;
  const ok = await cli("fn-build", echo, "-o", out);
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal(ok.stdout, `${out}\n`);
  const run = await native(out, [], enc.encode("via the CLI"));
  assert.equal(dec.decode(run.stdout), "via the CLI");
  assert.equal((await cli("fn-build")).code, 2);
  const missing = await cli("fn-build", `${dir}/missing.c`);
  assert.equal(missing.code, 70);
  assert.match(missing.stderr, /Cannot read/);
});

// ---- helpers ----------------------------------------------------------------

async function native(
  path: string,
  args: string[],
  input: Uint8Array,
): Promise<{ code: number; signal: string | null; stdout: Uint8Array; stderr: Uint8Array }> {
  const child = new Deno.Command(path, {
    args,
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
    env: { LC_ALL: "C" },
    clearEnv: true,
  }).spawn();
  const writer = child.stdin.getWriter();
  await writer.write(input).catch(() => {});
  await writer.close().catch(() => {});
  const out = await child.output();
  return { code: out.code, signal: out.signal, stdout: out.stdout, stderr: out.stderr };
}

/** Boots the program to READY, runs one request, closes the VM. */
async function invoke(
  program: Uint8Array,
  argv: string[],
  input: Uint8Array,
  options: InvokeOptions & { files?: BundleFile[]; memoryMiB?: number } = {},
): Promise<InvokeResult> {
  using vm = await startFunctionVm({
    program,
    argv,
    env: ["LC_ALL=C"],
    files: options.files,
    memoryMiB: options.memoryMiB,
  });
  return await runRequest(vm, input, options);
}

let busyboxPath: Promise<string> | undefined;
function busybox(): Promise<string> {
  busyboxPath ??= fetchBusybox().then((r) => {
    if (!r.ok) throw new Error(`busybox-static is unavailable: ${r.reason}`);
    return r.file.path;
  });
  return busyboxPath;
}

let libcPath: Promise<string> | undefined;
/** tests/guests/fn_libc.c built with `gcc -static` (glibc). */
function libcProgram(): Promise<string> {
  libcPath ??= (async () => {
    const dir = await Deno.makeTempDir({ prefix: "fn-libc-" });
    const out = `${dir}/fn_libc`;
    const src = new URL("./guests/fn_libc.c", import.meta.url).pathname;
    const gcc = await runTool("gcc", ["-static", "-O2", "-o", out, src], {
      neededFor: "this test",
    });
    if (gcc.code !== 0) throw new Error(`gcc -static failed: ${gcc.stderr}`);
    return out;
  })();
  return libcPath;
}

/** Lines of pseudo-random words: input for the applets. */
function sampleText(lines: number): string {
  const words = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "Echo",
    "fox",
    "golf",
    "hotel",
    "india",
    "42",
    "7",
  ];
  let x = 2463534242;
  const out: string[] = [];
  for (let i = 0; i < lines; i++) {
    const n = 1 + (i % 7);
    const line: string[] = [];
    for (let j = 0; j < n; j++) {
      x ^= x << 13, x >>>= 0, x ^= x >>> 17, x ^= x << 5, x >>>= 0;
      line.push(words[x % words.length]);
    }
    out.push(line.join(i % 3 === 0 ? "\t" : " "));
  }
  return out.join("\n") + "\n";
}

function show(r: InvokeResult): string {
  return `${r.status}/${r.outcome}/${r.exitStatus} ${r.reason ?? ""} stderr=${
    JSON.stringify(dec.decode(r.stderr))
  }`;
}

// ---- [kvm] tests ------------------------------------------------------------

kvmTest("busybox applets in the function runtime print what they print natively", async (t) => {
  const bb = await busybox();
  const program = await Deno.readFile(bb);
  const text = sampleText(400);
  const input = enc.encode(text);
  const dir = await Deno.makeTempDir({ prefix: "fn-bb-" });
  await Deno.writeTextFile(`${dir}/in.txt`, text);
  const files = [{ path: "/data/in.txt", data: input }];
  const cases: { args: string[]; stdin?: Uint8Array }[] = [
    { args: ["echo", "hello", "function", "world"] },
    { args: ["sha256sum"] },
    { args: ["sort"] },
    { args: ["sort", "-r", "-k2"] },
    { args: ["wc"] },
    { args: ["awk", "{ n[$1]++ } END { for (w in n) s += n[w] * length(w); print NR, s }"] },
    { args: ["cat"] },
    { args: ["head", "-n", "17"] },
    { args: ["tr", "a-z", "A-Z"] },
    { args: ["grep", "-c", "gamma"] },
    { args: ["grep", "-n", "^Echo"] },
    { args: ["head", "-c", "300", "@/data/in.txt"], stdin: new Uint8Array() },
    { args: ["sha256sum", "@/data/in.txt"], stdin: new Uint8Array() },
    { args: ["ls", "@/data"], stdin: new Uint8Array() },
    { args: ["cat", "@/data/in.txt", "-"] },
    { args: ["wc", "-l", "@/data/in.txt", "@/data/missing"], stdin: new Uint8Array() },
  ];
  for (const c of cases) {
    await t.step(c.args.join(" ").slice(0, 60), async () => {
      const stdin = c.stdin ?? input;
      const guestArgs = c.args.map((a) => a.replace(/^@/, ""));
      const nativeArgs = c.args.map((a) => a.replace(/^@\/data/, dir));
      const r = await invoke(program, ["busybox", ...guestArgs], stdin, { files });
      const n = await native(bb, nativeArgs, stdin);
      assert.equal(r.status, "done", show(r));
      assert.equal(r.outcome, "exited", show(r));
      assert.equal(r.exitStatus, n.code, show(r));
      // Output naming the file differs by its path only.
      const guestOut = dec.decode(r.stdout);
      const nativeOut = dec.decode(n.stdout).replaceAll(dir, "/data");
      assert.equal(guestOut, nativeOut);
      assert.equal(dec.decode(r.stderr), dec.decode(n.stderr).replaceAll(dir, "/data"));
      assert.ok(r.syscalls > 0);
      assert.ok(r.stdout.length > 0);
      assert.deepEqual(r.enosys, [], "every system call these applets make is served");
    });
  }
});

kvmTest(
  "a gcc -static glibc program: stdio, malloc, files, getrandom and clocks as natively",
  async () => {
    const path = await libcProgram();
    const program = await Deno.readFile(path);
    const text = sampleText(300);
    const dir = await Deno.makeTempDir({ prefix: "fn-libc-" });
    await Deno.writeTextFile(`${dir}/in.txt`, text);
    const stdin = enc.encode("some stdin\n".repeat(1000));
    const r = await invoke(program, ["fn_libc", "report", "/data/in.txt"], stdin, {
      files: [{ path: "/data/in.txt", data: enc.encode(text) }],
    });
    const n = await native(path, ["report", `${dir}/in.txt`], stdin);
    assert.equal(r.outcome, "exited", show(r));
    assert.equal(n.code, 0);
    assert.equal(dec.decode(r.stdout), dec.decode(n.stdout));
    assert.match(
      dec.decode(r.stdout),
      /getrandom 32\nmonotonic ordered 1, realtime after 2024 1\n$/,
    );
    assert.equal(r.exitStatus, 0);
    assert.ok(r.memoryUsed >= 900000, `memoryUsed ${r.memoryUsed}`);
    assert.deepEqual(r.enosys, []);
  },
);

kvmTest("the SDK's echo and wordfreq examples run in the runtime as natively", async () => {
  for (const [name, args] of [["echo", []], ["wordfreq", ["5"]]] as const) {
    const path = await buildFunction(new URL(`../guest/fn/examples/${name}.c`, import.meta.url));
    const input = enc.encode(sampleText(500));
    const r = await invoke(await Deno.readFile(path), [name, ...args], input);
    const n = await native(path, [...args], input);
    assert.equal(r.outcome, "exited", show(r));
    assert.equal(r.exitStatus, 0);
    assert.equal(dec.decode(r.stdout), dec.decode(n.stdout));
    if (name === "echo") assert.deepEqual(r.stdout, input);
    else assert.equal(dec.decode(r.stdout).split("\n").length, 6);
  }
});

kvmTest(
  "limits: memory beyond memoryLimit and output beyond outputLimit end the program",
  async () => {
    const program = await Deno.readFile(await libcProgram());
    const hog = await invoke(program, ["fn_libc", "hog"], new Uint8Array(), {
      memoryLimit: 8 << 20,
    });
    assert.equal(hog.status, "done");
    assert.equal(hog.outcome, "memory_limit", show(hog));
    assert.match(hog.reason ?? "", /memory limit/);
    assert.ok(
      hog.memoryUsed > 7 << 20 && hog.memoryUsed <= 9 << 20,
      `memoryUsed ${hog.memoryUsed}`,
    );
    // Without a limit, the VM's free RAM is the limit.
    const all = await invoke(program, ["fn_libc", "hog"], new Uint8Array(), { memoryMiB: 32 });
    assert.equal(all.outcome, "memory_limit", show(all));

    const bb = await Deno.readFile(await busybox());
    const yes = await invoke(bb, ["busybox", "yes", "spam"], new Uint8Array(), {
      outputLimit: 1000,
    });
    assert.equal(yes.outcome, "output_limit", show(yes));
    assert.equal(yes.stdout.length, 1000);
    assert.equal(dec.decode(yes.stdout), "spam\n".repeat(200));
  },
);

kvmTest("memory a request gets is zero; a looping request ends at its time limit", async () => {
  const program = await Deno.readFile(await libcProgram());
  const zero = await invoke(program, ["fn_libc", "zero"], new Uint8Array());
  assert.equal(zero.outcome, "exited", show(zero));
  assert.equal(dec.decode(zero.stdout), "nonzero bytes: 0\n");
  const spin = await invoke(program, ["fn_libc", "spin"], new Uint8Array(), { timeoutMs: 1500 });
  assert.equal(spin.status, "timeout");
  assert.equal(spin.outcome, null);
});

kvmTest(
  "faults and signals: NULL deref is SIGSEGV, abort is SIGABRT, exit codes pass",
  async () => {
    const program = await Deno.readFile(await libcProgram());
    const segv = await invoke(program, ["fn_libc", "null"], new Uint8Array());
    assert.equal(segv.outcome, "signal", show(segv));
    assert.equal(segv.exitStatus, 11);
    assert.match(segv.reason ?? "", /SIGSEGV: page fault at address 0x0, rip 0x/);
    const abort = await invoke(program, ["fn_libc", "abort"], new Uint8Array());
    assert.equal(abort.outcome, "signal", show(abort));
    assert.equal(abort.exitStatus, 6);
    const exit = await invoke(program, ["fn_libc", "exit", "42"], new Uint8Array());
    assert.equal(exit.outcome, "exited", show(exit));
    assert.equal(exit.exitStatus, 42);
  },
);

kvmTest("an unknown system call returns -ENOSYS and is counted by number", async () => {
  const program = await Deno.readFile(await libcProgram());
  const r = await invoke(program, ["fn_libc", "enosys"], new Uint8Array());
  assert.equal(r.outcome, "exited", show(r));
  assert.equal(r.exitStatus, 0);
  assert.equal(dec.decode(r.stdout), "syscall 500: -1 errno 38\n");
  assert.deepEqual(r.enosys, [{ nr: 500, count: 2 }]);
});

kvmTest("the host checks every mailbox value a hostile program writes", async () => {
  const hostile = await Deno.readFile(
    await buildFunction(new URL("./guests/fn_hostile.c", import.meta.url)),
  );
  const cases: [string, RegExp][] = [
    ["stdout_len", /stdout_len \d+ beyond its capacity/],
    ["outcome", /outcome 77/],
    ["enosys", /65 ENOSYS entries/],
    ["state", /state 1 at the EXIT of a request/],
    ["magic", /mailbox magic 0x0/],
  ];
  for (const [lie, pattern] of cases) {
    const r = await invoke(hostile, ["fn_hostile", lie], new Uint8Array());
    assert.equal(r.status, "protocol_error", `${lie}: ${show(r)}`);
    assert.equal(r.outcome, null);
    assert.equal(r.stdout.length, 0);
    assert.match(r.reason ?? "", pattern);
  }
});

kvmTest("a VM runs one request: resumed after DONE it only exits again", async () => {
  const bb = await Deno.readFile(await busybox());
  using vm = await startFunctionVm({ program: bb, argv: ["busybox", "cat"] });
  const ready = functionReadyOf(vm);
  assert.ok(ready.inputCapacity >= 64 << 10);
  assert.ok(ready.stdoutCapacity >= 64 << 10);
  assert.ok(ready.stderrCapacity > 0);
  const first = await runRequest(vm, enc.encode("first\n"));
  assert.equal(dec.decode(first.stdout), "first\n");
  const again = await runRequest(vm, enc.encode("second\n"));
  assert.equal(again.status, "done");
  assert.equal(dec.decode(again.stdout), "first\n");
  assert.equal(again.syscalls, first.syscalls);
  const tooBig = await runRequest(vm, new Uint8Array(ready.inputCapacity + 1));
  assert.equal(tooBig.status, "input_too_large");
});

kvmTest(
  "init failures: a bad ELF, a dynamic ELF and a damaged bundle are refused with the reason",
  async () => {
    const refused = async (start: () => Promise<unknown>, pattern: RegExp) => {
      await assert.rejects(start, (e) => {
        assert.ok(e instanceof DenovisorError, String(e));
        assert.equal(e.code, "IMAGE");
        assert.match(e.message, pattern);
        return true;
      });
    };
    await refused(
      () => startFunctionVm({ program: enc.encode("#!/bin/sh\necho hi\n"), argv: ["x"] }),
      /\/bin\/function is not an ELF file/,
    );
    const dynamic = await Deno.readFile("/bin/true");
    await refused(
      () => startFunctionVm({ program: dynamic, argv: ["true"] }),
      /dynamically linked/,
    );
    const truncated = (await Deno.readFile(await busybox())).slice(0, 5000);
    await refused(() => startFunctionVm({ program: truncated, argv: ["bb"] }), /outside the file/);

    const good = encodeBundle({
      program: await Deno.readFile(await libcProgram()),
      argv: ["fn_libc"],
      files: [{ path: "/x", data: new Uint8Array(10) }],
    });
    const view = (b: Uint8Array) => new DataView(b.buffer);
    const damaged = (edit: (v: DataView) => void) => {
      const copy = good.slice();
      edit(view(copy));
      return copy;
    };
    const fileEntry = (i: number) =>
      Number(view(good).getBigUint64(C.FN_BN_FILES_OFF, true)) + i * C.FN_FILE_SIZE;
    await refused(
      () => startBundleVm(damaged((v) => v.setUint32(C.FN_BN_MAGIC, 0, true))),
      /bad bundle magic/,
    );
    await refused(
      () => startBundleVm(damaged((v) => v.setBigUint64(C.FN_BN_TOTAL_LEN, 1n << 40n, true))),
      /does not fit RAM/,
    );
    await refused(
      () =>
        startBundleVm(
          damaged((v) => v.setBigUint64(fileEntry(1) + C.FN_FILE_DATA_LEN, 1n << 62n, true)),
        ),
      /data outside the bundle/,
    );
    await refused(
      () => startBundleVm(damaged((v) => v.setUint32(C.FN_BN_EXEC_INDEX, 7, true))),
      /program index/,
    );
    await refused(
      () => startBundleVm(damaged((v) => v.setBigUint64(C.FN_BN_STRINGS_LEN, 3n, true))),
      /not NUL-terminated/,
    );
  },
);

kvmTest(
  "randomly damaged bundle headers boot to READY or are refused, never crash the runtime",
  async () => {
    const good = encodeBundle({
      program: await Deno.readFile(
        await buildFunction(new URL("../guest/fn/examples/echo.c", import.meta.url)),
      ),
      argv: ["echo", "x"],
      env: ["A=b"],
      files: [{ path: "/d/f", data: enc.encode("file") }],
    });
    // The header, the file table and the strings: what the runtime parses first.
    const span = Number(new DataView(good.buffer).getBigUint64(C.FN_BN_STRINGS_OFF, true)) + 16;
    let x = 0x9e3779b9;
    const next = () => (x = (Math.imul(x, 1103515245) + 12345) >>> 0);
    let ready = 0, refused = 0;
    for (let round = 0; round < 24; round++) {
      const copy = good.slice();
      for (let flips = 1 + (next() % 3); flips > 0; flips--) {
        copy[next() % span] ^= 1 <<
          (next() % 8);
      }
      try {
        using vm = await startBundleVm(copy, { memoryMiB: 16 });
        ready++;
        const r = await runRequest(vm, enc.encode("in"));
        assert.ok(r.status === "done", `round ${round}: ${show(r)}`);
      } catch (e) {
        assert.ok(e instanceof DenovisorError, String(e));
        assert.equal(e.code, "IMAGE", `round ${round}: ${e.message}`);
        refused++;
      }
    }
    assert.equal(ready + refused, 24);
    assert.ok(refused > 0);
  },
);

kvmTest(
  "with the core's checkpoint and invoke: requests repeat from READY, nothing leaks between them",
  async () => {
    const program = await Deno.readFile(await libcProgram());
    {
      using vm = await startFunctionVm({ program, argv: ["fn_libc", "leak"] });
      vm.checkpoint();
      assert.deepEqual(vm.functionReady(), functionReadyOf(vm));
      for (let i = 0; i < 3; i++) {
        const r = await vm.invokeAsync(new Uint8Array());
        assert.equal(r.status, "done", r.reason);
        assert.equal(r.outcome, "exited", show(r));
        assert.equal(dec.decode(r.stdout), "calls 1 heap 0\n");
        assert.ok(r.resetPages > 0);
      }
    }
    const bbPath = await busybox();
    using vm = await startFunctionVm({
      program: await Deno.readFile(bbPath),
      argv: ["busybox", "sha256sum"],
    });
    vm.checkpoint();
    for (const text of ["one\n", sampleText(50), "", sampleText(500)]) {
      const input = enc.encode(text);
      const r = await vm.invokeAsync(input);
      const n = await native(bbPath, ["sha256sum"], input);
      assert.equal(r.outcome, "exited", show(r));
      assert.equal(dec.decode(r.stdout), dec.decode(n.stdout));
    }
    // A request killed at its output limit in between: the next request still succeeds.
    const limited = await vm.invokeAsync(new Uint8Array(), { outputLimit: 10 });
    assert.equal(limited.outcome, "output_limit", show(limited));
    const after = await vm.invokeAsync(enc.encode("after\n"));
    assert.equal(after.outcome, "exited", show(after));
    assert.match(dec.decode(after.stdout), /^[0-9a-f]{64} {2}-\n$/);
  },
);
