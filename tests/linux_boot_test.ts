/**
 * The Linux x86 boot protocol (64-bit entry): the conformance guest proves the
 * zero page field by field; malformed kernels are refused with messages that
 * name the problem; Debian's real kernel is parsed, loaded and shown executing
 * inside its own image; and a full boot to a busybox initramfs runs where guest
 * kernel code runs at hardware speed.
 */

import assert from "node:assert/strict";

import { DenovisorError, Vm } from "../mod.ts";
import { formatInspection, inspectImage, inspectionJson } from "../src/linux/inspect.ts";
import type { LinuxLayout } from "../src/linux/layout.ts";
import {
  buildConformanceGuest,
  CONFORMANCE_EXIT_CODE,
  fnv1a64,
  parseConformanceReport,
} from "../src/linux/conformance_guest.ts";
import { busyboxInitramfs, debianKernel, debianVmlinux, fetchedPath } from "./_linux.ts";
import { main } from "../src/cli/main_cli.ts";
import { cli, KVM_KIND, kvmTest, linuxTest } from "./_helpers.ts";

/** `bytes` with a gzip magic in front, so the loader's initramfs check accepts
 * them (the conformance guest only hashes the initrd; no kernel unpacks it). */
function gzipMagic(bytes: Uint8Array): Uint8Array {
  bytes.set([0x1f, 0x8b, 0x08]);
  return bytes;
}

const MIB = 1 << 20;
const guest = await buildConformanceGuest();

/** Setup header fields of the conformance guest (guest/linux_conformance/setup.S). */
const HEADER_START = 0x1f1;
const HEADER_END = 0x26c;

function u32(bytes: Uint8Array, at: number): number {
  return new DataView(bytes.buffer, bytes.byteOffset).getUint32(at, true);
}

function patched(image: Uint8Array, at: number, value: number, bytes: 1 | 2 | 4): Uint8Array {
  const copy = image.slice();
  const view = new DataView(copy.buffer);
  if (bytes === 1) view.setUint8(at, value);
  else if (bytes === 2) view.setUint16(at, value, true);
  else view.setUint32(at, value, true);
  return copy;
}

/** The e820 map the loader must give a guest of `memoryBytes` below the MMIO gap. */
function expectedE820(memoryBytes: number): { addr: bigint; size: bigint; type: number }[] {
  const e = (addr: number, size: number, type: number) => ({
    addr: BigInt(addr),
    size: BigInt(size),
    type,
  });
  return [
    e(0, 0x10000, 2), // the VMM's GDT, page tables, TSS and boot stack
    e(0x10000, 0x9fc00 - 0x10000, 1),
    e(0x9fc00, 0x100000 - 0x9fc00, 2), // EBDA, VGA, ROMs
    e(0x100000, memoryBytes - 0x100000, 1),
    e(0xd0000000, 0x30000000, 2), // the MMIO gap below 4 GiB
  ];
}

