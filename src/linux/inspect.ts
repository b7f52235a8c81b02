/**
 * What the loaders see in an image, without a VM: the format, a bzImage's boot
 * protocol setup header or an ELF's program headers, where it would be loaded
 * and entered, how much RAM it needs, and why it would be refused
 * (`main.ts inspect IMAGE`).
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";
import { openCore } from "../ffi.ts";
import type { LinuxLayout, LinuxLoadOptions, MemoryRegion } from "./layout.ts";

/** A 64-bit value: a `number` when it is a safe integer, else a `bigint`. */
export type Address = number | bigint;

/** A bzImage's setup header fields as stored in the file (boot.rst names, camelCase). */
export interface SetupHeader {
  /** Setup sectors after the boot sector (0 means 4). */
  setupSects: number;
  /** Protected-mode code size in 16-byte paragraphs. */
  syssize: number;
  /** 0xaa55 in a valid image. */
  bootFlag: number;
  /** The jump at 0x200 (0xeb and the header length). */
  jump: number;
  /** The `"HdrS"` magic as a little-endian integer. */
  header: number;
  /** Boot protocol version (major << 8 | minor). */
  version: number;
  /** Offset of the version string, minus 0x200. */
  kernelVersionOffset: number;
  /** `loadflags`. */
  loadflags: number;
  /** The 32-bit entry as linked. */
  code32Start: number;
  /** Highest address the initrd may occupy. */
  initrdAddrMax: number;
  /** Alignment of a relocatable kernel. */
  kernelAlignment: number;
  /** Nonzero when the kernel is relocatable. */
  relocatableKernel: number;
  /** log2 of the smallest tolerated alignment. */
  minAlignment: number;
  /** `xloadflags`. */
  xloadflags: number;
  /** The longest command line (without its NUL). */
  cmdlineSize: number;
  /** Hardware subarchitecture (0: PC). */
  hardwareSubarch: number;
  /** Offset of the compressed payload in the protected-mode kernel. */
  payloadOffset: number;
  /** Length of the compressed payload. */
  payloadLength: number;
  /** Preferred load address. */
  prefAddress: Address;
  /** Memory the kernel needs from its runtime start before it reads the e820 map. */
  initSize: number;
  /** Offset of the EFI handover entry. */
  handoverOffset: number;
  /** Offset of `kernel_info` (protocol 2.15+). */
  kernelInfoOffset: number;
}

/** What {@link inspectImage} reports about a bzImage. */
export interface BzImageInfo {
  /** The raw setup header. */
  header: SetupHeader;
  /** The protocol version as `"2.15"`. */
  protocolVersion: string;
  /** Names of the set `loadflags` bits. */
  loadflags: string[];
  /** Names of the set `xloadflags` bits. */
  xloadflags: string[];
  /** The kernel's version string (valid images only). */
  kernelVersion: string | null;
  /** File offset of the protected-mode kernel (valid images only). */
  kernelOffset: number | null;
  /** Its size in bytes (valid images only). */
  kernelSize: number | null;
}

/** One ELF program header of type `PT_LOAD`. */
export interface ElfSegment {
  /** Physical address (where the loader puts it). */
  paddr: Address;
  /** Virtual address. */
  vaddr: Address;
  /** File offset. */
  offset: Address;
  /** Bytes in the file. */
  filesz: Address;
  /** Bytes in memory. */
  memsz: Address;
  /** Permissions, `R`, `W`, `X` or `-` each. */
  flags: string;
}

/** What {@link inspectImage} reports about an ELF image. */
export interface ElfInfo {
  /** `e_entry` as stored. */
  entry: Address;
  /** The loadable segments. */
  segments: ElfSegment[];
}

/** Where a loadable kernel goes. */
export interface KernelPlacement {
  /** Where its bytes are copied. */
  kernel: MemoryRegion;
  /** The 64-bit entry point. */
  entry: number;
  /** What it may use before it reads the memory map. */
  footprint: MemoryRegion;
}

/** What the loaders see in an image. */
export interface ImageInspection {
  /** The format, by its magic. */
  format: "bzImage" | "elf" | "unknown";
  /** File size in bytes. */
  size: number;
  /** Whether {@link Vm.loadLinux} accepts it, given enough RAM. */
  loadable: boolean;
  /** Why it is refused, when it is. */
  problem: string | null;
  /** Where it would go. */
  placement: KernelPlacement | null;
  /** The smallest guest RAM (bytes, whole MiB) its footprint fits in. */
  minMemoryBytes: number | null;
  /** bzImage details. */
  bzImage: BzImageInfo | null;
  /** ELF details. */
  elf: ElfInfo | null;
}

