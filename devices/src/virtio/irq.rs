//! Interrupt state shared between the transport (vCPU threads: register accesses) and
//! the device worker (signals used buffers and config changes).
//!
//! With MSI-X enabled, a queue or config event fires the vector the driver assigned to it
//! (none when it assigned VIRTIO_MSI_NO_VECTOR). Without MSI-X, the event sets its bit in
//! the ISR and asserts INTx; the driver's ISR read clears the bits and deasserts.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::device::VirtioInterrupt;
use super::msix::MsixTable;
use super::VIRTIO_MSI_NO_VECTOR;
use crate::interrupt::{IrqLine, MsiVectors};

/// ISR bit 0: a queue has used buffers.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit 1: the device configuration changed.
pub const ISR_CONFIG: u8 = 2;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The INTx side: the ISR and the line move together under one lock, so a worker raising
/// a bit can never race an ISR read into leaving the line low with a bit set.
struct LegacyIrq {
    isr: u8,
    disabled: bool,
    line: Arc<dyn IrqLine>,
}

impl LegacyIrq {
    fn update_line(&self) {
        self.line.set_level(self.isr != 0 && !self.disabled);
    }
}

pub struct InterruptState {
    legacy: Mutex<LegacyIrq>,
    msix: Option<Mutex<MsixTable>>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    config_generation: AtomicU8,
    needs_reset: AtomicBool,
}

impl InterruptState {
    /// `msix` with zero vectors means the function has no MSI-X capability.
    pub fn new(num_queues: usize, msix: Arc<dyn MsiVectors>, intx: Arc<dyn IrqLine>) -> Self {
        let table = (msix.count() > 0).then(|| Mutex::new(MsixTable::new(msix)));
        InterruptState {
            legacy: Mutex::new(LegacyIrq { isr: 0, disabled: false, line: intx }),
            msix: table,
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..num_queues).map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR)).collect(),
            config_generation: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
        }
    }

    pub fn msix_len(&self) -> usize {
        self.msix.as_ref().map_or(0, |t| lock(t).len())
    }

    pub fn msix_pba_len(&self) -> usize {
        self.msix.as_ref().map_or(0, |t| lock(t).pba_len())
    }

    pub fn msix_enabled(&self) -> bool {
        self.msix.as_ref().is_some_and(|t| lock(t).enabled())
    }

    /// Runs `f` on the MSI-X table, if the function has one.
    pub fn with_msix<R>(&self, f: impl FnOnce(&mut MsixTable) -> R) -> Option<R> {
        self.msix.as_ref().map(|t| f(&mut lock(t)))
    }

    /// Applies the capability's message control word. Switching MSI-X on takes INTx out
    /// of the picture, so the line must not stay asserted.
    pub fn set_msix_control(&self, control: u16) {
        let Some(table) = &self.msix else { return };
        let mut table = lock(table);
        let was = table.enabled();
        table.set_control(control);
        if table.enabled() && !was {
            let mut legacy = lock(&self.legacy);
            legacy.isr = 0;
            legacy.update_line();
        }
    }

    /// Follows the INTx Disable bit of the PCI command register.
    pub fn set_intx_disabled(&self, disabled: bool) {
        let mut legacy = lock(&self.legacy);
        if legacy.disabled != disabled {
            legacy.disabled = disabled;
            legacy.update_line();
        }
    }

    /// The driver's ISR read: returns the bits and clears them (deasserting INTx).
    pub fn read_isr(&self) -> u8 {
        let mut legacy = lock(&self.legacy);
        let isr = std::mem::take(&mut legacy.isr);
        legacy.update_line();
        isr
    }

    /// Whether INTx is asserted from the device's point of view (for the PCI status bit).
    pub fn intx_pending(&self) -> bool {
        lock(&self.legacy).isr != 0
    }

    /// Validates a vector number the driver assigns: out-of-range vectors read back as
    /// VIRTIO_MSI_NO_VECTOR, which is how a driver learns it asked for too many.
    fn accept_vector(&self, vector: u16) -> u16 {
        if usize::from(vector) < self.msix_len() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::SeqCst)
    }

    pub fn set_config_vector(&self, vector: u16) {
        self.config_vector.store(self.accept_vector(vector), Ordering::SeqCst);
    }

    pub fn queue_vector(&self, queue: usize) -> u16 {
        self.queue_vectors.get(queue).map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::SeqCst))
    }

    pub fn set_queue_vector(&self, queue: usize, vector: u16) {
        let vector = self.accept_vector(vector);
        if let Some(slot) = self.queue_vectors.get(queue) {
            slot.store(vector, Ordering::SeqCst);
        }
    }

    pub fn config_generation(&self) -> u8 {
        self.config_generation.load(Ordering::SeqCst)
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Virtio reset: vectors unassigned, ISR clear, NEEDS_RESET clear. The MSI-X table
    /// itself belongs to PCI and survives a virtio reset.
    pub fn reset(&self) {
        self.config_vector.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        for v in &self.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        }
        self.needs_reset.store(false, Ordering::SeqCst);
        let mut legacy = lock(&self.legacy);
        legacy.isr = 0;
        legacy.update_line();
    }

    fn signal(&self, vector: u16, isr_bit: u8) {
        if let Some(table) = &self.msix {
            let mut table = lock(table);
            if table.enabled() {
                if vector != VIRTIO_MSI_NO_VECTOR {
                    table.fire(vector);
                }
                return;
            }
        }
        let mut legacy = lock(&self.legacy);
        legacy.isr |= isr_bit;
        legacy.update_line();
    }
}

