//! Transport tests with a fake device: identity, capabilities, negotiation, activation
//! and reset, doorbells, MSI-X and INTx, the PCI-config access window, and hostile
//! register traffic.

use std::sync::{Arc, Mutex};

use super::*;
use crate::pci::{PCI_BAR0, PCI_COMMAND, PCI_INTERRUPT_PIN};
use crate::virtio::irq::{ISR_CONFIG, ISR_QUEUE};
use crate::virtio::test_driver::{reg, TestDriver};
use crate::virtio::VIRTIO_MSI_NO_VECTOR;

const FAKE_FEATURE_A: u64 = 1 << 0;
/// Depends on FAKE_FEATURE_A.
const FAKE_FEATURE_B: u64 = 1 << 5;

#[derive(Default)]
struct FakeLog {
    activations: usize,
    resets: usize,
    active: Option<Activation>,
}

struct FakeDevice {
    log: Arc<Mutex<FakeLog>>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        1
    }
    fn pci_class(&self) -> u32 {
        0x02_0000
    }
    fn name(&self) -> &str {
        "fake"
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16, 8]
    }
    fn device_features(&self) -> u64 {
        FAKE_FEATURE_A | FAKE_FEATURE_B
    }
    fn validate_features(&self, features: u64) -> Result<(), String> {
        if features & FAKE_FEATURE_B != 0 && features & FAKE_FEATURE_A == 0 {
            return Err("B needs A".into());
        }
        Ok(())
    }
    fn config_len(&self) -> usize {
        4
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = [0xa0, 0xa1, 0xa2, 0xa3].get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let mut log = self.log.lock().unwrap();
        log.activations += 1;
        log.active = Some(activation);
        Ok(())
    }
    fn reset(&mut self) {
        let mut log = self.log.lock().unwrap();
        log.resets += 1;
        log.active = None;
    }
}

fn fake(vectors: usize) -> (TestDriver, Arc<Mutex<FakeLog>>) {
    let log = Arc::new(Mutex::new(FakeLog::default()));
    (TestDriver::new(Box::new(FakeDevice { log: log.clone() }), vectors), log)
}

fn bring_up(d: &mut TestDriver, vector_base: Option<u16>) {
    let (_, ok) = d.negotiate(|offered| offered);
    assert!(ok);
    d.setup_queue(0, 16, vector_base.unwrap_or(VIRTIO_MSI_NO_VECTOR));
    d.setup_queue(1, 8, vector_base.map_or(VIRTIO_MSI_NO_VECTOR, |v| v + 1));
    d.driver_ok();
}

fn interrupt(log: &Mutex<FakeLog>) -> Arc<dyn VirtioInterrupt> {
    log.lock().unwrap().active.as_ref().expect("device is active").interrupt.clone()
}

#[test]
fn identity_and_bar() {
    let (mut d, _) = fake(3);
    assert_eq!(d.config_read(0, 4), 0x1041_1af4);
    assert_eq!(d.config_read(0x08, 1), 1);
    assert_eq!(d.config_read(0x09, 4) & 0xff_ffff, 0x02_0000);
    assert_eq!(d.config_read(0x2c, 4), 0x1041_1af4);
    assert_eq!(d.config_read(PCI_INTERRUPT_PIN, 1), 1);
    d.dev.config_write(PCI_BAR0, &[0xff; 4]);
    d.dev.config_write(PCI_BAR0 + 4, &[0xff; 4]);
    assert_eq!(d.config_read(PCI_BAR0, 4), 0xffff_c004);
    assert_eq!(d.config_read(PCI_BAR0 + 4, 4), 0xffff_ffff);
    assert_eq!(d.dev.config().bars(), &layout::bars());
}

