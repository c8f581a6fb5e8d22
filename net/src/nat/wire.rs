//! Checked, zero-copy views over Ethernet/ARP/IPv4/UDP/TCP/ICMP bytes, and writers for the
//! frames the NAT builds. Every view takes its lengths from the bytes it was given: a
//! header field may shrink a view (Ethernet padding) but never stretch it past the buffer.

use std::net::Ipv4Addr;

use thiserror::Error;

use crate::mac::MacAddr;

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    #[error("buffer shorter than the fixed header")]
    Truncated,
    #[error("header field is inconsistent with the buffer")]
    Malformed,
    #[error("unsupported header value")]
    Unsupported,
}

pub const ETH_HDR_LEN: usize = 14;
pub const IPV4_HDR_LEN: usize = 20;
pub const UDP_HDR_LEN: usize = 8;
pub const TCP_HDR_LEN: usize = 20;
pub const ICMP_HDR_LEN: usize = 8;
pub const ARP_LEN: usize = 28;
/// Where the checksum field sits in a UDP and a TCP header.
pub const UDP_CSUM_OFFSET: u16 = 6;
pub const TCP_CSUM_OFFSET: u16 = 16;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

fn be16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(s) => u16::from_be_bytes([s[0], s[1]]),
        None => 0,
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at + 4) {
        Some(s) => u32::from_be_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::from(be32(b, at))
}

fn mac_at(b: &[u8], at: usize) -> MacAddr {
    let mut m = [0u8; 6];
    if let Some(s) = b.get(at..at + 6) {
        m.copy_from_slice(s);
    }
    MacAddr(m)
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    if let Some(s) = b.get_mut(at..at + 2) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    if let Some(s) = b.get_mut(at..at + 4) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

fn put_slice(b: &mut [u8], at: usize, v: &[u8]) {
    if let Some(s) = b.get_mut(at..at + v.len()) {
        s.copy_from_slice(v);
    }
}

// ---------------------------------------------------------------------------------------
// Internet checksum

/// Ones'-complement sum of `data`, not yet folded or inverted, in network byte order
/// semantics. Sums 32-bit native words into a u64, which is equivalent modulo 0xffff.
pub fn csum_partial(data: &[u8], initial: u64) -> u64 {
    let mut acc: u64 = initial;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let (lo, hi) = (w & 0xffff_ffff, w >> 32);
        acc = acc.wrapping_add(lo).wrapping_add(hi);
    }
    let rest = chunks.remainder();
    let mut words = rest.chunks_exact(2);
    for c in &mut words {
        acc = acc.wrapping_add(u16::from_ne_bytes([c[0], c[1]]) as u64);
    }
    if let [last] = words.remainder() {
        // An odd trailing byte is the high byte of a zero-padded big-endian word.
        acc = acc.wrapping_add(u16::from_ne_bytes([*last, 0]) as u64);
    }
    acc
}

/// Folds a partial sum to 16 bits, in network byte order, without inverting.
pub fn csum_fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    u16::from_be(acc as u16)
}

/// The complemented checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !csum_fold(csum_partial(data, 0))
}

/// Partial sum of the IPv4 pseudo header.
pub fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) -> u64 {
    let mut ph = [0u8; 12];
    ph[0..4].copy_from_slice(&src.octets());
    ph[4..8].copy_from_slice(&dst.octets());
    ph[9] = proto;
    ph[10..12].copy_from_slice(&(l4_len as u16).to_be_bytes());
    csum_partial(&ph, 0)
}

/// True when the L4 checksum over `l4` (header + payload) with its pseudo header is valid.
pub fn l4_checksum_ok(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> bool {
    let acc = csum_partial(l4, pseudo_header_sum(src, dst, proto, l4.len()));
    csum_fold(acc) == 0xffff
}

// ---------------------------------------------------------------------------------------
// Ethernet

#[derive(Clone, Copy)]
pub struct EthFrame<'a> {
    buf: &'a [u8],
}

