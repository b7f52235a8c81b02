//! Every core error's ABI status, in one place: the per-module error enums
//! (`BusError`, `VirtioError`, `KsmError`, `CpuidError`...) reach the ABI
//! wrapped in [`Error`], and this is the only match that turns them into the
//! stable numbers callers branch on.

use crate::error::{Error, Status};
use crate::ksm::KsmError;

/// The ABI status of `e`.
pub(crate) fn status(e: &Error) -> Status {
    match e {
        Error::InvalidArgument(_) => Status::InvalidArgument,
        Error::InvalidHandle { .. } => Status::InvalidHandle,
        Error::KvmUnavailable(_) => Status::KvmUnavailable,
        Error::Kvm { .. } => Status::Kvm,
        Error::Memory(_) => Status::Memory,
        Error::Image(_) => Status::Image,
        Error::Busy(_) => Status::Busy,
        Error::Timeout(_) => Status::Timeout,
        Error::Panic(_) => Status::Panic,
        Error::BufferTooSmall { .. } => Status::BufferTooSmall,
        Error::Io { .. } => Status::Io,
        Error::Initrd(_) => Status::Initrd,
        Error::CmdlineTooLong(_) => Status::CmdlineTooLong,
        Error::DoesNotFit(_) => Status::DoesNotFit,
        Error::VcpuLimit(_) => Status::VcpuLimit,
        Error::Bus(_) | Error::Cpuid(_) | Error::MsrPolicy(_) | Error::State(_) => {
            Status::InvalidArgument
        }
        Error::Device(_) => Status::Device,
        Error::Ksm(KsmError::Unsupported(_)) => Status::KsmUnavailable,
        Error::Ksm(KsmError::Madvise { .. }) => Status::Memory,
        Error::Ksm(KsmError::Read { .. } | KsmError::Malformed { .. }) => Status::Io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_a_negative_status() {
        let errors = [
            Error::arg("x"),
            Error::InvalidHandle {
                handle: 1,
                expected: "VM",
            },
            Error::Timeout(5),
            Error::BufferTooSmall { need: 2, got: 1 },
            Error::Initrd("x".into()),
            Error::CmdlineTooLong("x".into()),
            Error::DoesNotFit("x".into()),
            Error::VcpuLimit("x".into()),
            Error::Device(crate::virtio::VirtioError::Attach("x".into())),
            Error::Ksm(KsmError::Unsupported(std::io::Error::from_raw_os_error(
                libc::EINVAL,
            ))),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for e in errors {
            assert!((status(&e) as i32) < 0, "{e}");
            assert!(seen.insert(status(&e) as i32), "distinct: {e}");
        }
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
}
