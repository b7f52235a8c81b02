/**
 * The TypeScript ↔ Rust contract, checked on any host (no `/dev/kvm`, no core
 * build): the generated module agrees with the description the core wrote
 * (`tests/fixtures/contract/contract.json`, kept fresh by the core's unit test
 * `contract::tests::generated_files_are_fresh`), and the real TypeScript
 * parsers read every JSON example and raw struct the core's tests emitted.
 *
 * A field renamed on the Rust side changes a fixture and fails a test here; a
 * field renamed on the TypeScript side is a type error in this file (each
 * shape's field list is checked against its TypeScript type in both
 * directions).
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  ABI_VERSION,
  CONSTANTS,
  FIXTURES,
  LAYOUTS,
  STATUSES,
  STOP_REASONS,
} from "../src/_contract.generated.ts";
import { CORE_STATUS_CODES, errorCodeOfStatus } from "../src/errors.ts";
import { ABI_VERSION as FFI_ABI_VERSION, parseCoreJson } from "../src/ffi.ts";
import { describeExit, parseExit, type RawRunResult, type VcpuExit } from "../src/kvm/exit.ts";
import type {
  ConsoleCounts,
  ConsoleStats,
  HypercallCounts,
  PortCounts,
  VcpuMetrics,
} from "../src/kvm/kvm.ts";
import {
  decodeFpuState,
  decodeRegisters,
  decodeSpecialRegisters,
  encodeFpuState,
  encodeRegisters,
  encodeSpecialRegisters,
} from "../src/kvm/registers.ts";
import type { IrqStats } from "../src/irq.ts";
import { sumMetrics, toPrometheus } from "../src/metrics.ts";
import type { E820Entry, LinuxLayout, MemoryRegion } from "../src/linux/layout.ts";
import {
  type BzImageInfo,
  type ElfInfo,
  type ElfSegment,
  formatInspection,
  type ImageInspection,
  inspectionJson,
  type KernelPlacement,
  type SetupHeader,
} from "../src/linux/inspect.ts";

const FIXTURE_DIR = new URL("./fixtures/contract/", import.meta.url);

function fixtureText(name: string): string {
  return Deno.readTextFileSync(new URL(`${name}.json`, FIXTURE_DIR));
}

function fixture<T = unknown>(name: string): T {
  return JSON.parse(fixtureText(name)) as T;
}

/**
 * The field names of `T`, checked against `T` both ways at compile time: a
 * name `T` lacks is an error, and so is leaving out one it has.
 */
function fieldsOf<T>() {
  return <const K extends readonly (keyof T & string)[]>(
    ...keys: [Exclude<keyof T, K[number]>] extends [never] ? K
      : [never, "missing", Exclude<keyof T, K[number]>]
  ): string[] => keys.map((k) => String(k)).sort();
}

function keysOf(value: unknown): string[] {
  assert.ok(value && typeof value === "object", `${String(value)} is an object`);
  return Object.keys(value).sort();
}

function hexBytes(hex: string): Uint8Array {
  return Uint8Array.from(hex.match(/../g) ?? [], (b) => parseInt(b, 16));
}

Deno.test("the generated module holds the description the core wrote", () => {
  const written = fixture<Record<string, unknown>>("contract");
  assert.deepEqual(
    {
      abiVersion: ABI_VERSION,
      statuses: STATUSES,
      constants: CONSTANTS,
      layouts: LAYOUTS,
      stopReasons: STOP_REASONS,
      fixtures: FIXTURES,
    },
    written,
  );
  assert.equal(FFI_ABI_VERSION, ABI_VERSION);
  for (const name of FIXTURES) assert.ok(fixtureText(name).length > 2, name);
  const onDisk = [...Deno.readDirSync(FIXTURE_DIR)].map((e) => e.name.replace(/\.json$/, ""));
  assert.deepEqual(onDisk.sort(), [...FIXTURES].sort());
});

