//! Benchmark harness: attaches tapir's user-mode NAT to a tap device inside a network
//! namespace, the way slirp4netns and pasta attach to theirs, and shuttles frames between
//! the two until SIGTERM/SIGINT (then prints the NAT's counters to stderr).
//!
//! usage: tapir-nat-bench --netns /run/netns/NAME [--tap tap0] [--mtu 1500] [--no-offload]
//!                        [--hostfwd RULE]... [--dns-upstream IP[:PORT]]
//!
//! The tap is opened inside the namespace and the process then returns to its own
//! namespace, so the NAT's host sockets live where the host's services are.
//!
//! The tap opener here is deliberately minimal and private; the real tap backend lives in
//! net/src/tap.rs.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use tapir_net::backend::{Backend, Offloads, VnetHdr, MAX_FRAME_LEN};
use tapir_net::nat::{UserNet, UserNetConfig};

const TUNSETIFF: u64 = 0x4004_54ca;
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;
const TUN_F_CSUM: libc::c_ulong = 1;
const TUN_F_TSO4: libc::c_ulong = 2;
const TUN_F_TSO6: libc::c_ulong = 4;

nix::ioctl_write_ptr_bad!(tun_set_iff, TUNSETIFF, libc::ifreq);
nix::ioctl_write_ptr_bad!(tun_set_vnet_hdr_sz, TUNSETVNETHDRSZ, libc::c_int);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn open_tap(name: &str, offload: bool) -> io::Result<OwnedFd> {
    let f = File::options().read(true).write(true).open("/dev/net/tun")?;
    let fd: OwnedFd = f.into();
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: the ioctls get a tun fd we own and pointers to live values of the right type.
    unsafe {
        tun_set_iff(fd.as_raw_fd(), &ifr).map_err(io::Error::from)?;
        let sz: libc::c_int = VnetHdr::LEN as libc::c_int;
        tun_set_vnet_hdr_sz(fd.as_raw_fd(), &sz).map_err(io::Error::from)?;
        let flags = if offload { TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 } else { 0 };
        // TUNSETOFFLOAD takes its flags by value as an unsigned long.
        if libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD as _, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    Ok(fd)
}

fn setns(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall; this process is single-threaded here.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens the tap inside `netns` and comes back.
fn open_tap_in(netns: &str, name: &str, offload: bool) -> io::Result<OwnedFd> {
    let home = File::open("/proc/self/ns/net")?;
    let target = File::open(netns)?;
    setns(target.as_raw_fd())?;
    let tap = open_tap(name, offload);
    setns(home.as_raw_fd())?;
    tap
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg =
        |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let Some(netns) = arg("--netns") else {
        eprintln!("usage: tapir-nat-bench --netns /run/netns/NAME [--tap tap0] [--mtu 1500] [--no-offload]");
        std::process::exit(2);
    };
    let tap_name = arg("--tap").unwrap_or_else(|| "tap0".into());
    let mtu: u32 = arg("--mtu").and_then(|m| m.parse().ok()).unwrap_or(1500);
    let offload = !args.iter().any(|a| a == "--no-offload");

    let tap = match open_tap_in(&netns, &tap_name, offload) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tapir-nat-bench: cannot open tap {tap_name} in {netns}: {e}");
            std::process::exit(1);
        }
    };
    let hostfwd: Vec<String> =
        args.windows(2).filter(|w| w[0] == "--hostfwd").map(|w| w[1].clone()).collect();
    let dns_upstream = Some(arg("--dns-upstream").unwrap_or_else(|| "127.0.0.1".into()));
    let cfg = UserNetConfig { mtu, dns_upstream, hostfwd, ..Default::default() };
    let mut net = match UserNet::new(&cfg) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("tapir-nat-bench: {e}");
            std::process::exit(1);
        }
    };
    let rx = if offload {
        Offloads { csum: true, tso4: true, tso6: true, tso_ecn: false, ufo: false }
    } else {
        Offloads::NONE
    };
    if let Err(e) = net.set_rx_offloads(rx) {
        eprintln!("tapir-nat-bench: {e}");
        std::process::exit(1);
    }
    // SAFETY: installs an async-signal-safe handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    eprintln!("tapir-nat-bench: {tap_name} in {netns} attached (mtu {mtu}, offload {offload})");

    let tap_fd = tap.as_raw_fd();
    let mut from_tap = vec![0u8; VnetHdr::LEN + MAX_FRAME_LEN];
    let mut to_tap = vec![0u8; VnetHdr::LEN + MAX_FRAME_LEN];
    let mut pfds = [
        libc::pollfd { fd: tap_fd, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: net.poll_fd(), events: libc::POLLIN, revents: 0 },
    ];
    while !STOP.load(Ordering::Relaxed) {
        // SAFETY: two live pollfds.
        unsafe { libc::poll(pfds.as_mut_ptr(), 2, 1000) };
        let tap_ready = pfds[0].revents & libc::POLLIN != 0;
        for _ in 0..if tap_ready { 256 } else { 0 } {
            // SAFETY: reads at most the buffer's length into it.
            let n = unsafe {
                libc::read(tap_fd, from_tap.as_mut_ptr() as *mut libc::c_void, from_tap.len())
            };
            if n <= 0 {
                break;
            }
            let n = n as usize;
            let Some(hdr) = VnetHdr::from_bytes(&from_tap[..n]) else { continue };
            let _ = net.send(&hdr, &from_tap[VnetHdr::LEN..n]);
        }
        loop {
            match net.recv(&mut to_tap[VnetHdr::LEN..]) {
                Ok(Some((hdr, len))) => {
                    to_tap[..VnetHdr::LEN].copy_from_slice(&hdr.to_bytes());
                    let total = VnetHdr::LEN + len;
                    // SAFETY: writes `total` initialised bytes of the buffer.
                    let w = unsafe {
                        libc::write(tap_fd, to_tap.as_ptr() as *const libc::c_void, total)
                    };
                    if w < 0 {
                        let e = io::Error::last_os_error();
                        if e.raw_os_error() != Some(libc::EAGAIN) {
                            eprintln!("tapir-nat-bench: tap write: {e}");
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!("tapir-nat-bench: recv: {e}");
                    break;
                }
            }
        }
    }
    eprintln!("tapir-nat-bench: {}", net.counters());
    // The tap fd closes with `tap`; the device goes away with it.
    drop(tap);
}
