//! The ACPI tables a Linux guest reads to find its CPUs, its I/O APIC, its
//! serial port and how to power off and reset, as Firecracker and Cloud
//! Hypervisor give them (no firmware: the loader writes them).
//!
//! The platform is "hardware-reduced" ACPI (FADT flag `HW_REDUCED_ACPI`): no
//! PM1 event/control blocks, no PM timer, no SCI, no GPEs. Sleeping and reset go
//! through the FADT's sleep control, sleep status and reset registers, all in the
//! ACPI PM device's port range ([`crate::devices::acpi_pm`]): S5 (soft-off) is a
//! write of `SLP_TYP 5 << 2 | SLP_EN` to the sleep control register, reset is a
//! write of [`RESET_VALUE`] to the reset register.
//!
//! ```text
//! 0xe0000  RSDP (ACPI 2.0+, revision 2): only the XSDT pointer is used
//! 0xe0040  XSDT: FADT, MADT
//!          FADT (revision 6): X_DSDT, flags, the sleep and reset registers
//!          DSDT: Name(_S5, Package(){5, 0}), COM1 (PNP0501, 0x3f8, IRQ 4) and
//!                the RTC (PNP0B00, 0x70-0x71, no IRQ)
//!          MADT: a local APIC per vCPU, the I/O APIC, LINT1 = NMI
//! ```
//!
//! All of it lies in the legacy BIOS area (0xe0000-0xfffff), which the e820 map
//! reserves and where Linux scans for the RSDP on 16-byte boundaries; the zero
//! page's `acpi_rsdp_addr` points at it too, so the kernel does not need to scan.
//!
//! Why COM1 is in the DSDT: on a hardware-reduced platform Linux drops the
//! legacy 8259 PIC (`acpi_generic_reduced_hw_init`), and with it the identity
//! mapping of ISA IRQs to I/O APIC pins. The serial port's IRQ 4 then reaches the
//! 8250 driver only as an ACPI resource of a PNP0501 device.
//!
//! Why the RTC is in the DSDT: Linux's `rtc_cmos` binds either to a PNP0B00
//! device or to a fallback platform device that `add_rtc_cmos`
//! (arch/x86/kernel/rtc.c) registers with the fixed IRQ 8. On this platform IRQ 8
//! has no legacy mapping either (as for COM1 above) and the RTC raises no
//! interrupts ([`crate::devices::rtc`]); a PNP0B00 device whose `_CRS` lists only
//! the ports makes `cmos_pnp_probe` use no IRQ at all (no legacy PIC, so it does
//! not assume IRQ 8), and the driver registers `rtc0` without alarms. The FADT
//! leaves "CMOS RTC Not Present" clear (with it set, Linux's FADT parsing
//! turns `x86_platform.legacy.rtc` off) and names the century register
//! ([`crate::devices::rtc::REG_CENTURY`]) in `CENTURY`, which Linux's
//! `mc146818_get_time` reads.
//!
//! Why there is code at the reset vector (0xffff0): with `HW_REDUCED_ACPI` set
//! and no EFI, Linux reboots by EFI (absent), then by jumping to the BIOS at
//! F000:FFF0 in real mode (`reboot_init`: `efi_reboot_required()`), and never
//! gets to the ACPI reset register. A PC's firmware sits there; here nine bytes
//! write [`RESET_VALUE`] to the reset register ([`RESET_VECTOR_STUB`]), so
//! `reboot` resets the VM without `reboot=k` on the command line.
//!
//! Why the MADT has no interrupt source override: KVM's default GSI routing
//! wires ISA IRQ n to I/O APIC pin n (the in-kernel PIT raises GSI 0, on pin 0),
//! all edge-triggered and active high, which is exactly what the ACPI defaults
//! (identity, conforming to the ISA bus) already say. An override is needed only
//! where the wiring differs from that, as for QEMU's timer on pin 2.

use thiserror::Error;

use crate::devices::rtc::REG_CENTURY;
use crate::memory::{GuestRam, MemoryError};

