//! TCP NAT without a per-connection TCP stack (the passt approach).
//!
//! Host → guest: data stays in the host socket's receive queue. It is read with MSG_PEEK
//! (SO_PEEK_OFF advances past what the guest has been sent) straight into the guest's
//! frame, and discarded only when the guest ACKs it. Our sequence number towards the guest
//! is therefore "ISN + 1 + bytes consumed + peek offset"; a retransmission is a rewind of
//! the peek offset. The guest's window decides how much we peek.
//!
//! Guest → host: payload is written to the host socket and ACKed once the kernel accepted
//! it. When the socket is full, up to `PENDING_CAP` bytes wait in a per-flow buffer (also
//! ACKed) and the window we advertise shrinks by as much, so the guest never has to
//! retransmit into a full socket.
//!
//! The upstream connect() completes before the guest's SYN is answered, so a refused port
//! is a RST and an unreachable host an ICMP error, as on a real network.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use super::counters::{DropReason, Proto};
use super::engine::{Engine, TOKEN_TCP};
use super::slab::{Handle, Slab};
use super::wire::*;
use crate::backend::VnetHdr;
use crate::mac::MacAddr;
use crate::sys;

/// (guest ip, guest port, virtual remote ip, remote port)
pub type TcpKey = (Ipv4Addr, u16, Ipv4Addr, u16);

/// Guest → host bytes we hold when the host socket is full.
pub const PENDING_CAP: usize = 1 << 20;
/// Our window scale towards the guest.
const OUR_WS: u8 = 7;
/// No ACK progress for this long with data in flight: rewind and resend.
const RTO: Duration = Duration::from_millis(1000);
/// Resend a SYN to the guest (forwarded connections) this often.
const SYN_RETRY: Duration = Duration::from_millis(1000);
const EPOLL_FLAGS: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
const HDRS: usize = ETH_HDR_LEN + IPV4_HDR_LEN + TCP_HDR_LEN;
/// A small guest segment's ACK waits this long for host data to ride on.
const ACK_DELAY: Duration = Duration::from_micros(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    /// Guest sent SYN; our connect() to the host is in flight.
    Connecting,
    /// A host client connected to a forward; our SYN to the guest awaits its SYN-ACK.
    SynSent,
    Established,
}

pub struct TcpFlow {
    key: TcpKey,
    sock: OwnedFd,
    /// The socket peeks from an offset (SO_PEEK_OFF); otherwise every peek skips the
    /// in-flight bytes itself. Fixed when the flow is created.
    peek_offset: bool,
    state: TcpState,
    guest_mac: MacAddr,
    created: Instant,
    last_active: Instant,
    /// The guest's SYN, quoted if we must answer with ICMP unreachable.
    syn_quote: Vec<u8>,
    syn_retries: u32,

    // Host → guest.
    isn: u32,
    /// First sequence number the guest has not acknowledged (head of the receive queue).
    snd_una: u32,
    /// Next sequence number to send (snd_una + peek offset).
    snd_nxt: u32,
    syn_acked: bool,
    fin_sent: bool,
    fin_acked: bool,
    host_readable: bool,
    /// The host sent FIN (EPOLLRDHUP seen): a short read no longer means "drained".
    host_rdhup: bool,
    guest_wnd: u32,
    guest_ws: u8,
    ws_ok: bool,
    mss: usize,
    dup_acks: u8,
    last_progress: Instant,

    // Guest → host.
    rcv_nxt: u32,
    pending: Vec<u8>,
    pending_off: usize,
    guest_fin: bool,
    shut_wr: bool,
    ack_due: bool,
    /// An ACK owed for a small segment, held back for a reply to carry it.
    ack_delayed: bool,
    last_wnd_sent: u32,

    in_ready: bool,
    in_ack_list: bool,
}

