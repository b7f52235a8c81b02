/**
 * Builds the Linux boot-protocol conformance guest (`guest/linux_conformance/`):
 * a bzImage with a real protocol 2.15 setup header whose 64-bit entry reports
 * every field of the zero page it received over COM1, then exits through the
 * debug-exit port with {@link CONFORMANCE_EXIT_CODE}. Built with the machine's
 * gcc, ld and objcopy; cached under `.cache/guests/` by a hash of the sources,
 * the flags and the tool versions.
 *
 * @module
 */

import { pathOfFileUrl } from "../build/fs_util.ts";
import { DenovisorError } from "../errors.ts";

const SOURCE_DIR = new URL("../../guest/linux_conformance/", import.meta.url);
const CACHE_DIR = new URL("../../.cache/guests/", import.meta.url);
const SOURCES = ["setup.S", "head.S", "report.c", "bzimage.ld"] as const;
/** Bumped when the build steps change in a way the key does not show. */
const CACHE_FORMAT = 1;

const C_FLAGS = [
  "-O2",
  "-std=gnu11",
  "-Wall",
  "-Wextra",
  "-ffreestanding",
  "-fno-stack-protector",
  "-fcf-protection=none",
  "-fpie",
  "-fvisibility=hidden",
  "-mno-red-zone",
  "-mgeneral-regs-only",
  "-fno-asynchronous-unwind-tables",
  "-fno-tree-loop-distribute-patterns",
];
const LD_FLAGS = ["-static", "-nostdlib", "--build-id=none", "-z", "noexecstack"];

/** The guest's exit code when it reported everything: `(0x2a << 1) | 1`. */
export const CONFORMANCE_EXIT_CODE = 0x55;

/** The CPU state the conformance guest recorded at its 64-bit entry. */
export interface ConformanceEntry {
  /** RSI: the zero page's address. */
  rsi: bigint;
  /** Where the image runs (its first byte, computed RIP-relative). */
  load: bigint;
  /** RSP at entry. */
  rsp: bigint;
  /** RFLAGS at entry. */
  rflags: bigint;
  /** CR0. */
  cr0: bigint;
  /** CR3. */
  cr3: bigint;
  /** CR4. */
  cr4: bigint;
  /** IA32_EFER. */
  efer: bigint;
  /** Segment selectors. */
  cs: number;
  /** DS. */
  ds: number;
  /** ES. */
  es: number;
  /** SS. */
  ss: number;
  /** FS. */
  fs: number;
  /** GS. */
  gs: number;
}

/** What the conformance guest reported, parsed. */
export interface ConformanceReport {
  /** The protocol version in the zero page's header. */
  protocol: number;
  /** The CPU state at entry. */
  entry: ConformanceEntry;
  /** Zero page bytes 0x1f1..0x26c: the setup header as the kernel sees it. */
  header: Uint8Array;
  /** `ext_ramdisk_image`. */
  extRamdiskImage: number;
  /** `ext_ramdisk_size`. */
  extRamdiskSize: number;
  /** `ext_cmd_line_ptr`. */
  extCmdLinePtr: number;
  /** `acpi_rsdp_addr` (boot protocol 2.14+): where the loader put the RSDP. */
  acpiRsdpAddr: bigint;
  /** The e820 map as read through `e820_entries`. */
  e820: { addr: bigint; size: bigint; type: number }[];
  /** The command line read through its pointer. */
  cmdline: string;
  /** The initrd as read through its pointer and size. */
  initrd: { addr: bigint; size: bigint; fnv: bigint };
  /** Nonzero zero-page bytes outside every reported field. */
  otherNonzero: number;
}

async function run(tool: string, args: string[]): Promise<string> {
  let output: Deno.CommandOutput;
  try {
    output = await new Deno.Command(tool, { args, stdin: "null" }).output();
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new DenovisorError(
        "BUILD_FAILED",
        `${tool} is not installed; the conformance guest needs gcc and binutils`,
        { cause: e },
      );
    }
    throw e;
  }
  const text = new TextDecoder();
  if (output.code !== 0) {
    throw new DenovisorError(
      "BUILD_FAILED",
      `${tool} ${args.join(" ")} failed (exit ${output.code}):\n${
        text.decode(output.stderr).trim()
      }`,
    );
  }
  return text.decode(output.stdout);
}

async function sha256Hex(data: Uint8Array): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", data as BufferSource));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Builds (or takes from the cache) the conformance guest's bzImage.
 *
 * @returns The bzImage's bytes.
 * @throws {DenovisorError} `BUILD_FAILED` when gcc, ld or objcopy are missing or fail.
 * @example
 * ```ts
 * import { buildConformanceGuest } from "denovisor/src/linux/conformance_guest.ts";
 * import { Vm } from "denovisor";
 * using vm = await Vm.create({ memoryMiB: 64 });
 * vm.loadLinux({ kernel: await buildConformanceGuest(), cmdline: "console=ttyS0" });
 * console.log((await vm.run({ timeoutMs: 10_000 })).console);
 * ```
 */
