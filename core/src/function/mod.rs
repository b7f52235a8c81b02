//! Functions as micro-VMs (issue 10): the ABI between the guest function
//! runtime and the VMM ([`abi`]), the checked reading of its mailbox
//! ([`mailbox`]), a function VM's checkpoint / reset / trim ([`reset`]) and
//! one request in one call ([`invoke`]).

pub mod abi;
pub mod invoke;
pub mod mailbox;
pub mod reset;

use thiserror::Error;

/// What can go wrong with a function VM's checkpoint, reset or invocation
/// (the guest's own misbehaviour is an invocation's status, not an error).
#[derive(Debug, Error)]
pub enum FunctionError {
    /// The mailbox is not at a valid READY
    #[error("the function is not READY: {0}")]
    NotReady(#[from] mailbox::ProtocolError),
    /// No checkpoint was taken
    #[error("the VM has no function checkpoint: call checkpoint() at READY first")]
    NoCheckpoint,
    /// A vCPU runs, or another checkpoint/reset/invocation is under way
    #[error("the VM is running (or another request is): wait for it to finish")]
    Running,
    /// The VM has no vCPUs
    #[error("the VM has no vCPUs")]
    NoVcpus,
    /// RAM larger than this host's address space
    #[error("guest RAM is too large for a pristine image on this host")]
    TooLarge,
    /// The host refused an operation on memory or files
    #[error("{op}: {source}")]
    Host {
        /// What was done.
        op: &'static str,
        /// The host's error.
        source: std::io::Error,
    },
}
