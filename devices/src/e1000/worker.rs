//! The device's data path thread. It sleeps in poll(2) on three fds: the kick eventfd
//! the register path writes when rings or control registers change, the ITR timerfd,
//! and the backend's fd (only while it can take a frame). It moves descriptors and
//! buffers between guest memory and the backend, and reports back under the state lock
//! one packet at a time so vCPU register accesses never wait long.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tapir_net::backend::{Backend, BackendError, Offloads, VnetHdr, MAX_FRAME_LEN};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::checksum;
use super::registers::{RNBC, ROC, RUC, TSCTFC};
use super::rx::{self, RxError, ERR_RXE, STA_DD, STA_EOP};
use super::state::{Ring, State};
use super::stats;
use super::tx::{self, FrameMeta, Offload, TxCaps, TxContext, TxDescriptor};

/// Descriptors handled per wake-up before giving other work a turn.
const TX_BUDGET: u32 = 256;
/// Frames received per wake-up before giving other work a turn.
const RX_BUDGET: u32 = 64;

/// What the register path and the worker share.
pub struct Shared {
    pub state: Mutex<State>,
    pub kick: EventFd,
    pub stop: AtomicBool,
    /// Held by the worker from the moment it reads the ring registers until its last
    /// guest-memory write for that packet. The driver frees ring buffers right after
    /// it disables or resets the device (e1000_down sleeps only 10 ms first), so a
    /// register write that takes the rings away must wait here: otherwise a worker
    /// preempted mid-copy would write into memory the guest already reused.
    pub dma: Mutex<()>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the device down with it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn dma_gate(&self) -> MutexGuard<'_, ()> {
        self.dma
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns once no DMA that started before the caller's register write is in flight.
    pub fn wait_for_dma(&self) {
        drop(self.dma_gate());
    }

    pub fn wake(&self) {
        if let Err(e) = self.kick.write(1) {
            log::warn!("e1000: cannot wake worker: {e}");
        }
    }
}

enum Walk {
    /// Descriptors up to `next_head` are done.
    Done {
        next_head: u32,
        reported: bool,
        used: u32,
    },
    /// The packet continues past the tail; wait for the guest to post the rest.
    Incomplete,
    /// The guest handed over the whole ring without ending the packet.
    NoEndOfPacket {
        next_head: u32,
        reported: bool,
        used: u32,
    },
    /// A descriptor could not be read from guest memory.
    Unreadable(u64),
}

enum Delivery {
    Done,
    /// Not enough free receive descriptors: keep the frame until the guest posts more.
    Stalled,
}

pub struct Worker {
    shared: Arc<Shared>,
    backend: Box<dyn Backend>,
    mem: GuestMemoryMmap<()>,
    offloads: Offloads,
    link_up: bool,
    backend_failed: bool,
    reset_seen: u64,
    tso_context: Option<TxContext>,
    checksum_context: Option<TxContext>,
    packet: Vec<u8>,
    scratch: Vec<u8>,
    status_writes: Vec<u64>,
    /// The last faults reported, so one fault is counted once, not once per wake-up.
    tx_ring_fault: Option<(u64, u32)>,
    tx_read_fault: Option<(u64, u32, u32)>,
    rx_ring_fault: Option<(u64, u32)>,
    rx_buf: Vec<u8>,
    rx_prepared: Vec<u8>,
    pending: Option<(VnetHdr, usize)>,
    stalled: bool,
    /// Frames taken from the backend so far.
    received: u64,
}

impl Worker {
    pub fn new(shared: Arc<Shared>, backend: Box<dyn Backend>, mem: GuestMemoryMmap<()>) -> Self {
        let offloads = backend.supported_offloads();
        let link_up = backend.link_up();
        let reset_seen = shared.lock().reset_generation();
        Worker {
            shared,
            backend,
            mem,
            offloads,
            link_up,
            backend_failed: false,
            reset_seen,
            tso_context: None,
            checksum_context: None,
            packet: Vec::new(),
            scratch: Vec::new(),
            status_writes: Vec::new(),
            tx_ring_fault: None,
            tx_read_fault: None,
            rx_ring_fault: None,
            rx_buf: vec![0; MAX_FRAME_LEN],
            rx_prepared: Vec::new(),
            pending: None,
            stalled: false,
            received: 0,
        }
    }

