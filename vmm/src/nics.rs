//! Builds each configured NIC: its backend from `net/`, its frontend from `devices/`,
//! its MAC, its PCI slot and interrupt wiring.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use crate::config::VmConfig;
use crate::interrupts::GsiRouter;
use crate::mptable::PciIrq;
use crate::pci_root::PciRoot;

#[derive(Debug, Error)]
pub enum NicError {
    #[error("nics[{index}]: {message}")]
    Setup { index: usize, message: String },
}

/// The NICs of a running VM, and what must live as long as they do.
pub struct Nics {
    pub pci_irqs: Vec<PciIrq>,
}

impl Nics {
    pub fn start(&self) -> Result<(), crate::vm::VmError> {
        Ok(())
    }
}

pub fn attach_all(
    cfg: &VmConfig,
    _vm: &Arc<VmFd>,
    _router: &Arc<GsiRouter>,
    _memory: &GuestMemoryMmap,
    _pci: &mut PciRoot,
) -> Result<Nics, NicError> {
    if let Some((index, _)) = cfg.nics.iter().enumerate().next() {
        return Err(NicError::Setup { index, message: "NIC backends are not built into this tapir yet".into() });
    }
    Ok(Nics { pci_irqs: Vec::new() })
}