impl<'a> EthFrame<'a> {
    pub fn new(buf: &'a [u8]) -> Result<Self, WireError> {
        if buf.len() < ETH_HDR_LEN {
            return Err(WireError::Truncated);
        }
        Ok(EthFrame { buf })
    }
    pub fn dst(&self) -> MacAddr {
        mac_at(self.buf, 0)
    }
    pub fn src(&self) -> MacAddr {
        mac_at(self.buf, 6)
    }
    pub fn ethertype(&self) -> u16 {
        be16(self.buf, 12)
    }
    pub fn payload(&self) -> &'a [u8] {
        self.buf.get(ETH_HDR_LEN..).unwrap_or(&[])
    }
}

pub fn write_eth(buf: &mut [u8], dst: MacAddr, src: MacAddr, ethertype: u16) {
    put_slice(buf, 0, &dst.0);
    put_slice(buf, 6, &src.0);
    put16(buf, 12, ethertype);
}

// ---------------------------------------------------------------------------------------
// ARP (Ethernet/IPv4 only)

pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

#[derive(Clone, Copy)]
pub struct ArpPacket<'a> {
    buf: &'a [u8],
}

impl<'a> ArpPacket<'a> {
    pub fn new(buf: &'a [u8]) -> Result<Self, WireError> {
        if buf.len() < ARP_LEN {
            return Err(WireError::Truncated);
        }
        if be16(buf, 0) != 1 || be16(buf, 2) != ETHERTYPE_IPV4 || buf[4] != 6 || buf[5] != 4 {
            return Err(WireError::Unsupported);
        }
        Ok(ArpPacket { buf })
    }
    pub fn op(&self) -> u16 {
        be16(self.buf, 6)
    }
    pub fn sender_mac(&self) -> MacAddr {
        mac_at(self.buf, 8)
    }
    pub fn sender_ip(&self) -> Ipv4Addr {
        ip_at(self.buf, 14)
    }
    pub fn target_mac(&self) -> MacAddr {
        mac_at(self.buf, 18)
    }
    pub fn target_ip(&self) -> Ipv4Addr {
        ip_at(self.buf, 24)
    }
}

/// Writes an Ethernet+ARP frame; returns its length.
#[allow(clippy::too_many_arguments)]
pub fn write_arp(
    buf: &mut [u8],
    eth_dst: MacAddr,
    op: u16,
    sha: MacAddr,
    spa: Ipv4Addr,
    tha: MacAddr,
    tpa: Ipv4Addr,
) -> usize {
    let len = ETH_HDR_LEN + ARP_LEN;
    if buf.len() < len {
        return 0;
    }
    write_eth(buf, eth_dst, sha, ETHERTYPE_ARP);
    let a = &mut buf[ETH_HDR_LEN..len];
    put16(a, 0, 1);
    put16(a, 2, ETHERTYPE_IPV4);
    a[4] = 6;
    a[5] = 4;
    put16(a, 6, op);
    put_slice(a, 8, &sha.0);
    put_slice(a, 14, &spa.octets());
    put_slice(a, 18, &tha.0);
    put_slice(a, 24, &tpa.octets());
    len
}

/// A broadcast ARP request: who has `tpa`? Tell `spa` at `sha`.
pub fn arp_request_frame(sha: MacAddr, spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut buf = vec![0u8; ETH_HDR_LEN + ARP_LEN];
    write_arp(&mut buf, MacAddr::BROADCAST, ARP_REQUEST, sha, spa, MacAddr([0; 6]), tpa);
    buf
}

// ---------------------------------------------------------------------------------------
// IPv4

#[derive(Clone, Copy)]
pub struct Ipv4Packet<'a> {
    /// Trimmed to the header's total length.
    buf: &'a [u8],
    header_len: usize,
}

