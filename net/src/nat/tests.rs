//! Backend tests without a VM: frames go in through `send`, frames come out of `recv`.
//! Every socket is on 127.0.0.1 with an ephemeral port.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use super::counters::DropReason;
use super::frames::*;
use super::wire::*;
use super::{IcmpMode, UserNet, UserNetConfig};
use crate::backend::{Backend, Offloads, VnetHdr, MAX_FRAME_LEN};
use crate::mac::MacAddr;

/// A guest that routes for a LAN behind it (ip_forward=1, no masquerading): its NIC on the
/// NAT has this MAC, and the LAN host `ROUTED` sends through it.
pub const ROUTER_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x40, 0x00, 0x01]);

/// A host on the LAN behind `ROUTER_MAC`'s guest.
pub const ROUTED: Sender = Sender { mac: ROUTER_MAC, ip: Ipv4Addr::new(10, 40, 0, 2) };
const WAIT: Duration = Duration::from_secs(3);

pub type Frame = (VnetHdr, Vec<u8>);

pub fn cfg() -> UserNetConfig {
    // Never fall back to the host's resolv.conf in tests: nothing may leave loopback.
    UserNetConfig { dns_upstream: Some("127.0.0.1:9".into()), ..Default::default() }
}

pub struct Guest {
    pub net: UserNet,
    pub gw_mac: MacAddr,
    pub seen: Vec<Frame>,
    /// Frames `wait` read past the one it returned.
    backlog: std::collections::VecDeque<Frame>,
    buf: Vec<u8>,
}

impl Guest {
    pub fn new(c: &UserNetConfig) -> Guest {
        let net = UserNet::new(c).expect("user net");
        let gw_mac = net.gateway_mac();
        Guest {
            net,
            gw_mac,
            seen: Vec::new(),
            backlog: Default::default(),
            buf: vec![0u8; MAX_FRAME_LEN],
        }
    }

    pub fn send(&mut self, frame: &[u8]) {
        self.net.send(&VnetHdr::default(), frame).unwrap();
    }

    pub fn send_hdr(&mut self, hdr: VnetHdr, frame: &[u8]) {
        self.net.send(&hdr, frame).unwrap();
    }

    /// Frames ready now (after one short poll).
    pub fn drain(&mut self, wait_ms: i32) -> Vec<Frame> {
        if !self.backlog.is_empty() {
            return self.backlog.drain(..).collect();
        }
        let mut pfd = libc::pollfd { fd: self.net.poll_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut pfd, 1, wait_ms) };
        let mut out = Vec::new();
        while let Some((hdr, n)) = self.net.recv(&mut self.buf).unwrap() {
            out.push((hdr, self.buf[..n].to_vec()));
        }
        self.seen.extend(out.iter().cloned());
        out
    }

    /// Waits for a frame matching `pred`; other frames are kept in `seen` only.
    pub fn wait(&mut self, mut pred: impl FnMut(&Frame) -> bool) -> Option<Frame> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let mut frames = self.drain(20).into_iter();
            while let Some(f) = frames.next() {
                if pred(&f) {
                    self.backlog.extend(frames);
                    return Some(f);
                }
            }
        }
        None
    }

    pub fn udp(&mut self, sport: u16, dst: (Ipv4Addr, u16), payload: &[u8]) {
        let f = udp_frame(self.gw_mac, (GUEST_IP, sport), dst, payload);
        self.send(&f);
    }

    pub fn arp_for(&mut self, ip: Ipv4Addr) {
        self.send(&arp_request(GUEST, ip));
    }
}

pub fn udp_frame(
    gw_mac: MacAddr,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    udp_frame_via(GUEST_MAC, gw_mac, src, dst, payload)
}

#[allow(clippy::too_many_arguments)]
pub fn tcp_frame(
    from: Sender,
    gw_mac: MacAddr,
    sport: u16,
    dst: (Ipv4Addr, u16),
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
    syn_opts: bool,
) -> Vec<u8> {
    let th = TcpHeader {
        src: (from.ip, sport),
        dst,
        seq,
        ack,
        flags,
        window: 0xffff,
        mss: syn_opts.then_some(1460),
        window_scale: syn_opts.then_some(7),
    };
    tcp_frame_with(from.mac, gw_mac, &th, payload)
}

pub fn icmp_echo_frame(gw_mac: MacAddr, dst: Ipv4Addr, id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    icmp_echo(GUEST, gw_mac, dst, id, seq, data)
}

/// Parsed view of a frame from the NAT, checked for well-formedness on the way.
pub struct Parsed {
    pub eth_dst: MacAddr,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub l4: Vec<u8>,
}

pub fn parse(f: &Frame) -> Option<Parsed> {
    let eth = EthFrame::new(&f.1).ok()?;
    if eth.ethertype() != ETHERTYPE_IPV4 {
        return Some(Parsed {
            eth_dst: eth.dst(),
            src: Ipv4Addr::UNSPECIFIED,
            dst: Ipv4Addr::UNSPECIFIED,
            proto: 0,
            l4: eth.payload().to_vec(),
        });
    }
    let ip = Ipv4Packet::new(eth.payload()).ok()?;
    assert!(ip.header_checksum_ok(), "NAT produced a bad IP header checksum");
    if f.0.flags & VnetHdr::FLAG_NEEDS_CSUM != 0 {
        // Finish the partial checksum the way the receiver would, then check it.
        assert_eq!(f.0.csum_start as usize, ETH_HDR_LEN + ip.header_len());
        let mut l4 = ip.payload().to_vec();
        let at = f.0.csum_offset as usize;
        let c = !csum_fold(csum_partial(&l4, 0));
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        assert!(l4_checksum_ok(ip.src(), ip.dst(), ip.protocol(), &l4), "bad partial checksum");
    }
    let trusted = f.0.flags & (VnetHdr::FLAG_DATA_VALID | VnetHdr::FLAG_NEEDS_CSUM) != 0;
    if !trusted && ip.protocol() != IPPROTO_ICMP {
        let ok = l4_checksum_ok(ip.src(), ip.dst(), ip.protocol(), ip.payload())
            || (ip.protocol() == IPPROTO_UDP && ip.payload().get(6..8) == Some(&[0, 0]));
        assert!(ok, "NAT produced a bad L4 checksum");
    }
    Some(Parsed {
        eth_dst: eth.dst(),
        src: ip.src(),
        dst: ip.dst(),
        proto: ip.protocol(),
        l4: ip.payload().to_vec(),
    })
}

/// (frame, sport, dport, seq, ack, flags, window, payload)
pub type TcpView = (Parsed, u16, u16, u32, u32, u8, u16, Vec<u8>);

pub fn tcp_of(f: &Frame) -> Option<TcpView> {
    let p = parse(f)?;
    if p.proto != IPPROTO_TCP {
        return None;
    }
    let t = TcpSegment::new(&p.l4).ok()?;
    let r =
        (t.src_port(), t.dst_port(), t.seq(), t.ack(), t.flags(), t.window(), t.payload().to_vec());
    Some((p, r.0, r.1, r.2, r.3, r.4, r.5, r.6))
}

/// A guest-side TCP endpoint driven by hand.
pub struct GuestTcp {
    pub from: Sender,
    pub sport: u16,
    pub dst: (Ipv4Addr, u16),
    pub seq: u32,
    pub ack: u32,
}

impl GuestTcp {
    /// SYN → SYN-ACK → ACK. Returns None if the NAT answered otherwise.
    pub fn connect(g: &mut Guest, sport: u16, dst: (Ipv4Addr, u16)) -> Option<GuestTcp> {
        Self::connect_from(g, GUEST, sport, dst)
    }

    /// `connect` for a sender other than the guest.
    pub fn connect_from(
        g: &mut Guest,
        from: Sender,
        sport: u16,
        dst: (Ipv4Addr, u16),
    ) -> Option<GuestTcp> {
        let isn = 1000u32;
        g.send(&tcp_frame(from, g.gw_mac, sport, dst, isn, 0, TCP_SYN, &[], true));
        let f = g.wait(|f| tcp_of(f).is_some_and(|t| t.2 == sport))?;
        let (_, _, _, seq, ack, flags, _, _) = tcp_of(&f)?;
        if flags != TCP_SYN | TCP_ACK || ack != isn + 1 {
            return None;
        }
        let c = GuestTcp { from, sport, dst, seq: isn + 1, ack: seq.wrapping_add(1) };
        g.send(&tcp_frame(from, g.gw_mac, sport, dst, c.seq, c.ack, TCP_ACK, &[], false));
        Some(c)
    }

