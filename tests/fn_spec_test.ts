/**
 * Function specs of the function service: the CLI's `NAME=PATH ARG...` form,
 * and the checks `loadFunction` makes before any VM exists, on real files
 * (Debian's static busybox, a dynamically linked host program, a script).
 * Host-only: no VM.
 */

import assert from "node:assert/strict";
import { join } from "node:path";

import { DenovisorError } from "../mod.ts";
import {
  DEFAULT_LIMITS,
  functionLimits,
  loadFunction,
  parseFunctionArg,
  staticElfProblem,
} from "../src/serverless/function.ts";
import { fetchBusybox } from "../src/linux/debian_kernel.ts";
import { cli } from "./_helpers.ts";

const fetched = await fetchBusybox();
if (!fetched.ok) throw new Error(`busybox-static cannot be had: ${fetched.reason}`);
const BUSYBOX = fetched.file.path;

async function rejects(promise: Promise<unknown>, pattern: RegExp): Promise<void> {
  await assert.rejects(promise, (e) => {
    assert.ok(e instanceof DenovisorError, `${e}`);
    assert.equal(e.code, "INVALID_ARGUMENT");
    assert.match(e.message, pattern);
    return true;
  });
}

function throwsInvalid(fn: () => unknown, pattern: RegExp): void {
  assert.throws(fn, (e) => {
    assert.ok(e instanceof DenovisorError, `${e}`);
    assert.equal(e.code, "INVALID_ARGUMENT");
    assert.match(e.message, pattern);
    return true;
  });
}

Deno.test("NAME=PATH and NAME=PATH ARG... parse into a name, a program and argv", () => {
  assert.deepEqual(parseFunctionArg("echo=/usr/bin/busybox"), {
    name: "echo",
    program: "/usr/bin/busybox",
    argv: ["busybox"],
  });
  assert.deepEqual(parseFunctionArg("wc=/bb/busybox  wc   -l "), {
    name: "wc",
    program: "/bb/busybox",
    argv: ["busybox", "wc", "-l"],
  });
  assert.deepEqual(parseFunctionArg("a.b_c-9=rel/prog x=y").argv, ["prog", "x=y"]);
  throwsInvalid(() => parseFunctionArg("/bin/busybox"), /NAME=PATH/);
  throwsInvalid(() => parseFunctionArg("=/bin/busybox"), /bad function name ""/);
  throwsInvalid(() => parseFunctionArg("a/b=/bin/busybox"), /bad function name "a\/b"/);
  throwsInvalid(() => parseFunctionArg("-x=/bin/busybox"), /starting with a letter or digit/);
  throwsInvalid(() => parseFunctionArg(`${"n".repeat(65)}=/p`), /1 to 64/);
  throwsInvalid(() => parseFunctionArg("f="), /missing PATH/);
  throwsInvalid(() => parseFunctionArg("f=   "), /missing PATH/);
});

Deno.test("a static busybox loads with default argv, limits and RAM", async () => {
  const fn = await loadFunction({ name: "bb", program: BUSYBOX });
  assert.equal(fn.programPath, await Deno.realPath(BUSYBOX));
  assert.deepEqual(fn.argv, ["busybox-static"]);
  assert.deepEqual(fn.env, []);
  assert.equal(fn.memoryMiB, 64);
  assert.deepEqual(fn.limits, DEFAULT_LIMITS);
  assert.deepEqual(fn.program, await Deno.readFile(BUSYBOX));
  assert.equal(staticElfProblem(fn.program), undefined);
  const small = await loadFunction({
    name: "small",
    program: BUSYBOX,
    argv: ["busybox", "cat", "/etc/motd"],
    env: ["LANG=C"],
    memoryMiB: 16,
    files: { "/etc/motd": new TextEncoder().encode("hi\n"), "/bin/bb": BUSYBOX },
    limits: { timeoutMs: 50 },
  });
  assert.equal(
    small.limits.memoryBytes,
    8 * 1024 * 1024,
    "the default memory limit is half of RAM",
  );
  assert.equal(small.limits.timeoutMs, 50);
  assert.deepEqual(small.files.map((f) => f.path), ["/etc/motd", "/bin/bb"]);
  assert.equal(small.files[1].data.length, fn.program.length);
});

