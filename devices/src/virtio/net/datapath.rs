//! The state the device thread works on: the queues, the backend, and what was
//! negotiated. `rx`, `tx` and `ctrl` add the per-queue processing; `worker` drives it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use log::{error, warn};
use tapir_net::backend::{Backend, Offloads, VnetHdr, MAX_FRAME_LEN};
use virtio_queue::{Queue, QueueT};

use super::config_space::NetConfigSpace;
use super::counters::{DropReason, NetCounters};
use super::features;
use crate::virtio::chain::GuestBuffers;
use crate::virtio::device::{GuestRam, VirtioInterrupt};
use crate::virtio::log_sparingly;
use crate::virtio::ring::{self, RingFault};

/// One queue and whether it is still usable.
pub(super) struct QueueSlot {
    pub index: u16,
    pub queue: Queue,
    /// The ring is corrupt; nothing more is done on it until reset.
    pub faulted: bool,
    /// Chains returned since the last notification decision.
    pub returned: u32,
}

impl QueueSlot {
    pub fn new(index: u16, queue: Queue) -> Self {
        QueueSlot { index, queue, faulted: false, returned: 0 }
    }
}

/// A receive chain taken from the ring and checked, waiting for a frame.
pub(super) struct RxChain {
    pub head: u16,
    pub buffers: GuestBuffers,
}

pub(super) struct RxState {
    pub slot: QueueSlot,
    pub mergeable: bool,
    /// What the backend was last told the guest accepts.
    pub offloads: Offloads,
    pub chains: VecDeque<RxChain>,
    /// Sum of `chains` buffer lengths.
    pub capacity: usize,
    /// A frame taken from the backend that has not found guest buffers yet; it sits in
    /// `frame` while the device waits for the driver to add buffers.
    pub pending: Option<(VnetHdr, usize)>,
    pub frame: Vec<u8>,
    /// No buffers: the backend is not polled until the driver kicks the RX queue.
    pub stalled: bool,
    /// The backend failed; it is left alone until this instant.
    pub backend_paused_until: Option<Instant>,
}

pub(super) struct TxState {
    pub slot: QueueSlot,
    /// What the guest may ask of the backend.
    pub offloads: Offloads,
    pub frame: Vec<u8>,
}

pub(super) struct DataPath {
    pub mem: GuestRam,
    pub features: u64,
    pub backend: Box<dyn Backend>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub counters: Arc<NetCounters>,
    pub config: Arc<NetConfigSpace>,
    pub rx: RxState,
    pub tx: TxState,
    pub ctrl: Option<QueueSlot>,
}

/// The largest chain a transmit may use: header plus the largest frame a backend takes.
pub(super) const TX_CHAIN_LIMIT: usize = VnetHdr::LEN + MAX_FRAME_LEN;
/// Frames shorter than an Ethernet header are not frames.
pub(super) const ETH_HLEN: usize = 14;

pub(super) struct DataPathParts {
    pub mem: GuestRam,
    pub features: u64,
    pub backend: Box<dyn Backend>,
    pub rx_offloads: Offloads,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub counters: Arc<NetCounters>,
    pub config: Arc<NetConfigSpace>,
    pub rx: QueueSlot,
    pub tx: QueueSlot,
    pub ctrl: Option<QueueSlot>,
}

impl DataPath {
    pub fn new(parts: DataPathParts) -> Self {
        let features = parts.features;
        DataPath {
            mem: parts.mem,
            features,
            backend: parts.backend,
            interrupt: parts.interrupt,
            counters: parts.counters,
            config: parts.config,
            rx: RxState {
                slot: parts.rx,
                mergeable: features & features::MRG_RXBUF != 0,
                offloads: parts.rx_offloads,
                chains: VecDeque::new(),
                capacity: 0,
                pending: None,
                frame: vec![0; MAX_FRAME_LEN],
                stalled: false,
                backend_paused_until: None,
            },
            tx: TxState { slot: parts.tx, offloads: features::host_offloads(features), frame: Vec::new() },
            ctrl: parts.ctrl,
        }
    }

    /// Counts a drop, logging the first and then every power-of-two occurrence.
    pub fn drop_frame(counters: &NetCounters, reason: DropReason, detail: &dyn std::fmt::Display) {
        let n = counters.count_drop(reason);
        if log_sparingly(n) {
            warn!("virtio-net: {}: {detail} ({n} so far)", reason.name());
        }
    }

    /// Marks a queue unusable and asks the driver for a reset.
    pub fn fault(slot: &mut QueueSlot, counters: &NetCounters, interrupt: &dyn VirtioInterrupt, fault: &RingFault) {
        if !slot.faulted {
            slot.faulted = true;
            counters.count_drop(DropReason::RingFault);
            error!("virtio-net: queue {} is broken, device needs reset: {fault}", slot.index);
            interrupt.signal_needs_reset();
        }
    }

    /// Puts a chain on the used ring. A head the ring cannot take (index past the ring)
    /// is a driver bug we can only count; a used ring we cannot write is a fault.
    pub fn return_chain(
        slot: &mut QueueSlot,
        mem: &GuestRam,
        counters: &NetCounters,
        interrupt: &dyn VirtioInterrupt,
        head: u16,
        len: u32,
    ) {
        if head >= slot.queue.size() {
            DataPath::drop_frame(counters, DropReason::RingFault, &format_args!("queue {} head {head} out of range", slot.index));
            return;
        }
        match ring::add_used(&mut slot.queue, mem, head, len) {
            Ok(()) => slot.returned += 1,
            Err(fault) => DataPath::fault(slot, counters, interrupt, &fault),
        }
    }

    /// Interrupts the driver if it returned chains and EVENT_IDX (or the lack of it) says
    /// the driver wants to know.
    pub fn notify_if_needed(slot: &mut QueueSlot, mem: &GuestRam, counters: &NetCounters, interrupt: &dyn VirtioInterrupt) {
        if slot.returned == 0 {
            return;
        }
        slot.returned = 0;
        match slot.queue.needs_notification(mem) {
            Ok(true) => interrupt.signal_used_queue(slot.index),
            Ok(false) => {}
            Err(e) => DataPath::fault(slot, counters, interrupt, &RingFault::Memory(e)),
        }
    }

    /// Re-reads the backend's link state and tells the driver when it changed.
    pub fn check_link(&mut self) {
        if self.config.set_link_up(self.backend.link_up()) {
            self.interrupt.signal_config_change();
        }
    }

    /// Whether the backend's fd should wake the thread.
    pub fn wants_backend_events(&self) -> bool {
        !self.rx.stalled && !self.rx.slot.faulted && self.rx.backend_paused_until.is_none()
    }

    /// The driver kicked the RX queue: it added buffers, so the backend is worth polling.
    pub fn rx_kicked(&mut self) {
        self.rx.stalled = false;
    }

    /// Periodic housekeeping: resume a paused backend, publish backend counters.
    pub fn tick(&mut self, now: Instant) {
        if self.rx.backend_paused_until.is_some_and(|until| now >= until) {
            self.rx.backend_paused_until = None;
        }
        self.counters.store_backend(self.backend.counters());
    }

    /// Ends the data path and hands the backend back. A frame still waiting for buffers
    /// is lost with the queues.
    pub fn into_backend(self) -> Box<dyn Backend> {
        if self.rx.pending.is_some() {
            self.counters.count_drop(DropReason::RxDiscardedOnReset);
        }
        self.counters.store_backend(self.backend.counters());
        self.backend
    }
}
