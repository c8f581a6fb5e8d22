//! The NAT engine: owns every socket, the epoll set, the frames queued for the guest, and
//! dispatches guest frames (`input`) and host events (`poll`) to the protocol modules.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::config::NetParams;
use super::counters::{DropReason, FlowGauges, NatCounters, Proto};
use super::dhcp::DhcpServer;
use super::hostfwd::Forwarders;
use super::icmp::IcmpTable;
use super::slab::Handle;
use super::tcp::TcpTable;
use super::udp::UdpTable;
use super::wire::*;
use crate::backend::{Offloads, VnetHdr, MAX_FRAME_LEN};
use crate::mac::MacAddr;
use crate::sys::{Epoll, EventFd, TimerFd};

pub const TOKEN_KICK: u8 = 1;
pub const TOKEN_TIMER: u8 = 2;
pub const TOKEN_TCP: u8 = 3;
pub const TOKEN_UDP: u8 = 4;
pub const TOKEN_ICMP: u8 = 5;
pub const TOKEN_ICMP_RAW: u8 = 6;
pub const TOKEN_FWD_TCP: u8 = 7;
pub const TOKEN_FWD_UDP: u8 = 8;
pub const TOKEN_ACK_TIMER: u8 = 9;

/// Frames waiting for the guest beyond this many are dropped and counted.
const OUT_QUEUE_CAP: usize = 4096;
const TICK: Duration = Duration::from_millis(250);
/// Host events are looked at after at most this many data frames in a row.
const FRAMES_PER_POLL: u32 = 64;

/// The kind of sender a guest packet's source address names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The guest on the virtual network itself.
    Attached,
    /// A host on a network the guest routes for.
    Routed,
}

/// Addresses no host may use as its own: "this network" (0/8), loopback, link-local,
/// multicast, and class E with the limited broadcast.
pub fn is_martian(ip: Ipv4Addr) -> bool {
    let first = ip.octets()[0];
    first == 0 || ip.is_loopback() || ip.is_link_local() || ip.is_multicast() || first >= 240
}

pub struct OutFrame {
    pub hdr: VnetHdr,
    pub data: Vec<u8>,
}

/// Where a guest packet to `dst` goes on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: SocketAddrV4,
    pub is_dns: bool,
}

pub struct Engine {
    pub p: NetParams,
    pub gw_mac: MacAddr,
    pub guest_mac: Option<MacAddr>,
    pub guest_ip: Option<Ipv4Addr>,
    pub epoll: Epoll,
    kick: EventFd,
    kicked: bool,
    in_recv: bool,
    timer: TimerFd,
    /// One-shot timer for delayed ACKs.
    pub ack_timer: TimerFd,
    /// The last `recv` returned nothing: the next one starts with a look at the sockets.
    idle: bool,
    pub out: VecDeque<OutFrame>,
    pub rx_offloads: Offloads,
    pub counters: NatCounters,
    pub now: Instant,
    pub dhcp: DhcpServer,
    pub dns_upstream: Option<SocketAddrV4>,
    pub udp: UdpTable,
    pub tcp: TcpTable,
    pub icmp: IcmpTable,
    pub fwd: Forwarders,
    /// Scratch buffer for datagrams read from host sockets.
    pub scratch: Vec<u8>,
    /// Where in-flight TCP bytes are peeked to on kernels without SO_PEEK_OFF for TCP.
    pub tcp_peek_skip: Vec<u8>,
    events: Vec<libc::epoll_event>,
    frames_since_poll: u32,
}

