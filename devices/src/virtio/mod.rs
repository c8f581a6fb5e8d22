//! virtio 1.x over PCI (the "modern" transport) and the virtio devices built on it.
//!
//! Layout:
//! - `device`: the contract a device model (virtio-net) implements for the transport.
//! - `pci_layout`: where the transport's registers live in BAR0 and the capabilities that
//!   point at them.
//! - `common_cfg`: the common configuration registers (features, status, queue setup).
//! - `msix`: the MSI-X table and pending-bit array.
//! - `irq`: how a device's worker raises queue and config interrupts (MSI-X or INTx).
//! - `pci_transport`: `VirtioPciDevice`, the `PciDevice` the VMM plugs into its bus.
//! - `chain`: descriptor chains turned into bounds-checked guest buffers.
//! - `ring`: small queue helpers that turn a misbehaving driver into a counted fault.
//! - `net`: virtio-net.

pub mod chain;
pub mod common_cfg;
pub mod device;
pub mod irq;
pub mod msix;
pub mod net;
pub mod pci_layout;
pub mod pci_transport;
pub mod ring;

#[cfg(test)]
pub(crate) mod test_driver;

pub use device::{ActivateError, Activation, ActiveQueue, GuestRam, VirtioDevice, VirtioInterrupt};
pub use pci_transport::{TransportError, VirtioPciDevice};

/// Device status bits (virtio 1.x section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// Transport-level feature bits the transport itself provides to every device.
pub mod transport_features {
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

    pub const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
    pub const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
    pub const INDIRECT_DESC: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;

    /// What the modern transport offers on top of the device's own bits: split rings with
    /// indirect descriptors and event-index notification suppression.
    pub const OFFERED: u64 = VERSION_1 | EVENT_IDX | INDIRECT_DESC;
}

/// The MSI-X "no vector" value for config and queue vector registers.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Logs only on the 1st, 2nd, 4th, 8th... occurrence, so a guest that repeats a mistake
/// in a loop cannot flood the log, while the first occurrence is always seen.
pub(crate) fn log_sparingly(count: u64) -> bool {
    count.is_power_of_two()
}
