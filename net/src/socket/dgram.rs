//! The `dgram` backend: one Ethernet frame per UDP datagram (QEMU's `-netdev dgram`
//! format), either to one unicast peer (`local` + `remote`) or to an IPv4 multicast
//! group (`mcast`) that any number of VMs join.
//!
//! Config (`DgramConfig`), e.g.:
//!
//! ```json
//! {"local": "127.0.0.1:7001", "remote": "127.0.0.1:7002"}
//! {"mcast": "230.0.0.1:1234"}
//! {"mcast": "230.0.0.1:1234", "ttl": 1, "loopback": true, "local_addr": "192.168.1.10"}
//! ```
//!
//! Multicast uses two sockets: one bound to the group's port (shared with the other
//! members through SO_REUSEADDR) to receive, and one on an ephemeral port to send. With
//! `loopback` on (the default, and needed for VMs on the same host to hear each other)
//! the kernel also hands our own datagrams back; they are recognised by their source
//! (our send socket's port) together with the frame's source MAC (this NIC's) and
//! dropped. A frame carrying this NIC's MAC from anywhere else is a MAC conflict: it is
//! dropped, counted and logged.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

use serde::Deserialize;
use thiserror::Error;

use super::resolve;
use crate::backend::{Backend, BackendCounters, BackendError, Offloads, VnetHdr};
use crate::counters::{drop_reasons, LinkCounters};
use crate::log_limit::LogLimiter;
use crate::mac::MacAddr;
use crate::sys;
use crate::warn_limited;

/// `"backend": {"type": "dgram", ...}` in the VM config.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DgramConfig {
    /// Unicast: `"host:port"` to bind.
    pub local: Option<String>,
    /// Unicast: `"host:port"` of the peer; datagrams from anywhere else are ignored.
    pub remote: Option<String>,
    /// Multicast: `"group:port"`, an IPv4 group such as 230.0.0.1:1234.
    pub mcast: Option<String>,
    /// Multicast TTL (default 1: the local network only).
    pub ttl: Option<u32>,
    /// Multicast loopback (default true: other VMs on this host hear us). Over `lo`
    /// itself every datagram loops back whatever this says.
    pub loopback: Option<bool>,
    /// Multicast: IPv4 address of the interface to use (default: chosen by routing).
    pub local_addr: Option<String>,
}

