//! Per-vCPU exit metrics: plain atomic counters bumped where an exit is handled,
//! read by the host in one call as a JSON snapshot (no per-exit FFI traffic).
//!
//! Counters use `Relaxed` ordering: each is independently monotonic and a snapshot
//! taken while the vCPU runs is allowed to be a few exits stale.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

use crate::devices::console::ConsoleTally;
use crate::hypercall::HypercallKind;

/// The port ranges exits are counted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortRange {
    /// COM1, 0x3f8..0x3ff.
    Serial = 0,
    /// The debug-exit port 0xf4.
    DebugExit = 1,
    /// The hypercall port 0x510.
    Hypercall = 2,
    /// Everything else.
    Other = 3,
}

const PORT_RANGES: usize = 4;
const HYPERCALL_KINDS: usize = 8;

/// Port-I/O exit counts by port range.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PortCounts {
    pub serial: u64,
    pub debug_exit: u64,
    pub hypercall: u64,
    pub other: u64,
}

impl PortCounts {
    fn from(counters: &[AtomicU64; PORT_RANGES]) -> PortCounts {
        PortCounts {
            serial: counters[PortRange::Serial as usize].load(Relaxed),
            debug_exit: counters[PortRange::DebugExit as usize].load(Relaxed),
            hypercall: counters[PortRange::Hypercall as usize].load(Relaxed),
            other: counters[PortRange::Other as usize].load(Relaxed),
        }
    }
}

/// Hypercall counts by kind.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct HypercallCounts {
    pub write: u64,
    pub exit: u64,
    pub clock: u64,
    pub report: u64,
    pub fault: u64,
    pub nop: u64,
    /// Unknown call numbers and calls refused with an error status.
    pub invalid: u64,
    /// IRQ_COUNTERS: the guest published its interrupt counters.
    #[serde(rename = "irqCounters")]
    pub irq_counters: u64,
}

fn hypercall_index(kind: HypercallKind) -> usize {
    match kind {
        HypercallKind::Write => 0,
        HypercallKind::Exit => 1,
        HypercallKind::Clock => 2,
        HypercallKind::Report => 3,
        HypercallKind::Fault => 4,
        HypercallKind::Nop => 5,
        HypercallKind::Invalid => 6,
        HypercallKind::IrqCounters => 7,
    }
}

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
    /// An RDMSR the MSR filter denied (the guest got #GP).
    MsrReadDenied,
    /// A WRMSR the MSR filter denied (the guest got #GP).
    MsrWriteDenied,
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
    msr_read_denied: AtomicU64,
    msr_write_denied: AtomicU64,
    other: AtomicU64,
    io_in_by_port: [AtomicU64; PORT_RANGES],
    io_out_by_port: [AtomicU64; PORT_RANGES],
    hypercalls: [AtomicU64; HYPERCALL_KINDS],
    /// Nanoseconds spent inside KVM_RUN (guest time plus KVM's own exit handling).
    kvm_run_ns: AtomicU64,
    /// Nanoseconds spent in the VMM handling exits, between two KVM_RUNs.
    vmm_ns: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
    /// Console bytes this vCPU wrote, and how many of them (or of older output)
    /// the capture and the stream dropped at that moment.
    console_bytes: AtomicU64,
    console_capture_dropped: AtomicU64,
    console_stream_dropped: AtomicU64,
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
    pub msr_read_denied: u64,
    pub msr_write_denied: u64,
    pub other: u64,
    pub exits: u64,
    pub io_in_by_port: PortCounts,
    pub io_out_by_port: PortCounts,
    pub hypercalls: HypercallCounts,
    pub kvm_run_ns: u64,
    pub vmm_ns: u64,
    /// `handlingLatencyLog2Ns[i]` counts exits handled in `[2^i, 2^(i+1))` ns.
    pub handling_latency_log2_ns: Vec<u64>,
    /// Console output of this vCPU (COM1 and the WRITE hypercall): bytes, and
    /// bytes dropped by the in-memory capture (older output beyond 1 MiB) and by
    /// the stream to a host fd (it did not drain) as this vCPU wrote.
    pub console: ConsoleTally,
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
            msr_read_denied: AtomicU64::new(0),
            msr_write_denied: AtomicU64::new(0),
            other: AtomicU64::new(0),
            io_in_by_port: std::array::from_fn(|_| AtomicU64::new(0)),
            io_out_by_port: std::array::from_fn(|_| AtomicU64::new(0)),
            hypercalls: std::array::from_fn(|_| AtomicU64::new(0)),
            kvm_run_ns: AtomicU64::new(0),
            vmm_ns: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            console_bytes: AtomicU64::new(0),
            console_capture_dropped: AtomicU64::new(0),
            console_stream_dropped: AtomicU64::new(0),
        }
    }
}

