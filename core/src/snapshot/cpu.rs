//! One vCPU's complete state as KVM holds it, and its restore.
//!
//! The order of the ioctls matters (it is the order Firecracker and QEMU
//! settled on, for the reasons given at [`VcpuState::capture`] and
//! [`VcpuState::restore`]). FPU and SSE state travel in XSAVE, not
//! `KVM_GET_FPU`: `KVM_SET_FPU` does not restore MXCSR.

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::{Raw, SnapshotError};

/// IA32_TSC: the guest's time stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE: the local APIC timer's deadline, in TSC ticks. Restored
/// after every other MSR: KVM arms the timer from it against the TSC, so a
/// deadline written before the TSC would fire at the wrong time or never.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// IA32_TSC_ADJUST: the guest's TSC offset as the guest sees it (moves with
/// the TSC, so a reset leaves it alone too).
pub const MSR_IA32_TSC_ADJUST: u32 = 0x3b;

/// TSC frequencies within this many parts per million of each other count as
/// the same (hosts calibrate the TSC at boot, with small differences).
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// One MSR's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    /// The MSR's index (`0x10` is IA32_TSC).
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VcpuState {
    /// The vCPU's id in its VM.
    pub id: u32,
    /// Running, halted, waiting for a SIPI... (`KVM_GET_MP_STATE`).
    pub mp_state: Raw<kvm_mp_state>,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: Raw<kvm_regs>,
    /// Segments, descriptor tables, control registers, EFER, APIC base.
    pub sregs: Raw<kvm_sregs>,
    /// x87, SSE (with MXCSR) and AVX state in the XSAVE layout.
    pub xsave: Raw<kvm_xsave>,
    /// Extended control registers (XCR0).
    pub xcrs: Raw<kvm_xcrs>,
    /// DR0-DR3, DR6, DR7.
    pub debug_regs: Raw<kvm_debugregs>,
    /// The local APIC's registers (with the in-kernel irqchip only).
    pub lapic: Option<Raw<kvm_lapic_state>>,
    /// Every MSR KVM lists as saveable that reads on this vCPU, TSC and
    /// kvmclock MSRs included, in KVM's order.
    pub msrs: Vec<Msr>,
    /// Pending exceptions, interrupts, NMI, SIPI and the interrupt shadow.
    pub events: Raw<kvm_vcpu_events>,
    /// The CPUID the guest sees.
    pub cpuid: Vec<Raw<kvm_cpuid_entry2>>,
    /// The guest TSC's frequency, where KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// The MSRs KVM can save and restore (`KVM_GET_MSR_INDEX_LIST`), read once
/// per process: the list describes the host's KVM.
pub fn saveable_msrs() -> Result<Vec<u32>, SnapshotError> {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(list) = LIST.get() {
        return Ok(list.clone());
    }
    let section = "msr index list";
    let kvm = crate::vm::kvm().map_err(|e| SnapshotError::refused(section, e.to_string()))?;
    let list = kvm
        .get_msr_index_list()
        .map_err(SnapshotError::kvm(section, "KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec();
    Ok(LIST.get_or_init(|| list).clone())
}

/// Reads every MSR of `indices` that KVM lets this vCPU read. KVM_GET_MSRS
/// stops at the first MSR it refuses and returns how many it read: the
/// refused one is skipped and the read goes on after it.
fn read_msrs(fd: &VcpuFd, indices: &[u32], section: &str) -> Result<Vec<Msr>, SnapshotError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| SnapshotError::refused(section, format!("{e:?}")))?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(SnapshotError::kvm(section, "KVM_GET_MSRS"))?
            .min(chunk.len());
        out.extend(msrs.as_slice()[..read].iter().map(|e| Msr {
            index: e.index,
            data: e.data,
        }));
        // Past the chunk, or past the MSR that stopped the read.
        let done = if read < chunk.len() { read + 1 } else { read };
        rest = &rest[done..];
    }
    Ok(out)
}