#[derive(Debug, Error)]
pub enum DgramError {
    #[error("dgram \"{field}\": {value:?} {reason}")]
    InvalidConfig { field: &'static str, value: String, reason: String },
    #[error("dgram \"{field}\": {value}: {source}")]
    Socket { field: &'static str, value: String, source: io::Error },
}

fn invalid(field: &'static str, value: &str, reason: impl Into<String>) -> DgramError {
    DgramError::InvalidConfig { field, value: value.to_string(), reason: reason.into() }
}

/// The largest UDP payload over IPv4.
pub const MAX_DATAGRAM_FRAME: usize = 65507;
const ETH_HEADER_LEN: usize = 14;
/// Datagrams handled per `recv` call before yielding back to the event loop, so a flood
/// of our own looped-back frames cannot hold it.
const RECV_BUDGET: usize = 64;

drop_reasons! {
    enum DropKind {
        TxOffloadUnsupported => "tx_offload_unsupported",
        TxTooLarge => "tx_too_large_for_udp",
        TxSocketFull => "tx_socket_full",
        TxPeerUnreachable => "tx_peer_unreachable",
        TxError => "tx_error",
        RxRunt => "rx_runt",
        RxTooLarge => "rx_too_large_for_buffer",
        RxMacConflict => "rx_mac_conflict",
        RxForeignSource => "rx_foreign_source",
        RxError => "rx_error",
    }
}

enum Mode {
    Unicast { remote: SocketAddr },
    Multicast { group: SocketAddrV4, tx: UdpSocket, own_source: SocketAddrV4 },
}

pub struct DgramBackend {
    /// Unicast: the one socket. Multicast: the receiving socket bound to the group.
    rx: UdpSocket,
    mode: Mode,
    mac: MacAddr,
    description: String,
    counts: LinkCounters<DropKind>,
    own_frames_ignored: u64,
    log: LogLimiter,
}

fn resolve_one(field: &'static str, value: &str) -> Result<SocketAddr, DgramError> {
    let addrs = resolve(value).map_err(|r| invalid(field, value, r))?;
    addrs.first().copied().ok_or_else(|| invalid(field, value, "resolves to no address"))
}

fn bound_socket(addr: SocketAddr, reuse: bool) -> io::Result<UdpSocket> {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd =
        socket(family, SockType::Datagram, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    if reuse {
        sys::setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(UdpSocket::from(fd))
}

impl DgramBackend {
    /// Opens the sockets. `mac` is the NIC's MAC, used to recognise its own frames.
    pub fn new(cfg: &DgramConfig, mac: MacAddr) -> Result<DgramBackend, DgramError> {
        let (rx, mode, description) =
            match (&cfg.mcast, &cfg.remote) {
                (Some(m), Some(_)) => {
                    return Err(invalid(
                        "mcast",
                        m,
                        "cannot be combined with \"remote\"; choose multicast or unicast",
                    ))
                }
                (None, None) => return Err(invalid(
                    "remote",
                    "",
                    "is missing: a dgram backend needs \"remote\" (with \"local\") or \"mcast\"",
                )),
                (Some(m), None) => Self::open_multicast(cfg, m)?,
                (None, Some(r)) => Self::open_unicast(cfg, r)?,
            };
        log::info!("dgram {description} (NIC {mac}): ready");
        Ok(DgramBackend {
            rx,
            mode,
            mac,
            description,
            counts: LinkCounters::new(),
            own_frames_ignored: 0,
            log: LogLimiter::default_rate(),
        })
    }

    fn open_unicast(
        cfg: &DgramConfig,
        remote_spec: &str,
    ) -> Result<(UdpSocket, Mode, String), DgramError> {
        for (field, set) in [
            ("ttl", cfg.ttl.is_some()),
            ("loopback", cfg.loopback.is_some()),
            ("local_addr", cfg.local_addr.is_some()),
        ] {
            if set {
                return Err(invalid(field, "", "only applies with \"mcast\""));
            }
        }
        let Some(local_spec) = &cfg.local else {
            return Err(invalid("local", "", "is missing: unicast needs \"local\" and \"remote\" (each VM sends to the other's \"local\")"));
        };
        let remote = resolve_one("remote", remote_spec)?;
        let local = resolve_one("local", local_spec)?;
        if remote.port() == 0 {
            return Err(invalid("remote", remote_spec, "needs a port other than 0"));
        }
        let sock = bound_socket(local, false).map_err(|source| DgramError::Socket {
            field: "local",
            value: local_spec.clone(),
            source,
        })?;
        // A connected UDP socket receives only from `remote`: the kernel filters for us.
        sock.connect(remote).map_err(|source| DgramError::Socket {
            field: "remote",
            value: remote_spec.to_string(),
            source,
        })?;
        let bound = sock.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| local_spec.clone());
        Ok((sock, Mode::Unicast { remote }, format!("udp {bound} -> {remote}")))
    }

    fn open_multicast(
        cfg: &DgramConfig,
        spec: &str,
    ) -> Result<(UdpSocket, Mode, String), DgramError> {
        if let Some(local) = &cfg.local {
            return Err(invalid(
                "local",
                local,
                "only applies to unicast; use \"local_addr\" to pick the multicast interface",
            ));
        }
        let group = match resolve_one("mcast", spec)? {
            SocketAddr::V4(v4) if v4.ip().is_multicast() && v4.port() != 0 => v4,
            SocketAddr::V4(_) => {
                return Err(invalid(
                    "mcast",
                    spec,
                    "must be an IPv4 multicast group (224.0.0.0/4) with a port",
                ))
            }
            SocketAddr::V6(_) => {
                return Err(invalid("mcast", spec, "must be IPv4; IPv6 multicast is not supported"))
            }
        };
        let ttl = cfg.ttl.unwrap_or(1);
        if ttl > 255 {
            return Err(invalid("ttl", &ttl.to_string(), "must be 0..=255"));
        }
        let interface = match &cfg.local_addr {
            None => Ipv4Addr::UNSPECIFIED,
            Some(s) => match s.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) if !ip.is_multicast() => ip,
                _ => {
                    return Err(invalid(
                        "local_addr",
                        s,
                        "must be the IPv4 address of a local interface",
                    ))
                }
            },
        };
        let sock_err = |field: &'static str, value: String| {
            move |source| DgramError::Socket { field, value, source }
        };

        // Receive: bound to the group itself, so only this group's datagrams arrive.
        let rx = bound_socket(SocketAddr::V4(group), true)
            .map_err(sock_err("mcast", spec.to_string()))?;
        rx.join_multicast_v4(group.ip(), &interface).map_err(sock_err(
            if cfg.local_addr.is_some() { "local_addr" } else { "mcast" },
            format!("joining {} on {interface}", group.ip()),
        ))?;

        // Send: an ephemeral port of our own, which is how our looped-back frames are known.
        let tx = bound_socket(SocketAddr::from((interface, 0)), false)
            .map_err(sock_err("local_addr", interface.to_string()))?;
        if !interface.is_unspecified() {
            sys::set_multicast_if_v4(tx.as_raw_fd(), interface)
                .map_err(sock_err("local_addr", interface.to_string()))?;
        }
        tx.set_multicast_ttl_v4(ttl).map_err(sock_err("ttl", ttl.to_string()))?;
        let loopback = cfg.loopback.unwrap_or(true);
        tx.set_multicast_loop_v4(loopback).map_err(sock_err("loopback", loopback.to_string()))?;
        let own_source = match tx.local_addr() {
            Ok(SocketAddr::V4(a)) => a,
            _ => SocketAddrV4::new(interface, 0),
        };
        let description = format!("mcast {group} via {interface}");
        Ok((rx, Mode::Multicast { group, tx, own_source }, description))
    }

