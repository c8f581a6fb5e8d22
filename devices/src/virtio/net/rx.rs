//! Receive: frames from the backend into the guest's RX buffers.
//!
//! Each frame goes out as a virtio_net_hdr followed by the frame bytes. Without
//! MRG_RXBUF it must fit one chain; with it, it may span several chains and the header's
//! `num_buffers` says how many. Chains are taken from the ring and checked before a
//! frame needs them, and kept in order until used. When the ring runs dry the frame is
//! held and the backend left alone until the driver kicks the queue.

use std::time::{Duration, Instant};

use log::warn;
use tapir_net::backend::{BackendError, VnetHdr};
use virtio_queue::QueueT;

use super::counters::DropReason;
use super::datapath::{DataPath, RxChain};
use super::features;
use crate::virtio::chain::{parse_chain, GuestBuffers};
use crate::virtio::device::GuestRam;
use crate::virtio::log_sparingly;
use crate::virtio::ring::{self, RingFault};

/// Frames handled per call before the worker looks at its other events again.
const RX_BUDGET: usize = 256;
/// How long a failing backend is left alone.
const BACKEND_ERROR_BACKOFF: Duration = Duration::from_millis(500);
const HDR_LEN: usize = VnetHdr::LEN;

enum Delivery {
    Delivered,
    Dropped,
    NoBuffers,
    Fault,
}

enum Supply {
    Enough,
    NoBuffers,
    ExceedsRing,
    Fault,
}

impl DataPath {
    /// Moves frames from the backend into the guest. Returns true when it stopped only
    /// because of its budget, i.e. it should run again soon.
    pub fn process_rx(&mut self) -> bool {
        if self.rx.slot.faulted {
            return false;
        }
        let mut more = false;
        let mut handled = 0;
        loop {
            if handled == RX_BUDGET {
                more = true;
                break;
            }
            handled += 1;
            if self.rx.pending.is_none() && !self.receive_from_backend() {
                break;
            }
            match self.deliver_pending() {
                Delivery::Delivered | Delivery::Dropped => {}
                Delivery::NoBuffers => {
                    self.rx.stalled = true;
                    break;
                }
                Delivery::Fault => break,
            }
        }
        DataPath::notify_if_needed(&mut self.rx.slot, &self.mem, &self.counters, self.interrupt.as_ref());
        more
    }

    /// Takes one frame from the backend into `rx.pending`; false when there is none.
    fn receive_from_backend(&mut self) -> bool {
        if self.rx.backend_paused_until.is_some() {
            return false;
        }
        loop {
            match self.backend.recv(&mut self.rx.frame) {
                Ok(Some((hdr, len))) if len <= self.rx.frame.len() => {
                    self.rx.pending = Some((hdr, len));
                    return true;
                }
                Ok(Some((_, len))) => {
                    DataPath::drop_frame(&self.counters, DropReason::RxBackendError, &format_args!("backend claims a {len}-byte frame"));
                }
                Ok(None) | Err(BackendError::WouldBlock) => return false,
                // The backend counted it; there may be more behind it.
                Err(BackendError::Dropped(_)) => {}
                Err(BackendError::Io(e)) => {
                    let n = self.counters.count_drop(DropReason::RxBackendError);
                    if log_sparingly(n) {
                        warn!("virtio-net: {} backend receive failed: {e} ({n} so far); pausing it", self.backend.kind());
                    }
                    self.rx.backend_paused_until = Some(Instant::now() + BACKEND_ERROR_BACKOFF);
                    return false;
                }
            }
        }
    }