impl VirtioInterrupt for InterruptState {
    fn signal_used_queue(&self, queue_index: u16) {
        self.signal(self.queue_vector(usize::from(queue_index)), ISR_QUEUE);
    }

    fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.signal(self.config_vector(), ISR_CONFIG);
    }

    fn signal_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.signal(self.config_vector(), ISR_CONFIG);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::{TestIrqLine, TestMsiVectors};
    use crate::virtio::msix::MSIX_CONTROL_ENABLE;

    fn state(vectors: usize) -> (InterruptState, Arc<TestMsiVectors>, Arc<TestIrqLine>) {
        let msix = Arc::new(TestMsiVectors::new(vectors));
        let line = Arc::new(TestIrqLine::default());
        (InterruptState::new(2, msix.clone(), line.clone()), msix, line)
    }

    #[test]
    fn intx_sets_isr_and_read_clears() {
        let (irq, _, line) = state(0);
        irq.signal_used_queue(1);
        assert!(line.asserted());
        irq.signal_config_change();
        assert_eq!(irq.read_isr(), ISR_QUEUE | ISR_CONFIG);
        assert!(!line.asserted());
        assert_eq!(irq.read_isr(), 0);
        assert_eq!(irq.config_generation(), 1);
    }

    #[test]
    fn intx_disable_masks_the_line() {
        let (irq, _, line) = state(0);
        irq.set_intx_disabled(true);
        irq.signal_used_queue(0);
        assert!(!line.asserted());
        assert!(irq.intx_pending());
        irq.set_intx_disabled(false);
        assert!(line.asserted());
    }

    #[test]
    fn msix_fires_assigned_vector_only() {
        let (irq, msix, line) = state(3);
        irq.with_msix(|t| t.write_table(2 * 16 + 12, &0u32.to_le_bytes()));
        irq.set_msix_control(MSIX_CONTROL_ENABLE);
        irq.set_queue_vector(0, 2);
        irq.set_queue_vector(1, 9);
        assert_eq!(irq.queue_vector(1), VIRTIO_MSI_NO_VECTOR);
        irq.signal_used_queue(0);
        irq.signal_used_queue(1);
        assert_eq!(msix.fired(2), 1);
        assert_eq!((msix.fired(0), msix.fired(1)), (0, 0));
        assert!(!line.asserted());
        assert_eq!(irq.read_isr(), 0);
    }

    #[test]
    fn needs_reset_raises_config_interrupt_once() {
        let (irq, _, line) = state(0);
        irq.signal_needs_reset();
        irq.signal_needs_reset();
        assert!(irq.needs_reset());
        assert_eq!(irq.read_isr(), ISR_CONFIG);
        assert!(!line.asserted());
        irq.reset();
        assert!(!irq.needs_reset());
        assert_eq!(line.rising_edges(), 1);
    }
}