    /// The socket our frames leave from (the send socket for multicast).
    pub fn send_addr(&self) -> Option<SocketAddr> {
        match &self.mode {
            Mode::Unicast { .. } => self.rx.local_addr().ok(),
            Mode::Multicast { tx, .. } => tx.local_addr().ok(),
        }
    }

    /// Whether a datagram from `source` is one of ours that multicast loopback returned.
    fn sent_by_own_socket(&self, source: Option<SocketAddr>) -> bool {
        let Mode::Multicast { own_source, .. } = &self.mode else {
            return false;
        };
        match source {
            Some(SocketAddr::V4(src)) => {
                src.port() == own_source.port()
                    && (own_source.ip().is_unspecified() || src.ip() == own_source.ip())
            }
            _ => false,
        }
    }

    fn send_error(&mut self, e: io::Error) -> BackendError {
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::ENOBUFS) => {
                self.counts.dropped(DropKind::TxSocketFull);
                BackendError::Dropped("udp socket buffer full")
            }
            Some(libc::ECONNREFUSED) | Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => {
                self.counts.dropped(DropKind::TxPeerUnreachable);
                warn_limited!(self.log, "dgram {}: peer unreachable: {e}", self.description);
                BackendError::Dropped("udp peer unreachable")
            }
            _ => {
                self.counts.dropped(DropKind::TxError);
                warn_limited!(self.log, "dgram {}: send failed: {e}", self.description);
                BackendError::Dropped("udp send failed")
            }
        }
    }
}

impl Backend for DgramBackend {
    fn kind(&self) -> &'static str {
        "dgram"
    }

    fn poll_fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }

    fn supported_offloads(&self) -> Offloads {
        Offloads::NONE
    }

    fn set_rx_offloads(&mut self, _offloads: Offloads) -> io::Result<()> {
        Ok(())
    }

    fn send(&mut self, hdr: &VnetHdr, frame: &[u8]) -> Result<(), BackendError> {
        if !hdr.is_plain() {
            self.counts.dropped(DropKind::TxOffloadUnsupported);
            return Err(BackendError::Dropped("dgram backend takes no offloaded frames"));
        }
        if frame.len() > MAX_DATAGRAM_FRAME {
            self.counts.dropped(DropKind::TxTooLarge);
            return Err(BackendError::Dropped("frame larger than a UDP datagram"));
        }
        let result = match &self.mode {
            Mode::Unicast { .. } => self.rx.send(frame),
            Mode::Multicast { group, tx, .. } => tx.send_to(frame, *group),
        };
        match result {
            Ok(_) => {
                self.counts.sent(frame.len());
                Ok(())
            }
            Err(e) => Err(self.send_error(e)),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(VnetHdr, usize)>, BackendError> {
        for _ in 0..RECV_BUDGET {
            let (len, source) = match sys::recv_datagram(self.rx.as_raw_fd(), buf) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                // An ICMP error for an earlier unicast send; not a frame.
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    self.counts.dropped(DropKind::TxPeerUnreachable);
                    continue;
                }
                Err(e) => {
                    self.counts.dropped(DropKind::RxError);
                    warn_limited!(self.log, "dgram {}: receive failed: {e}", self.description);
                    return Ok(None);
                }
            };
            if len > buf.len() {
                self.counts.dropped(DropKind::RxTooLarge);
                continue;
            }
            let Some(frame) = buf.get(..len).filter(|f| f.len() >= ETH_HEADER_LEN) else {
                self.counts.dropped(DropKind::RxRunt);
                continue;
            };
            if let Mode::Unicast { remote } = &self.mode {
                // The socket is connected, but be explicit about foreign senders.
                if source.is_some_and(|s| s != *remote) {
                    self.counts.dropped(DropKind::RxForeignSource);
                    continue;
                }
            }
            let source_mac = frame.get(6..12).and_then(|b| <[u8; 6]>::try_from(b).ok());
            if source_mac == Some(self.mac.0) {
                if self.sent_by_own_socket(source) {
                    self.own_frames_ignored += 1;
                } else {
                    self.counts.dropped(DropKind::RxMacConflict);
                    warn_limited!(
                        self.log,
                        "dgram {}: a frame from {} carries this NIC's own MAC {}; two NICs share it",
                        self.description,
                        source.map_or_else(|| "?".to_string(), |s| s.to_string()),
                        self.mac
                    );
                }
                continue;
            }
            self.counts.received(len);
            return Ok(Some((VnetHdr::default(), len)));
        }
        Ok(None)
    }

    fn counters(&self) -> BackendCounters {
        self.counts.report(vec![("own_frames_ignored", self.own_frames_ignored)])
    }
}

#[cfg(test)]
#[path = "dgram_tests.rs"]
mod tests;
