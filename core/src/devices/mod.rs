//! Devices emulated in the core because the guest touches them on the hot path.
//! Each one implements [`bus::BusDevice`] and sits on one of the VM's buses
//! (port I/O or MMIO).

pub mod acpi_pm;
pub mod bus;
pub mod console;
pub mod debug_exit;
pub mod i8042;
pub mod platform;
pub mod power_off;
pub mod rtc;
pub mod serial;
