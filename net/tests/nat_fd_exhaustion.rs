//! Out of file descriptors: new NAT flows fail cleanly (counted, TCP answered with RST)
//! while existing flows keep working. A separate test binary because RLIMIT_NOFILE is
//! process-wide.

use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use tapir_net::backend::{Backend, VnetHdr, MAX_FRAME_LEN};
use tapir_net::mac::MacAddr;
use tapir_net::nat::wire::*;
use tapir_net::nat::{DropReason, UserNet, UserNetConfig};

const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

fn udp(gw: MacAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 42 + payload.len()];
    f[42..].copy_from_slice(payload);
    let n = write_udp_frame(
        &mut f,
        gw,
        GUEST_MAC,
        (GUEST_IP, sport),
        (GW, dport),
        payload.len(),
        CsumMode::Full,
    );
    f.truncate(n);
    f
}

fn syn(gw: MacAddr, sport: u16, dport: u16) -> Vec<u8> {
    let th = TcpHeader {
        src: (GUEST_IP, sport),
        dst: (GW, dport),
        seq: 1,
        ack: 0,
        flags: TCP_SYN,
        window: 1000,
        mss: None,
        window_scale: None,
    };
    let mut f = vec![0u8; 54];
    let n = write_tcp_frame(&mut f, gw, GUEST_MAC, &th, 0, CsumMode::Full);
    f.truncate(n);
    f
}

fn frames(net: &mut UserNet, wait: Duration) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let mut pfd = libc::pollfd { fd: net.poll_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut pfd, 1, 20) };
        while let Some((_, n)) = net.recv(&mut buf).unwrap() {
            out.push(buf[..n].to_vec());
        }
    }
    out
}

fn highest_fd() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
                .max()
                .unwrap_or(2)
        })
        .unwrap_or(2)
}

#[test]
fn new_flows_fail_cleanly_without_fds_and_old_flows_continue() {
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    server.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let port = server.local_addr().unwrap().port();
    let cfg = UserNetConfig { dns_upstream: Some("127.0.0.1:9".into()), ..Default::default() };
    let mut net = UserNet::new(&cfg).unwrap();
    let gw = net.gateway_mac();

    net.send(&VnetHdr::default(), &udp(gw, 50000, port, b"before")).unwrap();
    let mut b = [0u8; 64];
    let (n, from) = server.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], b"before");

    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: reads into a live rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) };
    // Cap the table just above the highest fd in use, then fill every free slot below
    // it: from here on no new descriptor can be made.
    let tight = libc::rlimit { rlim_cur: highest_fd() + 1, rlim_max: old.rlim_max };
    // SAFETY: sets a valid rlimit for this process.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &tight) }, 0);
    let mut fillers = Vec::new();
    loop {
        // SAFETY: dup of stdin's fd number; the result is checked and closed below.
        let fd = unsafe { libc::dup(0) };
        if fd < 0 {
            break;
        }
        fillers.push(fd);
    }

    net.send(&VnetHdr::default(), &udp(gw, 50001, port, b"new flow")).unwrap();
    net.send(&VnetHdr::default(), &syn(gw, 50002, port)).unwrap();
    net.send(&VnetHdr::default(), &udp(gw, 50000, port, b"old flow")).unwrap();
    server.send_to(b"reply", from).unwrap();
    let out = frames(&mut net, Duration::from_millis(300));

    for fd in fillers {
        // SAFETY: closes the fillers we made.
        unsafe { libc::close(fd) };
    }
    // SAFETY: restores the original limit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) };

    assert_eq!(net.dropped(DropReason::NoFd), 2, "{}", net.counters());
    let (n, _) = server.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], b"old flow", "the existing flow still carries data");
    let rst = out.iter().any(|f| {
        let ip = Ipv4Packet::new(&f[14..]).unwrap();
        ip.protocol() == IPPROTO_TCP && TcpSegment::new(ip.payload()).unwrap().has(TCP_RST)
    });
    assert!(rst, "the SYN that could not get a socket was answered with RST");
    let reply = out.iter().any(|f| {
        let ip = Ipv4Packet::new(&f[14..]).unwrap();
        ip.protocol() == IPPROTO_UDP && UdpPacket::new(ip.payload()).unwrap().payload() == b"reply"
    });
    assert!(reply, "the existing flow still delivers replies");
}
