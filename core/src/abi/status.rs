//! Every core error's ABI status, in one place: each module's error enum
//! (`MemoryError`, `BootError` and its loaders', `VcpuError`, `VmError`,
//! `IrqError`, `BusError`, `VirtioError`, `KsmError`, `CpuidError`...) reaches
//! the ABI wrapped in [`Error`], and the matches below are the only code that
//! turns them into the stable numbers callers branch on.

use crate::boot::acpi::AcpiError;
use crate::boot::linux::LinuxError;
use crate::boot::BootError;
use crate::dirty::DirtyError;
use crate::error::{Error, Status};
use crate::irq::IrqError;
use crate::ksm::KsmError;
use crate::memory::MemoryError;
use crate::migration::MigrationError;
use crate::snapshot::SnapshotError;
use crate::vcpu::VcpuError;
use crate::vm::VmError;

/// The ABI status of `e`.
pub(crate) fn status(e: &Error) -> Status {
    match e {
        Error::InvalidArgument(_) => Status::InvalidArgument,
        Error::InvalidHandle { .. } => Status::InvalidHandle,
        Error::Busy(_) => Status::Busy,
        Error::Panic(_) => Status::Panic,
        Error::BufferTooSmall { .. } => Status::BufferTooSmall,
        Error::Io { .. } => Status::Io,
        Error::Memory(e) => memory(e),
        Error::Boot(e) => boot(e),
        Error::Vcpu(e) => vcpu(e),
        Error::Vm(e) => vm(e),
        Error::Irq(e) => irq(e),
        Error::Bus(_) | Error::Cpuid(_) | Error::MsrPolicy(_) | Error::State(_) => {
            Status::InvalidArgument
        }
        // A paused device takes no runtime request until the VM resumes.
        Error::Device(crate::virtio::VirtioError::Paused) => Status::Busy,
        // A running device is not handed over until the VM pauses.
        Error::Device(crate::virtio::VirtioError::Running) => Status::Busy,
        Error::Device(_) => Status::Device,
        Error::Snapshot(e) => snapshot(e),
        Error::Ksm(KsmError::Unsupported(_)) => Status::KsmUnavailable,
        Error::Ksm(KsmError::Madvise { .. }) => Status::Memory,
        Error::Ksm(KsmError::Read { .. } | KsmError::Malformed { .. }) => Status::Io,
        Error::Migration(e) => migration(e),
        Error::Function(e) => function(e),
    }
}

/// A VM in use is busy; a VM not at READY or not checkpointed is the caller's
/// argument; the host failing is memory's.
fn function(e: &crate::function::FunctionError) -> Status {
    use crate::function::FunctionError as F;
    match e {
        F::Running => Status::Busy,
        F::NotReady(_) | F::NoCheckpoint | F::NoVcpus | F::TooLarge => Status::InvalidArgument,
        F::Host { .. } => Status::Memory,
    }
}

/// A socket that fails, is cut or times out is I/O; a stream that breaks the
/// protocol (corrupt, oversized, a page outside RAM) is a refused argument.
fn migration(e: &MigrationError) -> Status {
    match e {
        MigrationError::TimedOut(_) => Status::Timeout,
        MigrationError::Io { .. } | MigrationError::Closed | MigrationError::Truncated { .. } => {
            Status::Io
        }
        _ => Status::InvalidArgument,
    }
}

/// A running VM is busy; KVM refusing a state is KVM's; a state that does not
/// fit the VM is the caller's argument.
fn snapshot(e: &SnapshotError) -> Status {
    match e {
        SnapshotError::NotPaused(_) => Status::Busy,
        SnapshotError::Kvm { .. } => Status::Kvm,
        SnapshotError::Refused { .. } => Status::InvalidArgument,
        SnapshotError::Invalid { .. } => Status::SnapshotInvalid,
        SnapshotError::WrongHost(_) => Status::SnapshotWrongHost,
        SnapshotError::Io { .. } => Status::Io,
    }
}

