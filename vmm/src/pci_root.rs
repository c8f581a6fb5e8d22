//! PCI bus 0: configuration mechanism #1 (0xcf8/0xcfc), BAR placement in the MMIO hole
//! and the I/O window, and routing of BAR accesses to device models. Doorbells are
//! re-registered as KVM ioeventfds whenever the guest moves a BAR.

use std::mem::ManuallyDrop;
use std::os::unix::io::FromRawFd;
use std::sync::{Arc, Mutex, RwLock};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use tapir_devices::pci::{BarKind, Doorbell, PciConfigSpace, PciDevice, PciIdentity, PCI_BAR0, PCI_COMMAND, PCI_COMMAND_IO, PCI_COMMAND_MEMORY, PCI_INTERRUPT_LINE};

use crate::layout::{MMIO_HOLE_START, PCI_IO_END, PCI_IO_START, PCI_MMIO_END};
use crate::legacy::lock;

pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
pub const CONFIG_DATA_PORT: u16 = 0xcfc;
/// Bus 0 has 32 device slots; slot 0 is the host bridge.
pub const MAX_SLOTS: usize = 32;

#[derive(Debug, Error)]
pub enum PciError {
    #[error("no free PCI slot for {0}: bus 0 holds at most {MAX_SLOTS} devices")]
    NoSlot(String),
    #[error("BAR {bar} of {device} ({size:#x} bytes) does not fit in the PCI {space} window")]
    NoSpace { device: String, bar: usize, size: u64, space: &'static str },
}

struct HostBridge {
    config: PciConfigSpace,
}

impl PciDevice for HostBridge {
    fn name(&self) -> &str {
        "host-bridge"
    }
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

#[derive(Clone, Copy, Debug)]
struct BarRange {
    start: u64,
    len: u64,
    io: bool,
    slot: usize,
    bar: usize,
}

type SharedDevice = Arc<Mutex<dyn PciDevice>>;

pub struct PciRoot {
    vm: Option<Arc<VmFd>>,
    config_address: Mutex<u32>,
    slots: Vec<SharedDevice>,
    /// Decoded BAR windows, rebuilt after any config write that can move or disable one.
    bar_map: RwLock<Vec<BarRange>>,
    /// Doorbells currently registered with KVM, per slot, as (address, fd).
    registered_doorbells: Mutex<Vec<Vec<(u64, Doorbell)>>>,
    next_mmio: u64,
    next_io: u64,
}

impl PciRoot {
    /// `vm` is None only in tests that run the bus without KVM.
    pub fn new(vm: Option<Arc<VmFd>>) -> PciRoot {
        let bridge = HostBridge {
            config: PciConfigSpace::new(
                PciIdentity {
                    vendor_id: 0x1b36,
                    device_id: 0x0008,
                    revision: 0,
                    class_code: 0x06_00_00,
                    subsystem_vendor_id: 0x1b36,
                    subsystem_id: 0x0008,
                },
                &[],
                0,
            ),
        };
        let slots: Vec<SharedDevice> = vec![Arc::new(Mutex::new(bridge))];
        PciRoot {
            vm,
            config_address: Mutex::new(0),
            slots,
            bar_map: RwLock::new(Vec::new()),
            registered_doorbells: Mutex::new(vec![Vec::new()]),
            next_mmio: MMIO_HOLE_START,
            next_io: u64::from(PCI_IO_START),
        }
    }

    /// Adds a device in the next free slot, places its BARs, and returns the slot number.
    pub fn add(&mut self, device: SharedDevice, interrupt_line: u8) -> Result<u8, PciError> {
        let slot = self.slots.len();
        let name = lock(&device).name().to_string();
        if slot >= MAX_SLOTS {
            return Err(PciError::NoSlot(name));
        }
        {
            let mut dev = lock(&device);
            let bars = dev.config().bars().to_vec();
            for bar in bars {
                let (cursor, end, space) = match bar.kind {
                    BarKind::Io => (&mut self.next_io, u64::from(PCI_IO_END) + 1, "I/O"),
                    _ => (&mut self.next_mmio, PCI_MMIO_END, "MMIO"),
                };
                let size = bar.size.max(if bar.kind == BarKind::Io { 4 } else { 0x1000 });
                let base = cursor.checked_add(size - 1).map(|v| v & !(size - 1));
                let Some(base) = base.filter(|b| b.checked_add(size).is_some_and(|e| e <= end)) else {
                    return Err(PciError::NoSpace { device: name, bar: bar.index, size, space });
                };
                dev.config_mut().set_bar_address(bar.index, base);
                *cursor = base + size;
            }
            dev.config_mut().set_bytes(PCI_INTERRUPT_LINE, &[interrupt_line]);
        }
        self.slots.push(device);
        lock(&self.registered_doorbells).push(Vec::new());
        self.refresh_slot(slot);
        Ok(slot as u8)
    }

    pub fn devices(&self) -> impl Iterator<Item = &SharedDevice> {
        self.slots.iter().skip(1)
    }

