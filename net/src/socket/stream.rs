//! The `stream` backend: a TCP or UNIX stream socket to another VM (or to QEMU's
//! `-netdev stream`), each frame prefixed with its 4-byte big-endian length.
//!
//! - `listen` accepts one peer at a time (a second connection is refused while one is
//!   up), or, with `"hub": true`, up to 64 peers that all see each other's frames.
//! - `connect` waits for the listener at startup, retrying every 100 ms for up to
//!   `connect_timeout_ms` (default 5000), and **fails startup** when none answered, so a
//!   script learns at once that the other VM is missing. `connect_timeout_ms: 0` starts
//!   instead with the link down and connects in the background. Once running, a lost
//!   connection is retried every `reconnect_ms` (default 1000) with the link down.
//! - The link is up while a peer is connected. The guest sees it go down and up again.
//! - A hub forwards a peer's frame to the other peers when the local NIC receives it
//!   (inside `recv()`), so a NIC that stops receiving also stalls the hub.
//!
//! Config (`StreamConfig`), e.g.:
//!
//! ```json
//! {"listen": "127.0.0.1:5555"}
//! {"connect": "127.0.0.1:5555", "connect_timeout_ms": 10000}
//! {"listen": "unix:/run/user/1000/lan.sock", "hub": true}
//! {"connect": "unix:/run/user/1000/lan.sock", "connect_timeout_ms": 0, "reconnect_ms": 500}
//! ```
//!
//! All socket work happens inside `recv()`; `poll_fd()` is an epoll fd over the listener,
//! the peers, the reconnect timer and a flag that stays set while frames wait in our
//! buffers.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use thiserror::Error;

use super::hub::{Peer, Peers, RxEvent};
use super::{resolve, StreamAddr};
use crate::backend::{Backend, BackendCounters, BackendError, Offloads, VnetHdr, MAX_FRAME_LEN};
use crate::counters::{drop_reasons, LinkCounters};
use crate::log_limit::LogLimiter;
use crate::mac::MacAddr;
use crate::sys::{self, Epoll, Flag, TimerFd};
use crate::warn_limited;

/// `"backend": {"type": "stream", ...}` in the VM config.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// `"host:port"` or `"unix:/path"` to listen on.
    pub listen: Option<String>,
    /// `"host:port"` or `"unix:/path"` to connect to.
    pub connect: Option<String>,
    /// Accept many peers and forward frames among them (listen side only).
    pub hub: bool,
    /// How long startup waits for the listener; 0 = don't wait, connect in the background.
    pub connect_timeout_ms: u64,
    /// Interval between reconnect attempts while the link is down (connect side).
    pub reconnect_ms: u64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            listen: None,
            connect: None,
            hub: false,
            connect_timeout_ms: 5000,
            reconnect_ms: 1000,
        }
    }
}

#[derive(Debug, Error)]
pub enum StreamError {
    #[error("stream \"{field}\": {value:?} {reason}")]
    InvalidConfig { field: &'static str, value: String, reason: String },
    #[error("stream \"listen\": {addr}: {source}")]
    Listen { addr: String, source: io::Error },
    #[error(
        "stream \"connect\": {addr}: no listener answered within \"connect_timeout_ms\" \
         {timeout_ms} (last error: {last_error}); start the listening VM first, raise \
         \"connect_timeout_ms\", or set it to 0 to connect in the background"
    )]
    ConnectTimeout { addr: String, timeout_ms: u64, last_error: io::Error },
    #[error("stream: {what}: {source}")]
    Io { what: &'static str, source: io::Error },
}

fn invalid(field: &'static str, value: &str, reason: impl Into<String>) -> StreamError {
    StreamError::InvalidConfig { field, value: value.to_string(), reason: reason.into() }
}

const TOKEN_LISTENER: u64 = 1;
const TOKEN_TIMER: u64 = 2;
const TOKEN_CONNECTING: u64 = 3;
const TOKEN_PENDING: u64 = 4;
const FIRST_PEER_TOKEN: u64 = 16;

