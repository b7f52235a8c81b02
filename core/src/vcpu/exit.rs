//! One KVM exit in, one decision out.
//!
//! [`handle_exit`] is a free function of the exit and the VM's devices, returning a
//! small enum, in the style of Firecracker's `handle_kvm_exit`: the vCPU loop stays
//! trivial and every exit kind is unit-tested with synthetic exits, without KVM.

use kvm_ioctls::VcpuExit;
use serde::Serialize;

use crate::devices::bus::VmEvent;
use crate::devices::console::take_thread_tally;
use crate::devices::debug_exit::DEBUG_EXIT_PORT;
use crate::devices::serial::{COM1_PORT, COM_PORT_LEN};
use crate::hypercall::{take_thread_calls, GuestFault, HYPERCALL_PORT};
use crate::metrics::{ExitKind, PortRange, VcpuMetrics};
use crate::vm::VmShared;

/// What to do with port I/O or MMIO that no device claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnhandledAccess {
    /// Reads return all-ones (an open bus), writes are dropped: what real hardware
    /// does and what guests probing for devices expect.
    Ignore,
    /// Stop the VM with an error naming the port or address.
    Stop,
}

impl UnhandledAccess {
    /// The decision for an access no device claims: go on, or stop with the
    /// reason `stop` builds (only built when it is needed).
    fn decide(self, stop: impl FnOnce() -> StopReason) -> ExitAction {
        match self {
            UnhandledAccess::Ignore => ExitAction::Continue,
            UnhandledAccess::Stop => ExitAction::Stop(stop()),
        }
    }
}

/// The direction of an I/O or MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
}

/// Serializes a u64 as a `"0x..."` string: JSON numbers lose precision above 2^53,
/// and guest addresses and registers use all 64 bits.
pub(crate) fn hex<S: serde::Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format!("{value:#x}"))
}

/// The general-purpose and control registers reported with a guest crash
/// (serialized as hex strings, see [`hex`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CrashRegisters {
    #[serde(serialize_with = "hex")]
    pub rip: u64,
    #[serde(serialize_with = "hex")]
    pub rsp: u64,
    #[serde(serialize_with = "hex")]
    pub rflags: u64,
    #[serde(serialize_with = "hex")]
    pub rax: u64,
    #[serde(serialize_with = "hex")]
    pub rbx: u64,
    #[serde(serialize_with = "hex")]
    pub rcx: u64,
    #[serde(serialize_with = "hex")]
    pub rdx: u64,
    #[serde(serialize_with = "hex")]
    pub rsi: u64,
    #[serde(serialize_with = "hex")]
    pub rdi: u64,
    #[serde(serialize_with = "hex")]
    pub rbp: u64,
    #[serde(serialize_with = "hex")]
    pub cr0: u64,
    #[serde(serialize_with = "hex")]
    pub cr2: u64,
    #[serde(serialize_with = "hex")]
    pub cr3: u64,
    #[serde(serialize_with = "hex")]
    pub cr4: u64,
    #[serde(serialize_with = "hex")]
    pub efer: u64,
    pub cs: u16,
    pub ss: u16,
    /// The registers are the architectural reset state, not the faulting
    /// state: on AMD SVM, KVM resets a vCPU on the SHUTDOWN intercept before
    /// user space can read it, so where the triple fault happened is lost.
    /// Intel VMX keeps the faulting state (this is then false).
    #[serde(rename = "resetState")]
    pub reset_state: bool,
}

impl CrashRegisters {
    /// Whether these registers are the x86 reset state (CS 0xf000, RIP 0xfff0,
    /// CR0 with only CD/NW/ET set), which no real crash leaves behind.
    pub fn looks_reset(&self) -> bool {
        self.rip == 0xfff0 && self.cs == 0xf000 && self.cr0 & 0x8000_0001 == 0 && self.efer == 0
    }
}

