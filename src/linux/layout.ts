/**
 * What loading a Linux kernel produced: where the kernel, its initrd, the
 * command line and the zero page went in guest-physical memory, and the e820
 * map the kernel was given (the result of `dv_vm_load_linux`).
 *
 * @module
 */

import { CONSTANTS } from "../_contract.generated.ts";

/** A range of guest-physical memory. */
export interface MemoryRegion {
  /** First byte. */
  address: number;
  /** Length in bytes. */
  size: number;
}

/** One entry of the e820 memory map. */
export interface E820Entry {
  /** First byte. */
  addr: number;
  /** Length in bytes. */
  size: number;
  /** 1 = usable RAM, 2 = reserved. */
  type: number;
}

/** The kernel, initrd and command line {@link Vm.loadLinux} loads. */
export interface LinuxLoadOptions {
  /** A bzImage (boot protocol 2.12 or later with a 64-bit entry) or a `vmlinux` ELF. */
  kernel: Uint8Array;
  /** An initramfs or initrd image (placed high in RAM, below the kernel's
   * `initrd_addr_max`). */
  initrd?: Uint8Array;
  /** The kernel command line (ASCII, at most the kernel's `cmdline_size`). */
  cmdline?: string;
}

/** Where everything went, as the core reports it. */
export interface LinuxLayout {
  /** `bzImage` or `elf`. */
  format: "bzImage" | "elf";
  /** The boot protocol version of a bzImage (`"2.15"`), else null. */
  protocolVersion: string | null;
  /** The first instruction: `startup_64` (a bzImage's load address + 0x200) or
   * the ELF's physical entry point. */
  entry: number;
  /** The zero page (`struct boot_params`), passed in RSI. */
  zeroPage: number;
  /** The initial stack pointer. */
  stack: number;
  /** The boot GDT (`__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18). */
  gdt: number;
  /** The kernel's bytes as copied (a bzImage's protected-mode part). */
  kernel: MemoryRegion;
  /** What the kernel may use before it reads the memory map: its bytes and,
   * for a bzImage, `init_size` bytes from where it decompresses. */
  footprint: MemoryRegion;
  /** The command line, its NUL included. */
  cmdline: MemoryRegion;
  /** The initrd, or null when none was given. */
  initrd: MemoryRegion | null;
  /** The e820 map in the zero page. */
  e820: E820Entry[];
}

/** The `type` of a usable e820 entry. */
export const E820_RAM: number = CONSTANTS.E820_RAM;
/** The `type` of a reserved e820 entry. */
export const E820_RESERVED: number = CONSTANTS.E820_RESERVED;

/** The Linux boot protocol's code segment selector at the 64-bit entry. */
export const BOOT_CS: number = CONSTANTS.BOOT_CS;
/** The Linux boot protocol's data segment selector at the 64-bit entry. */
export const BOOT_DS: number = CONSTANTS.BOOT_DS;
