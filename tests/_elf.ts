/**
 * Reads what tests need from an ELF image: header fields, PT_LOAD segments and
 * the symbol table (to find labels such as a fault guest's `fault_rip`).
 *
 * @module
 */

import assert from "node:assert/strict";

/** The parts of an ELF64 image tests look at. */
export interface ElfSummary {
  type: number;
  machine: number;
  entry: bigint;
  loads: Array<{ paddr: bigint; vaddr: bigint; memsz: bigint }>;
  symbols: Map<string, bigint>;
}

/** Reads the ELF header, the PT_LOAD program headers and the symbol table. */
export function readElf(bytes: Uint8Array): ElfSummary {
  assert.deepEqual([...bytes.subarray(0, 4)], [0x7f, 0x45, 0x4c, 0x46], "ELF magic");
  assert.equal(bytes[4], 2, "ELFCLASS64");
  assert.equal(bytes[5], 1, "little-endian");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const u64 = (at: number) => view.getBigUint64(at, true);
  const phoff = Number(u64(32));
  const shoff = Number(u64(40));
  const [phentsize, phnum] = [view.getUint16(54, true), view.getUint16(56, true)];
  const [shentsize, shnum] = [view.getUint16(58, true), view.getUint16(60, true)];
  const loads = [];
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + i * phentsize;
    if (view.getUint32(ph, true) !== 1) continue; // PT_LOAD
    loads.push({ vaddr: u64(ph + 16), paddr: u64(ph + 24), memsz: u64(ph + 40) });
  }
  const symbols = new Map<string, bigint>();
  for (let i = 0; i < shnum; i++) {
    const sh = shoff + i * shentsize;
    if (view.getUint32(sh + 4, true) !== 2) continue; // SHT_SYMTAB
    const [offset, size, entsize] = [u64(sh + 24), u64(sh + 32), u64(sh + 56)].map(Number);
    const strtab = shoff + view.getUint32(sh + 40, true) * shentsize;
    const strOffset = Number(u64(strtab + 24));
    for (let at = offset; at < offset + size; at += entsize) {
      const nameStart = strOffset + view.getUint32(at, true);
      const nameEnd = bytes.indexOf(0, nameStart);
      const name = new TextDecoder().decode(bytes.subarray(nameStart, nameEnd));
      if (name) symbols.set(name, u64(at + 8));
    }
  }
  return {
    type: view.getUint16(16, true),
    machine: view.getUint16(18, true),
    entry: u64(24),
    loads,
    symbols,
  };
}