impl Engine {
    pub fn new(
        p: NetParams,
        dns_upstream: Option<SocketAddrV4>,
        fwd: Forwarders,
    ) -> std::io::Result<Engine> {
        let epoll = Epoll::new()?;
        let kick = EventFd::new()?;
        let timer = TimerFd::new()?;
        let ack_timer = TimerFd::new()?;
        epoll.add(kick.raw(), libc::EPOLLIN as u32, (TOKEN_KICK as u64) << 56)?;
        epoll.add(ack_timer.raw(), libc::EPOLLIN as u32, (TOKEN_ACK_TIMER as u64) << 56)?;
        epoll.add(timer.raw(), libc::EPOLLIN as u32, (TOKEN_TIMER as u64) << 56)?;
        fwd.register(&epoll)?;
        let h = p.host.octets();
        // Locally administered, derived from the gateway address so it is stable.
        let gw_mac = MacAddr([0x52, 0x55, h[0], h[1], h[2], h[3]]);
        Ok(Engine {
            tcp_peek_skip: Vec::new(),
            dhcp: DhcpServer::new(&p),
            gw_mac,
            guest_mac: None,
            guest_ip: None,
            epoll,
            kick,
            kicked: false,
            in_recv: false,
            timer,
            ack_timer,
            idle: true,
            out: VecDeque::new(),
            rx_offloads: Offloads::NONE,
            counters: NatCounters::new(),
            now: Instant::now(),
            dns_upstream,
            udp: UdpTable::default(),
            tcp: TcpTable::default(),
            icmp: IcmpTable::new(),
            fwd,
            scratch: vec![0u8; 65536],
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 128],
            frames_since_poll: 0,
            p,
        })
    }

    /// Makes the poll fd readable so the frontend calls `recv`. Inside `recv` there is no
    /// need: the frontend calls it until it returns nothing.
    pub fn kick(&mut self) {
        if !self.kicked && !self.in_recv {
            self.kick.signal();
            self.kicked = true;
        }
    }

    pub fn flows_open(&self) -> usize {
        self.tcp.len() + self.udp.len() + self.icmp.len()
    }

    pub fn gauges(&self) -> FlowGauges {
        FlowGauges {
            tcp_open: self.tcp.len(),
            tcp_half_open: self.tcp.half_open(),
            udp_open: self.udp.len(),
            icmp_open: self.icmp.len(),
            dhcp_leases: self.dhcp.lease_count(),
            hostfwd_listeners: self.fwd.len(),
        }
    }

    /// Queues a frame for the guest (copied out by `recv`).
    pub fn emit(&mut self, proto: Proto, hdr: VnetHdr, data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        if self.out.len() >= OUT_QUEUE_CAP {
            self.counters.drop(DropReason::RxQueueFull);
            return;
        }
        self.counters.count_out(proto, data.len());
        self.out.push_back(OutFrame { hdr, data });
        self.kick();
    }

    /// How a non-GSO frame to the guest gets its L4 checksum (at `csum_offset` into the
    /// L4 header). With checksum offload, frames carry only the pseudo-header sum and
    /// NEEDS_CSUM: a virtio guest accepts that on receive, and a tap (which reads our
    /// frames as a guest's transmit) honours nothing else, DATA_VALID included.
    pub fn l4_csum_mode(&self, csum_offset: u16) -> (CsumMode, VnetHdr) {
        if !self.rx_offloads.csum {
            return (CsumMode::Full, VnetHdr::default());
        }
        let hdr = VnetHdr {
            flags: VnetHdr::FLAG_NEEDS_CSUM,
            csum_start: (ETH_HDR_LEN + IPV4_HDR_LEN) as u16,
            csum_offset,
            ..Default::default()
        };
        (CsumMode::Partial, hdr)
    }

    pub fn ensure_timer(&mut self) {
        let want = self.flows_open() > 0 || self.fwd.has_pending();
        if want != self.timer.is_armed() {
            self.timer.set_periodic(want.then_some(TICK));
        }
    }

    // -----------------------------------------------------------------------------------
    // Guest → host

    pub fn input(&mut self, hdr: &VnetHdr, frame: &[u8]) {
        self.now = Instant::now();
        self.counters.frames_from_guest += 1;
        self.counters.bytes_from_guest += frame.len() as u64;
        if frame.len() > MAX_FRAME_LEN {
            return self.counters.drop(DropReason::Oversized);
        }
        let Ok(eth) = EthFrame::new(frame) else {
            return self.counters.drop(DropReason::EthTruncated);
        };
        let dst = eth.dst();
        if dst != self.gw_mac && !dst.is_broadcast() {
            return self.counters.drop(DropReason::NotForUs);
        }
        if eth.src().is_multicast() {
            return self.counters.drop(DropReason::BadSource);
        }
        match eth.ethertype() {
            ETHERTYPE_ARP => {
                self.counters.count_in(Proto::Arp);
                self.handle_arp(&eth)
            }
            ETHERTYPE_IPV4 => self.input_ipv4(hdr, &eth),
            _ => {
                self.counters.count_in(Proto::Other);
                self.counters.drop(DropReason::EthertypeUnsupported)
            }
        }
        self.ensure_timer();
    }

    fn input_ipv4(&mut self, hdr: &VnetHdr, eth: &EthFrame) {
        let Ok(ip) = Ipv4Packet::new(eth.payload()) else {
            self.counters.count_in(Proto::Other);
            return self.counters.drop(DropReason::Ipv4Malformed);
        };
        let proto = match ip.protocol() {
            IPPROTO_TCP => Proto::Tcp,
            IPPROTO_UDP => Proto::Udp,
            IPPROTO_ICMP => Proto::Icmp,
            _ => Proto::Other,
        };
        self.counters.count_in(proto);
        if !ip.header_checksum_ok() {
            return self.counters.drop(DropReason::Ipv4BadChecksum);
        }
        if ip.is_fragment() {
            // No reassembly, ever: it is where slirp's worst bugs lived.
            return self.counters.drop(DropReason::IpFragment);
        }
        if ip.has_options() {
            self.counters.ip_options_seen += 1;
        }
        let gso = hdr.gso_type & !VnetHdr::GSO_ECN;
        if gso != VnetHdr::GSO_NONE && !(gso == VnetHdr::GSO_TCPV4 && proto == Proto::Tcp) {
            return self.counters.drop(DropReason::GsoUnsupported);
        }
        let trusted = hdr.flags & (VnetHdr::FLAG_NEEDS_CSUM | VnetHdr::FLAG_DATA_VALID) != 0;
        if proto == Proto::Udp {
            if let Ok(udp) = UdpPacket::new(ip.payload()) {
                if udp.dst_port() == 67 && udp.src_port() == 68 {
                    self.counters.count_in(Proto::Dhcp);
                    return self.handle_dhcp(eth, &ip, &udp);
                }
            }
        }
        let src = ip.src();
        match self.classify_source(src) {
            Ok(Source::Attached) => {
                self.guest_mac = Some(eth.src());
                self.guest_ip = Some(src);
            }
            // A host behind a guest that routes: its flows remember its address and the
            // router's MAC, and the attached guest's identity stays as it was.
            Ok(Source::Routed) => self.counters.routed_from_guest += 1,
            Err(reason) => return self.counters.drop(reason),
        }
        let l4 = ip.payload();
        let csum_bad = |proto_num: u8| !trusted && !l4_checksum_ok(src, ip.dst(), proto_num, l4);
        match proto {
            Proto::Tcp => {
                let Ok(seg) = TcpSegment::new(l4) else {
                    return self.counters.drop(DropReason::L4Malformed);
                };
                if csum_bad(IPPROTO_TCP) {
                    return self.counters.drop(DropReason::L4BadChecksum);
                }
                self.tcp_input(eth.src(), &ip, &seg)
            }
            Proto::Udp => {
                let Ok(udp) = UdpPacket::new(l4) else {
                    return self.counters.drop(DropReason::L4Malformed);
                };
                if udp.checksum() != 0
                    && !trusted
                    && !l4_checksum_ok(src, ip.dst(), IPPROTO_UDP, udp.bytes())
                {
                    return self.counters.drop(DropReason::L4BadChecksum);
                }
                self.udp_input(eth.src(), &ip, &udp)
            }
            Proto::Icmp => {
                let Ok(icmp) = IcmpPacket::new(l4) else {
                    return self.counters.drop(DropReason::L4Malformed);
                };
                if !icmp.checksum_ok() {
                    return self.counters.drop(DropReason::L4BadChecksum);
                }
                self.icmp_input(eth.src(), &ip, &icmp)
            }
            _ => self.counters.drop(DropReason::IpProtoUnsupported),
        }
    }

    /// An address a guest on the virtual network may use as its own.
    pub fn is_guest_addr(&self, ip: Ipv4Addr) -> bool {
        self.p.contains(ip)
            && ip != self.p.net
            && ip != self.p.broadcast()
            && ip != self.p.host
            && ip != self.p.dns
    }

    /// Where a packet with source `src` comes from, or why it may not come in. Sources
    /// outside the virtual network are accepted (as QEMU's slirp does) when they are
    /// ordinary unicast addresses: a guest that forwards for a LAN behind it cannot
    /// masquerade, so its clients' addresses reach us as they are.
    pub fn classify_source(&self, src: Ipv4Addr) -> Result<Source, DropReason> {
        if self.is_guest_addr(src) {
            return Ok(Source::Attached);
        }
        if self.p.contains(src) || is_martian(src) {
            return Err(DropReason::BadSource);
        }
        if self.p.restrict {
            return Err(DropReason::Restricted);
        }
        Ok(Source::Routed)
    }

    /// Maps a guest destination to a host socket address, or says why it may not go.
    pub fn resolve(&self, dst: Ipv4Addr, port: u16) -> Result<Target, DropReason> {
        if dst == self.p.host {
            if self.p.restrict {
                return Err(DropReason::Restricted);
            }
            if !self.p.host_loopback {
                return Err(DropReason::HostLoopbackDisabled);
            }
            return Ok(Target {
                host: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
                is_dns: false,
            });
        }
        if dst == self.p.dns {
            if port != 53 {
                return Err(DropReason::NoRoute);
            }
            if self.p.restrict {
                return Err(DropReason::Restricted);
            }
            return match self.dns_upstream {
                Some(up) => Ok(Target { host: up, is_dns: true }),
                None => Err(DropReason::NoDnsUpstream),
            };
        }
        if self.p.contains(dst) {
            return Err(DropReason::NoRoute);
        }
        if is_martian(dst) {
            return Err(DropReason::MartianDestination);
        }
        if self.p.restrict {
            return Err(DropReason::Restricted);
        }
        if port == 0 {
            return Err(DropReason::MartianDestination);
        }
        Ok(Target { host: SocketAddrV4::new(dst, port), is_dns: false })
    }

    /// The guest's address for forwarded connections.
    pub fn guest_addr_for_fwd(&self) -> Ipv4Addr {
        self.guest_mac
            .and_then(|m| self.dhcp.lease_of(m))
            .or(self.guest_ip)
            .unwrap_or(self.p.dhcp_start)
    }

    /// ICMP error to the guest quoting `quote` (its IP header + 8 bytes).
    pub fn emit_icmp_error(
        &mut self,
        guest_mac: MacAddr,
        from: Ipv4Addr,
        to: Ipv4Addr,
        code: u8,
        quote: &[u8],
    ) {
        let mut buf = vec![0u8; ETH_HDR_LEN + IPV4_HDR_LEN + ICMP_HDR_LEN + quote.len()];
        let n = write_icmp_frame(
            &mut buf,
            guest_mac,
            self.gw_mac,
            from,
            to,
            ICMP_DEST_UNREACH,
            code,
            [0; 4],
            quote,
        );
        buf.truncate(n);
        self.emit(Proto::Icmp, VnetHdr::default(), buf);
    }

    // -----------------------------------------------------------------------------------
    // Host → guest

    /// One frame for the guest, doing host-side work as needed.
    pub fn next_frame(&mut self, buf: &mut [u8]) -> Option<(VnetHdr, usize)> {
        self.in_recv = true;
        let r = self.next_frame_inner(buf);
        self.in_recv = false;
        r
    }

    fn next_frame_inner(&mut self, buf: &mut [u8]) -> Option<(VnetHdr, usize)> {
        // After handing out a frame, an empty queue may return nothing without another
        // epoll_wait: events that arrived since keep the poll fd readable. Only a fresh
        // wake-up, or a kick that would otherwise stay readable, needs a look.
        let mut polled = !self.idle && !self.kicked;
        let r = self.next_frame_loop(buf, &mut polled);
        self.idle = r.is_none();
        r
    }

    fn next_frame_loop(&mut self, buf: &mut [u8], polled: &mut bool) -> Option<(VnetHdr, usize)> {
        loop {
            if let Some(f) = self.out.pop_front() {
                if f.data.len() > buf.len() {
                    self.counters.drop(DropReason::RxBufferTooSmall);
                    continue;
                }
                buf[..f.data.len()].copy_from_slice(&f.data);
                return Some((f.hdr, f.data.len()));
            }
            if let Some(r) = self.tcp_next_ack(buf) {
                return Some(r);
            }
            if self.frames_since_poll >= FRAMES_PER_POLL || (!*polled && !self.tcp.has_ready()) {
                self.poll();
                *polled = true;
                self.frames_since_poll = 0;
                continue;
            }
            if self.tcp.has_ready() {
                if let Some(r) = self.tcp_next_data(buf) {
                    self.frames_since_poll += 1;
                    return Some(r);
                }
                continue;
            }
            if !self.out.is_empty() || self.tcp.has_ack_due() {
                continue;
            }
            return None;
        }
    }

    /// Handles every host event that is ready now.
    pub fn poll(&mut self) {
        let mut events = std::mem::take(&mut self.events);
        let n = match self.epoll.wait(&mut events, 0) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("user net: epoll_wait failed: {e}");
                0
            }
        };
        self.now = Instant::now();
        for ev in events.iter().take(n) {
            let (kind, h) = Handle::from_token(ev.u64);
            let bits = ev.events;
            match kind {
                TOKEN_KICK => {
                    self.kick.drain();
                    self.kicked = false;
                }
                TOKEN_TIMER => {
                    self.timer.drain();
                    self.on_tick();
                }
                TOKEN_ACK_TIMER => {
                    self.ack_timer.fired();
                    self.tcp_delayed_acks_due();
                }
                TOKEN_TCP => self.tcp_event(h, bits),
                TOKEN_UDP => self.udp_event(h),
                TOKEN_ICMP => self.icmp_event(Some(h)),
                TOKEN_ICMP_RAW => self.icmp_event(None),
                TOKEN_FWD_TCP => self.fwd_tcp_accept(h.idx as usize),
                TOKEN_FWD_UDP => self.fwd_udp_event(h.idx as usize),
                _ => {}
            }
        }
        self.events = events;
        self.ensure_timer();
    }

    fn on_tick(&mut self) {
        self.tcp_tick();
        self.udp_tick();
        self.icmp_tick();
        self.fwd_tick();
    }
}
