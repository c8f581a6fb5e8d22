//! The common configuration block (`struct virtio_pci_common_cfg`, virtio 1.x 4.1.4.3):
//! feature windows, device status and per-queue setup registers.
//!
//! Accesses of any width at any offset are accepted: each one is split over the fields
//! it touches, and a partial write merges into the field's current value. Status
//! transitions that need the device (reset, FEATURES_OK, DRIVER_OK) are returned to the
//! transport as a `StatusRequest` instead of being handled here.

use log::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::irq::InterruptState;
use super::status;

const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// (offset, width) of every field, in address order.
const FIELDS: [(u64, u64); 16] = [
    (DEVICE_FEATURE_SELECT, 4),
    (DEVICE_FEATURE, 4),
    (DRIVER_FEATURE_SELECT, 4),
    (DRIVER_FEATURE, 4),
    (CONFIG_MSIX_VECTOR, 2),
    (NUM_QUEUES, 2),
    (DEVICE_STATUS, 1),
    (CONFIG_GENERATION, 1),
    (QUEUE_SELECT, 2),
    (QUEUE_SIZE, 2),
    (QUEUE_MSIX_VECTOR, 2),
    (QUEUE_ENABLE, 2),
    (QUEUE_NOTIFY_OFF, 2),
    (QUEUE_DESC, 8),
    (QUEUE_DRIVER, 8),
    (QUEUE_DEVICE, 8),
];

/// A status write the transport must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusRequest {
    /// The driver wrote 0.
    Reset,
    /// The driver wrote a new status; `value` is what it wrote.
    Set { value: u8 },
}

pub struct CommonConfig {
    device_feature_select: u32,
    driver_feature_select: u32,
    /// Features the device (with the transport's bits) offers.
    offered_features: u64,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<Queue>,
    /// Driver writes refused as out of sequence or invalid, for rate-limited logging.
    ignored_writes: u64,
}

impl CommonConfig {
    pub fn new(offered_features: u64, queues: Vec<Queue>) -> Self {
        CommonConfig {
            device_feature_select: 0,
            driver_feature_select: 0,
            offered_features,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues,
            ignored_writes: 0,
        }
    }

