//! Frames a simulated guest sends to, and parses from, a real kernel on the far side of a
//! tap: ARP, ICMP echo and hand-driven TCP over IPv4. Builders compute real checksums
//! (or a partial one, for checksum offload); parsers check them.

use std::net::Ipv4Addr;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
/// Ethernet + IPv4 (no options): where the L4 header starts.
pub const L4_OFFSET: usize = 34;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// The ones' complement sum of `data` as 16-bit big-endian words, not yet folded.
pub fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum()
}

pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum of `data`.
pub fn inet_checksum(data: &[u8]) -> u16 {
    !fold(sum16(data))
}

/// The unfolded sum of the IPv4 pseudo-header for an L4 segment of `l4_len` bytes.
pub fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) -> u32 {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(l4_len as u16).to_be_bytes());
    sum16(&p)
}

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet (DF set, TTL 64) around `payload`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, id: u16, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let check = inet_checksum(&p);
    p[10..12].copy_from_slice(&check.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

pub fn arp_request(src_mac: [u8; 6], src_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&src_mac);
    a.extend_from_slice(&src_ip.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    eth([0xff; 6], src_mac, ETHERTYPE_ARP, &a)
}

/// An ARP reply: who answered, for whom.
#[derive(Debug, PartialEq, Eq)]
pub struct ArpReply {
    pub eth_dst: [u8; 6],
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_mac: [u8; 6],
    pub target_ip: Ipv4Addr,
}

pub fn parse_arp_reply(f: &[u8]) -> Option<ArpReply> {
    if f.get(12..14)? != ETHERTYPE_ARP.to_be_bytes() || f.get(14..22)? != [0, 1, 8, 0, 6, 4, 0, 2] {
        return None;
    }
    let ip = |at: usize| {
        Some(Ipv4Addr::new(
            *f.get(at)?,
            *f.get(at + 1)?,
            *f.get(at + 2)?,
            *f.get(at + 3)?,
        ))
    };
    Some(ArpReply {
        eth_dst: f.get(0..6)?.try_into().ok()?,
        sender_mac: f.get(22..28)?.try_into().ok()?,
        sender_ip: ip(28)?,
        target_mac: f.get(32..38)?.try_into().ok()?,
        target_ip: ip(38)?,
    })
}

/// An IPv4 packet inside an Ethernet frame, with its header checksum verified.
pub struct Ipv4View<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// Total length from the header.
    pub total_len: usize,
    /// The L4 bytes (exactly what the header's total length covers).
    pub payload: &'a [u8],
}

pub fn parse_ipv4(f: &[u8]) -> Option<Ipv4View<'_>> {
    if f.get(12..14)? != ETHERTYPE_IPV4.to_be_bytes() {
        return None;
    }
    let header = f.get(14..34)?;
    if header[0] != 0x45 || inet_checksum(header) != 0 {
        return None;
    }
    let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    Some(Ipv4View {
        src: Ipv4Addr::new(header[12], header[13], header[14], header[15]),
        dst: Ipv4Addr::new(header[16], header[17], header[18], header[19]),
        proto: header[9],
        total_len,
        payload: f.get(34..14 + total_len)?,
    })
}

pub fn icmp_echo_request(id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(data);
    let check = inet_checksum(&m);
    m[2..4].copy_from_slice(&check.to_be_bytes());
    m
}

/// The data of an ICMP echo reply with `id` and `seq` whose checksum is right.
pub fn parse_echo_reply(ip: &Ipv4View<'_>, id: u16, seq: u16) -> Option<Vec<u8>> {
    let m = ip.payload;
    let matches = ip.proto == PROTO_ICMP
        && m.len() >= 8
        && m[0] == 0
        && m[4..6] == id.to_be_bytes()
        && m[6..8] == seq.to_be_bytes()
        && inet_checksum(m) == 0;
    matches.then(|| m[8..].to_vec())
}

/// How a built TCP segment's checksum field is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpChecksum {
    Full,
    /// Only the pseudo-header sum, as CHECKSUM_PARTIAL leaves it for the NIC to finish.
    Partial,
}

pub struct TcpSegment<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub options: &'a [u8],
    pub payload: &'a [u8],
}

