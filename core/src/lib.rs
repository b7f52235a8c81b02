//! denovisor's core: the hot path of a KVM hypervisor whose control plane is
//! TypeScript. It owns guest memory, the vCPU threads, the VM-exit loop and the hot
//! devices, and exposes them through the small C ABI in [`abi`].
//!
//! Layering, bottom up: [`memory`], [`devices`] and [`hypercall`] know nothing of
//! KVM threads;
//! [`vcpu`] runs the exit loop over them; [`vm`] ties a VM together; [`boot`] puts a
//! guest image and its CPU state in place; [`handles`] and [`abi`] are the boundary.

pub mod abi;
pub mod boot;
pub mod contract;
pub mod cpuid;
pub mod devices;
pub mod dirty;
pub mod error;
pub mod function;
pub mod handles;
pub mod hypercall;
pub mod irq;
pub mod ksm;
pub mod memory;
pub mod metrics;
pub mod migration;
pub mod msi;
pub mod msr_filter;
pub mod pci;
pub mod rate_limiter;
pub mod seccomp;
pub mod snapshot;
pub mod state;
pub mod vcpu;
pub mod virtio;
pub mod vm;

#[cfg(test)]
mod test_rng;
