//! ICMP echo. The gateway and DNS addresses answer themselves. Echo to anything else goes
//! out through an unprivileged ICMP datagram ("ping") socket when
//! net.ipv4.ping_group_range allows it, else through a raw socket when we may open one,
//! else it is dropped and counted.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use super::counters::{DropReason, Proto};
use super::engine::{Engine, TOKEN_ICMP, TOKEN_ICMP_RAW};
use super::slab::{Handle, Slab};
use super::wire::*;
use crate::backend::VnetHdr;
use crate::mac::MacAddr;
use crate::sys;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpMode {
    PingSocket,
    Raw,
    Unavailable,
}

impl IcmpMode {
    /// What this process may open, tried once.
    pub fn detect() -> IcmpMode {
        if sys::socket(libc::SOCK_DGRAM, libc::IPPROTO_ICMP).is_ok() {
            IcmpMode::PingSocket
        } else if sys::socket(libc::SOCK_RAW, libc::IPPROTO_ICMP).is_ok() {
            IcmpMode::Raw
        } else {
            IcmpMode::Unavailable
        }
    }
}

/// (source, id as received, sequence number, data)
pub type EchoReply = (Ipv4Addr, u16, u16, Vec<u8>);

/// A socket that carries echo requests to a host destination.
pub struct EchoSocket {
    pub mode: IcmpMode,
    pub fd: OwnedFd,
}

