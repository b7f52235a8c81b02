//! One KVM exit in, one decision out.
//!
//! [`handle_exit`] is a free function of the exit and the VM's devices, returning a
//! small enum, in the style of Firecracker's `handle_kvm_exit`: the vCPU loop stays
//! trivial and every exit kind is unit-tested with synthetic exits, without KVM.

use kvm_ioctls::VcpuExit;
use serde::Serialize;

use crate::devices::bus::{DeviceAction, PioBus};
use crate::metrics::{ExitKind, VcpuMetrics};

/// What to do with port I/O or MMIO that no device claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnhandledAccess {
    /// Reads return all-ones (an open bus), writes are dropped: what real hardware
    /// does and what guests probing for devices expect.
    Ignore,
    /// Stop the VM with an error naming the port or address.
    Stop,
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
fn hex<S: serde::Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
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

/// Handles one exit: dispatches I/O to devices and turns everything else into a
/// decision. Counts the exit in `metrics`.
pub fn handle_exit(
    exit: VcpuExit<'_>,
    bus: &PioBus,
    unhandled: UnhandledAccess,
    metrics: &VcpuMetrics,
) -> ExitAction {
    match exit {
        VcpuExit::IoOut(port, data) => {
            metrics.count(ExitKind::IoOut);
            match bus.write(port, data) {
                Some(DeviceAction::Continue) => ExitAction::Continue,
                Some(DeviceAction::Exit(code)) => {
                    ExitAction::Stop(StopReason::DebugExit { exit_code: code })
                }
                None if unhandled == UnhandledAccess::Ignore => ExitAction::Continue,
                None => ExitAction::Stop(StopReason::UnhandledIo {
                    port,
                    size: data.len() as u8,
                    direction: Direction::Out,
                    data: as_u64(data),
                }),
            }
        }
        VcpuExit::IoIn(port, data) => {
            metrics.count(ExitKind::IoIn);
            if bus.read(port, data) {
                return ExitAction::Continue;
            }
            data.fill(0xff);
            match unhandled {
                UnhandledAccess::Ignore => ExitAction::Continue,
                UnhandledAccess::Stop => ExitAction::Stop(StopReason::UnhandledIo {
                    port,
                    size: data.len() as u8,
                    direction: Direction::In,
                    data: 0,
                }),
            }
        }
        VcpuExit::MmioRead(address, data) => {
            metrics.count(ExitKind::MmioRead);
            data.fill(0xff);
            match unhandled {
                UnhandledAccess::Ignore => ExitAction::Continue,
                UnhandledAccess::Stop => ExitAction::Stop(StopReason::UnhandledMmio {
                    address,
                    size: data.len() as u8,
                    direction: Direction::In,
                    data: 0,
                }),
            }
        }
        VcpuExit::MmioWrite(address, data) => {
            metrics.count(ExitKind::MmioWrite);
            match unhandled {
                UnhandledAccess::Ignore => ExitAction::Continue,
                UnhandledAccess::Stop => ExitAction::Stop(StopReason::UnhandledMmio {
                    address,
                    size: data.len() as u8,
                    direction: Direction::Out,
                    data: as_u64(data),
                }),
            }
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
    use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_PORT};
    use std::sync::{Arc, Mutex};

    fn bus() -> PioBus {
        let mut bus = PioBus::default();
        bus.insert(DEBUG_EXIT_PORT, 1, Arc::new(Mutex::new(DebugExit)))
            .unwrap();
        bus
    }

    #[test]
    fn debug_exit_stops_with_qemu_code() {
        let m = VcpuMetrics::default();
        let action = handle_exit(
            VcpuExit::IoOut(0xf4, &[3]),
            &bus(),
            UnhandledAccess::Stop,
            &m,
        );
        assert_eq!(
            action,
            ExitAction::Stop(StopReason::DebugExit { exit_code: 7 })
        );
        assert_eq!(m.snapshot().io_out, 1);
    }

    #[test]
    fn unhandled_io_follows_policy() {
        let m = VcpuMetrics::default();
        let b = bus();
        assert_eq!(
            handle_exit(
                VcpuExit::IoOut(0x80, &[1, 2]),
                &b,
                UnhandledAccess::Ignore,
                &m
            ),
            ExitAction::Continue
        );
        let stop = handle_exit(
            VcpuExit::IoOut(0x80, &[1, 2]),
            &b,
            UnhandledAccess::Stop,
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
            handle_exit(
                VcpuExit::IoIn(0x71, &mut data),
                &b,
                UnhandledAccess::Ignore,
                &m
            ),
            ExitAction::Continue
        );
        assert_eq!(data, [0xff; 4], "open bus reads all-ones");
    }

    #[test]
    fn mmio_follows_policy() {
        let m = VcpuMetrics::default();
        let mut data = [0u8; 4];
        let a = handle_exit(
            VcpuExit::MmioRead(0xfee0_0000, &mut data),
            &bus(),
            UnhandledAccess::Stop,
            &m,
        );
        assert!(matches!(
            a,
            ExitAction::Stop(StopReason::UnhandledMmio {
                address: 0xfee0_0000,
                ..
            })
        ));
        let a = handle_exit(
            VcpuExit::MmioWrite(0xd000_0000, &[1]),
            &bus(),
            UnhandledAccess::Ignore,
            &m,
        );
        assert_eq!(a, ExitAction::Continue);
    }

    #[test]
    fn hlt_shutdown_and_errors_stop() {
        let m = VcpuMetrics::default();
        let b = bus();
        assert_eq!(
            handle_exit(VcpuExit::Hlt, &b, UnhandledAccess::Stop, &m),
            ExitAction::Stop(StopReason::Hlt)
        );
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &b, UnhandledAccess::Stop, &m),
            ExitAction::Crashed
        );
        assert!(matches!(
            handle_exit(VcpuExit::FailEntry(0x21, 0), &b, UnhandledAccess::Stop, &m),
            ExitAction::Stop(StopReason::FailEntry {
                hardware_reason: 0x21
            })
        ));
        assert_eq!(
            handle_exit(VcpuExit::Intr, &b, UnhandledAccess::Stop, &m),
            ExitAction::Continue
        );
        let s = m.snapshot();
        assert_eq!((s.hlt, s.shutdown, s.other, s.interrupted), (1, 1, 1, 1));
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
        assert!(!StopReason::TimedOut.ends_vm());
        assert!(StopReason::Hlt.ends_vm());
    }
}
