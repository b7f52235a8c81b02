//! The x86 CPU state for each entry mode: GDT, TSS, identity page tables, segment
//! registers, control registers and the initial general-purpose registers.
//!
//! Everything here is built as plain data first (unit-tested without KVM) and then
//! written to guest memory and to the vCPU by [`setup_entry`].

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use super::layout::*;
use super::EntryMode;
use super::{BootError, Result};
use crate::memory::GuestRam;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;

/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;
/// IOPL = 3: CPL3 code may execute in/out (the guest runtime's hypercall path).
const RFLAGS_IOPL3: u64 = 3 << 12;

/// Packs a GDT descriptor from its parts.
pub(crate) fn descriptor(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    (limit as u64 & 0xffff)
        | ((base as u64 & 0xff_ffff) << 16)
        | ((access as u64) << 40)
        | (((limit as u64 >> 16) & 0xf) << 48)
        | (((flags as u64) & 0xf) << 52)
        | (((base as u64 >> 24) & 0xff) << 56)
}

/// The GDT the VMM installs: see `layout` for the selector order.
pub fn gdt() -> [u64; 8] {
    let tss_limit = (TSS_SIZE + IO_BITMAP_SIZE - 1) as u32;
    // Type 0xb, a *busy* 64-bit TSS: VM entry on Intel VMX refuses a TR that is
    // not busy, and the guest never runs LTR on it (which would want type 9).
    let tss_low = descriptor(TSS_ADDR as u32, tss_limit, 0x8b, 0x0);
    [
        0,
        descriptor(0, 0xfffff, 0x9b, 0xa), // kernel code: present, DPL0, exec/read, L, G
        descriptor(0, 0xfffff, 0x93, 0xc), // kernel data: present, DPL0, read/write, D, G
        descriptor(0, 0xfffff, 0xfb, 0xc), // user code 32 (only for the SYSRET layout)
        descriptor(0, 0xfffff, 0xf3, 0xc), // user data: DPL3
        descriptor(0, 0xfffff, 0xfb, 0xa), // user code 64: DPL3, L
        tss_low,
        TSS_ADDR >> 32, // upper half of the 16-byte TSS descriptor
    ]
}

/// Converts a GDT entry to the segment form KVM takes.
pub(crate) fn segment(selector: u16, entry: u64) -> kvm_segment {
    let access = (entry >> 40) as u8;
    let flags = ((entry >> 52) & 0xf) as u8;
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = flags & 0x8 != 0;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: access & 0xf,
        present: (access >> 7) & 1,
        dpl: (access >> 5) & 3,
        db: (flags >> 2) & 1,
        s: (access >> 4) & 1,
        l: (flags >> 1) & 1,
        g: g as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The TSS and its I/O bitmap: rsp0 (the stack for exceptions from CPL3), the
/// bitmap right after the TSS, every port allowed (see `layout` for why).
fn tss() -> Vec<u8> {
    let mut t = vec![0u8; (TSS_SIZE + IO_BITMAP_SIZE) as usize];
    t[4..12].copy_from_slice(&BOOT_KERNEL_STACK_TOP.to_le_bytes());
    t[102..104].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    if let Some(last) = t.last_mut() {
        *last = 0xff;
    }
    t
}

/// Writes GDT, TSS and identity page tables (2 MiB pages, user-accessible, covering
/// the first 4 GiB) into guest memory.
pub fn write_boot_structures(ram: &GuestRam) -> Result<()> {
    if !ram.contains(0, RESERVED_END) {
        return Err(BootError::NoRoomForBootStructures);
    }
    let gdt_bytes: Vec<u8> = gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
    ram.write(GDT_ADDR, &gdt_bytes)?;
    ram.write(TSS_ADDR, &tss())?;
    let table_flags = PTE_PRESENT | PTE_WRITE | PTE_USER;
    ram.write_u64(PML4_ADDR, PDPT_ADDR | table_flags)?;
    let mut pdpt = [0u8; 4096];
    let mut pd = vec![0u8; 4096 * PD_COUNT as usize];
    for i in 0..PD_COUNT {
        let entry = (PD_ADDR + i * 4096) | table_flags;
        pdpt[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&entry.to_le_bytes());
    }
    for i in 0..(PD_COUNT * 512) {
        let entry = (i << 21) | table_flags | PTE_HUGE;
        pd[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&entry.to_le_bytes());
    }
    ram.write(PDPT_ADDR, &pdpt)?;
    ram.write(PD_ADDR, &pd)?;
    Ok(())
}

/// Points `sregs` at a GDT laid out at `gdt_base`: CS from selector `cs`, DS, ES,
/// FS, GS and SS from `ds`, TR from `tr`, each decoded from `table`'s entries.
pub(crate) fn load_gdt_segments(
    sregs: &mut kvm_sregs,
    table: &[u64],
    gdt_base: u64,
    cs: u16,
    ds: u16,
    tr: u16,
) {
    let entry = |selector: u16| segment(selector, table[(selector >> 3) as usize]);
    let data = entry(ds);
    sregs.cs = entry(cs);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = entry(tr);
    sregs.gdt.base = gdt_base;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
}

/// Special registers for a 64-bit entry, starting from the vCPU's reset state.
pub fn long_mode_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let (cs, ds) = if mode == EntryMode::User {
        (USER_CS, USER_DS)
    } else {
        (KERNEL_CS, KERNEL_DS)
    };
    load_gdt_segments(&mut sregs, &gdt(), GDT_ADDR, cs, ds, TSS_SEL);
    // No IDT yet: a guest that takes an exception before installing its own IDT
    // triple-faults, which the exit loop reports as a guest crash.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA | EFER_SCE;
    sregs
}

