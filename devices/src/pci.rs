//! PCI type-0 configuration space and the trait every PCI device model implements.
//!
//! The VMM's root bus owns address decoding: it asks each device for its BAR layout,
//! assigns addresses, and routes config-space, MMIO and port I/O accesses to the device
//! by (BAR index, offset). Devices never see absolute addresses except through
//! `bar_address`, which they need only for things like ioeventfd registration.

use std::os::unix::io::RawFd;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Memory32,
    /// 64-bit memory BAR (occupies this BAR slot and the next).
    Memory64,
    /// I/O port BAR.
    Io,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    pub index: usize,
    pub kind: BarKind,
    /// Power of two, at least 16 for I/O and 4096 for memory here.
    pub size: u64,
}

/// A doorbell the VMM should turn into a KVM ioeventfd: a guest write of any value to
/// `bar`+`offset` signals `fd` without a userspace exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Doorbell {
    pub bar: usize,
    pub offset: u64,
    /// Access width in bytes the guest uses (2 for virtio notify).
    pub len: u32,
    pub fd: RawFd,
}

/// Static identity of a function.
#[derive(Clone, Copy, Debug)]
pub struct PciIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// class << 16 | subclass << 8 | prog-if
    pub class_code: u32,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

pub const PCI_COMMAND: usize = 0x04;
pub const PCI_COMMAND_IO: u16 = 1;
pub const PCI_COMMAND_MEMORY: u16 = 2;
pub const PCI_COMMAND_MASTER: u16 = 4;
pub const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;
pub const PCI_STATUS: usize = 0x06;
pub const PCI_STATUS_INTERRUPT: u16 = 1 << 3;
pub const PCI_STATUS_CAP_LIST: u16 = 1 << 4;
pub const PCI_BAR0: usize = 0x10;
pub const PCI_CAPABILITY_LIST: usize = 0x34;
pub const PCI_INTERRUPT_LINE: usize = 0x3c;
pub const PCI_INTERRUPT_PIN: usize = 0x3d;

/// A 256-byte type-0 configuration space with BAR sizing and a capability list.
///
/// Writes are masked per byte, so the guest can only change what real hardware lets it
/// change (command, BAR addresses, interrupt line, and capability bytes the device marks
/// writable).
pub struct PciConfigSpace {
    bytes: [u8; 256],
    writable: [u8; 256],
    bars: Vec<BarSpec>,
    next_cap: usize,
    last_cap: Option<usize>,
}

impl PciConfigSpace {
    pub fn new(identity: PciIdentity, bars: &[BarSpec], interrupt_pin: u8) -> Self {
        let mut cs = PciConfigSpace {
            bytes: [0; 256],
            writable: [0; 256],
            bars: bars.to_vec(),
            next_cap: 0x40,
            last_cap: None,
        };
        cs.put16(0x00, identity.vendor_id);
        cs.put16(0x02, identity.device_id);
        cs.bytes[0x08] = identity.revision;
        cs.bytes[0x09] = identity.class_code as u8;
        cs.bytes[0x0a] = (identity.class_code >> 8) as u8;
        cs.bytes[0x0b] = (identity.class_code >> 16) as u8;
        cs.put16(0x2c, identity.subsystem_vendor_id);
        cs.put16(0x2e, identity.subsystem_id);
        cs.bytes[PCI_INTERRUPT_PIN] = interrupt_pin;
        // Command: I/O, memory, bus master, INTx disable.
        cs.writable[PCI_COMMAND] = 0x07;
        cs.writable[PCI_COMMAND + 1] = 0x04;
        cs.writable[PCI_INTERRUPT_LINE] = 0xff;
        for bar in bars {
            let off = PCI_BAR0 + bar.index * 4;
            let (low_flags, mask) = match bar.kind {
                BarKind::Io => (0x1u32, !(bar.size as u32 - 1)),
                BarKind::Memory32 => (0x0u32, !(bar.size as u32 - 1)),
                BarKind::Memory64 => (0x4u32, !(bar.size as u32 - 1)),
            };
            cs.put32(off, low_flags);
            cs.writable[off..off + 4].copy_from_slice(&mask.to_le_bytes());
            if bar.kind == BarKind::Memory64 {
                let high_mask = !((bar.size.saturating_sub(1)) >> 32) as u32;
                cs.writable[off + 4..off + 8].copy_from_slice(&high_mask.to_le_bytes());
            }
        }
        cs
    }

