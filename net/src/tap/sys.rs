//! Raw tun/tap and interface ioctls. Every unsafe block in the tap backend lives here or
//! in the crate's shared `sys`, behind functions that take owned or borrowed fds and
//! plain Rust values.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use libc::{c_int, c_short, c_uint, c_ulong};

use crate::mac::MacAddr;

// The tun ioctls, spelled as in <linux/if_tun.h>. Value arguments travel as c_ulong.
// The kernel writes the chosen name back, so the argument is read-write.
nix::ioctl_readwrite_bad!(
    tun_set_iff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<c_int>()),
    libc::ifreq
);
nix::ioctl_write_int!(tun_set_persist, b'T', 203);
nix::ioctl_write_int!(tun_set_offload, b'T', 208);
nix::ioctl_read_bad!(
    tun_get_iff,
    nix::request_code_read!(b'T', 210, std::mem::size_of::<c_uint>()),
    libc::ifreq
);
nix::ioctl_write_ptr!(tun_set_vnet_hdr_sz, b'T', 216, c_int);

// Interface ioctls on an ordinary socket.
nix::ioctl_readwrite_bad!(siocgifflags, libc::SIOCGIFFLAGS, libc::ifreq);
nix::ioctl_write_ptr_bad!(siocsifflags, libc::SIOCSIFFLAGS, libc::ifreq);
nix::ioctl_readwrite_bad!(siocgifindex, libc::SIOCGIFINDEX, libc::ifreq);
nix::ioctl_readwrite_bad!(siocgifhwaddr, libc::SIOCGIFHWADDR, libc::ifreq);
nix::ioctl_write_ptr_bad!(siocsifhwaddr, libc::SIOCSIFHWADDR, libc::ifreq);
/// SIOCBRADDIF from <linux/sockios.h> (libc lacks it for Linux).
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
nix::ioctl_write_ptr_bad!(siocbraddif, SIOCBRADDIF, libc::ifreq);

pub const IFF_TAP: c_short = libc::IFF_TAP as c_short;
pub const IFF_NO_PI: c_short = libc::IFF_NO_PI as c_short;
pub const IFF_VNET_HDR: c_short = libc::IFF_VNET_HDR as c_short;
pub const IFF_MULTI_QUEUE: c_short = libc::IFF_MULTI_QUEUE as c_short;
pub const IFF_PERSIST: c_short = libc::IFF_PERSIST as c_short;
pub const IFF_UP: c_short = libc::IFF_UP as c_short;

pub const TUN_F_CSUM: c_ulong = libc::TUN_F_CSUM as c_ulong;
pub const TUN_F_TSO4: c_ulong = libc::TUN_F_TSO4 as c_ulong;
pub const TUN_F_TSO6: c_ulong = libc::TUN_F_TSO6 as c_ulong;
pub const TUN_F_TSO_ECN: c_ulong = libc::TUN_F_TSO_ECN as c_ulong;
pub const TUN_F_UFO: c_ulong = libc::TUN_F_UFO as c_ulong;

/// Longest interface name the kernel accepts (IFNAMSIZ minus the NUL).
pub const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;

fn errno_to_io(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// An ifreq with its name filled in. The caller has validated `name` (no NUL, short).
fn ifreq_named(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of integers, sockaddrs
    // and a pointer); all-zero is a valid value for every member.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes().take(MAX_IFNAME_LEN)) {
        *dst = src as libc::c_char;
    }
    ifr
}