Deno.test("a missing, unreadable-as-file, non-ELF or dynamically linked program is refused", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await rejects(loadFunction({ name: "f", program: join(dir, "nope") }), /cannot read program/);
    await rejects(loadFunction({ name: "f", program: dir }), /is not a regular file/);
    const script = join(dir, "script.sh");
    await Deno.writeTextFile(script, "#!/bin/sh\necho hi\n");
    await rejects(loadFunction({ name: "f", program: script }), /not an ELF file/);
    await rejects(
      loadFunction({ name: "f", program: "/bin/true" }),
      /dynamically linked \(it names an interpreter\)/,
    );
    await rejects(loadFunction({ name: "f", program: "" }), /program must be a path/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("ELF headers of the wrong class, order, machine or type are named", async () => {
  const good = await Deno.readFile(BUSYBOX);
  const patched = (at: number, value: number) => {
    const copy = good.slice(0, 4096);
    copy[at] = value;
    return copy;
  };
  assert.equal(staticElfProblem(good.slice(0, 4096)), undefined);
  assert.equal(staticElfProblem(patched(4, 1)), "not a 64-bit ELF");
  assert.equal(staticElfProblem(patched(5, 2)), "not a little-endian ELF");
  assert.equal(staticElfProblem(patched(18, 0xb7)), "not an x86-64 program (ELF machine 183)");
  assert.equal(staticElfProblem(patched(16, 1)), "not an executable (ELF type 1)");
  assert.equal(staticElfProblem(patched(56, 0)), "no program headers");
  assert.equal(staticElfProblem(patched(39, 0x7f)), "its program headers lie outside the file");
  assert.equal(staticElfProblem(good.slice(0, 40)), "not an ELF file");
});

Deno.test("limits, RAM, argv, env, files and the sample rate are checked", async () => {
  const base = { name: "f", program: BUSYBOX };
  await rejects(
    loadFunction({ ...base, limits: { timeoutMs: 0 } }),
    /timeoutMs must be an integer from 1/,
  );
  await rejects(loadFunction({ ...base, limits: { outputBytes: 2 ** 40 } }), /outputBytes/);
  await rejects(loadFunction({ ...base, limits: { inputBytes: -1 } }), /inputBytes/);
  await rejects(loadFunction({ ...base, limits: { timeoutMs: 1.5 } }), /timeoutMs/);
  await rejects(
    loadFunction({ ...base, memoryMiB: 16, limits: { memoryBytes: 16 * 1024 * 1024 } }),
    /must be below the guest's RAM \(16 MiB\)/,
  );
  await rejects(
    loadFunction({ ...base, limits: { bogus: 1 } as unknown as { timeoutMs: number } }),
    /unknown limit "bogus"/,
  );
  await rejects(loadFunction({ ...base, memoryMiB: 2 }), /memoryMiB must be an integer from 4/);
  await rejects(loadFunction({ ...base, memoryMiB: 8192 }), /memoryMiB/);
  await rejects(
    loadFunction({ ...base, memoryMiB: 4, files: { "/big": new Uint8Array(2 << 20) } }),
    /need more than half the guest's 4 MiB/,
  );
  await rejects(loadFunction({ ...base, argv: [] }), /argv needs at least argv\[0\]/);
  await rejects(loadFunction({ ...base, argv: ["a\0b"] }), /without NUL/);
  await rejects(loadFunction({ ...base, env: ["NOEQUALS"] }), /NAME=value/);
  await rejects(loadFunction({ ...base, files: { "etc/x": "/etc/hostname" } }), /absolute/);
  await rejects(loadFunction({ ...base, files: { "/a/../b": "/etc/hostname" } }), /normalized/);
  await rejects(
    loadFunction({ ...base, files: { "/x": "/nonexistent/file" } }),
    /cannot read file \/x from \/nonexistent\/file/,
  );
  await rejects(loadFunction({ ...base, nativeSampleRate: 2 }), /nativeSampleRate/);
  await rejects(loadFunction({ ...base, name: "no spaces" }), /bad function name/);
  assert.equal(functionLimits("f", {}, 1024).memoryBytes, DEFAULT_LIMITS.memoryBytes);
});

Deno.test("serve --help documents the routes, and bad serve arguments exit with status 2", async () => {
  const help = await cli("serve", "--help");
  assert.equal(help.code, 0);
  assert.match(help.stdout, /POST \/fn\/NAME/);
  assert.match(help.stdout, /--native-sample R/);
  assert.match(help.stdout, /NOT\s+isolated/);
  assert.match((await cli("--help")).stdout, /main\.ts serve/);
  for (
    const [args, message] of [
      [[], /missing NAME=PATH/],
      [["nothing"], /NAME=PATH/],
      [["--port", "70000", `f=${BUSYBOX}`], /--port must be an integer from 0 to 65535/],
      [["--pool-min", "4", "--pool-max", "2", `f=${BUSYBOX}`], /--pool-max \(2\) is below/],
      [["--native-sample", "1.5", `f=${BUSYBOX}`], /--native-sample must be a number from 0 to 1/],
      [["--bogus", `f=${BUSYBOX}`], /bogus/],
      [["f=/bin/true"], /dynamically linked/],
      [[`f=${BUSYBOX}`, `f=${BUSYBOX}`], /function f is listed twice/],
    ] as const
  ) {
    const run = await cli("serve", ...args);
    assert.equal(run.code, 2, `${args.join(" ")}: ${run.stderr}`);
    assert.match(run.stderr, message);
  }
});