    fn put16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Appends a capability with the given id and body (the bytes after id/next), and
    /// returns its offset. `writable_body` masks which body bytes the guest may change.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable_body: &[u8]) -> usize {
        let off = self.next_cap;
        let len = 2 + body.len();
        assert!(off + len <= 256, "PCI capabilities overflow config space");
        self.bytes[off] = id;
        self.bytes[off + 1] = 0;
        self.bytes[off + 2..off + len].copy_from_slice(body);
        for (i, m) in writable_body.iter().enumerate().take(body.len()) {
            self.writable[off + 2 + i] = *m;
        }
        match self.last_cap {
            Some(prev) => self.bytes[prev + 1] = off as u8,
            None => self.bytes[PCI_CAPABILITY_LIST] = off as u8,
        }
        let status = self.read16(PCI_STATUS) | PCI_STATUS_CAP_LIST;
        self.put16(PCI_STATUS, status);
        self.last_cap = Some(off);
        self.next_cap = (off + len + 3) & !3;
        off
    }

    pub fn read8(&self, off: usize) -> u8 {
        self.bytes.get(off).copied().unwrap_or(0xff)
    }

    pub fn read16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.read8(off), self.read8(off + 1)])
    }

    pub fn read32(&self, off: usize) -> u32 {
        u32::from_le_bytes([self.read8(off), self.read8(off + 1), self.read8(off + 2), self.read8(off + 3)])
    }

    /// Reads `data.len()` bytes at `off`; out-of-range bytes read as 0xff.
    pub fn read(&self, off: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read8(off + i);
        }
    }

    /// A guest write: only bits marked writable change.
    pub fn write(&mut self, off: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let Some(idx) = off.checked_add(i).filter(|&x| x < 256) else { return };
            let m = self.writable[idx];
            self.bytes[idx] = (self.bytes[idx] & !m) | (v & m);
        }
    }

    /// Device-side write that ignores the guest mask (e.g. updating a capability's
    /// read-only status bits).
    pub fn set_bytes(&mut self, off: usize, data: &[u8]) {
        if let Some(slot) = off.checked_add(data.len()).filter(|&end| end <= 256).map(|_| off) {
            self.bytes[slot..slot + data.len()].copy_from_slice(data);
        }
    }

    pub fn command(&self) -> u16 {
        self.read16(PCI_COMMAND)
    }

    pub fn bars(&self) -> &[BarSpec] {
        &self.bars
    }

    /// The address the BAR currently decodes, with flag bits stripped.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.iter().find(|b| b.index == index)?;
        let off = PCI_BAR0 + index * 4;
        let low = self.read32(off);
        Some(match bar.kind {
            BarKind::Io => u64::from(low & !0x3),
            BarKind::Memory32 => u64::from(low & !0xf),
            BarKind::Memory64 => u64::from(low & !0xf) | (u64::from(self.read32(off + 4)) << 32),
        })
    }

    /// VMM-side BAR placement, done once before the guest boots.
    pub fn set_bar_address(&mut self, index: usize, address: u64) {
        let Some(bar) = self.bars.iter().find(|b| b.index == index).copied() else { return };
        let off = PCI_BAR0 + index * 4;
        let flags = self.read32(off) & if bar.kind == BarKind::Io { 0x3 } else { 0xf };
        self.put32(off, (address as u32) | flags);
        if bar.kind == BarKind::Memory64 {
            self.put32(off + 4, (address >> 32) as u32);
        }
    }

    pub fn set_interrupt_status(&mut self, pending: bool) {
        let mut status = self.read16(PCI_STATUS);
        if pending {
            status |= PCI_STATUS_INTERRUPT;
        } else {
            status &= !PCI_STATUS_INTERRUPT;
        }
        self.put16(PCI_STATUS, status);
    }
}

