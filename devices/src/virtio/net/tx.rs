//! Transmit: frames from the guest's TX chains to the backend.
//!
//! A chain is a virtio_net_hdr followed by the frame, all device-readable. Its offload
//! request must be one the driver negotiated (which we only offered if the backend can do
//! it). Whatever happens, the chain goes back to the driver, with length 0.

use tapir_net::backend::{BackendError, VnetHdr};
use virtio_queue::QueueT;

use super::counters::DropReason;
use super::datapath::{DataPath, ETH_HLEN, TX_CHAIN_LIMIT};
use super::features;
use crate::virtio::chain::{parse_chain, ChainError, ParsedChain};
use crate::virtio::ring::{self, RingFault};

/// Chains handled per call before the worker looks at its other events again.
const TX_BUDGET: usize = 256;

impl DataPath {
    /// Sends what the driver queued. Returns true when it stopped only because of its
    /// budget, i.e. it should run again soon (the kick that woke it has been consumed).
    pub fn process_tx(&mut self) -> bool {
        if self.tx.slot.faulted {
            return false;
        }
        let mut handled = 0;
        let mut more = false;
        'ring: loop {
            if let Err(e) = self.tx.slot.queue.disable_notification(&self.mem) {
                self.tx_fault(&RingFault::Memory(e));
                break;
            }
            loop {
                match ring::pending_chains(&self.tx.slot.queue, &self.mem) {
                    Err(fault) => {
                        self.tx_fault(&fault);
                        break 'ring;
                    }
                    Ok(0) => break,
                    Ok(_) => {}
                }
                if handled == TX_BUDGET {
                    more = true;
                    break 'ring;
                }
                let Some(chain) = self.tx.slot.queue.pop_descriptor_chain(&self.mem) else { break };
                let parsed = parse_chain(chain, &self.mem, TX_CHAIN_LIMIT);
                self.transmit(parsed);
                handled += 1;
                if self.tx.slot.faulted {
                    break 'ring;
                }
            }
            // Re-enable notifications, then look once more: a chain queued in between
            // would otherwise wait for a kick that never comes.
            match self.tx.slot.queue.enable_notification(&self.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.tx_fault(&RingFault::Memory(e));
                    break;
                }
            }
        }
        DataPath::notify_if_needed(&mut self.tx.slot, &self.mem, &self.counters, self.interrupt.as_ref());
        more
    }

    fn transmit(&mut self, parsed: Result<ParsedChain, crate::virtio::chain::BadChain>) {
        let (head, outcome) = match parsed {
            Ok(chain) => (chain.head, self.send_chain(&chain)),
            Err(bad) => {
                let reason = match bad.error {
                    ChainError::TooLong { .. } => DropReason::TxFrameTooLarge,
                    _ => DropReason::TxBadChain,
                };
                (bad.head, Err((reason, bad.error.to_string())))
            }
        };
        if let Err((reason, detail)) = outcome {
            DataPath::drop_frame(&self.counters, reason, &format_args!("chain {head}: {detail}"));
        }
        DataPath::return_chain(&mut self.tx.slot, &self.mem, &self.counters, self.interrupt.as_ref(), head, 0);
    }

    fn send_chain(&mut self, chain: &ParsedChain) -> Result<(), (DropReason, String)> {
        if !chain.writable.is_empty() {
            return Err((DropReason::TxBadChain, "device-writable buffer in a TX chain".into()));
        }
        if chain.readable.len() < VnetHdr::LEN {
            return Err((DropReason::TxHeaderTooShort, format!("{}-byte chain", chain.readable.len())));
        }
        chain
            .readable
            .read_all(&self.mem, &mut self.tx.frame)
            .map_err(|e| (DropReason::TxGuestMemory, e.to_string()))?;
        let (hdr_bytes, frame) = self.tx.frame.split_at(VnetHdr::LEN.min(self.tx.frame.len()));
        let Some(mut hdr) = VnetHdr::from_bytes(hdr_bytes) else {
            return Err((DropReason::TxHeaderTooShort, "short header".into()));
        };
        if frame.len() < ETH_HLEN {
            return Err((DropReason::TxRuntFrame, format!("{}-byte frame", frame.len())));
        }
        if !features::hdr_within(&hdr, self.tx.offloads) {
            return Err((DropReason::TxOffloadNotNegotiated, format!("header {hdr:?}")));
        }
        if !features::hdr_fits(&hdr, frame.len()) {
            return Err((DropReason::TxBadOffloadHeader, format!("header {hdr:?} for a {}-byte frame", frame.len())));
        }
        // DATA_VALID means nothing on transmit and num_buffers only exists on receive.
        hdr.flags &= VnetHdr::FLAG_NEEDS_CSUM;
        hdr.num_buffers = 0;
        match self.backend.send(&hdr, frame) {
            Ok(()) => {
                self.counters.count_tx(frame.len());
                Ok(())
            }
            Err(BackendError::WouldBlock) => Err((DropReason::TxBackendBusy, "backend full".into())),
            Err(BackendError::Dropped(why)) => Err((DropReason::TxBackendDropped, why.into())),
            Err(BackendError::Io(e)) => Err((DropReason::TxBackendError, format!("{} backend: {e}", self.backend.kind()))),
        }
    }

    fn tx_fault(&mut self, fault: &RingFault) {
        DataPath::fault(&mut self.tx.slot, &self.counters, self.interrupt.as_ref(), fault);
    }
}
