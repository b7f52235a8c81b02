import assert from "node:assert/strict";
import { buildGuest, guestSourceUrl } from "../src/build/guest_build.ts";
import type { BuildGuestOptions } from "../src/build/guest_build.ts";
import { DenovisorError } from "../src/errors.ts";

const guests = new URL("./guests/", import.meta.url);
const cacheDir = new URL("../.cache/guests/", import.meta.url);

/** Every guest in the tree with the options its users build it with. */
const GUESTS: Array<[URL, BuildGuestOptions]> = [
  [guestSourceUrl("hello/hello.S"), {}],
  [new URL("real_hello.S", guests), { bits: 16, format: "flat" }],
  [new URL("long_hello.S", guests), { format: "flat" }],
  [new URL("user_hello.S", guests), {}],
  [new URL("triple_fault.S", guests), {}],
  [new URL("spin.S", guests), {}],
  [new URL("regs_echo.S", guests), {}],
  [new URL("mem_echo.S", guests), {}],
  [new URL("io_loop.S", guests), { format: "flat" }],
  [new URL("io_loop.S", guests), {}],
];

interface ElfSummary {
  type: number;
  machine: number;
  entry: bigint;
  loads: Array<{ paddr: bigint; vaddr: bigint; memsz: bigint }>;
}

function readElf(bytes: Uint8Array): ElfSummary {
  assert.deepEqual([...bytes.subarray(0, 4)], [0x7f, 0x45, 0x4c, 0x46], "ELF magic");
  assert.equal(bytes[4], 2, "ELFCLASS64");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const phoff = Number(view.getBigUint64(32, true));
  const phentsize = view.getUint16(54, true);
  const phnum = view.getUint16(56, true);
  const loads = [];
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + i * phentsize;
    if (view.getUint32(ph, true) !== 1) continue; // PT_LOAD
    loads.push({
      vaddr: view.getBigUint64(ph + 16, true),
      paddr: view.getBigUint64(ph + 24, true),
      memsz: view.getBigUint64(ph + 40, true),
    });
  }
  return {
    type: view.getUint16(16, true),
    machine: view.getUint16(18, true),
    entry: view.getBigUint64(24, true),
    loads,
  };
}

function assertBootableElf(bytes: Uint8Array, loadAddress: bigint, what: string): void {
  const elf = readElf(bytes);
  assert.equal(elf.type, 2, `${what}: ET_EXEC`);
  assert.equal(elf.machine, 62, `${what}: EM_X86_64`);
  assert.ok(elf.loads.length > 0, `${what}: has PT_LOAD segments`);
  assert.ok(
    elf.loads.some((s) => elf.entry >= s.vaddr && elf.entry < s.vaddr + s.memsz),
    `${what}: entry 0x${elf.entry.toString(16)} lies inside a PT_LOAD segment`,
  );
  for (const s of elf.loads) {
    assert.ok(s.paddr >= loadAddress, `${what}: segment at 0x${s.paddr.toString(16)}`);
  }
}

/** Runs `fn` with a temporary `.S` file holding `text`. */
async function withSource<T>(text: string, fn: (path: string) => Promise<T>): Promise<T> {
  const path = await Deno.makeTempFile({ prefix: "denovisor-test-", suffix: ".S" });
  try {
    await Deno.writeTextFile(path, text);
    return await fn(path);
  } finally {
    await Deno.remove(path);
  }
}