/// A bad RAM size is the caller's argument; the rest is guest memory failing.
fn memory(e: &MemoryError) -> Status {
    match e {
        MemoryError::ZeroSize | MemoryError::UnalignedSize(_) | MemoryError::TooLarge(_) => {
            Status::InvalidArgument
        }
        MemoryError::Map { .. }
        | MemoryError::OutsideRam { .. }
        | MemoryError::Access { .. }
        | MemoryError::Zero { .. }
        | MemoryError::DontDump { .. } => Status::Memory,
        MemoryError::FileStat { .. } => Status::Io,
        MemoryError::FileSize { .. } => Status::SnapshotInvalid,
    }
}

fn boot(e: &BootError) -> Status {
    match e {
        BootError::EntryMode(_) | BootError::MpTable(_) => Status::InvalidArgument,
        BootError::EmptyImage
        | BootError::NoRoomForBootStructures
        | BootError::RealModeEntry(_)
        | BootError::Elf(_)
        | BootError::BzImage(_) => Status::Image,
        BootError::Initrd(_) => Status::Initrd,
        BootError::Linux(e) => linux(e),
        BootError::Acpi(AcpiError::Write(e)) => memory(e),
        BootError::Acpi(
            AcpiError::CpuCount(_) | AcpiError::TooLarge(_) | AcpiError::AmlTooLong(_),
        ) => Status::InvalidArgument,
        BootError::Memory(e) => memory(e),
    }
}

/// What the CLI tells apart: a malformed kernel (`Image`), one that needs more
/// RAM (`DoesNotFit`) and a command line too long (`CmdlineTooLong`).
fn linux(e: &LinuxError) -> Status {
    match e {
        LinuxError::NotAKernel
        | LinuxError::ElfEntry(_)
        | LinuxError::Overflow { .. }
        | LinuxError::BelowOneMib { .. }
        | LinuxError::PastMmioGap { .. }
        | LinuxError::CmdlineNul
        | LinuxError::NoRoomForAcpi { .. } => Status::Image,
        LinuxError::DoesNotFit { .. }
        | LinuxError::InitrdLargerThanRam { .. }
        | LinuxError::InitrdDoesNotFit { .. } => Status::DoesNotFit,
        LinuxError::CmdlineTooLong { .. } | LinuxError::CmdlineArea(_) => Status::CmdlineTooLong,
    }
}

fn vcpu(e: &VcpuError) -> Status {
    match e {
        VcpuError::Running(_)
        | VcpuError::AlreadyRunning(_)
        | VcpuError::Closed(_)
        | VcpuError::DidNotStop { .. } => Status::Busy,
        VcpuError::NeverStarted(_) | VcpuError::KickHandler(_) => Status::InvalidArgument,
        VcpuError::Kvm { .. } => Status::Kvm,
        VcpuError::Spawn(_) => Status::Io,
        VcpuError::EntryOutsideRam { .. } => Status::Image,
        VcpuError::Boot(e) => boot(e),
    }
}

fn vm(e: &VmError) -> Status {
    match e {
        VmError::Open { .. } | VmError::ApiVersion(_) => Status::KvmUnavailable,
        VmError::Kvm { .. } => Status::Kvm,
        VmError::IrqchipAfterVcpu
        | VmError::NoIrqchip(_)
        | VmError::NoVcpus
        | VmError::DeviceName(_)
        | VmError::NoSuchDevice(_) => Status::InvalidArgument,
        VmError::VcpuLimit(_) => Status::VcpuLimit,
        VmError::PauseTimeout { .. } | VmError::AlreadyRunning => Status::Busy,
        VmError::DeviceQuiesce { .. } => Status::Timeout,
        // Another process holds a disk image, a running device, an I/O error.
        VmError::HandOver { .. } => Status::Device,
        VmError::Dirty(DirtyError::Kvm { .. }) => Status::Kvm,
        VmError::Dirty(DirtyError::NotTracking | DirtyError::Size { .. }) => {
            Status::InvalidArgument
        }
    }
}