    /// A segment of this connection at its current sequence and acknowledgement numbers.
    pub fn segment(&self, gw_mac: MacAddr, flags: u8, payload: &[u8]) -> Vec<u8> {
        let (from, sport, dst, seq, ack) = (self.from, self.sport, self.dst, self.seq, self.ack);
        tcp_frame(from, gw_mac, sport, dst, seq, ack, flags, payload, false)
    }

    pub fn send(&mut self, g: &mut Guest, data: &[u8]) {
        g.send(&self.segment(g.gw_mac, TCP_ACK | TCP_PSH, data));
        self.seq = self.seq.wrapping_add(data.len() as u32);
    }

    pub fn fin(&mut self, g: &mut Guest) {
        g.send(&self.segment(g.gw_mac, TCP_ACK | TCP_FIN, &[]));
        self.seq = self.seq.wrapping_add(1);
    }

    /// Collects in-order payload until `n` bytes (or a FIN), ACKing as it goes.
    pub fn read(&mut self, g: &mut Guest, n: usize) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut fin = false;
        // WAIT bounds a stall, not the whole transfer: a loaded machine moves bytes slowly.
        let mut deadline = Instant::now() + WAIT;
        while out.len() < n && !fin && Instant::now() < deadline {
            for f in g.drain(20) {
                let Some((_, _, dport, seq, _, flags, _, payload)) = tcp_of(&f) else { continue };
                if dport != self.sport {
                    continue;
                }
                if seq == self.ack {
                    deadline = Instant::now() + WAIT;
                    out.extend_from_slice(&payload);
                    self.ack = self.ack.wrapping_add(payload.len() as u32);
                    if flags & TCP_FIN != 0 {
                        fin = true;
                        self.ack = self.ack.wrapping_add(1);
                    }
                }
                g.send(&self.segment(g.gw_mac, TCP_ACK, &[]));
            }
        }
        (out, fin)
    }
}

/// A UDP socket on 127.0.0.1 and its port; reads wait up to `WAIT`.
fn udp_server() -> (UdpSocket, u16) {
    let (s, port) = udp_server_nonblocking();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    (s, port)
}

/// A UDP socket on 127.0.0.1 and its port; reads never wait.
fn udp_server_nonblocking() -> (UdpSocket, u16) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_nonblocking(true).unwrap();
    let port = s.local_addr().unwrap().port();
    (s, port)
}

/// A TCP listener on 127.0.0.1 and its port.
fn tcp_listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// A TCP listener on 127.0.0.1 and its port; accept never waits.
/// A TCP server on 127.0.0.1 that accepts one connection and hands it to `serve` on a
/// thread of its own (reads wait up to `WAIT`). Returns the thread and the port.
fn tcp_server<R: Send + 'static>(
    serve: impl FnOnce(TcpStream, std::net::SocketAddr) -> R + Send + 'static,
) -> (std::thread::JoinHandle<R>, u16) {
    let (listener, port) = tcp_listener();
    let thread = std::thread::spawn(move || {
        let (s, peer) = listener.accept().unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        serve(s, peer)
    });
    (thread, port)
}

fn tcp_listener_nonblocking() -> (TcpListener, u16) {
    let (l, port) = tcp_listener();
    l.set_nonblocking(true).unwrap();
    (l, port)
}

fn gauge(g: &Guest, name: &str) -> u64 {
    crate::testutil::gauge(&g.net, name)
}

// ---------------------------------------------------------------------------------------
// ARP, DHCP, ICMP

#[test]
fn arp_answers_gateway_and_dns_and_learns_guest() {
    let mut g = Guest::new(&cfg());
    for target in [GW, DNS] {
        g.arp_for(target);
        let f = g.wait(|_| true).expect("ARP reply");
        let eth = EthFrame::new(&f.1).unwrap();
        assert_eq!(eth.ethertype(), ETHERTYPE_ARP);
        assert_eq!(eth.dst(), GUEST_MAC);
        let arp = ArpPacket::new(eth.payload()).unwrap();
        assert_eq!(arp.op(), ARP_REPLY);
        assert_eq!(arp.sender_ip(), target);
        assert_eq!(arp.sender_mac(), g.gw_mac);
        assert_eq!(arp.target_ip(), GUEST_IP);
        assert_eq!(arp.target_mac(), GUEST_MAC);
    }
    assert_eq!(g.net.guest_ip(), Some(GUEST_IP));
    g.arp_for(Ipv4Addr::new(10, 0, 2, 77));
    assert!(g.drain(20).is_empty());
    assert_eq!(g.net.dropped(DropReason::ArpNotForUs), 1);
    assert_eq!(gauge(&g, "arp_in"), 3);
    assert_eq!(gauge(&g, "arp_out"), 2);
}

fn dhcp_send(g: &mut Guest, msg: &[u8]) {
    g.send(&dhcp_frame(msg));
}

/// (message type, yiaddr, options as (code, body))
type DhcpView = (u8, Ipv4Addr, Vec<(u8, Vec<u8>)>);

fn dhcp_reply(f: &Frame) -> Option<DhcpView> {
    let p = parse(f)?;
    let udp = UdpPacket::new(&p.l4).ok()?;
    if udp.src_port() != 67 || udp.dst_port() != 68 {
        return None;
    }
    let m = udp.payload();
    let yiaddr = Ipv4Addr::new(m[16], m[17], m[18], m[19]);
    let mut opts = Vec::new();
    let mut i = 240;
    let mut ty = 0;
    while i < m.len() && m[i] != 255 {
        if m[i] == 0 {
            i += 1;
            continue;
        }
        let (code, len) = (m[i], m[i + 1] as usize);
        let body = m[i + 2..i + 2 + len].to_vec();
        if code == 53 {
            ty = body[0];
        }
        opts.push((code, body));
        i += 2 + len;
    }
    Some((ty, yiaddr, opts))
}

#[test]
fn dhcp_handshake_offer_ack_nak_release() {
    let c = UserNetConfig { hostname: Some("tapir-guest".into()), mtu: 1400, ..cfg() };
    let mut g = Guest::new(&c);
    dhcp_send(&mut g, &dhcp_msg(1, &[], true));
    let f = g.wait(|f| dhcp_reply(f).is_some()).expect("OFFER");
    let (ty, yiaddr, opts) = dhcp_reply(&f).unwrap();
    assert_eq!((ty, yiaddr), (2, GUEST_IP));
    let opt = |code: u8| opts.iter().find(|(c, _)| *c == code).map(|(_, b)| b.clone());
    assert_eq!(opt(1), Some(vec![255, 255, 255, 0]));
    assert_eq!(opt(3), Some(GW.octets().to_vec()));
    assert_eq!(opt(6), Some(DNS.octets().to_vec()));
    assert_eq!(opt(54), Some(GW.octets().to_vec()));
    assert_eq!(opt(51), Some(86400u32.to_be_bytes().to_vec()));
    assert_eq!(opt(26), Some(1400u16.to_be_bytes().to_vec()));
    assert_eq!(opt(12), Some(b"tapir-guest".to_vec()));
    assert_eq!(parse(&f).unwrap().eth_dst, GUEST_MAC);

    let req = [50, 4, 10, 0, 2, 15, 54, 4, 10, 0, 2, 2];
    dhcp_send(&mut g, &dhcp_msg(3, &req, true));
    let f = g.wait(|f| dhcp_reply(f).is_some()).expect("ACK");
    assert_eq!(dhcp_reply(&f).unwrap().0, 5);
    assert_eq!(g.net.guest_ip(), Some(GUEST_IP));
    assert_eq!(gauge(&g, "dhcp_leases"), 1);

    // Asking for somebody else's address gets a NAK.
    dhcp_send(&mut g, &dhcp_msg(3, &[50, 4, 10, 0, 2, 2], true));
    let f = g.wait(|f| dhcp_reply(f).is_some()).expect("NAK");
    assert_eq!(dhcp_reply(&f).unwrap().0, 6);

    // A REQUEST naming another server is not ours to answer.
    dhcp_send(&mut g, &dhcp_msg(3, &[54, 4, 10, 0, 2, 9], true));
    assert!(g.drain(20).is_empty());

    dhcp_send(&mut g, &dhcp_msg(7, &[], true));
    assert!(g.drain(20).is_empty());
    assert_eq!(gauge(&g, "dhcp_leases"), 0);
    assert_eq!(gauge(&g, "dhcp_in"), 5);
}

