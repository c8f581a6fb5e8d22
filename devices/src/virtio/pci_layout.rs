//! Where the modern transport's register blocks live, and the vendor-specific PCI
//! capabilities (virtio 1.x section 4.1.4) that tell the driver so.
//!
//! Everything is in one 16 KiB 64-bit memory BAR (BAR0):
//!
//! | offset   | block                                   |
//! |----------|-----------------------------------------|
//! | 0x0000   | common configuration (0x38 bytes)       |
//! | 0x0800   | ISR status (1 byte, read clears)        |
//! | 0x1000   | device configuration                    |
//! | 0x1800   | notifications: queue N at N * 4         |
//! | 0x2000   | MSI-X table (16 bytes per vector)       |
//! | 0x3000   | MSI-X pending-bit array                 |

use crate::pci::{BarKind, BarSpec, PciConfigSpace};

pub const BAR_INDEX: usize = 0;
pub const BAR_SIZE: u64 = 0x4000;

pub const COMMON_OFFSET: u64 = 0x0000;
/// `struct virtio_pci_common_cfg` of virtio 1.0/1.1 (no queue_notify_data/queue_reset,
/// whose features we do not offer).
pub const COMMON_LEN: u64 = 0x38;
pub const ISR_OFFSET: u64 = 0x0800;
pub const ISR_LEN: u64 = 1;
pub const DEVICE_OFFSET: u64 = 0x1000;
pub const DEVICE_MAX_LEN: u64 = 0x800;
pub const NOTIFY_OFFSET: u64 = 0x1800;
pub const NOTIFY_MAX_LEN: u64 = 0x800;
/// Each queue's doorbell is `queue_notify_off * NOTIFY_OFF_MULTIPLIER` into the notify
/// block; `queue_notify_off` is the queue index, so every queue has its own address and
/// its own ioeventfd.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x2000;
pub const MSIX_TABLE_MAX_LEN: u64 = 0x1000;
pub const MSIX_PBA_OFFSET: u64 = 0x3000;
pub const MSIX_PBA_MAX_LEN: u64 = 0x1000;

/// The most queues the notify block has room for.
pub const MAX_QUEUES: usize = (NOTIFY_MAX_LEN / NOTIFY_OFF_MULTIPLIER as u64) as usize;
/// The most MSI-X vectors the table block has room for.
pub const MAX_MSIX_VECTORS: usize = (MSIX_TABLE_MAX_LEN / 16) as usize;

pub const PCI_VENDOR_ID_REDHAT_QUMRANET: u16 = 0x1af4;
/// Modern (non-transitional) virtio devices are 0x1040 + virtio device ID.
pub const PCI_DEVICE_ID_VIRTIO_BASE: u16 = 0x1040;

pub const PCI_CAP_ID_VENDOR: u8 = 0x09;
pub const PCI_CAP_ID_MSIX: u8 = 0x11;

/// `cfg_type` values of `struct virtio_pci_cap`.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// Offsets of the PCI-configuration access window's fields, from its capability start.
pub const PCI_CFG_CAP_BAR: usize = 4;
pub const PCI_CFG_CAP_OFFSET: usize = 8;
pub const PCI_CFG_CAP_LENGTH: usize = 12;
pub const PCI_CFG_CAP_DATA: usize = 16;
pub const PCI_CFG_CAP_LEN: usize = 20;

/// The BAR every virtio-pci function here exposes.
pub fn bars() -> [BarSpec; 1] {
    [BarSpec { index: BAR_INDEX, kind: BarKind::Memory64, size: BAR_SIZE }]
}

