//! Interrupt virtualization: KVM's in-kernel interrupt controllers and how the
//! host raises interrupts through them.
//!
//! With [`create_irqchip`] KVM emulates the legacy PIC pair, the IOAPIC (24
//! pins at 0xfec00000), one local APIC per vCPU (at 0xfee00000, with its timer)
//! and the PIT (ports 0x40-0x43) in the kernel: a guest programs them, takes
//! their interrupts and acknowledges them without a single exit to this VMM. The
//! default routing sends GSI 0-15 to both the PIC and the IOAPIC pin of the same
//! number and GSI 16-23 to the IOAPIC only.
//!
//! The host raises interrupts three ways:
//! - [`pulse`]: `KVM_IRQ_LINE` high then low on a GSI (an edge, what ISA devices
//!   send); `vm.injectIrq(line)` from TypeScript.
//! - [`send_msi`]: `KVM_SIGNAL_MSI`, a message-signalled interrupt straight to a
//!   local APIC, no IOAPIC pin involved; `vm.sendMsi(address, data)`.
//! - irqfd: an [`IrqLine`] is an eventfd registered with `KVM_IRQFD` on a GSI; a
//!   write to it is an edge on that GSI, raised by KVM itself. Devices running on
//!   vCPU threads (the UART on GSI 4) use it, so raising their interrupt is one
//!   `write(2)` and never takes a lock shared with the VM fd.
//!
//! Creating the irqchip changes how HLT behaves: KVM then handles HLT itself (the
//! vCPU sleeps until an interrupt arrives) and never reports it to the VMM, so a
//! guest that halts with interrupts disabled sleeps until the host stops it.
//! That is why the irqchip is a VM creation option rather than the default: the
//! bare guests of the entry modes end their run with `hlt`.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use kvm_bindings::{kvm_msi, kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use serde::Serialize;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use thiserror::Error;

/// What can go wrong with the irqchip and interrupt lines.
#[derive(Debug, Error)]
pub enum IrqError {
    /// A KVM ioctl failed
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// A GSI beyond the IOAPIC's pins
    #[error("interrupt line {0} does not exist: lines are 0 to {}", IOAPIC_PINS - 1)]
    NoSuchLine(u32),
    /// An MSI address outside the local APIC window
    #[error("MSI address {0:#x} is outside the local APIC window 0xfee00000-0xfeefffff")]
    MsiAddress(u64),
    /// An eventfd could not be made
    #[error("{op}: {source}")]
    EventFd {
        /// What was being done.
        op: &'static str,
        /// The host's error.
        source: io::Error,
    },
}

/// The result of an interrupt operation.
pub type Result<T> = std::result::Result<T, IrqError>;

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> IrqError {
    move |source| IrqError::Kvm { op, source }
}

/// The number of IOAPIC pins, and so of GSIs the host can pulse (0..=23).
pub const IOAPIC_PINS: u32 = 24;
/// The GSI of COM1 (ISA IRQ 4).
pub const SERIAL_GSI: u32 = 4;
/// Guest-physical base of the local APIC page.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// The address window MSIs are written to (`0xfeeXXXXX`).
const MSI_WINDOW: std::ops::RangeInclusive<u64> = 0xfee0_0000..=0xfeef_ffff;

/// Creates the in-kernel PIC, IOAPIC and local APICs, and the PIT. Must run before
/// the first vCPU is created (KVM attaches a local APIC to each vCPU as it is
/// created).
pub fn create_irqchip(vm: &VmFd) -> Result<()> {
    vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
    // The dummy speaker port (0x61) keeps guests that probe the PC speaker's gate
    // (Linux's PIT calibration does) inside KVM.
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))
}

fn check_gsi(gsi: u32) -> Result<()> {
    if gsi >= IOAPIC_PINS {
        return Err(IrqError::NoSuchLine(gsi));
    }
    Ok(())
}

/// Raises and lowers `gsi`: one edge, which an edge-triggered PIC input or IOAPIC
/// pin latches as one interrupt.
pub fn pulse(vm: &VmFd, gsi: u32) -> Result<()> {
    check_gsi(gsi)?;
    vm.set_irq_line(gsi, true)
        .and_then(|()| vm.set_irq_line(gsi, false))
        .map_err(kvm("KVM_IRQ_LINE"))
}