/// Why a vCPU stopped running. Serialized as `{"reason": "...", ...}` for the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum StopReason {
    /// The guest wrote to the debug-exit port.
    DebugExit {
        #[serde(rename = "exitCode")]
        exit_code: u32,
    },
    /// The guest made the EXIT hypercall.
    GuestExit { status: u32 },
    /// The guest reset the machine through the i8042 keyboard controller (what
    /// Linux's `reboot=k` does).
    Reset,
    /// The guest powered the machine off (port 0x604, QEMU's ACPI PM1a control).
    PowerOff,
    /// The guest took an exception and reported it through the FAULT hypercall.
    GuestFault(GuestFault),
    /// A malformed hypercall (bad request block address or access size).
    BadHypercall { message: String },
    /// The guest executed HLT with no interrupt controller to wake it.
    Hlt,
    /// Triple fault or another shutdown: the guest crashed.
    Shutdown { registers: CrashRegisters },
    /// Port I/O that no device claims, with the stop policy.
    UnhandledIo {
        port: u16,
        size: u8,
        direction: Direction,
        #[serde(serialize_with = "hex")]
        data: u64,
    },
    /// MMIO that no device claims, with the stop policy.
    UnhandledMmio {
        #[serde(serialize_with = "hex")]
        address: u64,
        size: u8,
        direction: Direction,
        #[serde(serialize_with = "hex")]
        data: u64,
    },
    /// KVM could not emulate something (KVM_EXIT_INTERNAL_ERROR).
    InternalError { suberror: u32 },
    /// VM entry failed (KVM_EXIT_FAIL_ENTRY).
    FailEntry {
        #[serde(rename = "hardwareReason", serialize_with = "hex")]
        hardware_reason: u64,
    },
    /// KVM reported a system event (reset, shutdown, crash).
    SystemEvent { event: u32 },
    /// An exit this VMM does not handle.
    UnexpectedExit { exit: String },
    /// The host asked the vCPU to stop.
    Stopped,
    /// The host's timeout ran out.
    TimedOut,
    /// The VMM failed while running the vCPU.
    Error { message: String },
}

impl StopReason {
    /// Whether this stop ends the whole VM (as opposed to a host-requested stop,
    /// which the host applies to every vCPU itself).
    pub fn ends_vm(&self) -> bool {
        !matches!(self, StopReason::Stopped | StopReason::TimedOut)
    }
}

/// The decision for one exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Continue,
    /// Stop this vCPU for `reason`.
    Stop(StopReason),
    /// The guest crashed; the caller adds the registers it can read.
    Crashed,
}

