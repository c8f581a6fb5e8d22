//! Thin, safe wrappers over the few syscalls the socket backends need beyond std:
//! epoll (one poll fd over many sockets), timerfd (reconnect ticks), eventfd (a level
//! flag), and sends with MSG_NOSIGNAL (a vanished peer must not raise SIGPIPE).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = check(fd)?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }).map(Epoll)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        check(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) }).map(|_| ())
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Collects ready events without waiting; returns (events, token) pairs.
    pub fn poll_now(&self, out: &mut Vec<(u32, u64)>) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
        out.clear();
        let n = loop {
            // SAFETY: `events` is a writable array of the advertised length.
            let r = unsafe {
                libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, 0)
            };
            match check(r) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        out.extend(events.iter().take(n as usize).map(|e| (e.events, e.u64)));
        Ok(())
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

pub struct Timer(OwnedFd);

impl Timer {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        owned(unsafe {
            libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
        })
        .map(Timer)
    }

    fn timespec(d: Duration) -> libc::timespec {
        libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as _ }
    }

    /// Fires after `first`, then every `interval` (never, if `interval` is zero).
    pub fn arm(&self, first: Duration, interval: Duration) -> io::Result<()> {
        // A zero first expiry would disarm the timer instead.
        let first = first.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: Self::timespec(interval),
            it_value: Self::timespec(first),
        };
        // SAFETY: `spec` is a valid itimerspec; the old value is not requested.
        check(unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) })
            .map(|_| ())
    }

    pub fn disarm(&self) -> io::Result<()> {
        let zero = Self::timespec(Duration::ZERO);
        let spec = libc::itimerspec { it_interval: zero, it_value: zero };
        // SAFETY: as in `arm`.
        check(unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) })
            .map(|_| ())
    }

    /// Consumes pending expirations so the fd stops polling readable.
    pub fn drain(&self) {
        let mut count = [0u8; 8];
        let _ = recv_plain_read(self.0.as_raw_fd(), &mut count);
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// An eventfd used as a level flag: readable while set.
pub struct Flag {
    fd: OwnedFd,
    set: bool,
}

impl Flag {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        owned(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })
            .map(|fd| Flag { fd, set: false })
    }

    pub fn set(&mut self, on: bool) {
        if on == self.set {
            return;
        }
        if on {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live array to our eventfd.
            unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr() as *const libc::c_void, 8) };
        } else {
            let mut count = [0u8; 8];
            let _ = recv_plain_read(self.fd.as_raw_fd(), &mut count);
        }
        self.set = on;
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn recv_plain_read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live, writable slice.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Sends the concatenation of `parts` on a stream socket without blocking and without
/// SIGPIPE; returns how many bytes the kernel took.
pub fn send_parts(fd: RawFd, parts: &[&[u8]]) -> io::Result<usize> {
    let iov: Vec<libc::iovec> = parts
        .iter()
        .map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() })
        .collect();
    // SAFETY: an all-zero msghdr is valid; we then point it at `iov`, which outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    loop {
        // SAFETY: `msg` describes live, readable buffers.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Reads what a stream socket has, without blocking; `Ok(0)` is end of stream.
pub fn recv_some(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a live, writable slice.
        let n = unsafe {
            libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), libc::MSG_DONTWAIT)
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives one datagram into `buf`; returns its full length (which may exceed
/// `buf.len()` when it was truncated) and its source.
pub fn recv_datagram(
    fd: RawFd,
    buf: &mut [u8],
) -> io::Result<(usize, Option<std::net::SocketAddr>)> {
    loop {
        // SAFETY: an all-zero sockaddr_storage is valid; the kernel fills it.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut addr_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: `buf`, `storage` and `addr_len` are live and writable.
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                &mut storage as *mut libc::sockaddr_storage as *mut libc::sockaddr,
                &mut addr_len,
            )
        };
        if n >= 0 {
            return Ok((n as usize, sockaddr_to_std(&storage)));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<std::net::SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it can contain.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(std::net::SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6, which it can contain.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage as *const libc::sockaddr_in6)
            };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(std::net::SocketAddr::from((ip, u16::from_be(sin6.sin6_port))))
        }
        _ => None,
    }
}

/// IP_MULTICAST_IF: which interface (by one of its IPv4 addresses) multicast leaves by.
pub fn set_multicast_if_v4(fd: RawFd, addr: std::net::Ipv4Addr) -> io::Result<()> {
    let in_addr = libc::in_addr { s_addr: u32::from(addr).to_be() };
    // SAFETY: passes a valid in_addr with its exact size.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MULTICAST_IF,
            &in_addr as *const libc::in_addr as *const libc::c_void,
            std::mem::size_of::<libc::in_addr>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// Sets an int-valued socket option.
pub fn set_int_opt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a valid c_int with its exact size.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// SO_ERROR: the outcome of a non-blocking connect.
pub fn take_socket_error(fd: RawFd) -> io::Result<Option<io::Error>> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live and writable with the advertised size.
    check(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut value as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok((value != 0).then(|| io::Error::from_raw_os_error(value)))
}