impl TcpFlow {
    /// A flow in `state` before either side's SYN options are known.
    fn new(
        key: TcpKey,
        sock: OwnedFd,
        state: TcpState,
        guest_mac: MacAddr,
        isn: u32,
        mss: usize,
        now: Instant,
    ) -> TcpFlow {
        TcpFlow {
            key,
            sock,
            peek_offset: sys::tcp_peek_offset_supported(),
            state,
            guest_mac,
            created: now,
            last_active: now,
            syn_quote: Vec::new(),
            syn_retries: 0,
            isn,
            snd_una: isn.wrapping_add(1),
            snd_nxt: isn.wrapping_add(1),
            syn_acked: false,
            fin_sent: false,
            fin_acked: false,
            host_readable: false,
            host_rdhup: false,
            guest_wnd: 0,
            guest_ws: 0,
            ws_ok: false,
            mss,
            dup_acks: 0,
            last_progress: now,
            rcv_nxt: 0,
            pending: Vec::new(),
            pending_off: 0,
            guest_fin: false,
            shut_wr: false,
            ack_due: false,
            ack_delayed: false,
            last_wnd_sent: PENDING_CAP as u32,
            in_ready: false,
            in_ack_list: false,
        }
    }

    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
    fn pending_len(&self) -> usize {
        self.pending.len() - self.pending_off
    }
    fn window_bytes(&self) -> u32 {
        PENDING_CAP.saturating_sub(self.pending_len()) as u32
    }
    fn window_field(&self) -> u16 {
        let b = self.window_bytes();
        if self.ws_ok {
            (b >> OUR_WS).min(0xffff) as u16
        } else {
            b.min(0xffff) as u16
        }
    }
    fn inflight(&self) -> u32 {
        self.snd_nxt.wrapping_sub(self.snd_una)
    }
    /// Sequence number of our next segment (after a sent FIN, one past it).
    fn seq_next(&self) -> u32 {
        self.snd_nxt.wrapping_add(self.fin_sent as u32)
    }
    fn can_send(&self) -> bool {
        self.state == TcpState::Established
            && self.syn_acked
            && !self.fin_sent
            && self.guest_wnd > self.inflight()
    }
    fn header(&self, seq: u32, flags: u8) -> TcpHeader {
        TcpHeader {
            src: (self.key.2, self.key.3),
            dst: (self.key.0, self.key.1),
            seq,
            ack: self.rcv_nxt,
            flags,
            window: self.window_field(),
            mss: None,
            window_scale: None,
        }
    }
}

/// Without SO_PEEK_OFF, the most in-flight data we peek past to reach new bytes.
const MAX_PEEK_SKIP: usize = 16 << 20;

#[derive(Default)]
pub struct TcpTable {
    flows: Slab<TcpFlow>,
    by_key: HashMap<TcpKey, Handle>,
    ready: VecDeque<Handle>,
    ack_list: VecDeque<Handle>,
    delayed_acks: Vec<Handle>,
    half_open: usize,
    isn_state: u64,
}

impl TcpTable {
    pub fn len(&self) -> usize {
        self.flows.len()
    }
    pub fn half_open(&self) -> usize {
        self.half_open
    }
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }
    pub fn has_ack_due(&self) -> bool {
        !self.ack_list.is_empty()
    }
    fn next_isn(&mut self) -> u32 {
        if self.isn_state == 0 {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            self.isn_state = t ^ ((std::process::id() as u64) << 32) | 1;
        }
        // xorshift64*: unpredictable enough for ISNs on a private link.
        let mut x = self.isn_state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.isn_state = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
    }
}

fn connect_error_is_unreachable(e: &io::Error) -> Option<u8> {
    match e.raw_os_error() {
        Some(libc::ENETUNREACH) => Some(ICMP_NET_UNREACH),
        Some(libc::EHOSTUNREACH) | Some(libc::ETIMEDOUT) | Some(libc::EHOSTDOWN) => {
            Some(ICMP_HOST_UNREACH)
        }
        _ => None,
    }
}

impl Engine {
    /// Queues a header-only segment of flow `h`.
    fn tcp_emit_ctl(&mut self, h: Handle, seq: u32, flags: u8, syn_opts: bool) {
        let Some(f) = self.tcp.flows.get(h) else { return };
        let mut th = f.header(seq, flags);
        if syn_opts {
            th.mss = Some((self.p.mtu - 40).min(0xffff) as u16);
            th.window = f.window_bytes().min(0xffff) as u16;
            if f.ws_ok || f.state == TcpState::SynSent {
                th.window_scale = Some(OUR_WS);
            }
        }
        let mac = f.guest_mac;
        let mut buf = vec![0u8; HDRS + 8];
        let n = write_tcp_frame(&mut buf, mac, self.gw_mac, &th, 0, CsumMode::Full);
        buf.truncate(n);
        self.emit(Proto::Tcp, VnetHdr::default(), buf);
    }

    /// Holds the ACK for a small segment back briefly, so the reply carries it.
    fn tcp_delay_ack(&mut self, h: Handle) {
        let Some(f) = self.tcp.flows.get_mut(h) else { return };
        if f.ack_due || f.ack_delayed {
            return self.tcp_mark_ack(h);
        }
        f.ack_delayed = true;
        self.tcp.delayed_acks.push(h);
        if !self.ack_timer.is_armed() {
            self.ack_timer.set_oneshot(ACK_DELAY);
        }
    }

    pub fn tcp_delayed_acks_due(&mut self) {
        for h in std::mem::take(&mut self.tcp.delayed_acks) {
            if self.tcp.flows.get(h).is_some_and(|f| f.ack_delayed) {
                self.tcp_mark_ack(h);
            }
        }
    }

