//! DHCP server: DISCOVER/OFFER, REQUEST/ACK|NAK, RELEASE, DECLINE, with leases keyed by
//! MAC. Options are parsed with every length checked against the real message.

use std::net::Ipv4Addr;

use thiserror::Error;

use super::config::NetParams;
use super::counters::{DropReason, Proto};
use super::engine::Engine;
use super::wire::*;
use crate::backend::VnetHdr;
use crate::mac::MacAddr;

pub const DHCP_DISCOVER: u8 = 1;
pub const DHCP_OFFER: u8 = 2;
pub const DHCP_REQUEST: u8 = 3;
pub const DHCP_DECLINE: u8 = 4;
pub const DHCP_ACK: u8 = 5;
pub const DHCP_NAK: u8 = 6;
pub const DHCP_RELEASE: u8 = 7;

const BOOTP_FIXED_LEN: usize = 236;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// Replies are padded to BOOTP's classic minimum so old clients accept them.
const MIN_REPLY_LEN: usize = 300;
const MAX_LEASES: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DhcpError {
    #[error("message shorter than the BOOTP header and magic cookie")]
    Truncated,
    #[error("not an Ethernet BOOTREQUEST")]
    Unsupported,
    #[error("missing DHCP magic cookie")]
    NoCookie,
    #[error("option {0} runs past the end of the message")]
    Overlong(u8),
    #[error("option {0} has a bad length")]
    BadLength(u8),
    #[error("no message type option")]
    NoMessageType,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhcpRequest {
    pub xid: u32,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub chaddr: MacAddr,
    pub msg_type: u8,
    pub requested_ip: Option<Ipv4Addr>,
    pub server_id: Option<Ipv4Addr>,
    /// True when the option area ended without an END option.
    pub missing_end: bool,
}

fn ip4(b: &[u8]) -> Ipv4Addr {
    match b {
        [a, b, c, d] => Ipv4Addr::new(*a, *b, *c, *d),
        _ => Ipv4Addr::UNSPECIFIED,
    }
}

/// Parses a BOOTREQUEST (the UDP payload).
pub fn parse_request(msg: &[u8]) -> Result<DhcpRequest, DhcpError> {
    let fixed = msg.get(..BOOTP_FIXED_LEN + 4).ok_or(DhcpError::Truncated)?;
    if fixed[0] != 1 || fixed[1] != 1 || fixed[2] != 6 {
        return Err(DhcpError::Unsupported);
    }
    if fixed[BOOTP_FIXED_LEN..] != MAGIC {
        return Err(DhcpError::NoCookie);
    }
    let mut chaddr = [0u8; 6];
    chaddr.copy_from_slice(&fixed[28..34]);
    let mut req = DhcpRequest {
        xid: u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]),
        flags: u16::from_be_bytes([fixed[10], fixed[11]]),
        ciaddr: ip4(&fixed[12..16]),
        chaddr: MacAddr(chaddr),
        msg_type: 0,
        requested_ip: None,
        server_id: None,
        missing_end: true,
    };
    let mut opts = &msg[BOOTP_FIXED_LEN + 4..];
    while let Some((&code, rest)) = opts.split_first() {
        match code {
            0 => {
                opts = rest;
                continue;
            }
            255 => {
                req.missing_end = false;
                break;
            }
            _ => {}
        }
        let (&len, rest) = rest.split_first().ok_or(DhcpError::Overlong(code))?;
        let body = rest.get(..len as usize).ok_or(DhcpError::Overlong(code))?;
        match code {
            53 => {
                req.msg_type =
                    *body.first().filter(|_| body.len() == 1).ok_or(DhcpError::BadLength(53))?
            }
            50 if body.len() == 4 => req.requested_ip = Some(ip4(body)),
            54 if body.len() == 4 => req.server_id = Some(ip4(body)),
            50 | 54 => return Err(DhcpError::BadLength(code)),
            _ => {}
        }
        opts = &rest[len as usize..];
    }
    if req.msg_type == 0 {
        return Err(DhcpError::NoMessageType);
    }
    Ok(req)
}