    pub fn offered_features(&self) -> u64 {
        self.offered_features
    }

    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    /// Transport-side status update after it handled a `StatusRequest`.
    pub fn set_status(&mut self, status: u8) {
        self.status = status;
    }

    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// Virtio reset of the registers; queues go back to their maximum size, unconfigured.
    pub fn reset(&mut self) {
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// Queue registers are the driver's only until DRIVER_OK; afterwards the device owns
    /// the rings and later writes are ignored.
    fn selected_queue_mut(&mut self) -> Option<&mut Queue> {
        if self.status & status::DRIVER_OK != 0 {
            self.ignored_writes += 1;
            if super::log_sparingly(self.ignored_writes) {
                warn!("virtio-pci: queue register write after DRIVER_OK ignored ({} so far)", self.ignored_writes);
            }
            return None;
        }
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn field_value(&self, field: u64, irq: &InterruptState) -> u64 {
        let queue = self.selected_queue();
        match field {
            DEVICE_FEATURE_SELECT => u64::from(self.device_feature_select),
            DEVICE_FEATURE => feature_window(self.offered_features, self.device_feature_select),
            DRIVER_FEATURE_SELECT => u64::from(self.driver_feature_select),
            DRIVER_FEATURE => feature_window(self.driver_features, self.driver_feature_select),
            CONFIG_MSIX_VECTOR => u64::from(irq.config_vector()),
            NUM_QUEUES => self.queues.len() as u64,
            DEVICE_STATUS => {
                let needs_reset = if irq.needs_reset() { status::DEVICE_NEEDS_RESET } else { 0 };
                u64::from(self.status | needs_reset)
            }
            CONFIG_GENERATION => u64::from(irq.config_generation()),
            QUEUE_SELECT => u64::from(self.queue_select),
            QUEUE_SIZE => queue.map_or(0, |q| u64::from(q.size())),
            QUEUE_MSIX_VECTOR => {
                queue.map_or(u64::from(super::VIRTIO_MSI_NO_VECTOR), |_| u64::from(irq.queue_vector(usize::from(self.queue_select))))
            }
            QUEUE_ENABLE => queue.map_or(0, |q| u64::from(q.ready())),
            QUEUE_NOTIFY_OFF => queue.map_or(0, |_| u64::from(self.queue_select)),
            QUEUE_DESC => queue.map_or(0, |q| q.desc_table()),
            QUEUE_DRIVER => queue.map_or(0, |q| q.avail_ring()),
            QUEUE_DEVICE => queue.map_or(0, |q| q.used_ring()),
            _ => 0,
        }
    }

    pub fn read(&self, offset: u64, data: &mut [u8], irq: &InterruptState) {
        data.fill(0);
        for (field, width) in FIELDS {
            let value = self.field_value(field, irq).to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                let Some(addr) = offset.checked_add(i as u64) else { break };
                if addr >= field && addr < field + width {
                    *b = value[(addr - field) as usize];
                }
            }
        }
    }

    /// Applies a driver write. Returns the status request, if the write touched status.
    pub fn write(&mut self, offset: u64, data: &[u8], irq: &InterruptState) -> Option<StatusRequest> {
        let mut request = None;
        for (field, width) in FIELDS {
            let mut value = self.field_value(field, irq).to_le_bytes();
            let mut touched = false;
            for (i, &b) in data.iter().enumerate() {
                let Some(addr) = offset.checked_add(i as u64) else { break };
                if addr >= field && addr < field + width {
                    value[(addr - field) as usize] = b;
                    touched = true;
                }
            }
            if touched {
                if let Some(r) = self.set_field(field, u64::from_le_bytes(value), irq) {
                    request = Some(r);
                }
            }
        }
        request
    }

    fn set_field(&mut self, field: u64, value: u64, irq: &InterruptState) -> Option<StatusRequest> {
        match field {
            DEVICE_FEATURE_SELECT => self.device_feature_select = value as u32,
            DRIVER_FEATURE_SELECT => self.driver_feature_select = value as u32,
            DRIVER_FEATURE => self.write_driver_features(value as u32),
            CONFIG_MSIX_VECTOR => irq.set_config_vector(value as u16),
            DEVICE_STATUS => {
                let value = value as u8;
                return Some(if value == 0 { StatusRequest::Reset } else { StatusRequest::Set { value } });
            }
            QUEUE_SELECT => self.queue_select = value as u16,
            QUEUE_SIZE => {
                // Invalid sizes (zero, not a power of two, above the maximum) are refused;
                // the driver sees the old size when it reads back.
                let refused = self.selected_queue_mut().is_some_and(|q| q.try_set_size(value as u16).is_err());
                if refused {
                    self.ignored_writes += 1;
                    if super::log_sparingly(self.ignored_writes) {
                        warn!("virtio-pci: driver asked for invalid queue size {value}");
                    }
                }
            }
            QUEUE_MSIX_VECTOR if usize::from(self.queue_select) < self.queues.len() => {
                irq.set_queue_vector(usize::from(self.queue_select), value as u16);
            }
            QUEUE_ENABLE => {
                if let Some(q) = self.selected_queue_mut() {
                    // Only enabling is defined; a queue is disabled by a device reset.
                    if value as u16 == 1 {
                        q.set_ready(true);
                    }
                }
            }
            QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE => {
                let address = GuestAddress(value);
                let refused = self.selected_queue_mut().is_some_and(|q| {
                    match field {
                        QUEUE_DESC => q.try_set_desc_table_address(address),
                        QUEUE_DRIVER => q.try_set_avail_ring_address(address),
                        _ => q.try_set_used_ring_address(address),
                    }
                    .is_err()
                });
                if refused {
                    self.ignored_writes += 1;
                    if super::log_sparingly(self.ignored_writes) {
                        warn!("virtio-pci: driver gave a misaligned ring address {value:#x}");
                    }
                }
            }
            // Read-only: device_feature, num_queues, config_generation, queue_notify_off.
            _ => {}
        }
        None
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating = self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0;
        if !negotiating {
            self.ignored_writes += 1;
            if super::log_sparingly(self.ignored_writes) {
                warn!("virtio-pci: driver feature write outside negotiation ignored ({} so far)", self.ignored_writes);
            }
            return;
        }
        let shift = match self.driver_feature_select {
            0 => 0,
            1 => 32,
            // No features exist above bit 63; writes there must be zero anyway.
            _ => return,
        };
        self.driver_features = (self.driver_features & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
    }
}

fn feature_window(features: u64, select: u32) -> u64 {
    match select {
        0 => features & 0xffff_ffff,
        1 => features >> 32,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::{TestIrqLine, TestMsiVectors};
    use std::sync::Arc;

    fn setup() -> (CommonConfig, InterruptState) {
        let queues = vec![Queue::new(256).unwrap(), Queue::new(64).unwrap()];
        let irq = InterruptState::new(2, Arc::new(TestMsiVectors::new(3)), Arc::new(TestIrqLine::default()));
        (CommonConfig::new(0x1_0000_0021, queues), irq)
    }

    fn read(cc: &CommonConfig, irq: &InterruptState, offset: u64, width: usize) -> u64 {
        let mut buf = [0u8; 8];
        cc.read(offset, &mut buf[..width], irq);
        u64::from_le_bytes(buf)
    }

    #[test]
    fn feature_windows() {
        let (mut cc, irq) = setup();
        assert_eq!(read(&cc, &irq, DEVICE_FEATURE, 4), 0x21);
        cc.write(DEVICE_FEATURE_SELECT, &1u32.to_le_bytes(), &irq);
        assert_eq!(read(&cc, &irq, DEVICE_FEATURE, 4), 1);
        cc.write(DEVICE_FEATURE_SELECT, &7u32.to_le_bytes(), &irq);
        assert_eq!(read(&cc, &irq, DEVICE_FEATURE, 4), 0);
        // Driver features are only taken while negotiating.
        cc.write(DRIVER_FEATURE, &0x20u32.to_le_bytes(), &irq);
        assert_eq!(cc.driver_features(), 0);
        cc.set_status(status::ACKNOWLEDGE | status::DRIVER);
        cc.write(DRIVER_FEATURE, &0x20u32.to_le_bytes(), &irq);
        cc.write(DRIVER_FEATURE_SELECT, &1u32.to_le_bytes(), &irq);
        cc.write(DRIVER_FEATURE, &1u32.to_le_bytes(), &irq);
        assert_eq!(cc.driver_features(), 0x1_0000_0020);
        assert_eq!(read(&cc, &irq, DRIVER_FEATURE, 4), 1);
    }

    #[test]
    fn queue_registers_follow_select() {
        let (mut cc, irq) = setup();
        assert_eq!(read(&cc, &irq, NUM_QUEUES, 2), 2);
        assert_eq!(read(&cc, &irq, QUEUE_SIZE, 2), 256);
        cc.write(QUEUE_SELECT, &1u16.to_le_bytes(), &irq);
        assert_eq!(read(&cc, &irq, QUEUE_SIZE, 2), 64);
        assert_eq!(read(&cc, &irq, QUEUE_NOTIFY_OFF, 2), 1);
        cc.write(QUEUE_SIZE, &32u16.to_le_bytes(), &irq);
        assert_eq!(read(&cc, &irq, QUEUE_SIZE, 2), 32);
        cc.write(QUEUE_SIZE, &33u16.to_le_bytes(), &irq);
        cc.write(QUEUE_SIZE, &128u16.to_le_bytes(), &irq);
        assert_eq!(read(&cc, &irq, QUEUE_SIZE, 2), 32);
        // 64-bit address in two 32-bit halves, as Linux writes it.
        cc.write(QUEUE_DESC, &0x1000u32.to_le_bytes(), &irq);
        cc.write(QUEUE_DESC + 4, &0x2u32.to_le_bytes(), &irq);
        assert_eq!(read(&cc, &irq, QUEUE_DESC, 8), 0x2_0000_1000);
        cc.write(QUEUE_DEVICE, &0x3000u64.to_le_bytes(), &irq);
        assert_eq!(read(&cc, &irq, QUEUE_DEVICE, 8), 0x3000);
        // Misaligned rings are refused: the descriptor table needs 16, the used ring 4.
        cc.write(QUEUE_DESC, &0x2_0000_1008u64.to_le_bytes(), &irq);
        cc.write(QUEUE_DEVICE, &0x3002u64.to_le_bytes(), &irq);
        assert_eq!(read(&cc, &irq, QUEUE_DESC, 8), 0x2_0000_1000);
        assert_eq!(read(&cc, &irq, QUEUE_DEVICE, 8), 0x3000);
        cc.write(QUEUE_ENABLE, &1u16.to_le_bytes(), &irq);
        assert_eq!(read(&cc, &irq, QUEUE_ENABLE, 2), 1);
        // Out-of-range select: queue fields read as zero, writes go nowhere.
        cc.write(QUEUE_SELECT, &9u16.to_le_bytes(), &irq);
        assert_eq!(read(&cc, &irq, QUEUE_SIZE, 2), 0);
        cc.write(QUEUE_ENABLE, &1u16.to_le_bytes(), &irq);
        assert_eq!(read(&cc, &irq, QUEUE_MSIX_VECTOR, 2), 0xffff);
    }

    #[test]
    fn queue_writes_after_driver_ok_are_ignored() {
        let (mut cc, irq) = setup();
        cc.set_status(status::DRIVER_OK);
        cc.write(QUEUE_DESC, &0x5000u64.to_le_bytes(), &irq);
        cc.write(QUEUE_ENABLE, &1u16.to_le_bytes(), &irq);
        assert_eq!(read(&cc, &irq, QUEUE_DESC, 8), 0);
        assert_eq!(read(&cc, &irq, QUEUE_ENABLE, 2), 0);
    }

    #[test]
    fn msix_vectors_out_of_range_read_back_as_none() {
        let (mut cc, irq) = setup();
        cc.write(CONFIG_MSIX_VECTOR, &2u16.to_le_bytes(), &irq);
        assert_eq!(read(&cc, &irq, CONFIG_MSIX_VECTOR, 2), 2);
        cc.write(CONFIG_MSIX_VECTOR, &3u16.to_le_bytes(), &irq);
        assert_eq!(read(&cc, &irq, CONFIG_MSIX_VECTOR, 2), 0xffff);
        cc.write(QUEUE_MSIX_VECTOR, &1u16.to_le_bytes(), &irq);
        assert_eq!(irq.queue_vector(0), 1);
    }

    #[test]
    fn status_writes_become_requests() {
        let (mut cc, irq) = setup();
        assert_eq!(cc.write(DEVICE_STATUS, &[0], &irq), Some(StatusRequest::Reset));
        assert_eq!(cc.write(DEVICE_STATUS, &[3], &irq), Some(StatusRequest::Set { value: 3 }));
        // A 4-byte write at 0x14 covers status and the read-only generation.
        assert_eq!(cc.write(DEVICE_STATUS, &[1, 9, 0, 0], &irq), Some(StatusRequest::Set { value: 1 }));
        assert_eq!(cc.write(QUEUE_SELECT, &[1, 0], &irq), None);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut cc, irq) = setup();
        let mut buf = [0u8; 8];
        cc.read(u64::MAX - 3, &mut buf, &irq);
        cc.read(0x37, &mut buf, &irq);
        cc.write(u64::MAX - 3, &[0xff; 8], &irq);
        cc.write(0x37, &[0xff; 8], &irq);
        cc.write(0x13, &[0xff, 0xff, 0xff], &irq);
    }
}
