//! Memory deduplication in the C ABI (see the contract in `abi/mod.rs`): a VM
//! created with [`super::VM_FLAG_DEDUP`] has its RAM marked mergeable; this
//! reads what KSM has made of it (see [`crate::ksm`]).

use serde::Serialize;

use super::json;
use crate::ksm::KsmStats;

/// A VM's dedup setting beside the host's and this process's KSM counters.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VmKsm {
    dedup: bool,
    #[serde(flatten)]
    stats: KsmStats,
}

vm_reader!(
    /// Writes KSM's state as JSON into `buf`: `{"dedup":bool,"pageSize":N,
    /// "host":{"run","pagesShared","pagesSharing","pagesUnshared","pagesVolatile",
    /// "fullScans"},"process":{"rmapItems","mergingPages","zeroPages","profit"}}`,
    /// each counter a number or null where the kernel does not report it. The
    /// process counters cover every mergeable mapping of this process (all its VMs
    /// created with dedup), the host's every process.
    dv_vm_ksm,
    |vm| {
        json(&VmKsm {
            dedup: vm.ram().is_mergeable(),
            stats: KsmStats::read()?,
        })
    }
);
