//! Thin, safe wrappers over the syscalls the backends share: fds, epoll, eventfd, timerfd,
//! reads and writes, and IPv4 sockets. Each returns `io::Result` (or says why not) and
//! owns what it creates; nothing here knows about frames. Device-specific ioctls stay
//! with their backend (`tap::sys`).

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Checks a syscall's fd result and takes ownership of it.
fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(fd)?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Repeats `op` while it fails with EINTR.
fn retry_eintr<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

pub fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

pub fn would_block(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR))
}

// ---------------------------------------------------------------------------------------
// Plain reads and writes

pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into the live slice.
    cvt_size(unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) })
}

pub fn write(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads `data.len()` bytes from the live slice.
    cvt_size(unsafe { libc::write(fd, data.as_ptr() as *const libc::c_void, data.len()) })
}

/// Reads into `a` then `b` in one readv.
pub fn readv2(fd: RawFd, a: &mut [u8], b: &mut [u8]) -> io::Result<usize> {
    let iov = [
        libc::iovec { iov_base: a.as_mut_ptr() as *mut libc::c_void, iov_len: a.len() },
        libc::iovec { iov_base: b.as_mut_ptr() as *mut libc::c_void, iov_len: b.len() },
    ];
    // SAFETY: both iovecs describe live, writable, non-overlapping slices.
    cvt_size(unsafe { libc::readv(fd, iov.as_ptr(), 2) })
}

/// Peeks at a stream socket's receive queue into `skip` and then `buf` (MSG_PEEK, never
/// blocks). Returns the total; the first `skip.len()` bytes are for the caller to ignore.
/// This is how data past what was already sent is read on kernels whose TCP has no
/// SO_PEEK_OFF (before Linux 6.9).
pub fn recv_peek_past(fd: RawFd, skip: &mut [u8], buf: &mut [u8]) -> io::Result<usize> {
    let mut iov = [
        libc::iovec { iov_base: skip.as_mut_ptr() as *mut libc::c_void, iov_len: skip.len() },
        libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() },
    ];
    // SAFETY: an all-zero msghdr is valid; we point it at the two live iovecs.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = 2;
    retry_eintr(|| {
        // SAFETY: both iovecs describe live, writable, non-overlapping slices.
        cvt_size(unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT) })
    })
}

/// Makes `tcp_peek_offset_supported` answer false, so tests cover the path older kernels
/// take on any host.
pub static FORCE_NO_TCP_PEEK_OFFSET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this kernel's TCP supports SO_PEEK_OFF (Linux 6.9 and later). Probed once.
pub fn tcp_peek_offset_supported() -> bool {
    if FORCE_NO_TCP_PEEK_OFFSET.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| match socket(libc::SOCK_STREAM, 0) {
        Ok(sock) => {
            use std::os::fd::AsRawFd;
            setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).is_ok()
        }
        Err(_) => false,
    })
}

/// Writes `a` then `b` in one writev.
pub fn writev2(fd: RawFd, a: &[u8], b: &[u8]) -> io::Result<usize> {
    let iov = [
        libc::iovec { iov_base: a.as_ptr() as *mut libc::c_void, iov_len: a.len() },
        libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() },
    ];
    // SAFETY: both iovecs describe live, readable slices for the duration of the call.
    cvt_size(unsafe { libc::writev(fd, iov.as_ptr(), 2) })
}

// ---------------------------------------------------------------------------------------
// epoll, eventfd, timerfd

pub struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }).map(Epoll)
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a live epoll_event for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.raw(), op, fd, &mut ev) }).map(|_| ())
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    /// Removes `fd`. Failing only means it was not registered (or is already closed),
    /// which leaves nothing to undo, so callers may ignore the result.
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits up to `timeout_ms` (0: just look); returns how many entries of `events` are
    /// filled. An interrupted wait reports none.
    pub fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> io::Result<usize> {
        let len = events.len().min(libc::c_int::MAX as usize) as libc::c_int;
        // SAFETY: the kernel writes at most `len` entries into the live slice.
        let r = unsafe { libc::epoll_wait(self.raw(), events.as_mut_ptr(), len, timeout_ms) };
        match cvt(r) {
            Ok(n) => Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Collects ready events without waiting, as (events, token) pairs.
    pub fn poll_now(&self, out: &mut Vec<(u32, u64)>) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
        out.clear();
        let n = self.wait(&mut events, 0)?;
        out.extend(events.iter().take(n).map(|e| (e.events, e.u64)));
        Ok(())
    }
}

