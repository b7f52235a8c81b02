/**
 * x86-64 register sets as KVM defines them (`struct kvm_regs`, `kvm_sregs`,
 * `kvm_fpu` from `<linux/kvm.h>`), with their byte layouts. 64-bit values are
 * `bigint`s: registers use all 64 bits.
 *
 * @module
 */

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

/** Byte sizes of the KVM structs. */
export const REGISTERS_SIZE = 144;
/** Byte size of `struct kvm_sregs`. */
export const SPECIAL_REGISTERS_SIZE = 312;
/** Byte size of `struct kvm_fpu`. */
export const FPU_STATE_SIZE = 416;

const SEGMENT_NAMES = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"] as const;

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
  REGISTER_NAMES.forEach((name, i) => regs[name] = view.getBigUint64(i * 8, true));
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
  REGISTER_NAMES.forEach((name, i) =>
    view.setBigUint64(i * 8, BigInt.asUintN(64, regs[name]), true)
  );
  return bytes;
}

function readSegment(view: DataView, at: number): Segment {
  return {
    base: view.getBigUint64(at, true),
    limit: view.getUint32(at + 8, true),
    selector: view.getUint16(at + 12, true),
    type: view.getUint8(at + 14),
    present: view.getUint8(at + 15),
    dpl: view.getUint8(at + 16),
    db: view.getUint8(at + 17),
    s: view.getUint8(at + 18),
    l: view.getUint8(at + 19),
    g: view.getUint8(at + 20),
    avl: view.getUint8(at + 21),
    unusable: view.getUint8(at + 22),
  };
}

function writeSegment(view: DataView, at: number, s: Segment): void {
  view.setBigUint64(at, s.base, true);
  view.setUint32(at + 8, s.limit, true);
  view.setUint16(at + 12, s.selector, true);
  const bytes = [s.type, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable];
  bytes.forEach((b, i) => view.setUint8(at + 14 + i, b));
}

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
    SEGMENT_NAMES.map((name, i) => [name, readSegment(view, i * 24)]),
  ) as Record<(typeof SEGMENT_NAMES)[number], Segment>;
  const u64 = (at: number) => view.getBigUint64(at, true);
  return {
    ...seg,
    gdt: { base: u64(192), limit: view.getUint16(200, true) },
    idt: { base: u64(208), limit: view.getUint16(216, true) },
    cr0: u64(224),
    cr2: u64(232),
    cr3: u64(240),
    cr4: u64(248),
    cr8: u64(256),
    efer: u64(264),
    apicBase: u64(272),
    interruptBitmap: [u64(280), u64(288), u64(296), u64(304)],
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
  SEGMENT_NAMES.forEach((name, i) => writeSegment(view, i * 24, sregs[name]));
  const u64 = (at: number, v: bigint) => view.setBigUint64(at, BigInt.asUintN(64, v), true);
  u64(192, sregs.gdt.base);
  view.setUint16(200, sregs.gdt.limit, true);
  u64(208, sregs.idt.base);
  view.setUint16(216, sregs.idt.limit, true);
  const tail = [sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8, sregs.efer, sregs.apicBase];
  tail.forEach((v, i) => u64(224 + i * 8, v));
  sregs.interruptBitmap.forEach((v, i) => u64(280 + i * 8, v));
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
  const slice = (at: number) => bytes.slice(at, at + 16);
  return {
    fpr: Array.from({ length: 8 }, (_, i) => slice(i * 16)),
    fcw: view.getUint16(128, true),
    fsw: view.getUint16(130, true),
    ftwx: view.getUint8(132),
    lastOpcode: view.getUint16(134, true),
    lastIp: view.getBigUint64(136, true),
    lastDp: view.getBigUint64(144, true),
    xmm: Array.from({ length: 16 }, (_, i) => slice(152 + i * 16)),
    mxcsr: view.getUint32(408, true),
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
  fpu.fpr.slice(0, 8).forEach((r, i) => bytes.set(r.subarray(0, 16), i * 16));
  view.setUint16(128, fpu.fcw, true);
  view.setUint16(130, fpu.fsw, true);
  view.setUint8(132, fpu.ftwx);
  view.setUint16(134, fpu.lastOpcode, true);
  view.setBigUint64(136, fpu.lastIp, true);
  view.setBigUint64(144, fpu.lastDp, true);
  fpu.xmm.slice(0, 16).forEach((r, i) => bytes.set(r.subarray(0, 16), 152 + i * 16));
  view.setUint32(408, fpu.mxcsr, true);
  return bytes;
}