Deno.test("inspect shows the conformance guest's setup header and placement", async () => {
  const info = await inspectImage(guest);
  assert.equal(info.format, "bzImage");
  assert.equal(info.loadable, true, info.problem ?? "");
  const z = info.bzImage!;
  assert.equal(z.protocolVersion, "2.15");
  assert.equal(z.kernelVersion, "denovisor-conformance 1.0");
  assert.deepEqual(z.xloadflags, ["XLF_KERNEL_64", "XLF_CAN_BE_LOADED_ABOVE_4G"]);
  assert.deepEqual(z.loadflags, ["LOADED_HIGH", "QUIET_FLAG", "CAN_USE_HEAP"]);
  assert.equal(z.header.setupSects, 1);
  assert.equal(z.header.prefAddress, 0x200000);
  assert.equal(z.header.initSize, 0x100000);
  assert.equal(z.header.cmdlineSize, 255);
  assert.equal(z.kernelOffset, 0x400);
  assert.equal(z.kernelSize, guest.length - 0x400);
  assert.deepEqual(info.placement, {
    kernel: { address: 0x200000, size: guest.length - 0x400 },
    entry: 0x200200,
    footprint: { address: 0x200000, size: 0x100000 },
  });
  assert.equal(info.minMemoryBytes, 3 * MIB);
  const text = formatInspection(info, "guest");
  assert.match(text, /boot protocol\s+2\.15/);
  assert.match(text, /64-bit entry\s+0x200200 \(startup_64/);
  assert.equal(JSON.parse(inspectionJson(info)).bzImage.header.initSize, 0x100000);
});

Deno.test("inspect explains why an image would be refused", async () => {
  const cases: [Uint8Array, RegExp][] = [
    [guest.subarray(0, 3000), /syssize .* only 1976 follow the setup sectors \(truncated\?\)/],
    [guest.subarray(0, 0x230), /truncated: 560 bytes/],
    [patched(guest, 0x236, 0x2, 2), /xloadflags 0x0002 lacks XLF_KERNEL_64/],
    [patched(guest, 0x206, 0x020b, 2), /boot protocol version 2\.11 .* needs 2\.12 or later/],
    [patched(guest, 0x1fe, 0x1234, 2), /boot_flag at 0x1fe is 0x1234/],
    [patched(guest, 0x211, 0x00, 1), /loadflags 0x00 lacks LOADED_HIGH/],
    [patched(guest, 0x230, 0x300000, 4), /kernel_alignment 0x300000 is not a power of two/],
    [patched(guest, 0x260, 0xfff00000, 4), /does not fit .* past the MMIO gap/],
    [patched(guest, 0x260, 16, 4), /init_size 0x10 is smaller than the protected-mode kernel/],
    [new TextEncoder().encode("#!/bin/sh\necho not a kernel\n"), /not a Linux kernel/],
  ];
  for (const [image, message] of cases) {
    const info = await inspectImage(image);
    assert.equal(info.loadable, false, String(message));
    assert.match(info.problem ?? "", message);
  }
});

Deno.test("inspect never fails on randomly mutated headers", async () => {
  let x = 0x9e3779b9;
  const next = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
  for (let i = 0; i < 300; i++) {
    const image = guest.slice(0, next() % 4 === 0 ? next() % guest.length : guest.length);
    for (let j = 0; j < 1 + (next() % 4); j++) {
      const at = HEADER_START + (next() % (HEADER_END - HEADER_START));
      if (at < image.length) image[at] = next() & 0xff;
    }
    const info = await inspectImage(image);
    assert.equal(info.loadable, info.problem === null);
  }
});

/** Runs the conformance guest and checks its report against what was loaded. */
async function conformance(
  memoryMiB: number,
  initrd: Uint8Array | undefined,
  cmdline: string | undefined,
): Promise<void> {
  using vm = await Vm.create({ memoryMiB });
  const layout: LinuxLayout = vm.loadLinux({ kernel: guest, initrd, cmdline });
  const result = await vm.run({ timeoutMs: 30_000 });
  assert.equal(result.exitCode, CONFORMANCE_EXIT_CODE, `${result.summary}\n${result.console}`);
  const r = parseConformanceReport(result.console);

  // The CPU state of the 64-bit boot protocol.
  assert.equal(r.protocol, 0x020f);
  assert.equal(r.entry.rsi, BigInt(layout.zeroPage), "RSI = the zero page");
  assert.equal(r.entry.load, 0x200000n, "loaded at pref_address");
  assert.equal(BigInt(layout.entry), r.entry.load + 0x200n, "entered at startup_64");
  assert.equal(r.entry.rsp, BigInt(layout.stack));
  assert.equal(r.entry.rflags & (1n << 9n), 0n, "interrupts off");
  assert.equal(r.entry.rflags & (1n << 10n), 0n, "direction flag clear");
  assert.equal([r.entry.cs, r.entry.ds, r.entry.es, r.entry.ss].join(), "16,24,24,24");
  assert.equal(r.entry.cr0 & 0x80000001n, 0x80000001n, "protected mode with paging");
  assert.equal(r.entry.cr4 & (1n << 5n), 1n << 5n, "PAE");
  assert.equal(r.entry.efer & 0x500n, 0x500n, "long mode enabled and active");
  const sregs = vm.vcpus[0].getSpecialRegisters();
  assert.equal(sregs.gdt.base, BigInt(layout.gdt));
  assert.equal([sregs.cs.l, sregs.cs.dpl, sregs.ds.type & 2].join(), "1,0,2");

  // The setup header: the image's own bytes, but for the fields a loader writes.
  const expected = guest.slice(HEADER_START, HEADER_END);
  const at = (offset: number) => offset - HEADER_START;
  const view = new DataView(expected.buffer);
  view.setUint8(at(0x210), 0xff); // type_of_loader: undefined loader
  view.setUint8(at(0x211), 0x01); // loadflags: LOADED_HIGH only (no heap, not quiet)
  view.setUint32(at(0x214), 0x200000, true); // code32_start: where it was loaded
  view.setUint32(at(0x218), layout.initrd?.address ?? 0, true); // ramdisk_image
  view.setUint32(at(0x21c), layout.initrd?.size ?? 0, true); // ramdisk_size
  view.setUint16(at(0x224), 0, true); // heap_end_ptr: no real-mode heap
  view.setUint32(at(0x228), layout.cmdline.address, true); // cmd_line_ptr
  for (let i = 0; i < expected.length; i++) {
    assert.equal(
      r.header[i],
      expected[i],
      `zero page byte 0x${(HEADER_START + i).toString(16)}`,
    );
  }
  assert.deepEqual([r.extRamdiskImage, r.extRamdiskSize, r.extCmdLinePtr], [0, 0, 0]);
  // The ACPI tables' root, also in the BIOS area where Linux scans for it.
  assert.equal(r.acpiRsdpAddr, 0xe0000n);

  // The memory map, as the guest walked it.
  assert.deepEqual(r.e820, expectedE820(memoryMiB * MIB));
  assert.deepEqual(
    r.e820,
    layout.e820.map((e) => ({ addr: BigInt(e.addr), size: BigInt(e.size), type: e.type })),
  );

  // The command line and initrd, read through their pointers.
  assert.equal(r.cmdline, cmdline ?? "");
  if (initrd) {
    const initrdAddrMax = u32(guest, 0x22c);
    const top = Math.min(initrdAddrMax + 1, memoryMiB * MIB);
    assert.equal(r.initrd.addr, BigInt(layout.initrd!.address));
    assert.equal(r.initrd.addr % 4096n, 0n, "page-aligned");
    assert.equal(r.initrd.addr, BigInt((top - initrd.length) & ~0xfff), "as high as it fits");
    assert.ok(r.initrd.addr >= 0x300000n, "above the kernel's init_size");
    assert.equal(r.initrd.size, BigInt(initrd.length));
    assert.equal(r.initrd.fnv, fnv1a64(initrd), "the guest read the initrd's bytes");
  } else {
    assert.deepEqual([r.initrd.addr, r.initrd.size], [0n, 0n]);
  }
  assert.equal(r.otherNonzero, 0, "no stray bytes in the zero page");
}

kvmTest(
  "the conformance guest receives every zero page field (initrd capped by initrd_addr_max)",
  async () => {
    // 64 MiB of RAM, an initrd_addr_max of 56 MiB: the initrd goes under the cap.
    const initrd = gzipMagic(Uint8Array.from({ length: 1021 }, (_, i) => (i * 7 + 3) & 0xff));
    await conformance(64, initrd, "console=ttyS0 denovisor.test=conformance root=/dev/ram0");
  },
);

kvmTest("the conformance guest in a small VM, without initrd or command line", async () => {
  // 8 MiB: the initrd cap is above RAM; no initrd and an empty command line.
  await conformance(8, undefined, undefined);
  const initrd = gzipMagic(new Uint8Array(4096 + 13).fill(0x5a));
  await conformance(8, initrd, "x".repeat(255)); // the longest cmdline_size allows
});

kvmTest(
  "a vmlinux-style ELF is entered at its physical entry with RSI = the zero page",
  async () => {
    // One segment linked at 0xffffffff81000000, loaded at 1 MiB... 16 MiB physical;
    // the code reports RSI >> 16 through the debug-exit port.
    const code = [0x89, 0xf0, 0xc1, 0xe8, 0x10, 0xe6, 0xf4]; // mov eax,esi; shr eax,16; out 0xf4,al
    const elf = new Uint8Array(64 + 56 + code.length);
    const v = new DataView(elf.buffer);
    elf.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]);
    v.setUint16(16, 2, true); // ET_EXEC
    v.setUint16(18, 62, true); // x86-64
    v.setBigUint64(24, 0x1000000n, true); // e_entry: physical, like phys_startup_64
    v.setBigUint64(32, 64n, true);
    v.setUint16(54, 56, true);
    v.setUint16(56, 1, true);
    v.setUint32(64, 1, true); // PT_LOAD
    v.setUint32(68, 5, true);
    v.setBigUint64(72, 120n, true);
    v.setBigUint64(80, 0xffffffff81000000n, true);
    v.setBigUint64(88, 0x1000000n, true);
    v.setBigUint64(96, BigInt(code.length), true);
    v.setBigUint64(104, 0x200000n, true);
    elf.set(code, 120);
    const info = await inspectImage(elf);
    assert.equal(info.elf?.segments[0].vaddr, 0xffffffff81000000n);
    using vm = await Vm.create({ memoryMiB: 32 });
    const layout = vm.loadLinux({ kernel: elf, cmdline: "console=ttyS0" });
    assert.deepEqual([layout.format, layout.entry, layout.zeroPage], ["elf", 0x1000000, 0x10000]);
    const result = await vm.run({ timeoutMs: 10_000 });
    assert.equal(result.exitCode, (1 << 1) | 1, result.summary);
  },
);

