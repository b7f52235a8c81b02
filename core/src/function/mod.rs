//! Functions as micro-VMs (issue 10): the ABI between the guest function
//! runtime and the VMM.

pub mod abi;
