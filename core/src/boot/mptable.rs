//! The Intel MultiProcessor Specification 1.4 table a Linux guest reads to find
//! its CPUs, its I/O APIC and how ISA interrupts are wired, when there is no
//! ACPI. It goes in the last KiB of base memory (0x9fc00), one of the places
//! Linux scans for the floating pointer; the e820 map reserves that area.

use thiserror::Error;

use crate::memory::GuestRam;

/// Why an MP table cannot be built.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MpTableError {
    /// No CPUs, or more than the table describes
    #[error("an MP table describes 1 to {MAX_MPTABLE_CPUS} CPUs, not {0}")]
    CpuCount(u32),
    /// The table outgrew its 1 KiB
    #[error("the MP table for {cpus} CPUs ({bytes} bytes) does not fit in 1 KiB")]
    TooLarge {
        /// The CPUs asked for.
        cpus: u32,
        /// The table's size.
        bytes: usize,
    },
}

/// Where the floating pointer and the table go.
pub const MPTABLE_START: u64 = 0x9fc00;
/// The local APIC's and the I/O APIC's MMIO addresses (architectural defaults).
const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
const IO_APIC_DEFAULT_BASE: u32 = 0xfec0_0000;
/// The I/O APIC has 24 input pins; ISA IRQs 0-15 are wired 1:1 to pins 0-15.
const IO_APIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IO_APIC_VERSION: u8 = 0x11;
/// The most CPUs that fit: the table must stay inside the 1 KiB it is given.
pub const MAX_MPTABLE_CPUS: u32 = 32;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer followed by the configuration table for
/// `cpus` CPUs (APIC ids 0..cpus, CPU 0 the bootstrap processor).
pub fn build(cpus: u32) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_MPTABLE_CPUS {
        return Err(MpTableError::CpuCount(cpus));
    }
    let io_apic_id = cpus as u8; // the first id after the CPUs'
    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0u16;
    for cpu in 0..cpus {
        let flags = 1 | if cpu == 0 { 2 } else { 0 }; // enabled, bootstrap
        entries.extend_from_slice(&[0, cpu as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, io_apic_id, IO_APIC_VERSION, 1]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_BASE.to_le_bytes());
    count += 1;
    for pin in 0..IO_APIC_PINS {
        // Every pin is a plain vectored interrupt (mp_INT) from ISA IRQ `pin`,
        // as KVM's default GSI routing wires them (the PIT raises GSI 0, so
        // pin 0). The 8259's ExtINT reaches the CPUs through LINT0 below, not
        // through an I/O APIC pin: an ExtINT entry for pin 0 would leave IRQ 0
        // (the timer) without a route, and Linux's check_timer() dereferences
        // the missing route (setup_IO_APIC NULL pointer oops).
        entries.extend_from_slice(&[3, 0, 0, 0, 0, pin, io_apic_id, pin]);
        count += 1;
    }
    // LINT0 takes ExtINT, LINT1 NMI, on every local APIC (0xff).
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_START as u32 + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"DENOVISR");
    table.extend_from_slice(b"denovisor   ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.extend_from_slice(&[0, 0]); // extended checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = [0u8; 16];
    floating[0..4].copy_from_slice(b"_MP_");
    floating[4..8].copy_from_slice(&table_addr.to_le_bytes());
    floating[8] = 1; // length in 16-byte units
    floating[9] = 4; // spec revision 1.4
    floating[10] = checksum(&floating);
    let mut all = floating.to_vec();
    all.extend_from_slice(&table);
    if all.len() > 1024 {
        return Err(MpTableError::TooLarge {
            cpus,
            bytes: all.len(),
        });
    }
    Ok(all)
}

/// Writes the MP table for `cpus` CPUs into guest RAM at [`MPTABLE_START`].
pub fn write(ram: &GuestRam, cpus: u32) -> Result<(), super::BootError> {
    ram.write(MPTABLE_START, &build(cpus)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        for cpus in [1, 2, 4, MAX_MPTABLE_CPUS] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0, "floating pointer checksum");
            let table_addr = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as u64;
            let table = &t[(table_addr - MPTABLE_START) as usize..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(&table[..len]), 0, "table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]);
            let processors = table[44..].chunks(20).take(cpus as usize);
            assert!(processors
                .enumerate()
                .all(|(i, p)| p[0] == 0 && p[1] == i as u8));
            assert_eq!(count as u32, cpus + 1 + 1 + IO_APIC_PINS as u32 + 2);
        }
    }

    #[test]
    fn every_io_apic_pin_is_a_vectored_interrupt_from_its_isa_irq() {
        let t = build(1).unwrap();
        let table = &t[16..];
        // After one processor (20 bytes), the bus (8) and the I/O APIC (8).
        let entries = &table[44 + 20 + 8 + 8..];
        let io: Vec<&[u8]> = entries.chunks(8).filter(|e| e[0] == 3).collect();
        assert_eq!(io.len(), IO_APIC_PINS as usize);
        for (pin, e) in io.iter().enumerate() {
            assert_eq!(e[1], 0, "pin {pin} must be mp_INT, not ExtINT");
            assert_eq!((e[5], e[7]), (pin as u8, pin as u8));
        }
    }

    #[test]
    fn refuses_zero_and_too_many_cpus() {
        assert_eq!(build(0).unwrap_err(), MpTableError::CpuCount(0));
        assert_eq!(
            build(MAX_MPTABLE_CPUS + 1).unwrap_err(),
            MpTableError::CpuCount(MAX_MPTABLE_CPUS + 1)
        );
    }

    #[test]
    fn lands_in_base_memory() {
        let ram = GuestRam::new(1 << 20).unwrap();
        write(&ram, 2).unwrap();
        let mut sig = [0u8; 4];
        ram.read(MPTABLE_START, &mut sig).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