impl<'a> Ipv4Packet<'a> {
    pub fn new(buf: &'a [u8]) -> Result<Self, WireError> {
        if buf.len() < IPV4_HDR_LEN {
            return Err(WireError::Truncated);
        }
        if buf[0] >> 4 != 4 {
            return Err(WireError::Unsupported);
        }
        let header_len = ((buf[0] & 0x0f) as usize) * 4;
        if header_len < IPV4_HDR_LEN || header_len > buf.len() {
            return Err(WireError::Malformed);
        }
        let total = be16(buf, 2) as usize;
        if total < header_len || total > buf.len() {
            return Err(WireError::Malformed);
        }
        Ok(Ipv4Packet { buf: &buf[..total], header_len })
    }
    pub fn header_len(&self) -> usize {
        self.header_len
    }
    pub fn header(&self) -> &'a [u8] {
        &self.buf[..self.header_len]
    }
    pub fn total_len(&self) -> usize {
        self.buf.len()
    }
    pub fn tos(&self) -> u8 {
        self.buf[1]
    }
    pub fn ident(&self) -> u16 {
        be16(self.buf, 4)
    }
    pub fn more_fragments(&self) -> bool {
        self.buf[6] & 0x20 != 0
    }
    pub fn frag_offset(&self) -> u16 {
        be16(self.buf, 6) & 0x1fff
    }
    pub fn is_fragment(&self) -> bool {
        self.more_fragments() || self.frag_offset() != 0
    }
    pub fn ttl(&self) -> u8 {
        self.buf[8]
    }
    pub fn protocol(&self) -> u8 {
        self.buf[9]
    }
    pub fn src(&self) -> Ipv4Addr {
        ip_at(self.buf, 12)
    }
    pub fn dst(&self) -> Ipv4Addr {
        ip_at(self.buf, 16)
    }
    pub fn has_options(&self) -> bool {
        self.header_len > IPV4_HDR_LEN
    }
    pub fn header_checksum_ok(&self) -> bool {
        checksum(self.header()) == 0
    }
    pub fn payload(&self) -> &'a [u8] {
        &self.buf[self.header_len..]
    }
    /// The header plus up to 8 payload bytes, as quoted in ICMP errors.
    pub fn icmp_quote(&self) -> &'a [u8] {
        let end = (self.header_len + 8).min(self.buf.len());
        &self.buf[..end]
    }
}

/// Writes a 20-byte IPv4 header (DF set) with a valid checksum at `buf[0..20]`.
pub fn write_ipv4(
    buf: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    payload_len: usize,
    ident: u16,
) {
    if buf.len() < IPV4_HDR_LEN {
        return;
    }
    let h = &mut buf[..IPV4_HDR_LEN];
    h[0] = 0x45;
    h[1] = 0;
    put16(h, 2, (IPV4_HDR_LEN + payload_len).min(0xffff) as u16);
    put16(h, 4, ident);
    put16(h, 6, 0x4000);
    h[8] = 64;
    h[9] = proto;
    put16(h, 10, 0);
    put_slice(h, 12, &src.octets());
    put_slice(h, 16, &dst.octets());
    let c = checksum(h);
    put16(h, 10, c);
}

// ---------------------------------------------------------------------------------------
// UDP

#[derive(Clone, Copy)]
pub struct UdpPacket<'a> {
    buf: &'a [u8],
}

impl<'a> UdpPacket<'a> {
    pub fn new(buf: &'a [u8]) -> Result<Self, WireError> {
        if buf.len() < UDP_HDR_LEN {
            return Err(WireError::Truncated);
        }
        let len = be16(buf, 4) as usize;
        if len < UDP_HDR_LEN || len > buf.len() {
            return Err(WireError::Malformed);
        }
        Ok(UdpPacket { buf: &buf[..len] })
    }
    pub fn src_port(&self) -> u16 {
        be16(self.buf, 0)
    }
    pub fn dst_port(&self) -> u16 {
        be16(self.buf, 2)
    }
    pub fn checksum(&self) -> u16 {
        be16(self.buf, 6)
    }
    pub fn bytes(&self) -> &'a [u8] {
        self.buf
    }
    pub fn payload(&self) -> &'a [u8] {
        &self.buf[UDP_HDR_LEN..]
    }
}

