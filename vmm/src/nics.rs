//! Builds each configured NIC: its backend from `net/`, its frontend from `devices/`, its
//! MAC (claimed host-wide so two running VMs never share one), its PCI slot and its INTx
//! wiring. This is the only place that knows both sides of the backend seam.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use tapir_devices::e1000::E1000;
use tapir_devices::pci::PciDevice;
use tapir_devices::virtio::net::{VirtioNet, VirtioNetConfig};
use tapir_devices::virtio::VirtioPciDevice;
use tapir_net::backend::Backend;
use tapir_net::mac::MacAddr;
use tapir_net::mac_registry::{MacClaim, MacRegistry};
use tapir_net::nat::UserNet;
use tapir_net::socket::{DgramBackend, StreamBackend};
use tapir_net::tap::Tap;

use crate::config::VmConfig;
use crate::interrupts::{GsiRouter, KvmIrqLine, KvmMsiVectors, IOAPIC_PINS};
use crate::mptable::PciIrq;
use crate::nic_config::{BackendConfig, NicModel};
use crate::pci_root::PciRoot;

/// PCI INTx lines use the IOAPIC inputs above the ISA range, like PIIX's PIRQs.
const FIRST_PCI_IOAPIC_PIN: u32 = 16;

#[derive(Debug, Error)]
pub enum NicError {
    #[error("nics[{index}].backend: {message}")]
    Backend { index: usize, message: String },
    #[error("nics[{index}].mac: {message}")]
    Mac { index: usize, message: String },
    #[error("nics[{index}] ({model}): {message}")]
    Device { index: usize, model: NicModel, message: String },
}

/// The NICs of a running VM, and what must live exactly as long as they do.
pub struct Nics {
    pub pci_irqs: Vec<PciIrq>,
    _mac_claims: Vec<MacClaim>,
}

impl Nics {
    pub fn start(&self) -> Result<(), crate::vm::VmError> {
        Ok(())
    }
}

/// Opens the backend and names it for the startup log.
fn open_backend(index: usize, cfg: &BackendConfig, mac: MacAddr) -> Result<(Box<dyn Backend>, String), NicError> {
    let err = |message: String| NicError::Backend { index, message };
    if let BackendConfig::Tap(t) = cfg {
        let tap = Tap::open(t, Some(mac)).map_err(|e| err(e.to_string()))?;
        let name = format!("tap {}{}", tap.ifname(), if tap.created() { " (created)" } else { "" });
        return Ok((Box::new(tap), name));
    }
    let backend: Box<dyn Backend> = match cfg {
        BackendConfig::Tap(_) => unreachable!("handled above"),
        BackendConfig::User(u) => Box::new(UserNet::new(u).map_err(|e| err(e.to_string()))?),
        BackendConfig::Stream(s) => Box::new(StreamBackend::new(s, mac).map_err(|e| err(e.to_string()))?),
        BackendConfig::Dgram(d) => Box::new(DgramBackend::new(d, mac).map_err(|e| err(e.to_string()))?),
    };
    let name = backend.kind().to_string();
    Ok((backend, name))
}


pub fn attach_all(
    cfg: &VmConfig,
    vm: &Arc<VmFd>,
    router: &Arc<GsiRouter>,
    memory: &GuestMemoryMmap,
    pci: &mut PciRoot,
) -> Result<Nics, NicError> {
    let registry = MacRegistry::new(
        std::env::var_os("TAPIR_MAC_REGISTRY").map(Into::into).unwrap_or_else(MacRegistry::default_dir),
    );
    let mut pci_irqs = Vec::new();
    let mut claims = Vec::new();
    for (index, nic) in cfg.nics.iter().enumerate() {
        let mac = nic.effective_mac(&cfg.name, index);
        let claim = registry
            .claim(mac, &cfg.name)
            .map_err(|e| NicError::Mac { index, message: e.to_string() })?;
        claims.push(claim);
        let (backend, backend_name) = open_backend(index, &nic.backend, mac)?;

        let ioapic_pin = FIRST_PCI_IOAPIC_PIN + (index as u32 % (IOAPIC_PINS - FIRST_PCI_IOAPIC_PIN));
        let intx = Arc::new(KvmIrqLine::new(vm.clone(), ioapic_pin));
        let device_err = |message: String| NicError::Device { index, model: nic.model, message };
        let device: Arc<Mutex<dyn PciDevice>> = match nic.model {
            NicModel::VirtioNet => {
                let net = VirtioNet::new(
                    VirtioNetConfig { mac, mtu: nic.mtu, queue_size: VirtioNetConfig::DEFAULT_QUEUE_SIZE },
                    backend,
                )
                .map_err(|e| device_err(e.to_string()))?;
                let vectors = VirtioPciDevice::msix_vectors_wanted(&net);
                let msix = Arc::new(KvmMsiVectors::new(vm, router.clone(), vectors).map_err(device_err)?);
                let dev = VirtioPciDevice::new(Box::new(net), memory.clone(), msix, intx)
                    .map_err(|e| device_err(e.to_string()))?;
                Arc::new(Mutex::new(dev))
            }
            NicModel::E1000 => {
                let dev = E1000::new(mac, backend, memory.clone(), intx).map_err(|e| device_err(e.to_string()))?;
                Arc::new(Mutex::new(dev))
            }
        };
        let slot = pci
            .add(device, ioapic_pin as u8)
            .map_err(|e| NicError::Device { index, model: nic.model, message: e.to_string() })?;
        pci_irqs.push(PciIrq { device: slot, pin: 1, ioapic_pin: ioapic_pin as u8 });
        log::info!("nics[{index}]: {} mac {mac} backend {backend_name} at PCI 00:{slot:02x}.0 irq {ioapic_pin}", nic.model);
    }
    Ok(Nics { pci_irqs, _mac_claims: claims })
}