export async function buildConformanceGuest(): Promise<Uint8Array> {
  const versions = await Promise.all(
    ["gcc", "ld", "objcopy"].map(async (tool) => (await run(tool, ["--version"])).split("\n")[0]),
  );
  const parts = [`format ${CACHE_FORMAT}`, ...versions, C_FLAGS.join(" "), LD_FLAGS.join(" ")];
  for (const name of SOURCES) {
    parts.push(`${name} ${await sha256Hex(await Deno.readFile(new URL(name, SOURCE_DIR)))}`);
  }
  const key = await sha256Hex(new TextEncoder().encode(parts.join("\n")));
  const cached = new URL(`linux_conformance-${key.slice(0, 32)}.bin`, CACHE_DIR);
  try {
    return await Deno.readFile(cached);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  const dir = await Deno.makeTempDir({ prefix: "denovisor-conformance-" });
  try {
    const src = (name: string) => pathOfFileUrl(new URL(name, SOURCE_DIR));
    await run("gcc", ["-c", "-o", `${dir}/setup.o`, src("setup.S")]);
    await run("gcc", ["-c", "-o", `${dir}/head.o`, src("head.S")]);
    await run("gcc", ["-c", ...C_FLAGS, "-o", `${dir}/report.o`, src("report.c")]);
    const link = [
      "-T",
      src("bzimage.ld"),
      ...LD_FLAGS,
      "-o",
      `${dir}/guest.elf`,
      `${dir}/setup.o`,
      `${dir}/head.o`,
      `${dir}/report.o`,
    ];
    try {
      await run("ld", ["--no-warn-rwx-segments", ...link]);
    } catch {
      await run("ld", link); // binutils before 2.39 has no such warning, nor the switch
    }
    await run("objcopy", ["-O", "binary", `${dir}/guest.elf`, `${dir}/guest.bin`]);
    const image = await Deno.readFile(`${dir}/guest.bin`);
    await Deno.mkdir(CACHE_DIR, { recursive: true });
    const temp = new URL(`${cached.pathname.split("/").pop()}.${Deno.pid}.tmp`, CACHE_DIR);
    await Deno.writeFile(temp, image);
    await Deno.rename(temp, cached);
    return image;
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

function fieldsOf(line: string): Map<string, string> {
  const fields = new Map<string, string>();
  for (const m of line.matchAll(/([a-z0-9_]+)=(\S+)/g)) fields.set(m[1], m[2]);
  return fields;
}

/**
 * Parses the conformance guest's console output.
 *
 * @param output The console text of a run.
 * @returns The report.
 * @throws {Error} When a line is missing or malformed (the report is incomplete).
 * @example
 * ```ts
 * import { parseConformanceReport } from "denovisor/src/linux/conformance_guest.ts";
 * const report = parseConformanceReport("protocol=020f\n...");
 * console.log(report.cmdline);
 * ```
 */
export function parseConformanceReport(output: string): ConformanceReport {
  const lines = output.split("\n");
  const line = (prefix: string) => {
    const found = lines.find((l) => l.startsWith(prefix));
    if (found === undefined) throw new Error(`the report has no "${prefix}" line:\n${output}`);
    return found;
  };
  if (!lines.includes("end")) throw new Error(`the report is incomplete:\n${output}`);
  const big = (fields: Map<string, string>, name: string) => {
    const v = fields.get(name);
    if (v === undefined) throw new Error(`the report has no field ${name}:\n${output}`);
    return BigInt(`0x${v}`);
  };
  const num = (fields: Map<string, string>, name: string) => Number(big(fields, name));
  const entry = fieldsOf(line("entry "));
  const ext = fieldsOf(line("ext "));
  const initrd = fieldsOf(line("initrd "));
  const hdr = line("hdr=").slice(4);
  return {
    protocol: num(fieldsOf(line("protocol=")), "protocol"),
    entry: {
      rsi: big(entry, "rsi"),
      load: big(entry, "load"),
      rsp: big(entry, "rsp"),
      rflags: big(entry, "rflags"),
      cr0: big(entry, "cr0"),
      cr3: big(entry, "cr3"),
      cr4: big(entry, "cr4"),
      efer: big(entry, "efer"),
      cs: num(entry, "cs"),
      ds: num(entry, "ds"),
      es: num(entry, "es"),
      ss: num(entry, "ss"),
      fs: num(entry, "fs"),
      gs: num(entry, "gs"),
    },
    header: Uint8Array.from(hdr.match(/../g) ?? [], (h) => parseInt(h, 16)),
    extRamdiskImage: num(ext, "ramdisk_image"),
    extRamdiskSize: num(ext, "ramdisk_size"),
    extCmdLinePtr: num(ext, "cmd_line_ptr"),
    acpiRsdpAddr: big(ext, "acpi_rsdp_addr"),
    e820: lines.filter((l) => l.startsWith("e820 ")).map((l) => {
      const f = fieldsOf(l);
      return { addr: big(f, "addr"), size: big(f, "size"), type: num(f, "type") };
    }),
    cmdline: line("cmdline=").slice("cmdline=".length),
    initrd: { addr: big(initrd, "addr"), size: big(initrd, "size"), fnv: big(initrd, "fnv") },
    otherNonzero: num(fieldsOf(line("other_nonzero=")), "other_nonzero"),
  };
}

/**
 * FNV-1a (64-bit) over bytes: what the conformance guest computes over the initrd.
 *
 * @param data The bytes.
 * @returns The hash.
 * @example
 * ```ts
 * import { fnv1a64 } from "denovisor/src/linux/conformance_guest.ts";
 * console.log(fnv1a64(new Uint8Array([1, 2, 3])).toString(16));
 * ```
 */
export function fnv1a64(data: Uint8Array): bigint {
  let h = 0xcbf29ce484222325n;
  for (const b of data) {
    h ^= BigInt(b);
    h = (h * 0x100000001b3n) & 0xffffffffffffffffn;
  }
  return h;
}