impl EchoSocket {
    pub fn open(mode: IcmpMode, dst: Option<Ipv4Addr>) -> io::Result<EchoSocket> {
        let fd = match mode {
            IcmpMode::PingSocket => {
                let fd = sys::socket(libc::SOCK_DGRAM, libc::IPPROTO_ICMP)?;
                if let Some(d) = dst {
                    sys::connect(fd.as_raw_fd(), SocketAddrV4::new(d, 0))?;
                }
                fd
            }
            IcmpMode::Raw => sys::socket(libc::SOCK_RAW, libc::IPPROTO_ICMP)?,
            IcmpMode::Unavailable => return Err(io::Error::from_raw_os_error(libc::EPERM)),
        };
        Ok(EchoSocket { mode, fd })
    }
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    /// Sends an echo request (ICMP header + data; the checksum is recomputed here).
    pub fn send_echo(&self, dst: Ipv4Addr, id: u16, seq: u16, data: &[u8]) -> io::Result<()> {
        let mut m = Vec::with_capacity(ICMP_HDR_LEN + data.len());
        m.extend_from_slice(&[ICMP_ECHO_REQUEST, 0, 0, 0]);
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(data);
        let c = checksum(&m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        match self.mode {
            IcmpMode::PingSocket => sys::send(self.raw_fd(), &m).map(|_| ()),
            _ => sys::sendto(self.raw_fd(), &m, SocketAddrV4::new(dst, 0)).map(|_| ()),
        }
    }
    /// Reads one echo reply: (source, id as received, seq, data). `Ok(None)` for other ICMP.
    pub fn recv_echo_reply(&self, buf: &mut [u8]) -> io::Result<Option<EchoReply>> {
        let (n, from) = sys::recvfrom(self.raw_fd(), buf)?;
        let bytes = buf.get(..n).unwrap_or(&[]);
        let icmp_bytes = match self.mode {
            IcmpMode::Raw => match Ipv4Packet::new(bytes) {
                Ok(ip) if ip.protocol() == IPPROTO_ICMP => ip.payload(),
                _ => return Ok(None),
            },
            _ => bytes,
        };
        let Ok(icmp) = IcmpPacket::new(icmp_bytes) else { return Ok(None) };
        if icmp.icmp_type() != ICMP_ECHO_REPLY || icmp.code() != 0 {
            return Ok(None);
        }
        Ok(Some((*from.ip(), icmp.ident(), icmp.seq_no(), icmp.data().to_vec())))
    }
}

/// (guest ip, guest echo id, destination)
type IcmpKey = (Ipv4Addr, u16, Ipv4Addr);

struct IcmpFlow {
    key: IcmpKey,
    /// The echo id on the wire. Through the shared raw socket every flow gets one of its
    /// own, so that senders using the same id (the guest and hosts it routes for) each
    /// get their own replies. A ping socket has the kernel pick it instead.
    wire_id: u16,
    sock: Option<EchoSocket>,
    guest_mac: MacAddr,
    last_use: Instant,
}

pub struct IcmpTable {
    mode: Option<IcmpMode>,
    raw: Option<EchoSocket>,
    flows: Slab<IcmpFlow>,
    by_key: HashMap<IcmpKey, Handle>,
    /// Raw-socket flows by (wire id, destination), which is what a reply carries.
    by_wire: HashMap<(u16, Ipv4Addr), Handle>,
    next_wire_id: u16,
}

impl IcmpTable {
    pub fn new() -> Self {
        IcmpTable {
            mode: None,
            raw: None,
            flows: Slab::default(),
            by_key: HashMap::new(),
            by_wire: HashMap::new(),
            next_wire_id: 0,
        }
    }
    pub fn len(&self) -> usize {
        self.flows.len()
    }
    /// Forces a mode (tests: pretend neither socket kind is allowed).
    pub fn set_mode(&mut self, mode: IcmpMode) {
        self.mode = Some(mode);
    }
    /// An echo id no raw-socket flow to `dst` uses (the flow limit keeps some free).
    fn free_wire_id(&mut self, dst: Ipv4Addr) -> Option<u16> {
        for _ in 0..=u16::MAX {
            let id = self.next_wire_id;
            self.next_wire_id = id.wrapping_add(1);
            if !self.by_wire.contains_key(&(id, dst)) {
                return Some(id);
            }
        }
        None
    }
    fn remove(&mut self, h: Handle) -> Option<IcmpFlow> {
        let f = self.flows.remove(h)?;
        self.by_key.remove(&f.key);
        if f.sock.is_none() {
            self.by_wire.remove(&(f.wire_id, f.key.2));
        }
        Some(f)
    }
}

impl Default for IcmpTable {
    fn default() -> Self {
        Self::new()
    }
}

impl Engine {
    pub fn icmp_input(&mut self, guest_mac: MacAddr, ip: &Ipv4Packet, icmp: &IcmpPacket) {
        if icmp.icmp_type() != ICMP_ECHO_REQUEST || icmp.code() != 0 {
            return self.counters.drop(DropReason::IcmpUnsupported);
        }
        let dst = ip.dst();
        if dst == self.p.host || dst == self.p.dns {
            return self.icmp_reply_to_guest(
                guest_mac,
                dst,
                ip.src(),
                icmp.ident(),
                icmp.seq_no(),
                icmp.data(),
            );
        }
        // ICMP has no port; 7 (echo) only lets `resolve` apply its address rules.
        if let Err(reason) = self.resolve(dst, 7) {
            return self.counters.drop(reason);
        }
        let mode = *self.icmp.mode.get_or_insert_with(IcmpMode::detect);
        if mode == IcmpMode::Unavailable {
            return self.counters.drop(DropReason::IcmpUnavailable);
        }
        let key: IcmpKey = (ip.src(), icmp.ident(), dst);
        let h = match self.icmp.by_key.get(&key) {
            Some(h) => *h,
            None => match self.icmp_open(key, guest_mac, mode) {
                Ok(h) => h,
                Err(reason) => return self.counters.drop(reason),
            },
        };
        let Some(flow) = self.icmp.flows.get_mut(h) else { return };
        flow.last_use = self.now;
        flow.guest_mac = guest_mac;
        let sock = flow.sock.as_ref().or(self.icmp.raw.as_ref());
        let sent = sock.map(|s| s.send_echo(dst, flow.wire_id, icmp.seq_no(), icmp.data()));
        if !matches!(sent, Some(Ok(()))) {
            self.counters.drop(DropReason::SocketError);
        }
    }

    fn icmp_open(
        &mut self,
        key: IcmpKey,
        guest_mac: MacAddr,
        mode: IcmpMode,
    ) -> Result<Handle, DropReason> {
        if self.flows_open() >= self.p.max_flows {
            return Err(DropReason::FlowLimit);
        }
        let fail = |e: io::Error| {
            if sys::is_fd_exhaustion(&e) {
                DropReason::NoFd
            } else {
                DropReason::IcmpUnavailable
            }
        };
        let sock = match mode {
            IcmpMode::PingSocket => Some(EchoSocket::open(mode, Some(key.2)).map_err(fail)?),
            _ => {
                if self.icmp.raw.is_none() {
                    let raw = EchoSocket::open(IcmpMode::Raw, None).map_err(fail)?;
                    let token = (TOKEN_ICMP_RAW as u64) << 56;
                    self.epoll
                        .add(raw.raw_fd(), libc::EPOLLIN as u32, token)
                        .map_err(|_| DropReason::SocketError)?;
                    self.icmp.raw = Some(raw);
                }
                None
            }
        };
        let fd = sock.as_ref().map(|s| s.raw_fd());
        let wire_id = match fd {
            Some(_) => key.1,
            None => self.icmp.free_wire_id(key.2).ok_or(DropReason::FlowLimit)?,
        };
        let flow = IcmpFlow { key, wire_id, sock, guest_mac, last_use: self.now };
        let h = self.icmp.flows.insert(flow);
        match fd {
            Some(fd) => {
                if self.epoll.add(fd, libc::EPOLLIN as u32, h.token(TOKEN_ICMP)).is_err() {
                    self.icmp.flows.remove(h);
                    return Err(DropReason::SocketError);
                }
            }
            None => {
                self.icmp.by_wire.insert((wire_id, key.2), h);
            }
        }
        self.icmp.by_key.insert(key, h);
        Ok(h)
    }