#[test]
fn capabilities_point_at_register_blocks() {
    let (mut d, _) = fake(3);
    let mut seen = Vec::new();
    let mut at = d.config_read(0x34, 1) as usize;
    while at != 0 {
        if d.config_read(at, 1) == 0x09 {
            let cfg_type = d.config_read(at + 3, 1) as u8;
            let bar = d.config_read(at + 4, 1);
            let offset = d.config_read(at + 8, 4);
            let length = d.config_read(at + 12, 4);
            seen.push((cfg_type, bar, offset, length));
        }
        at = d.config_read(at + 1, 1) as usize;
    }
    assert_eq!(
        seen,
        vec![
            (1, 0, layout::COMMON_OFFSET, layout::COMMON_LEN),
            (2, 0, layout::NOTIFY_OFFSET, 8),
            (3, 0, layout::ISR_OFFSET, 1),
            (4, 0, layout::DEVICE_OFFSET, 4),
            (5, 0, 0, 0),
        ]
    );
    assert!(d.find_capability(0x11).is_some());
    assert_eq!(d.common_read(reg::NUM_QUEUES, 2), 2);
    assert_eq!(d.device_config(0, 4), vec![0xa0, 0xa1, 0xa2, 0xa3]);
}

#[test]
fn no_msix_capability_without_vectors() {
    let (mut d, _) = fake(0);
    assert!(d.find_capability(0x11).is_none());
    d.common_write(reg::CONFIG_MSIX_VECTOR, 2, 0);
    assert_eq!(d.common_read(reg::CONFIG_MSIX_VECTOR, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
}

#[test]
fn feature_negotiation_rules() {
    let (mut d, _) = fake(3);
    let offered = d.device_features();
    assert_eq!(offered & transport_features::OFFERED, transport_features::OFFERED);
    assert_eq!(offered & (FAKE_FEATURE_A | FAKE_FEATURE_B), FAKE_FEATURE_A | FAKE_FEATURE_B);
    // A legacy driver (no VERSION_1) is refused.
    assert!(!d.negotiate(|f| f & !transport_features::VERSION_1).1);
    // A feature the device did not offer is refused.
    assert!(!d.negotiate(|f| f | (1 << 40)).1);
    // The device's own dependency rules are enforced.
    assert!(!d.negotiate(|f| f & !FAKE_FEATURE_A).1);
    let (accepted, ok) = d.negotiate(|f| f & !FAKE_FEATURE_B);
    assert!(ok);
    assert_eq!(d.dev.negotiated_features(), accepted);
    // Feature writes after FEATURES_OK do not count.
    d.common_write(reg::DRIVER_FEATURE_SELECT, 4, 0);
    d.common_write(reg::DRIVER_FEATURE, 4, 0);
    assert_eq!(d.dev.negotiated_features(), accepted);
}

#[test]
fn driver_ok_activates_and_reset_is_repeatable() {
    let (mut d, log) = fake(3);
    for round in 1..=3 {
        bring_up(&mut d, None);
        assert_eq!(d.status() & status::DRIVER_OK, status::DRIVER_OK);
        {
            let log = log.lock().unwrap();
            assert_eq!(log.activations, round);
            let active = log.active.as_ref().unwrap();
            assert_eq!(active.queues.len(), 2);
            assert!(active.queues.iter().all(|q| q.queue.ready()));
            assert!(active.queues[0].queue.event_idx_enabled());
            assert_eq!(active.queues[1].queue.size(), 8);
        }
        d.set_status(0);
        assert_eq!(d.status(), 0);
        assert!(log.lock().unwrap().active.is_none());
        // Queue registers are back to their reset values.
        d.common_write(reg::QUEUE_SELECT, 2, 0);
        assert_eq!(d.common_read(reg::QUEUE_ENABLE, 2), 0);
        assert_eq!(d.common_read(reg::QUEUE_SIZE, 2), 16);
        assert_eq!(d.common_read(reg::QUEUE_DESC, 8), 0);
    }
}

#[test]
fn driver_ok_needs_features_ok() {
    let (mut d, log) = fake(3);
    d.set_status(status::ACKNOWLEDGE | status::DRIVER);
    d.set_status(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
    assert_eq!(d.status() & status::DRIVER_OK, 0);
    assert_eq!(log.lock().unwrap().activations, 0);
}

#[test]
fn clearing_status_bits_without_reset_is_ignored() {
    let (mut d, _) = fake(3);
    bring_up(&mut d, None);
    let before = d.status();
    d.set_status(status::ACKNOWLEDGE);
    assert_eq!(d.status(), before);
}

#[test]
fn bad_queue_address_sets_needs_reset() {
    let (mut d, log) = fake(0);
    assert!(d.negotiate(|f| f).1);
    d.setup_queue(0, 16, VIRTIO_MSI_NO_VECTOR);
    d.setup_queue(1, 8, VIRTIO_MSI_NO_VECTOR);
    d.common_write(reg::QUEUE_SELECT, 2, 1);
    // The used ring of queue 1 past the end of guest memory.
    let beyond = crate::virtio::test_driver::MEM_SIZE as u64 - 8;
    d.common_write(reg::QUEUE_DEVICE, 8, beyond);
    d.driver_ok();
    assert_eq!(log.lock().unwrap().activations, 0);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(d.read(layout::ISR_OFFSET, 1) as u8, ISR_CONFIG);
    d.set_status(0);
    assert_eq!(d.status(), 0);
}

#[test]
fn avail_ring_at_address_zero_is_refused() {
    let (mut d, log) = fake(0);
    assert!(d.negotiate(|f| f).1);
    d.setup_queue(0, 16, VIRTIO_MSI_NO_VECTOR);
    d.setup_queue(1, 8, VIRTIO_MSI_NO_VECTOR);
    d.common_write(reg::QUEUE_SELECT, 2, 0);
    d.common_write(reg::QUEUE_DRIVER, 8, 0);
    d.driver_ok();
    assert_eq!(log.lock().unwrap().activations, 0);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn notify_writes_and_doorbells_reach_the_device() {
    let (mut d, log) = fake(3);
    let bells = d.dev.doorbells();
    assert_eq!(bells.len(), 2);
    assert_eq!((bells[1].bar, bells[1].offset, bells[1].len), (0, layout::NOTIFY_OFFSET + 4, 2));
    bring_up(&mut d, None);
    d.common_write(reg::QUEUE_SELECT, 2, 1);
    assert_eq!(d.common_read(reg::QUEUE_NOTIFY_OFF, 2) * u64::from(layout::NOTIFY_OFF_MULTIPLIER), 4);
    d.kick(1);
    d.kick(1);
    {
        let log = log.lock().unwrap();
        let queues = &log.active.as_ref().unwrap().queues;
        assert_eq!(queues[1].kick.read().unwrap(), 2);
        assert!(queues[0].kick.read().is_err(), "queue 0 was not kicked");
    }
    // A write to the doorbell fd (what KVM does for an ioeventfd) is the same signal.
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to an eventfd this test owns via the device.
    let n = unsafe { libc::write(bells[0].fd, one.as_ptr().cast(), 8) };
    assert_eq!(n, 8);
    let log = log.lock().unwrap();
    assert_eq!(log.active.as_ref().unwrap().queues[0].kick.read().unwrap(), 1);
}

#[test]
fn msix_queue_and_config_vectors() {
    let (mut d, log) = fake(3);
    d.enable_msix();
    bring_up(&mut d, Some(1));
    d.common_write(reg::CONFIG_MSIX_VECTOR, 2, 0);
    assert_eq!(d.common_read(reg::CONFIG_MSIX_VECTOR, 2), 0);
    assert_eq!(d.msix.route(2), Some(crate::interrupt::MsiMessage { address: 0xfee0_0000, data: 0x22 }));
    let irq = interrupt(&log);
    irq.signal_used_queue(1);
    irq.signal_config_change();
    assert_eq!((d.msix.fired(0), d.msix.fired(1), d.msix.fired(2)), (1, 0, 1));
    assert_eq!(d.common_read(reg::CONFIG_GENERATION, 1), 1);
    assert!(!d.intx.asserted());

    // Mask vector 2: the interrupt waits in the PBA and fires on unmask.
    d.write(layout::MSIX_TABLE_OFFSET + 2 * 16 + 12, 4, 1);
    assert_eq!(d.msix.route(2), None);
    irq.signal_used_queue(1);
    assert_eq!(d.msix.fired(2), 1);
    assert_eq!(d.read(layout::MSIX_PBA_OFFSET, 8), 1 << 2);
    d.write(layout::MSIX_TABLE_OFFSET + 2 * 16 + 12, 4, 0);
    assert_eq!(d.msix.fired(2), 2);
    assert_eq!(d.read(layout::MSIX_PBA_OFFSET, 8), 0);
    // A table entry reads back what was written.
    assert_eq!(d.read(layout::MSIX_TABLE_OFFSET + 16 + 8, 4), 0x21);
}

#[test]
fn intx_when_msix_is_off() {
    let (mut d, log) = fake(3);
    bring_up(&mut d, None);
    let irq = interrupt(&log);
    irq.signal_used_queue(0);
    assert!(d.intx.asserted());
    assert_ne!(d.config_read(0x06, 2) & 0x8, 0, "PCI status shows the interrupt");
    assert_eq!(d.read(layout::ISR_OFFSET, 1) as u8, ISR_QUEUE);
    assert!(!d.intx.asserted());
    assert_eq!(d.config_read(0x06, 2) & 0x8, 0);
    assert_eq!(d.read(layout::ISR_OFFSET, 1), 0);
    // INTx Disable in the command register holds the line low.
    d.dev.config_write(PCI_COMMAND, &0x0406u16.to_le_bytes());
    irq.signal_config_change();
    assert!(!d.intx.asserted());
    d.dev.config_write(PCI_COMMAND, &0x0006u16.to_le_bytes());
    assert!(d.intx.asserted());
    assert_eq!(d.read(layout::ISR_OFFSET, 1) as u8, ISR_CONFIG);
}

#[test]
fn pci_cfg_window_reaches_the_bar() {
    let (mut d, _) = fake(3);
    let cap = d.find_virtio_cap(layout::VIRTIO_PCI_CAP_PCI_CFG).expect("PCI_CFG capability");
    d.dev.config_write(cap + layout::PCI_CFG_CAP_BAR, &[0]);
    d.dev.config_write(cap + layout::PCI_CFG_CAP_OFFSET, &(layout::COMMON_OFFSET as u32 + 0x12).to_le_bytes());
    d.dev.config_write(cap + layout::PCI_CFG_CAP_LENGTH, &2u32.to_le_bytes());
    assert_eq!(d.config_read(cap + layout::PCI_CFG_CAP_DATA, 4) & 0xffff, 2, "num_queues through the window");
    d.dev.config_write(cap + layout::PCI_CFG_CAP_OFFSET, &(layout::COMMON_OFFSET as u32 + 0x14).to_le_bytes());
    d.dev.config_write(cap + layout::PCI_CFG_CAP_LENGTH, &1u32.to_le_bytes());
    d.dev.config_write(cap + layout::PCI_CFG_CAP_DATA, &[status::ACKNOWLEDGE, 0, 0, 0]);
    assert_eq!(d.status(), status::ACKNOWLEDGE);
    // A misaligned or oversized window does nothing.
    d.dev.config_write(cap + layout::PCI_CFG_CAP_LENGTH, &3u32.to_le_bytes());
    d.dev.config_write(cap + layout::PCI_CFG_CAP_DATA, &[0, 0, 0, 0]);
    assert_eq!(d.status(), status::ACKNOWLEDGE);
}

#[test]
fn hostile_register_traffic_does_not_panic() {
    let (mut d, log) = fake(3);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..50_000 {
        let r = next();
        let width = [1usize, 2, 4, 8][(r & 3) as usize];
        let value = next().to_le_bytes();
        match (r >> 2) % 5 {
            0 => d.dev.bar_write(0, (r >> 8) % 0x4010, &value[..width]),
            1 => {
                let mut buf = [0u8; 8];
                d.dev.bar_read(0, (r >> 8) % 0x4010, &mut buf[..width]);
            }
            2 => d.dev.config_write(((r >> 8) % 0x104) as usize, &value[..width]),
            3 => {
                let mut buf = [0u8; 8];
                d.dev.config_read(((r >> 8) % 0x104) as usize, &mut buf[..width]);
            }
            _ => d.dev.bar_write(1, r >> 8, &value[..width]),
        }
    }
    // The device still comes up cleanly afterwards.
    d.set_status(0);
    assert_eq!(d.status(), 0);
    bring_up(&mut d, None);
    assert!(log.lock().unwrap().active.is_some());
}