Deno.test("every core status maps to the error code of its name", () => {
  const errors = STATUSES.filter((s) => s.value !== 0);
  assert.deepEqual(
    Object.fromEntries(Object.entries(CORE_STATUS_CODES)),
    Object.fromEntries(errors.map((s) => [String(s.value), s.code])),
  );
  for (const s of errors) assert.equal(errorCodeOfStatus(s.value), s.code, s.name);
  assert.equal(errorCodeOfStatus(-1000), "PANIC");
});

Deno.test("register sets decode the bytes the core wrote, field by field, and encode back", () => {
  const big = (v: string) => BigInt(v);
  const regs = fixture<{ bytes: string; values: Record<string, string> }>("kvm_regs");
  const decoded = decodeRegisters(hexBytes(regs.bytes));
  assert.deepEqual(
    decoded,
    Object.fromEntries(Object.entries(regs.values).map(([k, v]) => [k, big(v)])),
  );
  assert.deepEqual(encodeRegisters(decoded), hexBytes(regs.bytes));

  type Raw = Record<string, string | number>;
  const sregs = fixture<{ bytes: string; values: Record<string, Raw | string | string[]> }>(
    "kvm_sregs",
  );
  const s = decodeSpecialRegisters(hexBytes(sregs.bytes));
  const v = sregs.values;
  for (const name of ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"] as const) {
    const { base, ...rest } = v[name] as Raw;
    assert.deepEqual(s[name], { base: big(base as string), ...rest }, name);
  }
  for (const name of ["gdt", "idt"] as const) {
    const raw = v[name] as Raw;
    assert.deepEqual(s[name], { base: big(raw.base as string), limit: raw.limit }, name);
  }
  for (const name of ["cr0", "cr2", "cr3", "cr4", "cr8", "efer"] as const) {
    assert.equal(s[name], big(v[name] as string), name);
  }
  assert.equal(s.apicBase, big(v.apic_base as string));
  assert.deepEqual(s.interruptBitmap, (v.interrupt_bitmap as string[]).map(big));
  assert.deepEqual(encodeSpecialRegisters(s), hexBytes(sregs.bytes));

  const fpu = fixture<{ bytes: string; values: Record<string, number | string | string[]> }>(
    "kvm_fpu",
  );
  const f = decodeFpuState(hexBytes(fpu.bytes));
  const fv = fpu.values;
  assert.deepEqual(f, {
    fpr: (fv.fpr as string[]).map(hexBytes),
    fcw: fv.fcw,
    fsw: fv.fsw,
    ftwx: fv.ftwx,
    lastOpcode: fv.last_opcode,
    lastIp: big(fv.last_ip as string),
    lastDp: big(fv.last_dp as string),
    xmm: (fv.xmm as string[]).map(hexBytes),
    mxcsr: fv.mxcsr,
  });
  assert.deepEqual(encodeFpuState(f), hexBytes(fpu.bytes));
});

type ExitOf<R extends VcpuExit["reason"]> = Extract<VcpuExit, { reason: R }>;

/** Every field of every exit, as the TypeScript union declares them. */
const EXIT_FIELDS: { [R in VcpuExit["reason"]]: string[] } = {
  debug_exit: fieldsOf<ExitOf<"debug_exit">>()("reason", "exitCode"),
  guest_exit: fieldsOf<ExitOf<"guest_exit">>()("reason", "status"),
  reset: fieldsOf<ExitOf<"reset">>()("reason"),
  power_off: fieldsOf<ExitOf<"power_off">>()("reason"),
  guest_fault: fieldsOf<ExitOf<"guest_fault">>()("reason", "vector", "errorCode", "address", "rip"),
  bad_hypercall: fieldsOf<ExitOf<"bad_hypercall">>()("reason", "message"),
  hlt: fieldsOf<ExitOf<"hlt">>()("reason"),
  shutdown: fieldsOf<ExitOf<"shutdown">>()("reason", "registers"),
  unhandled_io: fieldsOf<ExitOf<"unhandled_io">>()("reason", "port", "size", "direction", "data"),
  unhandled_mmio: fieldsOf<ExitOf<"unhandled_mmio">>()(
    "reason",
    "address",
    "size",
    "direction",
    "data",
  ),
  internal_error: fieldsOf<ExitOf<"internal_error">>()("reason", "suberror"),
  fail_entry: fieldsOf<ExitOf<"fail_entry">>()("reason", "hardwareReason"),
  system_event: fieldsOf<ExitOf<"system_event">>()("reason", "event"),
  unexpected_exit: fieldsOf<ExitOf<"unexpected_exit">>()("reason", "exit"),
  stopped: fieldsOf<ExitOf<"stopped">>()("reason"),
  timed_out: fieldsOf<ExitOf<"timed_out">>()("reason"),
  error: fieldsOf<ExitOf<"error">>()("reason", "message"),
};

