//! UDP NAT: one connected host socket per guest 4-tuple, closed after an idle timeout.
//! Replies carry the virtual address the guest used as their source.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use super::counters::{DropReason, Proto};
use super::engine::{Engine, Target, TOKEN_UDP};
use super::slab::{Handle, Slab};
use super::wire::*;
use crate::mac::MacAddr;
use crate::sys;

/// (guest ip, guest port, virtual destination ip, destination port)
pub type UdpKey = (Ipv4Addr, u16, Ipv4Addr, u16);

/// Datagrams read from one socket per readiness event, at most.
const BATCH: usize = 64;

pub struct UdpFlow {
    key: UdpKey,
    sock: OwnedFd,
    guest_mac: MacAddr,
    last_use: Instant,
    is_dns: bool,
    /// The last datagram's IP header + 8 bytes, quoted in port-unreachable errors.
    quote: Vec<u8>,
}

#[derive(Default)]
pub struct UdpTable {
    flows: Slab<UdpFlow>,
    by_key: HashMap<UdpKey, Handle>,
}

impl UdpTable {
    pub fn len(&self) -> usize {
        self.flows.len()
    }
}

impl Engine {
    pub fn udp_input(&mut self, guest_mac: MacAddr, ip: &Ipv4Packet, udp: &UdpPacket) {
        if udp.src_port() == 0 {
            return self.counters.drop(DropReason::BadSource);
        }
        if udp.dst_port() == 0 {
            return self.counters.drop(DropReason::MartianDestination);
        }
        let key: UdpKey = (ip.src(), udp.src_port(), ip.dst(), udp.dst_port());
        if ip.dst() == self.p.host && self.fwd_udp_reply(key, udp.payload()) {
            return;
        }
        let h = match self.udp.by_key.get(&key) {
            Some(h) => *h,
            None => match self.udp_open(key, guest_mac) {
                Ok(h) => h,
                Err(reason) => return self.counters.drop(reason),
            },
        };
        let Some(flow) = self.udp.flows.get_mut(h) else { return };
        flow.last_use = self.now;
        flow.guest_mac = guest_mac;
        flow.quote.clear();
        flow.quote.extend_from_slice(ip.icmp_quote());
        if flow.is_dns {
            self.counters.count_in(Proto::Dns);
        }
        let fd = flow.sock.as_raw_fd();
        if let Err(e) = sys::send(fd, udp.payload()) {
            log::debug!("user net: udp send to {:?} failed: {e}", key);
            self.counters.drop(DropReason::UdpSendFailed);
        }
    }

    fn udp_open(&mut self, key: UdpKey, guest_mac: MacAddr) -> Result<Handle, DropReason> {
        let target: Target = self.resolve(key.2, key.3)?;
        if self.flows_open() >= self.p.max_flows {
            return Err(DropReason::FlowLimit);
        }
        let sock = sys::socket(libc::SOCK_DGRAM, 0).map_err(|e| {
            if sys::is_fd_exhaustion(&e) {
                DropReason::NoFd
            } else {
                DropReason::SocketError
            }
        })?;
        if let Err(e) = sys::connect(sock.as_raw_fd(), target.host) {
            log::debug!("user net: udp connect {} failed: {e}", target.host);
            return Err(DropReason::UdpSendFailed);
        }
        let fd = sock.as_raw_fd();
        let h = self.udp.flows.insert(UdpFlow {
            key,
            sock,
            guest_mac,
            last_use: self.now,
            is_dns: target.is_dns,
            quote: Vec::new(),
        });
        if self.epoll.add(fd, libc::EPOLLIN as u32, h.token(TOKEN_UDP)).is_err() {
            self.udp.flows.remove(h);
            return Err(DropReason::SocketError);
        }
        self.udp.by_key.insert(key, h);
        Ok(h)
    }

    pub fn udp_event(&mut self, h: Handle) {
        let mut scratch = std::mem::take(&mut self.scratch);
        for _ in 0..BATCH {
            let Some(flow) = self.udp.flows.get_mut(h) else { break };
            let fd = flow.sock.as_raw_fd();
            match sys::recv(fd, &mut scratch, 0) {
                Ok(n) => {
                    flow.last_use = self.now;
                    let (gip, gport, vip, vport) = flow.key;
                    let (mac, is_dns) = (flow.guest_mac, flow.is_dns);
                    let data = scratch.get(..n).unwrap_or(&[]);
                    self.udp_to_guest(
                        mac,
                        (vip, vport),
                        (gip, gport),
                        data,
                        if is_dns { Proto::Dns } else { Proto::Udp },
                    );
                }
                Err(e) if sys::would_block(&e) => break,
                Err(e) => {
                    if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                        let (gip, _, vip, _) = flow.key;
                        let (mac, quote) = (flow.guest_mac, flow.quote.clone());
                        if !quote.is_empty() {
                            self.emit_icmp_error(mac, vip, gip, ICMP_PORT_UNREACH, &quote);
                        }
                    }
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// Queues one datagram for the guest.
    pub fn udp_to_guest(
        &mut self,
        mac: MacAddr,
        src: (Ipv4Addr, u16),
        dst: (Ipv4Addr, u16),
        data: &[u8],
        proto: Proto,
    ) {
        let hdrs = ETH_HDR_LEN + IPV4_HDR_LEN + UDP_HDR_LEN;
        if data.len() + IPV4_HDR_LEN + UDP_HDR_LEN > 0xffff {
            return self.counters.drop(DropReason::Oversized);
        }
        let mut buf = vec![0u8; hdrs + data.len()];
        buf[hdrs..].copy_from_slice(data);
        let (mode, hdr) = self.l4_csum_mode(UDP_CSUM_OFFSET);
        let n = write_udp_frame(&mut buf, mac, self.gw_mac, src, dst, data.len(), mode);
        buf.truncate(n);
        self.emit(proto, hdr, buf);
    }

    pub fn udp_tick(&mut self) {
        let now = self.now;
        for h in self.udp.flows.handles() {
            let Some(f) = self.udp.flows.get(h) else { continue };
            let idle = if f.is_dns {
                self.p.udp_idle.min(std::time::Duration::from_secs(10))
            } else {
                self.p.udp_idle
            };
            if now.duration_since(f.last_use) >= idle {
                if let Some(f) = self.udp.flows.remove(h) {
                    let _ = self.epoll.delete(f.sock.as_raw_fd());
                    self.udp.by_key.remove(&f.key);
                }
            }
        }
    }
}
