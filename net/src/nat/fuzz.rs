//! A mutational frame generator for fuzzing the NAT's input path (`Backend::send`).
//! Seeds are valid frames of every protocol the engine parses; mutations flip bits, write
//! boundary values into length fields, cut, extend and splice, and then usually repair
//! the checksums so the mutated frame gets past the checksum checks into the parsers.
//!
//! Used by `examples/nat-fuzz.rs` (long runs in a private network namespace) and by a
//! short smoke test.

use std::net::Ipv4Addr;

use super::frames::*;
use super::wire::*;
use crate::backend::VnetHdr;
use crate::mac::MacAddr;

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

const INTERESTING_16: [u16; 12] = [0, 1, 7, 8, 19, 20, 21, 0x7f, 0x80, 0xff, 0x7fff, 0xffff];

/// Valid frames of every kind the engine handles; `ports` are host services to aim at.
pub fn seeds(gw_mac: MacAddr, ports: &[u16]) -> Vec<(VnetHdr, Vec<u8>)> {
    let plain = VnetHdr::default();
    let mut out = vec![(plain, arp_request(GUEST, GW))];
    // DHCP DISCOVER and REQUEST.
    for (ty, extra) in
        [(1u8, vec![]), (3u8, vec![50, 4, 10, 0, 2, 15, 54, 4, 10, 0, 2, 2, 12, 2, b'h', b'i'])]
    {
        out.push((plain, dhcp_frame(&dhcp_msg(ty, &extra, true))));
    }
    let udp =
        |dst, payload: &[u8]| udp_frame_via(GUEST_MAC, gw_mac, (GUEST_IP, 40000), dst, payload);
    let dns_query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01";
    out.push((plain, udp((DNS, 53), dns_query)));
    out.push((plain, udp((GW, 69), b"\x00\x01file\x00octet\x00")));
    let tcp = |dport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8], opts: bool| {
        let th = TcpHeader {
            src: (GUEST_IP, 41000),
            dst: (GW, dport),
            seq,
            ack,
            flags,
            window: 512,
            mss: opts.then_some(1460),
            window_scale: opts.then_some(7),
        };
        tcp_frame_with(GUEST_MAC, gw_mac, &th, payload)
    };
    for &p in ports {
        out.push((plain, udp((GW, p), b"datagram")));
        out.push((plain, tcp(p, 1000, 0, TCP_SYN, &[], true)));
        out.push((plain, tcp(p, 1001, 1, TCP_ACK, &[], false)));
        out.push((plain, tcp(p, 1001, 1, TCP_ACK | TCP_PSH, b"GET / HTTP/1.0\r\n\r\n", false)));
        out.push((plain, tcp(p, 1001, 1, TCP_ACK | TCP_FIN, &[], false)));
        out.push((plain, tcp(p, 1001, 1, TCP_ACK | TCP_URG, b"urgent", false)));
        out.push((TSO4_HDR, tcp(p, 1001, 1, TCP_ACK, &[0x42; 4000], false)));
    }
    out.push((plain, icmp_echo(GUEST, gw_mac, GW, 1, 1, &[7; 16])));
    out.push((plain, icmp_echo(GUEST, gw_mac, Ipv4Addr::new(10, 9, 9, 9), 2, 1, &[7; 16])));
    out
}

/// Recomputes the IPv4 header checksum and, if the L4 header is whole, its checksum.
pub fn fix_checksums(f: &mut [u8]) {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return;
    }
    let ihl = ((f[14] & 0x0f) as usize) * 4;
    if ihl < 20 || 14 + ihl > f.len() {
        return;
    }
    f[24] = 0;
    f[25] = 0;
    let c = checksum(&f[14..14 + ihl]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let total = u16::from_be_bytes([f[16], f[17]]) as usize;
    let end = (14 + total).min(f.len());
    if end <= 14 + ihl {
        return;
    }
    let src = Ipv4Addr::new(f[26], f[27], f[28], f[29]);
    let dst = Ipv4Addr::new(f[30], f[31], f[32], f[33]);
    let proto = f[23];
    let l4 = &mut f[14 + ihl..end];
    let at = match proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        IPPROTO_ICMP => 2,
        _ => return,
    };
    if l4.len() < at + 2 {
        return;
    }
    l4[at] = 0;
    l4[at + 1] = 0;
    let c = if proto == IPPROTO_ICMP {
        checksum(l4)
    } else {
        !csum_fold(csum_partial(l4, pseudo_header_sum(src, dst, proto, l4.len())))
    };
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

pub struct FrameFuzzer {
    pub rng: Rng,
    seeds: Vec<(VnetHdr, Vec<u8>)>,
}