impl TcpSegment<'_> {
    /// The segment as an IPv4 packet (without Ethernet header).
    pub fn ipv4(&self, id: u16, checksum: TcpChecksum) -> Vec<u8> {
        let header_len = 20 + self.options.len();
        assert_eq!(header_len % 4, 0, "TCP options must be padded to 4 bytes");
        let mut t = Vec::with_capacity(header_len + self.payload.len());
        t.extend_from_slice(&self.sport.to_be_bytes());
        t.extend_from_slice(&self.dport.to_be_bytes());
        t.extend_from_slice(&self.seq.to_be_bytes());
        t.extend_from_slice(&self.ack.to_be_bytes());
        t.push(((header_len / 4) as u8) << 4);
        t.push(self.flags);
        t.extend_from_slice(&self.window.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 0]);
        t.extend_from_slice(self.options);
        t.extend_from_slice(self.payload);
        let pseudo = pseudo_header_sum(self.src, self.dst, PROTO_TCP, t.len());
        let check = match checksum {
            TcpChecksum::Full => !fold(pseudo + sum16(&t)),
            TcpChecksum::Partial => fold(pseudo),
        };
        t[16..18].copy_from_slice(&check.to_be_bytes());
        ipv4(self.src, self.dst, PROTO_TCP, id, &t)
    }
}

/// A parsed TCP segment.
#[derive(Debug)]
pub struct TcpView<'a> {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub payload: &'a [u8],
    /// Whether the checksum field verifies over the segment (false for a partial one).
    pub checksum_ok: bool,
}

pub fn parse_tcp<'a>(ip: &Ipv4View<'a>) -> Option<TcpView<'a>> {
    let t = ip.payload;
    if ip.proto != PROTO_TCP || t.len() < 20 {
        return None;
    }
    let doff = usize::from(t[12] >> 4) * 4;
    let be16 = |at: usize| u16::from_be_bytes([t[at], t[at + 1]]);
    let be32 = |at: usize| u32::from_be_bytes([t[at], t[at + 1], t[at + 2], t[at + 3]]);
    let pseudo = pseudo_header_sum(ip.src, ip.dst, PROTO_TCP, t.len());
    Some(TcpView {
        sport: be16(0),
        dport: be16(2),
        seq: be32(4),
        ack: be32(8),
        flags: t[13],
        window: be16(14),
        payload: t.get(doff..)?,
        checksum_ok: fold(pseudo + sum16(t)) == 0xffff,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    #[test]
    fn built_segments_parse_back_with_checksums() {
        let seg = TcpSegment {
            src: A,
            dst: B,
            sport: 1,
            dport: 2,
            seq: 3,
            ack: 4,
            flags: TCP_ACK,
            window: 5,
            options: &[2, 4, 5, 0xb4],
            payload: b"odd",
        };
        let frame = eth(
            [1; 6],
            [2; 6],
            ETHERTYPE_IPV4,
            &seg.ipv4(9, TcpChecksum::Full),
        );
        let ip = parse_ipv4(&frame).unwrap();
        let tcp = parse_tcp(&ip).unwrap();
        assert!(tcp.checksum_ok);
        assert_eq!((tcp.seq, tcp.ack, tcp.payload), (3, 4, &b"odd"[..]));
        let partial = eth(
            [1; 6],
            [2; 6],
            ETHERTYPE_IPV4,
            &seg.ipv4(9, TcpChecksum::Partial),
        );
        assert!(
            !parse_tcp(&parse_ipv4(&partial).unwrap())
                .unwrap()
                .checksum_ok
        );
        // A damaged IPv4 header is not parsed.
        let mut bad = frame.clone();
        bad[22] ^= 1;
        assert!(parse_ipv4(&bad).is_none());
    }

    #[test]
    fn echo_reply_parser_checks_id_seq_and_checksum() {
        let mut reply = icmp_echo_request(7, 8, b"data");
        reply[0] = 0;
        let check = inet_checksum(&{
            let mut r = reply.clone();
            r[2] = 0;
            r[3] = 0;
            r
        });
        reply[2..4].copy_from_slice(&check.to_be_bytes());
        let frame = eth(
            [1; 6],
            [2; 6],
            ETHERTYPE_IPV4,
            &ipv4(A, B, PROTO_ICMP, 1, &reply),
        );
        let ip = parse_ipv4(&frame).unwrap();
        assert_eq!(parse_echo_reply(&ip, 7, 8), Some(b"data".to_vec()));
        assert_eq!(parse_echo_reply(&ip, 7, 9), None);
    }
}
