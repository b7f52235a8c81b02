//! Per-vCPU exit metrics: plain atomic counters bumped where an exit is handled,
//! read by the host in one call as a JSON snapshot (no per-exit FFI traffic).
//!
//! Counters use `Relaxed` ordering: each is independently monotonic and a snapshot
//! taken while the vCPU runs is allowed to be a few exits stale.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// Buckets of the handling-time histogram: bucket `i` counts exits whose handling
/// in the VMM took `[2^i, 2^(i+1))` ns (bucket 0 also takes 0 ns).
pub const LATENCY_BUCKETS: usize = 32;

/// Which counter an exit bumps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    Shutdown,
    InternalError,
    Interrupted,
    Other,
}

/// The live counters of one vCPU.
pub struct VcpuMetrics {
    io_in: AtomicU64,
    io_out: AtomicU64,
    mmio_read: AtomicU64,
    mmio_write: AtomicU64,
    hlt: AtomicU64,
    shutdown: AtomicU64,
    internal_error: AtomicU64,
    interrupted: AtomicU64,
    other: AtomicU64,
    /// Nanoseconds spent inside KVM_RUN (guest time plus KVM's own exit handling).
    kvm_run_ns: AtomicU64,
    /// Nanoseconds spent in the VMM handling exits, between two KVM_RUNs.
    vmm_ns: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

/// A point-in-time copy of [`VcpuMetrics`], as serialized for the host.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VcpuMetricsSnapshot {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    pub hlt: u64,
    pub shutdown: u64,
    pub internal_error: u64,
    pub interrupted: u64,
    pub other: u64,
    pub exits: u64,
    pub kvm_run_ns: u64,
    pub vmm_ns: u64,
    /// `handlingLatencyLog2Ns[i]` counts exits handled in `[2^i, 2^(i+1))` ns.
    pub handling_latency_log2_ns: Vec<u64>,
}

impl Default for VcpuMetrics {
    fn default() -> Self {
        VcpuMetrics {
            io_in: AtomicU64::new(0),
            io_out: AtomicU64::new(0),
            mmio_read: AtomicU64::new(0),
            mmio_write: AtomicU64::new(0),
            hlt: AtomicU64::new(0),
            shutdown: AtomicU64::new(0),
            internal_error: AtomicU64::new(0),
            interrupted: AtomicU64::new(0),
            other: AtomicU64::new(0),
            kvm_run_ns: AtomicU64::new(0),
            vmm_ns: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

fn bucket(ns: u64) -> usize {
    (63 - ns.max(1).leading_zeros() as usize).min(LATENCY_BUCKETS - 1)
}

impl VcpuMetrics {
    /// Counts one exit of `kind`.
    pub fn count(&self, kind: ExitKind) {
        let counter = match kind {
            ExitKind::IoIn => &self.io_in,
            ExitKind::IoOut => &self.io_out,
            ExitKind::MmioRead => &self.mmio_read,
            ExitKind::MmioWrite => &self.mmio_write,
            ExitKind::Hlt => &self.hlt,
            ExitKind::Shutdown => &self.shutdown,
            ExitKind::InternalError => &self.internal_error,
            ExitKind::Interrupted => &self.interrupted,
            ExitKind::Other => &self.other,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// Adds time spent inside KVM_RUN.
    pub fn add_kvm_run_ns(&self, ns: u64) {
        self.kvm_run_ns.fetch_add(ns, Relaxed);
    }

    /// Records how long the VMM took to handle one exit.
    pub fn record_handling(&self, ns: u64) {
        self.vmm_ns.fetch_add(ns, Relaxed);
        self.latency[bucket(ns)].fetch_add(1, Relaxed);
    }

    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self) -> VcpuMetricsSnapshot {
        let mut s = VcpuMetricsSnapshot {
            io_in: self.io_in.load(Relaxed),
            io_out: self.io_out.load(Relaxed),
            mmio_read: self.mmio_read.load(Relaxed),
            mmio_write: self.mmio_write.load(Relaxed),
            hlt: self.hlt.load(Relaxed),
            shutdown: self.shutdown.load(Relaxed),
            internal_error: self.internal_error.load(Relaxed),
            interrupted: self.interrupted.load(Relaxed),
            other: self.other.load(Relaxed),
            exits: 0,
            kvm_run_ns: self.kvm_run_ns.load(Relaxed),
            vmm_ns: self.vmm_ns.load(Relaxed),
            handling_latency_log2_ns: self.latency.iter().map(|b| b.load(Relaxed)).collect(),
        };
        s.exits = s.io_in
            + s.io_out
            + s.mmio_read
            + s.mmio_write
            + s.hlt
            + s.shutdown
            + s.internal_error
            + s.interrupted
            + s.other;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 0);
        assert_eq!(bucket(2), 1);
        assert_eq!(bucket(1023), 9);
        assert_eq!(bucket(1024), 10);
        assert_eq!(bucket(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn snapshot_sums_exits() {
        let m = VcpuMetrics::default();
        m.count(ExitKind::IoOut);
        m.count(ExitKind::IoOut);
        m.count(ExitKind::Hlt);
        m.record_handling(1500);
        let s = m.snapshot();
        assert_eq!((s.io_out, s.hlt, s.exits), (2, 1, 3));
        assert_eq!(s.handling_latency_log2_ns[10], 1);
        assert_eq!(s.vmm_ns, 1500);
    }
}
