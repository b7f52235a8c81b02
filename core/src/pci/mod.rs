//! PCI: configuration spaces, MSI-X, and bus 0 behind configuration
//! mechanism #1, which is how Debian's kernel (whose `virtio_mmio` cannot be
//! told about devices on the command line) finds virtio devices.

pub mod config;
pub mod msix;
pub mod root;