kvmTest(
  "malformed kernels and inputs are refused with a clear message, the VM untouched",
  async () => {
    using vm = await Vm.create({ memoryMiB: 64 });
    const refused = (
      options: Parameters<Vm["loadLinux"]>[0],
      message: RegExp,
      code: DenovisorError["code"] = "IMAGE",
    ) => {
      assert.throws(
        () => vm.loadLinux(options),
        (e: unknown) => e instanceof DenovisorError && e.code === code && message.test(e.message),
        `${code} ${message}`,
      );
    };
    refused(
      { kernel: guest, cmdline: "x".repeat(256) },
      /256 bytes, longer .* cmdline_size \(255\)/,
      "CMDLINE_TOO_LONG",
    );
    refused({ kernel: guest, cmdline: "a\0b" }, /contains a NUL byte/);
    refused(
      { kernel: guest, initrd: gzipMagic(new Uint8Array(65 * MIB)) },
      /larger than guest RAM/,
      "DOES_NOT_FIT",
    );
    refused(
      { kernel: guest, initrd: gzipMagic(new Uint8Array(56 * MIB)) },
      /initrd .* does not fit/,
      "DOES_NOT_FIT",
    );
    refused({ kernel: guest, initrd: new Uint8Array(56 * MIB) }, /all zero/, "INITRD");
    refused({ kernel: guest.subarray(0, 3000) }, /truncated/);
    refused({ kernel: guest.subarray(0, 0x300) }, /setup_sects 1 .* past the end/);
    refused(
      { kernel: patched(guest, 0x260, 0x8000000, 4) },
      /does not fit .* init_size 0x8000000\) .* at least 130 MiB/,
      "DOES_NOT_FIT",
    );
    refused({ kernel: patched(guest, 0x260, 0xfff00000, 4) }, /past the MMIO gap/);
    refused({ kernel: patched(guest, 0x236, 0, 2) }, /XLF_KERNEL_64/);
    refused({ kernel: patched(guest, 0x206, 0x0209, 2) }, /version 2\.09/);
    refused({ kernel: new Uint8Array(4096) }, /not a Linux kernel/);
    refused({ kernel: new Uint8Array() }, /empty/);
    assert.throws(
      () => vm.loadLinux({ kernel: "bzImage" as unknown as Uint8Array }),
      (e: unknown) => e instanceof DenovisorError && e.code === "INVALID_ARGUMENT",
    );
    // Nothing was written: the zero page is still blank, and a good load still works.
    assert.deepEqual(vm.readMemory(0x10000 + 0x202, 4), new Uint8Array(4));
    vm.loadLinux({ kernel: guest });
    const result = await vm.run({ timeoutMs: 30_000 });
    assert.equal(result.exitCode, CONFORMANCE_EXIT_CODE, result.summary);
  },
);