/// What the server answers with.
pub struct ReplyParams<'a> {
    pub msg_type: u8,
    pub yiaddr: Ipv4Addr,
    pub server: Ipv4Addr,
    pub mask: Ipv4Addr,
    pub router: Ipv4Addr,
    pub dns: Ipv4Addr,
    pub lease_secs: u32,
    pub mtu: u32,
    pub hostname: Option<&'a str>,
}

/// Builds a BOOTREPLY for `req`.
pub fn build_reply(req: &DhcpRequest, r: &ReplyParams) -> Vec<u8> {
    let mut m = vec![0u8; BOOTP_FIXED_LEN];
    m[0] = 2;
    m[1] = 1;
    m[2] = 6;
    m[4..8].copy_from_slice(&req.xid.to_be_bytes());
    m[10..12].copy_from_slice(&req.flags.to_be_bytes());
    if r.msg_type != DHCP_NAK {
        m[16..20].copy_from_slice(&r.yiaddr.octets());
        m[20..24].copy_from_slice(&r.server.octets());
    }
    m[28..34].copy_from_slice(&req.chaddr.0);
    m.extend_from_slice(&MAGIC);
    m.extend_from_slice(&[53, 1, r.msg_type]);
    m.extend_from_slice(&[54, 4]);
    m.extend_from_slice(&r.server.octets());
    if r.msg_type != DHCP_NAK {
        m.extend_from_slice(&[51, 4]);
        m.extend_from_slice(&r.lease_secs.to_be_bytes());
        m.extend_from_slice(&[1, 4]);
        m.extend_from_slice(&r.mask.octets());
        m.extend_from_slice(&[3, 4]);
        m.extend_from_slice(&r.router.octets());
        m.extend_from_slice(&[6, 4]);
        m.extend_from_slice(&r.dns.octets());
        m.extend_from_slice(&[26, 2]);
        m.extend_from_slice(&(r.mtu.min(0xffff) as u16).to_be_bytes());
        if let Some(h) = r.hostname {
            let h = &h.as_bytes()[..h.len().min(255)];
            m.extend_from_slice(&[12, h.len() as u8]);
            m.extend_from_slice(h);
        }
    }
    m.push(255);
    if m.len() < MIN_REPLY_LEN {
        m.resize(MIN_REPLY_LEN, 0);
    }
    m
}

#[derive(Clone, Copy, Debug)]
struct Lease {
    mac: MacAddr,
    ip: Ipv4Addr,
    bound: bool,
}

/// Leases keyed by MAC.
pub struct DhcpServer {
    leases: Vec<Lease>,
    first: u32,
    last: u32,
    reserved: [Ipv4Addr; 2],
}

impl DhcpServer {
    pub fn new(p: &NetParams) -> Self {
        let first = u32::from(p.dhcp_start);
        let last = (u32::from(p.broadcast()) - 1).min(first.saturating_add(MAX_LEASES as u32 - 1));
        DhcpServer { leases: Vec::new(), first, last, reserved: [p.host, p.dns] }
    }
    pub fn lease_count(&self) -> usize {
        self.leases.iter().filter(|l| l.bound).count()
    }
    pub fn lease_of(&self, mac: MacAddr) -> Option<Ipv4Addr> {
        self.leases.iter().find(|l| l.mac == mac).map(|l| l.ip)
    }
    fn in_range(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        v >= self.first && v <= self.last && !self.reserved.contains(&ip)
    }
    fn free(&self, ip: Ipv4Addr) -> bool {
        self.in_range(ip) && !self.leases.iter().any(|l| l.ip == ip)
    }
    /// The address `mac` holds or would get, preferring `wanted`.
    pub fn offer(&mut self, mac: MacAddr, wanted: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        if let Some(ip) = self.lease_of(mac) {
            return Some(ip);
        }
        let ip = wanted
            .filter(|w| self.free(*w))
            .or_else(|| (self.first..=self.last).map(Ipv4Addr::from).find(|ip| self.free(*ip)))?;
        self.leases.push(Lease { mac, ip, bound: false });
        Some(ip)
    }
    /// Binds `ip` to `mac` if it is theirs to have.
    pub fn bind(&mut self, mac: MacAddr, ip: Ipv4Addr) -> bool {
        if let Some(l) = self.leases.iter_mut().find(|l| l.mac == mac) {
            if l.ip == ip {
                l.bound = true;
                return true;
            }
            return false;
        }
        if self.free(ip) {
            self.leases.push(Lease { mac, ip, bound: true });
            return true;
        }
        false
    }
    pub fn release(&mut self, mac: MacAddr) {
        self.leases.retain(|l| l.mac != mac);
    }
}

