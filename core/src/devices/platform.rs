//! The VM's own devices together, and the state of every device of a VM as
//! one plain-data document ([`DeviceStates`]): what `Vm::device_states` writes
//! out and the snapshot work reads back.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use serde::{Deserialize, Serialize};

use super::acpi_pm::{AcpiPm, AcpiPmState};
use super::debug_exit::{DebugExit, DebugExitState};
use super::i8042::{I8042State, I8042};
use super::power_off::{PowerOff, PowerOffState};
use super::rtc::{Rtc, RtcState};
use super::serial::{SerialConsole, SerialConsoleState};
use crate::error::Result;
use crate::pci::root::{PciRoot, PciRootState};
use crate::state::StateError;

/// Every device's state, as plain data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceStates {
    /// COM1.
    pub com1: SerialConsoleState,
    /// The i8042 controller.
    pub i8042: I8042State,
    /// The PM1a control register at 0x604.
    pub pm1a_control: PowerOffState,
    /// The CMOS RTC.
    pub rtc: RtcState,
    /// The debug-exit port.
    pub debug_exit: DebugExitState,
    /// The ACPI PM registers (`None`: not attached, no Linux loaded).
    pub acpi_pm: Option<AcpiPmState>,
    /// PCI bus 0: the host bridge and every virtio function.
    pub pci: PciRootState,
}

/// Handles on the devices a VM always has (the buses hold them too).
pub struct PlatformDevices {
    pub serial: Arc<Mutex<SerialConsole>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub pm1a_control: Arc<Mutex<PowerOff>>,
    pub rtc: Arc<Mutex<Rtc>>,
    pub debug_exit: Arc<Mutex<DebugExit>>,
    /// Attached with the Linux loader's ACPI tables.
    pub acpi_pm: OnceLock<Arc<Mutex<AcpiPm>>>,
}