/// Writes Ethernet + IPv4 + UDP headers around a payload already placed at
/// `buf[42..42+payload_len]`; returns the frame length. `CsumMode::None` leaves the UDP
/// checksum 0 ("none"), which IPv4 allows.
#[allow(clippy::too_many_arguments)]
pub fn write_udp_frame(
    buf: &mut [u8],
    eth_dst: MacAddr,
    eth_src: MacAddr,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload_len: usize,
    csum: CsumMode,
) -> usize {
    let l4_len = UDP_HDR_LEN + payload_len;
    let total = ETH_HDR_LEN + IPV4_HDR_LEN + l4_len;
    if buf.len() < total || l4_len > 0xffff - IPV4_HDR_LEN {
        return 0;
    }
    write_eth(buf, eth_dst, eth_src, ETHERTYPE_IPV4);
    write_ipv4(&mut buf[ETH_HDR_LEN..], src.0, dst.0, IPPROTO_UDP, l4_len, 0);
    let u = &mut buf[ETH_HDR_LEN + IPV4_HDR_LEN..total];
    put16(u, 0, src.1);
    put16(u, 2, dst.1);
    put16(u, 4, l4_len as u16);
    put16(u, 6, 0);
    let ph = pseudo_header_sum(src.0, dst.0, IPPROTO_UDP, l4_len);
    match csum {
        CsumMode::Full => {
            let mut c = !csum_fold(csum_partial(u, ph));
            if c == 0 {
                c = 0xffff;
            }
            put16(u, UDP_CSUM_OFFSET as usize, c);
        }
        CsumMode::Partial => put16(u, UDP_CSUM_OFFSET as usize, csum_fold(ph)),
        CsumMode::None => {}
    }
    total
}

// ---------------------------------------------------------------------------------------
// TCP

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;

#[derive(Clone, Copy)]
pub struct TcpSegment<'a> {
    buf: &'a [u8],
    header_len: usize,
}

/// The TCP options the NAT cares about, parsed defensively.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpOptions {
    pub mss: Option<u16>,
    pub window_scale: Option<u8>,
}

impl<'a> TcpSegment<'a> {
    pub fn new(buf: &'a [u8]) -> Result<Self, WireError> {
        if buf.len() < TCP_HDR_LEN {
            return Err(WireError::Truncated);
        }
        let header_len = ((buf[12] >> 4) as usize) * 4;
        if header_len < TCP_HDR_LEN || header_len > buf.len() {
            return Err(WireError::Malformed);
        }
        Ok(TcpSegment { buf, header_len })
    }
    pub fn src_port(&self) -> u16 {
        be16(self.buf, 0)
    }
    pub fn dst_port(&self) -> u16 {
        be16(self.buf, 2)
    }
    pub fn seq(&self) -> u32 {
        be32(self.buf, 4)
    }
    pub fn ack(&self) -> u32 {
        be32(self.buf, 8)
    }
    pub fn flags(&self) -> u8 {
        self.buf[13]
    }
    pub fn has(&self, flag: u8) -> bool {
        self.flags() & flag != 0
    }
    pub fn window(&self) -> u16 {
        be16(self.buf, 14)
    }
    pub fn urgent_ptr(&self) -> u16 {
        be16(self.buf, 18)
    }
    pub fn header_len(&self) -> usize {
        self.header_len
    }
    pub fn payload(&self) -> &'a [u8] {
        &self.buf[self.header_len..]
    }
    pub fn options(&self) -> TcpOptions {
        parse_tcp_options(&self.buf[TCP_HDR_LEN..self.header_len])
    }
}