/// A hub bigger than this is more likely a connection flood than a network.
pub const MAX_HUB_PEERS: usize = 64;
const STARTUP_RETRY: Duration = Duration::from_millis(100);
/// How long the listener rests after accept() ran out of fds, so it cannot spin.
const LISTENER_PAUSE: Duration = Duration::from_secs(1);
const FIRST_RECONNECT: Duration = Duration::from_millis(50);
const PEER_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;

drop_reasons! {
    enum DropKind {
        LinkDown => "link_down",
        TxOffloadUnsupported => "tx_offload_unsupported",
        TxBadLength => "tx_bad_length",
        TxPeerLost => "tx_peer_lost",
        HubPeerCongested => "hub_peer_congested",
        RxBadLength => "rx_bad_length",
        RxTruncated => "rx_truncated_at_disconnect",
        RxTooLargeForBuffer => "rx_too_large_for_buffer",
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix { listener: UnixListener, path: PathBuf, identity: (u64, u64) },
}

impl Listener {
    fn raw(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix { listener, .. } => listener.as_raw_fd(),
        }
    }

    /// Accepts one pending connection as a non-blocking fd with a printable name.
    fn accept(&self) -> io::Result<(OwnedFd, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, from) = l.accept()?;
                s.set_nonblocking(true)?;
                let _ = s.set_nodelay(true);
                Ok((s.into(), from.to_string()))
            }
            Listener::Unix { listener, path, .. } => {
                let (s, _) = listener.accept()?;
                s.set_nonblocking(true)?;
                Ok((s.into(), format!("unix:{}", path.display())))
            }
        }
    }
}

enum Target {
    Tcp { addrs: Vec<SocketAddr>, next: usize },
    Unix(PathBuf),
}

enum Attempt {
    Connected(OwnedFd, String),
    InProgress(OwnedFd, String),
}

impl Target {
    fn next_tcp(addrs: &[SocketAddr], next: &mut usize) -> Option<SocketAddr> {
        let addr = addrs.get(*next % addrs.len().max(1)).copied();
        *next = next.wrapping_add(1);
        addr
    }

    fn connect_blocking(&mut self, timeout: Duration) -> io::Result<(OwnedFd, String)> {
        match self {
            Target::Tcp { addrs, next } => {
                let addr = Self::next_tcp(addrs, next).ok_or(io::ErrorKind::AddrNotAvailable)?;
                let s = TcpStream::connect_timeout(&addr, timeout.max(Duration::from_millis(1)))?;
                s.set_nonblocking(true)?;
                let _ = s.set_nodelay(true);
                Ok((s.into(), addr.to_string()))
            }
            Target::Unix(path) => {
                let s = UnixStream::connect(&*path)?;
                s.set_nonblocking(true)?;
                Ok((s.into(), format!("unix:{}", path.display())))
            }
        }
    }

    fn connect_nonblocking(&mut self) -> io::Result<Attempt> {
        use nix::sys::socket::{
            connect, socket, AddressFamily, SockFlag, SockType, SockaddrStorage, UnixAddr,
        };
        let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
        let (fd, result, name) = match self {
            Target::Tcp { addrs, next } => {
                let addr = Self::next_tcp(addrs, next).ok_or(io::ErrorKind::AddrNotAvailable)?;
                let family =
                    if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
                let fd = socket(family, SockType::Stream, flags, None).map_err(io::Error::from)?;
                let _ =
                    sys::setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
                let result = connect(fd.as_raw_fd(), &SockaddrStorage::from(addr));
                (fd, result, addr.to_string())
            }
            Target::Unix(path) => {
                let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None)
                    .map_err(io::Error::from)?;
                let addr = UnixAddr::new(path.as_path()).map_err(io::Error::from)?;
                let result = connect(fd.as_raw_fd(), &addr);
                (fd, result, format!("unix:{}", path.display()))
            }
        };
        match result {
            Ok(()) => Ok(Attempt::Connected(fd, name)),
            Err(nix::errno::Errno::EINPROGRESS) | Err(nix::errno::Errno::EAGAIN) => {
                Ok(Attempt::InProgress(fd, name))
            }
            Err(e) => Err(e.into()),
        }
    }
}

enum Role {
    Listen { listener: Listener, hub: bool, paused: bool },
    Connect { target: Target, connecting: Option<(OwnedFd, String)>, reconnect: Duration },
}