fn ifreq_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr.ifr_name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Opens /dev/net/tun non-blocking and close-on-exec. Close-on-exec matters: a child
/// process holding a copy would keep a non-persistent tap alive after we exit.
pub fn open_tun_device() -> io::Result<OwnedFd> {
    let path = c"/dev/net/tun";
    // SAFETY: `path` is a valid NUL-terminated string; the result is checked.
    let fd =
        unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// TUNSETIFF: attaches `fd` to tap `name` (creating it when it does not exist). A name
/// containing `%d` lets the kernel pick the number. Returns the kernel's name.
pub fn set_iff(fd: BorrowedFd<'_>, name: &str, flags: c_short) -> io::Result<String> {
    let mut ifr = ifreq_named(name);
    ifr.ifr_ifru.ifru_flags = flags;
    // SAFETY: `ifr` is a valid ifreq that outlives the call; the kernel writes the
    // chosen name back into it.
    unsafe { tun_set_iff(fd.as_raw_fd(), &mut ifr) }.map_err(errno_to_io)?;
    Ok(ifreq_name(&ifr))
}

/// TUNGETIFF: the name and flags of the tap `fd` is attached to.
pub fn get_iff(fd: BorrowedFd<'_>) -> io::Result<(String, c_short)> {
    let mut ifr = ifreq_named("");
    // SAFETY: `ifr` is a valid, writable ifreq for the kernel to fill.
    unsafe { tun_get_iff(fd.as_raw_fd(), &mut ifr) }.map_err(errno_to_io)?;
    // SAFETY: TUNGETIFF fills ifru_flags; every bit pattern is a valid c_short.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    Ok((ifreq_name(&ifr), flags))
}

pub fn set_vnet_hdr_size(fd: BorrowedFd<'_>, size: c_int) -> io::Result<()> {
    // SAFETY: the kernel reads one c_int from a valid pointer.
    unsafe { tun_set_vnet_hdr_sz(fd.as_raw_fd(), &size) }.map_err(errno_to_io)?;
    Ok(())
}

pub fn set_offload(fd: BorrowedFd<'_>, flags: c_ulong) -> io::Result<()> {
    // SAFETY: a value argument; nothing is dereferenced.
    unsafe { tun_set_offload(fd.as_raw_fd(), flags) }.map_err(errno_to_io)?;
    Ok(())
}

pub fn set_persist(fd: BorrowedFd<'_>, persist: bool) -> io::Result<()> {
    // SAFETY: a value argument; nothing is dereferenced.
    unsafe { tun_set_persist(fd.as_raw_fd(), c_ulong::from(persist)) }.map_err(errno_to_io)?;
    Ok(())
}

/// Is `fd` an open file descriptor at all?
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD has no memory-safety preconditions for any integer.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Sets O_NONBLOCK and FD_CLOEXEC on an fd handed over by a launcher.
pub fn make_nonblocking_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a borrowed, open fd with integer arguments.
    unsafe {
        let fl = libc::fcntl(raw, libc::F_GETFL);
        if fl < 0 || libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
        let fdfl = libc::fcntl(raw, libc::F_GETFD);
        if fdfl < 0 || libc::fcntl(raw, libc::F_SETFD, fdfl | libc::FD_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Atomically replaces the file behind `target` with the one behind `source`, keeping the
/// number `target` (which a frontend may have registered with epoll) valid.
pub fn replace_fd(source: BorrowedFd<'_>, target: RawFd) -> io::Result<()> {
    // SAFETY: both are open fds; dup3 closes the old file behind `target`, which the
    // caller owns and no longer uses through any other handle.
    if unsafe { libc::dup3(source.as_raw_fd(), target, libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `if_nametoindex`; `None` when no such interface exists in this network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: `cname` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    (index != 0).then_some(index)
}

pub fn ifname_of_index(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IFNAMSIZ];
    // SAFETY: `buf` holds IFNAMSIZ bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the kernel wrote a NUL-terminated name into `buf`.
    Some(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// A datagram socket used only as a handle for interface ioctls. It belongs to the
/// network namespace of the thread that creates it.
pub struct ControlSocket(OwnedFd);

impl ControlSocket {
    pub fn new() -> io::Result<Self> {
        crate::sys::socket(libc::SOCK_DGRAM, 0).map(ControlSocket)
    }

    pub fn flags(&self, ifname: &str) -> io::Result<c_short> {
        let mut ifr = ifreq_named(ifname);
        // SAFETY: `ifr` is a valid ifreq; the kernel fills ifru_flags.
        unsafe { siocgifflags(self.0.as_raw_fd(), &mut ifr) }.map_err(errno_to_io)?;
        // SAFETY: SIOCGIFFLAGS wrote ifru_flags; any bit pattern is a valid c_short.
        Ok(unsafe { ifr.ifr_ifru.ifru_flags })
    }

    /// Sets IFF_UP unless it is already set.
    pub fn bring_up(&self, ifname: &str) -> io::Result<()> {
        let flags = self.flags(ifname)?;
        if flags & IFF_UP != 0 {
            return Ok(());
        }
        let mut ifr = ifreq_named(ifname);
        ifr.ifr_ifru.ifru_flags = flags | IFF_UP;
        // SAFETY: `ifr` is a valid ifreq the kernel only reads.
        unsafe { siocsifflags(self.0.as_raw_fd(), &ifr) }.map_err(errno_to_io)?;
        Ok(())
    }

    pub fn index(&self, ifname: &str) -> io::Result<c_int> {
        let mut ifr = ifreq_named(ifname);
        // SAFETY: `ifr` is a valid ifreq; the kernel fills ifru_ifindex.
        unsafe { siocgifindex(self.0.as_raw_fd(), &mut ifr) }.map_err(errno_to_io)?;
        // SAFETY: SIOCGIFINDEX wrote ifru_ifindex.
        Ok(unsafe { ifr.ifr_ifru.ifru_ifindex })
    }

    pub fn hwaddr(&self, ifname: &str) -> io::Result<MacAddr> {
        let mut ifr = ifreq_named(ifname);
        // SAFETY: `ifr` is a valid ifreq; the kernel fills ifru_hwaddr.
        unsafe { siocgifhwaddr(self.0.as_raw_fd(), &mut ifr) }.map_err(errno_to_io)?;
        // SAFETY: SIOCGIFHWADDR wrote a sockaddr whose sa_data starts with the address.
        let data = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
        let mut mac = [0u8; 6];
        for (dst, src) in mac.iter_mut().zip(data.iter()) {
            *dst = *src as u8;
        }
        Ok(MacAddr(mac))
    }

    pub fn set_hwaddr(&self, ifname: &str, mac: MacAddr) -> io::Result<()> {
        let mut ifr = ifreq_named(ifname);
        // SAFETY: writing plain integers into the sockaddr member of a zeroed union.
        unsafe {
            ifr.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
            for (dst, src) in ifr.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac.0) {
                *dst = src as libc::c_char;
            }
        }
        // SAFETY: `ifr` is a valid ifreq the kernel only reads.
        unsafe { siocsifhwaddr(self.0.as_raw_fd(), &ifr) }.map_err(errno_to_io)?;
        Ok(())
    }

    /// SIOCBRADDIF: makes interface `port_index` a port of `bridge`.
    pub fn bridge_add(&self, bridge: &str, port_index: c_int) -> io::Result<()> {
        let mut ifr = ifreq_named(bridge);
        ifr.ifr_ifru.ifru_ifindex = port_index;
        // SAFETY: `ifr` is a valid ifreq the kernel only reads.
        unsafe { siocbraddif(self.0.as_raw_fd(), &ifr) }.map_err(errno_to_io)?;
        Ok(())
    }
}
