//! MSR access policy: KVM's MSR filter (KVM_X86_SET_MSR_FILTER) with denied
//! accesses forwarded to the VMM (KVM_CAP_X86_USER_SPACE_MSR, reason FILTER),
//! which refuses them — the guest gets #GP — and counts them.
//!
//! The policy from the host is JSON: `{"default": "allow" | "deny", "allow":
//! [index...], "deny": [index...]}`; listed MSRs are grouped into at most 16
//! contiguous ranges, KVM's limit.

use std::collections::BTreeSet;

use kvm_bindings::{
    kvm_msr_filter, kvm_msr_filter_range, KVM_MSR_FILTER_DEFAULT_ALLOW,
    KVM_MSR_FILTER_DEFAULT_DENY, KVM_MSR_FILTER_MAX_RANGES, KVM_MSR_FILTER_READ,
    KVM_MSR_FILTER_WRITE,
};
use serde::Deserialize;

use thiserror::Error;

/// Why an MSR policy is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MsrPolicyError {
    /// Not the policy's JSON shape.
    #[error("bad MSR policy: {0}")]
    Json(String),
    /// A default other than allow or deny.
    #[error("bad MSR policy: default must be \"allow\" or \"deny\", got {0:?}")]
    Default(String),
    /// An MSR in both lists.
    #[error("bad MSR policy: MSR {0:#x} is both allowed and denied")]
    Both(u32),
    /// More separate ranges than KVM takes.
    #[error("bad MSR policy: the listed MSRs form {0} separate ranges; KVM takes at most {max}", max = KVM_MSR_FILTER_MAX_RANGES)]
    TooManyRanges(usize),
}

/// The most MSRs one range may cover (KVM_MSR_FILTER_MAX_BITMAP_SIZE bytes of bits).
const MAX_RANGE_MSRS: u32 = 1536 * 8;

/// What the host asks for.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrPolicy {
    /// What happens to MSRs not listed: "allow" or "deny".
    #[serde(default = "allow")]
    pub default: String,
    /// MSRs always allowed.
    #[serde(default)]
    pub allow: Vec<u32>,
    /// MSRs always denied.
    #[serde(default)]
    pub deny: Vec<u32>,
}

fn allow() -> String {
    "allow".into()
}

/// One contiguous range with its permission bitmap (bit set = allowed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterRange {
    pub base: u32,
    pub bitmap: Vec<u8>,
    pub nmsrs: u32,
}

/// A validated filter, ready for KVM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsrFilter {
    pub default_allow: bool,
    pub ranges: Vec<FilterRange>,
}

impl MsrFilter {
    /// Parses and validates a policy.
    pub fn from_json(json: &[u8]) -> Result<MsrFilter, MsrPolicyError> {
        let policy: MsrPolicy =
            serde_json::from_slice(json).map_err(|e| MsrPolicyError::Json(e.to_string()))?;
        let default_allow = match policy.default.as_str() {
            "allow" => true,
            "deny" => false,
            other => return Err(MsrPolicyError::Default(other.to_string())),
        };
        let allow: BTreeSet<u32> = policy.allow.iter().copied().collect();
        let deny: BTreeSet<u32> = policy.deny.iter().copied().collect();
        if let Some(both) = allow.intersection(&deny).next() {
            return Err(MsrPolicyError::Both(*both));
        }
        let listed: BTreeSet<u32> = allow.union(&deny).copied().collect();
        // Group listed MSRs into contiguous runs; unlisted gaps inside a run
        // would change their meaning, so runs break at gaps.
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for &msr in &listed {
            match runs.last_mut() {
                Some((base, n)) if *base + *n == msr && *n < MAX_RANGE_MSRS => *n += 1,
                _ => runs.push((msr, 1)),
            }
        }
        if runs.len() > KVM_MSR_FILTER_MAX_RANGES as usize {
            return Err(MsrPolicyError::TooManyRanges(runs.len()));
        }
        let ranges = runs
            .into_iter()
            .map(|(base, nmsrs)| {
                let mut bitmap = vec![0u8; nmsrs.div_ceil(8) as usize];
                for i in 0..nmsrs {
                    if allow.contains(&(base + i)) {
                        bitmap[(i / 8) as usize] |= 1 << (i % 8);
                    }
                }
                FilterRange {
                    base,
                    bitmap,
                    nmsrs,
                }
            })
            .collect();
        Ok(MsrFilter {
            default_allow,
            ranges,
        })
    }

    /// The KVM struct. Its ranges point into `self`'s bitmaps: keep `self` alive
    /// (and unmodified) until the ioctl that takes it returns.
    pub fn to_kvm(&mut self) -> kvm_msr_filter {
        let mut filter = kvm_msr_filter {
            flags: if self.default_allow {
                KVM_MSR_FILTER_DEFAULT_ALLOW
            } else {
                KVM_MSR_FILTER_DEFAULT_DENY
            },
            ..Default::default()
        };
        for (slot, range) in filter.ranges.iter_mut().zip(self.ranges.iter_mut()) {
            *slot = kvm_msr_filter_range {
                flags: KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE,
                nmsrs: range.nmsrs,
                base: range.base,
                bitmap: range.bitmap.as_mut_ptr(),
            };
        }
        filter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_listed_msrs_into_ranges_with_allow_bits() {
        let f = MsrFilter::from_json(br#"{"deny":[16,17,19],"allow":[18]}"#).unwrap();
        assert!(f.default_allow);
        assert_eq!(f.ranges.len(), 1);
        assert_eq!((f.ranges[0].base, f.ranges[0].nmsrs), (16, 4));
        assert_eq!(f.ranges[0].bitmap, vec![0b0100]);
        let f = MsrFilter::from_json(br#"{"default":"deny","allow":[1,5]}"#).unwrap();
        assert!(!f.default_allow);
        assert_eq!(f.ranges.len(), 2);
    }

    #[test]
    fn bad_policies_are_refused() {
        assert_eq!(
            MsrFilter::from_json(br#"{"default":"maybe"}"#).unwrap_err(),
            MsrPolicyError::Default("maybe".into())
        );
        assert_eq!(
            MsrFilter::from_json(br#"{"allow":[1],"deny":[1]}"#).unwrap_err(),
            MsrPolicyError::Both(1)
        );
        let many: Vec<u32> = (0..17).map(|i| i * 100).collect();
        let json = format!(r#"{{"deny":{many:?}}}"#);
        assert!(matches!(
            MsrFilter::from_json(json.as_bytes()),
            Err(MsrPolicyError::TooManyRanges(_))
        ));
        assert!(matches!(
            MsrFilter::from_json(br#"{"deny":[-1]}"#),
            Err(MsrPolicyError::Json(_))
        ));
    }
}