    fn tcp_mark_ack(&mut self, h: Handle) {
        let Some(f) = self.tcp.flows.get_mut(h) else { return };
        f.ack_delayed = false;
        f.ack_due = true;
        if !f.in_ack_list {
            f.in_ack_list = true;
            self.tcp.ack_list.push_back(h);
        }
        self.kick();
    }

    fn tcp_mark_ready(&mut self, h: Handle) {
        let Some(f) = self.tcp.flows.get_mut(h) else { return };
        if !f.in_ready && f.host_readable && f.can_send() {
            f.in_ready = true;
            self.tcp.ready.push_back(h);
            self.kick();
        }
    }

    /// Removes a flow. `rst_guest`: tell the guest with a RST; `rst_host`: close with RST.
    fn tcp_close(&mut self, h: Handle, rst_guest: bool, rst_host: bool) {
        if rst_guest {
            if let Some(f) = self.tcp.flows.get(h) {
                let seq = f.seq_next();
                self.tcp_emit_ctl(h, seq, TCP_RST | TCP_ACK, false);
            }
        } else if self.tcp.flows.get(h).is_some_and(|f| f.ack_due || f.ack_delayed) {
            let seq = self.tcp.flows.get(h).map(|f| f.seq_next()).unwrap_or(0);
            self.tcp_emit_ctl(h, seq, TCP_ACK, false);
        }
        let Some(f) = self.tcp.flows.remove(h) else { return };
        if matches!(f.state, TcpState::Connecting | TcpState::SynSent) {
            self.tcp.half_open = self.tcp.half_open.saturating_sub(1);
        }
        let _ = self.epoll.delete(f.fd());
        if rst_host {
            sys::set_linger_zero(f.fd());
        }
        self.tcp.by_key.remove(&f.key);
    }

    /// RST for a segment that belongs to no flow.
    fn tcp_rst_reply(&mut self, guest_mac: MacAddr, ip: &Ipv4Packet, seg: &TcpSegment) {
        if seg.has(TCP_RST) {
            return;
        }
        let (seq, ack, flags) = if seg.has(TCP_ACK) {
            (seg.ack(), 0, TCP_RST)
        } else {
            let len =
                seg.payload().len() as u32 + seg.has(TCP_SYN) as u32 + seg.has(TCP_FIN) as u32;
            (0, seg.seq().wrapping_add(len), TCP_RST | TCP_ACK)
        };
        let th = TcpHeader {
            src: (ip.dst(), seg.dst_port()),
            dst: (ip.src(), seg.src_port()),
            seq,
            ack,
            flags,
            window: 0,
            mss: None,
            window_scale: None,
        };
        let mut buf = vec![0u8; HDRS];
        let n = write_tcp_frame(&mut buf, guest_mac, self.gw_mac, &th, 0, CsumMode::Full);
        buf.truncate(n);
        self.emit(Proto::Tcp, VnetHdr::default(), buf);
    }

    // -----------------------------------------------------------------------------------
    // Guest → host

    pub fn tcp_input(&mut self, guest_mac: MacAddr, ip: &Ipv4Packet, seg: &TcpSegment) {
        if seg.src_port() == 0 {
            return self.counters.drop(DropReason::BadSource);
        }
        if seg.has(TCP_URG) {
            // Urgent data is delivered inline as ordinary bytes; the pointer is never used.
            self.counters.tcp_urgent_seen += 1;
        }
        let key: TcpKey = (ip.src(), seg.src_port(), ip.dst(), seg.dst_port());
        let Some(&h) = self.tcp.by_key.get(&key) else {
            if seg.has(TCP_SYN) && !seg.has(TCP_ACK) && !seg.has(TCP_RST) {
                return self.tcp_connect(guest_mac, key, ip, seg);
            }
            self.counters.drop(DropReason::TcpNoFlow);
            return self.tcp_rst_reply(guest_mac, ip, seg);
        };
        let Some(f) = self.tcp.flows.get_mut(h) else { return };
        f.last_active = self.now;
        if seg.has(TCP_RST) {
            let in_window = f.state == TcpState::SynSent
                || f.rcv_nxt.wrapping_sub(seg.seq()) as i32 <= 0
                    && seg.seq().wrapping_sub(f.rcv_nxt) <= PENDING_CAP as u32;
            if in_window {
                self.tcp_close(h, false, true);
            } else {
                self.counters.drop(DropReason::TcpOutOfWindow);
            }
            return;
        }
        match f.state {
            TcpState::Connecting => {} // duplicate SYN while connect() runs
            TcpState::SynSent => self.tcp_synsent_input(h, seg),
            TcpState::Established => {
                if seg.has(TCP_SYN) {
                    if !seg.has(TCP_ACK) && !f.syn_acked {
                        // Our SYN-ACK was lost; the guest retried its SYN.
                        let isn = f.isn;
                        self.tcp_emit_ctl(h, isn, TCP_SYN | TCP_ACK, true);
                    } else {
                        self.tcp_mark_ack(h);
                    }
                    return;
                }
                self.tcp_established_input(h, seg);
            }
        }
    }

