//! Power-off without ACPI tables: the PM1a control register of QEMU's ICH9 (q35)
//! power management block at port 0x604.
//!
//! Guests written for QEMU power it off with `outw(0x604, 0x2000)`: SLP_EN (bit
//! 13) with sleep type 0, which QEMU's DSDT declares as S5, soft-off. A guest here
//! does the same and the VM stops as `power_off`. There are no sleep states, so
//! SLP_EN with any other sleep type is ignored. (Linux guests get ACPI tables
//! from the loader and power off through [`super::acpi_pm`]; with `acpi=off`
//! Linux has no power-off method of its own and stops the VM through the i8042
//! with `reboot=k`, see [`super::i8042`].)

use serde::{Deserialize, Serialize};

use super::bus::{BusDevice, VmEvent, VmEvents};
use crate::state::{check_bits, StateError};

/// The PM1a control register's port.
pub const POWER_OFF_PORT: u16 = 0x604;
/// It is 16 bits wide.
pub const POWER_OFF_PORT_LEN: u16 = 2;

/// PM1 control: sleep enable, and the sleep type field.
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;
/// The sleep type QEMU's DSDT gives S5 (soft-off).
const SLP_TYP_S5: u16 = 0;

/// The register's state as plain data (for snapshots).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerOffState {
    /// What the register reads (SLP_EN, write-only, is never set).
    pub value: u16,
}

/// The PM1a control register.
pub struct PowerOff {
    value: u16,
    events: VmEvents,
}

impl PowerOff {
    /// The register, raising power-off on `events`.
    pub fn new(events: VmEvents) -> PowerOff {
        PowerOff { value: 0, events }
    }

    /// The register's state.
    pub fn state(&self) -> PowerOffState {
        PowerOffState { value: self.value }
    }

    /// Restores a saved state; refused when SLP_EN, which reads as 0, is set.
    pub fn restore(&mut self, state: &PowerOffState) -> Result<(), StateError> {
        check_bits("PM1a control", state.value.into(), (!SLP_EN).into())?;
        self.value = state.value;
        Ok(())
    }
}

impl BusDevice for PowerOff {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = self.value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = self.value.to_le_bytes();
        for (i, &b) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(offset as usize + i) {
                *slot = b;
            }
        }
        // SLP_EN is write-only: it reads back as 0.
        let value = u16::from_le_bytes(bytes);
        self.value = value & !SLP_EN;
        if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == SLP_TYP_S5 {
            self.events.raise(VmEvent::PowerOff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemus_shutdown_value_powers_off() {
        let events = VmEvents::default();
        let mut dev = PowerOff::new(events.clone());
        dev.write(0, &0x2000u16.to_le_bytes());
        assert_eq!(events.take(), Some(VmEvent::PowerOff));
        // A byte write of the high half does the same.
        dev.write(1, &[0x20]);
        assert_eq!(events.take(), Some(VmEvent::PowerOff));
    }

    #[test]
    fn other_values_and_sleep_types_do_not() {
        let events = VmEvents::default();
        let mut dev = PowerOff::new(events.clone());
        dev.write(0, &0x0001u16.to_le_bytes());
        assert_eq!(events.take(), None);
        let mut back = [0u8; 2];
        dev.read(0, &mut back);
        assert_eq!(u16::from_le_bytes(back), 1);
        // SLP_EN with sleep type 1 (S3 in QEMU's DSDT): no sleep states here.
        dev.write(0, &0x2400u16.to_le_bytes());
        assert_eq!(events.take(), None);
    }

    #[test]
    fn state_round_trips_and_slp_en_is_refused() {
        let events = VmEvents::default();
        let mut dev = PowerOff::new(events.clone());
        dev.write(0, &0x0c01u16.to_le_bytes()); // sleep type 3, SCI_EN
        let json = serde_json::to_string(&dev.state()).unwrap();
        let mut back = PowerOff::new(events.clone());
        back.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        let mut b = [0u8; 2];
        back.read(0, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x0c01);
        // A byte write of SLP_EN keeps the restored low byte's sleep type (3):
        // no power-off, exactly as on the original.
        back.write(1, &[0x2c]);
        dev.write(1, &[0x2c]);
        assert_eq!(events.take(), None);
        assert_eq!(back.state(), dev.state());
        let before = back.state();
        let bad = PowerOffState { value: SLP_EN };
        assert!(matches!(
            back.restore(&bad),
            Err(StateError::Invalid { .. })
        ));
        assert_eq!(back.state(), before);
    }
}