#[test]
fn ping_gateway_and_dns_answer_locally() {
    let mut g = Guest::new(&UserNetConfig { restrict: true, ..cfg() });
    for dst in [GW, DNS] {
        g.send(&icmp_echo_frame(g.gw_mac, dst, 0x77, 3, b"abcdefgh"));
        let f = g.wait(|f| parse(f).is_some_and(|p| p.proto == IPPROTO_ICMP)).expect("echo reply");
        let p = parse(&f).unwrap();
        assert_eq!((p.src, p.dst), (dst, GUEST_IP));
        let icmp = IcmpPacket::new(&p.l4).unwrap();
        assert!(icmp.checksum_ok());
        assert_eq!((icmp.icmp_type(), icmp.ident(), icmp.seq_no()), (ICMP_ECHO_REPLY, 0x77, 3));
        assert_eq!(icmp.data(), b"abcdefgh");
    }
}

#[test]
fn ping_elsewhere_without_icmp_sockets_is_dropped_and_counted() {
    let mut g = Guest::new(&cfg());
    g.net.set_icmp_mode(IcmpMode::Unavailable);
    // TEST-NET-1: never actually sent, the mode forbids any socket.
    g.send(&icmp_echo_frame(g.gw_mac, Ipv4Addr::new(192, 0, 2, 1), 1, 1, b"x"));
    assert!(g.drain(20).is_empty());
    assert_eq!(g.net.dropped(DropReason::IcmpUnavailable), 1);
}

// ---------------------------------------------------------------------------------------
// DNS relay

#[test]
fn dns_relay_over_udp_to_a_local_responder() {
    let (server, port) = udp_server();
    let responder = std::thread::spawn(move || {
        let mut b = [0u8; 512];
        let (n, from) = server.recv_from(&mut b).unwrap();
        let mut resp = b[..n].to_vec();
        resp[2] |= 0x80; // QR: response
        resp.extend_from_slice(b"answer");
        server.send_to(&resp, from).unwrap();
        b[..n].to_vec()
    });
    let mut g = Guest::new(&UserNetConfig {
        dns_upstream: Some(format!("127.0.0.1:{port}")),
        ..Default::default()
    });
    let query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05tapir\x00\x00\x01\x00\x01";
    g.udp(40000, (DNS, 53), query);
    let f = g.wait(|f| parse(f).is_some_and(|p| p.proto == IPPROTO_UDP)).expect("DNS answer");
    let p = parse(&f).unwrap();
    assert_eq!((p.src, p.dst), (DNS, GUEST_IP));
    let udp = UdpPacket::new(&p.l4).unwrap();
    assert_eq!((udp.src_port(), udp.dst_port()), (53, 40000));
    assert!(udp.payload().ends_with(b"answer"));
    assert_eq!(responder.join().unwrap(), query.to_vec());
    assert_eq!(gauge(&g, "dns_in"), 1);
    assert_eq!(gauge(&g, "dns_out"), 1);
}

#[test]
fn dns_relay_over_tcp_to_a_local_responder() {
    let (responder, port) = tcp_server(move |mut s, _| {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut q).unwrap();
        q[2] |= 0x80;
        s.write_all(&(q.len() as u16).to_be_bytes()).unwrap();
        s.write_all(&q).unwrap();
    });
    let mut g = Guest::new(&UserNetConfig {
        dns_upstream: Some(format!("127.0.0.1:{port}")),
        ..Default::default()
    });
    let mut c =
        GuestTcp::connect(&mut g, 41000, (DNS, 53)).expect("TCP handshake with the DNS address");
    let query = b"\x00\x0c\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00";
    c.send(&mut g, query);
    let (answer, _) = c.read(&mut g, 14);
    assert_eq!(answer.len(), 14);
    assert_eq!(&answer[2..4], b"\xbe\xef");
    assert_eq!(answer[4] & 0x80, 0x80);
    responder.join().unwrap();
}

// ---------------------------------------------------------------------------------------
// TCP and UDP NAT to host loopback

#[test]
fn tcp_exchange_with_a_host_loopback_server() {
    let (server, port) = tcp_server(move |mut s, peer| {
        assert_eq!(peer.ip(), std::net::IpAddr::V4(Ipv4Addr::LOCALHOST));
        let mut req = [0u8; 5];
        s.read_exact(&mut req).unwrap();
        assert_eq!(&req, b"hello");
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        s.write_all(&big).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        // Half-close: the guest may still send after our FIN.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        rest
    });
    let mut g = Guest::new(&cfg());
    let mut c = GuestTcp::connect(&mut g, 42000, (GW, port)).expect("handshake");
    assert_eq!(gauge(&g, "tcp_flows_open"), 1);
    c.send(&mut g, b"hello");
    let (data, fin) = c.read(&mut g, 200_000);
    assert!(fin, "server's FIN reached the guest");
    assert_eq!(data.len(), 100_000);
    assert!(data.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    // Without rx offloads every frame is at most one MSS.
    assert!(g.seen.iter().filter_map(tcp_of).all(|t| t.7.len() <= 1460));
    c.send(&mut g, b"after-fin");
    c.fin(&mut g);
    assert_eq!(server.join().unwrap(), b"after-fin");
    let deadline = Instant::now() + WAIT;
    while gauge(&g, "tcp_flows_open") != 0 && Instant::now() < deadline {
        g.drain(20);
    }
    assert_eq!(gauge(&g, "tcp_flows_open"), 0, "flow closed after both FINs");
}

/// Kernels before 6.9 have no SO_PEEK_OFF for TCP (the nested runner's Debian 6.1 among
/// them): flows then peek past their in-flight bytes themselves.
#[test]
fn tcp_download_without_kernel_peek_offsets() {
    use std::sync::atomic::Ordering;
    let (server, port) = tcp_server(move |mut s, _peer| {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        s.write_all(&big).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        rest
    });
    crate::sys::FORCE_NO_TCP_PEEK_OFFSET.store(true, Ordering::Relaxed);
    let mut g = Guest::new(&cfg());
    let connected = GuestTcp::connect(&mut g, 42100, (GW, port));
    crate::sys::FORCE_NO_TCP_PEEK_OFFSET.store(false, Ordering::Relaxed);
    let mut c = connected.expect("handshake");
    let (data, fin) = c.read(&mut g, 400_000);
    assert!(fin, "server's FIN reached the guest");
    assert_eq!(data.len(), 300_000);
    assert!(data.iter().enumerate().all(|(i, b)| *b == (i % 241) as u8), "bytes in order, none repeated");
    c.send(&mut g, b"bye");
    c.fin(&mut g);
    assert_eq!(server.join().unwrap(), b"bye");
}

#[test]
fn tcp_to_a_closed_port_gets_rst() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut g = Guest::new(&cfg());
    g.send(&tcp_frame(GUEST, g.gw_mac, 42001, (GW, port), 5, 0, TCP_SYN, &[], true));
    let f = g.wait(|f| tcp_of(f).is_some()).expect("answer to SYN");
    let (_, _, _, _, ack, flags, _, _) = tcp_of(&f).unwrap();
    assert_eq!(flags & TCP_RST, TCP_RST);
    assert_eq!(ack, 6);
    assert_eq!(gauge(&g, "tcp_flows_open"), 0);
    assert_eq!(g.net.dropped(DropReason::TcpConnectFailed), 1);
}

#[test]
fn tcp_segment_for_no_flow_gets_rst() {
    let mut g = Guest::new(&cfg());
    g.send(&tcp_frame(GUEST, g.gw_mac, 42002, (GW, 80), 5, 77, TCP_ACK, b"x", false));
    let f = g.wait(|f| tcp_of(f).is_some()).expect("RST");
    let (_, _, _, seq, _, flags, _, _) = tcp_of(&f).unwrap();
    assert_eq!((flags, seq), (TCP_RST, 77));
}

