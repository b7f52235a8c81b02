//! Snapshots: the complete CPU and VM state of a paused VM as plain serde data,
//! and its restore into a fresh VM.
//!
//! [`cpu::VcpuState`] is one vCPU as KVM holds it (registers, XSAVE, MSRs, local
//! APIC, pending events...); [`vm::VmState`] adds the VM-wide in-kernel state
//! (PIC, IOAPIC, PIT, KVM clock) and every vCPU. Guest memory and device state
//! travel beside them (see [`vm::copy_memory`] and `VmShared::device_states`).
//!
//! KVM structures are carried as their exact bytes ([`Raw`]): the kernel's own
//! layout, which the same kernel reads back. A section whose byte count is not
//! the structure's size is refused rather than zero-padded.

pub mod cpu;
pub mod file;
pub mod pages;
pub mod vm;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// Why a snapshot could not be captured or restored. Every message starts with
/// the section it concerns (`vcpu 1 xsave: ...`, `vm clock: ...`).
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// The VM is not paused: {0}
    #[error("the VM is not paused: {0}")]
    NotPaused(String),
    /// {section}: {op} failed: {source}
    #[error("{section}: {op} failed: {source}")]
    Kvm {
        /// What was being saved or restored (`vcpu 0 lapic`).
        section: String,
        /// The KVM ioctl.
        op: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// {section}: {message}
    #[error("{section}: {message}")]
    Refused {
        /// The section that does not fit (`vm`, `vcpu 1 msrs`, `state`).
        section: String,
        /// Why.
        message: String,
    },
    /// snapshot {section}: {message}
    #[error("snapshot {section}: {message}")]
    Invalid {
        /// The section of the snapshot file that is truncated, corrupted,
        /// missing or malformed (`header`, `host`, `vm`, `memory`...).
        section: String,
        /// What is wrong with it.
        message: String,
    },
    /// snapshot host: wrong host CPU: {0}
    #[error("snapshot host: wrong host CPU: {0}")]
    WrongHost(String),
    /// {path}: {op}: {source}
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What was done.
        op: &'static str,
        /// The host's error.
        source: std::io::Error,
    },
}

impl SnapshotError {
    /// Wraps a failed KVM ioctl on `section`.
    pub(crate) fn kvm(
        section: impl Into<String>,
        op: &'static str,
    ) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
        let section = section.into();
        move |source| SnapshotError::Kvm {
            section,
            op,
            source,
        }
    }

    /// A section the target VM or the data refuses.
    pub(crate) fn refused(section: impl Into<String>, message: impl Into<String>) -> SnapshotError {
        SnapshotError::Refused {
            section: section.into(),
            message: message.into(),
        }
    }
}

/// A KVM structure serialized as its exact bytes (kvm-bindings' `serde`
/// feature); deserializing refuses any other byte count, where kvm-bindings
/// alone would zero-pad a truncated structure.
#[derive(Clone, Copy, Default)]
pub struct Raw<T>(pub T);

impl<T: Serialize> Serialize for Raw<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Raw<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = Vec::<u8>::deserialize(deserializer)?;
        let want = std::mem::size_of::<T>();
        if bytes.len() != want {
            return Err(D::Error::custom(format!(
                "{} bytes where a {} of {want} bytes was expected",
                bytes.len(),
                short_type_name::<T>(),
            )));
        }
        let exact = serde::de::value::BytesDeserializer::<D::Error>::new(&bytes);
        T::deserialize(exact).map(Raw)
    }
}

fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_regs;

    #[test]
    fn raw_structures_round_trip_through_json() {
        let regs = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            rip: 0x10_0000,
            rflags: 0x202,
            ..Default::default()
        };
        let json = serde_json::to_string(&Raw(regs)).unwrap();
        let back: Raw<kvm_regs> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.0, regs);
    }

    #[test]
    fn a_truncated_or_padded_structure_is_refused_with_its_size() {
        let json = serde_json::to_value(Raw(kvm_regs::default())).unwrap();
        let mut bytes: Vec<u8> = serde_json::from_value(json).unwrap();
        let whole = bytes.len();
        bytes.pop();
        let e = serde_json::from_value::<Raw<kvm_regs>>(serde_json::to_value(&bytes).unwrap())
            .err()
            .expect("a truncated kvm_regs must be refused");
        let message = e.to_string();
        assert!(
            message.contains(&format!(
                "{} bytes where a kvm_regs of {whole} bytes",
                whole - 1
            )),
            "{message}"
        );
        bytes.extend([0, 0]);
        assert!(
            serde_json::from_value::<Raw<kvm_regs>>(serde_json::to_value(&bytes).unwrap()).is_err()
        );
    }

    #[test]
    fn errors_name_their_section() {
        let e = SnapshotError::refused("vcpu 1 msrs", "MSR 0x10 was refused");
        assert_eq!(e.to_string(), "vcpu 1 msrs: MSR 0x10 was refused");
        let e = SnapshotError::kvm("vcpu 1 xsave", "KVM_GET_XSAVE")(kvm_ioctls::Error::new(
            libc::EINVAL,
        ));
        assert!(
            e.to_string()
                .starts_with("vcpu 1 xsave: KVM_GET_XSAVE failed: "),
            "{e}"
        );
    }
}
