//! Message-signalled interrupts from devices through KVM: a GSI routing table
//! with MSI routes next to the irqchip's default ones, and an irqfd per MSI-X
//! vector, so a device worker raises an interrupt with one `write(2)` on an
//! eventfd and KVM delivers it to the local APIC the guest programmed.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so [`GsiRoutes`] keeps it:
//! the 16 PIC and 24 IOAPIC routes KVM installs by default (GSI 0-23), then
//! one MSI route per allocated GSI from 24 up.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing, kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1,
    kvm_irq_routing_irqchip, kvm_irq_routing_msi, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::irq::IOAPIC_PINS;
use crate::pci::msix::MsiSink;

/// The largest GSI KVM routes on x86 (KVM_MAX_IRQ_ROUTES is 4096).
const MAX_GSI: u32 = 4095;

/// What can go wrong wiring MSIs.
#[derive(Debug, Error)]
pub enum MsiError {
    /// Every GSI is taken.
    #[error("out of GSIs for MSI routes")]
    OutOfGsis,
    /// An eventfd could not be made.
    #[error("creating an MSI eventfd: {0}")]
    EventFd(std::io::Error),
    /// KVM refused.
    #[error("{op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// The VM's GSI routing table.
pub struct GsiRoutes {
    vm: Arc<VmFd>,
    state: Mutex<RoutesState>,
}

struct RoutesState {
    msi: BTreeMap<u32, (u64, u32)>,
    next: u32,
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
        ..Default::default()
    }
}

/// The entries of the table: KVM's defaults, then the MSI routes.
fn entries(msi: &BTreeMap<u32, (u64, u32)>) -> Vec<kvm_irq_routing_entry> {
    let mut out = Vec::with_capacity(40 + msi.len());
    for gsi in 0..16 {
        let chip = if gsi < 8 {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        };
        out.push(irqchip_entry(gsi, chip, gsi % 8));
    }
    for gsi in 0..IOAPIC_PINS {
        out.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for (&gsi, &(address, data)) in msi {
        out.push(kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            u: kvm_irq_routing_entry__bindgen_ty_1 {
                msi: kvm_irq_routing_msi {
                    address_lo: address as u32,
                    address_hi: (address >> 32) as u32,
                    data,
                    ..Default::default()
                },
            },
            ..Default::default()
        });
    }
    out
}

impl GsiRoutes {
    /// The table of `vm` (which has an irqchip).
    pub fn new(vm: Arc<VmFd>) -> GsiRoutes {
        GsiRoutes {
            vm,
            state: Mutex::new(RoutesState {
                msi: BTreeMap::new(),
                next: IOAPIC_PINS,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RoutesState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `n` GSIs for MSI routes.
    pub fn allocate(&self, n: u32) -> Result<Vec<u32>, MsiError> {
        let mut s = self.lock();
        let end = s.next.checked_add(n).filter(|&e| e <= MAX_GSI + 1);
        let end = end.ok_or(MsiError::OutOfGsis)?;
        let gsis = (s.next..end).collect();
        s.next = end;
        Ok(gsis)
    }

    /// Routes `gsi` to the MSI `message` (address, data), or removes its route.
    pub fn set(&self, gsi: u32, message: Option<(u64, u32)>) -> Result<(), MsiError> {
        let mut s = self.lock();
        match message {
            Some(m) => s.msi.insert(gsi, m),
            None => s.msi.remove(&gsi),
        };
        let table = entries(&s.msi);
        // kvm_irq_routing is a header followed by a flexible array: lay both in
        // one buffer of entries (the 8-byte header fits in the first one).
        let mut buf = vec![kvm_irq_routing_entry::default(); table.len() + 1];
        buf[1..].copy_from_slice(&table);
        let header = buf.as_mut_ptr() as *mut kvm_irq_routing;
        // SAFETY: `buf` is a live, suitably aligned allocation of at least the
        // header's size (one entry is 40 bytes, the header 8); the header's
        // fields are plain integers written in place.
        unsafe {
            (*header).nr = table.len() as u32;
            (*header).flags = 0;
        }
        // The entries must start right after the 8-byte header.
        let entries_at = std::mem::size_of::<kvm_irq_routing>();
        // SAFETY: both ranges lie inside `buf` (entries_at + table bytes <=
        // (table.len() + 1) * 40) and `copy` allows overlap.
        unsafe {
            std::ptr::copy(
                buf[1..].as_ptr() as *const u8,
                (buf.as_mut_ptr() as *mut u8).add(entries_at),
                std::mem::size_of_val(&table[..]),
            );
        }
        // SAFETY: the header points at a buffer holding `nr` entries after it.
        let routing = unsafe { &*header };
        self.vm
            .set_gsi_routing(routing)
            .map_err(|source| MsiError::Kvm {
                op: "KVM_SET_GSI_ROUTING",
                source,
            })
    }
}

/// MSI-X delivery for one device: an irqfd on its own GSI per vector.
pub struct KvmMsiSink {
    routes: Arc<GsiRoutes>,
    vectors: Vec<(u32, EventFd)>,
}

impl KvmMsiSink {
    /// `n` vectors, each an eventfd registered with `KVM_IRQFD` on a fresh GSI.
    pub fn new(vm: &VmFd, routes: Arc<GsiRoutes>, n: u16) -> Result<KvmMsiSink, MsiError> {
        let gsis = routes.allocate(n as u32)?;
        let mut vectors = Vec::with_capacity(n as usize);
        for gsi in gsis {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(MsiError::EventFd)?;
            vm.register_irqfd(&fd, gsi)
                .map_err(|source| MsiError::Kvm {
                    op: "KVM_IRQFD",
                    source,
                })?;
            vectors.push((gsi, fd));
        }
        Ok(KvmMsiSink { routes, vectors })
    }
}

impl MsiSink for KvmMsiSink {
    fn set_route(&self, vector: u16, message: Option<(u64, u32)>) {
        if let Some((gsi, _)) = self.vectors.get(vector as usize) {
            // A refused route (a guest writing garbage to the table) leaves the
            // vector undeliverable, which is what garbage deserves.
            let _ = self.routes.set(*gsi, message);
        }
    }

    fn fire(&self, vector: u16) {
        if let Some((_, fd)) = self.vectors.get(vector as usize) {
            // EAGAIN: the counter is saturated, an interrupt is pending anyway.
            let _ = fd.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_kvms_defaults_and_adds_msi_routes() {
        let mut msi = BTreeMap::new();
        msi.insert(24, (0x1_fee0_1000u64, 0x4041u32));
        let e = entries(&msi);
        assert_eq!(e.len(), 16 + 24 + 1);
        // SAFETY: (test) reading the union members these entries were built with.
        unsafe {
            assert_eq!(e[9].u.irqchip.irqchip, KVM_IRQCHIP_PIC_SLAVE);
            assert_eq!(e[9].u.irqchip.pin, 1);
            assert_eq!(e[16 + 23].u.irqchip.irqchip, KVM_IRQCHIP_IOAPIC);
            assert_eq!(e[40].u.msi.address_hi, 1);
            assert_eq!(e[40].u.msi.data, 0x4041);
        }
        assert_eq!((e[40].gsi, e[40].type_), (24, KVM_IRQ_ROUTING_MSI));
    }
}
