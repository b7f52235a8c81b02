/**
 * x86-64 register sets as KVM defines them (`struct kvm_regs`, `kvm_sregs`,
 * `kvm_fpu` from `<linux/kvm.h>`), with their byte layouts. 64-bit values are
 * `bigint`s: registers use all 64 bits. The offsets and sizes come from the
 * core (`LAYOUTS` in the generated contract, from `offset_of!`): a field whose
 * width changes there is a type error in the readers below.
 *
 * @module
 */

import { LAYOUTS } from "../_contract.generated.ts";

/** General-purpose registers (`struct kvm_regs`, 144 bytes). */
export interface Registers {
  /** RAX. */
  rax: bigint;
  /** RBX. */
  rbx: bigint;
  /** RCX. */
  rcx: bigint;
  /** RDX. */
  rdx: bigint;
  /** RSI. */
  rsi: bigint;
  /** RDI. */
  rdi: bigint;
  /** RSP, the stack pointer. */
  rsp: bigint;
  /** RBP. */
  rbp: bigint;
  /** R8. */
  r8: bigint;
  /** R9. */
  r9: bigint;
  /** R10. */
  r10: bigint;
  /** R11. */
  r11: bigint;
  /** R12. */
  r12: bigint;
  /** R13. */
  r13: bigint;
  /** R14. */
  r14: bigint;
  /** R15. */
  r15: bigint;
  /** RIP, the instruction pointer. */
  rip: bigint;
  /** RFLAGS. */
  rflags: bigint;
}

const REGISTER_NAMES = [
  "rax",
  "rbx",
  "rcx",
  "rdx",
  "rsi",
  "rdi",
  "rsp",
  "rbp",
  "r8",
  "r9",
  "r10",
  "r11",
  "r12",
  "r13",
  "r14",
  "r15",
  "rip",
  "rflags",
] as const satisfies readonly (keyof Registers)[];

/** A segment register (`struct kvm_segment`, 24 bytes). */
export interface Segment {
  /** Base address. */
  base: bigint;
  /** Limit (bytes - 1, or 4 KiB pages - 1 when `g` is set). */
  limit: number;
  /** Selector loaded into the register. */
  selector: number;
  /** Descriptor type bits (4 bits). */
  type: number;
  /** Present bit. */
  present: number;
  /** Descriptor privilege level (0-3). */
  dpl: number;
  /** Default operation size (1 = 32-bit). */
  db: number;
  /** Descriptor kind (1 = code/data, 0 = system). */
  s: number;
  /** 64-bit code segment. */
  l: number;
  /** Granularity (1 = limit in 4 KiB pages). */
  g: number;
  /** Available bit. */
  avl: number;
  /** Set when the segment is unusable (null). */
  unusable: number;
}

/** A descriptor-table register (`struct kvm_dtable`, 16 bytes). */
export interface DescriptorTable {
  /** Base address. */
  base: bigint;
  /** Limit (bytes - 1, or 4 KiB pages - 1 when `g` is set). */
  limit: number;
}

/** Special registers (`struct kvm_sregs`, 312 bytes). */
export interface SpecialRegisters {
  /** Code segment. */
  cs: Segment;
  /** Data segment. */
  ds: Segment;
  /** ES segment. */
  es: Segment;
  /** FS segment. */
  fs: Segment;
  /** GS segment. */
  gs: Segment;
  /** Stack segment. */
  ss: Segment;
  /** Task register. */
  tr: Segment;
  /** Local descriptor table. */
  ldt: Segment;
  /** Global descriptor table. */
  gdt: DescriptorTable;
  /** Interrupt descriptor table. */
  idt: DescriptorTable;
  /** CR0 (protection, paging). */
  cr0: bigint;
  /** CR2 (the last page-fault address). */
  cr2: bigint;
  /** CR3 (the page-table root). */
  cr3: bigint;
  /** CR4 (PAE and other extensions). */
  cr4: bigint;
  /** CR8 (task priority). */
  cr8: bigint;
  /** EFER (long mode, SYSCALL). */
  efer: bigint;
  /** IA32_APIC_BASE. */
  apicBase: bigint;
  /** Pending external interrupts, one bit per vector (4 x 64 bits). */
  interruptBitmap: [bigint, bigint, bigint, bigint];
}