/// Where the RSDP goes: the start of the BIOS read-only area Linux scans.
pub const RSDP_ADDR: u64 = 0xe_0000;
/// The end of the area the tables may use (1 MiB, the end of the legacy area).
pub const ACPI_AREA_END: u64 = 0x10_0000;
/// The most CPUs the tables describe: APIC ids are 8 bits, 0xff is broadcast,
/// and the I/O APIC takes the id after the last CPU's.
pub const MAX_ACPI_CPUS: u32 = 254;

/// The I/O port of the ACPI PM device (sleep control, then sleep status).
pub const ACPI_PM_PORT: u16 = 0x600;
/// The sleep control register (and the reset register): `ACPI_PM_PORT`.
pub const SLEEP_CONTROL_PORT: u16 = ACPI_PM_PORT;
/// The sleep status register.
pub const SLEEP_STATUS_PORT: u16 = ACPI_PM_PORT + 1;
/// The reset register shares the sleep control register's port; this value resets.
pub const RESET_VALUE: u8 = 1;
/// The sleep type `_S5` declares, written into SLP_TYP (bits 2-4) to power off.
pub const S5_SLEEP_TYPE: u8 = 5;
/// SLP_EN (bit 5) of the sleep control register.
pub const SLEEP_ENABLE: u8 = 1 << 5;

/// The x86 reset vector, F000:FFF0 in real mode.
pub const RESET_VECTOR: u64 = 0xf_fff0;
/// 16-bit code at the reset vector: `mov al, RESET_VALUE; mov dx, 0x600;
/// out dx, al; hlt; jmp $-3` (the reset register ends the run at the `out`).
pub const RESET_VECTOR_STUB: [u8; 9] = [
    0xb0,
    RESET_VALUE,
    0xba,
    SLEEP_CONTROL_PORT as u8,
    (SLEEP_CONTROL_PORT >> 8) as u8,
    0xee,
    0xf4,
    0xeb,
    0xfd,
];

const LOCAL_APIC_BASE: u32 = 0xfee0_0000;
const IO_APIC_BASE: u32 = 0xfec0_0000;
const OEM_ID: &[u8; 6] = b"DENOVI";
const OEM_TABLE_ID: &[u8; 8] = b"DENOVISR";
const CREATOR_ID: &[u8; 4] = b"DNVS";
const HEADER_LEN: usize = 36;
const RSDP_LEN: usize = 36;
const FADT_LEN: usize = 276;

/// FADT flags (ACPI 6.5, table 5.10).
const FADT_PWR_BUTTON: u32 = 1 << 4;
const FADT_SLP_BUTTON: u32 = 1 << 5;
const FADT_RESET_REG_SUP: u32 = 1 << 10;
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// IA-PC boot architecture flags: no VGA (not emulated). "CMOS RTC Not
/// Present" (bit 5) stays clear: the RTC is at 0x70.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// MADT flags: the platform also has dual 8259s (KVM's in-kernel PIC).
const MADT_PCAT_COMPAT: u32 = 1;

