//! A simulated virtio driver for tests: it programs a `VirtioPciDevice` through its BAR
//! and config space the way Linux's virtio_pci_modern does, lays out split rings in guest
//! memory, offers buffers and reads completions back. Malformed descriptors can be
//! written directly to test the device's defences.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::device::{GuestRam, VirtioDevice};
use super::msix::MSIX_CONTROL_ENABLE;
use super::pci_layout as layout;
use super::pci_transport::VirtioPciDevice;
use super::status;
use crate::interrupt::{TestIrqLine, TestMsiVectors};
use crate::pci::{PciDevice, PCI_CAPABILITY_LIST};

pub const MEM_SIZE: usize = 0x200_0000;
const RING_AREA: u64 = 0x1_0000;
const BUFFER_AREA: u64 = 0x40_0000;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

pub mod reg {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

#[derive(Clone, Copy, Debug, Default)]
pub struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

pub struct TestDriver {
    pub dev: VirtioPciDevice,
    pub mem: GuestRam,
    pub msix: Arc<TestMsiVectors>,
    pub intx: Arc<TestIrqLine>,
    pub queues: Vec<DriverQueue>,
    next_ring: u64,
    next_buffer: u64,
}

fn align(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl TestDriver {
    pub fn new(device: Box<dyn VirtioDevice>, msix_vectors: usize) -> TestDriver {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let msix = Arc::new(TestMsiVectors::new(msix_vectors));
        let intx = Arc::new(TestIrqLine::default());
        let dev = VirtioPciDevice::new(device, mem.clone(), msix.clone(), intx.clone()).unwrap();
        TestDriver { dev, mem, msix, intx, queues: Vec::new(), next_ring: RING_AREA, next_buffer: BUFFER_AREA }
    }

    pub fn read(&mut self, offset: u64, width: usize) -> u64 {
        let mut buf = [0u8; 8];
        self.dev.bar_read(layout::BAR_INDEX, offset, &mut buf[..width]);
        u64::from_le_bytes(buf)
    }

    pub fn write(&mut self, offset: u64, width: usize, value: u64) {
        self.dev.bar_write(layout::BAR_INDEX, offset, &value.to_le_bytes()[..width]);
    }

    pub fn common_read(&mut self, reg: u64, width: usize) -> u64 {
        self.read(layout::COMMON_OFFSET + reg, width)
    }

    pub fn common_write(&mut self, reg: u64, width: usize, value: u64) {
        self.write(layout::COMMON_OFFSET + reg, width, value)
    }

    pub fn status(&mut self) -> u8 {
        self.common_read(reg::DEVICE_STATUS, 1) as u8
    }

    pub fn set_status(&mut self, value: u8) {
        self.common_write(reg::DEVICE_STATUS, 1, u64::from(value));
    }

    pub fn device_config(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.dev.bar_read(layout::BAR_INDEX, layout::DEVICE_OFFSET + offset, &mut out);
        out
    }

    pub fn device_features(&mut self) -> u64 {
        self.common_write(reg::DEVICE_FEATURE_SELECT, 4, 0);
        let low = self.common_read(reg::DEVICE_FEATURE, 4);
        self.common_write(reg::DEVICE_FEATURE_SELECT, 4, 1);
        let high = self.common_read(reg::DEVICE_FEATURE, 4);
        low | (high << 32)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation. Returns the features accepted,
    /// and whether the device kept FEATURES_OK.
    pub fn negotiate(&mut self, accept: impl FnOnce(u64) -> u64) -> (u64, bool) {
        self.set_status(0);
        assert_eq!(self.status(), 0);
        self.queues.clear();
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let offered = self.device_features();
        let accepted = accept(offered);
        self.common_write(reg::DRIVER_FEATURE_SELECT, 4, 0);
        self.common_write(reg::DRIVER_FEATURE, 4, accepted & 0xffff_ffff);
        self.common_write(reg::DRIVER_FEATURE_SELECT, 4, 1);
        self.common_write(reg::DRIVER_FEATURE, 4, accepted >> 32);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        let ok = self.status() & status::FEATURES_OK != 0;
        (accepted, ok)
    }

    /// Turns on MSI-X and programs every vector unmasked, with data = 0x20 + vector.
    pub fn enable_msix(&mut self) {
        let cap = self.find_capability(0x11).expect("MSI-X capability");
        let vectors = crate::interrupt::MsiVectors::count(&*self.msix);
        for v in 0..vectors as u64 {
            let entry = layout::MSIX_TABLE_OFFSET + v * 16;
            self.write(entry, 4, 0xfee0_0000);
            self.write(entry + 4, 4, 0);
            self.write(entry + 8, 4, 0x20 + v);
            self.write(entry + 12, 4, 0);
        }
        self.dev.config_write(cap + 2, &MSIX_CONTROL_ENABLE.to_le_bytes());
    }

    pub fn find_capability(&mut self, id: u8) -> Option<usize> {
        let mut at = self.config_read(PCI_CAPABILITY_LIST, 1) as usize;
        while at != 0 {
            if self.config_read(at, 1) as u8 == id {
                return Some(at);
            }
            at = self.config_read(at + 1, 1) as usize;
        }
        None
    }

    /// The virtio vendor capability of `cfg_type`.
    pub fn find_virtio_cap(&mut self, cfg_type: u8) -> Option<usize> {
        let mut at = self.config_read(PCI_CAPABILITY_LIST, 1) as usize;
        while at != 0 {
            if self.config_read(at, 1) == 0x09 && self.config_read(at + 3, 1) == u64::from(cfg_type) {
                return Some(at);
            }
            at = self.config_read(at + 1, 1) as usize;
        }
        None
    }

    pub fn config_read(&mut self, offset: usize, width: usize) -> u64 {
        let mut buf = [0u8; 8];
        self.dev.config_read(offset, &mut buf[..width]);
        u64::from_le_bytes(buf)
    }

    fn alloc_ring(&mut self, len: u64, alignment: u64) -> u64 {
        let at = align(self.next_ring, alignment);
        self.next_ring = at + len;
        assert!(self.next_ring < BUFFER_AREA, "ring area exhausted");
        at
    }

    /// A buffer in guest memory for the test to use.
    pub fn alloc(&mut self, len: usize) -> u64 {
        let at = align(self.next_buffer, 64);
        self.next_buffer = at + len as u64;
        assert!(self.next_buffer <= MEM_SIZE as u64, "buffer area exhausted");
        at
    }

    /// Sets up queue `index` with `size` entries and MSI-X `vector` (0xffff: none).
    pub fn setup_queue(&mut self, index: u16, size: u16, vector: u16) {
        self.common_write(reg::QUEUE_SELECT, 2, u64::from(index));
        self.common_write(reg::QUEUE_SIZE, 2, u64::from(size));
        assert_eq!(self.common_read(reg::QUEUE_SIZE, 2), u64::from(size));
        let n = u64::from(size);
        let desc = self.alloc_ring(16 * n, 16);
        let avail = self.alloc_ring(6 + 2 * n, 2);
        let used = self.alloc_ring(6 + 8 * n, 4);
        for (reg, addr) in [(reg::QUEUE_DESC, desc), (reg::QUEUE_DRIVER, avail), (reg::QUEUE_DEVICE, used)] {
            self.common_write(reg, 4, addr & 0xffff_ffff);
            self.common_write(reg + 4, 4, addr >> 32);
        }
        self.common_write(reg::QUEUE_MSIX_VECTOR, 2, u64::from(vector));
        self.common_write(reg::QUEUE_ENABLE, 2, 1);
        let slot = usize::from(index);
        if self.queues.len() <= slot {
            self.queues.resize(slot + 1, DriverQueue::default());
        }
        self.queues[slot] = DriverQueue { size, desc, avail, used, ..Default::default() };
    }

    pub fn driver_ok(&mut self) {
        let s = self.status();
        self.set_status(s | status::DRIVER_OK);
    }

    pub fn write_desc(&mut self, q: u16, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let dq = self.queues[usize::from(q)];
        let at = GuestAddress(dq.desc + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).unwrap();
    }

    /// Makes chain `head` available (whatever its descriptors say).
    pub fn publish(&mut self, q: u16, head: u16) {
        let dq = &mut self.queues[usize::from(q)];
        let slot = dq.avail + 4 + 2 * u64::from(dq.avail_idx % dq.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        let idx = dq.avail_idx;
        let avail = dq.avail;
        fence(Ordering::SeqCst);
        self.mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
    }

    /// Writes the avail index directly (for corrupt-ring tests).
    pub fn force_avail_idx(&mut self, q: u16, idx: u16) {
        let avail = self.queues[usize::from(q)].avail;
        self.mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
    }

    /// Adds a chain of (address, length, device-writable) buffers and publishes it.
    pub fn add_chain(&mut self, q: u16, buffers: &[(u64, u32, bool)]) -> u16 {
        let size = self.queues[usize::from(q)].size;
        let head = self.queues[usize::from(q)].next_desc;
        let mut index = head;
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let next = (index + 1) % size;
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(q, index, addr, len, flags, next);
            index = next;
        }
        self.queues[usize::from(q)].next_desc = index;
        self.publish(q, head);
        head
    }

    /// Notifies queue `q` the way a trapped MMIO write arrives (no ioeventfd).
    pub fn kick(&mut self, q: u16) {
        self.write(layout::NOTIFY_OFFSET + u64::from(q) * u64::from(layout::NOTIFY_OFF_MULTIPLIER), 2, u64::from(q));
    }

    /// Used-ring entries (id, len) not seen before.
    pub fn take_used(&mut self, q: u16) -> Vec<(u32, u32)> {
        let dq = self.queues[usize::from(q)];
        let idx: u16 = self.mem.read_obj(GuestAddress(dq.used + 2)).unwrap();
        fence(Ordering::SeqCst);
        let mut out = Vec::new();
        let mut at = dq.last_used;
        while at != idx {
            let elem = dq.used + 4 + 8 * u64::from(at % dq.size);
            let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
            out.push((id, len));
            at = at.wrapping_add(1);
        }
        self.queues[usize::from(q)].last_used = idx;
        out
    }

    /// Waits until `count` more used entries appear on `q`.
    pub fn wait_used(&mut self, q: u16, count: usize) -> Vec<(u32, u32)> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < count {
            got.extend(self.take_used(q));
            if got.len() >= count {
                break;
            }
            assert!(Instant::now() < deadline, "queue {q}: {} of {count} used entries after 10 s", got.len());
            std::thread::sleep(Duration::from_millis(1));
        }
        got
    }

    /// Gives the device a moment, then returns whatever it put on the used ring.
    pub fn settle_used(&mut self, q: u16) -> Vec<(u32, u32)> {
        std::thread::sleep(Duration::from_millis(100));
        self.take_used(q)
    }

    /// The driver's used_event (EVENT_IDX): interrupt once the used index passes it.
    pub fn set_used_event(&mut self, q: u16, value: u16) {
        let dq = self.queues[usize::from(q)];
        self.mem.write_obj(value, GuestAddress(dq.avail + 4 + 2 * u64::from(dq.size))).unwrap();
    }

    /// The device's avail_event (EVENT_IDX): it wants a kick once avail passes it.
    pub fn avail_event(&mut self, q: u16) -> u16 {
        let dq = self.queues[usize::from(q)];
        self.mem.read_obj(GuestAddress(dq.used + 4 + 8 * u64::from(dq.size))).unwrap()
    }

    pub fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }

    pub fn write_mem(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// Polls `cond` for up to 10 s.
    pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
