//! QEMU's `isa-debug-exit` device: a guest writes a byte `v` to its port and the VM
//! stops with exit code `(v << 1) | 1` (so a guest can never exit 0 by accident).

use super::bus::{DeviceAction, PioDevice};

/// The port QEMU's `isa-debug-exit` uses by default.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// The debug-exit device.
#[derive(Default)]
pub struct DebugExit;

impl PioDevice for DebugExit {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) -> DeviceAction {
        // QEMU's device is 1 byte wide; wider writes use their low byte, as there.
        let value = data.first().copied().unwrap_or(0) as u32;
        DeviceAction::Exit((value << 1) | 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_follows_qemu() {
        let mut dev = DebugExit;
        assert_eq!(dev.write(0, &[0]), DeviceAction::Exit(1));
        assert_eq!(dev.write(0, &[0x10]), DeviceAction::Exit(0x21));
        assert_eq!(dev.write(0, &[0xff]), DeviceAction::Exit(0x1ff));
    }
}