/// An eventfd: readable while its counter is not zero.
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        owned(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) }).map(EventFd)
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Makes it readable. Only a counter at its maximum could refuse, and then it is
    /// readable already.
    pub fn signal(&self) {
        let _ = write(self.raw(), &1u64.to_ne_bytes());
    }

    /// Makes it unreadable. A counter that is already zero has nothing to drain.
    pub fn drain(&self) {
        let _ = read(self.raw(), &mut [0u8; 8]);
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// An eventfd used as a level flag: readable while set.
pub struct Flag {
    event: EventFd,
    set: bool,
}

impl Flag {
    pub fn new() -> io::Result<Self> {
        Ok(Flag { event: EventFd::new()?, set: false })
    }

    pub fn set(&mut self, on: bool) {
        if on == self.set {
            return;
        }
        if on {
            self.event.signal();
        } else {
            self.event.drain();
        }
        self.set = on;
    }

    pub fn raw(&self) -> RawFd {
        self.event.raw()
    }
}

/// A monotonic timerfd that remembers whether it is armed.
pub struct TimerFd {
    fd: OwnedFd,
    armed: bool,
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

impl TimerFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let fd = owned(unsafe {
            libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
        })?;
        Ok(TimerFd { fd, armed: false })
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn is_armed(&self) -> bool {
        self.armed
    }

    fn settime(&self, spec: &libc::itimerspec) -> io::Result<()> {
        // SAFETY: `spec` is a live itimerspec; the old value is not requested.
        cvt(unsafe { libc::timerfd_settime(self.raw(), 0, spec, std::ptr::null_mut()) }).map(|_| ())
    }

    /// Fires after `first`, then every `interval` (never again, if `interval` is zero).
    pub fn arm(&mut self, first: Duration, interval: Duration) -> io::Result<()> {
        // A zero first expiry would disarm the timer instead.
        let first = first.max(Duration::from_nanos(1));
        self.settime(&libc::itimerspec {
            it_interval: timespec(interval),
            it_value: timespec(first),
        })?;
        self.armed = true;
        Ok(())
    }

    pub fn disarm(&mut self) -> io::Result<()> {
        let zero = timespec(Duration::ZERO);
        self.settime(&libc::itimerspec { it_interval: zero, it_value: zero })?;
        self.armed = false;
        Ok(())
    }

    /// Ticks every `period`; `None` disarms. Failing leaves the timer as it was, which
    /// `is_armed` still tells, so the caller's next look retries.
    pub fn set_periodic(&mut self, period: Option<Duration>) {
        let _ = match period {
            Some(p) => self.arm(p, p),
            None => self.disarm(),
        };
    }

    /// Fires once after `after` (see `set_periodic` for failures).
    pub fn set_oneshot(&mut self, after: Duration) {
        let _ = self.arm(after, Duration::ZERO);
    }

    /// Consumes pending expirations so the fd stops polling readable.
    pub fn drain(&self) {
        let _ = read(self.raw(), &mut [0u8; 8]);
    }

    /// A one-shot timer has fired: drains it and notes that it is no longer armed.
    pub fn fired(&mut self) {
        self.drain();
        self.armed = false;
    }
}

// ---------------------------------------------------------------------------------------
// IPv4 sockets

pub fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

fn from_sockaddr_in(sa: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)), u16::from_be(sa.sin_port))
}

/// An IPv4 or IPv6 address the kernel wrote into `storage`, if it is one of those.
fn from_sockaddr_storage(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it can contain.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(from_sockaddr_in(sin)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6, which it can contain.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage as *const libc::sockaddr_in6)
            };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(sin6.sin6_port))))
        }
        _ => None,
    }
}

/// A non-blocking, close-on-exec IPv4 socket.
pub fn socket(ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked and owned exactly once.
    owned(unsafe {
        libc::socket(libc::AF_INET, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, proto)
    })
}

