//! The i8042 keyboard controller, as far as a guest uses it to reset the machine.
//!
//! PCs reset through the keyboard controller: command 0xFE to port 0x64 pulses the
//! CPU's reset line low. Linux does this with `reboot=k` (and as one of its
//! fallbacks without ACPI), so a VMM without firmware turns it into a clean stop
//! of the VM, as Firecracker does. Enough of the controller is here for a driver
//! to probe it (status, configuration byte, self-tests, output port); no keyboard
//! or mouse is attached, so data written to them is dropped.
//!
//! Ports: 0x60 data (offset 0), 0x64 status on read, command on write (offset 4).
//! Offsets 1-3 (0x61-0x63) are an open bus here; with the in-kernel PIT, KVM
//! answers port 0x61 itself.

use serde::{Deserialize, Serialize};

use super::bus::{BusDevice, VmEvent, VmEvents};
use crate::state::{check_bits, StateError};

/// The controller's base port (its data port).
pub const I8042_PORT: u16 = 0x60;
/// Ports from the base through the command port 0x64.
pub const I8042_PORT_LEN: u16 = 5;

const OFS_DATA: u16 = 0;
const OFS_COMMAND: u16 = 4;

/// Status register bits.
const SB_OUTPUT_FULL: u8 = 0x01;
const SB_SYSTEM_FLAG: u8 = 0x04;
const SB_LAST_WAS_COMMAND: u8 = 0x08;
const SB_KEYBOARD_UNLOCKED: u8 = 0x10;

/// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KEYBOARD: u8 = 0xab;
const CMD_DISABLE_KEYBOARD: u8 = 0xad;
const CMD_ENABLE_KEYBOARD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
/// 0xF0-0xFF pulse output-port lines low for a moment: a clear bit 0 pulses the
/// reset line (0xFE is the classic "reset the CPU").
const CMD_PULSE_FIRST: u8 = 0xf0;

/// Configuration byte bits: keyboard and mouse clocks disabled.
const CTR_KEYBOARD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
/// Output port bit 0: the CPU's reset line (active low).
const OUTPUT_PORT_RESET_LINE: u8 = 0x01;

/// The self-test passed, and the interface tests found no fault.
const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;

/// Status bits kept in [`I8042State::status`] (output-full follows `output`).
const SB_STORED: u8 = SB_SYSTEM_FLAG | SB_LAST_WAS_COMMAND | SB_KEYBOARD_UNLOCKED;

/// The controller's state as plain data (for snapshots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The status register without its output-full bit.
    pub status: u8,
    /// The configuration byte.
    pub ctr: u8,
    /// The output port.
    pub output_port: u8,
    /// The byte waiting in the output buffer.
    pub output: Option<u8>,
    /// The command waiting for its data byte: 0x60 or 0xD1.
    pub pending_command: Option<u8>,
}

/// The i8042 controller.
pub struct I8042 {
    status: u8,
    /// The configuration byte ("command byte").
    ctr: u8,
    /// The output port: bit 0 reset line, bit 1 A20 gate.
    output_port: u8,
    /// The byte the guest reads from port 0x60 next, if any.
    output: Option<u8>,
    /// The command waiting for its data byte (0x60 or 0xD1).
    pending_command: Option<u8>,
    events: VmEvents,
}

impl I8042 {
    /// The controller as firmware leaves it, raising resets on `events`.
    pub fn new(events: VmEvents) -> Self {
        I8042 {
            events,
            status: SB_SYSTEM_FLAG | SB_KEYBOARD_UNLOCKED,
            // Translation and the system flag set, interrupts off, as firmware
            // leaves it.
            ctr: 0x44,
            output_port: OUTPUT_PORT_RESET_LINE | 0x02,
            output: None,
            pending_command: None,
        }
    }
}

impl I8042 {
    /// The controller's state.
    pub fn state(&self) -> I8042State {
        I8042State {
            status: self.status,
            ctr: self.ctr,
            output_port: self.output_port,
            output: self.output,
            pending_command: self.pending_command,
        }
    }

