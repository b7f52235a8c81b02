//! QEMU's `isa-debug-exit` device: a guest writes a byte `v` to its port and the VM
//! stops with exit code `(v << 1) | 1` (so a guest can never exit 0 by accident).

use serde::{Deserialize, Serialize};

use super::bus::{BusDevice, VmEvent, VmEvents};
use crate::state::StateError;

/// The port QEMU's `isa-debug-exit` uses by default.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// The debug-exit port' state: they keep none (writes act at once, reads are
/// constant), so the state is empty; it exists so that every device has one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugExitState {}

/// The debug-exit device.
pub struct DebugExit {
    events: VmEvents,
}

impl DebugExit {
    /// The port, raising its exits on `events`.
    pub fn new(events: VmEvents) -> DebugExit {
        DebugExit { events }
    }

    /// The (empty) state.
    pub fn state(&self) -> DebugExitState {
        DebugExitState {}
    }

    /// Restores the (empty) state: nothing to check or apply.
    pub fn restore(&mut self, _state: &DebugExitState) -> Result<(), StateError> {
        Ok(())
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // QEMU's device is 1 byte wide; wider writes use their low byte, as there.
        let value = data.first().copied().unwrap_or(0) as u32;
        self.events.raise(VmEvent::DebugExit((value << 1) | 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_follows_qemu() {
        let events = VmEvents::default();
        let mut dev = DebugExit::new(events.clone());
        for (value, code) in [(0, 1), (0x10, 0x21), (0xff, 0x1ff)] {
            dev.write(0, &[value]);
            assert_eq!(events.take(), Some(VmEvent::DebugExit(code)));
        }
    }

    #[test]
    fn the_empty_state_round_trips_and_nothing_else_parses() {
        let mut dev = DebugExit::new(VmEvents::default());
        let json = serde_json::to_string(&dev.state()).unwrap();
        assert_eq!(json, "{}");
        dev.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert!(serde_json::from_str::<DebugExitState>(r#"{"value":1}"#).is_err());
    }
}