    /// `h` is the flow for a ping socket, `None` for the shared raw socket.
    pub fn icmp_event(&mut self, h: Option<Handle>) {
        let mut scratch = std::mem::take(&mut self.scratch);
        for _ in 0..64 {
            let sock = match h {
                Some(h) => self.icmp.flows.get(h).and_then(|f| f.sock.as_ref()),
                None => self.icmp.raw.as_ref(),
            };
            let Some(sock) = sock else { break };
            match sock.recv_echo_reply(&mut scratch) {
                Ok(Some((from, id, seq, data))) => {
                    let flow_h = match h {
                        Some(h) => Some(h),
                        None => self.icmp.by_wire.get(&(id, from)).copied(),
                    };
                    let Some(flow) = flow_h.and_then(|fh| self.icmp.flows.get_mut(fh)) else {
                        continue;
                    };
                    flow.last_use = self.now;
                    let (mac, (gip, gid, dst)) = (flow.guest_mac, flow.key);
                    self.icmp_reply_to_guest(mac, dst, gip, gid, seq, &data);
                }
                Ok(None) => continue,
                Err(_) => break,
            }
        }
        self.scratch = scratch;
    }

    fn icmp_reply_to_guest(
        &mut self,
        mac: MacAddr,
        from: Ipv4Addr,
        to: Ipv4Addr,
        id: u16,
        seq: u16,
        data: &[u8],
    ) {
        let mut buf = vec![0u8; ETH_HDR_LEN + IPV4_HDR_LEN + ICMP_HDR_LEN + data.len()];
        let mut rest = [0u8; 4];
        rest[..2].copy_from_slice(&id.to_be_bytes());
        rest[2..].copy_from_slice(&seq.to_be_bytes());
        let n =
            write_icmp_frame(&mut buf, mac, self.gw_mac, from, to, ICMP_ECHO_REPLY, 0, rest, data);
        if n == 0 {
            return self.counters.drop(DropReason::Oversized);
        }
        buf.truncate(n);
        self.emit(Proto::Icmp, VnetHdr::default(), buf);
    }

    pub fn icmp_tick(&mut self) {
        for h in self.icmp.flows.handles() {
            let expired = self
                .icmp
                .flows
                .get(h)
                .is_some_and(|f| self.now.duration_since(f.last_use) >= self.p.icmp_idle);
            if expired {
                if let Some(f) = self.icmp.remove(h) {
                    if let Some(s) = &f.sock {
                        let _ = self.epoll.delete(s.raw_fd());
                    }
                }
            }
        }
        if self.icmp.flows.is_empty() {
            if let Some(raw) = self.icmp.raw.take() {
                let _ = self.epoll.delete(raw.raw_fd());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_socket_pings_loopback() {
        let mode = IcmpMode::detect();
        if mode == IcmpMode::Unavailable {
            eprintln!("neither ping nor raw ICMP sockets allowed here; skipping");
            return;
        }
        let s = EchoSocket::open(mode, Some(Ipv4Addr::LOCALHOST)).unwrap();
        s.send_echo(Ipv4Addr::LOCALHOST, 0x4242, 7, b"tapir-echo").unwrap();
        let mut buf = vec![0u8; 2048];
        let deadline = Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match s.recv_echo_reply(&mut buf) {
                Ok(Some((from, _id, seq, data))) if data == b"tapir-echo" => {
                    assert_eq!(from, Ipv4Addr::LOCALHOST);
                    assert_eq!(seq, 7);
                    break;
                }
                _ => {
                    assert!(Instant::now() < deadline, "no echo reply from 127.0.0.1");
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        }
    }
}