/// Writes `msrs`. KVM_SET_MSRS stops at the first MSR it refuses: one that
/// already holds the saved value is skipped (KVM refuses some writes it has no
/// use for, such as a zero async-page-fault vector without the in-kernel
/// LAPIC); any other refusal fails the restore, naming the MSR.
fn write_msrs(fd: &VcpuFd, msrs: &[Msr], section: &str) -> Result<(), SnapshotError> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let kvm_msrs = Msrs::from_entries(&entries)
            .map_err(|e| SnapshotError::refused(section, format!("{e:?}")))?;
        let written = fd
            .set_msrs(&kvm_msrs)
            .map_err(SnapshotError::kvm(section, "KVM_SET_MSRS"))?
            .min(chunk.len());
        if written == chunk.len() {
            rest = &rest[written..];
            continue;
        }
        let refused = chunk[written];
        let current = read_msrs(fd, &[refused.index], section)?;
        if current.first().map(|m| m.data) != Some(refused.data) {
            return Err(SnapshotError::refused(
                section,
                format!("KVM refused MSR {:#x} = {:#x}", refused.index, refused.data),
            ));
        }
        rest = &rest[written + 1..];
    }
    Ok(())
}

/// Whether two plain KVM structs hold the same bytes.
fn same_bytes<T: Copy>(a: &T, b: &T) -> bool {
    let n = std::mem::size_of::<T>();
    // SAFETY: both are live, initialized plain-integer KVM structs of `n`
    // bytes (read from KVM or deserialized whole); reading them as bytes
    // reads nothing out of bounds. Padding bytes only make equal values
    // compare unequal (then they are written again, which is harmless).
    unsafe {
        std::slice::from_raw_parts((a as *const T).cast::<u8>(), n)
            == std::slice::from_raw_parts((b as *const T).cast::<u8>(), n)
    }
}

impl VcpuState {
    /// Reads vCPU `id`'s state from `fd`. The vCPU must be out of KVM_RUN and
    /// its siblings too (vcpu events are not safe to read while others run);
    /// `lapic` says whether the VM has the in-kernel irqchip.
    ///
    /// Order: the MP state first (reading it makes KVM accept pending INIT and
    /// SIPI, which changes the registers and the LAPIC); the LAPIC after the
    /// special registers; the pending events last, as other reads may still
    /// change them.
    pub fn capture(id: u32, fd: &VcpuFd, lapic: bool) -> Result<VcpuState, SnapshotError> {
        let section = |what: &str| format!("vcpu {id} {what}");
        let mp_state = fd
            .get_mp_state()
            .map_err(SnapshotError::kvm(section("mp state"), "KVM_GET_MP_STATE"))?;
        let regs = fd
            .get_regs()
            .map_err(SnapshotError::kvm(section("regs"), "KVM_GET_REGS"))?;
        let sregs = fd
            .get_sregs()
            .map_err(SnapshotError::kvm(section("sregs"), "KVM_GET_SREGS"))?;
        let xsave = fd
            .get_xsave()
            .map_err(SnapshotError::kvm(section("xsave"), "KVM_GET_XSAVE"))?;
        let xcrs = fd
            .get_xcrs()
            .map_err(SnapshotError::kvm(section("xcrs"), "KVM_GET_XCRS"))?;
        let debug_regs = fd.get_debug_regs().map_err(SnapshotError::kvm(
            section("debug regs"),
            "KVM_GET_DEBUGREGS",
        ))?;
        let lapic = if lapic {
            Some(Raw(fd.get_lapic().map_err(SnapshotError::kvm(
                section("lapic"),
                "KVM_GET_LAPIC",
            ))?))
        } else {
            None
        };
        // Not every host's KVM reports the TSC frequency; without it a restore
        // cannot scale the TSC, which only matters on another host.
        let tsc_khz = fd.get_tsc_khz().ok();
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(SnapshotError::kvm(section("cpuid"), "KVM_GET_CPUID2"))?
            .as_slice()
            .iter()
            .copied()
            .map(Raw)
            .collect();
        let msrs = read_msrs(fd, &saveable_msrs()?, &section("msrs"))?;
        let events = fd
            .get_vcpu_events()
            .map_err(SnapshotError::kvm(section("events"), "KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            id,
            mp_state: Raw(mp_state),
            regs: Raw(regs),
            sregs: Raw(sregs),
            xsave: Raw(xsave),
            xcrs: Raw(xcrs),
            debug_regs: Raw(debug_regs),
            lapic,
            msrs,
            events: Raw(events),
            cpuid,
            tsc_khz,
        })
    }