/// setsockopt with an option value of type `T` (a plain C struct or integer).
fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: passes a pointer to a live `T` with its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            val as *const T as *const libc::c_void,
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

pub fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    setsockopt(fd, level, name, &val)
}

pub fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `val`.
    cvt(unsafe {
        libc::getsockopt(fd, level, name, &mut val as *mut _ as *mut libc::c_void, &mut len)
    })?;
    Ok(val)
}

/// The pending error of a socket (SO_ERROR; e.g. the outcome of a non-blocking
/// connect), or None. Not being able to ask counts as an error too.
pub fn take_socket_error(fd: RawFd) -> Option<io::Error> {
    match getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ERROR) {
        Ok(0) => None,
        Ok(e) => Some(io::Error::from_raw_os_error(e)),
        Err(e) => Some(e),
    }
}

/// Makes close() send RST instead of FIN. Best effort: without it the close is a FIN.
pub fn set_linger_zero(fd: RawFd) {
    let _ = setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        &libc::linger { l_onoff: 1, l_linger: 0 },
    );
}

/// IP_MULTICAST_IF: which interface (by one of its IPv4 addresses) multicast leaves by.
pub fn set_multicast_if_v4(fd: RawFd, addr: Ipv4Addr) -> io::Result<()> {
    let in_addr = libc::in_addr { s_addr: u32::from(addr).to_be() };
    setsockopt(fd, libc::IPPROTO_IP, libc::IP_MULTICAST_IF, &in_addr)
}