/// Sends an MSI: `address` is `0xfeeXXXXX` (bits 12-19 the destination APIC id),
/// `data` carries the vector (bits 0-7) and delivery mode. Returns whether KVM
/// delivered it (false: the destination's local APIC refused it, e.g. disabled).
pub fn send_msi(vm: &VmFd, address: u64, data: u32) -> Result<bool> {
    if !MSI_WINDOW.contains(&address) {
        return Err(IrqError::MsiAddress(address));
    }
    let msi = kvm_msi {
        address_lo: address as u32,
        address_hi: (address >> 32) as u32,
        data,
        ..Default::default()
    };
    let delivered = vm.signal_msi(msi).map_err(kvm("KVM_SIGNAL_MSI"))?;
    Ok(delivered > 0)
}

/// An interrupt line driven through an irqfd: a device's [`Trigger`]. Until it is
/// attached to a GSI (no irqchip), raising it does nothing the guest can see, which
/// is what a guest polling its device expects.
///
/// The eventfd is made when the line is attached: a VM without an irqchip
/// (a function VM, say: a thousand of them in one process) holds no fd for
/// its UART's line. Clones share it.
pub struct IrqLine {
    event: Arc<OnceLock<EventFd>>,
    raised: AtomicU64,
}

impl IrqLine {
    /// A new, unattached line.
    pub fn new() -> Result<IrqLine> {
        Ok(IrqLine {
            event: Arc::new(OnceLock::new()),
            raised: AtomicU64::new(0),
        })
    }

    /// Connects the line to `gsi` of `vm`'s irqchip (`KVM_IRQFD`).
    pub fn attach(&self, vm: &VmFd, gsi: u32) -> Result<()> {
        check_gsi(gsi)?;
        let event = match self.event.get() {
            Some(event) => event,
            None => {
                let event = EventFd::new(EFD_NONBLOCK).map_err(|source| IrqError::EventFd {
                    op: "creating an interrupt eventfd",
                    source,
                })?;
                // A racing attach may have set one first: either is the line's.
                let _ = self.event.set(event);
                self.event.get().ok_or(IrqError::EventFd {
                    op: "creating an interrupt eventfd",
                    source: io::Error::other("the line has no eventfd"),
                })?
            }
        };
        vm.register_irqfd(event, gsi).map_err(kvm("KVM_IRQFD"))
    }

    /// How many times the device raised the line.
    pub fn raised(&self) -> u64 {
        self.raised.load(Relaxed)
    }

    /// The same line through a duplicated eventfd (an irqfd attached to this
    /// one fires for both), with the same count: for a device rebuilt from a
    /// saved state in place of the one holding this line.
    pub fn try_clone(&self) -> Result<IrqLine> {
        Ok(IrqLine {
            event: self.event.clone(),
            raised: AtomicU64::new(self.raised()),
        })
    }
}

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.raised.fetch_add(1, Relaxed);
        // Not attached: no irqchip, nothing the guest could see.
        let Some(event) = self.event.get() else {
            return Ok(());
        };
        match event.write(1) {
            // The counter is full only if nobody consumes it (no irqchip attached)
            // for 2^64 - 2 interrupts; a lost edge is then harmless.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }
}

/// A VM's interrupt state on the host side: whether it has an irqchip, and
/// counters of what the host raised.
#[derive(Default)]
pub struct IrqState {
    irqchip: AtomicBool,
    pulses: AtomicU64,
    msis: AtomicU64,
    msis_refused: AtomicU64,
}

/// A snapshot of [`IrqState`], plus the UART's count, as serialized for the host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IrqStatsSnapshot {
    /// Whether the VM has the in-kernel irqchip.
    pub irqchip: bool,
    /// Edges the host raised with `injectIrq`.
    pub injected: u64,
    /// MSIs KVM delivered.
    pub msis: u64,
    /// MSIs KVM refused (no local APIC accepted them).
    pub msis_refused: u64,
    /// Times the UART raised IRQ 4.
    pub serial: u64,
}

impl IrqState {
    /// Records that the VM has its irqchip.
    pub fn set_irqchip(&self) {
        self.irqchip.store(true, Relaxed);
    }

    /// Whether the VM has the in-kernel irqchip.
    pub fn irqchip(&self) -> bool {
        self.irqchip.load(Relaxed)
    }

    /// Counts a pulse.
    pub fn count_pulse(&self) {
        self.pulses.fetch_add(1, Relaxed);
    }

    /// Counts an MSI by whether it was delivered.
    pub fn count_msi(&self, delivered: bool) {
        if delivered {
            self.msis.fetch_add(1, Relaxed);
        } else {
            self.msis_refused.fetch_add(1, Relaxed);
        }
    }

