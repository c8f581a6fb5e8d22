//! `VirtioPciDevice`: a virtio device behind the modern PCI transport, as one PCI
//! function the VMM's bus can route config, MMIO and doorbell accesses to.
//!
//! The VMM's part (see `pci_layout` for the BAR map):
//! - place BAR0 (64-bit memory, `pci_layout::BAR_SIZE`) and route its accesses to
//!   `bar_read`/`bar_write`;
//! - register every `doorbells()` entry as a KVM ioeventfd (a write there then wakes the
//!   device thread directly); writes that still arrive through `bar_write` also work;
//! - back `MsiVectors::trigger` with irqfds and `configure` with GSI routes; give the
//!   function `VirtioPciDevice::msix_vectors_wanted()` vectors (0 = no MSI-X, INTx only);
//! - route INTA of the slot to an IOAPIC input behind `IrqLine`.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use log::{error, warn};
use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::common_cfg::{CommonConfig, StatusRequest};
use super::device::{ActivateError, Activation, ActiveQueue, GuestRam, VirtioDevice, VirtioInterrupt};
use super::irq::InterruptState;
use super::pci_layout::{self as layout, CapabilityOffsets};
use super::{log_sparingly, status, transport_features};
use crate::interrupt::{IrqLine, MsiVectors};
use crate::pci::{
    Doorbell, PciConfigSpace, PciDevice, PciIdentity, PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_STATUS,
};

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("device declares {0} queues; the transport supports 1 to {max}", max = layout::MAX_QUEUES)]
    QueueCount(usize),
    #[error("queue {index} has invalid maximum size {size} (must be a power of two, 1 to 32768)")]
    QueueSize { index: usize, size: u16 },
    #[error("{0} MSI-X vectors requested; the table has room for {max}", max = layout::MAX_MSIX_VECTORS)]
    MsixVectors(usize),
    #[error("device config space of {0} bytes does not fit its BAR window")]
    ConfigTooLarge(usize),
    #[error("cannot create queue eventfd: {0}")]
    EventFd(std::io::Error),
}

pub struct VirtioPciDevice {
    name: String,
    config: PciConfigSpace,
    device: Box<dyn VirtioDevice>,
    mem: GuestRam,
    common: CommonConfig,
    irq: Arc<InterruptState>,
    queue_kicks: Vec<EventFd>,
    caps: CapabilityOffsets,
    device_config_len: u64,
    active: bool,
    odd_accesses: u64,
}

impl VirtioPciDevice {
    /// How many MSI-X vectors give every queue its own vector plus one for config changes.
    pub fn msix_vectors_wanted(device: &dyn VirtioDevice) -> usize {
        device.queue_max_sizes().len() + 1
    }