pub fn bind(fd: RawFd, a: SocketAddrV4) -> io::Result<()> {
    let sa = sockaddr_in(a);
    // SAFETY: `sa` is a valid sockaddr_in of the stated size.
    cvt(unsafe {
        libc::bind(
            fd,
            &sa as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// Starts a connect; `Ok(false)` means it is in progress (poll for writable).
pub fn connect(fd: RawFd, a: SocketAddrV4) -> io::Result<bool> {
    let sa = sockaddr_in(a);
    // SAFETY: `sa` is a valid sockaddr_in of the stated size.
    let r = unsafe {
        libc::connect(
            fd,
            &sa as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    match cvt(r) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn listen(fd: RawFd, backlog: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::listen(fd, backlog) }).map(|_| ())
}

pub fn accept(fd: RawFd) -> io::Result<(OwnedFd, SocketAddrV4)> {
    let mut sa = MaybeUninit::<libc::sockaddr_in>::zeroed();
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes of address into `sa`.
    let nfd = owned(unsafe {
        libc::accept4(
            fd,
            sa.as_mut_ptr() as *mut libc::sockaddr,
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: `sa` was zero-initialised and filled by the kernel.
    Ok((nfd, from_sockaddr_in(unsafe { &sa.assume_init() })))
}

pub fn local_addr(fd: RawFd) -> io::Result<SocketAddrV4> {
    let mut sa = MaybeUninit::<libc::sockaddr_in>::zeroed();
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `sa`.
    cvt(unsafe { libc::getsockname(fd, sa.as_mut_ptr() as *mut libc::sockaddr, &mut len) })?;
    // SAFETY: zero-initialised and filled by the kernel.
    Ok(from_sockaddr_in(unsafe { &sa.assume_init() }))
}

/// Sends without blocking and without SIGPIPE (a vanished peer must not kill us).
pub fn send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: reads `data.len()` bytes from a live slice.
    cvt_size(unsafe {
        libc::send(
            fd,
            data.as_ptr() as *const libc::c_void,
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
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
    retry_eintr(|| {
        // SAFETY: `msg` describes live, readable buffers.
        cvt_size(unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) })
    })
}

pub fn sendto(fd: RawFd, data: &[u8], to: SocketAddrV4) -> io::Result<usize> {
    let sa = sockaddr_in(to);
    // SAFETY: reads `data.len()` bytes from a live slice; `sa` is a valid address.
    cvt_size(unsafe {
        libc::sendto(
            fd,
            data.as_ptr() as *const libc::c_void,
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            &sa as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })
}

/// Reads what a socket has, without blocking; on a stream `Ok(0)` is end of stream.
pub fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    retry_eintr(|| {
        // SAFETY: the kernel writes at most `buf.len()` bytes into the live slice.
        cvt_size(unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                flags | libc::MSG_DONTWAIT,
            )
        })
    })
}

/// Drops `n` bytes from the head of a TCP receive queue without copying them.
pub fn tcp_discard(fd: RawFd, n: usize) -> io::Result<usize> {
    // SAFETY: with MSG_TRUNC on TCP the kernel copies nothing; the null buffer is unused.
    cvt_size(unsafe {
        libc::recv(fd, std::ptr::null_mut(), n, libc::MSG_TRUNC | libc::MSG_DONTWAIT)
    })
}

/// One datagram from an IPv4 socket, and its source.
pub fn recvfrom(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddrV4)> {
    let mut sa = MaybeUninit::<libc::sockaddr_in>::zeroed();
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf` and `len` into `sa`.
    let n = cvt_size(unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT,
            sa.as_mut_ptr() as *mut libc::sockaddr,
            &mut len,
        )
    })?;
    // SAFETY: zero-initialised and filled by the kernel.
    Ok((n, from_sockaddr_in(unsafe { &sa.assume_init() })))
}

/// Receives one datagram of any address family into `buf`; returns its full length
/// (which exceeds `buf.len()` when it was truncated) and its source.
pub fn recv_datagram(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<SocketAddr>)> {
    retry_eintr(|| {
        // SAFETY: an all-zero sockaddr_storage is valid; the kernel fills it.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut addr_len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: `buf`, `storage` and `addr_len` are live and writable.
        let n = cvt_size(unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                &mut storage as *mut libc::sockaddr_storage as *mut libc::sockaddr,
                &mut addr_len,
            )
        })?;
        Ok((n, from_sockaddr_storage(&storage)))
    })
}

pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::shutdown(fd, libc::SHUT_WR) }).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_is_readable_exactly_while_set() {
        let readable = |fd: RawFd| {
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one live pollfd.
            unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
        };
        let mut flag = Flag::new().unwrap();
        assert!(!readable(flag.raw()));
        flag.set(true);
        flag.set(true);
        assert!(readable(flag.raw()));
        flag.set(false);
        assert!(!readable(flag.raw()));
    }

    #[test]
    fn oneshot_timer_fires_and_disarms() {
        let mut t = TimerFd::new().unwrap();
        let epoll = Epoll::new().unwrap();
        epoll.add(t.raw(), libc::EPOLLIN as u32, 7).unwrap();
        t.set_oneshot(Duration::from_millis(1));
        assert!(t.is_armed());
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
        assert_eq!(epoll.wait(&mut events, 2000).unwrap(), 1);
        assert_eq!({ events[0].u64 }, 7);
        t.fired();
        assert!(!t.is_armed());
        let mut ready = Vec::new();
        epoll.poll_now(&mut ready).unwrap();
        assert!(ready.is_empty(), "a drained timer stops polling readable");
        t.set_periodic(Some(Duration::from_secs(60)));
        assert!(t.is_armed());
        t.set_periodic(None);
        assert!(!t.is_armed());
    }

    #[test]
    fn socket_round_trip_on_loopback() {
        let rx = socket(libc::SOCK_DGRAM, 0).unwrap();
        bind(rx.as_raw_fd(), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
        let to = local_addr(rx.as_raw_fd()).unwrap();
        let tx = socket(libc::SOCK_DGRAM, 0).unwrap();
        assert_eq!(sendto(tx.as_raw_fd(), b"hello", to).unwrap(), 5);
        let mut buf = [0u8; 2];
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let (n, from) = loop {
            match recv_datagram(rx.as_raw_fd(), &mut buf) {
                Err(e) if would_block(&e) && std::time::Instant::now() < deadline => {}
                other => break other.unwrap(),
            }
        };
        assert_eq!((n, &buf), (5, b"he"), "full length of a truncated datagram");
        let tx_port = local_addr(tx.as_raw_fd()).unwrap().port();
        assert_eq!(from, Some(SocketAddr::from((Ipv4Addr::LOCALHOST, tx_port))));
        assert!(would_block(&recv(rx.as_raw_fd(), &mut buf, 0).unwrap_err()));
    }
}
