//! The CPUID a guest sees: KVM's supported CPUID, with the features a policy
//! hides cleared, the hypervisor leaves (0x4000_0000) carrying denovisor's
//! signature, and each vCPU's own APIC id.
//!
//! The policy comes from the host as JSON (`{"hide": [{"leaf", "subleaf",
//! "register", "bit"}]}`); feature names are resolved in TypeScript
//! (`src/cpu/cpuid.ts`), so this module only deals in bits.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use serde::Deserialize;

use crate::error::{Error, Result};

/// The hypervisor signature in leaf 0x4000_0000 (EBX, ECX, EDX), NUL-padded.
pub const SIGNATURE: &[u8; 12] = b"denovisor\0\0\0";
/// The first hypervisor leaf.
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;
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
    pub fn from_json(json: &[u8]) -> Result<CpuidPolicy> {
        let policy: CpuidPolicy = serde_json::from_slice(json)
            .map_err(|e| Error::arg(format!("bad CPUID policy: {e}")))?;
        if let Some(bad) = policy.hide.iter().find(|f| f.bit > 31) {
            return Err(Error::arg(format!(
                "bad CPUID policy: bit {} of leaf {:#x} is not a bit of a 32-bit register",
                bad.bit, bad.leaf
            )));
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
    // KVM's own paravirtual leaves are replaced by ours: the guest should see
    // denovisor, and features behind KVM's signature would be promised without
    // the VMM agreeing to them.
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| !(HYPERVISOR_LEAF..HYPERVISOR_LEAF + 0x100).contains(&e.function))
        .copied()
        .collect();
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
pub fn to_kvm(entries: &[kvm_cpuid_entry2]) -> Result<CpuId> {
    CpuId::from_entries(entries)
        .map_err(|e| Error::arg(format!("too many CPUID entries ({}): {e:?}", entries.len())))
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
        let mut sig = Vec::new();
        for r in [hv[0].ebx, hv[0].ecx, hv[0].edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig[..9], b"denovisor");
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