/**
 * Describes an image the way the loaders see it. Never throws for a malformed
 * image: the reason it would be refused is in `problem`.
 *
 * @param image The image's bytes.
 * @returns The inspection.
 * @throws {DenovisorError} Only when the core cannot be loaded.
 * @example
 * ```ts
 * import { inspectImage } from "denovisor";
 * const info = await inspectImage(await Deno.readFile("/boot/vmlinuz"));
 * console.log(info.format, info.bzImage?.protocolVersion, info.loadable, info.problem);
 * ```
 */
export async function inspectImage(image: Uint8Array): Promise<ImageInspection> {
  const core = await openCore();
  return core.inspectImage<ImageInspection>(image);
}

/** The validated bytes of a {@link LinuxLoadOptions}. */
export interface LinuxInputs {
  /** The kernel image. */
  kernel: Uint8Array;
  /** The initrd (empty: none). */
  initrd: Uint8Array;
  /** The command line as bytes, without a NUL. */
  cmdline: Uint8Array;
}

/**
 * Checks the types of a Linux load's options (what `Vm.loadLinux` takes).
 *
 * @param options The kernel, initrd and command line.
 * @returns Their bytes.
 * @throws {DenovisorError} `INVALID_ARGUMENT` for a wrong type, `IMAGE` for an
 *   empty kernel.
 * @example
 * ```ts
 * import { linuxInputs } from "denovisor/src/linux/inspect.ts";
 * const { cmdline } = linuxInputs({ kernel: new Uint8Array(1), cmdline: "quiet" });
 * console.log(cmdline.length); // 5
 * ```
 */
export function linuxInputs(options: LinuxLoadOptions): LinuxInputs {
  if (typeof options !== "object" || options === null) {
    throw new DenovisorError("INVALID_ARGUMENT", "the Linux load options must be an object");
  }
  const { kernel, initrd = new Uint8Array(), cmdline = "" } = options;
  if (!(kernel instanceof Uint8Array)) {
    throw new DenovisorError("INVALID_ARGUMENT", "kernel must be a Uint8Array");
  }
  if (!(initrd instanceof Uint8Array)) {
    throw new DenovisorError("INVALID_ARGUMENT", "initrd must be a Uint8Array");
  }
  if (typeof cmdline !== "string") {
    throw new DenovisorError("INVALID_ARGUMENT", "cmdline must be a string");
  }
  if (kernel.length === 0) throw new DenovisorError("IMAGE", "the kernel image is empty");
  return { kernel, initrd, cmdline: new TextEncoder().encode(cmdline) };
}

/**
 * Makes every check `Vm.loadLinux` makes, without a VM and so without
 * `/dev/kvm`: the kernel is a bzImage or vmlinux the loader accepts, the initrd
 * is an initramfs the kernel accepts (a `newc` cpio archive walked to its
 * trailer, or gzip, bzip2, lzma, xz, lzo, lz4 or zstd by its magic), the command
 * line fits the kernel's `cmdline_size`, and the kernel and initrd fit in
 * `memoryMiB` of RAM.
 *
 * @param options The kernel, initrd and command line.
 * @param memoryMiB The guest RAM they must fit in.
 * @returns The layout the load would produce.
 * @throws {DenovisorError} `IMAGE` (a malformed kernel), `INITRD`,
 *   `CMDLINE_TOO_LONG`, `DOES_NOT_FIT` or `INVALID_ARGUMENT`, each with a
 *   one-line message.
 * @example
 * ```ts
 * import { checkLinuxLoad } from "denovisor";
 * const kernel = await Deno.readFile("bzImage");
 * const layout = await checkLinuxLoad({ kernel, cmdline: "console=ttyS0" }, 256);
 * console.log(layout.entry.toString(16));
 * ```
 */
export async function checkLinuxLoad(
  options: LinuxLoadOptions,
  memoryMiB: number,
): Promise<LinuxLayout> {
  if (!Number.isSafeInteger(memoryMiB) || memoryMiB <= 0) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `memoryMiB must be a positive integer, got ${memoryMiB}`,
    );
  }
  const { kernel, initrd, cmdline } = linuxInputs(options);
  const core = await openCore();
  return core.linuxCheck<LinuxLayout>(kernel, initrd, cmdline, BigInt(memoryMiB) << 20n);
}

function hex(value: Address): string {
  return `0x${value.toString(16)}`;
}

function mib(bytes: number): string {
  return `${(bytes / (1 << 20)).toFixed(1)} MiB`;
}

/**
 * Formats an inspection for people, one field a line.
 *
 * @param inspection What {@link inspectImage} returned.
 * @param name The image's name for the first line.
 * @returns The text, ending with a newline.
 * @example
 * ```ts
 * import { formatInspection, inspectImage } from "denovisor";
 * const bytes = await Deno.readFile("bzImage");
 * console.log(formatInspection(await inspectImage(bytes), "bzImage"));
 * ```
 */