const CRASH_REGISTER_FIELDS = fieldsOf<ExitOf<"shutdown">["registers"]>()(
  "rip",
  "rsp",
  "rflags",
  "rax",
  "rbx",
  "rcx",
  "rdx",
  "rsi",
  "rdi",
  "rbp",
  "cr0",
  "cr2",
  "cr3",
  "cr4",
  "efer",
  "cs",
  "ss",
  "resetState",
);

Deno.test("the TypeScript exits are exactly the core's stop reasons", () => {
  assert.deepEqual(Object.keys(EXIT_FIELDS).sort(), [...STOP_REASONS].sort());
});

for (const reason of STOP_REASONS) {
  Deno.test(`parseExit reads the core's ${reason} run result`, () => {
    const raw = fixture<RawRunResult>(`exit_${reason}`);
    assert.equal(raw.reason, reason);
    assert.deepEqual([raw.vcpu, raw.runNs], [1, 123_456_789]);
    const exit = parseExit(raw) as unknown as Record<string, unknown>;
    assert.deepEqual(keysOf(exit), EXIT_FIELDS[reason]);
    for (const [key, value] of Object.entries(exit)) {
      assert.notEqual(value, undefined, key);
      // 64-bit values arrive as hex strings and leave as bigints.
      if (typeof raw[key] === "string" && /^0x/.test(raw[key] as string)) {
        assert.equal(value, BigInt(raw[key] as string), key);
      }
    }
    if (reason === "shutdown") {
      const regs = exit.registers as Record<string, unknown>;
      assert.deepEqual(keysOf(regs), CRASH_REGISTER_FIELDS);
      assert.equal(regs.rip, 0xffff_ffff_8100_0010n);
      assert.equal(regs.resetState, false);
    }
    const text = describeExit(exit as unknown as VcpuExit);
    assert.doesNotMatch(text, /undefined|NaN/, text);
  });
}