fn irq(e: &IrqError) -> Status {
    match e {
        IrqError::Kvm { .. } => Status::Kvm,
        IrqError::NoSuchLine(_) | IrqError::MsiAddress(_) => Status::InvalidArgument,
        IrqError::EventFd { .. } => Status::Io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::bzimage::BzImageError;
    use crate::boot::elf::ElfError;
    use crate::boot::initrd::InitrdError;
    use crate::boot::mptable::MpTableError;

    fn kvm_error() -> kvm_ioctls::Error {
        kvm_ioctls::Error::new(libc::EINVAL)
    }

    fn io_error() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::EINVAL)
    }

    #[test]
    fn every_error_maps_to_a_negative_status() {
        let errors = [
            Error::arg("x"),
            Error::InvalidHandle {
                handle: 1,
                expected: "VM",
            },
            Error::BufferTooSmall { need: 2, got: 1 },
            Error::Device(crate::virtio::VirtioError::Attach("x".into())),
            Error::Ksm(KsmError::Unsupported(io_error())),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for e in errors {
            assert!((status(&e) as i32) < 0, "{e}");
            assert!(seen.insert(status(&e) as i32), "distinct: {e}");
        }
    }

    #[test]
    fn a_request_to_a_paused_device_is_busy() {
        let paused = Error::Device(crate::virtio::VirtioError::Paused);
        assert_eq!(status(&paused), Status::Busy);
        let other = Error::Device(crate::virtio::VirtioError::Unsupported("x".into()));
        assert_eq!(status(&other), Status::Device);
    }

    #[test]
    fn snapshot_errors_map_by_kind() {
        let not_paused = SnapshotError::NotPaused("vcpu 0 has not parked yet".into());
        assert_eq!(status(&not_paused.into()), Status::Busy);
        let kvm = SnapshotError::kvm("vcpu 1 xsave", "KVM_SET_XSAVE")(kvm_ioctls::Error::new(
            libc::EINVAL,
        ));
        assert_eq!(status(&kvm.into()), Status::Kvm);
        let refused = SnapshotError::refused("vm", "the state has 2 vCPUs, the VM 1");
        assert_eq!(status(&refused.into()), Status::InvalidArgument);
    }

    #[test]
    fn policy_errors_are_invalid_arguments() {
        use crate::cpuid::CpuidError;
        use crate::msr_filter::MsrPolicyError;
        assert_eq!(
            status(&CpuidError::TooMany(9).into()),
            Status::InvalidArgument
        );
        assert_eq!(
            status(&MsrPolicyError::Both(1).into()),
            Status::InvalidArgument
        );
    }

    /// Asserts each error's status, through the conversions the core's `?` uses.
    fn assert_statuses(cases: Vec<(Error, Status)>) {
        for (e, want) in cases {
            assert_eq!(status(&e), want, "{e:?}");
        }
    }

    #[test]
    fn memory_errors_map_to_invalid_argument_or_memory() {
        let outside = || MemoryError::OutsideRam {
            addr: 0,
            len: 1,
            size: 0,
        };
        assert_statuses(vec![
            (MemoryError::ZeroSize.into(), Status::InvalidArgument),
            (
                MemoryError::UnalignedSize(1).into(),
                Status::InvalidArgument,
            ),
            (
                MemoryError::TooLarge(1 << 41).into(),
                Status::InvalidArgument,
            ),
            (outside().into(), Status::Memory),
            (
                MemoryError::Zero {
                    start: 0,
                    end: 4096,
                    source: io_error(),
                }
                .into(),
                Status::Memory,
            ),
            // Wherever guest memory fails, it stays a memory failure.
            (BootError::from(outside()).into(), Status::Memory),
            (
                BootError::from(AcpiError::Write(outside())).into(),
                Status::Memory,
            ),
        ]);
    }

    #[test]
    fn boot_errors_map_to_image_initrd_and_invalid_argument() {
        assert_statuses(vec![
            (BootError::EntryMode(3).into(), Status::InvalidArgument),
            (BootError::EmptyImage.into(), Status::Image),
            (BootError::NoRoomForBootStructures.into(), Status::Image),
            (BootError::RealModeEntry(1 << 20).into(), Status::Image),
            (BootError::from(ElfError::BadMagic).into(), Status::Image),
            (BootError::from(BzImageError::NoMagic).into(), Status::Image),
            (
                BootError::from(InitrdError::AllZero(1)).into(),
                Status::Initrd,
            ),
            (
                BootError::from(MpTableError::CpuCount(0)).into(),
                Status::InvalidArgument,
            ),
            (
                BootError::from(AcpiError::CpuCount(0)).into(),
                Status::InvalidArgument,
            ),
        ]);
    }

    #[test]
    fn linux_errors_map_to_image_does_not_fit_and_cmdline_too_long() {
        let span = |what: &str| (0x20_0000, 0x30_0000, what.to_string(), 0x10_0000);
        let (start, end, what, low_end) = span("x");
        assert_statuses(
            vec![
                (LinuxError::NotAKernel, Status::Image),
                (LinuxError::ElfEntry(0), Status::Image),
                (
                    LinuxError::Overflow {
                        pref_address: u64::MAX,
                        init_size: 1,
                    },
                    Status::Image,
                ),
                (
                    LinuxError::BelowOneMib {
                        start: 0,
                        end,
                        what: what.clone(),
                    },
                    Status::Image,
                ),
                (
                    LinuxError::PastMmioGap {
                        start,
                        end,
                        what: what.clone(),
                        low_end,
                    },
                    Status::Image,
                ),
                (LinuxError::CmdlineNul, Status::Image),
                (
                    LinuxError::NoRoomForAcpi {
                        ram_size: 0,
                        address: 0xe0000,
                    },
                    Status::Image,
                ),
                (
                    LinuxError::DoesNotFit {
                        start,
                        end,
                        what,
                        low_end,
                    },
                    Status::DoesNotFit,
                ),
                (
                    LinuxError::InitrdLargerThanRam {
                        len: 2,
                        ram_size: 1,
                    },
                    Status::DoesNotFit,
                ),
                (
                    LinuxError::InitrdDoesNotFit {
                        len: 2,
                        kernel_end: 1,
                        top: 2,
                    },
                    Status::DoesNotFit,
                ),
                (
                    LinuxError::CmdlineTooLong {
                        len: 256,
                        cmdline_size: 255,
                    },
                    Status::CmdlineTooLong,
                ),
                (LinuxError::CmdlineArea(4096), Status::CmdlineTooLong),
            ]
            .into_iter()
            .map(|(e, s)| (BootError::from(e).into(), s))
            .collect(),
        );
    }

    #[test]
    fn vcpu_errors_map_to_busy_kvm_io_image_and_invalid_argument() {
        assert_statuses(vec![
            (VcpuError::Running(0).into(), Status::Busy),
            (VcpuError::AlreadyRunning(0).into(), Status::Busy),
            (VcpuError::Closed(0).into(), Status::Busy),
            (VcpuError::DidNotStop { id: 0, ms: 5 }.into(), Status::Busy),
            (VcpuError::NeverStarted(0).into(), Status::InvalidArgument),
            (
                VcpuError::KickHandler("x".into()).into(),
                Status::InvalidArgument,
            ),
            (
                VcpuError::Kvm {
                    op: "KVM_GET_REGS",
                    source: kvm_error(),
                }
                .into(),
                Status::Kvm,
            ),
            (VcpuError::Spawn(io_error()).into(), Status::Io),
            (
                VcpuError::EntryOutsideRam {
                    entry: 1 << 30,
                    ram_size: 1 << 20,
                }
                .into(),
                Status::Image,
            ),
            (
                VcpuError::from(BootError::RealModeEntry(1 << 20)).into(),
                Status::Image,
            ),
        ]);
    }

    #[test]
    fn vm_errors_map_to_their_statuses() {
        assert_statuses(vec![
            (
                VmError::Open {
                    source: kvm_ioctls::Error::new(libc::ENOENT),
                }
                .into(),
                Status::KvmUnavailable,
            ),
            (VmError::ApiVersion(11).into(), Status::KvmUnavailable),
            (
                VmError::Kvm {
                    op: "KVM_CREATE_VM",
                    source: kvm_error(),
                }
                .into(),
                Status::Kvm,
            ),
            (VmError::IrqchipAfterVcpu.into(), Status::InvalidArgument),
            (VmError::NoIrqchip("x").into(), Status::InvalidArgument),
            (VmError::NoVcpus.into(), Status::InvalidArgument),
            (VmError::AlreadyRunning.into(), Status::Busy),
            (
                VmError::DeviceName(String::new()).into(),
                Status::InvalidArgument,
            ),
            (
                VmError::NoSuchDevice("x".into()).into(),
                Status::InvalidArgument,
            ),
            (VmError::VcpuLimit(1).into(), Status::VcpuLimit),
            (VmError::PauseTimeout { id: 0, ms: 5 }.into(), Status::Busy),
        ]);
    }

    #[test]
    fn irq_errors_map_to_kvm_io_and_invalid_argument() {
        assert_statuses(vec![
            (
                IrqError::Kvm {
                    op: "KVM_IRQ_LINE",
                    source: kvm_error(),
                }
                .into(),
                Status::Kvm,
            ),
            (IrqError::NoSuchLine(24).into(), Status::InvalidArgument),
            (IrqError::MsiAddress(0).into(), Status::InvalidArgument),
            (
                IrqError::EventFd {
                    op: "x",
                    source: io_error(),
                }
                .into(),
                Status::Io,
            ),
        ]);
    }

    #[test]
    fn messages_are_the_ones_users_saw_before_the_enums() {
        let cases: Vec<(Error, &str)> = vec![
            (
                VmError::Open {
                    source: kvm_ioctls::Error::new(libc::ENOENT),
                }
                .into(),
                "cannot open /dev/kvm: No such file or directory (os error 2) (no such device: is the kvm module loaded?)",
            ),
            (
                VmError::VcpuLimit(4).into(),
                "a VM on this host has at most 4 vCPUs",
            ),
            (
                VcpuError::Running(1).into(),
                "vCPU 1 is running; stop it before touching its registers",
            ),
            (
                BootError::from(BzImageError::SyssizeZero).into(),
                "image: syssize is 0: the header declares no protected-mode kernel",
            ),
            (
                BootError::from(LinuxError::CmdlineArea(65536)).into(),
                "the command line is 65536 bytes; at most 65535 fit at 0x20000",
            ),
            (
                BootError::EntryMode(3).into(),
                "entry mode 3 is not one of 0 (real), 1 (long), 2 (user)",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
        }
    }

    #[test]
    fn a_cut_or_silent_stream_is_io_and_a_corrupt_one_a_refused_argument() {
        use crate::migration::wire::FrameKind;
        let cases = [
            (
                MigrationError::Truncated {
                    what: "frame payload",
                    got: 1,
                    want: 2,
                },
                Status::Io,
            ),
            (MigrationError::Closed, Status::Io),
            (MigrationError::TimedOut("reading"), Status::Timeout),
            (
                MigrationError::Checksum {
                    kind: FrameKind::Pages,
                    want: 1,
                    got: 2,
                },
                Status::InvalidArgument,
            ),
            (
                MigrationError::PageOutOfRange { index: 9, pages: 1 },
                Status::InvalidArgument,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(status(&Error::from(e)), want);
        }
    }
}