#[test]
fn udp_exchange_with_a_host_loopback_server() {
    let (server, port) = udp_server();
    let mut g = Guest::new(&cfg());
    g.udp(43000, (GW, port), b"ping over udp");
    let mut b = [0u8; 100];
    let (n, from) = server.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], b"ping over udp");
    server.send_to(b"pong", from).unwrap();
    server.send_to(b"pong2", from).unwrap();
    let f = g.wait(|f| parse(f).is_some_and(|p| p.proto == IPPROTO_UDP)).expect("reply");
    let p = parse(&f).unwrap();
    assert_eq!((p.src, p.dst), (GW, GUEST_IP));
    let udp = UdpPacket::new(&p.l4).unwrap();
    assert_eq!((udp.src_port(), udp.dst_port(), udp.payload()), (port, 43000, &b"pong"[..]));
    g.wait(|f| parse(f).is_some_and(|p| p.proto == IPPROTO_UDP)).expect("second reply");
    assert_eq!(gauge(&g, "udp_flows_open"), 1);
    // The same 4-tuple reuses its socket.
    g.udp(43000, (GW, port), b"again");
    let (_, from2) = server.recv_from(&mut b).unwrap();
    assert_eq!(from, from2);
    assert_eq!(gauge(&g, "udp_flows_open"), 1);
}

#[test]
fn udp_to_a_closed_port_gets_icmp_port_unreachable() {
    let port = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let mut g = Guest::new(&cfg());
    g.udp(43001, (GW, port), b"anyone?");
    let f = g.wait(|f| parse(f).is_some_and(|p| p.proto == IPPROTO_ICMP)).expect("ICMP error");
    let p = parse(&f).unwrap();
    let icmp = IcmpPacket::new(&p.l4).unwrap();
    assert_eq!((icmp.icmp_type(), icmp.code()), (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH));
    assert!(icmp.checksum_ok());
}

#[test]
fn flow_limit_refuses_new_flows_but_keeps_old_ones() {
    let (server, port) = udp_server();
    let mut g = Guest::new(&UserNetConfig { max_flows: 1, ..cfg() });
    g.udp(43010, (GW, port), b"one");
    g.udp(43011, (GW, port), b"two");
    g.udp(43010, (GW, port), b"three");
    let mut b = [0u8; 16];
    let (n, _) = server.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], b"one");
    let (n, _) = server.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], b"three");
    assert_eq!(g.net.dropped(DropReason::FlowLimit), 1);
}

// ---------------------------------------------------------------------------------------
// Offloads

#[test]
fn tso_from_guest_and_to_guest() {
    let big: Vec<u8> = (0..60_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let expect = big.clone();
    let (server, port) = tcp_server(move |mut s, _| {
        let mut got = vec![0u8; expect.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, expect);
        s.write_all(&vec![0x5a; 300_000]).unwrap();
    });
    let mut g = Guest::new(&cfg());
    g.net
        .set_rx_offloads(Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            tso_ecn: false,
            ufo: false,
        })
        .unwrap();
    let mut c = GuestTcp::connect(&mut g, 44000, (GW, port)).expect("handshake");
    // One GSO super-frame with a partial checksum (garbage in the checksum field).
    let mut frame = c.segment(g.gw_mac, TCP_ACK | TCP_PSH, &big);
    frame[14 + 20 + 16] ^= 0xff;
    g.send_hdr(TSO4_HDR, &frame);
    c.seq = c.seq.wrapping_add(big.len() as u32);
    let (data, _) = c.read(&mut g, 300_000);
    assert_eq!(data.len(), 300_000);
    server.join().unwrap();
    let gso: Vec<_> = g.seen.iter().filter(|f| f.0.gso_type == VnetHdr::GSO_TCPV4).collect();
    assert!(!gso.is_empty(), "large frames towards the guest use GSO");
    for f in gso {
        assert_eq!(f.0.flags, VnetHdr::FLAG_NEEDS_CSUM);
        assert!(f.1.len() > 1514 && f.1.len() <= 65535 + 14);
        assert_eq!(f.0.gso_size, 1460);
    }
}

#[test]
fn guest_dup_acks_trigger_a_resend() {
    let (server, port) = tcp_server(move |mut s, _| {
        s.write_all(&[1u8; 3000]).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    });
    let mut g = Guest::new(&cfg());
    let c = GuestTcp::connect(&mut g, 44001, (GW, port)).expect("handshake");
    let first = g.wait(|f| tcp_of(f).is_some_and(|t| !t.7.is_empty())).expect("data");
    let seq0 = tcp_of(&first).unwrap().3;
    assert_eq!(seq0, c.ack);
    g.drain(50);
    // Pretend the first segment was lost: three duplicate ACKs for its start.
    for _ in 0..3 {
        g.send(&c.segment(g.gw_mac, TCP_ACK, &[]));
    }
    let again =
        g.wait(|f| tcp_of(f).is_some_and(|t| t.3 == seq0 && !t.7.is_empty())).expect("resent");
    assert_eq!(tcp_of(&again).unwrap().7, vec![1u8; 1460]);
    assert_eq!(gauge(&g, "tcp_retransmits"), 1);
    server.join().unwrap();
}

// ---------------------------------------------------------------------------------------
// Port forwards

#[test]
fn hostfwd_tcp_reaches_a_fake_guest_server() {
    let c = UserNetConfig { hostfwd: vec!["tcp:127.0.0.1:0-:23".into()], ..cfg() };
    let mut g = Guest::new(&c);
    let addr = g.net.hostfwd_addrs()[0];
    assert_ne!(addr.port(), 0);
    g.arp_for(GW);
    g.drain(10);
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(b"login: ").unwrap();
        let mut b = [0u8; 6];
        s.read_exact(&mut b).unwrap();
        b
    });
    let syn = g.wait(|f| tcp_of(f).is_some_and(|t| t.5 & TCP_SYN != 0)).expect("SYN to the guest");
    let (p, sport, dport, isn, _, flags, _, _) = tcp_of(&syn).unwrap();
    assert_eq!((p.src, p.dst, dport, flags), (GW, GUEST_IP, 23, TCP_SYN));
    assert_eq!(p.eth_dst, GUEST_MAC);
    let mut srv =
        GuestTcp { from: GUEST, sport: 23, dst: (GW, sport), seq: 9000, ack: isn.wrapping_add(1) };
    g.send(&tcp_frame(
        GUEST,
        g.gw_mac,
        23,
        (GW, sport),
        srv.seq,
        srv.ack,
        TCP_SYN | TCP_ACK,
        &[],
        true,
    ));
    srv.seq += 1;
    let (data, _) = srv.read(&mut g, 7);
    assert_eq!(data, b"login: ");
    srv.send(&mut g, b"root\r\n");
    assert_eq!(&client.join().unwrap(), b"root\r\n");
}

#[test]
fn hostfwd_tcp_guest_rst_resets_the_host_client() {
    let c = UserNetConfig { hostfwd: vec!["tcp:127.0.0.1:0-10.0.2.15:24".into()], ..cfg() };
    let mut g = Guest::new(&c);
    g.arp_for(GW);
    g.drain(10);
    let addr = g.net.hostfwd_addrs()[0];
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut b = [0u8; 1];
        s.read(&mut b)
    });
    let syn = g.wait(|f| tcp_of(f).is_some_and(|t| t.5 & TCP_SYN != 0)).expect("SYN");
    let (_, sport, _, isn, _, _, _, _) = tcp_of(&syn).unwrap();
    g.send(&tcp_frame(
        GUEST,
        g.gw_mac,
        24,
        (GW, sport),
        0,
        isn.wrapping_add(1),
        TCP_RST | TCP_ACK,
        &[],
        false,
    ));
    g.drain(20);
    let r = client.join().unwrap();
    assert!(matches!(r, Ok(0)) || r.is_err(), "{r:?}");
    assert_eq!(gauge(&g, "tcp_flows_open"), 0);
}

/// A guest behind a UDP forward to its port 5353 (the first hostfwd rule), and a host
/// client that has sent "q" through it: returns the client and the frame the guest got.
fn datagram_through_udp_forward(g: &mut Guest, client_timeout: Duration) -> (UdpSocket, Parsed) {
    g.arp_for(GW);
    g.drain(10);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(client_timeout)).unwrap();
    client.send_to(b"q", g.net.hostfwd_addrs()[0]).unwrap();
    let f =
        g.wait(|f| parse(f).is_some_and(|p| p.proto == IPPROTO_UDP)).expect("datagram to guest");
    (client, parse(&f).unwrap())
}