/// What can go wrong building or writing the tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// The tables describe 1 to 254 CPUs
    #[error("the ACPI tables describe 1 to {MAX_ACPI_CPUS} CPUs, not {0}")]
    CpuCount(u32),
    /// The tables do not fit in the BIOS area
    #[error("the ACPI tables ({0} bytes) do not fit between {RSDP_ADDR:#x} and {RESET_VECTOR:#x}")]
    TooLarge(u64),
    /// An AML package is too long for a PkgLength
    #[error("an AML package of {0} bytes is too long to encode")]
    AmlTooLong(usize),
    /// Guest RAM does not reach the tables' area
    #[error("cannot write the ACPI tables: {0}")]
    Write(#[from] MemoryError),
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// A system description table: the 36-byte header, then `body`, checksummed.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(HEADER_LEN + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((HEADER_LEN + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure for a byte-wide system I/O register.
fn gas_io_byte(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = 8; // register bit width
    g[2] = 0; // bit offset
    g[3] = 1; // access size: byte
    g[4..12].copy_from_slice(&(port as u64).to_le_bytes());
    g
}

/// The FADT (revision 6, 276 bytes): hardware-reduced, the DSDT by its 64-bit
/// pointer, the sleep control/status and reset registers.
fn fadt(dsdt: u64) -> Vec<u8> {
    let mut b = vec![0u8; FADT_LEN - HEADER_LEN];
    let mut put = |at: usize, v: &[u8]| {
        let at = at - HEADER_LEN;
        b[at..at + v.len()].copy_from_slice(v);
    };
    put(108, &[REG_CENTURY]); // CENTURY: the RTC's century register
    put(109, &IAPC_VGA_NOT_PRESENT.to_le_bytes());
    put(
        112,
        &(FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP | FADT_PWR_BUTTON | FADT_SLP_BUTTON)
            .to_le_bytes(),
    );
    put(116, &gas_io_byte(SLEEP_CONTROL_PORT)); // RESET_REG
    put(128, &[RESET_VALUE]);
    put(131, &[0]); // FADT minor version
    put(140, &dsdt.to_le_bytes()); // X_DSDT (the 32-bit DSDT stays 0)
    put(244, &gas_io_byte(SLEEP_CONTROL_PORT));
    put(256, &gas_io_byte(SLEEP_STATUS_PORT));
    put(268, b"denovisr"); // hypervisor vendor identity
    sdt(b"FACP", 6, &b)
}

/// AML encoding, as little as the DSDT needs (ACPI 6.5, section 20).
mod aml {
    use super::AcpiError;

    pub const ZERO_OP: u8 = 0x00;
    pub const NAME_OP: u8 = 0x08;
    pub const BYTE_PREFIX: u8 = 0x0a;
    pub const DWORD_PREFIX: u8 = 0x0c;
    pub const BUFFER_OP: u8 = 0x11;
    pub const PACKAGE_OP: u8 = 0x12;
    pub const EXT_OP_PREFIX: u8 = 0x5b;
    pub const DEVICE_OP: u8 = 0x82;
    pub const ROOT_CHAR: u8 = b'\\';
    pub const DUAL_NAME_PREFIX: u8 = 0x2e;

    /// A PkgLength: the length of what follows its own first byte, counting its
    /// own bytes. One byte holds up to 63; longer lengths take 2-4 bytes, the
    /// first giving the count (bits 6-7) and the low nibble.
    pub fn pkg_length(content: usize) -> Result<Vec<u8>, AcpiError> {
        if content < 0x3f {
            return Ok(vec![(content + 1) as u8]);
        }
        for extra in 1..=3usize {
            let total = content + 1 + extra;
            if total < 1 << (4 + 8 * extra) {
                let mut out = vec![((extra as u8) << 6) | (total & 0xf) as u8];
                for i in 0..extra {
                    out.push((total >> (4 + 8 * i)) as u8);
                }
                return Ok(out);
            }
        }
        Err(AcpiError::AmlTooLong(content))
    }

    /// `op PkgLength body`: a package, buffer or device.
    pub fn with_pkg_length(op: &[u8], body: &[u8]) -> Result<Vec<u8>, AcpiError> {
        let mut out = op.to_vec();
        out.extend_from_slice(&pkg_length(body.len())?);
        out.extend_from_slice(body);
        Ok(out)
    }

    /// `Name(seg, value)`, `value` already encoded.
    pub fn name(seg: &[u8; 4], value: &[u8]) -> Vec<u8> {
        let mut out = vec![NAME_OP];
        out.extend_from_slice(seg);
        out.extend_from_slice(value);
        out
    }

    /// An integer as the shortest of ZeroOp, ByteConst and DWordConst.
    pub fn integer(v: u32) -> Vec<u8> {
        match v {
            0 => vec![ZERO_OP],
            1..=0xff => vec![BYTE_PREFIX, v as u8],
            _ => {
                let mut out = vec![DWORD_PREFIX];
                out.extend_from_slice(&v.to_le_bytes());
                out
            }
        }
    }

    /// An EISA id ("PNP0501") as the 32-bit value `EisaId()` compiles to: three
    /// 5-bit letters and four hex digits, stored big-endian.
    pub fn eisa_id(id: &[u8; 7]) -> u32 {
        let letter = |c: u8| ((c - b'@') & 0x1f) as u32;
        let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0);
        let vendor = (letter(id[0]) << 10) | (letter(id[1]) << 5) | letter(id[2]);
        let product = id[3..].iter().fold(0u32, |acc, &c| (acc << 4) | hex(c));
        let big_endian = (vendor << 16) | product;
        big_endian.swap_bytes()
    }
}

