//! Port forwards: host listeners bound at startup (a busy port is a startup error), TCP
//! connections accepted and handed to the TCP NAT, UDP datagrams relayed to the guest
//! with replies routed back to the sending host peer.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use thiserror::Error;

use super::config::{FwdProto, HostFwd};
use super::counters::{DropReason, Proto};
use super::engine::{Engine, TOKEN_FWD_TCP, TOKEN_FWD_UDP};
use crate::mac::MacAddr;
use crate::sys::{self, Epoll};

#[derive(Debug, Error)]
pub enum HostFwdError {
    #[error("hostfwd '{rule}': cannot bind {addr}: {source}")]
    Bind { rule: String, addr: SocketAddrV4, source: io::Error },
    #[error("hostfwd '{rule}': {source}")]
    Socket { rule: String, source: io::Error },
}

pub struct Listener {
    pub rule: HostFwd,
    sock: OwnedFd,
    pub local: SocketAddrV4,
}

/// A host peer that sent to a UDP forward, so guest replies can find it.
struct UdpPeer {
    listener: usize,
    peer: SocketAddrV4,
    last_use: Instant,
}

#[derive(Default)]
pub struct Forwarders {
    pub listeners: Vec<Listener>,
    /// (guest address, guest port, virtual source port at the host address) → host peer.
    /// The guest address is part of the key so that nobody else on the guest's side (a
    /// host behind a routing guest, say) can answer in the guest's name.
    udp_peers: HashMap<(Ipv4Addr, u16, u16), UdpPeer>,
}

impl Forwarders {
    /// Binds every rule's host socket.
    pub fn bind(rules: &[HostFwd]) -> Result<Forwarders, HostFwdError> {
        let mut listeners = Vec::new();
        for rule in rules {
            let sock_err = |source| HostFwdError::Socket { rule: rule.rule.clone(), source };
            let ty = match rule.proto {
                FwdProto::Tcp => libc::SOCK_STREAM,
                FwdProto::Udp => libc::SOCK_DGRAM,
            };
            let sock = sys::socket(ty, 0).map_err(sock_err)?;
            let fd = sock.as_raw_fd();
            if rule.proto == FwdProto::Tcp {
                // Lets a restarted VM rebind while old connections sit in TIME_WAIT; a live
                // listener on the port still makes bind() fail.
                sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)
                    .map_err(sock_err)?;
            }
            sys::bind(fd, rule.host).map_err(|source| HostFwdError::Bind {
                rule: rule.rule.clone(),
                addr: rule.host,
                source,
            })?;
            if rule.proto == FwdProto::Tcp {
                sys::listen(fd, 128).map_err(sock_err)?;
            }
            let local = sys::local_addr(fd).map_err(sock_err)?;
            listeners.push(Listener { rule: rule.clone(), sock, local });
        }
        Ok(Forwarders { listeners, udp_peers: HashMap::new() })
    }

    pub fn register(&self, epoll: &Epoll) -> io::Result<()> {
        for (i, l) in self.listeners.iter().enumerate() {
            let kind = match l.rule.proto {
                FwdProto::Tcp => TOKEN_FWD_TCP,
                FwdProto::Udp => TOKEN_FWD_UDP,
            };
            epoll.add(
                l.sock.as_raw_fd(),
                libc::EPOLLIN as u32,
                ((kind as u64) << 56) | i as u64,
            )?;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.listeners.len()
    }
    /// Whether UDP peer associations need expiring.
    pub fn has_pending(&self) -> bool {
        !self.udp_peers.is_empty()
    }
}

impl Engine {
    fn fwd_guest(&self, idx: usize) -> Option<(Ipv4Addr, u16)> {
        let l = self.fwd.listeners.get(idx)?;
        Some((l.rule.guest_addr.unwrap_or_else(|| self.guest_addr_for_fwd()), l.rule.guest_port))
    }

    pub fn fwd_tcp_accept(&mut self, idx: usize) {
        let Some(guest) = self.fwd_guest(idx) else { return };
        for _ in 0..64 {
            let Some(l) = self.fwd.listeners.get(idx) else { return };
            match sys::accept(l.sock.as_raw_fd()) {
                Ok((sock, peer)) => self.tcp_start_inbound(sock, peer, guest),
                Err(e) if sys::would_block(&e) => return,
                Err(e) => {
                    // Out of fds: the connection waits in the backlog; old flows go on.
                    if sys::is_fd_exhaustion(&e) {
                        self.counters.drop(DropReason::NoFd);
                    }
                    log::warn!("user net: accept on hostfwd failed: {e}");
                    return;
                }
            }
        }
    }

    pub fn fwd_udp_event(&mut self, idx: usize) {
        let Some(guest) = self.fwd_guest(idx) else { return };
        let mut scratch = std::mem::take(&mut self.scratch);
        for _ in 0..64 {
            let Some(l) = self.fwd.listeners.get(idx) else { break };
            match sys::recvfrom(l.sock.as_raw_fd(), &mut scratch) {
                Ok((n, peer)) => {
                    if peer.port() == 0 {
                        continue;
                    }
                    self.fwd.udp_peers.insert(
                        (guest.0, guest.1, peer.port()),
                        UdpPeer { listener: idx, peer, last_use: self.now },
                    );
                    let mac = self.guest_mac.unwrap_or(MacAddr::BROADCAST);
                    let data = scratch.get(..n).unwrap_or(&[]);
                    self.udp_to_guest(mac, (self.p.host, peer.port()), guest, data, Proto::Udp);
                }
                Err(_) => break,
            }
        }
        self.scratch = scratch;
    }

    /// A guest datagram to the host address that answers a forwarded peer. Returns true
    /// when it was one (and was sent).
    pub fn fwd_udp_reply(&mut self, key: (Ipv4Addr, u16, Ipv4Addr, u16), payload: &[u8]) -> bool {
        let Some(p) = self.fwd.udp_peers.get_mut(&(key.0, key.1, key.3)) else { return false };
        p.last_use = self.now;
        let (idx, peer) = (p.listener, p.peer);
        let Some(l) = self.fwd.listeners.get(idx) else { return false };
        if sys::sendto(l.sock.as_raw_fd(), payload, peer).is_err() {
            self.counters.drop(DropReason::UdpSendFailed);
        }
        true
    }

    pub fn fwd_tick(&mut self) {
        let now = self.now;
        let idle = self.p.udp_idle;
        self.fwd.udp_peers.retain(|_, p| now.duration_since(p.last_use) < idle);
    }
}