impl FrameFuzzer {
    pub fn new(seed: u64, seeds: Vec<(VnetHdr, Vec<u8>)>) -> FrameFuzzer {
        FrameFuzzer { rng: Rng::new(seed), seeds }
    }

    /// One mutated input.
    pub fn next_input(&mut self) -> (VnetHdr, Vec<u8>) {
        let r = &mut self.rng;
        let (mut hdr, mut f) = self.seeds[r.below(self.seeds.len())].clone();
        let rounds = 1 + r.below(6);
        for _ in 0..rounds {
            match r.below(12) {
                0 | 1 => {
                    if !f.is_empty() {
                        let i = r.below(f.len());
                        f[i] ^= 1 << r.below(8);
                    }
                }
                2 => {
                    if !f.is_empty() {
                        let i = r.below(f.len());
                        f[i] = r.next_u64() as u8;
                    }
                }
                3 | 4 => {
                    // A boundary value into a header-ish 16-bit field.
                    if f.len() >= 2 {
                        let i = r.below(f.len().min(80) - 1);
                        let v = INTERESTING_16[r.below(INTERESTING_16.len())];
                        f[i..i + 2].copy_from_slice(&v.to_be_bytes());
                    }
                }
                5 => {
                    let keep = r.below(f.len() + 1);
                    f.truncate(keep);
                }
                6 => {
                    let extra = r.below(64);
                    for _ in 0..extra {
                        f.push(r.next_u64() as u8);
                    }
                }
                7 => {
                    if !f.is_empty() {
                        let i = r.below(f.len());
                        let n = r.below(8).min(f.len() - i);
                        f.drain(i..i + n);
                    }
                }
                8 => {
                    let i = r.below(f.len() + 1);
                    let n = r.below(8);
                    for k in 0..n {
                        f.insert(i + k, r.next_u64() as u8);
                    }
                }
                9 => {
                    // Splice the tail of another seed.
                    let other = &self.seeds[r.below(self.seeds.len())].1;
                    let at = r.below(f.len() + 1);
                    let from = r.below(other.len() + 1);
                    f.truncate(at);
                    f.extend_from_slice(&other[from..]);
                }
                10 => {
                    // IP header length / flags / total length.
                    if f.len() > 21 {
                        match r.below(3) {
                            0 => f[14] = 0x40 | (r.below(16) as u8),
                            1 => f[20] = r.next_u64() as u8,
                            _ => {
                                let v = r.below(f.len() + 64) as u16;
                                f[16..18].copy_from_slice(&v.to_be_bytes());
                            }
                        }
                    }
                }
                _ => {
                    hdr.flags = r.next_u64() as u8 & 3;
                    hdr.gso_type = [0u8, 1, 3, 4, 0x81][r.below(5)];
                    hdr.gso_size = r.next_u64() as u16;
                    hdr.csum_start = r.next_u64() as u16;
                    hdr.csum_offset = r.next_u64() as u16;
                    hdr.hdr_len = r.next_u64() as u16;
                }
            }
        }
        if r.chance(80) {
            fix_checksums(&mut f);
        }
        (hdr, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, MAX_FRAME_LEN};
    use crate::nat::{UserNet, UserNetConfig};

    /// A short run over the whole input path. Restricted, so no frame makes a socket;
    /// the long run (examples/nat-fuzz.rs) lets flows open inside a private namespace.
    #[test]
    fn fuzz_smoke_restricted() {
        let cfg = UserNetConfig {
            restrict: true,
            dns_upstream: Some("127.0.0.1:9".into()),
            ..Default::default()
        };
        let mut net = UserNet::new(&cfg).unwrap();
        let mut fz = FrameFuzzer::new(0x7a91, seeds(net.gateway_mac(), &[7, 9]));
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        for i in 0..20_000 {
            let (hdr, f) = fz.next_input();
            let _ = net.send(&hdr, &f);
            if i % 16 == 0 {
                while let Ok(Some(_)) = net.recv(&mut buf) {}
            }
        }
        assert_eq!(net.counters().tx_frames, 20_000);
    }

    #[test]
    fn fixed_seeds_are_valid_frames() {
        for (_, f) in seeds(MacAddr([0x52, 0x55, 10, 0, 2, 2]), &[7]) {
            let eth = EthFrame::new(&f).unwrap();
            if eth.ethertype() == ETHERTYPE_IPV4 {
                let ip = Ipv4Packet::new(eth.payload()).unwrap();
                assert!(ip.header_checksum_ok());
                if ip.protocol() != IPPROTO_ICMP {
                    assert!(l4_checksum_ok(ip.src(), ip.dst(), ip.protocol(), ip.payload()));
                }
            }
        }
    }
}
