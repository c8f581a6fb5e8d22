//! Long fuzz run over the user-mode NAT's frame input path.
//!
//! usage (root): cargo run --release -p tapir-net --example nat-fuzz -- SECONDS [SEED]
//!
//! The process first moves into a fresh network namespace of its own (unshare), so the
//! host sockets that fuzzed frames open (TCP connects, UDP flows, ICMP) can only reach
//! the namespace's private loopback, where small echo services listen. Prints the number
//! of inputs run; any panic is a finding.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use tapir_net::backend::{Backend, Offloads, MAX_FRAME_LEN};
use tapir_net::nat::fuzz::{seeds, FrameFuzzer};
use tapir_net::nat::{UserNet, UserNetConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0x5eed_7a91);

    // SAFETY: plain syscall, before any thread exists.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "nat-fuzz: unshare(CLONE_NEWNET) failed (needs root): {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    let up = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status();
    if !matches!(up, Ok(s) if s.success()) {
        eprintln!("nat-fuzz: cannot bring up lo in the private namespace");
        std::process::exit(1);
    }

    // Echo services on the private loopback, so flows get past connect().
    let tcp = TcpListener::bind("127.0.0.1:7").unwrap();
    std::thread::spawn(move || {
        for s in tcp.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut b = [0u8; 4096];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    for port in [7u16, 53] {
        let udp = UdpSocket::bind(("127.0.0.1", port)).unwrap();
        std::thread::spawn(move || {
            let mut b = [0u8; 2048];
            while let Ok((n, from)) = udp.recv_from(&mut b) {
                let _ = udp.send_to(&b[..n], from);
            }
        });
    }

    let cfg = UserNetConfig {
        dns_upstream: Some("127.0.0.1:53".into()),
        hostfwd: vec!["tcp:127.0.0.1:0-:23".into(), "udp:127.0.0.1:0-:24".into()],
        max_flows: 256,
        max_half_open: 32,
        udp_idle_timeout_secs: 2,
        tcp_idle_timeout_secs: 5,
        tcp_connect_timeout_secs: 2,
        ..Default::default()
    };
    let mut net = UserNet::new(&cfg).expect("user net");
    let fwd = net.hostfwd_addrs();
    let (fwd_tcp, fwd_udp) = (fwd[0], fwd[1]);
    std::thread::spawn(move || loop {
        if let Ok(mut s) = TcpStream::connect(fwd_tcp) {
            let _ = s.write_all(b"hello guest");
        }
        if let Ok(u) = UdpSocket::bind("127.0.0.1:0") {
            let _ = u.send_to(b"dgram", fwd_udp);
        }
        std::thread::sleep(Duration::from_millis(50));
    });

    let mut fz = FrameFuzzer::new(seed, seeds(net.gateway_mac(), &[7, 9, 53]));
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut inputs: u64 = 0;
    let mut frames_out: u64 = 0;
    while Instant::now() < deadline {
        for _ in 0..256 {
            if fz.rng.chance(1) {
                let o = Offloads {
                    csum: fz.rng.chance(50),
                    tso4: fz.rng.chance(50),
                    tso6: false,
                    tso_ecn: false,
                    ufo: false,
                };
                let _ = net.set_rx_offloads(o);
            }
            let (hdr, f) = fz.next_input();
            let _ = net.send(&hdr, &f);
            inputs += 1;
            if inputs.is_multiple_of(8) {
                while let Ok(Some(_)) = net.recv(&mut buf) {
                    frames_out += 1;
                }
            }
        }
    }
    println!("nat-fuzz: {inputs} inputs in {secs} s, {frames_out} frames out, no crash");
    println!("nat-fuzz: {}", net.counters());
}