    /// Restores a saved state; refused when it has status bits the controller
    /// never keeps or a pending command that takes no data byte.
    pub fn restore(&mut self, state: &I8042State) -> Result<(), StateError> {
        check_bits("i8042 status", state.status.into(), SB_STORED.into())?;
        if let Some(c) = state.pending_command {
            if c != CMD_WRITE_CTR && c != CMD_WRITE_OUTPUT_PORT {
                return Err(StateError::invalid(
                    "i8042 pending command",
                    format!("{c:#x} takes no data byte"),
                ));
            }
        }
        self.status = state.status;
        self.ctr = state.ctr;
        self.output_port = state.output_port;
        self.output = state.output;
        self.pending_command = state.pending_command;
        Ok(())
    }

    fn respond(&mut self, byte: u8) {
        self.output = Some(byte);
    }

    fn command(&mut self, command: u8) -> Option<VmEvent> {
        match command {
            CMD_READ_CTR => self.respond(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => self.pending_command = Some(command),
            CMD_DISABLE_AUX => self.ctr |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => self.ctr &= !CTR_AUX_DISABLED,
            CMD_SELF_TEST => self.respond(SELF_TEST_PASSED),
            CMD_TEST_AUX | CMD_TEST_KEYBOARD => self.respond(INTERFACE_OK),
            CMD_DISABLE_KEYBOARD => self.ctr |= CTR_KEYBOARD_DISABLED,
            CMD_ENABLE_KEYBOARD => self.ctr &= !CTR_KEYBOARD_DISABLED,
            CMD_READ_OUTPUT_PORT => self.respond(self.output_port),
            c if c >= CMD_PULSE_FIRST && c & OUTPUT_PORT_RESET_LINE == 0 => {
                return Some(VmEvent::Reset)
            }
            // Everything else (pulses of other lines, vendor commands) does nothing.
            _ => {}
        }
        None
    }

    fn data(&mut self, value: u8) -> Option<VmEvent> {
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = value;
                if value & OUTPUT_PORT_RESET_LINE == 0 {
                    return Some(VmEvent::Reset);
                }
            }
            // A byte for the keyboard, which is not there.
            _ => {}
        }
        None
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let offset = offset as u16;
        data.fill(0xff);
        let Some(first) = data.first_mut() else {
            return;
        };
        match offset {
            OFS_DATA => *first = self.output.take().unwrap_or(0),
            OFS_COMMAND => {
                let full = if self.output.is_some() {
                    SB_OUTPUT_FULL
                } else {
                    0
                };
                *first = self.status | full;
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        let event = match offset as u16 {
            OFS_DATA => {
                self.status &= !SB_LAST_WAS_COMMAND;
                self.data(value)
            }
            OFS_COMMAND => {
                self.status |= SB_LAST_WAS_COMMAND;
                self.command(value)
            }
            _ => None,
        };
        if let Some(event) = event {
            self.events.raise(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dev: &mut I8042, offset: u16) -> u8 {
        let mut b = [0u8];
        dev.read(offset as u64, &mut b);
        b[0]
    }

    #[test]
    fn command_0xfe_resets() {
        let events = VmEvents::default();
        let mut dev = I8042::new(events.clone());
        assert_eq!(read(&mut dev, OFS_COMMAND) & 0x02, 0, "input buffer empty");
        dev.write(OFS_COMMAND as u64, &[0xfe]);
        assert_eq!(events.take(), Some(VmEvent::Reset));
        dev.write(OFS_COMMAND as u64, &[0xff]);
        assert_eq!(events.take(), None);
    }

    #[test]
    fn clearing_the_reset_line_through_the_output_port_resets() {
        let events = VmEvents::default();
        let mut dev = I8042::new(events.clone());
        dev.write(OFS_COMMAND as u64, &[CMD_READ_OUTPUT_PORT]);
        let port = read(&mut dev, OFS_DATA);
        assert_eq!(port & OUTPUT_PORT_RESET_LINE, 1);
        dev.write(OFS_COMMAND as u64, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(OFS_DATA as u64, &[port]);
        assert_eq!(events.take(), None);
        dev.write(OFS_COMMAND as u64, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(OFS_DATA as u64, &[port & !1]);
        assert_eq!(events.take(), Some(VmEvent::Reset));
    }

    #[test]
    fn a_driver_can_probe_it() {
        let events = VmEvents::default();
        let mut dev = I8042::new(events.clone());
        dev.write(OFS_COMMAND as u64, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, OFS_COMMAND) & SB_OUTPUT_FULL, 1);
        assert_eq!(read(&mut dev, OFS_DATA), 0x55);
        assert_eq!(read(&mut dev, OFS_COMMAND) & SB_OUTPUT_FULL, 0);
        dev.write(OFS_COMMAND as u64, &[CMD_WRITE_CTR]);
        dev.write(OFS_DATA as u64, &[0x47]);
        dev.write(OFS_COMMAND as u64, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, OFS_DATA), 0x47);
        dev.write(OFS_COMMAND as u64, &[CMD_DISABLE_KEYBOARD]);
        dev.write(OFS_COMMAND as u64, &[CMD_READ_CTR]);
        assert_eq!(
            read(&mut dev, OFS_DATA) & CTR_KEYBOARD_DISABLED,
            CTR_KEYBOARD_DISABLED
        );
        // Keyboard bytes go nowhere and are not an error.
        dev.write(OFS_DATA as u64, &[0xff]);
        assert_eq!(events.take(), None);
        assert_eq!(read(&mut dev, 1), 0xff, "0x61 is not the controller's");
    }

    #[test]
    fn state_round_trips_through_json_mid_command() {
        let events = VmEvents::default();
        let restored = |d: &I8042| {
            let json = serde_json::to_string(&d.state()).unwrap();
            let mut back = I8042::new(events.clone());
            back.restore(&serde_json::from_str(&json).unwrap()).unwrap();
            back
        };
        // A response waiting in the output buffer.
        let mut dev = I8042::new(events.clone());
        dev.write(OFS_COMMAND as u64, &[CMD_DISABLE_AUX]);
        dev.write(OFS_COMMAND as u64, &[CMD_SELF_TEST]);
        let mut back = restored(&dev);
        assert_eq!(back.state(), dev.state());
        assert_eq!(read(&mut back, OFS_COMMAND), read(&mut dev, OFS_COMMAND));
        assert_eq!(read(&mut back, OFS_DATA), 0x55);
        assert_eq!(read(&mut back, OFS_COMMAND) & SB_OUTPUT_FULL, 0);
        back.write(OFS_COMMAND as u64, &[CMD_READ_CTR]);
        assert_eq!(
            read(&mut back, OFS_DATA) & CTR_AUX_DISABLED,
            CTR_AUX_DISABLED
        );
        // A command waiting for its data byte.
        let mut dev = I8042::new(events.clone());
        dev.write(OFS_COMMAND as u64, &[CMD_WRITE_CTR]);
        let mut back = restored(&dev);
        back.write(OFS_DATA as u64, &[0x03]);
        back.write(OFS_COMMAND as u64, &[CMD_READ_CTR]);
        assert_eq!(
            read(&mut back, OFS_DATA),
            0x03,
            "the data byte ends the command"
        );
        let mut dev = I8042::new(events.clone());
        dev.write(OFS_COMMAND as u64, &[CMD_WRITE_OUTPUT_PORT]);
        restored(&dev).write(OFS_DATA as u64, &[0x02]);
        assert_eq!(events.take(), Some(VmEvent::Reset), "the reset line pulled");
    }

    #[test]
    fn hostile_states_are_refused_and_change_nothing() {
        let mut dev = I8042::new(VmEvents::default());
        let good = dev.state();
        let mut bad = good.clone();
        bad.status |= SB_OUTPUT_FULL;
        assert!(matches!(dev.restore(&bad), Err(StateError::Invalid { .. })));
        let mut bad = good.clone();
        bad.pending_command = Some(CMD_SELF_TEST);
        assert!(matches!(dev.restore(&bad), Err(StateError::Invalid { .. })));
        assert_eq!(dev.state(), good);
    }
}