fn parse_tcp_options(mut opts: &[u8]) -> TcpOptions {
    let mut out = TcpOptions::default();
    while let Some((&kind, rest)) = opts.split_first() {
        match kind {
            0 => break,
            1 => opts = rest,
            _ => {
                let Some(&len) = rest.first() else { break };
                let len = len as usize;
                if len < 2 || len > opts.len() {
                    break;
                }
                let body = &opts[2..len];
                match (kind, body.len()) {
                    (2, 2) => out.mss = Some(u16::from_be_bytes([body[0], body[1]])),
                    (3, 1) => out.window_scale = Some(body[0].min(14)),
                    _ => {}
                }
                opts = &opts[len..];
            }
        }
    }
    out
}

/// What to put into a TCP header the NAT writes.
#[derive(Clone, Copy, Debug)]
pub struct TcpHeader {
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// SYN options.
    pub mss: Option<u16>,
    pub window_scale: Option<u8>,
}

impl TcpHeader {
    pub fn header_len(&self) -> usize {
        let mut n = TCP_HDR_LEN;
        if self.mss.is_some() {
            n += 4;
        }
        if self.window_scale.is_some() {
            n += 4;
        }
        n
    }
}

/// How the L4 checksum of a built frame is finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CsumMode {
    /// Full checksum computed in software.
    Full,
    /// Pseudo-header sum only (the receiver completes it: NEEDS_CSUM).
    Partial,
    /// Left zero (the receiver trusts DATA_VALID).
    None,
}

/// Writes Ethernet + IPv4 + TCP headers in front of `payload_len` bytes already placed
/// after them; returns the frame length (0 if `buf` is too small).
pub fn write_tcp_frame(
    buf: &mut [u8],
    eth_dst: MacAddr,
    eth_src: MacAddr,
    h: &TcpHeader,
    payload_len: usize,
    csum: CsumMode,
) -> usize {
    let thl = h.header_len();
    let l4_len = thl + payload_len;
    let total = ETH_HDR_LEN + IPV4_HDR_LEN + l4_len;
    if buf.len() < total || IPV4_HDR_LEN + l4_len > 0xffff {
        return 0;
    }
    write_eth(buf, eth_dst, eth_src, ETHERTYPE_IPV4);
    write_ipv4(&mut buf[ETH_HDR_LEN..], h.src.0, h.dst.0, IPPROTO_TCP, l4_len, 0);
    let t = &mut buf[ETH_HDR_LEN + IPV4_HDR_LEN..total];
    put16(t, 0, h.src.1);
    put16(t, 2, h.dst.1);
    put32(t, 4, h.seq);
    put32(t, 8, h.ack);
    t[12] = ((thl / 4) as u8) << 4;
    t[13] = h.flags;
    put16(t, 14, h.window);
    put16(t, 16, 0);
    put16(t, 18, 0);
    let mut at = TCP_HDR_LEN;
    if let Some(mss) = h.mss {
        t[at] = 2;
        t[at + 1] = 4;
        put16(t, at + 2, mss);
        at += 4;
    }
    if let Some(ws) = h.window_scale {
        t[at] = 1;
        t[at + 1] = 3;
        t[at + 2] = 3;
        t[at + 3] = ws;
    }
    let ph = pseudo_header_sum(h.src.0, h.dst.0, IPPROTO_TCP, l4_len);
    match csum {
        CsumMode::Full => {
            let c = !csum_fold(csum_partial(t, ph));
            put16(t, TCP_CSUM_OFFSET as usize, c);
        }
        CsumMode::Partial => put16(t, TCP_CSUM_OFFSET as usize, csum_fold(ph)),
        CsumMode::None => {}
    }
    total
}

// ---------------------------------------------------------------------------------------
// ICMP

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;

pub const ICMP_NET_UNREACH: u8 = 0;
pub const ICMP_HOST_UNREACH: u8 = 1;
pub const ICMP_PORT_UNREACH: u8 = 3;