    /// Runs until `Shared::stop` is set, then hands the backend back.
    pub fn run(mut self) -> Box<dyn Backend> {
        let kick_fd = self.shared.kick.as_raw_fd();
        let timer_fd = self.shared.lock().itr_timer().as_raw_fd();
        let mut more_work = true;
        loop {
            let want_backend = !self.backend_failed && self.pending.is_none();
            let mut fds = [
                libc::pollfd {
                    fd: kick_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: timer_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.backend.poll_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let nfds = if want_backend { 3 } else { 2 };
            let timeout = if more_work { 0 } else { -1 };
            // SAFETY: `fds` is a valid array of at least `nfds` pollfds.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout) };
            if ready < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    log::error!("e1000: worker poll failed: {err}; stopping the data path");
                    break;
                }
                continue;
            }
            if fds[0].revents != 0 {
                // Non-blocking; an empty read only means another wake-up raced us.
                let _ = self.shared.kick.read();
            }
            // Checked after consuming the kick: a stop request that raced the read has
            // its flag visible here, so no wake-up is lost.
            if self.shared.stop.load(Ordering::Acquire) {
                break;
            }
            if fds[1].revents != 0 {
                let mut state = self.shared.lock();
                if state.itr_timer().drain() {
                    state.itr_expired();
                }
            }
            let backend_events = if want_backend { fds[2].revents } else { 0 };
            if backend_events & (libc::POLLERR | libc::POLLNVAL) != 0 {
                self.fail_backend(&"backend fd reported an error");
            }
            self.check_link();
            let tx_more = self.process_tx();
            let received_before = self.received;
            let rx_more = self.process_rx();
            // A hung-up fd stays readable forever; without frames it would spin us.
            if backend_events & libc::POLLHUP != 0 && self.received == received_before {
                self.fail_backend(&"backend fd hung up");
            }
            more_work = tx_more || rx_more;
        }
        self.backend
    }

    /// Stops polling the backend for good: it is gone, and polling it would spin.
    fn fail_backend(&mut self, why: &dyn std::fmt::Display) {
        if self.backend_failed {
            return;
        }
        self.backend_failed = true;
        self.shared
            .lock()
            .counters
            .drop_event("backend_failed", why);
    }

    fn check_link(&mut self) {
        let up = self.backend.link_up();
        if up != self.link_up {
            self.link_up = up;
            log::info!("e1000: backend link {}", if up { "up" } else { "down" });
            self.shared.lock().set_link(up);
        }
    }

    // ---- transmit ----

    /// Processes transmit descriptors; returns true if work remains beyond the budget.
    fn process_tx(&mut self) -> bool {
        let mut budget = TX_BUDGET;
        let shared = Arc::clone(&self.shared);
        loop {
            let _dma = shared.dma_gate();
            let (ring, caps, vlan_enabled) = {
                let mut state = self.shared.lock();
                if state.reset_generation() != self.reset_seen {
                    self.reset_seen = state.reset_generation();
                    self.tso_context = None;
                    self.checksum_context = None;
                }
                let ring = match state.tx_ring() {
                    None => return false,
                    Some(Err(fault)) => {
                        let key = (state.tx_generation(), fault as u32);
                        if self.tx_ring_fault != Some(key) {
                            self.tx_ring_fault = Some(key);
                            state.counters.drop_event(
                                "tx_ring_invalid",
                                &format_args!("transmit stopped: {}", fault.describe()),
                            );
                        }
                        return false;
                    }
                    Some(Ok(ring)) => ring,
                };
                let caps = TxCaps {
                    offloads: self.offloads,
                    pad_short: state.pad_short_frames(),
                    vlan_ethertype: state.vlan_ethertype(),
                };
                (ring, caps, state.vlan_enabled())
            };
            // A ring fault that is gone should be reported again if it comes back.
            self.tx_ring_fault = None;
            if ring.head == ring.tail {
                return false;
            }
            if budget == 0 {
                return true;
            }
            match self.walk_packet(&ring, &caps, vlan_enabled) {
                Walk::Done {
                    next_head,
                    reported,
                    used,
                } => {
                    self.tx_read_fault = None;
                    self.shared
                        .lock()
                        .complete_tx(ring.generation, next_head, reported);
                    budget = budget.saturating_sub(used);
                }
                Walk::NoEndOfPacket {
                    next_head,
                    reported,
                    used,
                } => {
                    let mut state = self.shared.lock();
                    state.counters.drop_event(
                        "tx_no_eop",
                        &format_args!("packet spans all {} owned descriptors without EOP", used),
                    );
                    state.complete_tx(ring.generation, next_head, reported);
                    budget = budget.saturating_sub(used);
                }
                Walk::Incomplete => return false,
                Walk::Unreadable(addr) => {
                    let key = (ring.generation, ring.head, ring.tail);
                    if self.tx_read_fault != Some(key) {
                        self.tx_read_fault = Some(key);
                        self.shared.lock().counters.drop_event(
                            "tx_descriptor_unreadable",
                            &format_args!(
                                "transmit stopped: descriptor at {addr:#x} is outside guest memory"
                            ),
                        );
                    }
                    return false;
                }
            }
        }
    }

