//! The ACPI power-management registers of a hardware-reduced platform, which the
//! FADT written by [`crate::boot::acpi`] points at: sleep control (also the reset
//! register) at port 0x600 and sleep status at 0x601, like Cloud Hypervisor's
//! `AcpiShutdownDevice`.
//!
//! Linux powers off by writing `SLP_TYP << 2 | SLP_EN` with the sleep type of
//! `_S5` (5) to the sleep control register, and resets by writing the FADT's
//! reset value to the reset register. Nothing else does anything: there are no
//! sleep states to enter, and the wake status Linux clears before sleeping (a
//! write of 0x80 to the status register) has no state behind it. Both registers
//! read as 0.

use super::bus::{DeviceAction, PioDevice};
use crate::boot::acpi::{
    ACPI_PM_PORT, RESET_VALUE, S5_SLEEP_TYPE, SLEEP_CONTROL_PORT, SLEEP_ENABLE,
};

/// The device's first port (sleep control).
pub const ACPI_PM_BASE: u16 = ACPI_PM_PORT;
/// Two byte-wide registers: sleep control (and reset), sleep status.
pub const ACPI_PM_LEN: u16 = 2;

/// SLP_TYP occupies bits 2-4 of the sleep control register.
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7;

/// The ACPI PM registers; stateless.
#[derive(Default)]
pub struct AcpiPm;

impl PioDevice for AcpiPm {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        // Only a byte write to the control register means anything: the GAS
        // says byte access, and a wider write would reach the status register.
        let (Some(&value), 1) = (data.first(), data.len()) else {
            return DeviceAction::Continue;
        };
        if offset != SLEEP_CONTROL_PORT - ACPI_PM_BASE {
            return DeviceAction::Continue;
        }
        if value == RESET_VALUE {
            return DeviceAction::Reset;
        }
        let sleep_type = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
        if value & SLEEP_ENABLE != 0 && sleep_type == S5_SLEEP_TYPE {
            return DeviceAction::PowerOff;
        }
        DeviceAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_the_reset_value_resets() {
        let mut dev = AcpiPm;
        assert_eq!(dev.write(0, &[(5 << 2) | 0x20]), DeviceAction::PowerOff);
        assert_eq!(dev.write(0, &[RESET_VALUE]), DeviceAction::Reset);
    }

    #[test]
    fn everything_else_is_ignored_and_reads_are_zero() {
        let mut dev = AcpiPm;
        // Other sleep types, S5 without SLP_EN, the wake-status clear, writes
        // to the status register, wide writes.
        for (offset, data) in [
            (0u16, vec![(3 << 2) | 0x20]),
            (0, vec![5 << 2]),
            (0, vec![0]),
            (1, vec![0x80]),
            (1, vec![(5 << 2) | 0x20]),
            (1, vec![RESET_VALUE]),
            (0, vec![(5 << 2) | 0x20, 0]),
            (0, vec![]),
        ] {
            assert_eq!(
                dev.write(offset, &data),
                DeviceAction::Continue,
                "{offset} {data:?}"
            );
        }
        for offset in [0, 1] {
            let mut b = [0xffu8; 2];
            dev.read(offset, &mut b);
            assert_eq!(b, [0, 0]);
        }
    }
}
