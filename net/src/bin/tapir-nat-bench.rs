//! Benchmark harness: attaches tapir's user-mode NAT to a tap device inside a network
//! namespace, the way slirp4netns and pasta attach to theirs, and shuttles frames between
//! the two until SIGTERM/SIGINT (then prints both backends' counters to stderr).
//!
//! usage: tapir-nat-bench --netns /run/netns/NAME [--tap tap0] [--mtu 1500] [--no-offload]
//!                        [--hostfwd RULE]... [--dns-upstream IP[:PORT]]
//!
//! The tap is tapir's own tap backend (`tapir_net::tap::Tap`), opened inside the
//! namespace; the process then returns to its own namespace, so the NAT's host sockets
//! live where the host's services are. The tap fd stays bound to the namespace's device.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use tapir_net::backend::{Backend, BackendError, Offloads, MAX_FRAME_LEN};
use tapir_net::nat::{UserNet, UserNetConfig};
use tapir_net::tap::{Tap, TapConfig};

/// Frames taken from the tap per wake-up before the NAT's side gets its turn.
const TAP_BATCH: usize = 256;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn setns(ns: &File) -> Result<(), String> {
    // SAFETY: plain syscall on an open namespace fd; this process is single-threaded here.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(format!("setns: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Opens (creates) tap `name` inside `netns` and comes back, whether or not that worked.
fn open_tap_in(netns: &str, name: &str) -> Result<Tap, String> {
    let home = File::open("/proc/self/ns/net").map_err(|e| format!("own netns: {e}"))?;
    let target = File::open(netns).map_err(|e| format!("{netns}: {e}"))?;
    setns(&target)?;
    let cfg = TapConfig { ifname: Some(name.to_string()), ..Default::default() };
    let tap = Tap::open(&cfg, None).map_err(|e| e.to_string());
    setns(&home)?;
    tap
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("tapir-nat-bench: {msg}");
    std::process::exit(1);
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

    let mut tap = open_tap_in(&netns, &tap_name)
        .unwrap_or_else(|e| fail(format!("cannot open tap {tap_name} in {netns}: {e}")));
    let hostfwd: Vec<String> =
        args.windows(2).filter(|w| w[0] == "--hostfwd").map(|w| w[1].clone()).collect();
    let dns_upstream = Some(arg("--dns-upstream").unwrap_or_else(|| "127.0.0.1".into()));
    let cfg = UserNetConfig { mtu, dns_upstream, hostfwd, ..Default::default() };
    let mut net = UserNet::new(&cfg).unwrap_or_else(|e| fail(e));
    // Both directions carry the same offloads: partial checksums and TCP segmentation.
    let offloads = if offload {
        Offloads { csum: true, tso4: true, tso6: true, tso_ecn: false, ufo: false }
    } else {
        Offloads::NONE
    };
    tap.set_rx_offloads(offloads).unwrap_or_else(|e| fail(e));
    net.set_rx_offloads(offloads).unwrap_or_else(|e| fail(e));
    // SAFETY: installs an async-signal-safe handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    eprintln!(
        "tapir-nat-bench: {} in {netns} attached (mtu {mtu}, offload {offload})",
        tap.ifname()
    );

    let mut from_tap = vec![0u8; MAX_FRAME_LEN];
    let mut to_tap = vec![0u8; MAX_FRAME_LEN];
    let mut pfds = [
        libc::pollfd { fd: tap.poll_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: net.poll_fd(), events: libc::POLLIN, revents: 0 },
    ];
    while !STOP.load(Ordering::Relaxed) && !tap.is_gone() {
        // SAFETY: two live pollfds.
        unsafe { libc::poll(pfds.as_mut_ptr(), 2, 1000) };
        if pfds[0].revents & libc::POLLIN != 0 {
            for _ in 0..TAP_BATCH {
                match tap.recv(&mut from_tap) {
                    Ok(Some((hdr, len))) => {
                        // The NAT never refuses a frame; what it drops, it counts.
                        let _ = net.send(&hdr, &from_tap[..len]);
                    }
                    Ok(None) => break,
                    // Counted by the tap; the next frame may be fine.
                    Err(BackendError::Dropped(_)) => continue,
                    Err(e) => {
                        eprintln!("tapir-nat-bench: tap recv: {e}");
                        break;
                    }
                }
            }
        }
        loop {
            match net.recv(&mut to_tap) {
                Ok(Some((hdr, len))) => match tap.send(&hdr, &to_tap[..len]) {
                    // A full tap queue loses the frame, as a real NIC's would; TCP resends.
                    Ok(()) | Err(BackendError::WouldBlock) | Err(BackendError::Dropped(_)) => {}
                    Err(e) => eprintln!("tapir-nat-bench: tap send: {e}"),
                },
                Ok(None) => break,
                Err(e) => {
                    eprintln!("tapir-nat-bench: recv: {e}");
                    break;
                }
            }
        }
    }
    eprintln!("tapir-nat-bench: tap: {}", tap.counters());
    eprintln!("tapir-nat-bench: nat: {}", net.counters());
}