#[test]
fn hostfwd_udp_round_trip() {
    let c = UserNetConfig { hostfwd: vec!["udp:127.0.0.1:0-:5353".into()], ..cfg() };
    let mut g = Guest::new(&c);
    let (client, p) = datagram_through_udp_forward(&mut g, WAIT);
    let addr = g.net.hostfwd_addrs()[0];
    let udp = UdpPacket::new(&p.l4).unwrap();
    assert_eq!((p.src, p.dst, udp.dst_port(), udp.payload()), (GW, GUEST_IP, 5353, &b"q"[..]));
    let peer_port = udp.src_port();
    g.udp(5353, (GW, peer_port), b"answer");
    let mut b = [0u8; 16];
    let (n, from) = client.recv_from(&mut b).unwrap();
    assert_eq!((&b[..n], from), (&b"answer"[..], std::net::SocketAddr::V4(addr)));
}

#[test]
fn hostfwd_port_in_use_is_a_startup_error_naming_the_rule() {
    let (_busy, port) = tcp_listener();
    let rule = format!("tcp:127.0.0.1:{port}-:22");
    let err = UserNet::new(&UserNetConfig { hostfwd: vec![rule.clone()], ..cfg() })
        .err()
        .expect("bind must fail");
    let msg = err.to_string();
    assert!(msg.contains(&rule) && msg.contains("in use"), "{msg}");
}

// ---------------------------------------------------------------------------------------
// restrict and host_loopback

#[test]
fn restrict_blocks_host_loopback_and_dns_but_not_forwards() {
    let (listener, port) = tcp_listener_nonblocking();
    let (dns, _) = udp_server_nonblocking();
    let c = UserNetConfig {
        restrict: true,
        dns_upstream: Some(dns.local_addr().unwrap().to_string()),
        hostfwd: vec!["tcp:127.0.0.1:0-:22".into()],
        ..Default::default()
    };
    let mut g = Guest::new(&c);
    g.send(&tcp_frame(GUEST, g.gw_mac, 45000, (GW, port), 1, 0, TCP_SYN, &[], true));
    g.udp(45001, (DNS, 53), b"query");
    g.udp(45002, (GW, port), b"udp");
    g.udp(45003, (Ipv4Addr::new(192, 0, 2, 1), 53), b"outside");
    assert!(g.drain(50).is_empty());
    assert!(listener.accept().is_err(), "no connection reached the host");
    assert!(dns.recv(&mut [0u8; 16]).is_err(), "no query reached the resolver");
    assert_eq!(g.net.dropped(DropReason::Restricted), 4);
    // Forwards still work.
    let addr = g.net.hostfwd_addrs()[0];
    let _client = TcpStream::connect(addr).unwrap();
    g.wait(|f| tcp_of(f).is_some_and(|t| t.5 == TCP_SYN)).expect("forwarded SYN to the guest");
}

#[test]
fn host_loopback_switch_off_refuses_the_host_address() {
    let (listener, port) = tcp_listener_nonblocking();
    let mut g = Guest::new(&UserNetConfig { host_loopback: false, ..cfg() });
    g.send(&tcp_frame(GUEST, g.gw_mac, 45010, (GW, port), 1, 0, TCP_SYN, &[], true));
    let f = g.wait(|f| tcp_of(f).is_some()).expect("RST");
    assert_eq!(tcp_of(&f).unwrap().5 & TCP_RST, TCP_RST);
    assert!(listener.accept().is_err());
    assert_eq!(g.net.dropped(DropReason::HostLoopbackDisabled), 1);
}

#[test]
fn guest_may_not_address_host_loopback_directly() {
    let (server, port) = udp_server_nonblocking();
    let mut g = Guest::new(&UserNetConfig { host_loopback: false, ..cfg() });
    g.udp(45020, (Ipv4Addr::LOCALHOST, port), b"sneaky");
    g.drain(20);
    assert!(server.recv(&mut [0u8; 8]).is_err());
    assert_eq!(g.net.dropped(DropReason::MartianDestination), 1);
}

// ---------------------------------------------------------------------------------------
// Routed guests: a guest forwards for a LAN behind it without masquerading, so the LAN's
// addresses arrive as sources, all from the router guest's MAC.

/// Every IPv4 frame the NAT produced so far went to `to` (address and MAC).
fn all_ipv4_frames_went_to(g: &Guest, to: Sender, proto: u8) -> usize {
    let frames: Vec<Parsed> =
        g.seen.iter().filter_map(parse).filter(|p| p.proto == proto).collect();
    for p in &frames {
        assert_eq!((p.dst, p.eth_dst), (to.ip, to.mac), "a reply went astray");
    }
    frames.len()
}

#[test]
fn routed_host_tcp_exchange_through_a_router_guest() {
    let (server, port) = tcp_server(move |mut s, _| {
        let mut req = [0u8; 16];
        s.read_exact(&mut req).unwrap();
        s.write_all(b"HTTP/1.0 200 OK\r\n\r\nrouted").unwrap();
    });
    let mut g = Guest::new(&cfg());
    // The router's NAT-side address is known before its LAN's traffic arrives.
    g.arp_for(GW);
    g.drain(10);
    g.seen.clear();
    let mut c = GuestTcp::connect_from(&mut g, ROUTED, 42100, (GW, port)).expect("handshake");
    c.send(&mut g, b"GET / HTTP/1.0\r\n");
    let (data, fin) = c.read(&mut g, 100);
    assert!(fin, "server's FIN reached the routed host");
    assert_eq!(data, b"HTTP/1.0 200 OK\r\n\r\nrouted");
    c.fin(&mut g);
    server.join().unwrap();
    assert!(all_ipv4_frames_went_to(&g, ROUTED, IPPROTO_TCP) >= 3);
    assert!(g.seen.iter().filter_map(parse).all(|p| p.src == GW));
    assert_eq!(g.net.guest_ip(), Some(GUEST_IP), "routed traffic is not the guest's identity");
    assert!(gauge(&g, "routed_in") >= 4);
    assert_eq!(g.net.dropped(DropReason::BadSource), 0);
    let deadline = Instant::now() + WAIT;
    while gauge(&g, "tcp_flows_open") != 0 && Instant::now() < deadline {
        g.drain(20);
    }
    assert_eq!(gauge(&g, "tcp_flows_open"), 0, "flow closed after both FINs");
}

#[test]
fn routed_host_udp_exchange_through_a_router_guest() {
    let (server, port) = udp_server();
    let c = UserNetConfig { hostfwd: vec!["tcp:127.0.0.1:0-:22".into()], ..cfg() };
    let mut g = Guest::new(&c);
    g.arp_for(GW);
    g.drain(10);
    g.seen.clear();
    let f = udp_frame_via(ROUTER_MAC, g.gw_mac, (ROUTED.ip, 43100), (GW, port), b"routed ping");
    g.send(&f);
    let mut b = [0u8; 64];
    let (n, routed_peer) = server.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], b"routed ping");
    server.send_to(b"routed pong", routed_peer).unwrap();
    let f = g.wait(|f| parse(f).is_some_and(|p| p.proto == IPPROTO_UDP)).expect("reply");
    let p = parse(&f).unwrap();
    assert_eq!((p.src, p.dst, p.eth_dst), (GW, ROUTED.ip, ROUTER_MAC));
    let udp = UdpPacket::new(&p.l4).unwrap();
    assert_eq!((udp.src_port(), udp.dst_port(), udp.payload()), (port, 43100, &b"routed pong"[..]));

    // The attached guest with the same port is a flow of its own.
    g.udp(43100, (GW, port), b"attached ping");
    let (n, guest_peer) = server.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], b"attached ping");
    assert_ne!(guest_peer, routed_peer);
    server.send_to(b"attached pong", guest_peer).unwrap();
    let f = g.wait(|f| parse(f).is_some_and(|p| p.proto == IPPROTO_UDP)).expect("reply");
    let p = parse(&f).unwrap();
    assert_eq!((p.dst, p.eth_dst), (GUEST_IP, GUEST_MAC));
    assert_eq!(gauge(&g, "udp_flows_open"), 2);

    // Port forwards still go to the attached guest.
    let _client = TcpStream::connect(g.net.hostfwd_addrs()[0]).unwrap();
    let syn = g.wait(|f| tcp_of(f).is_some_and(|t| t.5 == TCP_SYN)).expect("forwarded SYN");
    let (p, _, dport, _, _, _, _, _) = tcp_of(&syn).unwrap();
    assert_eq!((p.dst, p.eth_dst, dport), (GUEST_IP, GUEST_MAC, 22));
    assert_eq!(g.net.guest_ip(), Some(GUEST_IP));
}