    /// Writes this state into a vCPU that has not run yet (KVM refuses a
    /// CPUID change after the first KVM_RUN).
    ///
    /// Order: CPUID first (other writes check against it); the TSC frequency
    /// before the MSRs that hold TSC values; the registers before the events
    /// (KVM_SET_REGS drops a pending exception that KVM_SET_VCPU_EVENTS puts
    /// back); the LAPIC after the special registers (they hold its base
    /// address) and before the MSRs (the TSC deadline needs a configured
    /// LAPIC); the TSC deadline after the TSC.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), SnapshotError> {
        let id = self.id;
        let section = |what: &str| format!("vcpu {id} {what}");
        let entries: Vec<kvm_cpuid_entry2> = self.cpuid.iter().map(|e| e.0).collect();
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|e| SnapshotError::refused(section("cpuid"), format!("{e:?}")))?;
        fd.set_cpuid2(&cpuid)
            .map_err(SnapshotError::kvm(section("cpuid"), "KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            self.restore_tsc_khz(fd, khz, &section("tsc khz"))?;
        }
        self.write_registers(fd, false)?;
        self.write_msrs_and_events(fd, &self.msrs)
    }

    /// Writes this state back into the vCPU it was captured from, which has
    /// run since (a function VM's reset to its checkpoint): everything but
    /// the CPUID and the TSC frequency (unchanged, and KVM refuses a CPUID
    /// change after a run) and the TSC itself (guest time goes on; a reset
    /// must not move it back). Same order as [`VcpuState::restore`].
    pub fn reset_to(&self, fd: &VcpuFd) -> Result<(), SnapshotError> {
        let id = self.id;
        let section = |what: &str| format!("vcpu {id} {what}");
        self.write_registers(fd, true)?;
        let wanted: Vec<Msr> = self
            .msrs
            .iter()
            .filter(|m| !matches!(m.index, MSR_IA32_TSC | MSR_IA32_TSC_ADJUST))
            .copied()
            .collect();
        // Only the MSRs the guest changed: one read of all is cheaper than
        // writing all (some writes have side effects in KVM).
        let indices: Vec<u32> = wanted.iter().map(|m| m.index).collect();
        let current = read_msrs(fd, &indices, &section("msrs"))?;
        let msrs: Vec<Msr> = wanted
            .into_iter()
            .filter(|m| !current.contains(m))
            .collect();
        self.write_msrs_and_events(fd, &msrs)
    }

    /// Writes the multiprocessing state, the registers, the FPU/vector state,
    /// XCRs, debug registers and the LAPIC (the part of a restore before the
    /// MSRs). With `sregs_if_changed`, the sregs are written only where they
    /// differ from the vCPU's: KVM_SET_SREGS resets the MMU context (the next
    /// entry rebuilds its roots).
    fn write_registers(&self, fd: &VcpuFd, sregs_if_changed: bool) -> Result<(), SnapshotError> {
        let id = self.id;
        let section = |what: &str| format!("vcpu {id} {what}");
        fd.set_mp_state(self.mp_state.0)
            .map_err(SnapshotError::kvm(section("mp state"), "KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs.0)
            .map_err(SnapshotError::kvm(section("regs"), "KVM_SET_REGS"))?;
        let unchanged = sregs_if_changed && {
            let sregs = fd
                .get_sregs()
                .map_err(SnapshotError::kvm(section("sregs"), "KVM_GET_SREGS"))?;
            same_bytes(&sregs, &self.sregs.0)
        };
        if !unchanged {
            fd.set_sregs(&self.sregs.0)
                .map_err(SnapshotError::kvm(section("sregs"), "KVM_SET_SREGS"))?;
        }
        fd.set_xsave(&self.xsave.0)
            .map_err(SnapshotError::kvm(section("xsave"), "KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs.0)
            .map_err(SnapshotError::kvm(section("xcrs"), "KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debug_regs.0)
            .map_err(SnapshotError::kvm(
                section("debug regs"),
                "KVM_SET_DEBUGREGS",
            ))?;
        if let Some(lapic) = &self.lapic {
            fd.set_lapic(&lapic.0)
                .map_err(SnapshotError::kvm(section("lapic"), "KVM_SET_LAPIC"))?;
        }
        Ok(())
    }

    /// Writes `msrs` (a TSC deadline last: KVM arms it against the TSC and
    /// the LAPIC written before) and then the pending events.
    fn write_msrs_and_events(&self, fd: &VcpuFd, msrs: &[Msr]) -> Result<(), SnapshotError> {
        let id = self.id;
        let section = |what: &str| format!("vcpu {id} {what}");
        let (deferred, first): (Vec<Msr>, Vec<Msr>) =
            msrs.iter().partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
        write_msrs(fd, &first, &section("msrs"))?;
        write_msrs(fd, &deferred, &section("msrs"))?;
        fd.set_vcpu_events(&self.events.0)
            .map_err(SnapshotError::kvm(section("events"), "KVM_SET_VCPU_EVENTS"))
    }

    /// Gives the vCPU the snapshot's TSC frequency when this host's differs.
    fn restore_tsc_khz(&self, fd: &VcpuFd, khz: u32, section: &str) -> Result<(), SnapshotError> {
        let here = fd
            .get_tsc_khz()
            .map_err(SnapshotError::kvm(section, "KVM_GET_TSC_KHZ"))?;
        if u64::from(here.abs_diff(khz)) * 1_000_000 <= u64::from(khz) * TSC_KHZ_TOLERANCE_PPM {
            return Ok(());
        }
        fd.set_tsc_khz(khz)
            .map_err(SnapshotError::kvm(section, "KVM_SET_TSC_KHZ"))
    }

    /// The MSR `index`'s saved value.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        let mut xsave = kvm_xsave::default();
        // MXCSR lives at byte 24 of the legacy XSAVE area.
        xsave.region[6] = 0x7f80;
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x20 + 3] = 1;
        VcpuState {
            id: 1,
            mp_state: Raw(kvm_mp_state { mp_state: 3 }),
            regs: Raw(kvm_regs {
                rip: 0x10_0040,
                rcx: 12345,
                ..Default::default()
            }),
            sregs: Raw(kvm_sregs {
                efer: 0xd01,
                ..Default::default()
            }),
            xsave: Raw(xsave),
            xcrs: Raw(kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            }),
            debug_regs: Raw(kvm_debugregs {
                dr7: 0x400,
                ..Default::default()
            }),
            lapic: Some(Raw(lapic)),
            msrs: vec![
                Msr {
                    index: MSR_IA32_TSC,
                    data: 1 << 40,
                },
                Msr {
                    index: MSR_IA32_TSC_DEADLINE,
                    data: 7,
                },
            ],
            events: Raw(kvm_vcpu_events::default()),
            cpuid: vec![Raw(kvm_cpuid_entry2 {
                function: 1,
                eax: 0x00a2_0f12,
                ..Default::default()
            })],
            tsc_khz: Some(2_400_000),
        }
    }

    #[test]
    fn a_vcpu_state_round_trips_through_json() {
        let state = sample();
        let json = serde_json::to_string(&state).unwrap();
        let back: VcpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        assert_eq!(back.regs.0.rip, 0x10_0040);
        assert_eq!(back.xsave.0.region[6], 0x7f80);
        assert_eq!(back.msr(MSR_IA32_TSC), Some(1 << 40));
        assert_eq!(back.lapic.map(|l| l.0.regs[0x23]), Some(1));
        assert_eq!(back.cpuid[0].0.eax, 0x00a2_0f12);
    }

    #[test]
    fn a_vcpu_state_missing_a_section_is_refused_by_name() {
        let mut json = serde_json::to_value(sample()).unwrap();
        json.as_object_mut().unwrap().remove("xsave");
        let e = serde_json::from_value::<VcpuState>(json)
            .err()
            .expect("no xsave");
        assert!(e.to_string().contains("missing field `xsave`"), "{e}");
    }
}