/** FPU and SSE state (`struct kvm_fpu`, 416 bytes). */
export interface FpuState {
  /** x87 registers ST0-ST7, 16 bytes each (80 bits used). */
  fpr: Uint8Array[];
  /** x87 control word. */
  fcw: number;
  /** x87 status word. */
  fsw: number;
  /** x87 abridged tag word. */
  ftwx: number;
  /** Last x87 opcode. */
  lastOpcode: number;
  /** Last x87 instruction pointer. */
  lastIp: bigint;
  /** Last x87 data pointer. */
  lastDp: bigint;
  /** XMM0-XMM15, 16 bytes each. */
  xmm: Uint8Array[];
  /** SSE control and status (read-only here: KVM_SET_FPU does not write it). */
  mxcsr: number;
}

/** Byte size of `struct kvm_regs`. */
export const REGISTERS_SIZE: number = LAYOUTS.kvm_regs.size;
/** Byte size of `struct kvm_sregs`. */
export const SPECIAL_REGISTERS_SIZE: number = LAYOUTS.kvm_sregs.size;
/** Byte size of `struct kvm_fpu`. */
export const FPU_STATE_SIZE: number = LAYOUTS.kvm_fpu.size;

const SEGMENT_NAMES = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"] as const;

/** A field of a layout whose width is `S` bytes. */
interface Field<S extends number> {
  readonly offset: number;
  readonly size: S;
}

const REGS = LAYOUTS.kvm_regs.fields;
const SEG = LAYOUTS.kvm_segment.fields;
const DTABLE = LAYOUTS.kvm_dtable.fields;
const SREGS = LAYOUTS.kvm_sregs.fields;
const FPU = LAYOUTS.kvm_fpu.fields;

const u64 = (view: DataView, at: number, f: Field<8>) => view.getBigUint64(at + f.offset, true);
const u32 = (view: DataView, at: number, f: Field<4>) => view.getUint32(at + f.offset, true);
const u16 = (view: DataView, at: number, f: Field<2>) => view.getUint16(at + f.offset, true);
const u8 = (view: DataView, at: number, f: Field<1>) => view.getUint8(at + f.offset);
const setU64 = (view: DataView, at: number, f: Field<8>, v: bigint) =>
  view.setBigUint64(at + f.offset, BigInt.asUintN(64, v), true);
const setU32 = (view: DataView, at: number, f: Field<4>, v: number) =>
  view.setUint32(at + f.offset, v, true);
const setU16 = (view: DataView, at: number, f: Field<2>, v: number) =>
  view.setUint16(at + f.offset, v, true);
const setU8 = (view: DataView, at: number, f: Field<1>, v: number) =>
  view.setUint8(at + f.offset, v);

/** The `count` 16-byte registers of a `count * 16`-byte array field. */
function registers16(bytes: Uint8Array, f: Field<number>, count: number): Uint8Array[] {
  if (f.size !== count * 16) throw new RangeError(`a ${f.size}-byte field is not ${count} x 16`);
  return Array.from(
    { length: count },
    (_, i) => bytes.slice(f.offset + i * 16, f.offset + i * 16 + 16),
  );
}

/**
 * Decodes `struct kvm_regs`.
 *
 * @param bytes The 144 raw bytes.
 * @returns The registers.
 * @example
 * ```ts
 * import { decodeRegisters } from "denovisor/src/kvm/registers.ts";
 * console.log(decodeRegisters(new Uint8Array(144)).rip); // 0n
 * ```
 */
export function decodeRegisters(bytes: Uint8Array): Registers {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const regs = {} as Registers;
  for (const name of REGISTER_NAMES) regs[name] = u64(view, 0, REGS[name]);
  return regs;
}