    /// Rebuilds the BAR map entries and doorbell registrations of one slot.
    fn refresh_slot(&self, slot: usize) {
        let Some(device) = self.slots.get(slot) else { return };
        let (ranges, doorbells) = {
            let dev = lock(device);
            let cfg = dev.config();
            let command = cfg.command();
            let mut ranges = Vec::new();
            for bar in cfg.bars() {
                let io = bar.kind == BarKind::Io;
                let enabled = if io { command & PCI_COMMAND_IO != 0 } else { command & PCI_COMMAND_MEMORY != 0 };
                // A BAR being sized reads back as its size mask; don't decode it.
                if let Some(start) = cfg.bar_address(bar.index).filter(|&a| enabled && a != 0) {
                    if start.checked_add(bar.size).is_some() {
                        ranges.push(BarRange { start, len: bar.size, io, slot, bar: bar.index });
                    }
                }
            }
            let doorbells: Vec<(u64, Doorbell)> = dev
                .doorbells()
                .into_iter()
                .filter_map(|d| {
                    ranges
                        .iter()
                        .find(|r| r.bar == d.bar && !r.io && d.offset < r.len)
                        .map(|r| (r.start + d.offset, d))
                })
                .collect();
            (ranges, doorbells)
        };
        {
            let mut map = self.bar_map.write().unwrap_or_else(|p| p.into_inner());
            map.retain(|r| r.slot != slot);
            map.extend(ranges);
        }
        self.update_doorbells(slot, doorbells);
    }

    fn update_doorbells(&self, slot: usize, wanted: Vec<(u64, Doorbell)>) {
        let Some(vm) = &self.vm else { return };
        let mut registered = lock(&self.registered_doorbells);
        let Some(current) = registered.get_mut(slot) else { return };
        if *current == wanted {
            return;
        }
        for (addr, d) in current.iter() {
            // SAFETY: the fd belongs to the device and outlives this call; ManuallyDrop
            // keeps us from closing it.
            let fd = ManuallyDrop::new(unsafe { EventFd::from_raw_fd(d.fd) });
            if let Err(e) = vm.unregister_ioevent(&fd, &IoEventAddress::Mmio(*addr), NoDatamatch) {
                log::warn!("unregister ioeventfd at {addr:#x}: {e}");
            }
        }
        current.clear();
        for (addr, d) in wanted {
            // SAFETY: as above.
            let fd = ManuallyDrop::new(unsafe { EventFd::from_raw_fd(d.fd) });
            match vm.register_ioevent(&fd, &IoEventAddress::Mmio(addr), NoDatamatch) {
                Ok(()) => current.push((addr, d)),
                // The device still sees the write through bar_write and signals itself.
                Err(e) => log::warn!("ioeventfd at {addr:#x} not registered ({e}); notifications go through MMIO exits"),
            }
        }
    }

    fn decode_address(&self) -> Option<(usize, usize)> {
        let addr = *lock(&self.config_address);
        if addr & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (addr >> 16) & 0xff;
        let device = ((addr >> 11) & 0x1f) as usize;
        let function = (addr >> 8) & 0x7;
        let register = (addr & 0xfc) as usize;
        if bus != 0 || function != 0 || device >= self.slots.len() {
            return None;
        }
        Some((device, register))
    }

    /// Port I/O on 0xcf8..=0xcff.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if port == CONFIG_ADDRESS_PORT && data.len() == 4 {
            data.copy_from_slice(&lock(&self.config_address).to_le_bytes());
            return;
        }
        let Some(offset) = port.checked_sub(CONFIG_DATA_PORT).filter(|o| *o < 4) else {
            data.fill(0xff);
            return;
        };
        match self.decode_address() {
            Some((slot, register)) => {
                let start = register + offset as usize;
                if start + data.len() > 256 {
                    data.fill(0xff);
                } else {
                    lock(&self.slots[slot]).config_read(start, data);
                }
            }
            None => data.fill(0xff),
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if port == CONFIG_ADDRESS_PORT && data.len() == 4 {
            *lock(&self.config_address) = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            return;
        }
        let Some(offset) = port.checked_sub(CONFIG_DATA_PORT).filter(|o| *o < 4) else { return };
        let Some((slot, register)) = self.decode_address() else { return };
        let start = register + offset as usize;
        if start + data.len() > 256 {
            return;
        }
        lock(&self.slots[slot]).config_write(start, data);
        let touches = |lo: usize, hi: usize| start < hi && start + data.len() > lo;
        if touches(PCI_COMMAND, PCI_COMMAND + 2) || touches(PCI_BAR0, PCI_BAR0 + 24) {
            self.refresh_slot(slot);
        }
    }

    fn find(&self, addr: u64, len: usize, io: bool) -> Option<(SharedDevice, usize, u64)> {
        let map = self.bar_map.read().unwrap_or_else(|p| p.into_inner());
        let r = map.iter().find(|r| r.io == io && addr >= r.start && addr - r.start < r.len)?;
        let offset = addr - r.start;
        if offset + len as u64 > r.len {
            return None;
        }
        Some((self.slots[r.slot].clone(), r.bar, offset))
    }

