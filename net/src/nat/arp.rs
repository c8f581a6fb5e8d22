//! ARP: answers for the gateway and DNS addresses, learns the guest's MAC, and asks for it
//! when a forwarded connection needs to reach a guest that has not spoken yet.

use std::net::Ipv4Addr;

use super::counters::{DropReason, Proto};
use super::engine::Engine;
use super::wire::*;
use crate::backend::VnetHdr;

impl Engine {
    pub fn handle_arp(&mut self, eth: &EthFrame) {
        let Ok(arp) = ArpPacket::new(eth.payload()) else {
            return self.counters.drop(DropReason::ArpMalformed);
        };
        let spa = arp.sender_ip();
        let sha = arp.sender_mac();
        if sha.is_multicast() || sha != eth.src() {
            return self.counters.drop(DropReason::ArpMalformed);
        }
        // Probes (sender 0.0.0.0) carry no address to learn.
        if self.is_guest_addr(spa) {
            self.guest_mac = Some(sha);
            self.guest_ip = Some(spa);
        }
        match arp.op() {
            ARP_REQUEST => {
                let tpa = arp.target_ip();
                if tpa != self.p.host && tpa != self.p.dns {
                    return self.counters.drop(DropReason::ArpNotForUs);
                }
                if spa == tpa {
                    return self.counters.drop(DropReason::ArpMalformed);
                }
                let mut buf = vec![0u8; ETH_HDR_LEN + ARP_LEN];
                let n = write_arp(&mut buf, sha, ARP_REPLY, self.gw_mac, tpa, sha, spa);
                buf.truncate(n);
                self.emit(Proto::Arp, VnetHdr::default(), buf);
            }
            ARP_REPLY => {}
            _ => self.counters.drop(DropReason::ArpMalformed),
        }
    }

    /// Asks who has `ip` on behalf of the gateway.
    pub fn send_arp_request(&mut self, ip: Ipv4Addr) {
        let buf = arp_request_frame(self.gw_mac, self.p.host, ip);
        self.emit(Proto::Arp, VnetHdr::default(), buf);
    }
}
