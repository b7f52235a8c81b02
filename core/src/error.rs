//! The one error type of the core, and the status codes it maps to at the C ABI.
//!
//! Every error carries a stable numeric [`Status`] (what a caller branches on) and a
//! human-readable message (what a person reads). The doc comment of each variant is
//! its message, in the style of Firecracker's error enums.

use thiserror::Error;

/// Declares [`Status`] and its table [`Status::ALL`] from one list, so the
/// contract (`crate::contract`) sees every status by construction.
macro_rules! statuses {
    ($($(#[doc = $doc:literal])+ $name:ident = $value:literal,)+) => {
        /// Stable status codes returned by every `dv_*` function. `Ok` is 0; errors are
        /// negative so that functions returning a length can use non-negative values.
        /// The TypeScript side reads this table from `src/_contract.generated.ts`
        /// (`deno task contract` writes it; see `crate::contract`).
        #[repr(i32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Status {
            $($(#[doc = $doc])+ $name = $value,)+
        }

        impl Status {
            /// Every status, in declaration order.
            pub const ALL: &'static [Status] = &[$(Status::$name,)+];

            /// The variant's name (`"InvalidArgument"`).
            pub fn name(self) -> &'static str {
                match self {
                    $(Status::$name => stringify!($name),)+
                }
            }

            /// What the status means, from its doc comment.
            pub fn summary(self) -> &'static str {
                match self {
                    $(Status::$name => concat!($($doc),+).trim_ascii(),)+
                }
            }
        }
    };
}

statuses! {
    /// Success
    Ok = 0,
    /// An argument is out of range, malformed or inconsistent
    InvalidArgument = -1,
    /// A handle is stale, closed or of another kind
    InvalidHandle = -2,
    /// /dev/kvm cannot be opened or speaks another API
    KvmUnavailable = -3,
    /// A KVM ioctl failed
    Kvm = -4,
    /// Guest memory could not be created, read or written
    Memory = -5,
    /// The guest image is malformed or does not fit
    Image = -6,
    /// The object is in use by a running vCPU
    Busy = -7,
    /// A wait ran out of time
    Timeout = -8,
    /// A panic was caught at the ABI boundary
    Panic = -9,
    /// The caller's buffer is too small (the size needed is in the out length)
    BufferTooSmall = -10,
    /// Host I/O failed
    Io = -11,
    /// The initrd is truncated or not an initramfs the kernel accepts
    Initrd = -12,
    /// The kernel command line is longer than the kernel accepts
    CmdlineTooLong = -13,
    /// The kernel or initrd does not fit in guest RAM
    DoesNotFit = -14,
    /// More vCPUs than the host's KVM allows
    VcpuLimit = -15,
    /// A virtio device cannot be configured, attached or asked
    Device = -16,
    /// Memory deduplication (KSM) is not available in this kernel
    KsmUnavailable = -17,
}

/// Everything that can go wrong inside the core.
#[derive(Debug, Error)]
pub enum Error {
    /// {0}
    #[error("{0}")]
    InvalidArgument(String),
    /// Handle {handle} is not a live {expected} (it is stale, closed or of another kind)
    #[error("handle {handle} is not a live {expected} (it is stale, closed or of another kind)")]
    InvalidHandle { handle: u32, expected: &'static str },
    /// Cannot open /dev/kvm: {0}
    #[error("cannot open /dev/kvm: {0}")]
    KvmUnavailable(String),
    /// A KVM ioctl failed
    #[error("{op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    /// Guest memory error
    #[error("guest memory: {0}")]
    Memory(String),
    /// The guest image is malformed or does not fit
    #[error("image: {0}")]
    Image(String),
    /// The object is in use by a running vCPU
    #[error("{0}")]
    Busy(String),
    /// A wait ran out of time
    #[error("timed out after {0} ms")]
    Timeout(u64),
    /// A panic was caught at the ABI boundary
    #[error("internal error (panic caught at the ABI boundary): {0}")]
    Panic(String),
    /// The caller's buffer is too small
    #[error("buffer too small: need {need} bytes, got {got}")]
    BufferTooSmall { need: usize, got: usize },
    /// Host I/O error
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    /// The initrd is truncated or not an initramfs the kernel accepts
    #[error("{0}")]
    Initrd(String),
    /// The kernel command line is longer than the kernel accepts
    #[error("{0}")]
    CmdlineTooLong(String),
    /// The kernel or initrd does not fit in guest RAM
    #[error("{0}")]
    DoesNotFit(String),
    /// More vCPUs than the host's KVM allows
    #[error("{0}")]
    VcpuLimit(String),
    /// A device range cannot be attached
    #[error("device bus: {0}")]
    Bus(#[from] crate::devices::bus::BusError),
    /// A virtio device cannot be configured, attached or asked
    #[error("{0}")]
    Device(#[from] crate::virtio::VirtioError),
    /// A CPUID policy or table is refused
    #[error(transparent)]
    Cpuid(#[from] crate::cpuid::CpuidError),
    /// An MSR policy is refused
    #[error(transparent)]
    MsrPolicy(#[from] crate::msr_filter::MsrPolicyError),
    /// Memory deduplication (KSM) failed
    #[error(transparent)]
    Ksm(#[from] crate::ksm::KsmError),
    /// A device state read back is not one the device can hold
    #[error("device state: {0}")]
    State(#[from] crate::state::StateError),
}

impl Error {
    /// Shorthand for wrapping a failed KVM ioctl with the operation's name.
    pub fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }

    /// Shorthand for an invalid-argument error.
    pub fn arg(msg: impl Into<String>) -> Error {
        Error::InvalidArgument(msg.into())
    }
}

/// The core's result type.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_problem() {
        let e = Error::InvalidHandle {
            handle: 7,
            expected: "vCPU",
        };
        assert_eq!(
            e.to_string(),
            "handle 7 is not a live vCPU (it is stale, closed or of another kind)"
        );
    }
}
