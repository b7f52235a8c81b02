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

use serde::{Deserialize, Serialize};

use super::bus::{BusDevice, VmEvent, VmEvents};
use crate::boot::acpi::{
    ACPI_PM_PORT, RESET_VALUE, S5_SLEEP_TYPE, SLEEP_CONTROL_PORT, SLEEP_ENABLE,
};
use crate::state::StateError;

/// The device's first port (sleep control).
pub const ACPI_PM_BASE: u16 = ACPI_PM_PORT;
/// Two byte-wide registers: sleep control (and reset), sleep status.
pub const ACPI_PM_LEN: u16 = 2;

/// SLP_TYP occupies bits 2-4 of the sleep control register.
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7;

/// The ACPI PM registers' state: they keep none (writes act at once, reads are
/// constant), so the state is empty; it exists so that every device has one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcpiPmState {}

/// The ACPI PM registers; stateless.
pub struct AcpiPm {
    events: VmEvents,
}

impl AcpiPm {
    /// The block, raising power-off and reset on `events`.
    pub fn new(events: VmEvents) -> AcpiPm {
        AcpiPm { events }
    }

    /// The (empty) state.
    pub fn state(&self) -> AcpiPmState {
        AcpiPmState {}
    }

    /// Restores the (empty) state: nothing to check or apply.
    pub fn restore(&mut self, _state: &AcpiPmState) -> Result<(), StateError> {
        Ok(())
    }

    /// What a write of `data` at `offset` asks of the machine.
    fn event(offset: u64, data: &[u8]) -> Option<VmEvent> {
        let (Some(&value), 1) = (data.first(), data.len()) else {
            return None;
        };
        if offset != (SLEEP_CONTROL_PORT - ACPI_PM_BASE) as u64 {
            return None;
        }
        if value == RESET_VALUE {
            return Some(VmEvent::Reset);
        }
        let sleep_type = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
        (value & SLEEP_ENABLE != 0 && sleep_type == S5_SLEEP_TYPE).then_some(VmEvent::PowerOff)
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(event) = Self::event(offset, data) {
            self.events.raise(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_the_reset_value_resets() {
        let events = VmEvents::default();
        let mut dev = AcpiPm::new(events.clone());
        dev.write(0, &[(5 << 2) | 0x20]);
        assert_eq!(events.take(), Some(VmEvent::PowerOff));
        dev.write(0, &[RESET_VALUE]);
        assert_eq!(events.take(), Some(VmEvent::Reset));
    }

    #[test]
    fn everything_else_is_ignored_and_reads_are_zero() {
        let events = VmEvents::default();
        let mut dev = AcpiPm::new(events.clone());
        // Other sleep types, S5 without SLP_EN, the wake-status clear, writes
        // to the status register, wide writes.
        for (offset, data) in [
            (0u64, vec![(3 << 2) | 0x20]),
            (0, vec![5 << 2]),
            (0, vec![0]),
            (1, vec![0x80]),
            (1, vec![(5 << 2) | 0x20]),
            (1, vec![RESET_VALUE]),
            (0, vec![(5 << 2) | 0x20, 0]),
            (0, vec![]),
        ] {
            dev.write(offset, &data);
            assert_eq!(events.take(), None, "{offset} {data:?}");
        }
        for offset in [0, 1] {
            let mut b = [0xffu8; 2];
            dev.read(offset, &mut b);
            assert_eq!(b, [0, 0]);
        }
    }

    #[test]
    fn the_empty_state_round_trips_and_nothing_else_parses() {
        let mut dev = AcpiPm::new(VmEvents::default());
        let json = serde_json::to_string(&dev.state()).unwrap();
        assert_eq!(json, "{}");
        dev.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert!(serde_json::from_str::<AcpiPmState>(r#"{"value":1}"#).is_err());
    }
}