/**
 * Encodes `struct kvm_regs`.
 *
 * @param regs The registers.
 * @returns The 144 raw bytes.
 * @example
 * ```ts
 * import { decodeRegisters, encodeRegisters } from "denovisor/src/kvm/registers.ts";
 * const regs = decodeRegisters(new Uint8Array(144));
 * regs.rip = 0x100000n;
 * console.log(encodeRegisters(regs).length); // 144
 * ```
 */
export function encodeRegisters(regs: Registers): Uint8Array {
  const bytes = new Uint8Array(REGISTERS_SIZE);
  const view = new DataView(bytes.buffer);
  for (const name of REGISTER_NAMES) setU64(view, 0, REGS[name], regs[name]);
  return bytes;
}

function readSegment(view: DataView, at: number): Segment {
  return {
    base: u64(view, at, SEG.base),
    limit: u32(view, at, SEG.limit),
    selector: u16(view, at, SEG.selector),
    type: u8(view, at, SEG.type),
    present: u8(view, at, SEG.present),
    dpl: u8(view, at, SEG.dpl),
    db: u8(view, at, SEG.db),
    s: u8(view, at, SEG.s),
    l: u8(view, at, SEG.l),
    g: u8(view, at, SEG.g),
    avl: u8(view, at, SEG.avl),
    unusable: u8(view, at, SEG.unusable),
  };
}

function writeSegment(view: DataView, at: number, s: Segment): void {
  setU64(view, at, SEG.base, s.base);
  setU32(view, at, SEG.limit, s.limit);
  setU16(view, at, SEG.selector, s.selector);
  setU8(view, at, SEG.type, s.type);
  setU8(view, at, SEG.present, s.present);
  setU8(view, at, SEG.dpl, s.dpl);
  setU8(view, at, SEG.db, s.db);
  setU8(view, at, SEG.s, s.s);
  setU8(view, at, SEG.l, s.l);
  setU8(view, at, SEG.g, s.g);
  setU8(view, at, SEG.avl, s.avl);
  setU8(view, at, SEG.unusable, s.unusable);
}

function readTable(view: DataView, f: Field<16>): DescriptorTable {
  return { base: u64(view, f.offset, DTABLE.base), limit: u16(view, f.offset, DTABLE.limit) };
}

function writeTable(view: DataView, f: Field<16>, t: DescriptorTable): void {
  setU64(view, f.offset, DTABLE.base, t.base);
  setU16(view, f.offset, DTABLE.limit, t.limit);
}

/** The four 64-bit words of `interrupt_bitmap`. */
const BITMAP_WORDS = [0, 1, 2, 3].map((i) => ({
  offset: SREGS.interrupt_bitmap.offset + i * 8,
  size: 8,
})) satisfies Field<8>[];

/**
 * Decodes `struct kvm_sregs`.
 *
 * @param bytes The 312 raw bytes.
 * @returns The special registers.
 * @example
 * ```ts
 * import { decodeSpecialRegisters } from "denovisor/src/kvm/registers.ts";
 * console.log(decodeSpecialRegisters(new Uint8Array(312)).cr0); // 0n
 * ```
 */
export function decodeSpecialRegisters(bytes: Uint8Array): SpecialRegisters {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const seg = Object.fromEntries(
    SEGMENT_NAMES.map((name) => [name, readSegment(view, SREGS[name].offset)]),
  ) as Record<(typeof SEGMENT_NAMES)[number], Segment>;
  return {
    ...seg,
    gdt: readTable(view, SREGS.gdt),
    idt: readTable(view, SREGS.idt),
    cr0: u64(view, 0, SREGS.cr0),
    cr2: u64(view, 0, SREGS.cr2),
    cr3: u64(view, 0, SREGS.cr3),
    cr4: u64(view, 0, SREGS.cr4),
    cr8: u64(view, 0, SREGS.cr8),
    efer: u64(view, 0, SREGS.efer),
    apicBase: u64(view, 0, SREGS.apic_base),
    interruptBitmap: BITMAP_WORDS.map((w) => u64(view, 0, w)) as SpecialRegisters[
      "interruptBitmap"
    ],
  };
}

