import assert from "node:assert/strict";
import {
  buildRuntimeGuest,
  buildRuntimeNative,
  buildWorkloadGuest,
  buildWorkloadNative,
  WORKLOAD_INFO,
  workloadMemoryMiB,
  type WorkloadName,
  WORKLOADS,
  workloadSourceUrl,
} from "../src/build/workload_build.ts";
import { DenovisorError } from "../src/errors.ts";
import { type ElfSummary, readElf } from "./_elf.ts";

const FAULT_GUESTS = ["fault_pf.c", "fault_gp.c", "fault_ud.c", "fault_de.c"];
/** Small arguments: each native run takes a few milliseconds. */
const SMALL_ARG: Record<WorkloadName, number> = { cpu: 1, memory: 2, io: 1, syscall: 1 };

/** Checks what the VMM's ELF loader and the runtime need of a guest image. */
function assertRuntimeImage(bytes: Uint8Array, what: string): ElfSummary {
  const elf = readElf(bytes);
  assert.equal(elf.type, 2, `${what}: ET_EXEC`);
  assert.equal(elf.machine, 62, `${what}: EM_X86_64`);
  assert.equal(elf.symbols.get("_start"), elf.entry, `${what}: the entry is the kernel's _start`);
  assert.ok(elf.symbols.has("dv_syscall_entry"), `${what}: has the syscall entry`);
  assert.ok(elf.symbols.has("dv_user_start"), `${what}: has crt0`);
  assert.equal(elf.loads.length, 1, `${what}: one PT_LOAD segment`);
  assert.equal(elf.loads[0].paddr, 0x100000n, `${what}: loaded at 1 MiB`);
  assert.ok(
    elf.entry >= elf.loads[0].vaddr && elf.entry < elf.loads[0].vaddr + elf.loads[0].memsz,
    `${what}: entry inside the segment`,
  );
  return elf;
}

interface Report {
  workload: string;
  arg: number;
  checksum: string;
  ns: number;
  ops: number;
}

async function runNative(path: string, args: string[]): Promise<{ code: number; lines: string[] }> {
  const output = await new Deno.Command(path, { args, stdin: "null" }).output();
  const stdout = new TextDecoder().decode(output.stdout);
  assert.equal(new TextDecoder().decode(output.stderr), "", `${path}: nothing on stderr`);
  assert.ok(stdout.endsWith("\n"), `${path}: output ends with a newline`);
  return { code: output.code, lines: stdout.slice(0, -1).split("\n") };
}

function parseReport(line: string, workload: WorkloadName, arg: number): Report {
  const report = JSON.parse(line) as Report;
  assert.deepEqual(Object.keys(report), ["workload", "arg", "checksum", "ns", "ops"]);
  assert.equal(report.workload, workload);
  assert.equal(report.arg, arg);
  assert.match(report.checksum, /^[0-9a-f]{16}$/);
  assert.ok(Number.isSafeInteger(report.ns) && report.ns > 0, `ns ${report.ns}`);
  assert.ok(Number.isSafeInteger(report.ops) && report.ops > 0, `ops ${report.ops}`);
  return report;
}

Deno.test("every workload builds as a guest image entered at the kernel's _start", async () => {
  const images = await Promise.all(WORKLOADS.map((name) => buildWorkloadGuest(name)));
  images.forEach((image, i) => assertRuntimeImage(image, WORKLOADS[i]));
});

Deno.test("every workload builds natively and reports one JSON line", async () => {
  const paths = await Promise.all(WORKLOADS.map((name) => buildWorkloadNative(name)));
  for (const [i, name] of WORKLOADS.entries()) {
    const arg = SMALL_ARG[name];
    const { code, lines } = await runNative(paths[i], [String(arg)]);
    assert.equal(code, 0, `${name}: exit status`);
    assert.equal(lines.length, 1, `${name}: one line: ${lines.join("\\n")}`);
    const report = parseReport(lines[0], name, arg);
    const expectedOps: Record<WorkloadName, number> = {
      cpu: arg << 20,
      memory: (arg << 20) / 4096 * 8 + (arg << 20) * 6,
      io: arg * 1000,
      syscall: arg * 1000,
    };
    assert.equal(report.ops, expectedOps[name], `${name}: ops`);
  }
});

Deno.test("native workloads are deterministic and known-answer checked", async () => {
  const cpu = await buildWorkloadNative("cpu");
  const first = parseReport((await runNative(cpu, ["1"])).lines[0], "cpu", 1);
  const second = parseReport((await runNative(cpu, ["1"])).lines[0], "cpu", 1);
  assert.equal(first.checksum, second.checksum);
  // SHA-256 of the 1 MiB the generator makes, computed independently.
  const data = new BigUint64Array(1 << 17);
  let x = 0x9e3779b97f4a7c15n;
  const mask = (1n << 64n) - 1n;
  for (let i = 0; i < data.length; i++) {
    x ^= x >> 12n;
    x ^= (x << 25n) & mask;
    x ^= x >> 27n;
    data[i] = (x * 0x2545f4914f6cdd1dn) & mask;
  }
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  const hex = Array.from(digest.subarray(0, 8), (b) => b.toString(16).padStart(2, "0")).join("");
  assert.equal(first.checksum, hex);

  const syscall = await buildWorkloadNative("syscall");
  const report = parseReport((await runNative(syscall, ["3"])).lines[0], "syscall", 3);
  assert.equal(BigInt(`0x${report.checksum}`), 3000n, "3000 calls returning 1 each");
});