#[test]
fn routed_host_pings_the_gateway_through_a_router_guest() {
    let mut g = Guest::new(&cfg());
    g.send(&icmp_echo(ROUTED, g.gw_mac, GW, 0x99, 1, b"routed"));
    let f = g.wait(|f| parse(f).is_some_and(|p| p.proto == IPPROTO_ICMP)).expect("echo reply");
    let p = parse(&f).unwrap();
    assert_eq!((p.src, p.dst, p.eth_dst), (GW, ROUTED.ip, ROUTER_MAC));
    assert_eq!(g.net.guest_ip(), None, "a routed source is never taken as the guest's address");
}

#[test]
fn routed_host_cannot_answer_a_udp_forward_in_the_guests_name() {
    let c = UserNetConfig { hostfwd: vec!["udp:127.0.0.1:0-:5353".into()], ..cfg() };
    let mut g = Guest::new(&c);
    let (client, p) = datagram_through_udp_forward(&mut g, Duration::from_millis(200));
    let peer_port = UdpPacket::new(&p.l4).unwrap().src_port();
    let forged = udp_frame_via(ROUTER_MAC, g.gw_mac, (ROUTED.ip, 5353), (GW, peer_port), b"x");
    g.send(&forged);
    g.drain(20);
    // It may reach the peer's port as any datagram to host loopback would, but never from
    // the forward's address, which speaks for the guest.
    if let Ok((_, from)) = client.recv_from(&mut [0u8; 8]) {
        assert_ne!(from, std::net::SocketAddr::V4(g.net.hostfwd_addrs()[0]));
    }
}

#[test]
fn rejected_sources_are_dropped_and_counted() {
    let (server, port) = udp_server_nonblocking();
    let mut g = Guest::new(&cfg());
    let bad = [
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::new(0, 1, 2, 3),
        Ipv4Addr::LOCALHOST,
        Ipv4Addr::new(127, 9, 9, 9),
        Ipv4Addr::new(224, 0, 0, 1),
        Ipv4Addr::new(239, 255, 255, 250),
        Ipv4Addr::BROADCAST,
        Ipv4Addr::new(240, 0, 0, 1),
        Ipv4Addr::new(169, 254, 1, 1),
        GW,
        DNS,
        Ipv4Addr::new(10, 0, 2, 0),
        Ipv4Addr::new(10, 0, 2, 255),
    ];
    for (i, src) in bad.iter().enumerate() {
        let sport = 44000 + i as u16;
        g.send(&udp_frame_via(ROUTER_MAC, g.gw_mac, (*src, sport), (GW, port), b"bad"));
        let from = Sender { mac: ROUTER_MAC, ip: *src };
        g.send(&tcp_frame(from, g.gw_mac, sport, (GW, port), 1, 0, TCP_SYN, &[], true));
        g.send(&icmp_echo(from, g.gw_mac, GW, 1, 1, b"bad"));
    }
    assert!(g.drain(20).is_empty(), "no answer to a rejected source");
    assert!(server.recv(&mut [0u8; 16]).is_err());
    assert_eq!(g.net.dropped(DropReason::BadSource), 3 * bad.len() as u64);
    assert_eq!(gauge(&g, "udp_flows_open") + gauge(&g, "tcp_flows_open"), 0);
    assert_eq!(gauge(&g, "routed_in"), 0);
    assert_eq!(g.net.guest_ip(), None);
}

#[test]
fn restrict_blocks_routed_hosts() {
    let (listener, port) = tcp_listener_nonblocking();
    let c =
        UserNetConfig { restrict: true, hostfwd: vec!["udp:127.0.0.1:0-:5353".into()], ..cfg() };
    let mut g = Guest::new(&c);
    let (client, p) = datagram_through_udp_forward(&mut g, Duration::from_millis(200));
    let peer_port = UdpPacket::new(&p.l4).unwrap().src_port();
    g.send(&tcp_frame(ROUTED, g.gw_mac, 45100, (GW, port), 1, 0, TCP_SYN, &[], true));
    g.send(&udp_frame_via(ROUTER_MAC, g.gw_mac, (ROUTED.ip, 5353), (GW, peer_port), b"x"));
    g.send(&icmp_echo(ROUTED, g.gw_mac, GW, 1, 1, b"x"));
    g.send(&udp_frame_via(ROUTER_MAC, g.gw_mac, (ROUTED.ip, 45101), (DNS, 53), b"q"));
    assert!(g.drain(20).is_empty(), "restrict answers no routed host");
    assert!(listener.accept().is_err());
    assert!(client.recv_from(&mut [0u8; 8]).is_err());
    assert_eq!(g.net.dropped(DropReason::Restricted), 4);
    assert_eq!(gauge(&g, "routed_in"), 0);
    assert_eq!(gauge(&g, "tcp_flows_open") + gauge(&g, "udp_flows_open"), 0);
}

// ---------------------------------------------------------------------------------------
// Hostile input: one test per libslirp CVE class, and then some.

fn ipv4_udp_to_gw(g: &Guest, port: u16, payload: &[u8]) -> Vec<u8> {
    udp_frame(g.gw_mac, (GUEST_IP, 46000), (GW, port), payload)
}

fn fix_ip_csum(frame: &mut [u8]) {
    let hl = (((frame[14] & 0x0f) as usize) * 4).min(frame.len() - 14);
    frame[24] = 0;
    frame[25] = 0;
    let c = checksum(&frame[14..14 + hl]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn hostile_ip_fragments_are_dropped_not_reassembled() {
    let (server, port) = udp_server_nonblocking();
    let mut g = Guest::new(&cfg());
    let mut first = ipv4_udp_to_gw(&g, port, &[0u8; 64]);
    first[20] = 0x20; // MF
    fix_ip_csum(&mut first);
    g.send(&first);
    let mut later = ipv4_udp_to_gw(&g, port, &[0u8; 64]);
    later[20] = 0x00;
    later[21] = 0x08; // offset 64 bytes, last fragment
    fix_ip_csum(&mut later);
    g.send(&later);
    let mut overlapping = ipv4_udp_to_gw(&g, port, &[0u8; 64]);
    overlapping[20] = 0x3f;
    overlapping[21] = 0xff; // MF + maximal offset
    fix_ip_csum(&mut overlapping);
    g.send(&overlapping);
    assert!(g.drain(20).is_empty());
    assert!(server.recv(&mut [0u8; 128]).is_err());
    assert_eq!(g.net.dropped(DropReason::IpFragment), 3);
}

#[test]
fn hostile_ip_options_are_skipped_by_length() {
    let (server, port) = udp_server();
    let mut g = Guest::new(&cfg());
    let plain = ipv4_udp_to_gw(&g, port, b"with-options");
    // Insert 8 bytes of options (NOP NOP, a router alert, EOL) after the IP header.
    let mut f = plain[..34].to_vec();
    f.extend_from_slice(&[1, 1, 148, 4, 0, 0, 0, 0]);
    f.extend_from_slice(&plain[34..]);
    f[14] = 0x47;
    let total = (f.len() - 14) as u16;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    fix_ip_csum(&mut f);
    g.send(&f);
    let mut b = [0u8; 64];
    let (n, _) = server.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], b"with-options");
    // Options claiming more than the frame holds.
    let mut bad = f.clone();
    bad[14] = 0x4f;
    bad.truncate(14 + 40);
    bad[16..18].copy_from_slice(&40u16.to_be_bytes());
    fix_ip_csum(&mut bad);
    g.send(&bad);
    assert_eq!(g.net.dropped(DropReason::Ipv4Malformed), 1);
    assert_eq!(gauge(&g, "ip_options_seen"), 1);
}