    fn deliver_pending(&mut self) -> Delivery {
        let Some((hdr, len)) = self.rx.pending else { return Delivery::Delivered };
        if !features::hdr_within(&hdr, self.rx.offloads) {
            self.rx.pending = None;
            DataPath::drop_frame(&self.counters, DropReason::RxOffloadNotNegotiated, &format_args!("backend frame header {hdr:?}"));
            return Delivery::Dropped;
        }
        let needed = HDR_LEN + len;
        match self.supply_chains(needed) {
            Supply::Enough => {}
            Supply::NoBuffers => return Delivery::NoBuffers,
            Supply::Fault => return Delivery::Fault,
            Supply::ExceedsRing => {
                self.rx.pending = None;
                DataPath::drop_frame(&self.counters, DropReason::RxFrameExceedsRing, &format_args!("{len}-byte frame"));
                return Delivery::Dropped;
            }
        }
        // How many chains the frame takes.
        let mut count = 0usize;
        let mut covered = 0usize;
        for chain in &self.rx.chains {
            count += 1;
            covered += chain.buffers.len();
            if covered >= needed || !self.rx.mergeable {
                break;
            }
        }
        if covered < needed {
            // Only reachable without MRG_RXBUF: the frame is bigger than the buffer the
            // driver sized for its MTU. The buffer stays for the next frame.
            self.rx.pending = None;
            DataPath::drop_frame(
                &self.counters,
                DropReason::RxBufferTooSmall,
                &format_args!("{len}-byte frame, {covered}-byte buffer"),
            );
            return Delivery::Dropped;
        }

        let mut out = hdr;
        out.num_buffers = count as u16;
        if !self.rx.offloads.csum {
            // Without GUEST_CSUM the header's flags must be zero.
            out.flags = 0;
        }
        let hdr_bytes = out.to_bytes();
        let frame = self.rx.frame.get(..len).unwrap_or(&[]);
        let mut position = 0usize;
        let mut memory_error = None;
        for _ in 0..count {
            let Some(chain) = self.rx.chains.pop_front() else { break };
            self.rx.capacity -= chain.buffers.len();
            let take = chain.buffers.len().min(needed - position);
            let written = if memory_error.is_none() {
                match write_stream(&chain.buffers, &self.mem, &hdr_bytes, frame, position, take) {
                    Ok(()) => take,
                    Err(e) => {
                        memory_error = Some(e);
                        0
                    }
                }
            } else {
                0
            };
            position += take;
            DataPath::return_chain(
                &mut self.rx.slot,
                &self.mem,
                &self.counters,
                self.interrupt.as_ref(),
                chain.head,
                written as u32,
            );
        }
        self.rx.pending = None;
        if let Some(e) = memory_error {
            DataPath::drop_frame(&self.counters, DropReason::RxGuestMemory, &e);
            return Delivery::Dropped;
        }
        self.counters.count_rx(len);
        Delivery::Delivered
    }

    /// Takes chains off the ring until the held ones can carry `needed` bytes (one chain
    /// is enough without MRG_RXBUF; whether it is big enough is the caller's check).
    fn supply_chains(&mut self, needed: usize) -> Supply {
        loop {
            let enough = if self.rx.mergeable { self.rx.capacity >= needed } else { !self.rx.chains.is_empty() };
            if enough {
                return Supply::Enough;
            }
            if self.rx.chains.len() >= usize::from(self.rx.slot.queue.size()) {
                return Supply::ExceedsRing;
            }
            match ring::pending_chains(&self.rx.slot.queue, &self.mem) {
                Err(fault) => return self.rx_fault(&fault),
                Ok(0) => match self.rx.slot.queue.enable_notification(&self.mem) {
                    // Buffers arrived while we looked: go round again.
                    Ok(true) => continue,
                    Ok(false) => return Supply::NoBuffers,
                    Err(e) => return self.rx_fault(&RingFault::Memory(e)),
                },
                Ok(_) => {}
            }
            let Some(chain) = self.rx.slot.queue.pop_descriptor_chain(&self.mem) else {
                return Supply::NoBuffers;
            };
            let outcome = parse_chain(chain, &self.mem, usize::MAX);
            let (head, problem) = match outcome {
                Ok(parsed) if !parsed.readable.is_empty() => (parsed.head, "device-readable buffer in an RX chain".to_string()),
                Ok(parsed) if parsed.writable.len() < HDR_LEN => {
                    (parsed.head, format!("{}-byte RX chain cannot hold a header", parsed.writable.len()))
                }
                Ok(parsed) => {
                    self.rx.capacity += parsed.writable.len();
                    self.rx.chains.push_back(RxChain { head: parsed.head, buffers: parsed.writable });
                    continue;
                }
                Err(bad) => (bad.head, bad.error.to_string()),
            };
            DataPath::drop_frame(&self.counters, DropReason::RxBadChain, &format_args!("chain {head}: {problem}"));
            DataPath::return_chain(&mut self.rx.slot, &self.mem, &self.counters, self.interrupt.as_ref(), head, 0);
        }
    }

    fn rx_fault(&mut self, fault: &RingFault) -> Supply {
        DataPath::fault(&mut self.rx.slot, &self.counters, self.interrupt.as_ref(), fault);
        Supply::Fault
    }
}

/// Writes bytes [position, position + take) of the stream `hdr ++ frame` to the start of
/// `buffers`.
fn write_stream(
    buffers: &GuestBuffers,
    mem: &GuestRam,
    hdr: &[u8; HDR_LEN],
    frame: &[u8],
    position: usize,
    take: usize,
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0;
    while done < take {
        let at = position + done;
        let source = if at < HDR_LEN { hdr.get(at..) } else { frame.get(at - HDR_LEN..) }.unwrap_or(&[]);
        let n = source.len().min(take - done);
        if n == 0 {
            break;
        }
        let written = buffers.write_at(mem, done, &source[..n])?;
        if written < n {
            return Err(vm_memory::GuestMemoryError::PartialBuffer { expected: n, completed: written });
        }
        done += n;
    }
    Ok(())
}
