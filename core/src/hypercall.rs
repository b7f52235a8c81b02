//! The hypercall interface between guests and the VMM (ABI v1), documented for
//! guest authors in `guest/README.md`.
//!
//! A hypercall is one 32-bit `out` to [`HYPERCALL_PORT`] whose value is the
//! guest-physical address of a 48-byte request block:
//!
//! ```text
//! 0  u32 nr      call number          24 u64 arg2
//! 4  i32 status  written by the VMM   32 u64 arg3
//! 8  u64 arg0                         40 u64 ret   written by the VMM
//! 16 u64 arg1
//! ```
//!
//! Passing a pointer instead of registers keeps the exit path free of
//! KVM_GET_REGS/KVM_SET_REGS (two ioctls per call), and works the same from
//! CPL3 and CPL0 on every KVM backend. Every guest pointer is bounds-checked
//! against guest RAM before use: a bad argument is an error status for the
//! guest, a bad request block stops the VM with a typed error.

use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::devices::bus::{BusDevice, VmEvent, VmEvents};
use crate::devices::serial::ConsoleSink;
use crate::memory::GuestRam;

/// The hypercall port.
pub const HYPERCALL_PORT: u16 = 0x510;
/// Size of a request block.
pub const REQUEST_SIZE: usize = 48;
/// The most bytes one WRITE or REPORT may transfer.
pub const MAX_TRANSFER: u64 = 1 << 20;

/// Call numbers.
pub mod nr {
    /// WRITE(ptr, len): console output; ret = len.
    pub const WRITE: u32 = 1;
    /// EXIT(status): stop the VM with a guest exit status.
    pub const EXIT: u32 = 2;
    /// CLOCK(): ret = host CLOCK_MONOTONIC in ns.
    pub const CLOCK: u32 = 3;
    /// REPORT(ptr, len): keep these bytes as the run's result.
    pub const REPORT: u32 = 4;
    /// FAULT(vector, error code, address, rip): the guest took an exception.
    pub const FAULT: u32 = 5;
    /// NOP(): a pure round trip.
    pub const NOP: u32 = 6;
    /// IRQ_COUNTERS(ptr, count): publish the guest's per-vector interrupt
    /// counters (`count` u64s indexed by vector) for the host to read without an
    /// exit; count 0 withdraws them. ret = 0.
    pub const IRQ_COUNTERS: u32 = 7;
}

/// The most interrupt counters a guest can publish: one per vector.
pub const MAX_IRQ_COUNTERS: u64 = 256;

/// Status codes written to the request block.
pub mod status {
    /// Success.
    pub const OK: i32 = 0;
    /// Unknown call number.
    pub const UNKNOWN_CALL: i32 = -1;
    /// A pointer or length reaches outside guest RAM.
    pub const BAD_ADDRESS: i32 = -2;
    /// A length overflows or exceeds [`super::MAX_TRANSFER`].
    pub const BAD_LENGTH: i32 = -3;
}

/// Which hypercall was made (for metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallKind {
    Write,
    Exit,
    Clock,
    Report,
    Fault,
    Nop,
    IrqCounters,
    /// Unknown call number or a failed call.
    Invalid,
}

/// An exception the guest reported through FAULT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestFault {
    /// Exception vector (0 #DE, 6 #UD, 13 #GP, 14 #PF, ...).
    pub vector: u64,
    /// The error code the CPU pushed (0 for vectors without one).
    pub error_code: u64,
    /// The faulting address (CR2) for a page fault, else 0.
    #[serde(serialize_with = "crate::vcpu::exit::hex")]
    pub address: u64,
    /// The instruction that faulted.
    #[serde(serialize_with = "crate::vcpu::exit::hex")]
    pub rip: u64,
}

/// What the VMM does after a hypercall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HypercallOutcome {
    /// The call completed; the guest continues.
    Continue(HypercallKind),
    /// EXIT: the guest ends the VM with this status.
    Exit(u32),
    /// FAULT: the guest took an exception it could not handle.
    Fault(GuestFault),
    /// The hypercall itself is malformed (bad block address or access size).
    Malformed(String),
}

/// The VM-wide state hypercalls act on.
pub struct Hypercalls {
    console: ConsoleSink,
    report: Mutex<Option<Vec<u8>>>,
    /// Where the guest keeps its interrupt counters: (address, count).
    irq_counters: Mutex<Option<(u64, u64)>>,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn u64_at(block: &[u8; REQUEST_SIZE], offset: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&block[offset..offset + 8]);
    u64::from_le_bytes(v)
}