    fn descriptor_address(ring: &Ring, index: u32) -> Option<u64> {
        ring.base.checked_add(u64::from(index) * tx::DESCRIPTOR_LEN)
    }

    /// Gathers one packet (or applies one context descriptor) starting at the head.
    fn walk_packet(&mut self, ring: &Ring, caps: &TxCaps, vlan_enabled: bool) -> Walk {
        self.packet.clear();
        self.status_writes.clear();
        let owned = ring.owned();
        let mut index = ring.head;
        let mut used = 0u32;
        let mut meta: Option<FrameMeta> = None;
        let mut error: Option<(&'static str, String)> = None;
        let mut cap = tx::MAX_PLAIN_FRAME;
        loop {
            if used == owned {
                if owned == ring.count - 1 {
                    self.write_status();
                    return Walk::NoEndOfPacket {
                        next_head: index,
                        reported: !self.status_writes.is_empty(),
                        used,
                    };
                }
                return Walk::Incomplete;
            }
            let Some(desc_addr) = Self::descriptor_address(ring, index) else {
                return Walk::Unreadable(ring.base);
            };
            let mut raw = [0u8; 16];
            if self
                .mem
                .read_slice(&mut raw, GuestAddress(desc_addr))
                .is_err()
            {
                return Walk::Unreadable(desc_addr);
            }
            used += 1;
            index = (index + 1) % ring.count;
            let desc = TxDescriptor::parse(&raw);
            if desc.reports_status() {
                self.status_writes.push(desc_addr);
            }
            let (addr, len, eop, special, vle) = match desc {
                TxDescriptor::Context(ctx) => {
                    if ctx.is_tso() {
                        self.tso_context = Some(ctx);
                    } else {
                        self.checksum_context = Some(ctx);
                    }
                    if meta.is_none() && self.packet.is_empty() {
                        self.write_status();
                        return Walk::Done {
                            next_head: index,
                            reported: !self.status_writes.is_empty(),
                            used,
                        };
                    }
                    continue;
                }
                TxDescriptor::Legacy {
                    addr,
                    len,
                    cso,
                    cmd,
                    css,
                    special,
                } => {
                    meta.get_or_insert(FrameMeta {
                        offload: if cmd & tx::CMD_IC != 0 {
                            Offload::Legacy { css, cso }
                        } else {
                            Offload::None
                        },
                        vlan: None,
                    });
                    (
                        addr,
                        len as usize,
                        cmd & tx::CMD_EOP != 0,
                        special,
                        cmd & tx::CMD_VLE != 0,
                    )
                }
                TxDescriptor::Data {
                    addr,
                    len,
                    dcmd,
                    popts,
                    special,
                } => {
                    if meta.is_none() {
                        let offload = self.data_offload(dcmd, popts, &mut error);
                        if matches!(offload, Offload::Tso { .. }) {
                            cap = tx::MAX_TSO_FRAME;
                        }
                        meta = Some(FrameMeta {
                            offload,
                            vlan: None,
                        });
                    }
                    (
                        addr,
                        len as usize,
                        dcmd & tx::CMD_EOP != 0,
                        special,
                        dcmd & tx::CMD_VLE != 0,
                    )
                }
                TxDescriptor::Reserved { cmd } => {
                    error.get_or_insert((
                        "tx_bad_descriptor",
                        format!("reserved descriptor type at {desc_addr:#x}"),
                    ));
                    (0, 0, cmd & tx::CMD_EOP != 0, 0, false)
                }
            };
            if len > 0 && error.is_none() {
                let start = self.packet.len();
                if start + len > cap {
                    error = Some(("tx_oversize", format!("packet exceeds {cap} bytes")));
                } else {
                    self.packet.resize(start + len, 0);
                    if self
                        .mem
                        .read_slice(&mut self.packet[start..], GuestAddress(addr))
                        .is_err()
                    {
                        self.packet.truncate(start);
                        error = Some((
                            "tx_bad_buffer_address",
                            format!("buffer {addr:#x}+{len} is outside guest memory"),
                        ));
                    }
                }
            }
            if eop {
                let mut meta = meta.unwrap_or(FrameMeta {
                    offload: Offload::None,
                    vlan: None,
                });
                if vle && vlan_enabled {
                    meta.vlan = Some(special);
                }
                self.finish_packet(meta, caps, error);
                self.write_status();
                return Walk::Done {
                    next_head: index,
                    reported: !self.status_writes.is_empty(),
                    used,
                };
            }
        }
    }

    fn data_offload(
        &self,
        dcmd: u8,
        popts: u8,
        error: &mut Option<(&'static str, String)>,
    ) -> Offload {
        let ip = popts & tx::POPTS_IXSM != 0;
        let l4 = popts & tx::POPTS_TXSM != 0;
        if dcmd & tx::CMD_TSE != 0 {
            return match self.tso_context {
                Some(ctx) => Offload::Tso { ctx, ip, l4 },
                None => {
                    error.get_or_insert((
                        "tx_tso_without_context",
                        "TSE data descriptor before any TSO context".into(),
                    ));
                    Offload::None
                }
            };
        }
        if !(ip || l4) {
            return Offload::None;
        }
        match self.checksum_context.or(self.tso_context) {
            Some(ctx) => Offload::Checksum { ctx, ip, l4 },
            None => {
                error.get_or_insert((
                    "tx_csum_without_context",
                    "checksum requested before any context".into(),
                ));
                Offload::None
            }
        }
    }

    fn finish_packet(
        &mut self,
        meta: FrameMeta,
        caps: &TxCaps,
        error: Option<(&'static str, String)>,
    ) {
        let is_tso = matches!(meta.offload, Offload::Tso { .. });
        if let Some((reason, detail)) = error {
            let mut state = self.shared.lock();
            state.counters.drop_event(reason, &detail);
            if is_tso {
                stats::count_reg(state.stats_regs(), TSCTFC, 1);
            }
            return;
        }
        let mut dst = [0u8; 6];
        if let Some(d) = self.packet.get(..6) {
            dst.copy_from_slice(d);
        }
        let backend = &mut self.backend;
        let mut refusal: Option<String> = None;
        let result = tx::transmit(
            &mut self.packet,
            &meta,
            caps,
            &mut self.scratch,
            &mut |hdr, frame| match backend.send(hdr, frame) {
                Ok(()) => true,
                Err(e) => {
                    refusal.get_or_insert_with(|| e.to_string());
                    false
                }
            },
        );
        let mut state = self.shared.lock();
        match result {
            Ok(summary) => {
                stats::count_tx(
                    state.stats_regs(),
                    &dst,
                    summary.frames,
                    summary.bytes,
                    summary.first_len,
                    summary.tso,
                );
                state.counters.tx_frames += u64::from(summary.frames);
                state.counters.tx_bytes += summary.bytes;
                if summary.refused > 0 {
                    let detail = refusal.unwrap_or_default();
                    for _ in 0..summary.refused {
                        state.counters.drop_event("tx_backend_refused", &detail);
                    }
                }
            }
            Err(e) => {
                if is_tso {
                    stats::count_reg(state.stats_regs(), TSCTFC, 1);
                }
                state.counters.drop_event(e.reason(), &e);
            }
        }
    }

    /// Sets DD in every descriptor of the packet that asked for status.
    fn write_status(&mut self) {
        for &addr in &self.status_writes {
            // The descriptor was just read from this address, so the write can only
            // fail if memory changed under us; nothing more to do then.
            let _ = self
                .mem
                .write_obj(tx::STA_DD, GuestAddress(addr + tx::STATUS_OFFSET));
        }
    }

    // ---- receive ----

    /// Moves frames from the backend into receive buffers; true if work remains.
    fn process_rx(&mut self) -> bool {
        for _ in 0..RX_BUDGET {
            if self.pending.is_none() {
                if self.backend_failed {
                    return false;
                }
                match self.backend.recv(&mut self.rx_buf) {
                    Ok(Some((hdr, len))) => {
                        self.received += 1;
                        self.pending = Some((hdr, len.min(self.rx_buf.len())));
                    }
                    Ok(None) | Err(BackendError::WouldBlock) => return false,
                    // The backend counted it.
                    Err(BackendError::Dropped(_)) => continue,
                    Err(BackendError::Io(e)) => {
                        self.fail_backend(&format_args!("receive failed: {e}"));
                        return false;
                    }
                }
            }
            match self.deliver_pending() {
                Delivery::Done => {
                    self.pending = None;
                    self.stalled = false;
                }
                Delivery::Stalled => return false,
            }
        }
        true
    }

    /// Completes a partial checksum from the backend; e1000 cannot express one.
    fn complete_offloads(frame: &mut [u8], hdr: &VnetHdr) -> Result<bool, &'static str> {
        if hdr.gso_type & !VnetHdr::GSO_ECN != VnetHdr::GSO_NONE {
            return Err("rx_unexpected_gso");
        }
        if hdr.flags & VnetHdr::FLAG_NEEDS_CSUM != 0 {
            let start = usize::from(hdr.csum_start);
            let store = start + usize::from(hdr.csum_offset);
            if !checksum::insert(frame, start, None, store, 0) {
                return Err("rx_bad_vnet_hdr");
            }
            return Ok(true);
        }
        Ok(hdr.flags & VnetHdr::FLAG_DATA_VALID != 0)
    }

    fn deliver_pending(&mut self) -> Delivery {
        let Some((hdr, len)) = self.pending else {
            return Delivery::Done;
        };
        let shared = Arc::clone(&self.shared);
        let _dma = shared.dma_gate();
        let frame = &mut self.rx_buf[..len];
        let trusted = match Self::complete_offloads(frame, &hdr) {
            Ok(t) => t,
            Err(reason) => {
                self.shared
                    .lock()
                    .counters
                    .drop_event(reason, &format_args!("{hdr:?}"));
                return Delivery::Done;
            }
        };
        let (ring, bsize, meta, needed) = {
            let mut state = self.shared.lock();
            let ring = match state.rx_ring() {
                None => {
                    state.counters.quiet_event("rx_disabled", 1);
                    return Delivery::Done;
                }
                Some(Err(fault)) => {
                    let key = (state.rx_generation(), fault as u32);
                    let detail = format_args!("receive ring unusable: {}", fault.describe());
                    if self.rx_ring_fault != Some(key) {
                        self.rx_ring_fault = Some(key);
                        state.counters.drop_event("rx_ring_invalid", &detail);
                    } else {
                        state.counters.quiet_event("rx_ring_invalid", 1);
                    }
                    return Delivery::Done;
                }
                Some(Ok(ring)) => {
                    self.rx_ring_fault = None;
                    ring
                }
            };
            if frame.len() >= 14 && !state.filter().accepts(frame) {
                state.counters.rx_filtered += 1;
                return Delivery::Done;
            }
            let cfg = state.rx_config();
            let meta = match rx::prepare(frame, trusted, &cfg, &mut self.rx_prepared) {
                Ok(meta) => meta,
                Err(e) => {
                    let reg = if e == RxError::Oversize { ROC } else { RUC };
                    stats::count_reg(state.stats_regs(), reg, 1);
                    let reason = if e == RxError::Oversize {
                        "rx_oversize"
                    } else {
                        "rx_runt"
                    };
                    state
                        .counters
                        .drop_event(reason, &format_args!("{len}-byte frame: {e}"));
                    return Delivery::Done;
                }
            };
            let bsize = rx::buffer_size(cfg.rctl);
            let needed = self.rx_prepared.len().div_ceil(bsize) as u32;
            if needed > ring.count - 1 {
                state.counters.drop_event(
                    "rx_frame_exceeds_ring",
                    &format_args!(
                        "{}-byte frame needs {needed} buffers, ring has {}",
                        self.rx_prepared.len(),
                        ring.count
                    ),
                );
                return Delivery::Done;
            }
            if needed > ring.owned() {
                if !self.stalled {
                    self.stalled = true;
                    stats::count_reg(state.stats_regs(), RNBC, 1);
                }
                return Delivery::Stalled;
            }
            (ring, bsize, meta, needed)
        };
        let placed = self.place_frame(&ring, bsize, needed, &meta);
        let mut state = self.shared.lock();
        match placed {
            Ok(()) => {
                let prepared = &self.rx_prepared;
                stats::count_rx(state.stats_regs(), prepared, meta.wire_len);
                state.counters.rx_frames += 1;
                state.counters.rx_bytes += len as u64;
            }
            Err(detail) => state.counters.drop_event("rx_bad_address", &detail),
        }
        let next_head = (ring.head + needed) % ring.count;
        state.complete_rx(ring.generation, next_head);
        Delivery::Done
    }

    /// Copies the prepared frame into `needed` buffers from the head and writes their
    /// descriptors back. A buffer outside guest memory turns the frame into an error
    /// frame (RXE) so the guest still gets its descriptors back.
    fn place_frame(
        &mut self,
        ring: &Ring,
        bsize: usize,
        needed: u32,
        meta: &rx::RxMeta,
    ) -> Result<(), String> {
        let mut failure: Option<String> = None;
        let mut descriptors = Vec::with_capacity(needed as usize);
        for (i, chunk) in self
            .rx_prepared
            .chunks(bsize)
            .enumerate()
            .take(needed as usize)
        {
            let index = (ring.head + i as u32) % ring.count;
            let Some(desc_addr) = ring.base.checked_add(u64::from(index) * rx::DESCRIPTOR_LEN)
            else {
                failure.get_or_insert_with(|| format!("descriptor {index} address overflows"));
                continue;
            };
            match self.mem.read_obj::<u64>(GuestAddress(desc_addr)) {
                Ok(buffer) => {
                    let buffer = u64::from_le(buffer);
                    if failure.is_none()
                        && self.mem.write_slice(chunk, GuestAddress(buffer)).is_err()
                    {
                        failure = Some(format!(
                            "receive buffer {buffer:#x}+{} is outside guest memory",
                            chunk.len()
                        ));
                    }
                    descriptors.push((desc_addr, chunk.len() as u16));
                }
                Err(_) => {
                    failure.get_or_insert_with(|| {
                        format!("receive descriptor at {desc_addr:#x} is outside guest memory")
                    });
                }
            }
        }
        let last = descriptors.len().saturating_sub(1);
        for (i, &(desc_addr, chunk_len)) in descriptors.iter().enumerate() {
            let is_last = i == last;
            let (length, status, errors, special) = match (&failure, is_last) {
                (None, true) => (
                    chunk_len,
                    STA_DD | STA_EOP | meta.status,
                    meta.errors,
                    meta.special,
                ),
                (None, false) => (chunk_len, STA_DD, 0, 0),
                (Some(_), true) => (0, STA_DD | STA_EOP, ERR_RXE, 0),
                (Some(_), false) => (0, STA_DD, 0, 0),
            };
            let mut low = [0u8; 4];
            low[..2].copy_from_slice(&length.to_le_bytes());
            let mut high = [0u8; 4];
            high[0] = status;
            high[1] = errors;
            high[2..].copy_from_slice(&special.to_le_bytes());
            // Length before status: the guest polls DD and must then see the length.
            let _ = self.mem.write_slice(&low, GuestAddress(desc_addr + 8));
            std::sync::atomic::fence(Ordering::Release);
            let _ = self.mem.write_slice(&high, GuestAddress(desc_addr + 12));
        }
        match failure {
            None => Ok(()),
            Some(detail) => Err(detail),
        }
    }
}
