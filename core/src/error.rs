//! The core's top-level error, and the status codes the C ABI returns.
//!
//! Each module has its own error enum whose variants carry the data of the
//! failure (`MemoryError`, `BootError` and its loaders' enums, `VcpuError`,
//! `VmError`, `IrqError`, `BusError`, `VirtioError`...), in the style of
//! Firecracker's error enums: its message is what a person reads. [`Error`]
//! wraps them (`?` converts), and `crate::abi::status` gives every variant its
//! stable numeric [`Status`] (what a caller branches on), in one place.

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
    /// A snapshot is truncated, corrupted, of another version or lacks a section
    SnapshotInvalid = -18,
    /// A snapshot's CPU (vendor, model or features) does not match this host
    SnapshotWrongHost = -19,
}

/// Everything that can go wrong inside the core: each module's own error,
/// and the few failures of the ABI layer itself (a bad argument, handle or
/// buffer, a caught panic). `crate::abi::status` gives each its ABI status.
#[derive(Debug, Error)]
pub enum Error {
    /// {0}
    #[error("{0}")]
    InvalidArgument(String),
    /// Handle {handle} is not a live {expected} (it is stale, closed or of another kind)
    #[error("handle {handle} is not a live {expected} (it is stale, closed or of another kind)")]
    InvalidHandle { handle: u32, expected: &'static str },
    /// The object is in use by a running vCPU
    #[error("{0}")]
    Busy(String),
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
    /// Guest memory cannot be created, read or written
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// An image, a kernel, its initrd or command line, or the boot state is refused
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
    /// A vCPU cannot be driven as asked
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    /// The VM cannot do what was asked
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// The irqchip or an interrupt line refused
    #[error(transparent)]
    Irq(#[from] crate::irq::IrqError),
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
    /// A VM state cannot be captured or restored
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// A device state read back is not one the device can hold
    #[error("device state: {0}")]
    State(#[from] crate::state::StateError),
    /// A migration stream cannot be sent, or what was received is refused
    #[error(transparent)]
    Migration(#[from] crate::migration::MigrationError),
    /// A function VM cannot be checkpointed, reset or invoked
    #[error(transparent)]
    Function(#[from] crate::function::FunctionError),
}

impl Error {
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