fn relock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Device state is plain data updated in place: a poisoned lock is consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PlatformDevices {
    /// Every device's state, PCI included.
    pub fn states(&self, pci: &Mutex<PciRoot>) -> DeviceStates {
        DeviceStates {
            com1: relock(&self.serial).state(),
            i8042: relock(&self.i8042).state(),
            pm1a_control: relock(&self.pm1a_control).state(),
            rtc: relock(&self.rtc).state().clone(),
            debug_exit: relock(&self.debug_exit).state(),
            acpi_pm: self.acpi_pm.get().map(|d| relock(d).state()),
            pci: relock(pci).state(),
        }
    }

    /// Restores every device of a VM built with the same devices. Each device
    /// checks its own state before taking it; the whole document is refused
    /// before anything changes when the ACPI PM device's presence differs or
    /// any state of the fixed devices fails its checks (they are checked on
    /// copies first). The PCI bus restores last and rolls itself back.
    pub fn restore(&self, pci: &Mutex<PciRoot>, states: &DeviceStates) -> Result<()> {
        if states.acpi_pm.is_some() != self.acpi_pm.get().is_some() {
            return Err(StateError::mismatch(
                "ACPI PM",
                "attached in one of the VM and the state only",
            )
            .into());
        }
        // Dry runs on stand-ins: the same checks, no effect on the VM.
        let events = super::bus::VmEvents::default();
        I8042::new(events.clone()).restore(&states.i8042)?;
        PowerOff::new(events.clone()).restore(&states.pm1a_control)?;
        Rtc::default().restore(&states.rtc)?;
        SerialConsole::new(super::console::ConsoleSink::default())?.restore(&states.com1)?;
        relock(&self.serial).restore(&states.com1)?;
        relock(&self.i8042).restore(&states.i8042)?;
        relock(&self.pm1a_control).restore(&states.pm1a_control)?;
        relock(&self.rtc).restore(&states.rtc)?;
        relock(&self.debug_exit).restore(&states.debug_exit)?;
        if let (Some(d), Some(s)) = (self.acpi_pm.get(), &states.acpi_pm) {
            relock(d).restore(s)?;
        }
        relock(pci).restore(&states.pci)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use crate::vcpu::exit::UnhandledAccess;
    use crate::vm::VmShared;

    fn vm() -> VmShared {
        VmShared::new(GuestRam::new(1 << 20).unwrap(), UnhandledAccess::Ignore).unwrap()
    }

    fn inb(vm: &VmShared, port: u16) -> u8 {
        let mut b = [0u8];
        assert!(vm.pio.read(port.into(), 1, &mut b));
        b[0]
    }

    fn outb(vm: &VmShared, port: u16, v: u8) {
        assert!(vm.pio.write(port.into(), 1, &[v], &vm.events));
    }

    fn outl(vm: &VmShared, port: u16, v: u32) {
        assert!(vm.pio.write(port.into(), 4, &v.to_le_bytes(), &vm.events));
    }

    fn inl(vm: &VmShared, port: u16) -> u32 {
        let mut b = [0u8; 4];
        assert!(vm.pio.read(port.into(), 4, &mut b));
        u32::from_le_bytes(b)
    }

    /// What a guest reads back from every device whose reads have no side
    /// effect on what is compared (the RTC's RAM, not its clock).
    fn view(vm: &VmShared) -> Vec<u32> {
        let mut v = Vec::new();
        for reg in 1..8 {
            v.push(inb(vm, 0x3f8 + reg).into());
        }
        v.push(inb(vm, 0x64).into());
        v.push(inb(vm, 0x604).into());
        outb(vm, 0x70, 0x20);
        v.push(inb(vm, 0x71).into());
        outb(vm, 0x70, 0x0b);
        v.push(inb(vm, 0x71).into());
        for reg in [0x00, 0x08, 0x3c] {
            outl(vm, 0xcf8, 0x8000_0000 | reg);
            v.push(inl(vm, 0xcfc));
        }
        v
    }

    #[test]
    fn every_device_round_trips_through_json_and_the_buses() {
        let a = vm();
        outb(&a, 0x3f8 + 7, 0x42); // COM1 scratch
        outb(&a, 0x3f8 + 3, 0x1b); // line control
        a.serial.lock().unwrap().enqueue_input(b"queued").unwrap();
        outb(&a, 0x64, 0xd1); // i8042: write the output port next
        outb(&a, 0x604, 0x01); // PM1a: SCI_EN
        outb(&a, 0x70, 0x20);
        outb(&a, 0x71, 0x99); // CMOS RAM
        outl(&a, 0xcf8, 0x8000_003c);
        outb(&a, 0xcfc, 0x0a); // host bridge interrupt line
        let json = serde_json::to_string(&a.device_states()).unwrap();
        let b = vm();
        b.restore_device_states(&serde_json::from_str(&json).unwrap())
            .unwrap();
        assert_eq!(b.device_states(), a.device_states());
        assert_eq!(view(&b), view(&a));
        assert_eq!(inb(&b, 0x3f8), b'q', "queued input survives");
        // The i8042 still waits for the output port's byte: clearing the
        // reset line resets, on the restored VM as on the original.
        outb(&b, 0x60, 0x02);
        assert_eq!(b.events.take(), Some(super::super::bus::VmEvent::Reset));
    }

    #[test]
    fn a_bad_document_is_refused_before_anything_changes() {
        let a = vm();
        outb(&a, 0x3f8 + 7, 0x42);
        let good = a.device_states();
        let b = vm();
        let before = b.device_states();
        let mut bad = good.clone();
        bad.rtc.index = 0xff;
        assert!(b.restore_device_states(&bad).is_err());
        let mut bad = good.clone();
        bad.i8042.pending_command = Some(0xaa);
        assert!(b.restore_device_states(&bad).is_err());
        let mut bad = good.clone();
        bad.acpi_pm = Some(AcpiPmState {});
        assert!(b.restore_device_states(&bad).is_err());
        let mut bad = good.clone();
        bad.pci.functions.clear();
        assert!(b.restore_device_states(&bad).is_err());
        assert_eq!(b.device_states().i8042, before.i8042);
        assert_eq!(b.device_states().rtc, before.rtc);
        let bad = serde_json::json!({ "com1": null });
        assert!(serde_json::from_value::<DeviceStates>(bad).is_err());
    }
}