/// The DSDT's AML: `_S5` (so Linux registers its ACPI power-off), COM1 and
/// the RTC.
fn dsdt_aml() -> Result<Vec<u8>, AcpiError> {
    use aml::*;
    // Name(_S5_, Package(){5, 0}): SLP_TYPa 5, SLP_TYPb 0.
    let mut s5_body = vec![2u8]; // NumElements
    s5_body.extend_from_slice(&integer(S5_SLEEP_TYPE as u32));
    s5_body.extend_from_slice(&integer(0));
    let mut out = name(b"_S5_", &with_pkg_length(&[PACKAGE_OP], &s5_body)?);

    // Device(\_SB_.COM1) { _HID PNP0501, _UID 0, _CRS: IO 0x3f8/8, IRQ 4 }
    let crs_template: &[u8] = &[
        0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08, // IO(Decode16, 0x3f8, 0x3f8, 1, 8)
        0x22, 0x10, 0x00, // IRQNoFlags(){4}
        0x79, 0x00, // end tag
    ];
    let mut buffer = integer(crs_template.len() as u32);
    buffer.extend_from_slice(crs_template);
    let mut device = vec![ROOT_CHAR, DUAL_NAME_PREFIX];
    device.extend_from_slice(b"_SB_COM1");
    device.extend_from_slice(&name(b"_HID", &integer(eisa_id(b"PNP0501"))));
    device.extend_from_slice(&name(b"_UID", &integer(0)));
    device.extend_from_slice(&name(b"_CRS", &with_pkg_length(&[BUFFER_OP], &buffer)?));
    out.extend_from_slice(&with_pkg_length(&[EXT_OP_PREFIX, DEVICE_OP], &device)?);

    // Device(\_SB_.RTC_) { _HID PNP0B00, _CRS: IO 0x70/2 } and no IRQ: see the
    // module doc.
    let rtc_crs: &[u8] = &[
        0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02, // IO(Decode16, 0x70, 0x70, 1, 2)
        0x79, 0x00, // end tag
    ];
    let mut buffer = integer(rtc_crs.len() as u32);
    buffer.extend_from_slice(rtc_crs);
    let mut device = vec![ROOT_CHAR, DUAL_NAME_PREFIX];
    device.extend_from_slice(b"_SB_RTC_");
    device.extend_from_slice(&name(b"_HID", &integer(eisa_id(b"PNP0B00"))));
    device.extend_from_slice(&name(b"_CRS", &with_pkg_length(&[BUFFER_OP], &buffer)?));
    out.extend_from_slice(&with_pkg_length(&[EXT_OP_PREFIX, DEVICE_OP], &device)?);

    out.extend_from_slice(&pci_root_aml()?);
    Ok(out)
}

/// `Device(\_SB_.PCI0)`: PCI bus 0's host bridge (PNP0A03), so Linux scans the
/// bus through configuration mechanism #1. Its `_CRS` hands the bus the
/// configuration ports, the rest of the port space and the MMIO window BARs
/// live in. No `_PRT`: the devices here interrupt through MSI-X only.
fn pci_root_aml() -> Result<Vec<u8>, AcpiError> {
    use crate::pci::root::PCI_MMIO_WINDOW;
    use aml::*;
    let word = |v: u16| v.to_le_bytes();
    let dword = |v: u32| v.to_le_bytes();
    let mut crs = Vec::new();
    // WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, 0, 0, 0, 1)
    crs.extend_from_slice(&[0x88, 0x0d, 0x00, 0x02, 0x0c, 0x00]);
    for v in [0u16, 0, 0, 0, 1] {
        crs.extend_from_slice(&word(v));
    }
    // IO(Decode16, 0xcf8, 0xcf8, 1, 8): the configuration ports themselves.
    crs.extend_from_slice(&[0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]);
    // WordIO windows 0x0000-0x0cf7 and 0x0d00-0xffff (EntireRange).
    for (min, max) in [(0x0000u16, 0x0cf7u16), (0x0d00, 0xffff)] {
        crs.extend_from_slice(&[0x88, 0x0d, 0x00, 0x01, 0x0c, 0x03]);
        for v in [0, min, max, 0, max - min + 1] {
            crs.extend_from_slice(&word(v));
        }
    }
    // DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
    // ReadWrite, 0, window start, window end, 0, length)
    let (start, end) = (PCI_MMIO_WINDOW.0 as u32, (PCI_MMIO_WINDOW.1 - 1) as u32);
    crs.extend_from_slice(&[0x87, 0x17, 0x00, 0x00, 0x0c, 0x01]);
    for v in [0, start, end, 0, end - start + 1] {
        crs.extend_from_slice(&dword(v));
    }
    crs.extend_from_slice(&[0x79, 0x00]);
    let mut buffer = integer(crs.len() as u32);
    buffer.extend_from_slice(&crs);
    let mut device = vec![ROOT_CHAR, DUAL_NAME_PREFIX];
    device.extend_from_slice(b"_SB_PCI0");
    device.extend_from_slice(&name(b"_HID", &integer(eisa_id(b"PNP0A03"))));
    device.extend_from_slice(&name(b"_SEG", &integer(0)));
    device.extend_from_slice(&name(b"_BBN", &integer(0)));
    device.extend_from_slice(&name(b"_UID", &integer(0)));
    device.extend_from_slice(&name(b"_CRS", &with_pkg_length(&[BUFFER_OP], &buffer)?));
    with_pkg_length(&[EXT_OP_PREFIX, DEVICE_OP], &device)
}