impl Hypercalls {
    fn publish_irq_counters(&self, ram: &GuestRam, ptr: u64, count: u64) -> Result<u64, i32> {
        let mut slot = self.irq_counters.lock().unwrap_or_else(|p| p.into_inner());
        if count == 0 {
            *slot = None;
            return Ok(0);
        }
        if count > MAX_IRQ_COUNTERS {
            return Err(status::BAD_LENGTH);
        }
        if !ram.contains(ptr, count * 8) {
            return Err(status::BAD_ADDRESS);
        }
        *slot = Some((ptr, count));
        Ok(0)
    }

    /// Hypercall state writing console output into `console`.
    pub fn new(console: ConsoleSink) -> Hypercalls {
        Hypercalls {
            console,
            report: Mutex::new(None),
            irq_counters: Mutex::new(None),
        }
    }

    /// The last REPORT of the current run.
    pub fn report(&self) -> Option<Vec<u8>> {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forgets the report (at the start of a run).
    pub fn clear_report(&self) {
        *self.report.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The guest's interrupt counters as published with IRQ_COUNTERS, read from
    /// guest RAM now (empty when none are published).
    pub fn irq_counters(&self, ram: &GuestRam) -> Vec<u64> {
        let published = *self.irq_counters.lock().unwrap_or_else(|p| p.into_inner());
        let Some((ptr, count)) = published else {
            return Vec::new();
        };
        let mut raw = vec![0u8; count as usize * 8];
        // Checked against RAM when published; RAM never shrinks.
        if ram.read(ptr, &mut raw).is_err() {
            return Vec::new();
        }
        raw.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect()
    }

    /// Validates `(ptr, len)` and reads the bytes.
    fn guest_bytes(ram: &GuestRam, ptr: u64, len: u64) -> Result<Vec<u8>, i32> {
        if len > MAX_TRANSFER || ptr.checked_add(len).is_none() {
            return Err(status::BAD_LENGTH);
        }
        let mut buf = vec![0u8; len as usize];
        ram.read(ptr, &mut buf).map_err(|_| status::BAD_ADDRESS)?;
        Ok(buf)
    }

    /// Handles one `out` of `data` to the hypercall port.
    pub fn handle(&self, ram: &GuestRam, data: &[u8]) -> HypercallOutcome {
        let Ok(address) = <[u8; 4]>::try_from(data).map(u32::from_le_bytes) else {
            return HypercallOutcome::Malformed(format!(
                "a hypercall is a 4-byte out to port {HYPERCALL_PORT:#x}, got {} byte(s)",
                data.len()
            ));
        };
        let address = address as u64;
        let mut block = [0u8; REQUEST_SIZE];
        if ram.read(address, &mut block).is_err() {
            return HypercallOutcome::Malformed(format!(
                "hypercall request block at {address:#x} is outside guest RAM"
            ));
        }
        let call = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        let arg = |i: usize| u64_at(&block, 8 + 8 * i);
        let (kind, result): (HypercallKind, Result<u64, i32>) = match call {
            nr::WRITE => (
                HypercallKind::Write,
                Self::guest_bytes(ram, arg(0), arg(1)).map(|bytes| {
                    use std::io::Write;
                    let mut sink = self.console.clone();
                    // Writing to the in-memory console cannot fail.
                    let _ = sink.write_all(&bytes);
                    bytes.len() as u64
                }),
            ),
            nr::EXIT => return HypercallOutcome::Exit(arg(0) as u32),
            nr::CLOCK => (HypercallKind::Clock, Ok(monotonic_ns())),
            nr::REPORT => (
                HypercallKind::Report,
                Self::guest_bytes(ram, arg(0), arg(1)).map(|bytes| {
                    let len = bytes.len() as u64;
                    *self.report.lock().unwrap_or_else(|p| p.into_inner()) = Some(bytes);
                    len
                }),
            ),
            nr::FAULT => {
                return HypercallOutcome::Fault(GuestFault {
                    vector: arg(0),
                    error_code: arg(1),
                    address: arg(2),
                    rip: arg(3),
                })
            }
            nr::NOP => (HypercallKind::Nop, Ok(0)),
            nr::IRQ_COUNTERS => (
                HypercallKind::IrqCounters,
                self.publish_irq_counters(ram, arg(0), arg(1)),
            ),
            _ => (HypercallKind::Invalid, Err(status::UNKNOWN_CALL)),
        };
        let (kind, status, ret) = match result {
            Ok(ret) => (kind, status::OK, ret),
            Err(code) => (HypercallKind::Invalid, code, 0),
        };
        // The block was readable a moment ago; only a concurrent change of RAM
        // layout could make this fail, and RAM layout never changes at run time.
        let _ = ram.write(address + 4, &status.to_le_bytes());
        let _ = ram.write_u64(address + 40, ret);
        HypercallOutcome::Continue(kind)
    }
}

thread_local! {
    /// The kinds of the hypercalls this thread made since the last
    /// [`take_thread_calls`] (a `rep outsd` makes several in one exit).
    static THREAD_CALLS: std::cell::RefCell<Vec<HypercallKind>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Takes (and clears) the kinds of the hypercalls this thread made since the
/// last call, handing each to `count`: the exit handler adds them to its
/// vCPU's metrics.
pub fn take_thread_calls(mut count: impl FnMut(HypercallKind)) {
    THREAD_CALLS.with(|calls| {
        for kind in calls.borrow_mut().drain(..) {
            count(kind);
        }
    });
}

/// The hypercall port as an ordinary device on the port-I/O bus: each 4-byte
/// `out` is one call; EXIT, FAULT and malformed calls raise a [`VmEvent`].
pub struct HypercallPort {
    calls: Arc<Hypercalls>,
    ram: GuestRam,
    events: VmEvents,
}

impl HypercallPort {
    /// The port serving `calls` on `ram`, raising VM events on `events`.
    pub fn new(calls: Arc<Hypercalls>, ram: GuestRam, events: VmEvents) -> HypercallPort {
        HypercallPort { calls, ram, events }
    }
}

impl BusDevice for HypercallPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let (kind, event) = match self.calls.handle(&self.ram, data) {
            HypercallOutcome::Continue(kind) => (kind, None),
            HypercallOutcome::Exit(status) => {
                (HypercallKind::Exit, Some(VmEvent::GuestExit(status)))
            }
            HypercallOutcome::Fault(fault) => {
                (HypercallKind::Fault, Some(VmEvent::GuestFault(fault)))
            }
            HypercallOutcome::Malformed(message) => {
                (HypercallKind::Invalid, Some(VmEvent::BadHypercall(message)))
            }
        };
        THREAD_CALLS.with(|calls| calls.borrow_mut().push(kind));
        if let Some(event) = event {
            self.events.raise(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: u64 = 0x1000;

    fn setup() -> (GuestRam, Hypercalls, ConsoleSink) {
        let ram = GuestRam::new(1 << 20).unwrap();
        let console = ConsoleSink::default();
        (ram, Hypercalls::new(console.clone()), console)
    }

    fn call(
        ram: &GuestRam,
        h: &Hypercalls,
        nr: u32,
        args: [u64; 4],
    ) -> (HypercallOutcome, i32, u64) {
        let mut block = [0u8; REQUEST_SIZE];
        block[0..4].copy_from_slice(&nr.to_le_bytes());
        block[4..8].copy_from_slice(&0x7777i32.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            block[8 + 8 * i..16 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        ram.write(BLOCK, &block).unwrap();
        let outcome = h.handle(ram, &(BLOCK as u32).to_le_bytes());
        let mut back = [0u8; REQUEST_SIZE];
        ram.read(BLOCK, &mut back).unwrap();
        let status = i32::from_le_bytes([back[4], back[5], back[6], back[7]]);
        (outcome, status, u64_at(&back, 40))
    }

    #[test]
    fn write_goes_to_the_console() {
        let (ram, h, console) = setup();
        ram.write(0x2000, b"hello").unwrap();
        let (outcome, status, ret) = call(&ram, &h, nr::WRITE, [0x2000, 5, 0, 0]);
        assert_eq!(outcome, HypercallOutcome::Continue(HypercallKind::Write));
        assert_eq!((status, ret), (0, 5));
        assert_eq!(console.0.lock().unwrap().take(), b"hello");
    }

    #[test]
    fn bad_pointers_and_lengths_are_error_statuses() {
        let (ram, h, _) = setup();
        let (outcome, status, _) = call(&ram, &h, nr::WRITE, [0xff000, 0x2000, 0, 0]);
        assert_eq!(outcome, HypercallOutcome::Continue(HypercallKind::Invalid));
        assert_eq!(status, status::BAD_ADDRESS);
        let (_, status, _) = call(&ram, &h, nr::WRITE, [u64::MAX - 2, 8, 0, 0]);
        assert_eq!(status, status::BAD_LENGTH);
        let (_, status, _) = call(&ram, &h, nr::REPORT, [0, MAX_TRANSFER + 1, 0, 0]);
        assert_eq!(status, status::BAD_LENGTH);
        let (outcome, status, _) = call(&ram, &h, 999, [0; 4]);
        assert_eq!(outcome, HypercallOutcome::Continue(HypercallKind::Invalid));
        assert_eq!(status, status::UNKNOWN_CALL);
    }

    #[test]
    fn report_clock_nop_exit_and_fault() {
        let (ram, h, _) = setup();
        ram.write(0x3000, b"{\"ok\":1}").unwrap();
        let (_, status, ret) = call(&ram, &h, nr::REPORT, [0x3000, 8, 0, 0]);
        assert_eq!((status, ret), (0, 8));
        assert_eq!(h.report().unwrap(), b"{\"ok\":1}");
        let (_, _, t1) = call(&ram, &h, nr::CLOCK, [0; 4]);
        let (_, _, t2) = call(&ram, &h, nr::CLOCK, [0; 4]);
        assert!(t1 > 0 && t2 >= t1);
        assert_eq!(
            call(&ram, &h, nr::NOP, [0; 4]).0,
            HypercallOutcome::Continue(HypercallKind::Nop)
        );
        assert_eq!(
            call(&ram, &h, nr::EXIT, [3, 0, 0, 0]).0,
            HypercallOutcome::Exit(3)
        );
        let fault = call(&ram, &h, nr::FAULT, [14, 2, 0xdead000, 0x100123]).0;
        assert_eq!(
            fault,
            HypercallOutcome::Fault(GuestFault {
                vector: 14,
                error_code: 2,
                address: 0xdead000,
                rip: 0x100123
            })
        );
        h.clear_report();
        assert!(h.report().is_none());
    }

    #[test]
    fn irq_counters_are_read_from_guest_ram() {
        let (ram, h, _) = setup();
        assert!(h.irq_counters(&ram).is_empty());
        ram.write_u64(0x4000 + 8 * 0x21, 5).unwrap();
        let (outcome, status, _) = call(&ram, &h, nr::IRQ_COUNTERS, [0x4000, 256, 0, 0]);
        assert_eq!(
            outcome,
            HypercallOutcome::Continue(HypercallKind::IrqCounters)
        );
        assert_eq!(status, 0);
        let counts = h.irq_counters(&ram);
        assert_eq!((counts.len(), counts[0x21]), (256, 5));
        ram.write_u64(0x4000 + 8 * 0x21, 6).unwrap();
        assert_eq!(h.irq_counters(&ram)[0x21], 6, "read live, no exit");
        let (_, status, _) = call(&ram, &h, nr::IRQ_COUNTERS, [0x4000, 257, 0, 0]);
        assert_eq!(status, status::BAD_LENGTH);
        let (_, status, _) = call(&ram, &h, nr::IRQ_COUNTERS, [0xff900, 256, 0, 0]);
        assert_eq!(status, status::BAD_ADDRESS);
        assert_eq!(
            h.irq_counters(&ram).len(),
            256,
            "a refused call keeps the old table"
        );
        call(&ram, &h, nr::IRQ_COUNTERS, [0, 0, 0, 0]);
        assert!(h.irq_counters(&ram).is_empty());
    }

    #[test]
    fn malformed_hypercalls_stop_the_vm() {
        let (ram, h, _) = setup();
        assert!(
            matches!(h.handle(&ram, &[1]), HypercallOutcome::Malformed(m) if m.contains("4-byte"))
        );
        let outside = h.handle(&ram, &0xfff_fff0u32.to_le_bytes());
        assert!(
            matches!(outside, HypercallOutcome::Malformed(m) if m.contains("outside guest RAM"))
        );
        // A block straddling the end of RAM is outside too.
        let edge = h.handle(&ram, &((1u32 << 20) - 8).to_le_bytes());
        assert!(matches!(edge, HypercallOutcome::Malformed(_)));
    }
}