kvmTest("main.ts inspect and run --kernel", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const good = `${dir}/bzImage`;
    const bad = `${dir}/truncated`;
    await Deno.writeFile(good, guest);
    await Deno.writeFile(bad, guest.subarray(0, 3000));
    const messages: string[] = [];
    const io = { error: (text: string) => messages.push(text) };
    assert.equal(await main(["inspect", good], io), 0);
    assert.equal(await main(["inspect", "--json", bad], io), 2);
    assert.equal(await main(["inspect"], io), 2);
    assert.match(messages.join(""), /missing IMAGE/);
    await Deno.writeFile(`${dir}/initrd`, gzipMagic(new Uint8Array(100).fill(1)));
    assert.equal(
      await main([
        "run",
        "--quiet",
        "--no-stdin",
        "--mem",
        "16",
        "--kernel",
        good,
        "--initrd",
        `${dir}/initrd`,
        "--cmdline",
        "hello",
      ], io),
      CONFORMANCE_EXIT_CODE,
    );
    messages.length = 0;
    assert.equal(await main(["run", "--no-stdin", "--kernel", good, "--mem", "2"], io), 24);
    assert.match(messages.join(""), /give the VM at least 3 MiB/);
    assert.equal(await main(["run", "--kernel", good, "--entry", "0x1000"], io), 2);
    assert.equal(await main(["run", "--kernel", good, "image"], io), 2);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

const onPvm = KVM_KIND === "pvm";

/** The Debian kernel's path; a test needing it fails with the reason it is missing. */
function debianKernelPath(): string {
  return fetchedPath(debianKernel, "Debian's kernel");
}

kvmTest(
  "Debian's kernel is parsed, loaded into 256 MiB and runs inside its own image",
  async () => {
    const kernel = await Deno.readFile(debianKernelPath());
    const info = await inspectImage(kernel);
    assert.equal(info.format, "bzImage");
    assert.equal(info.loadable, true, info.problem ?? "");
    assert.ok(info.bzImage!.header.version >= 0x020c);
    assert.ok(info.bzImage!.xloadflags.includes("XLF_KERNEL_64"));
    assert.match(info.bzImage!.kernelVersion ?? "", /^\d+\.\d+/);

    using vm = await Vm.create({ memoryMiB: 256, interrupts: true });
    const initrd = gzipMagic(new Uint8Array(MIB).fill(0xa5));
    const layout = vm.loadLinux({ kernel, initrd, cmdline: "console=ttyS0 earlyprintk=serial" });
    assert.equal(layout.kernel.address, Number(info.bzImage!.header.prefAddress));
    assert.equal(layout.entry, layout.kernel.address + 0x200);
    assert.equal(layout.initrd?.address, 256 * MIB - MIB);
    // The kernel's bytes are where the protected-mode part of the file is.
    const pm = info.bzImage!.kernelOffset!;
    assert.deepEqual(
      vm.readMemory(layout.entry, 64),
      kernel.subarray(pm + 0x200, pm + 0x200 + 64),
    );
    // A bounded run: it must not crash, and must still be executing the kernel's
    // own code when the time is up. On PVM guest kernel code is emulated (~1 µs
    // per instruction), so the decompressor is still running then, inside the
    // kernel's footprint (it relocates itself to the end of init_size). Where
    // the kernel runs at hardware speed it is past decompression by then, in
    // its own text mapping at 0xffffffff80000000 and up (or halted, or rebooted).
    const result = await vm.run({ timeoutMs: 2500 });
    const crashes = ["shutdown", "internal_error", "fail_entry", "guest_fault", "error"];
    assert.ok(!crashes.includes(result.reason), `${result.summary}\n${result.console}`);
    const rip = vm.vcpus[0].getRegisters().rip;
    const start = BigInt(layout.footprint.address);
    const end = start + BigInt(layout.footprint.size);
    const inFootprint = rip >= start && rip < end;
    const inKernelText = rip >= 0xffffffff80000000n;
    assert.ok(
      inFootprint || inKernelText,
      `RIP 0x${rip.toString(16)} is neither in the kernel's footprint ` +
        `0x${start.toString(16)}..0x${end.toString(16)} nor in its text mapping`,
    );
    assert.notEqual(rip, BigInt(layout.entry), "the kernel executed past its first instruction");
    if (onPvm) {
      assert.equal(result.reason, "timed_out", result.summary);
      assert.ok(inFootprint, "on PVM the decompressor is still running");
    }
  },
);

async function debianVmlinuxBytes(): Promise<Uint8Array> {
  return await Deno.readFile(fetchedPath(debianVmlinux, "Debian's vmlinux"));
}

linuxTest(
  "Debian's vmlinux (ELF) boots to a busybox initramfs, prints a marker and reboots",
  async () => {
    const elf = await debianVmlinuxBytes();
    const info = await inspectImage(elf);
    assert.equal(info.format, "elf", info.problem ?? "");
    using vm = await Vm.create({ memoryMiB: 256, interrupts: true });
    vm.loadLinux({
      kernel: elf,
      initrd: await busyboxInitramfs([
        "/bin/busybox echo DENOVISOR-INITRAMFS-OK $(/bin/busybox cat /proc/cmdline)",
        "/bin/busybox reboot -f",
      ]),
      cmdline: "console=ttyS0 reboot=k panic=-1 rdinit=/init quiet",
    });
    const result = await vm.run({ timeoutMs: 300_000 });
    assert.match(result.console, /DENOVISOR-INITRAMFS-OK .*rdinit=\/init/, result.console);
    assert.equal(result.reason, "reset", `${result.summary}\n${result.console}`);
  },
);

linuxTest(
  "a kernel panic ends the run with status 14, the panic message and the last console lines",
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "denovisor-panic-" });
    try {
      const initrd = `${dir}/initrd.img`;
      await Deno.writeFile(
        initrd,
        await busyboxInitramfs([
          "/bin/busybox echo DENOVISOR-ABOUT-TO-PANIC",
          "/bin/busybox echo c > /proc/sysrq-trigger",
        ]),
      );
      const { code, stdout, stderr } = await cli(
        "run",
        "--no-stdin",
        "--kernel",
        fetchedPath(debianVmlinux, "Debian's vmlinux"),
        "--initrd",
        initrd,
        "--cmdline",
        "console=ttyS0 panic=-1 rdinit=/init",
        "--timeout",
        "300000",
      );
      assert.equal(code, 14, `${stderr}\n${stdout.slice(-3000)}`);
      assert.match(stdout, /DENOVISOR-ABOUT-TO-PANIC/);
      assert.match(stderr, /guest kernel panic: sysrq triggered crash/);
      assert.match(stderr, /last console lines:\n\[ *\d+\.\d+\] /);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