pub struct StreamBackend {
    role: Role,
    addr: StreamAddr,
    mac: MacAddr,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    pending: Flag,
    peers: Peers,
    next_token: u64,
    events: Vec<(u32, u64)>,
    counts: LinkCounters<DropKind>,
    refused_peers: u64,
    log: LogLimiter,
}

/// Binds a UNIX listener, replacing a stale socket file left by a dead process, but
/// never a live listener or a file that is not a socket.
fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    let first = match UnixListener::bind(path) {
        Ok(listener) => return Ok(listener),
        Err(e) => e,
    };
    if first.kind() != io::ErrorKind::AddrInUse {
        return Err(first);
    }
    if !std::fs::symlink_metadata(path)?.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => {
            Err(io::Error::new(io::ErrorKind::AddrInUse, "another process is listening on it"))
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("stream: removing stale socket {}", path.display());
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        Err(_) => Err(first),
    }
}

impl StreamBackend {
    /// Sets up the listener, or connects (waiting up to `connect_timeout_ms`). `mac` is
    /// the NIC's MAC, used to name this backend in logs.
    pub fn new(cfg: &StreamConfig, mac: MacAddr) -> Result<StreamBackend, StreamError> {
        let (field, spec, listen) = match (&cfg.listen, &cfg.connect) {
            (Some(l), None) => ("listen", l, true),
            (None, Some(c)) => ("connect", c, false),
            (Some(l), Some(_)) => {
                return Err(invalid(
                    "listen",
                    l,
                    "cannot be combined with \"connect\"; a stream backend is one side",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "listen",
                    "",
                    "is missing: a stream backend needs \"listen\" or \"connect\"",
                ))
            }
        };
        let addr = StreamAddr::parse(spec).map_err(|reason| invalid(field, spec, reason))?;
        if cfg.hub && !listen {
            return Err(invalid("hub", "true", "only applies to the \"listen\" side"));
        }
        if cfg.reconnect_ms < 10 {
            return Err(invalid(
                "reconnect_ms",
                &cfg.reconnect_ms.to_string(),
                "must be at least 10",
            ));
        }
        let io_err = |what| move |source| StreamError::Io { what, source };
        let epoll = Epoll::new().map_err(io_err("epoll_create"))?;
        let timer = TimerFd::new().map_err(io_err("timerfd_create"))?;
        let pending = Flag::new().map_err(io_err("eventfd"))?;
        epoll.add(timer.raw(), libc::EPOLLIN as u32, TOKEN_TIMER).map_err(io_err("epoll_ctl"))?;
        epoll
            .add(pending.raw(), libc::EPOLLIN as u32, TOKEN_PENDING)
            .map_err(io_err("epoll_ctl"))?;

        let role = if listen {
            let listen_err = |source| StreamError::Listen { addr: addr.to_string(), source };
            let listener = match &addr {
                StreamAddr::Tcp(hostport) => {
                    let addrs = resolve(hostport).map_err(|r| invalid("listen", spec, r))?;
                    let l = TcpListener::bind(&addrs[..]).map_err(listen_err)?;
                    l.set_nonblocking(true).map_err(listen_err)?;
                    Listener::Tcp(l)
                }
                StreamAddr::Unix(path) => {
                    let l = bind_unix(path).map_err(listen_err)?;
                    l.set_nonblocking(true).map_err(listen_err)?;
                    let meta = std::fs::symlink_metadata(path).map_err(listen_err)?;
                    Listener::Unix {
                        listener: l,
                        path: path.clone(),
                        identity: (meta.dev(), meta.ino()),
                    }
                }
            };
            epoll
                .add(listener.raw(), libc::EPOLLIN as u32, TOKEN_LISTENER)
                .map_err(io_err("epoll_ctl"))?;
            Role::Listen { listener, hub: cfg.hub, paused: false }
        } else {
            let target = match &addr {
                StreamAddr::Tcp(hostport) => Target::Tcp {
                    addrs: resolve(hostport).map_err(|r| invalid("connect", spec, r))?,
                    next: 0,
                },
                StreamAddr::Unix(path) => Target::Unix(path.clone()),
            };
            Role::Connect {
                target,
                connecting: None,
                reconnect: Duration::from_millis(cfg.reconnect_ms),
            }
        };

        let mut backend = StreamBackend {
            role,
            addr,
            mac,
            epoll,
            timer,
            timer_armed: false,
            pending,
            peers: Peers::default(),
            next_token: FIRST_PEER_TOKEN,
            events: Vec::with_capacity(32),
            counts: LinkCounters::new(),
            refused_peers: 0,
            log: LogLimiter::default_rate(),
        };
        match &backend.role {
            Role::Listen { .. } => {
                log::info!(
                    "stream {} (NIC {}): listening; link down until a peer connects",
                    backend.addr,
                    mac
                )
            }
            Role::Connect { .. } if cfg.connect_timeout_ms == 0 => {
                log::info!(
                    "stream {} (NIC {}): connecting in the background; link down",
                    backend.addr,
                    mac
                );
                backend.settle();
            }
            Role::Connect { .. } => {
                backend.connect_at_startup(Duration::from_millis(cfg.connect_timeout_ms))?
            }
        }
        Ok(backend)
    }