#[derive(Clone, Copy)]
pub struct IcmpPacket<'a> {
    buf: &'a [u8],
}

impl<'a> IcmpPacket<'a> {
    pub fn new(buf: &'a [u8]) -> Result<Self, WireError> {
        if buf.len() < ICMP_HDR_LEN {
            return Err(WireError::Truncated);
        }
        Ok(IcmpPacket { buf })
    }
    pub fn icmp_type(&self) -> u8 {
        self.buf[0]
    }
    pub fn code(&self) -> u8 {
        self.buf[1]
    }
    pub fn ident(&self) -> u16 {
        be16(self.buf, 4)
    }
    pub fn seq_no(&self) -> u16 {
        be16(self.buf, 6)
    }
    pub fn bytes(&self) -> &'a [u8] {
        self.buf
    }
    pub fn data(&self) -> &'a [u8] {
        &self.buf[ICMP_HDR_LEN..]
    }
    pub fn checksum_ok(&self) -> bool {
        checksum(self.buf) == 0
    }
}

/// Writes Ethernet + IPv4 + ICMP around an ICMP message body: `icmp_type`, `code`, the
/// 4-byte rest-of-header word and `data`. Returns the frame length.
#[allow(clippy::too_many_arguments)]
pub fn write_icmp_frame(
    buf: &mut [u8],
    eth_dst: MacAddr,
    eth_src: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    data: &[u8],
) -> usize {
    let l4_len = ICMP_HDR_LEN + data.len();
    let total = ETH_HDR_LEN + IPV4_HDR_LEN + l4_len;
    if buf.len() < total || IPV4_HDR_LEN + l4_len > 0xffff {
        return 0;
    }
    write_eth(buf, eth_dst, eth_src, ETHERTYPE_IPV4);
    write_ipv4(&mut buf[ETH_HDR_LEN..], src, dst, IPPROTO_ICMP, l4_len, 0);
    let m = &mut buf[ETH_HDR_LEN + IPV4_HDR_LEN..total];
    m[0] = icmp_type;
    m[1] = code;
    put16(m, 2, 0);
    put_slice(m, 4, &rest);
    put_slice(m, ICMP_HDR_LEN, data);
    let c = checksum(m);
    put16(m, 2, c);
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071's example words 0001 f203 f4f5 f6f7 sum to ddf2 (before inversion).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(csum_fold(csum_partial(&data, 0)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn checksum_handles_odd_lengths_and_all_alignments() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1001).collect();
        for start in 0..9 {
            for len in [0usize, 1, 2, 3, 7, 8, 9, 15, 16, 17, 100, 991] {
                let s = &data[start..start + len];
                let mut slow: u32 = 0;
                for c in s.chunks(2) {
                    let w = if c.len() == 2 {
                        u16::from_be_bytes([c[0], c[1]])
                    } else {
                        u16::from_be_bytes([c[0], 0])
                    };
                    slow += w as u32;
                }
                while slow >> 16 != 0 {
                    slow = (slow & 0xffff) + (slow >> 16);
                }
                assert_eq!(csum_fold(csum_partial(s, 0)), slow as u16, "start {start} len {len}");
            }
        }
    }

    #[test]
    fn ipv4_rejects_lengths_beyond_the_buffer() {
        let mut b = [0u8; 40];
        b[0] = 0x45;
        b[2..4].copy_from_slice(&41u16.to_be_bytes());
        assert_eq!(Ipv4Packet::new(&b).err(), Some(WireError::Malformed));
        b[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(Ipv4Packet::new(&b).err(), Some(WireError::Malformed));
        b[0] = 0x4f; // 60-byte header in a 40-byte buffer
        b[2..4].copy_from_slice(&40u16.to_be_bytes());
        assert_eq!(Ipv4Packet::new(&b).err(), Some(WireError::Malformed));
        b[0] = 0x44;
        assert_eq!(Ipv4Packet::new(&b).err(), Some(WireError::Malformed));
        assert_eq!(Ipv4Packet::new(&b[..19]).err(), Some(WireError::Truncated));
    }

    #[test]
    fn ipv4_trims_ethernet_padding() {
        let mut b = [0u8; 60];
        write_ipv4(&mut b, Ipv4Addr::new(1, 2, 3, 4), Ipv4Addr::new(5, 6, 7, 8), 17, 8, 7);
        let p = Ipv4Packet::new(&b).unwrap();
        assert_eq!(p.total_len(), 28);
        assert_eq!(p.payload().len(), 8);
        assert!(p.header_checksum_ok());
        assert!(!p.is_fragment());
    }

    #[test]
    fn udp_length_field_is_checked() {
        let mut b = [0u8; 12];
        b[4..6].copy_from_slice(&13u16.to_be_bytes());
        assert!(UdpPacket::new(&b).is_err());
        b[4..6].copy_from_slice(&7u16.to_be_bytes());
        assert!(UdpPacket::new(&b).is_err());
        b[4..6].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(UdpPacket::new(&b).unwrap().payload().len(), 2);
    }

    #[test]
    fn tcp_options_parse_defensively() {
        assert_eq!(
            parse_tcp_options(&[2, 4, 5, 0xb4, 1, 3, 3, 7]),
            TcpOptions { mss: Some(1460), window_scale: Some(7) }
        );
        // Length running past the end, zero length, and a wrong MSS length.
        assert_eq!(parse_tcp_options(&[2, 40, 5, 0xb4]), TcpOptions::default());
        assert_eq!(parse_tcp_options(&[8, 0, 2, 4, 1, 1]), TcpOptions::default());
        assert_eq!(parse_tcp_options(&[2, 3, 5]), TcpOptions::default());
        assert_eq!(parse_tcp_options(&[3, 3, 200]).window_scale, Some(14));
        assert_eq!(parse_tcp_options(&[1]), TcpOptions::default());
        assert_eq!(parse_tcp_options(&[5]), TcpOptions::default());
    }

    #[test]
    fn tcp_header_length_is_checked() {
        let mut b = [0u8; 24];
        b[12] = 0x70; // 28 bytes
        assert!(TcpSegment::new(&b).is_err());
        b[12] = 0x40; // 16 bytes
        assert!(TcpSegment::new(&b).is_err());
        b[12] = 0x60;
        assert_eq!(TcpSegment::new(&b).unwrap().payload().len(), 0);
    }

    #[test]
    fn built_tcp_frame_has_valid_checksums() {
        let mut buf = vec![0u8; 200];
        buf[ETH_HDR_LEN + IPV4_HDR_LEN + 28..][..5].copy_from_slice(b"hello");
        let h = TcpHeader {
            src: (Ipv4Addr::new(10, 0, 2, 2), 80),
            dst: (Ipv4Addr::new(10, 0, 2, 15), 1234),
            seq: 1,
            ack: 2,
            flags: TCP_SYN | TCP_ACK,
            window: 100,
            mss: Some(1460),
            window_scale: Some(7),
        };
        let n = write_tcp_frame(&mut buf, MacAddr([2; 6]), MacAddr([4; 6]), &h, 5, CsumMode::Full);
        assert_eq!(n, 14 + 20 + 28 + 5);
        let ip = Ipv4Packet::new(&buf[14..n]).unwrap();
        assert!(ip.header_checksum_ok());
        assert!(l4_checksum_ok(ip.src(), ip.dst(), IPPROTO_TCP, ip.payload()));
        let t = TcpSegment::new(ip.payload()).unwrap();
        assert_eq!(t.payload(), b"hello");
        assert_eq!(t.options(), TcpOptions { mss: Some(1460), window_scale: Some(7) });
    }
}
