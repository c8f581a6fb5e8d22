//! The built-in user-mode NAT backend (`"backend": {"type": "user"}`), with QEMU
//! `-netdev user` semantics: a virtual 10.0.2.0/24 with gateway, DHCP and DNS, outbound
//! TCP/UDP/ICMP through ordinary host sockets, and host port forwards into the guest.
//!
//! Driving it: add `poll_fd()` (an epoll fd) to the frontend's poll loop; whenever it
//! polls readable, call `recv()` until it returns `Ok(None)`. `recv()` does all the
//! engine's work (host sockets, timers) and hands out frames for the guest. `send()`
//! takes guest frames and never blocks.
//!
//! Routed guests: like QEMU's slirp, the NAT accepts IPv4 sources outside the virtual
//! network when they are ordinary unicast addresses, so a guest that forwards for a LAN
//! behind it (ip_forward=1, without masquerading) gives that LAN outbound access. Each
//! flow remembers its source address and the MAC its frames came from (the router
//! guest's), and replies go there. DHCP, ARP and port forwards serve only the attached
//! guest, and `restrict` drops routed sources outright.

mod arp;
pub mod config;
pub mod counters;
mod dhcp;
mod dns;
mod engine;
mod frames;
#[doc(hidden)]
pub mod fuzz;
mod hostfwd;
mod icmp;
mod slab;
mod tcp;
mod udp;
pub mod wire;

#[cfg(test)]
mod tests;

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::io::RawFd;

use thiserror::Error;

use crate::backend::{Backend, BackendCounters, BackendError, Offloads, VnetHdr};
use crate::mac::MacAddr;

pub use config::{ConfigError, UserNetConfig};
pub use counters::DropReason;
pub use hostfwd::HostFwdError;
pub use icmp::IcmpMode;

#[derive(Debug, Error)]
pub enum NatError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    HostFwd(#[from] HostFwdError),
    #[error("user net: cannot set up the engine: {0}")]
    Io(#[from] io::Error),
}

/// A user-mode NAT for one NIC.
pub struct UserNet {
    engine: engine::Engine,
}

impl UserNet {
    /// Validates `cfg`, picks the DNS upstream and binds every hostfwd listener.
    pub fn new(cfg: &UserNetConfig) -> Result<UserNet, NatError> {
        let params = cfg.validate()?;
        let upstream = dns::choose_upstream(params.dns_upstream, dns::RESOLV_CONF);
        if upstream.is_none() && !params.restrict {
            log::warn!("user net: no IPv4 nameserver in {}; DNS relay disabled", dns::RESOLV_CONF);
        }
        let fwd = hostfwd::Forwarders::bind(&params.hostfwd)?;
        let engine = engine::Engine::new(params, upstream, fwd)?;
        Ok(UserNet { engine })
    }

    /// The bound host address of each hostfwd rule, in rule order (useful with port 0).
    pub fn hostfwd_addrs(&self) -> Vec<SocketAddrV4> {
        self.engine.fwd.listeners.iter().map(|l| l.local).collect()
    }

    /// The MAC the gateway and DNS addresses answer with.
    pub fn gateway_mac(&self) -> MacAddr {
        self.engine.gw_mac
    }

    /// The DNS upstream queries are relayed to, if any.
    pub fn dns_upstream(&self) -> Option<SocketAddrV4> {
        self.engine.dns_upstream
    }

    /// The guest address learned from DHCP, ARP or traffic.
    pub fn guest_ip(&self) -> Option<Ipv4Addr> {
        self.engine.guest_ip
    }

    /// Drops of one reason so far.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.engine.counters.dropped(reason)
    }

    /// Overrides how echo requests to outside hosts leave (tests, or to forbid raw sockets).
    pub fn set_icmp_mode(&mut self, mode: IcmpMode) {
        self.engine.icmp.set_mode(mode);
    }
}

impl Backend for UserNet {
    fn kind(&self) -> &'static str {
        "user"
    }

    fn poll_fd(&self) -> RawFd {
        self.engine.epoll.raw()
    }

    fn supported_offloads(&self) -> Offloads {
        // TSO super-frames are just a large payload to write(); partial checksums need no
        // verification because nothing leaves the host as a raw packet.
        Offloads { csum: true, tso4: true, tso6: true, tso_ecn: true, ufo: false }
    }

    fn set_rx_offloads(&mut self, offloads: Offloads) -> io::Result<()> {
        let mut o = offloads.and(self.supported_offloads());
        if !o.csum {
            // GSO frames to the guest carry partial checksums, so TSO needs csum.
            o.tso4 = false;
            o.tso6 = false;
        }
        self.engine.rx_offloads = o;
        Ok(())
    }

    fn send(&mut self, hdr: &VnetHdr, frame: &[u8]) -> Result<(), BackendError> {
        self.engine.input(hdr, frame);
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(VnetHdr, usize)>, BackendError> {
        Ok(self.engine.next_frame(buf))
    }

    fn counters(&self) -> BackendCounters {
        self.engine.counters.to_backend(self.engine.gauges())
    }
}