#[test]
fn hostile_truncated_and_oversized_frames() {
    let mut g = Guest::new(&cfg());
    let frame = ipv4_udp_to_gw(&g, 7, b"0123456789");
    for cut in 0..frame.len() {
        g.send(&frame[..cut]);
    }
    assert!(g.drain(20).is_empty());
    assert_eq!(g.net.dropped(DropReason::EthTruncated), 14);
    assert!(g.net.dropped(DropReason::Ipv4Malformed) >= 20);
    // IP total length beyond the frame.
    let mut long = frame.clone();
    long[16..18].copy_from_slice(&1000u16.to_be_bytes());
    fix_ip_csum(&mut long);
    let before = g.net.dropped(DropReason::Ipv4Malformed);
    g.send(&long);
    assert_eq!(g.net.dropped(DropReason::Ipv4Malformed), before + 1);
    // A frame larger than any NIC could hand us.
    let mut huge = frame.clone();
    huge.resize(MAX_FRAME_LEN + 1, 0);
    g.send(&huge);
    assert_eq!(g.net.dropped(DropReason::Oversized), 1);
    // A truncated TCP header.
    let mut tcp = tcp_frame(GUEST, g.gw_mac, 1, (GW, 2), 0, 0, TCP_SYN, &[], false);
    tcp[14 + 20 + 12] = 0xf0; // 60-byte header in a 20-byte segment
    g.send(&tcp);
    assert_eq!(g.net.dropped(DropReason::L4Malformed), 1);
}

#[test]
fn hostile_truncated_udp_tftp_and_bootp() {
    let (server, _) = udp_server_nonblocking();
    let mut g = Guest::new(&cfg());
    // UDP length field larger than the datagram, to the TFTP port.
    let mut tftp = ipv4_udp_to_gw(&g, 69, b"\x00\x01file\x00octet\x00");
    tftp[38..40].copy_from_slice(&500u16.to_be_bytes());
    g.send(&tftp);
    // UDP length field below the header size.
    let mut short = ipv4_udp_to_gw(&g, 69, b"xx");
    short[38..40].copy_from_slice(&4u16.to_be_bytes());
    g.send(&short);
    assert_eq!(g.net.dropped(DropReason::L4Malformed), 2);
    // BOOTP cut short at every length below the fixed header + cookie.
    let full = dhcp_msg(1, &[], true);
    for cut in [0, 1, 43, 235, 239, 240, 241] {
        dhcp_send(&mut g, &full[..cut]);
    }
    assert!(g.drain(20).is_empty());
    assert_eq!(g.net.dropped(DropReason::DhcpMalformed), 7);
    assert!(server.recv(&mut [0u8; 8]).is_err());
}

#[test]
fn hostile_dhcp_options() {
    let mut g = Guest::new(&cfg());
    // Overlong option: claims 200 bytes, 3 present.
    dhcp_send(&mut g, &dhcp_msg(1, &[12, 200, b'a', b'b', b'c'], false));
    // Requested-IP with a wrong length.
    dhcp_send(&mut g, &dhcp_msg(1, &[50, 2, 10, 0, 255], true));
    // Option code with no length byte at the very end.
    dhcp_send(&mut g, &dhcp_msg(1, &[61], false));
    assert!(g.drain(20).is_empty());
    assert_eq!(g.net.dropped(DropReason::DhcpMalformed), 3);
    // Missing END is tolerated: the message type is there.
    dhcp_send(&mut g, &dhcp_msg(1, &[0, 0, 0], false));
    let f = g.wait(|f| dhcp_reply(f).is_some()).expect("OFFER despite missing END");
    assert_eq!(dhcp_reply(&f).unwrap().0, 2);
}

#[test]
fn hostile_tcp_urgent_data_is_delivered_inline() {
    let (server, port) = tcp_server(move |mut s, _| {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).unwrap();
        b
    });
    let mut g = Guest::new(&cfg());
    let c = GuestTcp::connect(&mut g, 47000, (GW, port)).expect("handshake");
    // URG with an urgent pointer far beyond the payload.
    let mut f = c.segment(g.gw_mac, TCP_ACK | TCP_URG, b"urgent!!");
    f[14 + 20 + 18..14 + 20 + 20].copy_from_slice(&0xffffu16.to_be_bytes());
    f[14 + 20 + 16] = 0;
    f[14 + 20 + 17] = 0;
    let ip = Ipv4Packet::new(&f[14..]).unwrap();
    let (src, dst) = (ip.src(), ip.dst());
    let c16 =
        !csum_fold(csum_partial(&f[34..], pseudo_header_sum(src, dst, IPPROTO_TCP, f.len() - 34)));
    f[14 + 20 + 16..14 + 20 + 18].copy_from_slice(&c16.to_be_bytes());
    g.send(&f);
    assert_eq!(&server.join().unwrap(), b"urgent!!");
    assert_eq!(gauge(&g, "tcp_urgent_seen"), 1);
}

#[test]
fn hostile_source_zero() {
    let (server, port) = udp_server_nonblocking();
    let mut g = Guest::new(&cfg());
    // 0.0.0.0:0 as the source of UDP and TCP (only DHCP may use 0.0.0.0, and only from 68).
    let f = udp_frame(g.gw_mac, (Ipv4Addr::UNSPECIFIED, 0), (GW, port), b"zero");
    g.send(&f);
    let f = udp_frame(g.gw_mac, (GUEST_IP, 0), (GW, port), b"port zero");
    g.send(&f);
    let mut t = tcp_frame(GUEST, g.gw_mac, 0, (GW, port), 0, 0, TCP_SYN, &[], false);
    t[26..30].copy_from_slice(&[0, 0, 0, 0]);
    fix_ip_csum(&mut t);
    g.send(&t); // bad TCP checksum now too, but the source check comes first
    let t = tcp_frame(GUEST, g.gw_mac, 0, (GW, port), 0, 0, TCP_SYN, &[], false);
    g.send(&t);
    // Sources that are ours or the subnet's broadcast.
    let f = udp_frame(g.gw_mac, (GW, 1000), (GW, port), b"spoof");
    g.send(&f);
    let f = udp_frame(g.gw_mac, (Ipv4Addr::new(10, 0, 2, 255), 1000), (GW, port), b"bcast");
    g.send(&f);
    assert!(g.drain(20).is_empty());
    assert!(server.recv(&mut [0u8; 16]).is_err());
    assert_eq!(g.net.dropped(DropReason::BadSource), 6);
    assert_eq!(gauge(&g, "udp_flows_open") + gauge(&g, "tcp_flows_open"), 0);
}

#[test]
fn hostile_bad_checksums_are_dropped() {
    let mut g = Guest::new(&cfg());
    let mut f = ipv4_udp_to_gw(&g, 9, b"abc");
    f[40] ^= 0x55;
    g.send(&f);
    let mut f = ipv4_udp_to_gw(&g, 9, b"abc");
    f[24] ^= 0x55;
    g.send(&f);
    assert_eq!(g.net.dropped(DropReason::L4BadChecksum), 1);
    assert_eq!(g.net.dropped(DropReason::Ipv4BadChecksum), 1);
}

#[test]
fn counters_are_filled() {
    let mut g = Guest::new(&cfg());
    g.arp_for(GW);
    g.send(&[0u8; 3]);
    g.drain(20);
    let c = g.net.counters();
    assert_eq!((c.tx_frames, c.rx_frames), (2, 1));
    assert_eq!(c.rx_bytes, 42);
    assert!(c.drops.contains(&("eth_truncated", 1)));
    for name in [
        "tcp_flows_open",
        "udp_flows_open",
        "icmp_flows_open",
        "tcp_half_open",
        "tcp_in",
        "udp_out",
    ] {
        assert!(c.gauges.iter().any(|(n, _)| *n == name), "{name}");
    }
}

// ---------------------------------------------------------------------------------------
// Limits and failures

/// Runs `f` on a thread moved into a fresh network namespace: its sockets see only a
/// private, down loopback and no routes, so nothing can leave. Skips without root.
fn in_private_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: plain syscall; affects only this thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!("no CAP_SYS_ADMIN for a private netns; skipping");
            return;
        }
        f()
    })
    .join()
    .unwrap();
}