    /// Wraps `device`. `msix.count()` sets the MSI-X table size (0: no MSI-X capability,
    /// the device then interrupts through `intx`, which is always wired as INTA).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestRam,
        msix: Arc<dyn MsiVectors>,
        intx: Arc<dyn IrqLine>,
    ) -> Result<VirtioPciDevice, TransportError> {
        let sizes = device.queue_max_sizes();
        if sizes.is_empty() || sizes.len() > layout::MAX_QUEUES {
            return Err(TransportError::QueueCount(sizes.len()));
        }
        let mut queues = Vec::with_capacity(sizes.len());
        for (index, &size) in sizes.iter().enumerate() {
            queues.push(Queue::new(size).map_err(|_| TransportError::QueueSize { index, size })?);
        }
        let msix_vectors = msix.count();
        if msix_vectors > layout::MAX_MSIX_VECTORS {
            return Err(TransportError::MsixVectors(msix_vectors));
        }
        let device_config_len = device.config_len() as u64;
        if device_config_len > layout::DEVICE_MAX_LEN {
            return Err(TransportError::ConfigTooLarge(device.config_len()));
        }
        let queue_kicks = (0..sizes.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;

        let device_id = layout::PCI_DEVICE_ID_VIRTIO_BASE.wrapping_add(device.device_type() as u16);
        let identity = PciIdentity {
            vendor_id: layout::PCI_VENDOR_ID_REDHAT_QUMRANET,
            device_id,
            // Non-transitional devices have revision 1 and a subsystem ID of 0x40 or more.
            revision: 1,
            class_code: device.pci_class(),
            subsystem_vendor_id: layout::PCI_VENDOR_ID_REDHAT_QUMRANET,
            subsystem_id: device_id,
        };
        let mut config = PciConfigSpace::new(identity, &layout::bars(), 1);
        let irq = Arc::new(InterruptState::new(sizes.len(), msix, intx));
        let caps =
            layout::add_capabilities(&mut config, device_config_len, sizes.len(), msix_vectors, irq.msix_pba_len());
        let offered = device.device_features() | transport_features::OFFERED;
        Ok(VirtioPciDevice {
            name: device.name().to_string(),
            config,
            device,
            mem,
            common: CommonConfig::new(offered, queues),
            irq,
            queue_kicks,
            caps,
            device_config_len,
            active: false,
            odd_accesses: 0,
        })
    }

    /// The device status register as the driver reads it.
    pub fn device_status(&self) -> u8 {
        let needs_reset = if self.irq.needs_reset() { status::DEVICE_NEEDS_RESET } else { 0 };
        self.common.status() | needs_reset
    }

    /// Features the driver and device agreed on (meaningful after FEATURES_OK).
    pub fn negotiated_features(&self) -> u64 {
        self.common.driver_features()
    }

    fn count_odd_access(&mut self, what: &str, offset: u64, len: usize) {
        self.odd_accesses += 1;
        if log_sparingly(self.odd_accesses) {
            warn!("{}: {what} at BAR offset {offset:#x} len {len} ignored ({} so far)", self.name, self.odd_accesses);
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.active = false;
        self.common.reset();
        self.irq.reset();
        // Kicks that raced the reset must not wake the next activation's worker.
        for kick in &self.queue_kicks {
            let _ = kick.read();
        }
    }

    fn features_acceptable(&self) -> Result<(), String> {
        let offered = self.common.offered_features();
        let wanted = self.common.driver_features();
        if wanted & !offered != 0 {
            return Err(format!("driver accepted unoffered features {:#x}", wanted & !offered));
        }
        if wanted & transport_features::VERSION_1 == 0 {
            return Err("driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are unsupported)".into());
        }
        self.device.validate_features(wanted)
    }

    fn write_status(&mut self, value: u8) {
        let old = self.common.status();
        if value & old != old {
            warn!("{}: driver cleared status bits {:#x} without a reset; ignored", self.name, old & !value);
            return;
        }
        let mut new = value & !status::DEVICE_NEEDS_RESET;
        let added = new & !old;
        if added & status::FEATURES_OK != 0 {
            if let Err(e) = self.features_acceptable() {
                warn!("{}: refusing FEATURES_OK: {e}", self.name);
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if new & status::FEATURES_OK == 0 {
                warn!("{}: DRIVER_OK without FEATURES_OK; ignored", self.name);
                new &= !status::DRIVER_OK;
            } else {
                self.common.set_status(new);
                if let Err(e) = self.activate() {
                    error!("{}: activation failed: {e}", self.name);
                    self.irq.signal_needs_reset();
                }
            }
        }
        self.common.set_status(new);
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        if self.active {
            return Err(ActivateError::AlreadyActive);
        }
        let features = self.common.driver_features();
        let event_idx = features & transport_features::EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.common.queues().len());
        for (index, (queue, kick)) in self.common.queues().iter().zip(&self.queue_kicks).enumerate() {
            let index = index as u16;
            let mut queue = Queue::try_from(queue.state()).map_err(|_| ActivateError::QueueInvalid(index))?;
            queue.set_event_idx(event_idx);
            // virtio-queue treats an available ring at address 0 as "not set up" and
            // would refuse (and log) every access, so such a ring is refused here.
            if queue.ready() && (!queue.is_valid(&self.mem) || queue.avail_ring() == 0) {
                return Err(ActivateError::QueueInvalid(index));
            }
            queues.push(ActiveQueue { index, queue, kick: kick.try_clone()? });
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.irq.clone();
        self.device.activate(Activation { mem: self.mem.clone(), features, queues, interrupt })?;
        self.active = true;
        Ok(())
    }

    fn notify(&mut self, offset: u64, len: usize) {
        let index = (offset / u64::from(layout::NOTIFY_OFF_MULTIPLIER)) as usize;
        match self.queue_kicks.get(index) {
            Some(kick) => {
                if let Err(e) = kick.write(1) {
                    warn!("{}: cannot signal queue {index}: {e}", self.name);
                }
            }
            None => self.count_odd_access("notify for a queue that does not exist", offset, len),
        }
    }

    /// The PCI-configuration access window: when the driver touches `pci_cfg_data`, the
    /// window's (bar, offset, length) selects a BAR access to perform.
    fn window_access(&self) -> Option<(u64, usize)> {
        let cap = self.caps.pci_cfg;
        let bar = self.config.read8(cap + layout::PCI_CFG_CAP_BAR) as usize;
        let offset = u64::from(self.config.read32(cap + layout::PCI_CFG_CAP_OFFSET));
        let length = self.config.read32(cap + layout::PCI_CFG_CAP_LENGTH) as usize;
        let aligned = matches!(length, 1 | 2 | 4) && offset % length as u64 == 0;
        (bar == layout::BAR_INDEX && aligned && offset + length as u64 <= layout::BAR_SIZE).then_some((offset, length))
    }

    fn touches_window_data(&self, offset: usize, len: usize) -> bool {
        let data = self.caps.pci_cfg + layout::PCI_CFG_CAP_DATA;
        offset < data + 4 && offset.saturating_add(len) > data
    }
}

/// Which register block a BAR access lands in, with the offset inside it. Accesses that
/// straddle two blocks are refused.
enum Block {
    Common(u64),
    Isr,
    Device(u64),
    Notify(u64),
    MsixTable(u64),
    MsixPba(u64),
}

impl VirtioPciDevice {
    fn block(&self, bar: usize, offset: u64, len: usize) -> Option<Block> {
        if bar != layout::BAR_INDEX {
            return None;
        }
        let end = offset.checked_add(len as u64)?;
        let within = |start: u64, size: u64| (offset >= start && end <= start + size).then(|| offset - start);
        let msix_len = self.irq.msix_len() as u64 * 16;
        let pba_len = self.irq.msix_pba_len() as u64;
        within(layout::COMMON_OFFSET, layout::COMMON_LEN)
            .map(Block::Common)
            .or_else(|| within(layout::ISR_OFFSET, layout::ISR_LEN).map(|_| Block::Isr))
            .or_else(|| within(layout::DEVICE_OFFSET, self.device_config_len).map(Block::Device))
            .or_else(|| {
                within(layout::NOTIFY_OFFSET, self.queue_kicks.len() as u64 * u64::from(layout::NOTIFY_OFF_MULTIPLIER))
                    .map(Block::Notify)
            })
            .or_else(|| within(layout::MSIX_TABLE_OFFSET, msix_len).map(Block::MsixTable))
            .or_else(|| within(layout::MSIX_PBA_OFFSET, pba_len).map(Block::MsixPba))
    }
}

impl PciDevice for VirtioPciDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if offset <= PCI_STATUS + 1 && offset + data.len() > PCI_STATUS {
            let pending = !self.irq.msix_enabled() && self.irq.intx_pending();
            self.config.set_interrupt_status(pending);
        }
        if self.touches_window_data(offset, data.len()) {
            let mut window = [0u8; 4];
            if let Some((bar_offset, length)) = self.window_access() {
                self.bar_read(layout::BAR_INDEX, bar_offset, &mut window[..length]);
            }
            self.config.set_bytes(self.caps.pci_cfg + layout::PCI_CFG_CAP_DATA, &window);
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let touches = |start: usize, len: usize| offset < start + len && offset.saturating_add(data.len()) > start;
        if touches(PCI_COMMAND, 2) {
            self.irq.set_intx_disabled(self.config.command() & PCI_COMMAND_INTX_DISABLE != 0);
        }
        if let Some(msix) = self.caps.msix {
            if touches(msix + 2, 2) {
                self.irq.set_msix_control(self.config.read16(msix + 2));
            }
        }
        if self.touches_window_data(offset, data.len()) {
            if let Some((bar_offset, length)) = self.window_access() {
                let mut window = [0u8; 4];
                self.config.read(self.caps.pci_cfg + layout::PCI_CFG_CAP_DATA, &mut window);
                self.bar_write(layout::BAR_INDEX, bar_offset, &window[..length]);
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match self.block(bar, offset, data.len()) {
            Some(Block::Common(off)) => self.common.read(off, data, &self.irq),
            Some(Block::Isr) => {
                if let Some(first) = data.first_mut() {
                    *first = self.irq.read_isr();
                }
            }
            Some(Block::Device(off)) => self.device.read_config(off, data),
            Some(Block::Notify(_)) => {}
            Some(Block::MsixTable(off)) => {
                self.irq.with_msix(|t| t.read_table(off, data));
            }
            Some(Block::MsixPba(off)) => {
                self.irq.with_msix(|t| t.read_pba(off, data));
            }
            None => self.count_odd_access("read outside any register block", offset, data.len()),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match self.block(bar, offset, data.len()) {
            Some(Block::Common(off)) => match self.common.write(off, data, &self.irq) {
                Some(StatusRequest::Reset) => self.reset(),
                Some(StatusRequest::Set { value }) => self.write_status(value),
                None => {}
            },
            Some(Block::Isr) => self.count_odd_access("write to read-only ISR", offset, data.len()),
            Some(Block::Device(off)) => self.device.write_config(off, data),
            Some(Block::Notify(off)) => self.notify(off, data.len()),
            Some(Block::MsixTable(off)) => {
                self.irq.with_msix(|t| t.write_table(off, data));
            }
            Some(Block::MsixPba(_)) => self.count_odd_access("write to read-only PBA", offset, data.len()),
            None => self.count_odd_access("write outside any register block", offset, data.len()),
        }
    }

    fn doorbells(&self) -> Vec<Doorbell> {
        self.queue_kicks
            .iter()
            .enumerate()
            .map(|(i, kick)| Doorbell {
                bar: layout::BAR_INDEX,
                offset: layout::NOTIFY_OFFSET + i as u64 * u64::from(layout::NOTIFY_OFF_MULTIPLIER),
                len: 2,
                fd: kick.as_raw_fd(),
            })
            .collect()
    }

    fn shutdown(&mut self) {
        self.device.shutdown();
        self.active = false;
    }

    fn stats(&self) -> String {
        self.device.stats()
    }
}

#[cfg(test)]
#[path = "pci_transport_tests.rs"]
mod tests;