async function cacheEntries(): Promise<Set<string>> {
  const names = new Set<string>();
  try {
    for await (const entry of Deno.readDir(cacheDir)) names.add(entry.name);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  return names;
}

Deno.test("every guest builds; ELF images are static x86-64 executables", async () => {
  for (const [source, options] of GUESTS) {
    const name = `${source.pathname.split("/").slice(-2).join("/")} ${JSON.stringify(options)}`;
    const image = await buildGuest(source, options);
    assert.ok(image.length > 0, `${name}: not empty`);
    if ((options.format ?? "elf") === "elf") {
      assertBootableElf(image, 0x100000n, name);
    } else {
      assert.notDeepEqual([...image.subarray(0, 4)], [0x7f, 0x45, 0x4c, 0x46], `${name}: raw`);
    }
  }
});

Deno.test("the default guest is linked at 1 MiB with its entry at the load address", async () => {
  const elf = readElf(await buildGuest(guestSourceUrl("hello/hello.S")));
  assert.equal(elf.entry, 0x100000n);
  assert.equal(elf.loads[0].paddr, 0x100000n);
});

Deno.test("real_hello fits a boot sector", async () => {
  const image = await buildGuest(new URL("real_hello.S", guests), { bits: 16, format: "flat" });
  assert.ok(image.length < 512, `${image.length} bytes`);
  // 16-bit code linked at 0x7c00: `mov $msg, %si` (be lo hi) carries an address above 0x7c00.
  const movSi = image.indexOf(0xbe);
  assert.ok(movSi >= 0);
  const msg = image[movSi + 1] | image[movSi + 2] << 8;
  assert.ok(msg > 0x7c00 && msg < 0x7c00 + image.length, `msg at 0x${msg.toString(16)}`);
  assert.equal(new TextDecoder().decode(image.subarray(msg - 0x7c00, msg - 0x7c00 + 5)), "real\n");
});

Deno.test("a custom load address moves the segment and the entry point", async () => {
  const elf = readElf(await buildGuest(new URL("spin.S", guests), { loadAddress: 0x400000 }));
  assert.equal(elf.entry, 0x400000n);
  assert.equal(elf.loads[0].paddr, 0x400000n);
  assert.equal(elf.loads[0].vaddr, 0x400000n);
});

Deno.test("a source that does not assemble fails with the assembler's message", async () => {
  await withSource("\t.text\n\t.globl _start\n_start:\n\tfrobnicate %rax\n", async (path) => {
    const error = await buildGuest(path).then(
      () => assert.fail("the broken source built"),
      (e: unknown) => e,
    );
    assert.ok(error instanceof DenovisorError, String(error));
    assert.equal(error.code, "BUILD_FAILED");
    assert.match(error.message, /no such instruction/);
    assert.match(error.message, /frobnicate/);
    assert.ok(error.message.includes(path), error.message);
  });
});

Deno.test("a missing source and impossible load addresses are refused", async () => {
  await assert.rejects(
    buildGuest("/nonexistent/denovisor/guest.S"),
    (e: unknown) => e instanceof DenovisorError && e.code === "BUILD_FAILED",
  );
  await assert.rejects(
    buildGuest(new URL("spin.S", guests), { loadAddress: 0x1000 }),
    (e: unknown) => e instanceof DenovisorError && e.code === "INVALID_ARGUMENT",
  );
  await assert.rejects(
    buildGuest(new URL("real_hello.S", guests), { bits: 16, loadAddress: 0x100000 }),
    (e: unknown) => e instanceof DenovisorError && e.code === "INVALID_ARGUMENT",
  );
  assert.throws(
    () => guestSourceUrl("../deno.json"),
    (e: unknown) => e instanceof DenovisorError && e.code === "INVALID_ARGUMENT",
  );
});

Deno.test("a second build is served from the cache", async () => {
  // Unique content, so the first build cannot be a hit left by an earlier run.
  const text = `# ${crypto.randomUUID()}\n\t.text\n\t.globl _start\n_start:\n\tjmp .\n`;
  await withSource(text, async (path) => {
    const before = await cacheEntries();
    const first = await buildGuest(path);
    const added = [...await cacheEntries()].filter((name) => !before.has(name));
    try {
      assert.ok(added.length >= 1, "the build stored its output");
      assert.deepEqual(await buildGuest(path), first, "same bytes the second time");
      // Proof that the second build reads the cache rather than assembling again:
      // mark the stored entry, and the next build returns the mark.
      const entry = new URL(added[0], cacheDir);
      const marked = Uint8Array.from(first, (b, i) => (i === first.length - 1 ? b ^ 0xff : b));
      await Deno.writeFile(entry, marked);
      assert.deepEqual(await buildGuest(path), marked);
    } finally {
      for (const name of added) await Deno.remove(new URL(name, cacheDir)).catch(() => {});
    }
  });
});

Deno.test("a change to an included file changes the cache key", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovisor-test-" });
  try {
    await Deno.writeTextFile(`${dir}/value.inc`, "#define VALUE 1\n");
    await Deno.writeTextFile(
      `${dir}/main.S`,
      '#include "value.inc"\n\t.text\n\t.globl _start\n_start:\n\tmov $VALUE, %eax\n\tjmp .\n',
    );
    const one = await buildGuest(`${dir}/main.S`, { format: "flat" });
    await Deno.writeTextFile(`${dir}/value.inc`, "#define VALUE 2\n");
    const two = await buildGuest(`${dir}/main.S`, { format: "flat" });
    assert.deepEqual([...one.subarray(0, 5)], [0xb8, 1, 0, 0, 0]);
    assert.deepEqual([...two.subarray(0, 5)], [0xb8, 2, 0, 0, 0]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