/// The body of a `struct virtio_pci_cap` after cap_vndr/cap_next: cap_len, cfg_type, bar,
/// id, 2 bytes padding, offset, length.
fn virtio_cap_body(cap_len: u8, cfg_type: u8, offset: u64, length: u64) -> Vec<u8> {
    let mut body = vec![cap_len, cfg_type, BAR_INDEX as u8, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body
}

/// Config-space offsets of the capabilities the transport must intercept.
pub struct CapabilityOffsets {
    pub pci_cfg: usize,
    pub msix: Option<usize>,
}

/// Appends the virtio capabilities (and MSI-X, when `msix_vectors > 0`) to `config`.
pub fn add_capabilities(
    config: &mut PciConfigSpace,
    device_config_len: u64,
    num_queues: usize,
    msix_vectors: usize,
    msix_pba_len: usize,
) -> CapabilityOffsets {
    config.add_capability(
        PCI_CAP_ID_VENDOR,
        &virtio_cap_body(16, VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_LEN),
        &[],
    );
    let mut notify = virtio_cap_body(
        20,
        VIRTIO_PCI_CAP_NOTIFY_CFG,
        NOTIFY_OFFSET,
        (num_queues as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)).max(u64::from(NOTIFY_OFF_MULTIPLIER)),
    );
    notify.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
    config.add_capability(PCI_CAP_ID_VENDOR, &notify, &[]);
    config.add_capability(PCI_CAP_ID_VENDOR, &virtio_cap_body(16, VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_LEN), &[]);
    if device_config_len > 0 {
        config.add_capability(
            PCI_CAP_ID_VENDOR,
            &virtio_cap_body(16, VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, device_config_len),
            &[],
        );
    }
    // The access window: bar, offset, length and data are the driver's to write.
    let mut window = virtio_cap_body(PCI_CFG_CAP_LEN as u8, VIRTIO_PCI_CAP_PCI_CFG, 0, 0);
    window.extend_from_slice(&[0; 4]);
    let mut window_writable = vec![0u8; window.len()];
    for field in [PCI_CFG_CAP_BAR..PCI_CFG_CAP_BAR + 1, PCI_CFG_CAP_OFFSET..PCI_CFG_CAP_DATA + 4] {
        for i in field {
            window_writable[i - 2] = 0xff;
        }
    }
    let pci_cfg = config.add_capability(PCI_CAP_ID_VENDOR, &window, &window_writable);

    let msix = (msix_vectors > 0).then(|| {
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&((msix_vectors - 1) as u16).to_le_bytes());
        body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32 | BAR_INDEX as u32).to_le_bytes());
        body.extend_from_slice(&(MSIX_PBA_OFFSET as u32 | BAR_INDEX as u32).to_le_bytes());
        debug_assert!(msix_pba_len as u64 <= MSIX_PBA_MAX_LEN);
        // Only Enable and Function Mask (bits 15 and 14 of message control) are writable.
        config.add_capability(PCI_CAP_ID_MSIX, &body, &[0x00, 0xc0])
    });
    CapabilityOffsets { pci_cfg, msix }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{PciIdentity, PCI_CAPABILITY_LIST};

    #[test]
    fn capabilities_describe_the_layout() {
        let identity = PciIdentity {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            revision: 1,
            class_code: 0x020000,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1041,
        };
        let mut cs = PciConfigSpace::new(identity, &bars(), 1);
        let offsets = add_capabilities(&mut cs, 12, 3, 4, 8);
        let mut found = Vec::new();
        let mut cap = cs.read8(PCI_CAPABILITY_LIST) as usize;
        while cap != 0 {
            found.push((cs.read8(cap), if cs.read8(cap) == PCI_CAP_ID_VENDOR { cs.read8(cap + 3) } else { 0 }, cap));
            cap = cs.read8(cap + 1) as usize;
        }
        let types: Vec<(u8, u8)> = found.iter().map(|&(id, t, _)| (id, t)).collect();
        assert_eq!(types, vec![(9, 1), (9, 2), (9, 3), (9, 4), (9, 5), (0x11, 0)]);
        let notify = found[1].2;
        assert_eq!(cs.read32(notify + 8), NOTIFY_OFFSET as u32);
        assert_eq!(cs.read32(notify + 12), 12);
        assert_eq!(cs.read32(notify + 16), NOTIFY_OFF_MULTIPLIER);
        let msix = offsets.msix.unwrap();
        assert_eq!(cs.read16(msix + 2), 3);
        assert_eq!(cs.read32(msix + 4), MSIX_TABLE_OFFSET as u32);
        assert_eq!(cs.read32(msix + 8), MSIX_PBA_OFFSET as u32);
        // Message control: only enable and function mask change.
        cs.write(msix + 2, &[0xff, 0xff]);
        assert_eq!(cs.read16(msix + 2), 0xc003);
        assert_eq!(offsets.pci_cfg, found[4].2);
        cs.write(offsets.pci_cfg + PCI_CFG_CAP_OFFSET, &0x14u32.to_le_bytes());
        assert_eq!(cs.read32(offsets.pci_cfg + PCI_CFG_CAP_OFFSET), 0x14);
        cs.write(offsets.pci_cfg + 2, &[0]);
        assert_eq!(cs.read8(offsets.pci_cfg + 2), PCI_CFG_CAP_LEN as u8);
    }
}
