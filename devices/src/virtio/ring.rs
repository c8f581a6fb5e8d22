//! Queue operations that turn a misbehaving driver into a reported fault instead of a
//! silent stall or a log flood.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use thiserror::Error;
use virtio_queue::{Queue, QueueT};

use super::device::GuestRam;

#[derive(Debug, Error)]
pub enum RingFault {
    /// The driver claims more new chains than the ring holds: it is corrupt.
    #[error("available index {avail} is {ahead} entries ahead of the device (ring size {size})")]
    AvailIndexAhead { avail: u16, ahead: u16, size: u16 },
    #[error("ring memory is not accessible: {0}")]
    Memory(virtio_queue::Error),
}

/// How many chains the driver has made available that the device has not taken yet.
pub fn pending_chains(queue: &Queue, mem: &GuestRam) -> Result<u16, RingFault> {
    let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(RingFault::Memory)?;
    let ahead = (avail - Wrapping(queue.next_avail())).0;
    if ahead > queue.size() {
        return Err(RingFault::AvailIndexAhead { avail: avail.0, ahead, size: queue.size() });
    }
    Ok(ahead)
}

/// Returns a chain to the driver.
pub fn add_used(queue: &mut Queue, mem: &GuestRam, head: u16, len: u32) -> Result<(), RingFault> {
    queue.add_used(mem, head, len).map_err(RingFault::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    #[test]
    fn avail_index_far_ahead_is_a_fault() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let q: Queue = vq.create_queue().unwrap();
        assert_eq!(pending_chains(&q, &mem).unwrap(), 0);
        vq.avail().idx().store(16);
        assert_eq!(pending_chains(&q, &mem).unwrap(), 16);
        vq.avail().idx().store(17);
        assert!(matches!(pending_chains(&q, &mem), Err(RingFault::AvailIndexAhead { ahead: 17, .. })));
    }

    #[test]
    fn out_of_range_head_cannot_be_returned() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(add_used(&mut q, &mem, 16, 0).is_err());
        assert!(add_used(&mut q, &mem, 15, 0).is_ok());
    }
}