    fn tcp_connect(&mut self, guest_mac: MacAddr, key: TcpKey, ip: &Ipv4Packet, seg: &TcpSegment) {
        let target = match self.resolve(key.2, key.3) {
            Ok(t) => t,
            Err(reason) => {
                self.counters.drop(reason);
                if reason != DropReason::Restricted {
                    self.tcp_rst_reply(guest_mac, ip, seg);
                }
                return;
            }
        };
        if self.flows_open() >= self.p.max_flows {
            self.counters.drop(DropReason::FlowLimit);
            return self.tcp_rst_reply(guest_mac, ip, seg);
        }
        if self.tcp.half_open >= self.p.max_half_open {
            // The guest retries its SYN; by then a slot may be free.
            return self.counters.drop(DropReason::HalfOpenLimit);
        }
        if target.is_dns {
            self.counters.count_in(Proto::Dns);
        }
        let sock = match sys::socket(libc::SOCK_STREAM, 0) {
            Ok(s) => s,
            Err(e) => {
                let reason = if sys::is_fd_exhaustion(&e) {
                    DropReason::NoFd
                } else {
                    DropReason::SocketError
                };
                log::warn!("user net: no socket for a new TCP flow: {e}");
                self.counters.drop(reason);
                return self.tcp_rst_reply(guest_mac, ip, seg);
            }
        };
        let fd = sock.as_raw_fd();
        let _ = sys::setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        let peek_offset = sys::tcp_peek_offset_supported();
        if peek_offset && sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).is_err() {
            self.counters.drop(DropReason::SocketError);
            return self.tcp_rst_reply(guest_mac, ip, seg);
        }
        let done = match sys::connect(fd, target.host) {
            Ok(done) => done,
            Err(e) => return self.tcp_connect_error(guest_mac, ip, seg, &e),
        };
        let opts = seg.options();
        let isn = self.tcp.next_isn();
        let mss = self.clamp_mss(opts.mss);
        let flow = TcpFlow {
            syn_quote: ip.icmp_quote().to_vec(),
            guest_wnd: seg.window() as u32,
            guest_ws: opts.window_scale.unwrap_or(0),
            ws_ok: opts.window_scale.is_some(),
            rcv_nxt: seg.seq().wrapping_add(1),
            peek_offset,
            ..TcpFlow::new(key, sock, TcpState::Connecting, guest_mac, isn, mss, self.now)
        };
        let Some(h) = self.tcp_add_half_open(flow) else {
            return self.tcp_rst_reply(guest_mac, ip, seg);
        };
        if done {
            self.tcp_connected(h);
        }
    }

    /// Registers a new flow that still awaits a SYN-ACK from either side. `None` (counted)
    /// when epoll refuses its socket; the socket is then closed.
    fn tcp_add_half_open(&mut self, flow: TcpFlow) -> Option<Handle> {
        let (key, fd) = (flow.key, flow.fd());
        let h = self.tcp.flows.insert(flow);
        if self.epoll.add(fd, EPOLL_FLAGS, h.token(TOKEN_TCP)).is_err() {
            self.tcp.flows.remove(h);
            self.counters.drop(DropReason::SocketError);
            return None;
        }
        self.tcp.by_key.insert(key, h);
        self.tcp.half_open += 1;
        self.counters.tcp_flows_total += 1;
        Some(h)
    }

    fn clamp_mss(&self, mss: Option<u16>) -> usize {
        let ours = self.p.mtu as usize - 40;
        (mss.unwrap_or(536) as usize).clamp(64, ours)
    }

    fn tcp_connect_error(
        &mut self,
        guest_mac: MacAddr,
        ip: &Ipv4Packet,
        seg: &TcpSegment,
        e: &io::Error,
    ) {
        self.counters.drop(DropReason::TcpConnectFailed);
        match connect_error_is_unreachable(e) {
            Some(code) => {
                self.emit_icmp_error(guest_mac, ip.dst(), ip.src(), code, ip.icmp_quote())
            }
            None => self.tcp_rst_reply(guest_mac, ip, seg),
        }
    }

    fn tcp_connected(&mut self, h: Handle) {
        let Some(f) = self.tcp.flows.get_mut(h) else { return };
        f.state = TcpState::Established;
        f.last_progress = self.now;
        let isn = f.isn;
        self.tcp.half_open = self.tcp.half_open.saturating_sub(1);
        self.tcp_emit_ctl(h, isn, TCP_SYN | TCP_ACK, true);
    }

    /// The host's connect() failed: RST for refused, ICMP for unreachable.
    fn tcp_connect_failed(&mut self, h: Handle, e: &io::Error) {
        self.counters.drop(DropReason::TcpConnectFailed);
        let Some(f) = self.tcp.flows.get(h) else { return };
        match connect_error_is_unreachable(e) {
            Some(code) => {
                let (mac, quote, key) = (f.guest_mac, f.syn_quote.clone(), f.key);
                self.emit_icmp_error(mac, key.2, key.0, code, &quote);
                self.tcp_close(h, false, false);
            }
            None => {
                // RST|ACK answering the SYN: seq 0, ack = guest ISN + 1 (already rcv_nxt).
                self.tcp_emit_ctl(h, 0, TCP_RST | TCP_ACK, false);
                self.tcp_close(h, false, false);
            }
        }
    }

    fn tcp_synsent_input(&mut self, h: Handle, seg: &TcpSegment) {
        let Some(f) = self.tcp.flows.get_mut(h) else { return };
        if !(seg.has(TCP_SYN) && seg.has(TCP_ACK)) || seg.ack() != f.isn.wrapping_add(1) {
            return self.counters.drop(DropReason::TcpOutOfWindow);
        }
        let opts = seg.options();
        f.rcv_nxt = seg.seq().wrapping_add(1);
        f.ws_ok = opts.window_scale.is_some();
        f.guest_ws = opts.window_scale.unwrap_or(0);
        f.guest_wnd = seg.window() as u32;
        f.mss = (opts.mss.unwrap_or(536) as usize).clamp(64, self.p.mtu as usize - 40);
        f.syn_acked = true;
        f.state = TcpState::Established;
        f.last_progress = self.now;
        // The host client may have written before the guest answered.
        f.host_readable = true;
        self.tcp.half_open = self.tcp.half_open.saturating_sub(1);
        self.tcp_mark_ack(h);
        self.tcp_mark_ready(h);
    }

    fn tcp_established_input(&mut self, h: Handle, seg: &TcpSegment) {
        if seg.has(TCP_ACK) {
            self.tcp_ack(h, seg);
        }
        let payload = seg.payload();
        if !payload.is_empty() {
            self.tcp_guest_data(h, seg.seq(), payload);
        }
        if seg.has(TCP_FIN) {
            let Some(f) = self.tcp.flows.get_mut(h) else { return };
            let fin_seq = seg.seq().wrapping_add(payload.len() as u32);
            if !f.guest_fin && fin_seq == f.rcv_nxt {
                f.guest_fin = true;
                f.rcv_nxt = f.rcv_nxt.wrapping_add(1);
                if f.pending_len() == 0 && !f.shut_wr {
                    f.shut_wr = true;
                    let _ = sys::shutdown_write(f.fd());
                }
            }
            self.tcp_mark_ack(h);
        }
        self.tcp_maybe_close(h);
    }

    fn tcp_ack(&mut self, h: Handle, seg: &TcpSegment) {
        let Some(f) = self.tcp.flows.get_mut(h) else { return };
        let ack = seg.ack();
        if !f.syn_acked {
            if ack != f.isn.wrapping_add(1) {
                return;
            }
            f.syn_acked = true;
            f.last_progress = self.now;
        }
        let new_wnd = (seg.window() as u32) << f.guest_ws;
        let inflight = f.inflight();
        let limit = inflight + f.fin_sent as u32;
        let acked = ack.wrapping_sub(f.snd_una);
        if acked != 0 && acked <= limit {
            let data = acked.min(inflight);
            if data > 0 {
                match sys::tcp_discard(f.fd(), data as usize) {
                    Ok(n) => f.snd_una = f.snd_una.wrapping_add(n as u32),
                    Err(e) if sys::would_block(&e) => {}
                    Err(_) => {
                        self.counters.drop(DropReason::SocketError);
                        return self.tcp_close(h, true, true);
                    }
                }
            }
            if f.fin_sent && acked == limit {
                f.fin_acked = true;
            }
            f.dup_acks = 0;
            f.last_progress = self.now;
        } else if acked == 0
            && inflight > 0
            && seg.payload().is_empty()
            && !seg.has(TCP_FIN)
            && new_wnd == f.guest_wnd
        {
            f.dup_acks = f.dup_acks.saturating_add(1);
            if f.dup_acks == 3 {
                f.guest_wnd = new_wnd;
                return self.tcp_rewind(h);
            }
        }
        f.guest_wnd = new_wnd;
        self.tcp_mark_ready(h);
    }

    /// Resends everything unacknowledged by rewinding the peek offset.
    fn tcp_rewind(&mut self, h: Handle) {
        let Some(f) = self.tcp.flows.get_mut(h) else { return };
        // Without SO_PEEK_OFF every peek starts at snd_una anyway.
        if f.peek_offset && sys::setsockopt_int(f.fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).is_err() {
            return self.tcp_close(h, true, true);
        }
        f.snd_nxt = f.snd_una;
        if f.fin_sent && !f.fin_acked {
            f.fin_sent = false;
        }
        f.host_readable = true;
        f.dup_acks = 0;
        f.last_progress = self.now;
        self.counters.tcp_retransmits += 1;
        self.tcp_mark_ready(h);
    }

    fn tcp_guest_data(&mut self, h: Handle, seq: u32, payload: &[u8]) {
        let Some(f) = self.tcp.flows.get_mut(h) else { return };
        if f.guest_fin {
            return self.counters.drop(DropReason::TcpOutOfWindow);
        }
        let off = f.rcv_nxt.wrapping_sub(seq) as i32;
        if off < 0 {
            // A segment before this one was lost: the duplicate ACK asks for it again.
            self.counters.drop(DropReason::TcpOutOfWindow);
            return self.tcp_mark_ack(h);
        }
        let Some(data) = payload.get(off as usize..).filter(|d| !d.is_empty()) else {
            return self.tcp_mark_ack(h);
        };
        let mut accepted = 0;
        if f.pending_len() == 0 {
            match sys::send(f.fd(), data) {
                Ok(n) => accepted = n,
                Err(e) if sys::would_block(&e) => {}
                Err(e) => {
                    log::debug!("user net: tcp send failed: {e}");
                    return self.tcp_close(h, true, true);
                }
            }
        }
        let rest = data.get(accepted..).unwrap_or(&[]);
        let take = rest.len().min(f.window_bytes() as usize);
        if take > 0 {
            if f.pending_off > 0 && f.pending_off == f.pending.len() {
                f.pending.clear();
                f.pending_off = 0;
            }
            f.pending.extend_from_slice(&rest[..take]);
        }
        f.rcv_nxt = f.rcv_nxt.wrapping_add((accepted + take) as u32);
        if payload.len() < f.mss && take == 0 {
            self.tcp_delay_ack(h);
        } else {
            self.tcp_mark_ack(h);
        }
    }

    /// Writes held guest data to the host socket.
    fn tcp_flush(&mut self, h: Handle) {
        let Some(f) = self.tcp.flows.get_mut(h) else { return };
        let before = f.window_bytes();
        while f.pending_len() > 0 {
            match sys::send(f.fd(), &f.pending[f.pending_off..]) {
                Ok(n) => f.pending_off += n,
                Err(e) if sys::would_block(&e) => break,
                Err(_) => return self.tcp_close(h, true, true),
            }
        }
        if f.pending_len() == 0 {
            f.pending.clear();
            f.pending_off = 0;
            if f.pending.capacity() > PENDING_CAP {
                f.pending.shrink_to(PENDING_CAP);
            }
            if f.guest_fin && !f.shut_wr {
                f.shut_wr = true;
                let _ = sys::shutdown_write(f.fd());
            }
        }
        // Tell the guest when a shrunken window opened up again.
        if before < PENDING_CAP as u32 / 2 && f.window_bytes() >= PENDING_CAP as u32 / 2
            || f.last_wnd_sent < f.window_bytes() / 2
        {
            self.tcp_mark_ack(h);
        }
        self.tcp_maybe_close(h);
    }

    fn tcp_maybe_close(&mut self, h: Handle) {
        let done = self.tcp.flows.get(h).is_some_and(|f| f.guest_fin && f.shut_wr && f.fin_acked);
        if done {
            self.tcp_close(h, false, false);
        }
    }

    // -----------------------------------------------------------------------------------
    // Host → guest

    pub fn tcp_event(&mut self, h: Handle, events: u32) {
        let Some(f) = self.tcp.flows.get_mut(h) else { return };
        f.last_active = self.now;
        let err = events & (libc::EPOLLERR as u32) != 0;
        if f.state == TcpState::Connecting {
            if events & (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32 == 0 {
                return;
            }
            match sys::take_socket_error(f.fd()) {
                None => self.tcp_connected(h),
                Some(e) => self.tcp_connect_failed(h, &e),
            }
            return;
        }
        if err {
            if let Some(e) = sys::take_socket_error(f.fd()) {
                log::debug!("user net: tcp flow {:?} reset by host: {e}", f.key);
                return self.tcp_close(h, true, false);
            }
        }
        if events & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0 {
            f.host_rdhup = true;
        }
        if events & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0 {
            f.host_readable = true;
            self.tcp_mark_ready(h);
        }
        if events & (libc::EPOLLOUT as u32) != 0 {
            self.tcp_flush(h);
        }
    }

    /// A pending ACK (window update, or for guest data) as a frame, if any.
    pub fn tcp_next_ack(&mut self, buf: &mut [u8]) -> Option<(VnetHdr, usize)> {
        while let Some(h) = self.tcp.ack_list.pop_front() {
            let Some(f) = self.tcp.flows.get_mut(h) else { continue };
            f.in_ack_list = false;
            if !f.ack_due {
                continue;
            }
            f.ack_due = false;
            f.last_wnd_sent = f.window_bytes();
            let th = f.header(f.seq_next(), TCP_ACK);
            let n = write_tcp_frame(buf, f.guest_mac, self.gw_mac, &th, 0, CsumMode::Full);
            if n == 0 {
                self.counters.drop(DropReason::RxBufferTooSmall);
                continue;
            }
            self.counters.count_out(Proto::Tcp, n);
            return Some((VnetHdr::default(), n));
        }
        None
    }

    /// The next data (or FIN) frame of a flow that has host data and guest window.
    pub fn tcp_next_data(&mut self, buf: &mut [u8]) -> Option<(VnetHdr, usize)> {
        while let Some(h) = self.tcp.ready.pop_front() {
            let Some(f) = self.tcp.flows.get_mut(h) else { continue };
            f.in_ready = false;
            if let Some(r) = self.tcp_produce(h, buf) {
                self.tcp_mark_ready(h);
                return Some(r);
            }
        }
        None
    }

    fn tcp_produce(&mut self, h: Handle, buf: &mut [u8]) -> Option<(VnetHdr, usize)> {
        let tso = self.rx_offloads.tso4 && self.rx_offloads.csum;
        let (csum, plain_hdr) = self.l4_csum_mode(TCP_CSUM_OFFSET);
        let gw_mac = self.gw_mac;
        let f = self.tcp.flows.get_mut(h)?;
        if !f.can_send() || !f.host_readable {
            return None;
        }
        let avail = (f.guest_wnd - f.inflight()) as usize;
        let room = buf.len().saturating_sub(HDRS);
        let max_payload = if tso {
            let cap = (0xffff - IPV4_HDR_LEN - TCP_HDR_LEN).min(room);
            (cap / f.mss).max(1) * f.mss
        } else {
            f.mss
        };
        let want = avail.min(max_payload).min(room);
        if want == 0 {
            return None;
        }
        let peeked = if f.peek_offset {
            sys::recv(f.fd(), &mut buf[HDRS..HDRS + want], libc::MSG_PEEK)
        } else {
            // Peek past the bytes already in flight into a scratch area.
            let skip = f.inflight() as usize;
            if skip > MAX_PEEK_SKIP {
                return None;
            }
            if self.tcp_peek_skip.len() < skip {
                self.tcp_peek_skip.resize(skip, 0);
            }
            match sys::recv_peek_past(f.fd(), &mut self.tcp_peek_skip[..skip], &mut buf[HDRS..HDRS + want]) {
                Ok(total) if total > 0 && total <= skip && !f.host_rdhup => {
                    // Only bytes the guest already has: wait for more.
                    f.host_readable = false;
                    return None;
                }
                Ok(total) => Ok(total.saturating_sub(skip)),
                Err(e) => Err(e),
            }
        };
        let n = match peeked {
            Ok(n) => n,
            Err(e) if sys::would_block(&e) => {
                f.host_readable = false;
                return None;
            }
            Err(e) => {
                log::debug!("user net: tcp peek failed: {e}");
                self.tcp_close(h, true, false);
                return None;
            }
        };
        let seq = f.snd_nxt;
        if f.inflight() == 0 {
            // The retransmission clock starts with the first unacknowledged byte.
            f.last_progress = self.now;
        }
        if n == 0 {
            // End of stream from the host: FIN after everything we sent.
            f.host_readable = false;
            f.fin_sent = true;
            f.ack_due = false;
            f.ack_delayed = false;
            let th = f.header(seq, TCP_FIN | TCP_ACK);
            let len = write_tcp_frame(buf, f.guest_mac, gw_mac, &th, 0, CsumMode::Full);
            self.counters.count_out(Proto::Tcp, len);
            return Some((VnetHdr::default(), len));
        }
        if n < want && !f.host_rdhup {
            // Drained; the next arrival raises a new edge. After the host's FIN there is
            // no further edge, so keep reading until the peek reports end of stream.
            f.host_readable = false;
        }
        f.snd_nxt = f.snd_nxt.wrapping_add(n as u32);
        f.ack_due = false;
        f.ack_delayed = false;
        f.last_wnd_sent = f.window_bytes();
        let th = f.header(seq, TCP_ACK | TCP_PSH);
        let (mode, hdr) = if n > f.mss {
            let hdr = VnetHdr {
                flags: VnetHdr::FLAG_NEEDS_CSUM,
                gso_type: VnetHdr::GSO_TCPV4,
                hdr_len: HDRS as u16,
                gso_size: f.mss as u16,
                csum_start: (ETH_HDR_LEN + IPV4_HDR_LEN) as u16,
                csum_offset: TCP_CSUM_OFFSET,
                num_buffers: 0,
            };
            (CsumMode::Partial, hdr)
        } else {
            (csum, plain_hdr)
        };
        let len = write_tcp_frame(buf, f.guest_mac, gw_mac, &th, n, mode);
        self.counters.count_out(Proto::Tcp, len);
        Some((hdr, len))
    }

    // -----------------------------------------------------------------------------------
    // Forwarded connections (host client → guest server)

    /// Starts a connection towards the guest for an accepted host socket.
    pub fn tcp_start_inbound(&mut self, sock: OwnedFd, peer: SocketAddrV4, guest: (Ipv4Addr, u16)) {
        let fd = sock.as_raw_fd();
        if self.flows_open() >= self.p.max_flows || self.tcp.half_open >= self.p.max_half_open {
            self.counters.drop(DropReason::FlowLimit);
            sys::set_linger_zero(fd);
            return;
        }
        let key: TcpKey = (guest.0, guest.1, self.p.host, peer.port());
        if self.tcp.by_key.contains_key(&key) {
            self.counters.drop(DropReason::HostFwdCollision);
            sys::set_linger_zero(fd);
            return;
        }
        let _ = sys::setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        let peek_offset = sys::tcp_peek_offset_supported();
        if peek_offset && sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).is_err() {
            self.counters.drop(DropReason::SocketError);
            return;
        }
        let isn = self.tcp.next_isn();
        let mss = self.p.mtu as usize - 40;
        let guest_mac = self.guest_mac.unwrap_or(MacAddr::BROADCAST);
        let flow = TcpFlow {
            peek_offset,
            ..TcpFlow::new(key, sock, TcpState::SynSent, guest_mac, isn, mss, self.now)
        };
        if let Some(h) = self.tcp_add_half_open(flow) {
            self.tcp_send_syn(h);
        }
    }

    fn tcp_send_syn(&mut self, h: Handle) {
        let Some(f) = self.tcp.flows.get_mut(h) else { return };
        match self.guest_mac {
            Some(mac) => {
                f.guest_mac = mac;
                let isn = f.isn;
                self.tcp_emit_ctl(h, isn, TCP_SYN, true);
            }
            None => {
                let ip = f.key.0;
                self.send_arp_request(ip);
            }
        }
    }

    pub fn tcp_tick(&mut self) {
        let now = self.now;
        for h in self.tcp.flows.handles() {
            let Some(f) = self.tcp.flows.get_mut(h) else { continue };
            match f.state {
                TcpState::Connecting => {
                    if now.duration_since(f.created) >= self.p.tcp_connect_timeout {
                        let e = io::Error::from_raw_os_error(libc::ETIMEDOUT);
                        self.tcp_connect_failed(h, &e);
                    }
                }
                TcpState::SynSent => {
                    if now.duration_since(f.created) >= self.p.tcp_connect_timeout {
                        self.tcp_close(h, false, true);
                    } else if now.duration_since(f.last_progress) >= SYN_RETRY {
                        f.last_progress = now;
                        f.syn_retries += 1;
                        self.tcp_send_syn(h);
                    }
                }
                TcpState::Established => {
                    if now.duration_since(f.last_active) >= self.p.tcp_idle {
                        self.tcp_close(h, true, true);
                        continue;
                    }
                    let outstanding =
                        f.inflight() > 0 || (f.fin_sent && !f.fin_acked) || !f.syn_acked;
                    let window_stuck =
                        f.syn_acked && !outstanding && f.host_readable && f.guest_wnd == 0;
                    if window_stuck && now.duration_since(f.last_progress) >= RTO {
                        // Zero-window probe: an already-acknowledged sequence number makes
                        // the guest answer with its current window, in case its window
                        // update was lost.
                        f.last_progress = now;
                        let seq = f.snd_nxt.wrapping_sub(1);
                        self.tcp_emit_ctl(h, seq, TCP_ACK, false);
                        continue;
                    }
                    if outstanding && now.duration_since(f.last_progress) >= RTO {
                        if !f.syn_acked {
                            f.last_progress = now;
                            let isn = f.isn;
                            self.tcp_emit_ctl(h, isn, TCP_SYN | TCP_ACK, true);
                        } else {
                            self.tcp_rewind(h);
                        }
                    }
                }
            }
        }
    }
}
