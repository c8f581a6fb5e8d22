//! The contract between the virtio-pci transport and a virtio device model.
//!
//! The transport owns everything the specification puts in the transport: feature
//! windows, device status, queue registers, notification doorbells and interrupts. A
//! device owns its configuration space and its data path. At DRIVER_OK the transport
//! hands the device its configured queues in an `Activation`; at reset it asks for them
//! back by calling `reset`, which must stop every thread the device started.

use std::io;
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM as devices see it.
pub type GuestRam = GuestMemoryMmap<()>;

/// How a running device tells the driver about progress. Implemented by the transport;
/// cheap to call from a device worker thread.
pub trait VirtioInterrupt: Send + Sync {
    /// The device put buffers in the used ring of `queue_index` and the ring's
    /// notification suppression says the driver wants to hear about it.
    fn signal_used_queue(&self, queue_index: u16);
    /// The device configuration space changed (e.g. link status).
    fn signal_config_change(&self);
    /// The device hit an error it cannot recover from without a reset (a corrupt ring).
    /// Sets DEVICE_NEEDS_RESET in the status register and raises a config interrupt.
    fn signal_needs_reset(&self);
}

/// One queue as the driver configured it.
pub struct ActiveQueue {
    /// Queue index in the device's numbering.
    pub index: u16,
    /// The queue, with EVENT_IDX already set from the negotiated features. `ready()` is
    /// false for queues the driver left disabled.
    pub queue: Queue,
    /// Signalled whenever the driver notifies this queue (ioeventfd or a trapped write).
    pub kick: EventFd,
}

/// Everything a device needs to start its data path.
pub struct Activation {
    pub mem: GuestRam,
    /// Features both sides agreed on (transport and device bits).
    pub features: u64,
    /// Every queue the device declared, in index order.
    pub queues: Vec<ActiveQueue>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

#[derive(Debug, Error)]
pub enum ActivateError {
    #[error("queue {0} is required but the driver did not enable it")]
    QueueNotReady(u16),
    #[error("queue {0} has rings outside guest memory or misaligned")]
    QueueInvalid(u16),
    #[error("the device is already active")]
    AlreadyActive,
    #[error("the device lost its backend earlier and cannot run again")]
    Unusable,
    #[error("cannot start the device worker: {0}")]
    Io(#[from] io::Error),
}

/// A virtio device model behind the virtio-pci transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (1 for network).
    fn device_type(&self) -> u32;

    /// PCI class code (class << 16 | subclass << 8 | prog-if) the function reports.
    fn pci_class(&self) -> u32 {
        0xff_0000
    }

    /// Short name for logs.
    fn name(&self) -> &str;

    /// Maximum size of every queue, in queue-index order. Each is a power of two.
    fn queue_max_sizes(&self) -> Vec<u16>;

    /// Device-specific feature bits offered. The transport adds its own
    /// (VERSION_1, EVENT_IDX, INDIRECT_DESC).
    fn device_features(&self) -> u64;

    /// Rejects a feature set that breaks the device's dependency rules; the transport then
    /// refuses FEATURES_OK.
    fn validate_features(&self, _features: u64) -> Result<(), String> {
        Ok(())
    }

    /// Size of the device configuration space in bytes.
    fn config_len(&self) -> usize;

    /// Reads device config at `offset`; bytes past the end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// A driver write to device config; devices ignore what is read-only for them.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the data path. Called once per DRIVER_OK.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;

    /// Stops the data path and forgets the queues, so a later `activate` starts afresh.
    /// Harmless when not active. Must not return before device threads have stopped.
    fn reset(&mut self);

    /// The VM is going away: stop threads for good.
    fn shutdown(&mut self) {
        self.reset()
    }

    /// One-line counters summary.
    fn stats(&self) -> String {
        String::new()
    }
}