/// Special registers for a real-mode entry at `entry` (CS = entry's 64 KiB segment).
pub fn real_mode_sregs(mut sregs: kvm_sregs, entry: u64) -> Result<kvm_sregs> {
    if entry >= 0x10_0000 {
        return Err(BootError::RealModeEntry(entry));
    }
    let base = entry & 0xf_0000;
    sregs.cs.base = base;
    sregs.cs.selector = (base >> 4) as u16;
    for seg in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.base = 0;
        seg.selector = 0;
    }
    Ok(sregs)
}

/// General-purpose registers for an entry at `entry` with stack `stack`.
pub fn entry_regs(mode: EntryMode, entry: u64, stack: u64) -> kvm_regs {
    let rip = match mode {
        EntryMode::Real => entry & 0xffff,
        _ => entry,
    };
    let rflags = match mode {
        EntryMode::User => RFLAGS_RESERVED | RFLAGS_IOPL3,
        _ => RFLAGS_RESERVED,
    };
    kvm_regs {
        rip,
        rsp: stack,
        rflags,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode_to_what_kvm_expects() {
        let table = gdt();
        let kcs = segment(KERNEL_CS, table[1]);
        assert_eq!(
            (kcs.l, kcs.db, kcs.dpl, kcs.present, kcs.s),
            (1, 0, 0, 1, 1)
        );
        assert_eq!(kcs.type_, 0xb);
        assert_eq!(kcs.limit, 0xffff_ffff);
        let ucs = segment(USER_CS, table[5]);
        assert_eq!((ucs.l, ucs.dpl), (1, 3));
        let uds = segment(USER_DS, table[4]);
        assert_eq!((uds.dpl, uds.db, uds.type_), (3, 1, 3));
        let tr = segment(TSS_SEL, table[6]);
        assert_eq!(
            (tr.base, tr.limit, tr.type_, tr.s),
            (TSS_ADDR, (TSS_SIZE + IO_BITMAP_SIZE - 1) as u32, 0xb, 0)
        );
        const _: () = assert!(TSS_ADDR + TSS_SIZE + IO_BITMAP_SIZE <= BOOT_KERNEL_STACK_BOTTOM);
        const _: () = assert!(PD_ADDR + PD_COUNT * 4096 <= TSS_ADDR);
    }

    #[test]
    fn sysret_layout_holds() {
        // SYSRET to 64-bit: CS = STAR[63:48] + 16, SS = STAR[63:48] + 8.
        assert_eq!(USER_CS32 + 16, USER_CS & !3);
        assert_eq!(USER_CS32 + 8, USER_DS & !3);
        assert_eq!(KERNEL_CS + 8, KERNEL_DS);
    }

    #[test]
    fn page_tables_identity_map_with_user_bit() {
        let ram = GuestRam::new(4 << 20).unwrap();
        write_boot_structures(&ram).unwrap();
        let mut e = [0u8; 8];
        ram.read(PD_ADDR + 8, &mut e).unwrap();
        let pde = u64::from_le_bytes(e);
        assert_eq!(pde & !0xfff, 2 << 20);
        assert_ne!(pde & PTE_USER, 0);
        assert_ne!(pde & PTE_HUGE, 0);
        ram.read(PML4_ADDR, &mut e).unwrap();
        assert_eq!(u64::from_le_bytes(e) & !0xfff, PDPT_ADDR);
    }

    #[test]
    fn boot_structures_need_the_reserved_region() {
        let ram = GuestRam::new(0x8000).unwrap();
        assert!(write_boot_structures(&ram).is_err());
    }

    #[test]
    fn user_mode_runs_at_cpl3_with_iopl3() {
        let s = long_mode_sregs(kvm_sregs::default(), EntryMode::User);
        assert_eq!(s.cs.dpl, 3);
        assert_eq!(s.ss.dpl, 3);
        let r = entry_regs(EntryMode::User, 0x10_0000, 0x20_0000);
        assert_eq!(r.rflags & RFLAGS_IOPL3, RFLAGS_IOPL3);
    }

    #[test]
    fn real_mode_splits_entry_into_cs_and_ip() {
        let s = real_mode_sregs(kvm_sregs::default(), 0x1_7c00).unwrap();
        assert_eq!((s.cs.base, s.cs.selector), (0x1_0000, 0x1000));
        assert_eq!(entry_regs(EntryMode::Real, 0x1_7c00, 0).rip, 0x7c00);
        assert!(real_mode_sregs(kvm_sregs::default(), 0x10_0000).is_err());
    }
}