    /// Returns false when no BAR decodes the address.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len(), false) {
            Some((dev, bar, offset)) => {
                lock(&dev).bar_read(bar, offset, data);
                true
            }
            None => false,
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len(), false) {
            Some((dev, bar, offset)) => {
                lock(&dev).bar_write(bar, offset, data);
                true
            }
            None => false,
        }
    }

    pub fn io_bar_read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(u64::from(port), data.len(), true) {
            Some((dev, bar, offset)) => {
                lock(&dev).bar_read(bar, offset, data);
                true
            }
            None => false,
        }
    }

    pub fn io_bar_write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(u64::from(port), data.len(), true) {
            Some((dev, bar, offset)) => {
                lock(&dev).bar_write(bar, offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapir_devices::pci::BarSpec;

    struct Dummy {
        config: PciConfigSpace,
        last_write: Option<(usize, u64, Vec<u8>)>,
    }

    impl PciDevice for Dummy {
        fn name(&self) -> &str {
            "dummy"
        }
        fn config(&self) -> &PciConfigSpace {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfigSpace {
            &mut self.config
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) << 4 | offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((bar, offset, data.to_vec()));
        }
    }

    fn config_read32(root: &PciRoot, device: u32, register: u32) -> u32 {
        root.pio_write(CONFIG_ADDRESS_PORT, &(0x8000_0000 | (device << 11) | register).to_le_bytes());
        let mut data = [0u8; 4];
        root.pio_read(CONFIG_DATA_PORT, &mut data);
        u32::from_le_bytes(data)
    }

    fn config_write32(root: &PciRoot, device: u32, register: u32, value: u32) {
        root.pio_write(CONFIG_ADDRESS_PORT, &(0x8000_0000 | (device << 11) | register).to_le_bytes());
        root.pio_write(CONFIG_DATA_PORT, &value.to_le_bytes());
    }

    fn dummy() -> Arc<Mutex<Dummy>> {
        let bars = [BarSpec { index: 0, kind: BarKind::Memory32, size: 0x20000 }, BarSpec { index: 1, kind: BarKind::Io, size: 64 }];
        let identity = PciIdentity { vendor_id: 0x8086, device_id: 0x100e, revision: 0, class_code: 0x020000, subsystem_vendor_id: 0, subsystem_id: 0 };
        Arc::new(Mutex::new(Dummy { config: PciConfigSpace::new(identity, &bars, 1), last_write: None }))
    }

    #[test]
    fn enumerates_host_bridge_and_devices() {
        let mut root = PciRoot::new(None);
        root.add(dummy(), 16).unwrap();
        assert_eq!(config_read32(&root, 0, 0), 0x0008_1b36);
        assert_eq!(config_read32(&root, 0, 8) >> 8, 0x06_00_00);
        assert_eq!(config_read32(&root, 1, 0), 0x100e_8086);
        assert_eq!(config_read32(&root, 1, 0x3c) & 0xffff, 0x0110);
        // Empty slots and other functions read as all ones.
        assert_eq!(config_read32(&root, 2, 0), 0xffff_ffff);
        root.pio_write(CONFIG_ADDRESS_PORT, &(0x8000_0100u32 | (1 << 11)).to_le_bytes());
        let mut data = [0u8; 4];
        root.pio_read(CONFIG_DATA_PORT, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0xffff_ffff);
    }

    #[test]
    fn bars_are_placed_aligned_and_decode_only_when_enabled() {
        let mut root = PciRoot::new(None);
        let dev = dummy();
        root.add(dev.clone(), 16).unwrap();
        let bar0 = config_read32(&root, 1, 0x10);
        assert_eq!(bar0 % 0x20000, 0);
        assert!(bar0 as u64 >= MMIO_HOLE_START);
        let mut data = [0u8; 4];
        assert!(!root.mmio_read(bar0 as u64 + 8, &mut data), "decoding before memory enable");
        config_write32(&root, 1, 4, u32::from(PCI_COMMAND_MEMORY | PCI_COMMAND_IO));
        assert!(root.mmio_read(bar0 as u64 + 8, &mut data));
        assert_eq!(data, [0x08; 4]);
        assert!(root.mmio_write(bar0 as u64 + 0x10, &[1, 2]));
        assert_eq!(lock(&dev).last_write, Some((0, 0x10, vec![1, 2])));
        // An access running past the BAR's end is not decoded.
        assert!(!root.mmio_read(bar0 as u64 + 0x1fffe, &mut data));
        let io = config_read32(&root, 1, 0x14) & !3;
        assert!(root.io_bar_read(io as u16 + 4, &mut data[..1]));
        assert_eq!(data[0], 0x14);
    }

    #[test]
    fn guest_can_move_a_bar() {
        let mut root = PciRoot::new(None);
        root.add(dummy(), 16).unwrap();
        config_write32(&root, 1, 4, u32::from(PCI_COMMAND_MEMORY));
        config_write32(&root, 1, 0x10, 0xffff_ffff);
        assert_eq!(config_read32(&root, 1, 0x10), 0xfffe_0000);
        config_write32(&root, 1, 0x10, 0xd000_0000);
        let mut data = [0u8; 1];
        assert!(root.mmio_read(0xd000_0001, &mut data));
        assert_eq!(data[0], 0x01);
    }
}