/**
 * Encodes `struct kvm_sregs`.
 *
 * @param sregs The special registers.
 * @returns The 312 raw bytes.
 * @example
 * ```ts
 * import { decodeSpecialRegisters, encodeSpecialRegisters } from "denovisor/src/kvm/registers.ts";
 * const sregs = decodeSpecialRegisters(new Uint8Array(312));
 * console.log(encodeSpecialRegisters(sregs).length); // 312
 * ```
 */
export function encodeSpecialRegisters(sregs: SpecialRegisters): Uint8Array {
  const bytes = new Uint8Array(SPECIAL_REGISTERS_SIZE);
  const view = new DataView(bytes.buffer);
  for (const name of SEGMENT_NAMES) writeSegment(view, SREGS[name].offset, sregs[name]);
  writeTable(view, SREGS.gdt, sregs.gdt);
  writeTable(view, SREGS.idt, sregs.idt);
  setU64(view, 0, SREGS.cr0, sregs.cr0);
  setU64(view, 0, SREGS.cr2, sregs.cr2);
  setU64(view, 0, SREGS.cr3, sregs.cr3);
  setU64(view, 0, SREGS.cr4, sregs.cr4);
  setU64(view, 0, SREGS.cr8, sregs.cr8);
  setU64(view, 0, SREGS.efer, sregs.efer);
  setU64(view, 0, SREGS.apic_base, sregs.apicBase);
  BITMAP_WORDS.forEach((w, i) => setU64(view, 0, w, sregs.interruptBitmap[i]));
  return bytes;
}

/**
 * Decodes `struct kvm_fpu`.
 *
 * @param bytes The 416 raw bytes.
 * @returns The FPU/SSE state.
 * @example
 * ```ts
 * import { decodeFpuState } from "denovisor/src/kvm/registers.ts";
 * console.log(decodeFpuState(new Uint8Array(416)).xmm.length); // 16
 * ```
 */
export function decodeFpuState(bytes: Uint8Array): FpuState {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return {
    fpr: registers16(bytes, FPU.fpr, 8),
    fcw: u16(view, 0, FPU.fcw),
    fsw: u16(view, 0, FPU.fsw),
    ftwx: u8(view, 0, FPU.ftwx),
    lastOpcode: u16(view, 0, FPU.last_opcode),
    lastIp: u64(view, 0, FPU.last_ip),
    lastDp: u64(view, 0, FPU.last_dp),
    xmm: registers16(bytes, FPU.xmm, 16),
    mxcsr: u32(view, 0, FPU.mxcsr),
  };
}

/**
 * Encodes `struct kvm_fpu`.
 *
 * @param fpu The FPU/SSE state.
 * @returns The 416 raw bytes.
 * @example
 * ```ts
 * import { decodeFpuState, encodeFpuState } from "denovisor/src/kvm/registers.ts";
 * console.log(encodeFpuState(decodeFpuState(new Uint8Array(416))).length); // 416
 * ```
 */
export function encodeFpuState(fpu: FpuState): Uint8Array {
  const bytes = new Uint8Array(FPU_STATE_SIZE);
  const view = new DataView(bytes.buffer);
  fpu.fpr.slice(0, 8).forEach((r, i) => bytes.set(r.subarray(0, 16), FPU.fpr.offset + i * 16));
  setU16(view, 0, FPU.fcw, fpu.fcw);
  setU16(view, 0, FPU.fsw, fpu.fsw);
  setU8(view, 0, FPU.ftwx, fpu.ftwx);
  setU16(view, 0, FPU.last_opcode, fpu.lastOpcode);
  setU64(view, 0, FPU.last_ip, fpu.lastIp);
  setU64(view, 0, FPU.last_dp, fpu.lastDp);
  fpu.xmm.slice(0, 16).forEach((r, i) => bytes.set(r.subarray(0, 16), FPU.xmm.offset + i * 16));
  setU32(view, 0, FPU.mxcsr, fpu.mxcsr);
  return bytes;
}
