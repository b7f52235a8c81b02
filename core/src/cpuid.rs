//! The CPUID a guest sees: KVM's supported CPUID, with the features a policy
//! hides cleared, the hypervisor leaves (0x4000_0000) carrying denovisor's
//! signature, KVM's paravirtual leaves one block up (0x4000_0100), and each
//! vCPU's own APIC id.
//!
//! Why KVM's leaves move rather than go: a Linux guest finds KVM by scanning
//! 0x4000_0000..0x4001_0000 in steps of 0x100 for the signature `KVMKVMKVM`
//! (`hypervisor_cpuid_base`), and KVM itself finds the guest's PV feature leaf
//! the same way (`kvm_get_hypervisor_cpuid`). At 0x4000_0100 both still find
//! them, so the guest gets kvm-clock, PV EOI, steal time and the other features
//! KVM implements in the kernel, while leaf 0x4000_0000 names denovisor. Each
//! 0x100 block has its own maximum leaf in EAX of its first leaf, as with
//! Hyper-V's leaves below KVM's in QEMU.
//!
//! The policy comes from the host as JSON (`{"hide": [{"leaf", "subleaf",
//! "register", "bit"}]}`); feature names are resolved in TypeScript
//! (`src/cpu/cpuid.ts`), so this module only deals in bits.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use serde::Deserialize;

use thiserror::Error;

/// Why a CPUID policy or table is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CpuidError {
    /// Not the policy's JSON shape.
    #[error("bad CPUID policy: {0}")]
    Json(String),
    /// A bit number past a 32-bit register.
    #[error("bad CPUID policy: bit {bit} of leaf {leaf:#x} is not a bit of a 32-bit register")]
    Bit { leaf: u32, bit: u32 },
    /// More entries than KVM_SET_CPUID2 takes.
    #[error("too many CPUID entries ({0})")]
    TooMany(usize),
}

/// The hypervisor signature in leaf 0x4000_0000 (EBX, ECX, EDX), NUL-padded.
pub const SIGNATURE: &[u8; 12] = b"denovisor\0\0\0";
/// The first hypervisor leaf.
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;
/// Where KVM's leaves (signature, then PV features) go: the next 0x100 block.
pub const KVM_LEAVES: u32 = HYPERVISOR_LEAF + 0x100;
/// The size of one hypervisor leaf block.
const LEAF_BLOCK: u32 = 0x100;
/// CPUID.1:ECX bit 31: "running under a hypervisor".
const HYPERVISOR_PRESENT: u32 = 1 << 31;

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One feature bit to clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct FeatureBit {
    pub leaf: u32,
    #[serde(default)]
    pub subleaf: u32,
    pub register: Register,
    pub bit: u8,
}

/// What the host wants the guest's CPUID to look like.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidPolicy {
    /// Feature bits to clear in every vCPU.
    #[serde(default)]
    pub hide: Vec<FeatureBit>,
}

impl CpuidPolicy {
    /// Parses and validates a policy.
    pub fn from_json(json: &[u8]) -> Result<CpuidPolicy, CpuidError> {
        let policy: CpuidPolicy =
            serde_json::from_slice(json).map_err(|e| CpuidError::Json(e.to_string()))?;
        if let Some(bad) = policy.hide.iter().find(|f| f.bit > 31) {
            return Err(CpuidError::Bit {
                leaf: bad.leaf,
                bit: bad.bit as u32,
            });
        }
        Ok(policy)
    }
}

fn register(entry: &mut kvm_cpuid_entry2, r: Register) -> &mut u32 {
    match r {
        Register::Eax => &mut entry.eax,
        Register::Ebx => &mut entry.ebx,
        Register::Ecx => &mut entry.ecx,
        Register::Edx => &mut entry.edx,
    }
}

fn signature_word(i: usize) -> u32 {
    u32::from_le_bytes([
        SIGNATURE[4 * i],
        SIGNATURE[4 * i + 1],
        SIGNATURE[4 * i + 2],
        SIGNATURE[4 * i + 3],
    ])
}

/// The CPUID entries of one vCPU.
pub fn vcpu_cpuid(
    supported: &[kvm_cpuid_entry2],
    policy: &CpuidPolicy,
    apic_id: u32,
) -> Vec<kvm_cpuid_entry2> {
    let kvm_block = HYPERVISOR_LEAF..HYPERVISOR_LEAF + LEAF_BLOCK;
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| !kvm_block.contains(&e.function))
        .copied()
        .collect();
    // KVM's leaves, one block up; the maximum leaf in the signature leaf moves
    // with them (an EAX of 0 means "features leaf only" and stays).
    for e in supported.iter().filter(|e| kvm_block.contains(&e.function)) {
        let mut moved = *e;
        moved.function += LEAF_BLOCK;
        if moved.function == KVM_LEAVES && kvm_block.contains(&moved.eax) {
            moved.eax += LEAF_BLOCK;
        }
        entries.push(moved);
    }
    entries.push(kvm_cpuid_entry2 {
        function: HYPERVISOR_LEAF,
        eax: HYPERVISOR_LEAF + 1,
        ebx: signature_word(0),
        ecx: signature_word(1),
        edx: signature_word(2),
        ..Default::default()
    });
    entries.push(kvm_cpuid_entry2 {
        function: HYPERVISOR_LEAF + 1,
        ..Default::default()
    });
    for entry in &mut entries {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | (apic_id << 24);
                entry.ecx |= HYPERVISOR_PRESENT;
            }
            // Extended topology: EDX is the x2APIC id of this logical CPU.
            0xb | 0x1f => entry.edx = apic_id,
            _ => {}
        }
        for f in &policy.hide {
            let index_matters = entry.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0;
            if entry.function == f.leaf && (!index_matters || entry.index == f.subleaf) {
                *register(entry, f.register) &= !(1u32 << f.bit);
            }
        }
    }
    entries
}