    fn connect_at_startup(&mut self, timeout: Duration) -> Result<(), StreamError> {
        let Role::Connect { target, .. } = &mut self.role else {
            return Ok(());
        };
        let deadline = Instant::now() + timeout;
        let (fd, name) = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match target.connect_blocking(remaining) {
                Ok(connected) => break connected,
                Err(e) if remaining.is_zero() => {
                    return Err(StreamError::ConnectTimeout {
                        addr: self.addr.to_string(),
                        timeout_ms: timeout.as_millis() as u64,
                        last_error: e,
                    })
                }
                Err(_) => std::thread::sleep(STARTUP_RETRY.min(remaining)),
            }
        };
        self.add_peer(fd, name);
        Ok(())
    }

    /// The bound address of a TCP listener (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.role {
            Role::Listen { listener: Listener::Tcp(l), .. } => l.local_addr().ok(),
            _ => None,
        }
    }

    /// Connected peers (at most one unless this is a hub).
    pub fn peer_count(&self) -> usize {
        self.peers.open_count()
    }

    fn is_hub(&self) -> bool {
        matches!(self.role, Role::Listen { hub: true, .. })
    }

    fn add_peer(&mut self, fd: OwnedFd, name: String) {
        let token = self.next_token;
        self.next_token += 1;
        if let Err(e) = self.epoll.add(fd.as_raw_fd(), PEER_EVENTS, token) {
            log::warn!("stream {}: cannot watch peer {name}: {e}; dropping it", self.addr);
            return;
        }
        let was_down = self.peers.open_count() == 0;
        log::info!(
            "stream {} (NIC {}): peer {name} connected{}",
            self.addr,
            self.mac,
            if was_down { "; link up" } else { "" }
        );
        let mut peer = Peer::new(token, fd, name);
        peer.registered = true;
        self.peers.list.push(peer);
        if let Role::Connect { .. } = self.role {
            if self.timer_armed {
                let _ = self.timer.disarm();
                self.timer_armed = false;
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            let Role::Listen { listener, hub, .. } = &self.role else {
                return;
            };
            let hub = *hub;
            match listener.accept() {
                Ok((fd, name)) => {
                    let open = self.peers.open_count();
                    if (!hub && open >= 1) || (hub && open >= MAX_HUB_PEERS) {
                        self.refused_peers += 1;
                        warn_limited!(
                            self.log,
                            "stream {}: refusing {name}: {}",
                            self.addr,
                            if hub {
                                "the hub is full"
                            } else {
                                "a peer is already connected (use \"hub\": true for more)"
                            }
                        );
                        drop(fd);
                        continue;
                    }
                    self.add_peer(fd, name);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // Out of fds (or similar): the connection stays queued and the listener
                    // readable, so rest it instead of spinning.
                    warn_limited!(
                        self.log,
                        "stream {}: accept failed: {e}; pausing the listener",
                        self.addr
                    );
                    self.pause_listener();
                    return;
                }
            }
        }
    }

    fn pause_listener(&mut self) {
        if let Role::Listen { listener, paused, .. } = &mut self.role {
            if !*paused {
                let _ = self.epoll.delete(listener.raw());
                *paused = true;
                let _ = self.timer.arm(LISTENER_PAUSE, Duration::ZERO);
                self.timer_armed = true;
            }
        }
    }

    fn on_timer(&mut self) {
        self.timer.drain();
        let open = self.peers.open_count();
        match &mut self.role {
            Role::Listen { listener, paused, .. } => {
                self.timer_armed = false;
                if *paused {
                    *paused = false;
                    if let Err(e) =
                        self.epoll.add(listener.raw(), libc::EPOLLIN as u32, TOKEN_LISTENER)
                    {
                        log::error!("stream {}: cannot resume the listener: {e}", self.addr);
                    }
                }
            }
            Role::Connect { target, connecting, .. } => {
                if open > 0 || connecting.is_some() {
                    return;
                }
                match target.connect_nonblocking() {
                    Ok(Attempt::Connected(fd, name)) => self.add_peer(fd, name),
                    Ok(Attempt::InProgress(fd, name)) => {
                        let events = (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32;
                        if let Err(e) = self.epoll.add(fd.as_raw_fd(), events, TOKEN_CONNECTING) {
                            log::warn!("stream {}: cannot watch connect: {e}", self.addr);
                        } else {
                            *connecting = Some((fd, name));
                        }
                    }
                    Err(e) => log::debug!("stream {}: reconnect failed: {e}", self.addr),
                }
            }
        }
    }

    fn finish_connect(&mut self) {
        let Role::Connect { connecting, .. } = &mut self.role else {
            return;
        };
        let Some((fd, name)) = connecting.take() else {
            return;
        };
        let _ = self.epoll.delete(fd.as_raw_fd());
        match sys::take_socket_error(fd.as_raw_fd()) {
            None => self.add_peer(fd, name),
            Some(e) => log::debug!("stream {}: reconnect failed: {e}", self.addr),
        }
    }

    /// Processes whatever the sockets and timer have ready, without waiting.
    fn service(&mut self) {
        let mut events = std::mem::take(&mut self.events);
        if let Err(e) = self.epoll.poll_now(&mut events) {
            warn_limited!(self.log, "stream {}: epoll_wait failed: {e}", self.addr);
        }
        for &(ready, token) in &events {
            match token {
                TOKEN_LISTENER => self.accept_all(),
                TOKEN_TIMER => self.on_timer(),
                TOKEN_CONNECTING => self.finish_connect(),
                TOKEN_PENDING => {}
                _ => {
                    if let Some(peer) = self.peers.by_token(token) {
                        if ready & libc::EPOLLOUT as u32 != 0 {
                            peer.flush();
                        }
                        let readable =
                            (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR)
                                as u32;
                        if ready & readable != 0 {
                            peer.read_some();
                        }
                    }
                }
            }
        }
        self.events = events;
        self.settle();
    }

    /// Brings epoll interest, the peer list, the reconnect timer and the pending flag in
    /// line with the peers' states.
    fn settle(&mut self) {
        for peer in &mut self.peers.list {
            if !peer.is_open() {
                if peer.registered {
                    let _ = self.epoll.delete(peer.raw());
                    peer.registered = false;
                }
                continue;
            }
            let wants_write = !peer.tx.is_empty();
            if wants_write != peer.wants_write {
                let events = PEER_EVENTS | if wants_write { libc::EPOLLOUT as u32 } else { 0 };
                if self.epoll.modify(peer.raw(), events, peer.token).is_ok() {
                    peer.wants_write = wants_write;
                }
            }
        }
        let removed = self.peers.reap();
        let truncated = removed.iter().filter(|p| p.rx.has_partial()).count();
        for _ in 0..truncated {
            self.counts.dropped(DropKind::RxTruncated);
        }
        if !removed.is_empty() && self.peers.open_count() == 0 {
            log::info!("stream {}: no peer connected; link down", self.addr);
        }
        if let Role::Connect { connecting, reconnect, .. } = &self.role {
            if self.peers.open_count() == 0 && connecting.is_none() && !self.timer_armed {
                if let Err(e) = self.timer.arm(FIRST_RECONNECT, *reconnect) {
                    log::error!("stream {}: cannot arm the reconnect timer: {e}", self.addr);
                } else {
                    self.timer_armed = true;
                }
            }
        }
        let waiting = self.peers.any_complete_frame();
        self.pending.set(waiting);
    }
}

impl Backend for StreamBackend {
    fn kind(&self) -> &'static str {
        "stream"
    }

    fn poll_fd(&self) -> RawFd {
        self.epoll.raw()
    }

    fn supported_offloads(&self) -> Offloads {
        Offloads::NONE
    }

    fn set_rx_offloads(&mut self, _offloads: Offloads) -> io::Result<()> {
        // Frames from a peer are plain; there is nothing to switch.
        Ok(())
    }

    fn send(&mut self, hdr: &VnetHdr, frame: &[u8]) -> Result<(), BackendError> {
        if !hdr.is_plain() {
            self.counts.dropped(DropKind::TxOffloadUnsupported);
            return Err(BackendError::Dropped("stream backend takes no offloaded frames"));
        }
        if frame.is_empty() || frame.len() > MAX_FRAME_LEN {
            self.counts.dropped(DropKind::TxBadLength);
            return Err(BackendError::Dropped("frame length out of range"));
        }
        if self.peers.open_count() == 0 {
            self.counts.dropped(DropKind::LinkDown);
            return Err(BackendError::Dropped("stream link is down"));
        }
        let result = if self.is_hub() {
            let (_, congested) = self.peers.flood(frame, None);
            for _ in 0..congested {
                self.counts.dropped(DropKind::HubPeerCongested);
            }
            Ok(())
        } else {
            match self.peers.list.iter_mut().find(|p| p.is_open()).map(|p| p.offer(frame)) {
                Some(super::hub::Offer::Taken) => Ok(()),
                Some(super::hub::Offer::Congested) => Err(BackendError::WouldBlock),
                Some(super::hub::Offer::Broken) | None => {
                    self.counts.dropped(DropKind::TxPeerLost);
                    Err(BackendError::Dropped("stream peer disconnected"))
                }
            }
        };
        self.settle();
        if result.is_ok() {
            self.counts.sent(frame.len());
        }
        result
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(VnetHdr, usize)>, BackendError> {
        for round in 0..2 {
            match self.peers.take_frame(buf) {
                Some(RxEvent::Frame(frame)) => {
                    if self.is_hub() {
                        let (_, congested) =
                            self.peers.flood(buf.get(..frame.len).unwrap_or(&[]), Some(frame.from));
                        for _ in 0..congested {
                            self.counts.dropped(DropKind::HubPeerCongested);
                        }
                    }
                    self.counts.received(frame.len);
                    self.settle();
                    return Ok(Some((VnetHdr::default(), frame.len)));
                }
                Some(RxEvent::TooLarge(len)) => {
                    self.counts.dropped(DropKind::RxTooLargeForBuffer);
                    self.settle();
                    warn_limited!(
                        self.log,
                        "stream {}: {len}-byte frame does not fit the receive buffer",
                        self.addr
                    );
                    return Err(BackendError::Dropped("frame larger than receive buffer"));
                }
                Some(RxEvent::BadLength { peer, len }) => {
                    self.counts.dropped(DropKind::RxBadLength);
                    // A hub peer could reconnect and repeat this at will: limit the lines.
                    if self.log.allow().is_some() {
                        log::error!(
                        "stream {}: peer {peer} sent a frame length of {len} (allowed 1..={MAX_FRAME_LEN}); \
                         the stream is corrupt, disconnecting it",
                        self.addr
                        );
                    }
                }
                None if round == 0 => self.service(),
                None => {}
            }
        }
        self.settle();
        Ok(None)
    }

    fn link_up(&self) -> bool {
        self.peers.open_count() > 0
    }

    fn counters(&self) -> BackendCounters {
        self.counts.report(vec![
            ("peers", self.peers.open_count() as u64),
            ("refused_peers", self.refused_peers),
        ])
    }
}

impl Drop for StreamBackend {
    fn drop(&mut self) {
        if let Role::Listen { listener: Listener::Unix { path, identity, .. }, .. } = &self.role {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if (meta.dev(), meta.ino()) == *identity {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
