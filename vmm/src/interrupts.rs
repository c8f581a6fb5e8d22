//! KVM-backed implementations of the devices crate's interrupt traits: INTx through
//! KVM_IRQ_LINE, MSI-X through irqfds whose GSIs the routing table points at MSI
//! messages.

use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use tapir_devices::interrupt::{IrqLine, MsiMessage, MsiVectors};

use crate::legacy::lock;

/// IOAPIC inputs; GSIs at or above this are free for MSI.
pub const IOAPIC_PINS: u32 = 24;

/// A PCI INTx line wired to an IOAPIC pin. KVM's IOAPIC takes level 1 as asserted
/// whatever polarity the guest programs.
pub struct KvmIrqLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl KvmIrqLine {
    pub fn new(vm: Arc<VmFd>, gsi: u32) -> Self {
        KvmIrqLine { vm, gsi }
    }
}

impl IrqLine for KvmIrqLine {
    fn set_level(&self, asserted: bool) {
        if let Err(e) = self.vm.set_irq_line(self.gsi, asserted) {
            log::error!("KVM_IRQ_LINE gsi {} level {}: {e}", self.gsi, asserted);
        }
    }
}

/// The VM's whole GSI routing table. KVM_SET_GSI_ROUTING replaces the table wholesale,
/// so every update re-sends the irqchip defaults plus all MSI routes.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi_routes: Mutex<Vec<(u32, MsiMessage)>>,
    next_gsi: Mutex<u32>,
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Arc<GsiRouter> {
        Arc::new(GsiRouter { vm, msi_routes: Mutex::new(Vec::new()), next_gsi: Mutex::new(IOAPIC_PINS) })
    }

    pub fn allocate_gsi(&self) -> u32 {
        let mut next = lock(&self.next_gsi);
        let gsi = *next;
        *next += 1;
        gsi
    }

    fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
        let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    }

    fn default_entries() -> Vec<kvm_irq_routing_entry> {
        let mut entries = Vec::new();
        for gsi in 0..IOAPIC_PINS {
            entries.push(Self::irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < 16 {
                let chip = if gsi < 8 { KVM_IRQCHIP_PIC_MASTER } else { KVM_IRQCHIP_PIC_SLAVE };
                entries.push(Self::irqchip_entry(gsi, chip, gsi % 8));
            }
        }
        entries
    }

    pub fn set_msi_route(&self, gsi: u32, message: Option<MsiMessage>) -> Result<(), String> {
        let mut routes = lock(&self.msi_routes);
        routes.retain(|(g, _)| *g != gsi);
        if let Some(m) = message {
            routes.push((gsi, m));
        }
        let mut entries = Self::default_entries();
        for (gsi, m) in routes.iter() {
            let mut e = kvm_irq_routing_entry { gsi: *gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
            e.u.msi.address_lo = m.address as u32;
            e.u.msi.address_hi = (m.address >> 32) as u32;
            e.u.msi.data = m.data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries).map_err(|e| format!("routing table: {e:?}"))?;
        self.vm.set_gsi_routing(&table).map_err(|e| format!("KVM_SET_GSI_ROUTING: {e}"))
    }
}

/// One device's MSI-X vectors: each has a GSI and an irqfd on it.
pub struct KvmMsiVectors {
    router: Arc<GsiRouter>,
    vectors: Vec<(u32, EventFd)>,
}

impl KvmMsiVectors {
    pub fn new(vm: &VmFd, router: Arc<GsiRouter>, count: usize) -> Result<KvmMsiVectors, String> {
        let mut vectors = Vec::with_capacity(count);
        for _ in 0..count {
            let gsi = router.allocate_gsi();
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
            vm.register_irqfd(&fd, gsi).map_err(|e| format!("KVM_IRQFD gsi {gsi}: {e}"))?;
            vectors.push((gsi, fd));
        }
        Ok(KvmMsiVectors { router, vectors })
    }
}

impl MsiVectors for KvmMsiVectors {
    fn count(&self) -> usize {
        self.vectors.len()
    }

    fn configure(&self, vector: usize, message: Option<MsiMessage>) -> Result<(), String> {
        let (gsi, _) = self.vectors.get(vector).ok_or_else(|| format!("no MSI-X vector {vector}"))?;
        self.router.set_msi_route(*gsi, message)
    }

    fn trigger(&self, vector: usize) {
        if let Some((gsi, fd)) = self.vectors.get(vector) {
            if let Err(e) = fd.write(1) {
                log::warn!("irqfd for gsi {gsi}: {e}");
            }
        }
    }
}