/// The MADT: one enabled local APIC per CPU (APIC id = processor UID = index),
/// the I/O APIC (id after the CPUs', GSI base 0) and NMI on every LINT1.
fn madt(cpus: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&LOCAL_APIC_BASE.to_le_bytes());
    b.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for cpu in 0..cpus {
        b.extend_from_slice(&[0, 8, cpu as u8, cpu as u8]);
        b.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    b.extend_from_slice(&[1, 12, cpus as u8, 0]);
    b.extend_from_slice(&IO_APIC_BASE.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
                                              // Local APIC NMI: every processor (UID 0xff), flags conforming, LINT1.
    b.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    sdt(b"APIC", 5, &b)
}

/// The tables, laid out from [`RSDP_ADDR`]: `(address, bytes)` in address order.
pub fn build(cpus: u32) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    if cpus == 0 || cpus > MAX_ACPI_CPUS {
        return Err(AcpiError::CpuCount(cpus));
    }
    let align = |a: u64| a.next_multiple_of(16);
    let xsdt_addr = align(RSDP_ADDR + RSDP_LEN as u64);
    // The XSDT lists two tables.
    let fadt_addr = align(xsdt_addr + HEADER_LEN as u64 + 16);
    let dsdt_addr = align(fadt_addr + FADT_LEN as u64);
    let dsdt = sdt(b"DSDT", 2, &dsdt_aml()?);
    let madt_addr = align(dsdt_addr + dsdt.len() as u64);
    let madt = madt(cpus);
    let end = madt_addr + madt.len() as u64;
    if end > RESET_VECTOR {
        return Err(AcpiError::TooLarge(end - RSDP_ADDR));
    }
    let mut xsdt_body = Vec::new();
    xsdt_body.extend_from_slice(&fadt_addr.to_le_bytes());
    xsdt_body.extend_from_slice(&madt_addr.to_le_bytes());
    let xsdt = sdt(b"XSDT", 1, &xsdt_body);

    let mut rsdp = Vec::with_capacity(RSDP_LEN);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes, below
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0+
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    rsdp.extend_from_slice(&xsdt_addr.to_le_bytes());
    rsdp.extend_from_slice(&[0, 0, 0, 0]); // extended checksum, reserved
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    Ok(vec![
        (RSDP_ADDR, rsdp),
        (xsdt_addr, xsdt),
        (fadt_addr, fadt(dsdt_addr)),
        (dsdt_addr, dsdt),
        (madt_addr, madt),
    ])
}

/// The tables for `cpus` CPUs and the reset vector's code: everything
/// [`write`] puts in guest RAM, as `(address, bytes)`.
pub fn build_with_reset_vector(cpus: u32) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let mut all = build(cpus)?;
    all.push((RESET_VECTOR, RESET_VECTOR_STUB.to_vec()));
    Ok(all)
}