fn bucket(ns: u64) -> usize {
    (63 - ns.max(1).leading_zeros() as usize).min(LATENCY_BUCKETS - 1)
}

impl VcpuMetrics {
    /// The total exit count (what [`VcpuMetricsSnapshot::exits`] sums),
    /// without taking a whole snapshot.
    pub fn exits(&self) -> u64 {
        [
            &self.io_in,
            &self.io_out,
            &self.mmio_read,
            &self.mmio_write,
            &self.hlt,
            &self.shutdown,
            &self.internal_error,
            &self.interrupted,
            &self.msr_read_denied,
            &self.msr_write_denied,
            &self.other,
        ]
        .iter()
        .map(|c| c.load(Relaxed))
        .sum()
    }

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
            ExitKind::MsrReadDenied => &self.msr_read_denied,
            ExitKind::MsrWriteDenied => &self.msr_write_denied,
            ExitKind::Other => &self.other,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// Counts one port-I/O exit by its port range (on top of [`Self::count`]).
    pub fn count_port(&self, out: bool, range: PortRange) {
        let counters = if out {
            &self.io_out_by_port
        } else {
            &self.io_in_by_port
        };
        counters[range as usize].fetch_add(1, Relaxed);
    }

    /// Counts one hypercall by kind.
    pub fn count_hypercall(&self, kind: HypercallKind) {
        self.hypercalls[hypercall_index(kind)].fetch_add(1, Relaxed);
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

    /// Adds console output this vCPU wrote (see [`ConsoleTally`]).
    pub fn add_console(&self, tally: ConsoleTally) {
        if tally.bytes != 0 {
            self.console_bytes.fetch_add(tally.bytes, Relaxed);
        }
        if tally.capture_dropped != 0 {
            self.console_capture_dropped
                .fetch_add(tally.capture_dropped, Relaxed);
        }
        if tally.stream_dropped != 0 {
            self.console_stream_dropped
                .fetch_add(tally.stream_dropped, Relaxed);
        }
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
            msr_read_denied: self.msr_read_denied.load(Relaxed),
            msr_write_denied: self.msr_write_denied.load(Relaxed),
            other: self.other.load(Relaxed),
            exits: 0,
            io_in_by_port: PortCounts::from(&self.io_in_by_port),
            io_out_by_port: PortCounts::from(&self.io_out_by_port),
            hypercalls: {
                let h = |k: HypercallKind| self.hypercalls[hypercall_index(k)].load(Relaxed);
                HypercallCounts {
                    write: h(HypercallKind::Write),
                    exit: h(HypercallKind::Exit),
                    clock: h(HypercallKind::Clock),
                    report: h(HypercallKind::Report),
                    fault: h(HypercallKind::Fault),
                    nop: h(HypercallKind::Nop),
                    invalid: h(HypercallKind::Invalid),
                    irq_counters: h(HypercallKind::IrqCounters),
                }
            },
            kvm_run_ns: self.kvm_run_ns.load(Relaxed),
            vmm_ns: self.vmm_ns.load(Relaxed),
            handling_latency_log2_ns: self.latency.iter().map(|b| b.load(Relaxed)).collect(),
            console: ConsoleTally {
                bytes: self.console_bytes.load(Relaxed),
                capture_dropped: self.console_capture_dropped.load(Relaxed),
                stream_dropped: self.console_stream_dropped.load(Relaxed),
            },
        };
        s.exits = s.io_in
            + s.io_out
            + s.mmio_read
            + s.mmio_write
            + s.hlt
            + s.shutdown
            + s.internal_error
            + s.interrupted
            + s.msr_read_denied
            + s.msr_write_denied
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
        m.count_port(true, PortRange::Hypercall);
        m.count_hypercall(HypercallKind::Nop);
        m.count_hypercall(HypercallKind::Nop);
        let s = m.snapshot();
        assert_eq!(s.io_out_by_port.hypercall, 1);
        assert_eq!(s.hypercalls.nop, 2);
        assert_eq!((s.io_out, s.hlt, s.exits), (2, 1, 3));
        assert_eq!(s.handling_latency_log2_ns[10], 1);
        assert_eq!(s.vmm_ns, 1500);
    }
}