/// A PCI function as the root bus sees it. Accesses are at most 8 bytes and never cross
/// the BAR's end (the bus checks); devices still treat offsets as untrusted.
pub trait PciDevice: Send {
    /// Short name for logs ("virtio-net", "e1000").
    fn name(&self) -> &str;
    fn config(&self) -> &PciConfigSpace;
    fn config_mut(&mut self) -> &mut PciConfigSpace;

    /// Config-space read; the default reads the backing bytes.
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data)
    }

    /// Config-space write; devices with writable capabilities (MSI-X control) override
    /// this and call `config_mut().write` first.
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data)
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// Doorbells to register as ioeventfds once BARs are placed.
    fn doorbells(&self) -> Vec<Doorbell> {
        Vec::new()
    }

    /// Called when the VM shuts down, so device threads stop and counters can be logged.
    fn shutdown(&mut self) {}

    /// A one-line summary of counters for the exit log.
    fn stats(&self) -> String {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> PciIdentity {
        PciIdentity {
            vendor_id: 0x8086,
            device_id: 0x100e,
            revision: 3,
            class_code: 0x020000,
            subsystem_vendor_id: 0x8086,
            subsystem_id: 0x001e,
        }
    }

    #[test]
    fn bar_sizing_reports_size_mask() {
        let bars = [
            BarSpec { index: 0, kind: BarKind::Memory32, size: 0x20000 },
            BarSpec { index: 1, kind: BarKind::Io, size: 64 },
        ];
        let mut cs = PciConfigSpace::new(identity(), &bars, 1);
        cs.write(PCI_BAR0, &[0xff; 4]);
        assert_eq!(cs.read32(PCI_BAR0), 0xfffe_0000);
        cs.write(PCI_BAR0 + 4, &[0xff; 4]);
        assert_eq!(cs.read32(PCI_BAR0 + 4), 0xffff_ffc1);
        cs.set_bar_address(0, 0xc000_0000);
        assert_eq!(cs.bar_address(0), Some(0xc000_0000));
        assert_eq!(cs.read16(0), 0x8086);
        assert_eq!(cs.read8(PCI_INTERRUPT_PIN), 1);
    }

    #[test]
    fn sixty_four_bit_bar_sizes_both_halves() {
        let bars = [BarSpec { index: 0, kind: BarKind::Memory64, size: 0x4000 }];
        let mut cs = PciConfigSpace::new(identity(), &bars, 0);
        cs.write(PCI_BAR0, &[0xff; 4]);
        cs.write(PCI_BAR0 + 4, &[0xff; 4]);
        assert_eq!(cs.read32(PCI_BAR0), 0xffff_c004);
        assert_eq!(cs.read32(PCI_BAR0 + 4), 0xffff_ffff);
        cs.set_bar_address(0, 0x1_0000_0000);
        assert_eq!(cs.bar_address(0), Some(0x1_0000_0000));
    }

    #[test]
    fn read_only_fields_ignore_guest_writes() {
        let mut cs = PciConfigSpace::new(identity(), &[], 1);
        cs.write(0, &[0, 0, 0, 0]);
        assert_eq!(cs.read32(0), 0x100e_8086);
        cs.write(PCI_COMMAND, &[0xff, 0xff]);
        assert_eq!(cs.command(), 0x0407);
        cs.write(250, &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn capabilities_are_chained() {
        let mut cs = PciConfigSpace::new(identity(), &[], 0);
        let a = cs.add_capability(0x11, &[0; 10], &[]);
        let b = cs.add_capability(0x09, &[0; 4], &[]);
        assert_eq!(cs.read8(PCI_CAPABILITY_LIST) as usize, a);
        assert_eq!(cs.read8(a + 1) as usize, b);
        assert_eq!(cs.read8(b + 1), 0);
        assert_ne!(cs.read16(PCI_STATUS) & PCI_STATUS_CAP_LIST, 0);
    }
}