/// Wraps entries for KVM_SET_CPUID2.
pub fn to_kvm(entries: &[kvm_cpuid_entry2]) -> Result<CpuId, CpuidError> {
    CpuId::from_entries(entries).map_err(|_| CpuidError::TooMany(entries.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ecx,
            ebx: 0x0008_0800,
            ..Default::default()
        }
    }

    #[test]
    fn sets_signature_apic_id_and_hides_bits() {
        let kvm_leaf = kvm_cpuid_entry2 {
            function: HYPERVISOR_LEAF,
            ebx: 0x4b4d_564b,
            ..Default::default()
        };
        let supported = [leaf(1, 1 << 28 | 1), kvm_leaf];
        let policy =
            CpuidPolicy::from_json(br#"{"hide":[{"leaf":1,"register":"ecx","bit":28}]}"#).unwrap();
        let out = vcpu_cpuid(&supported, &policy, 3);
        let l1 = out.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ecx & (1 << 28), 0, "hidden");
        assert_eq!(l1.ecx & 1, 1, "kept");
        assert_ne!(l1.ecx & HYPERVISOR_PRESENT, 0);
        assert_eq!(l1.ebx >> 24, 3, "APIC id");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "rest of EBX kept");
        let hv: Vec<_> = out
            .iter()
            .filter(|e| e.function == HYPERVISOR_LEAF)
            .collect();
        assert_eq!(hv.len(), 1, "KVM's leaf replaced");
        assert_eq!(
            hv[0].eax,
            HYPERVISOR_LEAF + 1,
            "denovisor's block: two leaves"
        );
        let mut sig = Vec::new();
        for r in [hv[0].ebx, hv[0].ecx, hv[0].edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig[..9], b"denovisor");
    }

    /// What Linux's `hypervisor_cpuid_base` does: the first 0x100 block from
    /// 0x4000_0000 whose first leaf carries `signature` and whose maximum leaf
    /// reaches `leaves` leaves past it.
    fn find_base(entries: &[kvm_cpuid_entry2], signature: &[u8; 12], leaves: u32) -> Option<u32> {
        (HYPERVISOR_LEAF..0x4001_0000).step_by(0x100).find(|&base| {
            entries.iter().any(|e| {
                let mut sig = Vec::new();
                for r in [e.ebx, e.ecx, e.edx] {
                    sig.extend_from_slice(&r.to_le_bytes());
                }
                e.function == base && sig == signature && (leaves == 0 || e.eax - base >= leaves)
            })
        })
    }

    #[test]
    fn kvms_leaves_move_one_block_up_where_linux_finds_them() {
        let kvm_signature = kvm_cpuid_entry2 {
            function: HYPERVISOR_LEAF,
            eax: HYPERVISOR_LEAF + 1,
            ebx: 0x4b4d_564b, // "KVMK"
            ecx: 0x564b_4d56, // "VMKV"
            edx: 0x0000_004d, // "M"
            ..Default::default()
        };
        let kvm_features = kvm_cpuid_entry2 {
            function: HYPERVISOR_LEAF + 1,
            eax: 1 << 3 | 1 << 24, // KVM_FEATURE_CLOCKSOURCE2, CLOCKSOURCE_STABLE_BIT
            ..Default::default()
        };
        let out = vcpu_cpuid(
            &[leaf(1, 0), kvm_signature, kvm_features],
            &CpuidPolicy::default(),
            0,
        );
        assert_eq!(find_base(&out, SIGNATURE, 0), Some(HYPERVISOR_LEAF));
        let base = find_base(&out, b"KVMKVMKVM\0\0\0", 0);
        assert_eq!(base, Some(KVM_LEAVES));
        let kvm = out.iter().find(|e| e.function == KVM_LEAVES).unwrap();
        assert_eq!(kvm.eax, KVM_LEAVES + 1, "its maximum leaf moved with it");
        let features = out.iter().find(|e| e.function == KVM_LEAVES + 1).unwrap();
        assert_eq!(features.eax, kvm_features.eax, "PV features intact");
        // Denovisor's block keeps its own two leaves.
        let ours = out
            .iter()
            .filter(|e| (HYPERVISOR_LEAF..KVM_LEAVES).contains(&e.function));
        assert_eq!(ours.count(), 2);
    }

    #[test]
    fn bad_policies_are_refused() {
        assert!(CpuidPolicy::from_json(b"{").is_err());
        assert!(
            CpuidPolicy::from_json(br#"{"hide":[{"leaf":1,"register":"esi","bit":1}]}"#).is_err()
        );
        assert!(
            CpuidPolicy::from_json(br#"{"hide":[{"leaf":1,"register":"eax","bit":32}]}"#).is_err()
        );
        assert!(CpuidPolicy::from_json(br#"{"hyde":[]}"#).is_err());
        assert_eq!(
            CpuidPolicy::from_json(b"{}").unwrap(),
            CpuidPolicy::default()
        );
    }
}
