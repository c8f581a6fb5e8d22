//! Frames a guest sends, built whole and valid: the NAT's tests and the fuzzer's seeds
//! start from these. QEMU's default guest identity on QEMU's default network.

use std::net::Ipv4Addr;

use super::wire::*;
use crate::backend::VnetHdr;
use crate::mac::MacAddr;

pub const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

/// Who puts a frame on the wire: its Ethernet source and its IPv4 source.
#[derive(Clone, Copy, Debug)]
pub struct Sender {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
}

/// The guest on the virtual network.
pub const GUEST: Sender = Sender { mac: GUEST_MAC, ip: GUEST_IP };

/// A TCPv4 super-frame's header as a virtio guest writes it: MSS 1448 behind 54 bytes of
/// Ethernet, IPv4 and TCP headers, with a partial checksum.
pub const TSO4_HDR: VnetHdr = VnetHdr {
    flags: VnetHdr::FLAG_NEEDS_CSUM,
    gso_type: VnetHdr::GSO_TCPV4,
    hdr_len: 54,
    gso_size: 1448,
    csum_start: 34,
    csum_offset: 16,
    num_buffers: 0,
};

/// A broadcast "who has `target`" from `from`.
pub fn arp_request(from: Sender, target: Ipv4Addr) -> Vec<u8> {
    arp_request_frame(from.mac, from.ip, target)
}

/// A UDP datagram to the gateway's MAC whose Ethernet source is `eth_src`.
pub fn udp_frame_via(
    eth_src: MacAddr,
    gw_mac: MacAddr,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let hdrs = ETH_HDR_LEN + IPV4_HDR_LEN + UDP_HDR_LEN;
    let mut b = vec![0u8; hdrs + payload.len()];
    b[hdrs..].copy_from_slice(payload);
    let n = write_udp_frame(&mut b, gw_mac, eth_src, src, dst, payload.len(), CsumMode::Full);
    b.truncate(n);
    b
}

/// A TCP segment to the gateway's MAC whose Ethernet source is `eth_src`.
pub fn tcp_frame_with(
    eth_src: MacAddr,
    gw_mac: MacAddr,
    th: &TcpHeader,
    payload: &[u8],
) -> Vec<u8> {
    let hl = ETH_HDR_LEN + IPV4_HDR_LEN + th.header_len();
    let mut b = vec![0u8; hl + payload.len()];
    b[hl..].copy_from_slice(payload);
    let n = write_tcp_frame(&mut b, gw_mac, eth_src, th, payload.len(), CsumMode::Full);
    b.truncate(n);
    b
}

/// An echo request from `from` to `dst`.
pub fn icmp_echo(
    from: Sender,
    gw_mac: MacAddr,
    dst: Ipv4Addr,
    id: u16,
    seq: u16,
    data: &[u8],
) -> Vec<u8> {
    let mut b = vec![0u8; ETH_HDR_LEN + IPV4_HDR_LEN + ICMP_HDR_LEN + data.len()];
    let mut rest = [0u8; 4];
    rest[..2].copy_from_slice(&id.to_be_bytes());
    rest[2..].copy_from_slice(&seq.to_be_bytes());
    let n =
        write_icmp_frame(&mut b, gw_mac, from.mac, from.ip, dst, ICMP_ECHO_REQUEST, 0, rest, data);
    b.truncate(n);
    b
}

/// A BOOTREQUEST from the guest of DHCP type `msg_type`, with `extra` options after the
/// type and, if `end`, the end option.
pub fn dhcp_msg(msg_type: u8, extra: &[u8], end: bool) -> Vec<u8> {
    let mut m = vec![0u8; 236];
    m[0] = 1;
    m[1] = 1;
    m[2] = 6;
    m[4..8].copy_from_slice(&0xabcd_0001u32.to_be_bytes());
    m[28..34].copy_from_slice(&GUEST_MAC.0);
    m.extend_from_slice(&[99, 130, 83, 99, 53, 1, msg_type]);
    m.extend_from_slice(extra);
    if end {
        m.push(255);
    }
    m
}

/// `msg` broadcast from 0.0.0.0:68 to the DHCP server port, as a client without a lease
/// sends it.
pub fn dhcp_frame(msg: &[u8]) -> Vec<u8> {
    udp_frame_via(
        GUEST_MAC,
        MacAddr::BROADCAST,
        (Ipv4Addr::UNSPECIFIED, 68),
        (Ipv4Addr::BROADCAST, 67),
        msg,
    )
}
