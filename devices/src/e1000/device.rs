//! The PCI function: identity, BARs, config space, the register path the vCPU threads
//! call, and the worker thread's lifetime.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tapir_net::backend::{Backend, Offloads};
use tapir_net::mac::{MacAddr, MacError};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::interrupt::IrqLine;
use crate::pci::{
    BarKind, BarSpec, PciConfigSpace, PciDevice, PciIdentity, PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_MASTER, PCI_STATUS,
};

use super::itr_timer::ItrTimer;
use super::registers::{may_take_rings_away, IOADDR, IODATA, IO_SIZE, MMIO_SIZE};
use super::state::State;
use super::worker::{Shared, Worker};

/// BAR0: the memory-mapped register window.
pub const MMIO_BAR: usize = 0;
/// BAR1: the I/O window (IOADDR/IODATA).
pub const IO_BAR: usize = 1;
/// INTA#.
pub const INTERRUPT_PIN: u8 = 1;

#[derive(Debug, Error)]
pub enum E1000Error {
    #[error("invalid MAC address: {0}")]
    Mac(#[from] MacError),
    #[error("cannot create the worker's eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot create the ITR timerfd: {0}")]
    TimerFd(std::io::Error),
    #[error("cannot start the worker thread: {0}")]
    Spawn(std::io::Error),
}

/// An Intel 82540EM gigabit NIC on a backend.
pub struct E1000 {
    config: PciConfigSpace,
    shared: Arc<Shared>,
    worker: Option<JoinHandle<Box<dyn Backend>>>,
    /// The backend once the worker has stopped, for final counters.
    backend: Option<Box<dyn Backend>>,
    io_address: u32,
    mac: MacAddr,
}

impl E1000 {
    /// Creates the device and starts its worker thread. The VMM places the BARs
    /// (`config_mut().set_bar_address`), routes INTA to `irq`, and forwards accesses.
    pub fn new(
        mac: MacAddr,
        mut backend: Box<dyn Backend>,
        mem: GuestMemoryMmap<()>,
        irq: Arc<dyn IrqLine>,
    ) -> Result<E1000, E1000Error> {
        let mac = mac.validate_for_nic()?;
        // Partial checksums from the host are completed here; GSO is never accepted
        // because this model does not segment received frames.
        let rx_offloads = Offloads {
            csum: backend.supported_offloads().csum,
            ..Offloads::NONE
        };
        if let Err(e) = backend.set_rx_offloads(rx_offloads) {
            log::warn!("e1000: backend refused receive offloads {rx_offloads:?}: {e}");
            if let Err(e) = backend.set_rx_offloads(Offloads::NONE) {
                log::warn!("e1000: backend refused to disable receive offloads: {e}");
            }
        }
        let timer = ItrTimer::new().map_err(E1000Error::TimerFd)?;
        let state = State::new(mac.octets(), backend.link_up(), irq, timer);
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            kick: EventFd::new(EFD_NONBLOCK).map_err(E1000Error::EventFd)?,
            stop: AtomicBool::new(false),
            dma: Mutex::new(()),
        });
        let worker = Worker::new(shared.clone(), backend, mem);
        let handle = std::thread::Builder::new()
            .name("e1000".into())
            .spawn(move || worker.run())
            .map_err(E1000Error::Spawn)?;
        let identity = PciIdentity {
            vendor_id: super::VENDOR_ID,
            device_id: super::DEVICE_ID,
            revision: 3,
            class_code: 0x02_00_00,
            subsystem_vendor_id: super::VENDOR_ID,
            subsystem_id: super::SUBSYSTEM_ID,
        };
        let bars = [
            BarSpec {
                index: MMIO_BAR,
                kind: BarKind::Memory32,
                size: MMIO_SIZE,
            },
            BarSpec {
                index: IO_BAR,
                kind: BarKind::Io,
                size: IO_SIZE,
            },
        ];
        Ok(E1000 {
            config: PciConfigSpace::new(identity, &bars, INTERRUPT_PIN),
            shared,
            worker: Some(handle),
            backend: None,
            io_address: 0,
            mac,
        })
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Reads `data.len()` bytes at `offset` of the register window, one register at a
    /// time. Sub-dword reads see the containing register (read side effects included).
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let mut state = self.shared.lock();
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let reg = at & !3;
            let skip = (at - reg) as usize;
            let take = (4 - skip).min(data.len() - done);
            let value = if reg < MMIO_SIZE {
                state.read(reg as u32)
            } else {
                0
            };
            data[done..done + take].copy_from_slice(&value.to_le_bytes()[skip..skip + take]);
            done += take;
        }
    }

    /// Writes `data` at `offset`, one register at a time. A sub-dword write stores its
    /// bytes in their lanes with the other lanes zero (no read-modify-write, which would
    /// trigger read side effects).
    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        let mut wake = false;
        let mut rings_taken = false;
        {
            let mut state = self.shared.lock();
            let mut done = 0;
            while done < data.len() {
                let at = offset + done as u64;
                let reg = at & !3;
                let skip = (at - reg) as usize;
                let take = (4 - skip).min(data.len() - done);
                let mut bytes = [0u8; 4];
                bytes[skip..skip + take].copy_from_slice(&data[done..done + take]);
                if reg < MMIO_SIZE {
                    wake |= state.write(reg as u32, u32::from_le_bytes(bytes));
                    rings_taken |= may_take_rings_away(reg as u32);
                }
                done += take;
            }
        }
        // After the state lock is released, so the worker can finish its packet.
        if rings_taken {
            self.shared.wait_for_dma();
        }
        if wake {
            self.shared.wake();
        }
    }

    /// The register IOADDR selects, if it lies inside the register window.
    fn io_target(&mut self) -> Option<u64> {
        let target = u64::from(self.io_address & !3);
        if target < MMIO_SIZE {
            return Some(target);
        }
        self.shared.lock().counters.drop_event(
            "io_bad_address",
            &format_args!("IODATA access with IOADDR {:#x}", self.io_address),
        );
        None
    }

    fn io_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let addr = self.io_address.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            if (IOADDR..IOADDR + 4).contains(&at) {
                *b = addr[(at - IOADDR) as usize];
            }
        }
        let data_lanes = IODATA..IODATA + 4;
        if data_lanes.contains(&offset) {
            if let Some(reg) = self.io_target() {
                let skip = (offset - IODATA) as usize;
                let take = data.len().min(4 - skip);
                self.mmio_read(reg + skip as u64, &mut data[..take]);
            }
        } else if offset >= IODATA + 4 {
            self.shared.lock().counters.drop_event(
                "unimplemented_register",
                &format_args!("I/O read at {offset:#x}"),
            );
        }
    }

    fn io_write(&mut self, offset: u64, data: &[u8]) {
        if offset < IODATA {
            let mut addr = self.io_address.to_le_bytes();
            for (i, &b) in data.iter().enumerate() {
                if let Some(slot) = addr.get_mut(offset as usize + i) {
                    *slot = b;
                }
            }
            self.io_address = u32::from_le_bytes(addr);
        } else if offset < IODATA + 4 {
            if let Some(reg) = self.io_target() {
                let skip = offset - IODATA;
                let take = data.len().min(4 - skip as usize);
                self.mmio_write(reg + skip, &data[..take]);
            }
        } else {
            self.shared.lock().counters.drop_event(
                "unimplemented_register",
                &format_args!("I/O write at {offset:#x}"),
            );
        }
    }

    fn stop_worker(&mut self) {
        let Some(handle) = self.worker.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        match handle.join() {
            Ok(backend) => self.backend = Some(backend),
            Err(_) => log::error!("e1000: worker thread panicked"),
        }
    }

    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl PciDevice for E1000 {
    fn name(&self) -> &str {
        "e1000"
    }

    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if offset < PCI_STATUS + 2 && offset + data.len() > PCI_STATUS {
            let pending = self.shared.lock().interrupt_status();
            self.config.set_interrupt_status(pending);
        }
        self.config.read(offset, data)
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        if offset < PCI_COMMAND + 2 && offset + data.len() > PCI_COMMAND {
            let command = self.config.command();
            self.shared.lock().set_pci_command(
                command & PCI_COMMAND_INTX_DISABLE != 0,
                command & PCI_COMMAND_MASTER != 0,
            );
            // Clearing bus mastering stops DMA; make that true before the write returns.
            self.shared.wait_for_dma();
            self.shared.wake();
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match bar {
            MMIO_BAR if offset < MMIO_SIZE => self.mmio_read(offset, data),
            IO_BAR if offset < IO_SIZE => self.io_read(offset, data),
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            MMIO_BAR if offset < MMIO_SIZE => self.mmio_write(offset, data),
            IO_BAR if offset < IO_SIZE => self.io_write(offset, data),
            _ => {}
        }
    }

    fn shutdown(&mut self) {
        self.stop_worker();
    }

    fn stats(&self) -> String {
        let device = self.shared.lock().counters.summary();
        match &self.backend {
            Some(b) => format!(
                "e1000 {}: {device}; backend {}: {}",
                self.mac,
                b.kind(),
                b.counters()
            ),
            None => format!("e1000 {}: {device}", self.mac),
        }
    }
}

impl Drop for E1000 {
    fn drop(&mut self) {
        self.stop_worker();
    }
}