Deno.test("a native workload without an argument runs its default size", async () => {
  // io and syscall are the quick ones natively; the defaults of all four are in
  // the C sources and in WORKLOAD_INFO, which must agree.
  for (const name of ["io", "syscall"] as const) {
    const { code, lines } = await runNative(await buildWorkloadNative(name), []);
    assert.equal(code, 0);
    parseReport(lines[0], name, WORKLOAD_INFO[name].defaultArg);
  }
  for (const name of WORKLOADS) {
    const source = await Deno.readTextFile(workloadSourceUrl(name));
    const match = /#define DEFAULT_\w+ (\d+)/.exec(source);
    assert.equal(Number(match?.[1]), WORKLOAD_INFO[name].defaultArg, `${name}: default`);
  }
});

Deno.test("a native workload rejects a malformed argument", async () => {
  const output = await new Deno.Command(await buildWorkloadNative("cpu"), {
    args: ["12abc"],
    stdin: "null",
  }).output();
  assert.equal(output.code, 2);
  assert.match(new TextDecoder().decode(output.stderr), /non-negative integer/);
});

Deno.test("the fault guests build with the runtime and mark the faulting instruction", async () => {
  for (const name of FAULT_GUESTS) {
    const image = await buildRuntimeGuest(new URL(`./guests/${name}`, import.meta.url));
    const elf = assertRuntimeImage(image, name);
    assert.ok(elf.symbols.has("fault_rip"), `${name}: fault_rip`);
  }
});

Deno.test("an unchanged program is served from the cache, a changed one rebuilds", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovisor-workload-test-" });
  try {
    const source = `${dir}/probe.c`;
    const program = (status: number) =>
      `#include "dv_guest.h"\nint main(uint64_t arg) { (void)arg; return ${status}; }\n`;
    await Deno.writeTextFile(source, program(3));
    const first = await buildRuntimeNative(source);
    assert.equal(await buildRuntimeNative(source), first, "same inputs, same cached file");
    assert.equal((await new Deno.Command(first).output()).code, 3);
    await Deno.writeTextFile(source, program(4));
    const second = await buildRuntimeNative(source);
    assert.notEqual(second, first, "a new key for new inputs");
    assert.equal((await new Deno.Command(second).output()).code, 4);

    // A local header takes part in the key too.
    await Deno.writeTextFile(`${dir}/status.h`, "#define STATUS 5\n");
    await Deno.writeTextFile(
      source,
      `#include "dv_guest.h"\n#include "status.h"\n` +
        `int main(uint64_t arg) { (void)arg; return STATUS; }\n`,
    );
    const before = await buildRuntimeGuest(source);
    await Deno.writeTextFile(`${dir}/status.h`, "#define STATUS 6\n");
    const after = await buildRuntimeGuest(source);
    assert.notDeepEqual(after, before);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a program that does not compile is BUILD_FAILED with gcc's message", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovisor-workload-test-" });
  try {
    const source = `${dir}/broken.c`;
    await Deno.writeTextFile(
      source,
      `#include "dv_guest.h"\nint main(uint64_t arg) { return x; }\n`,
    );
    for (const build of [buildRuntimeGuest, buildRuntimeNative]) {
      await assert.rejects(build(source), (e: unknown) => {
        assert.ok(e instanceof DenovisorError);
        assert.equal(e.code, "BUILD_FAILED");
        assert.match(e.message, /broken\.c/);
        assert.match(e.message, /'x' undeclared/);
        return true;
      });
    }
    await assert.rejects(buildRuntimeGuest(`${dir}/missing.c`), (e: unknown) => {
      assert.ok(e instanceof DenovisorError && e.code === "BUILD_FAILED");
      assert.match(e.message, /missing\.c/);
      return true;
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("an unknown workload is INVALID_ARGUMENT", async () => {
  await assert.rejects(
    buildWorkloadGuest("disk" as WorkloadName),
    (e: unknown) => e instanceof DenovisorError && e.code === "INVALID_ARGUMENT",
  );
});

Deno.test("without gcc the build fails with BUILD_FAILED naming the package", async () => {
  const module = new URL("../src/build/workload_build.ts", import.meta.url).href;
  const script = `
    const { buildWorkloadNative } = await import(${JSON.stringify(module)});
    try { await buildWorkloadNative("cpu"); console.log("built"); }
    catch (e) { console.log(e.code + ": " + e.message); }`;
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--no-config", script],
    env: { PATH: "/nonexistent", NO_COLOR: "1" },
    stdin: "null",
  }).output();
  const stdout = new TextDecoder().decode(output.stdout);
  assert.match(stdout, /^BUILD_FAILED: gcc is not installed .*apt-get install gcc/);
});

Deno.test("workloadMemoryMiB leaves room for the memory workload's heap", () => {
  assert.equal(workloadMemoryMiB("memory", 64), 68);
  assert.equal(workloadMemoryMiB("memory"), WORKLOAD_INFO.memory.defaultArg + 4);
  assert.equal(workloadMemoryMiB("cpu", 1000), 16);
});