    /// The counters, with the UART's count.
    pub fn snapshot(&self, serial: u64) -> IrqStatsSnapshot {
        IrqStatsSnapshot {
            irqchip: self.irqchip(),
            injected: self.pulses.load(Relaxed),
            msis: self.msis.load(Relaxed),
            msis_refused: self.msis_refused.load(Relaxed),
            serial,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::VmError;

    #[test]
    fn an_unattached_line_counts_and_never_fails() {
        let line = IrqLine::new().unwrap();
        for _ in 0..3 {
            line.trigger().unwrap();
        }
        assert_eq!(line.raised(), 3);
        assert!(line.event.get().is_none(), "an unattached line holds no fd");
    }

    #[test]
    fn lines_and_msi_addresses_are_checked_before_any_ioctl() {
        assert!(check_gsi(23).is_ok());
        let e = check_gsi(24).unwrap_err();
        assert!(matches!(e, IrqError::NoSuchLine(24)), "{e}");
        assert_eq!(
            e.to_string(),
            "interrupt line 24 does not exist: lines are 0 to 23"
        );
        assert!(!MSI_WINDOW.contains(&0xfed0_0000));
        assert!(MSI_WINDOW.contains(&0xfee0_1000));
    }

    /// A VM with an irqchip, or None where /dev/kvm cannot be opened.
    fn irqchip_vm() -> Option<crate::vm::Vm> {
        use crate::vcpu::exit::UnhandledAccess;
        if let Err(e) = crate::vm::check_kvm() {
            panic!("{e}: this test needs KVM (run it where /dev/kvm works, or in kvmbox)");
        }
        let vm = crate::vm::Vm::new(2 << 20, UnhandledAccess::Stop).unwrap();
        vm.enable_irqchip().unwrap();
        Some(vm)
    }

    #[test]
    #[ignore = "needs /dev/kvm: the test command runs it with --ignored where KVM works"]
    fn the_irqchip_takes_edges_and_msis_on_real_kvm() {
        let Some(vm) = irqchip_vm() else {
            return;
        };
        vm.enable_irqchip().unwrap(); // idempotent before the first vCPU
        vm.inject_irq(5).unwrap();
        assert!(matches!(
            vm.inject_irq(24),
            Err(crate::error::Error::Irq(IrqError::NoSuchLine(24)))
        ));
        vm.create_vcpu().unwrap();
        // The local APIC is software-disabled until the guest enables it.
        assert!(!vm.send_msi(LAPIC_BASE, 0x41).unwrap());
        assert!(matches!(
            vm.send_msi(0xfed0_0000, 0x41),
            Err(crate::error::Error::Irq(IrqError::MsiAddress(0xfed0_0000)))
        ));
        let stats = vm.irq_stats();
        assert!(stats.irqchip);
        assert_eq!((stats.injected, stats.msis_refused), (1, 1));
        let e = vm.enable_irqchip().unwrap_err();
        assert!(
            matches!(e, crate::error::Error::Vm(VmError::IrqchipAfterVcpu)),
            "{e}"
        );
    }

    #[test]
    #[ignore = "needs /dev/kvm: the test command runs it with --ignored where KVM works"]
    fn without_an_irqchip_injection_is_refused() {
        use crate::vcpu::exit::UnhandledAccess;
        if let Err(e) = crate::vm::check_kvm() {
            panic!("{e}: this test needs KVM (run it where /dev/kvm works, or in kvmbox)");
        }
        let vm = crate::vm::Vm::new(2 << 20, UnhandledAccess::Stop).unwrap();
        let e = vm.inject_irq(4).unwrap_err();
        assert!(
            matches!(e, crate::error::Error::Vm(VmError::NoIrqchip(_))),
            "{e}"
        );
        assert!(vm.send_msi(LAPIC_BASE, 0x41).is_err());
        assert!(!vm.irq_stats().irqchip);
        // Console input works without interrupts: the guest can poll for it.
        vm.console_input(b"typed").unwrap();
    }

    #[test]
    fn stats_snapshot() {
        let s = IrqState::default();
        s.set_irqchip();
        s.count_pulse();
        s.count_msi(true);
        s.count_msi(false);
        let snap = s.snapshot(7);
        assert_eq!(
            snap,
            IrqStatsSnapshot {
                irqchip: true,
                injected: 1,
                msis: 1,
                msis_refused: 1,
                serial: 7
            }
        );
        let json = serde_json::to_string(&snap).unwrap();
        assert!(json.contains("\"msisRefused\":1"), "{json}");
    }
}