export function formatInspection(inspection: ImageInspection, name: string): string {
  const i = inspection;
  const lines: string[] = [];
  const verdict = i.loadable
    ? `loadable as a Linux kernel (needs at least ${
      (i.minMemoryBytes ?? 0) / (1 << 20)
    } MiB of RAM)`
    : `not loadable as a Linux kernel: ${i.problem}`;
  lines.push(`${name}: ${i.format}, ${i.size} bytes — ${verdict}`);
  const row = (label: string, value: string) => lines.push(`  ${label.padEnd(20)}${value}`);
  const z = i.bzImage;
  if (z) {
    const h = z.header;
    if (z.kernelVersion) row("kernel version", z.kernelVersion);
    row("boot protocol", `${z.protocolVersion} (${hex(h.version)})`);
    const sects = h.setupSects === 0 ? 4 : h.setupSects;
    row(
      "setup_sects",
      `${h.setupSects}` + (h.setupSects === 0 ? " (means 4)" : "") +
        (z.kernelOffset !== null
          ? `: protected-mode kernel at file offset ${hex(z.kernelOffset)}, ${z.kernelSize} bytes`
          : `: protected-mode kernel at file offset ${hex((sects + 1) * 512)}`),
    );
    row("syssize", `${hex(h.syssize)} paragraphs (${h.syssize * 16} bytes)`);
    row("boot_flag", hex(h.bootFlag));
    row("loadflags", `${hex(h.loadflags)} ${z.loadflags.join(" ")}`.trimEnd());
    row("xloadflags", `${hex(h.xloadflags)} ${z.xloadflags.join(" ")}`.trimEnd());
    row(
      "relocatable_kernel",
      `${h.relocatableKernel ? "yes" : "no"}, kernel_alignment ${hex(h.kernelAlignment)}, ` +
        `min_alignment 2^${h.minAlignment}`,
    );
    row("pref_address", hex(h.prefAddress));
    row("init_size", `${hex(h.initSize)} (${mib(h.initSize)})`);
    row("initrd_addr_max", hex(h.initrdAddrMax));
    row("cmdline_size", `${h.cmdlineSize}`);
    row("code32_start", hex(h.code32Start));
    row("payload", `offset ${hex(h.payloadOffset)}, ${h.payloadLength} bytes`);
    row("handover_offset", hex(h.handoverOffset));
    row("kernel_info_offset", hex(h.kernelInfoOffset));
  }
  const e = i.elf;
  if (e) {
    row("e_entry", hex(e.entry));
    lines.push(
      `  ${"segments".padEnd(20)}${
        ["paddr", "vaddr", "offset", "filesz", "memsz"].map((s) => s.padEnd(20)).join("")
      }flags`,
    );
    for (const s of e.segments) {
      lines.push(
        `  ${"".padEnd(20)}${
          [s.paddr, s.vaddr, s.offset, s.filesz, s.memsz].map((v) => hex(v).padEnd(20)).join("")
        }${s.flags}`,
      );
    }
  }
  const p = i.placement;
  if (p) {
    const end = p.footprint.address + p.footprint.size;
    row("load address", `${hex(p.kernel.address)} (${p.kernel.size} bytes)`);
    row("64-bit entry", `${hex(p.entry)}${z ? " (startup_64, load address + 0x200)" : ""}`);
    if (z) {
      row("32-bit entry", `${hex(p.kernel.address)} (not used: denovisor enters at 64-bit)`);
      if (z.xloadflags.includes("XLF_EFI_HANDOVER_64")) {
        const handover = p.kernel.address + z.header.handoverOffset + 0x200;
        row("EFI handover entry", `${hex(handover)} (not used)`);
      }
    }
    row("footprint", `${hex(p.footprint.address)}..${hex(end)} (${mib(p.footprint.size)})`);
  }
  return lines.join("\n") + "\n";
}

/** `JSON.rawJSON` (V8 has it; TypeScript's lib does not declare it yet). */
const rawJson = (JSON as unknown as { rawJSON(text: string): unknown }).rawJSON;

/**
 * Formats an inspection as JSON, 64-bit values exact (a `bigint` is written as
 * the integer it is, not rounded).
 *
 * @param inspection What {@link inspectImage} returned.
 * @returns Indented JSON, ending with a newline.
 * @example
 * ```ts
 * import { inspectImage, inspectionJson } from "denovisor";
 * console.log(inspectionJson(await inspectImage(await Deno.readFile("vmlinux"))));
 * ```
 */
export function inspectionJson(inspection: ImageInspection): string {
  return JSON.stringify(
    inspection,
    (_key, value) => typeof value === "bigint" ? rawJson(value.toString()) : value,
    2,
  ) + "\n";
}