fn as_u64(data: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    let n = data.len().min(8);
    v[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(v)
}

/// The metrics range of a port.
fn port_range(port: u16) -> PortRange {
    match port {
        HYPERCALL_PORT => PortRange::Hypercall,
        DEBUG_EXIT_PORT => PortRange::DebugExit,
        p if (COM1_PORT..COM1_PORT + COM_PORT_LEN).contains(&p) => PortRange::Serial,
        _ => PortRange::Other,
    }
}

impl From<VmEvent> for StopReason {
    fn from(event: VmEvent) -> StopReason {
        match event {
            VmEvent::DebugExit(exit_code) => StopReason::DebugExit { exit_code },
            VmEvent::GuestExit(status) => StopReason::GuestExit { status },
            VmEvent::GuestFault(fault) => StopReason::GuestFault(fault),
            VmEvent::BadHypercall(message) => StopReason::BadHypercall { message },
            VmEvent::Reset => StopReason::Reset,
            VmEvent::PowerOff => StopReason::PowerOff,
        }
    }
}

/// After a device access: adds what the devices tallied on this thread
/// (console bytes, hypercalls) to the vCPU's metrics, and stops the vCPU when
/// a device raised a VM event.
fn after_access(vm: &VmShared, metrics: &VcpuMetrics) -> ExitAction {
    metrics.add_console(take_thread_tally());
    take_thread_calls(|kind| metrics.count_hypercall(kind));
    match vm.events.take() {
        Some(event) => ExitAction::Stop(event.into()),
        None => ExitAction::Continue,
    }
}

/// The width of one access of a port-I/O exit whose data is `len` bytes:
/// kvm-ioctls hands over `count * size` bytes (`count` > 1 for a string
/// instruction such as `rep outsb`) and the caller reads `size` from the run
/// page. A size that does not divide the data (never from KVM) makes the data
/// one access.
fn access_width(size: usize, len: usize) -> usize {
    if size == 0 || !len.is_multiple_of(size) {
        len.max(1)
    } else {
        size
    }
}

/// Handles one exit: dispatches I/O to devices and hypercalls, and turns
/// everything else into a decision. Counts the exit in `metrics`. `io_size` is
/// the size of one port access (`kvm_run.io.size`; see [`access_width`]),
/// ignored for other exits.
pub fn handle_exit(
    exit: VcpuExit<'_>,
    io_size: usize,
    vm: &VmShared,
    metrics: &VcpuMetrics,
) -> ExitAction {
    let unhandled = vm.unhandled;
    match exit {
        VcpuExit::IoOut(port, data) => {
            metrics.count(ExitKind::IoOut);
            metrics.count_port(true, port_range(port));
            let width = access_width(io_size, data.len());
            if vm.pio.write(u64::from(port), width, data, &vm.events) {
                return after_access(vm, metrics);
            }
            unhandled.decide(|| StopReason::UnhandledIo {
                port,
                size: width as u8,
                direction: Direction::Out,
                data: as_u64(&data[..width.min(data.len())]),
            })
        }
        VcpuExit::IoIn(port, data) => {
            metrics.count(ExitKind::IoIn);
            metrics.count_port(false, port_range(port));
            let width = access_width(io_size, data.len());
            if vm.pio.read(u64::from(port), width, data) {
                return after_access(vm, metrics);
            }
            data.fill(0xff);
            unhandled.decide(|| StopReason::UnhandledIo {
                port,
                size: width as u8,
                direction: Direction::In,
                data: 0,
            })
        }
        VcpuExit::MmioRead(address, data) => {
            metrics.count(ExitKind::MmioRead);
            let width = data.len();
            if vm.mmio.read(address, width, data) {
                return after_access(vm, metrics);
            }
            data.fill(0xff);
            unhandled.decide(|| StopReason::UnhandledMmio {
                address,
                size: data.len() as u8,
                direction: Direction::In,
                data: 0,
            })
        }
        VcpuExit::MmioWrite(address, data) => {
            metrics.count(ExitKind::MmioWrite);
            if vm.mmio.write(address, data.len(), data, &vm.events) {
                return after_access(vm, metrics);
            }
            unhandled.decide(|| StopReason::UnhandledMmio {
                address,
                size: data.len() as u8,
                direction: Direction::Out,
                data: as_u64(data),
            })
        }
        VcpuExit::Hlt => {
            metrics.count(ExitKind::Hlt);
            ExitAction::Stop(StopReason::Hlt)
        }
        VcpuExit::Shutdown => {
            metrics.count(ExitKind::Shutdown);
            ExitAction::Crashed
        }
        VcpuExit::InternalError => {
            metrics.count(ExitKind::InternalError);
            ExitAction::Stop(StopReason::InternalError { suberror: 0 })
        }
        VcpuExit::FailEntry(hardware_reason, _cpu) => {
            metrics.count(ExitKind::Other);
            ExitAction::Stop(StopReason::FailEntry { hardware_reason })
        }
        VcpuExit::SystemEvent(event, _data) => {
            metrics.count(ExitKind::Other);
            ExitAction::Stop(StopReason::SystemEvent { event })
        }
        VcpuExit::Intr => {
            metrics.count(ExitKind::Interrupted);
            ExitAction::Continue
        }
        // Only accesses the MSR filter denied reach the VMM (the capability is
        // enabled for KVM_MSR_EXIT_REASON_FILTER alone): refuse them, so the guest
        // takes #GP as on a CPU without that MSR.
        VcpuExit::X86Rdmsr(exit) => {
            metrics.count(ExitKind::MsrReadDenied);
            *exit.error = 1;
            ExitAction::Continue
        }
        VcpuExit::X86Wrmsr(exit) => {
            metrics.count(ExitKind::MsrWriteDenied);
            *exit.error = 1;
            ExitAction::Continue
        }
        other => {
            metrics.count(ExitKind::Other);
            ExitAction::Stop(StopReason::UnexpectedExit {
                exit: format!("{other:?}"),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    /// One exit whose I/O data is a single access (no string instruction).
    fn handle(exit: VcpuExit<'_>, vm: &VmShared, metrics: &VcpuMetrics) -> ExitAction {
        let size = match &exit {
            VcpuExit::IoOut(_, data) => data.len(),
            VcpuExit::IoIn(_, data) => data.len(),
            _ => 0,
        };
        handle_exit(exit, size, vm, metrics)
    }

    fn vm(unhandled: UnhandledAccess) -> VmShared {
        VmShared::new(GuestRam::new(1 << 20).unwrap(), unhandled).unwrap()
    }

    #[test]
    fn debug_exit_stops_with_qemu_code() {
        let m = VcpuMetrics::default();
        let action = handle(VcpuExit::IoOut(0xf4, &[3]), &vm(UnhandledAccess::Stop), &m);
        assert_eq!(
            action,
            ExitAction::Stop(StopReason::DebugExit { exit_code: 7 })
        );
        let s = m.snapshot();
        assert_eq!((s.io_out, s.io_out_by_port.debug_exit), (1, 1));
    }

    #[test]
    fn serial_output_reaches_the_console_and_counts_by_range() {
        let m = VcpuMetrics::default();
        let v = vm(UnhandledAccess::Stop);
        assert_eq!(
            handle(VcpuExit::IoOut(0x3f8, b"x"), &v, &m),
            ExitAction::Continue
        );
        assert_eq!(v.console.0.lock().unwrap().take(), b"x");
        assert_eq!(m.snapshot().io_out_by_port.serial, 1);
    }

    #[test]
    fn string_io_on_com1_moves_every_byte_in_order() {
        let m = VcpuMetrics::default();
        let v = vm(UnhandledAccess::Stop);
        // `rep outsb` of 5 bytes: one exit, count 5, size 1.
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f8, b"hello"), 1, &v, &m),
            ExitAction::Continue
        );
        assert_eq!(v.console.0.lock().unwrap().take(), b"hello");
        let s = m.snapshot();
        assert_eq!((s.io_out, s.console.bytes), (1, 5));
        // `rep insb` of 70 bytes: past the 64-byte FIFO, refilled on the way.
        let typed: Vec<u8> = (0..70u8).map(|i| b'0' + i % 10).collect();
        v.serial.lock().unwrap().enqueue_input(&typed).unwrap();
        let mut data = [0u8; 70];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x3f8, &mut data), 1, &v, &m),
            ExitAction::Continue
        );
        assert_eq!(data.to_vec(), typed);
        // A 2-byte `out` is one access of 2 bytes: the UART takes the low byte.
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f8, b"xy"), 2, &v, &m),
            ExitAction::Continue
        );
        assert_eq!(v.console.0.lock().unwrap().take(), b"x");
        // `rep outsb` to the debug-exit port stops at its first byte.
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0xf4, &[1, 2, 3]), 1, &v, &m),
            ExitAction::Stop(StopReason::DebugExit { exit_code: 3 })
        );
    }

    #[test]
    fn unhandled_io_follows_policy() {
        let m = VcpuMetrics::default();
        assert_eq!(
            handle(
                VcpuExit::IoOut(0x80, &[1, 2]),
                &vm(UnhandledAccess::Ignore),
                &m
            ),
            ExitAction::Continue
        );
        let stop = handle(
            VcpuExit::IoOut(0x80, &[1, 2]),
            &vm(UnhandledAccess::Stop),
            &m,
        );
        assert_eq!(
            stop,
            ExitAction::Stop(StopReason::UnhandledIo {
                port: 0x80,
                size: 2,
                direction: Direction::Out,
                data: 0x0201
            })
        );
        let mut data = [0u8; 4];
        assert_eq!(
            handle(
                VcpuExit::IoIn(0x2e8, &mut data),
                &vm(UnhandledAccess::Ignore),
                &m
            ),
            ExitAction::Continue
        );
        assert_eq!(data, [0xff; 4], "open bus reads all-ones");
        assert_eq!(m.snapshot().io_out_by_port.other, 2);
    }

    #[test]
    fn hypercalls_are_dispatched_and_counted() {
        let m = VcpuMetrics::default();
        let v = vm(UnhandledAccess::Stop);
        let mut block = [0u8; 48];
        block[0] = 6; // NOP
        v.ram.write(0x1000, &block).unwrap();
        let addr = 0x1000u32.to_le_bytes();
        assert_eq!(
            handle(VcpuExit::IoOut(0x510, &addr), &v, &m),
            ExitAction::Continue
        );
        block[0] = 2; // EXIT(9)
        block[8] = 9;
        v.ram.write(0x1000, &block).unwrap();
        assert_eq!(
            handle(VcpuExit::IoOut(0x510, &addr), &v, &m),
            ExitAction::Stop(StopReason::GuestExit { status: 9 })
        );
        let bad = handle(VcpuExit::IoOut(0x510, &[0]), &v, &m);
        assert!(matches!(
            bad,
            ExitAction::Stop(StopReason::BadHypercall { .. })
        ));
        let s = m.snapshot();
        assert_eq!(
            (s.hypercalls.nop, s.hypercalls.exit, s.hypercalls.invalid),
            (1, 1, 1)
        );
        assert_eq!(s.io_out_by_port.hypercall, 3);
    }

    #[test]
    fn mmio_follows_policy() {
        let m = VcpuMetrics::default();
        let mut data = [0u8; 4];
        let a = handle(
            VcpuExit::MmioRead(0xfee0_0000, &mut data),
            &vm(UnhandledAccess::Stop),
            &m,
        );
        assert!(matches!(
            a,
            ExitAction::Stop(StopReason::UnhandledMmio {
                address: 0xfee0_0000,
                ..
            })
        ));
        let a = handle(
            VcpuExit::MmioWrite(0xd000_0000, &[1]),
            &vm(UnhandledAccess::Ignore),
            &m,
        );
        assert_eq!(a, ExitAction::Continue);
    }

    #[test]
    fn the_reset_state_is_told_apart_from_a_crash() {
        let mut r = CrashRegisters {
            rip: 0xfff0,
            cs: 0xf000,
            cr0: 0x6000_0010,
            ..Default::default()
        };
        assert!(r.looks_reset());
        r.cr0 = 0x8005_0033; // paging on: a real crash in a kernel
        assert!(!r.looks_reset());
    }

    #[test]
    fn hlt_shutdown_and_errors_stop() {
        let m = VcpuMetrics::default();
        let v = vm(UnhandledAccess::Stop);
        assert_eq!(
            handle(VcpuExit::Hlt, &v, &m),
            ExitAction::Stop(StopReason::Hlt)
        );
        assert_eq!(handle(VcpuExit::Shutdown, &v, &m), ExitAction::Crashed);
        assert!(matches!(
            handle(VcpuExit::FailEntry(0x21, 0), &v, &m),
            ExitAction::Stop(StopReason::FailEntry {
                hardware_reason: 0x21
            })
        ));
        assert_eq!(handle(VcpuExit::Intr, &v, &m), ExitAction::Continue);
        let s = m.snapshot();
        assert_eq!((s.hlt, s.shutdown, s.other, s.interrupted), (1, 1, 1, 1));
    }

    #[test]
    fn i8042_reset_and_power_off_stop_the_vm() {
        let m = VcpuMetrics::default();
        let v = vm(UnhandledAccess::Stop);
        assert_eq!(
            handle(VcpuExit::IoOut(0x64, &[0xfe]), &v, &m),
            ExitAction::Stop(StopReason::Reset)
        );
        assert_eq!(
            handle(VcpuExit::IoOut(0x604, &0x2000u16.to_le_bytes()), &v, &m),
            ExitAction::Stop(StopReason::PowerOff)
        );
        let json = serde_json::to_string(&StopReason::PowerOff).unwrap();
        assert_eq!(json, r#"{"reason":"power_off"}"#);
        assert!(StopReason::Reset.ends_vm());
    }

    #[test]
    fn stop_reasons_serialize_with_a_reason_tag() {
        let json = serde_json::to_string(&StopReason::DebugExit { exit_code: 3 }).unwrap();
        assert_eq!(json, r#"{"reason":"debug_exit","exitCode":3}"#);
        let json = serde_json::to_string(&StopReason::UnhandledMmio {
            address: u64::MAX,
            size: 4,
            direction: Direction::Out,
            data: 1,
        })
        .unwrap();
        assert!(json.contains(r#""address":"0xffffffffffffffff""#), "{json}");
        let json = serde_json::to_string(&StopReason::GuestFault(GuestFault {
            vector: 14,
            error_code: 2,
            address: 0x1000,
            rip: 0x100000,
        }))
        .unwrap();
        assert_eq!(
            json,
            r#"{"reason":"guest_fault","vector":14,"errorCode":2,"address":"0x1000","rip":"0x100000"}"#
        );
        assert!(!StopReason::TimedOut.ends_vm());
        assert!(StopReason::Hlt.ends_vm());
    }
}