/// Writes the tables for `cpus` CPUs and the reset vector's code into guest
/// RAM; returns the RSDP's address.
pub fn write(ram: &GuestRam, cpus: u32) -> Result<u64, AcpiError> {
    for (addr, bytes) in build_with_reset_vector(cpus)? {
        ram.write(addr, &bytes)?;
    }
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The tables by address, as a guest would follow the pointers.
    fn table_at(tables: &[(u64, Vec<u8>)], addr: u64) -> &[u8] {
        &tables
            .iter()
            .find(|(a, _)| *a == addr)
            .unwrap_or_else(|| panic!("no table at {addr:#x}"))
            .1
    }

    #[test]
    fn rsdp_xsdt_and_every_table_check_out() {
        for cpus in [1, 2, 4, MAX_ACPI_CPUS] {
            let t = build(cpus).unwrap();
            let rsdp = table_at(&t, RSDP_ADDR);
            assert_eq!(&rsdp[..8], b"RSD PTR ");
            assert_eq!(rsdp.len(), 36);
            assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
            assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
            assert_eq!(rsdp[15], 2, "revision");
            assert_eq!(u32_at(rsdp, 20), 36, "length");
            assert_eq!(RSDP_ADDR % 16, 0, "Linux scans 16-byte boundaries");
            let xsdt = table_at(&t, u64_at(rsdp, 24));
            assert_eq!(&xsdt[..4], b"XSDT");
            let mut seen = vec![];
            for i in 0..(xsdt.len() - 36) / 8 {
                let table = table_at(&t, u64_at(xsdt, 36 + 8 * i));
                seen.push(std::str::from_utf8(&table[..4]).unwrap().to_string());
                if &table[..4] == b"FACP" {
                    let dsdt = table_at(&t, u64_at(table, 140));
                    assert_eq!(&dsdt[..4], b"DSDT");
                    seen.push("DSDT".into());
                }
            }
            assert_eq!(seen, ["FACP", "DSDT", "APIC"]);
            for (addr, table) in &t[1..] {
                assert_eq!(
                    u32_at(table, 4) as usize,
                    table.len(),
                    "length of {addr:#x}"
                );
                assert_eq!(sum(table), 0, "checksum of {addr:#x}");
                assert!(*addr >= RSDP_ADDR && addr + table.len() as u64 <= RESET_VECTOR);
            }
            // No two tables overlap.
            for w in t.windows(2) {
                assert!(w[0].0 + w[0].1.len() as u64 <= w[1].0);
            }
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let t = build(1).unwrap();
        let f = &t[2].1;
        assert_eq!(&f[..4], b"FACP");
        assert_eq!((f.len(), f[8]), (276, 6), "length, revision");
        let flags = u32_at(f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(u32_at(f, 40), 0, "32-bit DSDT unused");
        // RESET_REG, SLEEP_CONTROL_REG, SLEEP_STATUS_REG: system I/O, 8 bits.
        for (at, port) in [(116, 0x600u64), (244, 0x600), (256, 0x601)] {
            assert_eq!(&f[at..at + 4], &[1, 8, 0, 1], "GAS at {at}");
            assert_eq!(u64_at(f, at + 4), port);
        }
        assert_eq!(f[128], RESET_VALUE);
    }

    #[test]
    fn fadt_says_there_is_a_cmos_rtc_with_a_century_register() {
        let t = build(1).unwrap();
        let f = &t[2].1;
        let iapc = u16::from_le_bytes([f[109], f[110]]);
        assert_eq!(iapc & (1 << 5), 0, "CMOS RTC Not Present must be clear");
        assert_ne!(iapc & (1 << 2), 0, "VGA Not Present");
        assert_eq!(f[108], 0x32, "CENTURY: the RTC's century register");
    }

    #[test]
    fn dsdt_declares_the_rtc_as_pnp0b00_with_ports_0x70_0x71_and_no_irq() {
        let aml = dsdt_aml().unwrap();
        let at = aml
            .windows(8)
            .position(|w| w == b"_SB_RTC_")
            .expect("a \\_SB_.RTC_ device");
        let dev = &aml[at..];
        // _HID: DWordConst 0x000bd041, what iasl emits for EisaId("PNP0B00").
        let hid = dev.windows(4).position(|w| w == b"_HID").unwrap();
        assert_eq!(&dev[hid + 4..hid + 9], &[0x0c, 0x41, 0xd0, 0x0b, 0x00]);
        let crs = dev.windows(4).position(|w| w == b"_CRS").unwrap();
        // BufferOp PkgLength BufferSize(10): IO(Decode16, 0x70, 0x70, 1, 2), end tag.
        assert_eq!(
            &dev[crs + 4..crs + 18],
            &[0x11, 0x0d, 0x0a, 0x0a, 0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02, 0x79, 0x00]
        );
        let pci = dev.windows(8).position(|w| w == b"_SB_PCI0").unwrap();
        // The PCI root's DeviceOp (ExtOpPrefix DeviceOp PkgLength(2) \ DualNamePrefix).
        assert_eq!(crs + 18, pci - 6, "the buffer ends the device");
    }

    #[test]
    fn dsdt_declares_the_pci_root_with_a_well_formed_crs() {
        let aml = pci_root_aml().unwrap();
        let find = |needle: &[u8]| aml.windows(needle.len()).position(|w| w == needle);
        assert!(find(b"_SB_PCI0").is_some());
        let hid = aml::eisa_id(b"PNP0A03").to_le_bytes();
        assert!(find(&hid).is_some(), "_HID PNP0A03");
        // Walk the _CRS descriptors: large ones (bit 7) carry a 16-bit length.
        let crs = find(b"_CRS").unwrap();
        let mut at = crs + 4;
        assert_eq!(aml[at], 0x11, "BufferOp");
        at += 1;
        at += 1 + (aml[at] >> 6) as usize; // PkgLength
        assert_eq!(aml[at], 0x0a, "BytePrefix of the buffer size");
        at += 2;
        let mut kinds = vec![];
        loop {
            let tag = aml[at];
            if tag == 0x79 {
                break;
            }
            if tag & 0x80 != 0 {
                let len = u16::from_le_bytes([aml[at + 1], aml[at + 2]]) as usize;
                kinds.push(tag);
                at += 3 + len;
            } else {
                kinds.push(tag >> 3);
                at += 1 + (tag & 7) as usize;
            }
        }
        // Bus numbers, the config ports, two I/O windows, the MMIO window.
        assert_eq!(kinds, vec![0x88, 0x47 >> 3, 0x88, 0x88, 0x87]);
        assert_eq!(at + 2, aml.len(), "the end tag closes the device");
    }

    #[test]
    fn dsdt_declares_s5_and_com1_in_aml() {
        let aml = dsdt_aml().unwrap();
        // NameOp "_S5_" PackageOp PkgLength(5) NumElements(2) BytePrefix 5, ZeroOp
        assert_eq!(
            &aml[..11],
            &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x0a, 0x05, 0x00]
        );
        // COM1 is the first device; the RTC follows it.
        let dev = &aml[11..];
        assert_eq!(&dev[..2], &[0x5b, 0x82]);
        let dev = &dev[..2 + dev[2] as usize];
        assert_eq!(
            &aml[11 + dev.len()..][..2],
            &[0x5b, 0x82],
            "the next device"
        );
        assert_eq!(
            &dev[3..13],
            b"\\._SB_COM1".map(|c| if c == b'.' { 0x2e } else { c })
        );
        // _HID: DWordConst 0x0501d041, what iasl emits for EisaId("PNP0501").
        assert_eq!(
            &dev[13..23],
            &[0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01]
        );
        let crs = dev.windows(4).position(|w| w == b"_CRS").unwrap();
        // BufferOp PkgLength(16) BufferSize(13), then the resource template.
        assert_eq!(&dev[crs + 4..crs + 8], &[0x11, 0x10, 0x0a, 0x0d]);
        assert_eq!(crs + 8 + 13, dev.len(), "the buffer ends the device");
    }

    #[test]
    fn eisa_ids_and_pkg_lengths_encode_as_the_spec_says() {
        assert_eq!(aml::eisa_id(b"PNP0A03"), 0x030a_d041);
        assert_eq!(aml::eisa_id(b"PNP0501"), 0x0105_d041);
        assert_eq!(aml::pkg_length(0).unwrap(), [1]);
        assert_eq!(aml::pkg_length(62).unwrap(), [63]);
        // 63 content bytes + 2 length bytes = 65 = 0x41.
        assert_eq!(aml::pkg_length(63).unwrap(), [0x41, 0x04]);
        assert_eq!(aml::pkg_length(0x1000).unwrap(), [0x83, 0x00, 0x01]);
        assert!(aml::pkg_length(1 << 28).is_err());
    }

    #[test]
    fn madt_lists_every_cpu_the_io_apic_and_lint1_nmi() {
        for cpus in [1u32, 2, 4, 32] {
            let t = build(cpus).unwrap();
            let m = &t[4].1;
            assert_eq!(&m[..4], b"APIC");
            assert_eq!(u32_at(m, 36), 0xfee0_0000);
            let mut at = 44;
            let (mut lapics, mut ioapics, mut nmis, mut overrides) = (0u32, 0, 0, 0);
            while at < m.len() {
                let (kind, len) = (m[at], m[at + 1] as usize);
                let e = &m[at..at + len];
                match kind {
                    0 => {
                        assert_eq!((e[2], e[3]), (lapics as u8, lapics as u8), "uid, APIC id");
                        assert_eq!(u32_at(e, 4), 1, "enabled");
                        lapics += 1;
                    }
                    1 => {
                        assert_eq!(e[2] as u32, cpus, "I/O APIC id after the CPUs'");
                        assert_eq!((u32_at(e, 4), u32_at(e, 8)), (0xfec0_0000, 0));
                        ioapics += 1;
                    }
                    2 => overrides += 1,
                    4 => {
                        assert_eq!((e[2], e[5]), (0xff, 1), "all CPUs, LINT1");
                        nmis += 1;
                    }
                    other => panic!("unexpected MADT entry type {other}"),
                }
                at += len;
            }
            assert_eq!(at, m.len());
            assert_eq!((lapics, ioapics, nmis), (cpus, 1, 1));
            assert_eq!(overrides, 0, "KVM's routing is the ACPI default");
        }
    }

    #[test]
    fn the_reset_vector_writes_the_reset_value_to_the_reset_register() {
        use crate::devices::acpi_pm::{AcpiPm, ACPI_PM_BASE};
        use crate::devices::bus::{BusDevice, VmEvent, VmEvents};
        let s = RESET_VECTOR_STUB;
        assert_eq!(RESET_VECTOR + s.len() as u64, ACPI_AREA_END - 7);
        // mov al, imm8; mov dx, imm16; out dx, al
        assert_eq!((s[0], s[2], s[5]), (0xb0, 0xba, 0xee));
        let port = u16::from_le_bytes([s[3], s[4]]);
        let fadt = &build(1).unwrap()[2].1;
        assert_eq!(port as u64, u64_at(fadt, 116 + 4), "the FADT's RESET_REG");
        assert_eq!(s[1], fadt[128], "the FADT's RESET_VALUE");
        let events = VmEvents::default();
        AcpiPm::new(events.clone()).write((port - ACPI_PM_BASE) as u64, &[s[1]]);
        assert_eq!(events.take(), Some(VmEvent::Reset));
        // hlt; jmp back to the hlt
        assert_eq!(&s[6..], &[0xf4, 0xeb, 0xfd]);
    }

    #[test]
    fn refuses_bad_cpu_counts_and_writes_into_guest_ram() {
        assert!(matches!(build(0), Err(AcpiError::CpuCount(0))));
        assert!(matches!(
            build(MAX_ACPI_CPUS + 1),
            Err(AcpiError::CpuCount(255))
        ));
        let ram = GuestRam::new(2 << 20).unwrap();
        assert_eq!(write(&ram, 2).unwrap(), RSDP_ADDR);
        let mut sig = [0u8; 8];
        ram.read(RSDP_ADDR, &mut sig).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let mut stub = [0u8; 9];
        ram.read(RESET_VECTOR, &mut stub).unwrap();
        assert_eq!(stub, RESET_VECTOR_STUB);
        let small = GuestRam::new(512 << 10).unwrap();
        assert!(matches!(
            write(&small, 1),
            Err(AcpiError::Write(MemoryError::OutsideRam { .. }))
        ));
    }
}