#[test]
fn tcp_to_an_unreachable_network_gets_icmp_unreachable() {
    in_private_netns(|| {
        let mut g = Guest::new(&cfg());
        // No route exists in the private namespace: connect() fails with ENETUNREACH.
        let dst = (Ipv4Addr::new(192, 0, 2, 1), 80);
        g.send(&tcp_frame(GUEST, g.gw_mac, 48000, dst, 1, 0, TCP_SYN, &[], true));
        let f = g
            .wait(|f| parse(f).is_some_and(|p| p.proto == IPPROTO_ICMP))
            .expect("ICMP unreachable");
        let p = parse(&f).unwrap();
        let icmp = IcmpPacket::new(&p.l4).unwrap();
        assert_eq!(icmp.icmp_type(), ICMP_DEST_UNREACH);
        assert!(matches!(icmp.code(), ICMP_NET_UNREACH | ICMP_HOST_UNREACH));
        assert!(icmp.checksum_ok());
        // The quote is the guest's SYN: its IP header and ports.
        assert_eq!(icmp.data().len(), 28);
        assert_eq!(&icmp.data()[20..22], &48000u16.to_be_bytes());
        assert_eq!(&icmp.data()[16..20], &[192, 0, 2, 1]);
        assert_eq!(p.src, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(gauge(&g, "tcp_flows_open"), 0);
    });
}

#[test]
fn half_open_cap_drops_extra_syns() {
    // A listener that never accepts and a backlog of 0: once its queue is full, further
    // connects stay pending (their SYNs are dropped), i.e. half-open.
    let (stuck, port) = tcp_listener();
    // SAFETY: plain syscall on a socket we own.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&stuck), 0) };
    let _filler1 = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _filler2 = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    );
    let mut g = Guest::new(&UserNetConfig { max_half_open: 1, ..cfg() });
    g.send(&tcp_frame(GUEST, g.gw_mac, 48010, (GW, port), 1, 0, TCP_SYN, &[], true));
    g.drain(50);
    if gauge(&g, "tcp_half_open") != 1 {
        eprintln!("kernel completed the connect despite the full backlog; skipping");
        return;
    }
    g.send(&tcp_frame(GUEST, g.gw_mac, 48011, (GW, port), 1, 0, TCP_SYN, &[], true));
    g.drain(20);
    assert_eq!(g.net.dropped(DropReason::HalfOpenLimit), 1);
    assert_eq!(gauge(&g, "tcp_flows_open"), 1);
}

#[test]
fn idle_udp_flows_expire() {
    let (_server, port) = udp_server();
    let mut g = Guest::new(&UserNetConfig { udp_idle_timeout_secs: 1, ..cfg() });
    g.udp(48020, (GW, port), b"x");
    assert_eq!(gauge(&g, "udp_flows_open"), 1);
    let deadline = Instant::now() + Duration::from_secs(3);
    while gauge(&g, "udp_flows_open") != 0 && Instant::now() < deadline {
        g.drain(100);
    }
    assert_eq!(gauge(&g, "udp_flows_open"), 0);
}

#[test]
fn ping_elsewhere_is_restricted_in_restrict_mode() {
    let mut g = Guest::new(&UserNetConfig { restrict: true, ..cfg() });
    g.send(&icmp_echo_frame(g.gw_mac, Ipv4Addr::new(192, 0, 2, 1), 1, 1, b"x"));
    assert!(g.drain(20).is_empty());
    assert_eq!(g.net.dropped(DropReason::Restricted), 1);
    assert_eq!(gauge(&g, "icmp_flows_open"), 0);
}

#[test]
fn ping_elsewhere_goes_through_an_icmp_socket() {
    in_private_netns(|| {
        // Loopback up inside the private namespace gives a reachable, private target.
        let st = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status();
        if !matches!(st, Ok(s) if s.success()) {
            eprintln!("cannot bring lo up; skipping");
            return;
        }
        let out = std::process::Command::new("ip")
            .args(["addr", "add", "192.0.2.77/32", "dev", "lo"])
            .status();
        if !matches!(out, Ok(s) if s.success()) {
            eprintln!("cannot add an address; skipping");
            return;
        }
        let mut g = Guest::new(&cfg());
        if IcmpMode::detect() == IcmpMode::Unavailable {
            eprintln!("no ICMP sockets allowed; skipping");
            return;
        }
        let dst = Ipv4Addr::new(192, 0, 2, 77);
        g.send(&icmp_echo_frame(g.gw_mac, dst, 0x3131, 9, b"through a socket"));
        let f = g.wait(|f| parse(f).is_some_and(|p| p.proto == IPPROTO_ICMP)).expect("echo reply");
        let p = parse(&f).unwrap();
        let icmp = IcmpPacket::new(&p.l4).unwrap();
        assert_eq!((p.src, p.dst), (dst, GUEST_IP));
        assert_eq!((icmp.icmp_type(), icmp.ident(), icmp.seq_no()), (ICMP_ECHO_REPLY, 0x3131, 9));
        assert_eq!(icmp.data(), b"through a socket");
        assert!(icmp.checksum_ok());
        assert_eq!(gauge(&g, "icmp_flows_open"), 1);

        // A routed host using the same echo id is a flow of its own, answered at the
        // router's MAC.
        g.send(&icmp_echo(ROUTED, g.gw_mac, dst, 0x3131, 10, b"routed"));
        let f = g.wait(|f| parse(f).is_some_and(|p| p.proto == IPPROTO_ICMP)).expect("echo reply");
        let p = parse(&f).unwrap();
        let icmp = IcmpPacket::new(&p.l4).unwrap();
        assert_eq!((p.src, p.dst, p.eth_dst), (dst, ROUTED.ip, ROUTER_MAC));
        assert_eq!((icmp.ident(), icmp.seq_no(), icmp.data()), (0x3131, 10, &b"routed"[..]));
        assert_eq!(gauge(&g, "icmp_flows_open"), 2);
    });
}

#[test]
fn small_segments_are_acked_after_a_short_delay_without_a_reply() {
    let (server, port) = tcp_server(move |mut s, _| {
        let mut b = [0u8; 3];
        s.read_exact(&mut b).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let mut g = Guest::new(&cfg());
    let mut c = GuestTcp::connect(&mut g, 48100, (GW, port)).expect("handshake");
    g.drain(0);
    c.send(&mut g, b"abc");
    let sent = Instant::now();
    let ack =
        g.wait(|f| tcp_of(f).is_some_and(|t| t.4 == c.seq && t.7.is_empty())).expect("delayed ACK");
    assert!(sent.elapsed() < Duration::from_millis(100));
    assert_eq!(tcp_of(&ack).unwrap().5, TCP_ACK);
    server.join().unwrap();
}

#[test]
fn unacknowledged_data_is_resent_after_the_timeout() {
    let (server, port) = tcp_server(move |mut s, _| {
        s.write_all(b"are you there?").unwrap();
        std::thread::sleep(Duration::from_millis(2500));
    });
    let mut g = Guest::new(&cfg());
    let c = GuestTcp::connect(&mut g, 48200, (GW, port)).expect("handshake");
    let first = g.wait(|f| tcp_of(f).is_some_and(|t| !t.7.is_empty())).expect("data");
    let sent = Instant::now();
    assert_eq!(tcp_of(&first).unwrap().3, c.ack);
    // Never ACK it: the NAT must send it again from the host socket's queue.
    let again = g.wait(|f| tcp_of(f).is_some_and(|t| !t.7.is_empty())).expect("resent after RTO");
    assert!(sent.elapsed() >= Duration::from_millis(900));
    assert_eq!(tcp_of(&again).unwrap().3, c.ack);
    assert_eq!(tcp_of(&again).unwrap().7, b"are you there?");
    server.join().unwrap();
}

#[test]
fn zero_window_is_probed() {
    let (server, port) = tcp_server(move |mut s, _| {
        std::thread::sleep(Duration::from_millis(100));
        s.write_all(b"waiting for a window").unwrap();
        std::thread::sleep(Duration::from_millis(2500));
    });
    let mut g = Guest::new(&cfg());
    let c = GuestTcp::connect(&mut g, 48300, (GW, port)).expect("handshake");
    // Close the window.
    let mut f = c.segment(g.gw_mac, TCP_ACK, &[]);
    f[14 + 20 + 14] = 0;
    f[14 + 20 + 15] = 0;
    super::fuzz::fix_checksums(&mut f);
    g.send(&f);
    let probe =
        g.wait(|f| tcp_of(f).is_some_and(|t| t.3 == c.ack.wrapping_sub(1))).expect("window probe");
    let t = tcp_of(&probe).unwrap();
    assert!(t.7.is_empty());
    assert!(
        !g.seen.iter().filter_map(tcp_of).any(|t| !t.7.is_empty()),
        "no data into a zero window"
    );
    server.join().unwrap();
}