impl Engine {
    pub fn handle_dhcp(&mut self, eth: &EthFrame, ip: &Ipv4Packet, udp: &UdpPacket) {
        let _ = ip;
        let req = match parse_request(udp.payload()) {
            Ok(r) => r,
            Err(e) => {
                log::debug!("user net: bad DHCP message: {e}");
                return self.counters.drop(DropReason::DhcpMalformed);
            }
        };
        if req.chaddr.is_multicast() || req.chaddr.0 == [0; 6] {
            return self.counters.drop(DropReason::DhcpMalformed);
        }
        let server = self.p.host;
        let reply = match req.msg_type {
            DHCP_DISCOVER => {
                self.dhcp.offer(req.chaddr, req.requested_ip).map(|ip| (DHCP_OFFER, ip))
            }
            DHCP_REQUEST => {
                if req.server_id.is_some_and(|s| s != server) {
                    // The client took another server's offer.
                    if self.dhcp.leases.iter().any(|l| l.mac == req.chaddr && !l.bound) {
                        self.dhcp.release(req.chaddr);
                    }
                    None
                } else {
                    let wanted =
                        req.requested_ip.or(Some(req.ciaddr).filter(|c| !c.is_unspecified()));
                    match wanted {
                        Some(w) if self.dhcp.bind(req.chaddr, w) => {
                            self.guest_mac = Some(req.chaddr);
                            self.guest_ip = Some(w);
                            Some((DHCP_ACK, w))
                        }
                        _ => Some((DHCP_NAK, Ipv4Addr::UNSPECIFIED)),
                    }
                }
            }
            DHCP_RELEASE | DHCP_DECLINE => {
                self.dhcp.release(req.chaddr);
                None
            }
            _ => {
                self.counters.drop(DropReason::DhcpIgnored);
                None
            }
        };
        let Some((msg_type, yiaddr)) = reply else { return };
        let hostname = self.p.hostname.clone();
        let body = build_reply(
            &req,
            &ReplyParams {
                msg_type,
                yiaddr,
                server,
                mask: self.p.mask(),
                router: self.p.host,
                dns: self.p.dns,
                lease_secs: self.p.lease_secs,
                mtu: self.p.mtu,
                hostname: hostname.as_deref(),
            },
        );
        let broadcast = req.flags & 0x8000 != 0 || msg_type == DHCP_NAK;
        let (eth_dst, ip_dst) =
            if broadcast { (MacAddr::BROADCAST, Ipv4Addr::BROADCAST) } else { (eth.src(), yiaddr) };
        let mut buf = vec![0u8; ETH_HDR_LEN + IPV4_HDR_LEN + UDP_HDR_LEN + body.len()];
        buf[ETH_HDR_LEN + IPV4_HDR_LEN + UDP_HDR_LEN..].copy_from_slice(&body);
        let n = write_udp_frame(
            &mut buf,
            eth_dst,
            self.gw_mac,
            (server, 67),
            (ip_dst, 68),
            body.len(),
            CsumMode::Full,
        );
        buf.truncate(n);
        self.emit(Proto::Dhcp, VnetHdr::default(), buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn request(msg_type: u8, opts: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; BOOTP_FIXED_LEN];
        m[0] = 1;
        m[1] = 1;
        m[2] = 6;
        m[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        m[28..34].copy_from_slice(&[0x52, 0x54, 0, 1, 2, 3]);
        m.extend_from_slice(&MAGIC);
        m.extend_from_slice(&[53, 1, msg_type]);
        m.extend_from_slice(opts);
        m
    }

    #[test]
    fn parses_a_request_with_options() {
        let mut m = request(
            DHCP_REQUEST,
            &[0, 0, 50, 4, 10, 0, 2, 15, 54, 4, 10, 0, 2, 2, 12, 3, b'a', b'b', b'c'],
        );
        m.push(255);
        let r = parse_request(&m).unwrap();
        assert_eq!(r.msg_type, DHCP_REQUEST);
        assert_eq!(r.requested_ip, Some(Ipv4Addr::new(10, 0, 2, 15)));
        assert_eq!(r.server_id, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(r.xid, 0x1234_5678);
        assert!(!r.missing_end);
    }

    #[test]
    fn rejects_truncated_messages() {
        let m = request(DHCP_DISCOVER, &[255]);
        for len in [0, 1, 100, 235, 239] {
            assert_eq!(parse_request(&m[..len]), Err(DhcpError::Truncated), "len {len}");
        }
        // Cookie present but the message-type option cut off.
        assert_eq!(parse_request(&m[..241]), Err(DhcpError::Overlong(53)));
        assert_eq!(parse_request(&m[..240]), Err(DhcpError::NoMessageType));
    }

    #[test]
    fn rejects_overlong_and_misfit_options() {
        let m = request(DHCP_DISCOVER, &[12, 200, b'x']);
        assert_eq!(parse_request(&m), Err(DhcpError::Overlong(12)));
        let m = request(DHCP_DISCOVER, &[50, 3, 1, 2, 3, 255]);
        assert_eq!(parse_request(&m), Err(DhcpError::BadLength(50)));
        let mut m = request(DHCP_DISCOVER, &[]);
        let at = m.len() - 2;
        m[at] = 2; // message type with length 2
        m.push(0);
        assert_eq!(parse_request(&m), Err(DhcpError::BadLength(53)));
        let m = request(DHCP_DISCOVER, &[50]);
        assert_eq!(parse_request(&m), Err(DhcpError::Overlong(50)));
    }

    #[test]
    fn missing_end_is_tolerated() {
        let r = parse_request(&request(DHCP_DISCOVER, &[0, 0, 0])).unwrap();
        assert!(r.missing_end);
        assert_eq!(r.msg_type, DHCP_DISCOVER);
    }

    #[test]
    fn rejects_bad_cookie_and_non_ethernet() {
        let mut m = request(DHCP_DISCOVER, &[255]);
        m[236] = 0;
        assert_eq!(parse_request(&m), Err(DhcpError::NoCookie));
        let mut m = request(DHCP_DISCOVER, &[255]);
        m[2] = 16;
        assert_eq!(parse_request(&m), Err(DhcpError::Unsupported));
        let mut m = request(DHCP_DISCOVER, &[255]);
        m[0] = 2;
        assert_eq!(parse_request(&m), Err(DhcpError::Unsupported));
    }

    #[test]
    fn leases_are_keyed_by_mac() {
        let p = super::super::config::UserNetConfig::default().validate().unwrap();
        let mut s = DhcpServer::new(&p);
        let a = MacAddr([2, 0, 0, 0, 0, 1]);
        let b = MacAddr([2, 0, 0, 0, 0, 2]);
        assert_eq!(s.offer(a, None), Some(Ipv4Addr::new(10, 0, 2, 15)));
        assert_eq!(s.offer(a, None), Some(Ipv4Addr::new(10, 0, 2, 15)));
        assert_eq!(
            s.offer(b, Some(Ipv4Addr::new(10, 0, 2, 15))),
            Some(Ipv4Addr::new(10, 0, 2, 16))
        );
        assert!(!s.bind(b, Ipv4Addr::new(10, 0, 2, 15)));
        assert!(s.bind(a, Ipv4Addr::new(10, 0, 2, 15)));
        assert_eq!(s.lease_count(), 1);
        s.release(a);
        assert_eq!(s.lease_of(a), None);
        assert!(!s.bind(a, Ipv4Addr::new(10, 0, 2, 2)));
    }
}