Deno.test("describeExit quotes the fields of the core's examples", () => {
  const say = (reason: string) => describeExit(parseExit(fixture(`exit_${reason}`)));
  assert.equal(say("debug_exit"), "guest exited with code 7");
  assert.equal(say("guest_exit"), "guest exited with status 42");
  assert.match(say("guest_fault"), /#PF page fault at rip=0x401234 .*address 0xffff8000deadb000/);
  assert.match(say("unhandled_io"), /out 2 byte\(s\) at port 0x2e8/);
  assert.match(say("unhandled_mmio"), /in 4 byte\(s\) at 0xfed00000/);
  assert.match(say("fail_entry"), /0x80000021/);
  assert.match(say("shutdown"), /rip=0xffffffff81000010 rsp=0x8000 cr2=0xdead0000/);
});

const PORT_FIELDS = fieldsOf<PortCounts>()("serial", "debugExit", "hypercall", "other");
const METRICS_FIELDS = fieldsOf<VcpuMetrics>()(
  "ioIn",
  "ioOut",
  "mmioRead",
  "mmioWrite",
  "hlt",
  "shutdown",
  "internalError",
  "interrupted",
  "msrReadDenied",
  "msrWriteDenied",
  "other",
  "exits",
  "ioInByPort",
  "ioOutByPort",
  "hypercalls",
  "kvmRunNs",
  "vmmNs",
  "handlingLatencyLog2Ns",
  "console",
);

Deno.test("the metrics parsers read the core's metrics snapshot", () => {
  const vcpus = fixture<VcpuMetrics[]>("metrics");
  assert.equal(vcpus.length, 1);
  const [m] = vcpus;
  assert.deepEqual(keysOf(m), METRICS_FIELDS);
  assert.deepEqual(keysOf(m.ioInByPort), PORT_FIELDS);
  assert.deepEqual(keysOf(m.ioOutByPort), PORT_FIELDS);
  assert.deepEqual(
    keysOf(m.hypercalls),
    fieldsOf<HypercallCounts>()(
      "write",
      "exit",
      "clock",
      "report",
      "fault",
      "nop",
      "invalid",
      "irqCounters",
    ),
  );
  assert.deepEqual(
    keysOf(m.console),
    fieldsOf<ConsoleCounts>()("bytes", "captureDropped", "streamDropped"),
  );
  assert.equal(m.handlingLatencyLog2Ns.length, CONSTANTS.LATENCY_BUCKETS);
  // The core counted 1, 2, ... 11 exits of each kind, in declaration order.
  const kinds = [
    m.ioIn,
    m.ioOut,
    m.mmioRead,
    m.mmioWrite,
    m.hlt,
    m.shutdown,
    m.internalError,
    m.interrupted,
    m.msrReadDenied,
    m.msrWriteDenied,
    m.other,
  ];
  assert.deepEqual(kinds, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
  assert.equal(m.exits, 66);

  const total = sumMetrics([m, m]);
  assert.equal(total.exits, 132);
  assert.equal(total.hypercalls.irqCounters, 2 * m.hypercalls.irqCounters);
  assert.equal(total.console.streamDropped, 6);
  assert.equal(total.handlingLatencyLog2Ns[10], 2);

  const text = toPrometheus(vcpus, { vm: "fixture" });
  assert.doesNotMatch(text, /undefined|NaN/);
  assert.match(text, /^denovisor_vcpu_exits_total\{vm="fixture",vcpu="0",reason="other"\} 11$/m);
  assert.match(
    text,
    /^denovisor_vcpu_console_bytes_total\{vm="fixture",vcpu="0",kind="written"\} 300$/m,
  );
  assert.match(
    text,
    /^denovisor_vcpu_hypercalls_total\{vm="fixture",vcpu="0",kind="irqCounters"\} 27$/m,
  );
});

Deno.test("IRQ and console stats have the fields their TypeScript types declare", () => {
  const irq = fixture<IrqStats>("irq_stats");
  assert.deepEqual(
    keysOf(irq),
    fieldsOf<IrqStats>()("irqchip", "injected", "msis", "msisRefused", "serial"),
  );
  assert.deepEqual(irq, { irqchip: true, injected: 1, msis: 2, msisRefused: 3, serial: 4 });

  const console = fixture<ConsoleStats>("console_stats");
  assert.deepEqual(
    keysOf(console),
    fieldsOf<ConsoleStats>()(
      "bytes",
      "captureDropped",
      "streamDropped",
      "streamPending",
      "rateDropped",
    ),
  );
  assert.deepEqual(console, {
    bytes: 1000,
    captureDropped: 100,
    streamDropped: 10,
    streamPending: 1,
    rateDropped: 0,
  });
});

const REGION_FIELDS = fieldsOf<MemoryRegion>()("address", "size");

Deno.test("a Linux load's layout has the fields LinuxLayout declares", () => {
  const layout = fixture<LinuxLayout>("linux_layout");
  assert.deepEqual(
    keysOf(layout),
    fieldsOf<LinuxLayout>()(
      "format",
      "protocolVersion",
      "entry",
      "zeroPage",
      "stack",
      "gdt",
      "kernel",
      "footprint",
      "cmdline",
      "initrd",
      "e820",
    ),
  );
  for (const region of [layout.kernel, layout.footprint, layout.cmdline, layout.initrd]) {
    assert.deepEqual(keysOf(region), REGION_FIELDS);
  }
  assert.equal(layout.format, "bzImage");
  assert.equal(layout.cmdline.size, "console=ttyS0".length + 1);
  const types = new Set(layout.e820.map((e) => e.type));
  assert.deepEqual(types, new Set([CONSTANTS.E820_RAM, CONSTANTS.E820_RESERVED]));
  for (const e of layout.e820) {
    assert.deepEqual(keysOf(e), fieldsOf<E820Entry>()("addr", "size", "type"));
  }
});

const INSPECTION_FIELDS = fieldsOf<ImageInspection>()(
  "format",
  "size",
  "loadable",
  "problem",
  "placement",
  "minMemoryBytes",
  "bzImage",
  "elf",
);

Deno.test("inspect's parsers read the core's bzImage, ELF and unknown inspections", () => {
  const bz = parseCoreJson<ImageInspection>(fixtureText("inspect_bzimage"));
  assert.deepEqual(keysOf(bz), INSPECTION_FIELDS);
  assert.ok(bz.bzImage && bz.placement && bz.loadable);
  assert.deepEqual(
    keysOf(bz.bzImage),
    fieldsOf<BzImageInfo>()(
      "header",
      "protocolVersion",
      "loadflags",
      "xloadflags",
      "kernelVersion",
      "kernelOffset",
      "kernelSize",
    ),
  );
  assert.deepEqual(
    keysOf(bz.bzImage.header),
    fieldsOf<SetupHeader>()(
      "setupSects",
      "syssize",
      "bootFlag",
      "jump",
      "header",
      "version",
      "kernelVersionOffset",
      "loadflags",
      "code32Start",
      "initrdAddrMax",
      "kernelAlignment",
      "relocatableKernel",
      "minAlignment",
      "xloadflags",
      "cmdlineSize",
      "hardwareSubarch",
      "payloadOffset",
      "payloadLength",
      "prefAddress",
      "initSize",
      "handoverOffset",
      "kernelInfoOffset",
    ),
  );
  assert.deepEqual(
    keysOf(bz.placement),
    fieldsOf<KernelPlacement>()("kernel", "entry", "footprint"),
  );
  assert.equal(bz.bzImage.protocolVersion, "2.15");
  const bzText = formatInspection(bz, "bzImage");
  assert.doesNotMatch(bzText, /undefined|NaN/, bzText);
  assert.match(bzText, /2\.15/);

  const elf = parseCoreJson<ImageInspection>(fixtureText("inspect_elf"));
  assert.deepEqual(keysOf(elf), INSPECTION_FIELDS);
  assert.ok(elf.elf);
  assert.deepEqual(keysOf(elf.elf), fieldsOf<ElfInfo>()("entry", "segments"));
  for (const s of elf.elf.segments) {
    assert.deepEqual(
      keysOf(s),
      fieldsOf<ElfSegment>()("paddr", "vaddr", "offset", "filesz", "memsz", "flags"),
    );
  }
  const elfText = formatInspection(elf, "vmlinux");
  assert.doesNotMatch(elfText, /undefined|NaN/, elfText);
  assert.deepEqual(JSON.parse(inspectionJson(elf)).elf.entry, elf.elf.entry);

  const unknown = parseCoreJson<ImageInspection>(fixtureText("inspect_unknown"));
  assert.deepEqual(keysOf(unknown), INSPECTION_FIELDS);
  assert.equal(unknown.format, "unknown");
  assert.equal(unknown.loadable, false);
  assert.ok(unknown.problem);
  assert.ok(formatInspection(unknown, "junk").includes(unknown.problem));
});

Deno.test("a 64-bit integer beyond 2^53 in the core's JSON becomes a bigint", () => {
  const parsed = parseCoreJson<{ small: number; big: bigint }>(
    '{"small": 16777216, "big": 18446744071578845184}',
  );
  assert.deepEqual(parsed, { small: 16777216, big: 0xffff_ffff_8100_0000n });
});
