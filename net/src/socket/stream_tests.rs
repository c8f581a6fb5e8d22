use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;
use crate::testutil::{drop_count, eth_frame, gauge, pump_until, recv_until};

const WAIT: Duration = Duration::from_secs(5);

fn mac(n: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0, n])
}

fn frame(from: u8, tag: u8, len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len.saturating_sub(14)).map(|i| tag.wrapping_add(i as u8)).collect();
    eth_frame([0xff; 6], mac(from).0, 0x88b5, &payload)
}

fn listen_cfg(addr: &str) -> StreamConfig {
    StreamConfig { listen: Some(addr.into()), ..Default::default() }
}

fn connect_cfg(addr: &str) -> StreamConfig {
    StreamConfig { connect: Some(addr.into()), reconnect_ms: 50, ..Default::default() }
}

fn temp_sock(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("tapir-stream-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("s.sock")
}

fn tcp_listener() -> (StreamBackend, String) {
    let backend = StreamBackend::new(&listen_cfg("127.0.0.1:0"), mac(1)).unwrap();
    let addr = backend.local_addr().unwrap().to_string();
    (backend, addr)
}

/// Sends `f` on `from` and checks `to` receives exactly it.
fn check_delivery(from: &mut StreamBackend, to: &mut StreamBackend, f: &[u8]) {
    from.send(&VnetHdr::default(), f).unwrap();
    let got = recv_until(to, WAIT, |_, _| true).map(|(_, v)| v);
    assert_eq!(got.as_deref(), Some(f));
}

#[test]
fn config_parses_and_rejects_unknown_fields() {
    let cfg: StreamConfig =
        serde_json::from_str(r#"{"connect": "unix:/tmp/x.sock", "connect_timeout_ms": 0}"#)
            .unwrap();
    assert_eq!(cfg.connect.as_deref(), Some("unix:/tmp/x.sock"));
    assert_eq!(cfg.connect_timeout_ms, 0);
    assert_eq!(cfg.reconnect_ms, 1000);
    let hub: StreamConfig =
        serde_json::from_str(r#"{"listen": "127.0.0.1:5000", "hub": true}"#).unwrap();
    assert!(hub.hub);
    let err = serde_json::from_str::<StreamConfig>(r#"{"listen": "x:1", "lisen": 2}"#).unwrap_err();
    assert!(err.to_string().contains("lisen"), "{err}");
}

#[test]
fn invalid_configs_name_the_field() {
    let cases = [
        (StreamConfig::default(), "\"listen\""),
        (
            StreamConfig {
                listen: Some("a:1".into()),
                connect: Some("b:1".into()),
                ..Default::default()
            },
            "\"listen\"",
        ),
        (
            StreamConfig { connect: Some("127.0.0.1:1".into()), hub: true, ..Default::default() },
            "\"hub\"",
        ),
        (listen_cfg("nonsense"), "\"listen\": \"nonsense\""),
        (
            StreamConfig {
                connect: Some("127.0.0.1:1".into()),
                reconnect_ms: 0,
                ..Default::default()
            },
            "\"reconnect_ms\"",
        ),
    ];
    for (cfg, needle) in cases {
        let msg = StreamBackend::new(&cfg, mac(1)).err().expect("should fail").to_string();
        assert!(msg.contains(needle), "{msg:?} should contain {needle:?}");
    }
}

#[test]
fn tcp_frames_flow_both_ways_and_listen_side_sees_reconnect() {
    let (mut server, addr) = tcp_listener();
    assert!(!server.link_up());
    let mut client = StreamBackend::new(&connect_cfg(&addr), mac(2)).unwrap();
    assert!(client.link_up());
    assert!(pump_until(&mut server, WAIT, |b| b.link_up()));

    check_delivery(&mut client, &mut server, &frame(2, 1, 60));
    check_delivery(&mut server, &mut client, &frame(1, 2, 1514));
    check_delivery(&mut client, &mut server, &frame(2, 3, MAX_FRAME_LEN));
    assert_eq!(server.counters().rx_frames, 2);
    assert_eq!(server.counters().tx_frames, 1);

    drop(client);
    assert!(pump_until(&mut server, WAIT, |b| !b.link_up()), "link should go down");
    assert_eq!(
        server.send(&VnetHdr::default(), &frame(1, 4, 60)).unwrap_err().to_string(),
        "frame dropped: stream link is down"
    );
    assert_eq!(drop_count(&server, "link_down"), 1);

    let mut client = StreamBackend::new(&connect_cfg(&addr), mac(2)).unwrap();
    assert!(pump_until(&mut server, WAIT, |b| b.link_up()), "link should come back");
    check_delivery(&mut server, &mut client, &frame(1, 5, 100));
    check_delivery(&mut client, &mut server, &frame(2, 6, 100));
}

#[test]
fn unix_connect_side_reconnects_in_background() {
    let path = temp_sock("reconnect");
    let spec = format!("unix:{}", path.display());
    let mut server = StreamBackend::new(&listen_cfg(&spec), mac(1)).unwrap();
    let mut client = StreamBackend::new(&connect_cfg(&spec), mac(2)).unwrap();
    check_delivery(&mut client, &mut server, &frame(2, 1, 64));

    drop(server);
    assert!(!path.exists(), "listener removes its socket file");
    assert!(pump_until(&mut client, WAIT, |b| !b.link_up()), "connect side goes down");
    assert_eq!(
        client.send(&VnetHdr::default(), &frame(2, 2, 64)).unwrap_err().to_string(),
        "frame dropped: stream link is down"
    );

    let mut server = StreamBackend::new(&listen_cfg(&spec), mac(1)).unwrap();
    assert!(pump_until(&mut client, WAIT, |b| b.link_up()), "connect side comes back up");
    assert!(pump_until(&mut server, WAIT, |b| b.link_up()));
    check_delivery(&mut client, &mut server, &frame(2, 3, 64));
    check_delivery(&mut server, &mut client, &frame(1, 4, 64));
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn connect_fails_startup_after_timeout_naming_the_address() {
    let path = temp_sock("timeout");
    let cfg = StreamConfig {
        connect_timeout_ms: 300,
        ..connect_cfg(&format!("unix:{}", path.display()))
    };
    let start = Instant::now();
    let err = StreamBackend::new(&cfg, mac(2)).err().expect("nobody listens");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(3), "{waited:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("connect_timeout_ms"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn connect_waits_for_a_listener_that_starts_late() {
    let path = temp_sock("late");
    let spec = format!("unix:{}", path.display());
    let late = spec.clone();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let mut server = StreamBackend::new(&listen_cfg(&late), mac(1)).unwrap();
        let got = recv_until(&mut server, WAIT, |_, _| true).map(|(_, f)| f);
        assert_eq!(got, Some(frame(2, 9, 80)));
    });
    let cfg = StreamConfig { connect_timeout_ms: 5000, ..connect_cfg(&spec) };
    let mut client = StreamBackend::new(&cfg, mac(2)).unwrap();
    assert!(client.link_up());
    client.send(&VnetHdr::default(), &frame(2, 9, 80)).unwrap();
    starter.join().unwrap();
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn zero_timeout_starts_link_down_and_connects_later() {
    let path = temp_sock("background");
    let spec = format!("unix:{}", path.display());
    let cfg = StreamConfig { connect_timeout_ms: 0, ..connect_cfg(&spec) };
    let mut client = StreamBackend::new(&cfg, mac(2)).unwrap();
    assert!(!client.link_up());
    let mut server = StreamBackend::new(&listen_cfg(&spec), mac(1)).unwrap();
    assert!(pump_until(&mut client, WAIT, |b| b.link_up()));
    assert!(pump_until(&mut server, WAIT, |b| b.link_up()));
    check_delivery(&mut server, &mut client, &frame(1, 1, 64));
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn tcp_connect_reconnects_after_listener_restart_on_same_port() {
    let (server, addr) = tcp_listener();
    let mut client = StreamBackend::new(&connect_cfg(&addr), mac(2)).unwrap();
    drop(server);
    assert!(pump_until(&mut client, WAIT, |b| !b.link_up()));
    let mut server = StreamBackend::new(&listen_cfg(&addr), mac(1)).unwrap();
    assert!(pump_until(&mut client, WAIT, |b| b.link_up()));
    check_delivery(&mut client, &mut server, &frame(2, 1, 64));
}

fn raw_length_test(prefix: [u8; 4]) {
    let (mut server, addr) = tcp_listener();
    let mut raw = TcpStream::connect(&addr).unwrap();
    assert!(pump_until(&mut server, WAIT, |b| b.link_up()));
    // A good frame first, then the bogus length.
    let good = frame(9, 1, 60);
    raw.write_all(&(good.len() as u32).to_be_bytes()).unwrap();
    raw.write_all(&good).unwrap();
    raw.write_all(&prefix).unwrap();
    raw.write_all(&[0x55; 32]).unwrap();
    let got = recv_until(&mut server, WAIT, |_, _| true).map(|(_, f)| f);
    assert_eq!(got, Some(good));
    assert!(pump_until(&mut server, WAIT, |b| !b.link_up()), "connection should be closed");
    assert_eq!(drop_count(&server, "rx_bad_length"), 1);
    // The peer sees the connection closed.
    raw.set_read_timeout(Some(WAIT)).unwrap();
    let mut byte = [0u8; 1];
    assert!(matches!(raw.read(&mut byte), Ok(0) | Err(_)));
    // And the listener takes a fresh, well-behaved peer.
    let mut client = StreamBackend::new(&connect_cfg(&addr), mac(2)).unwrap();
    assert!(pump_until(&mut server, WAIT, |b| b.link_up()));
    check_delivery(&mut client, &mut server, &frame(2, 2, 64));
}

#[test]
fn zero_length_prefix_closes_the_connection() {
    raw_length_test(0u32.to_be_bytes());
}

#[test]
fn huge_length_prefix_closes_the_connection_without_allocating() {
    raw_length_test(u32::MAX.to_be_bytes());
    raw_length_test((MAX_FRAME_LEN as u32 + 1).to_be_bytes());
}

#[test]
fn frames_dribbled_byte_by_byte_are_reassembled() {
    let path = temp_sock("dribble");
    let spec = format!("unix:{}", path.display());
    let mut server = StreamBackend::new(&listen_cfg(&spec), mac(1)).unwrap();
    let mut raw = UnixStream::connect(&path).unwrap();
    let frames = [frame(9, 1, 60), frame(9, 2, 300)];
    let bytes: Vec<u8> = frames
        .iter()
        .flat_map(|f| (f.len() as u32).to_be_bytes().into_iter().chain(f.iter().copied()))
        .collect();
    let writer = std::thread::spawn(move || {
        for chunk in bytes.chunks(7) {
            raw.write_all(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        raw
    });
    for want in &frames {
        let got = recv_until(&mut server, WAIT, |_, _| true).map(|(_, f)| f);
        assert_eq!(got.as_ref(), Some(want));
    }
    drop(writer.join().unwrap());
    assert!(pump_until(&mut server, WAIT, |b| !b.link_up()));
    assert_eq!(drop_count(&server, "rx_truncated_at_disconnect"), 0);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn frames_buffered_before_disconnect_are_delivered_and_a_cut_frame_is_counted() {
    let path = temp_sock("cut");
    let spec = format!("unix:{}", path.display());
    let mut server = StreamBackend::new(&listen_cfg(&spec), mac(1)).unwrap();
    let mut raw = UnixStream::connect(&path).unwrap();
    let whole = frame(9, 1, 100);
    raw.write_all(&(whole.len() as u32).to_be_bytes()).unwrap();
    raw.write_all(&whole).unwrap();
    raw.write_all(&200u32.to_be_bytes()).unwrap();
    raw.write_all(&[1, 2, 3]).unwrap();
    drop(raw);
    let got = recv_until(&mut server, WAIT, |_, _| true).map(|(_, f)| f);
    assert_eq!(got, Some(whole));
    assert!(pump_until(&mut server, WAIT, |b| !b.link_up()));
    assert_eq!(drop_count(&server, "rx_truncated_at_disconnect"), 1);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn slow_peer_gets_would_block_then_every_frame_in_order() {
    let path = temp_sock("slow");
    let spec = format!("unix:{}", path.display());
    let mut server = StreamBackend::new(&listen_cfg(&spec), mac(1)).unwrap();
    let mut raw = UnixStream::connect(&path).unwrap();
    assert!(pump_until(&mut server, WAIT, |b| b.link_up()));
    // Fill the socket and our backlog while the peer reads nothing.
    let mut sent = Vec::new();
    loop {
        let f = frame(1, sent.len() as u8, 9000);
        match server.send(&VnetHdr::default(), &f) {
            Ok(()) => sent.push(f),
            Err(BackendError::WouldBlock) => break,
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(sent.len() < 10_000, "never pushed back");
    }
    assert!(sent.len() > 10);
    let expected: usize = sent.iter().map(|f| 4 + f.len()).sum();
    let reader = std::thread::spawn(move || {
        let mut all = vec![0u8; expected];
        raw.read_exact(&mut all).unwrap();
        all
    });
    // The backlog drains through recv() as the socket becomes writable.
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    while !reader.is_finished() {
        crate::testutil::wait_readable(&server, Duration::from_millis(20));
        let _ = server.recv(&mut buf);
    }
    let all = reader.join().unwrap();
    let mut at = 0;
    for f in &sent {
        let len = u32::from_be_bytes(all[at..at + 4].try_into().unwrap()) as usize;
        assert_eq!(&all[at + 4..at + 4 + len], &f[..]);
        at += 4 + len;
    }
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn second_peer_is_refused_without_hub() {
    let (mut server, addr) = tcp_listener();
    let mut first = StreamBackend::new(&connect_cfg(&addr), mac(2)).unwrap();
    assert!(pump_until(&mut server, WAIT, |b| b.link_up()));
    let mut second = TcpStream::connect(&addr).unwrap();
    assert!(pump_until(&mut server, WAIT, |b| gauge(b, "refused_peers") == 1));
    second.set_read_timeout(Some(WAIT)).unwrap();
    let mut byte = [0u8; 1];
    assert!(matches!(second.read(&mut byte), Ok(0) | Err(_)));
    check_delivery(&mut first, &mut server, &frame(2, 1, 64));
    assert_eq!(server.peer_count(), 1);
}

#[test]
fn hub_forwards_between_three_peers_and_the_local_nic() {
    let cfg = StreamConfig { listen: Some("127.0.0.1:0".into()), hub: true, ..Default::default() };
    let mut hub = StreamBackend::new(&cfg, mac(10)).unwrap();
    let addr = hub.local_addr().unwrap().to_string();
    let mut peers: Vec<StreamBackend> =
        (0..3).map(|i| StreamBackend::new(&connect_cfg(&addr), mac(i)).unwrap()).collect();
    assert!(pump_until(&mut hub, WAIT, |b| gauge(b, "peers") == 3));

    for sender in 0..3u8 {
        let f = frame(sender, 0x40 + sender, 200);
        peers[sender as usize].send(&VnetHdr::default(), &f).unwrap();
        // The local NIC gets it, and receiving it forwards it to the other peers.
        let got = recv_until(&mut hub, WAIT, |_, _| true).map(|(_, v)| v);
        assert_eq!(got.as_ref(), Some(&f), "hub NIC, sender {sender}");
        for (i, peer) in peers.iter_mut().enumerate() {
            if i == sender as usize {
                continue;
            }
            let got = recv_until(peer, WAIT, |_, _| true).map(|(_, v)| v);
            assert_eq!(got.as_ref(), Some(&f), "peer {i}, sender {sender}");
        }
    }
    // The local NIC's frame reaches every peer.
    let f = frame(10, 0x77, 300);
    hub.send(&VnetHdr::default(), &f).unwrap();
    for (i, peer) in peers.iter_mut().enumerate() {
        let got = recv_until(peer, WAIT, |_, _| true).map(|(_, v)| v);
        assert_eq!(got.as_ref(), Some(&f), "peer {i}");
    }
    // Nobody got their own frame back.
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    std::thread::sleep(Duration::from_millis(100));
    for peer in &mut peers {
        assert!(peer.recv(&mut buf).unwrap().is_none());
    }
    assert!(hub.recv(&mut buf).unwrap().is_none());
    // One peer leaving keeps the hub up for the others.
    peers.pop();
    assert!(pump_until(&mut hub, WAIT, |b| gauge(b, "peers") == 2));
    assert!(hub.link_up());
}

#[test]
fn offloaded_and_oversized_frames_are_refused() {
    let (mut server, addr) = tcp_listener();
    let _client = StreamBackend::new(&connect_cfg(&addr), mac(2)).unwrap();
    assert!(pump_until(&mut server, WAIT, |b| b.link_up()));
    assert_eq!(server.supported_offloads(), Offloads::NONE);
    let gso = VnetHdr { flags: VnetHdr::FLAG_NEEDS_CSUM, ..Default::default() };
    assert!(matches!(server.send(&gso, &frame(1, 1, 64)), Err(BackendError::Dropped(_))));
    assert!(matches!(server.send(&VnetHdr::default(), &[]), Err(BackendError::Dropped(_))));
    assert!(matches!(
        server.send(&VnetHdr::default(), &vec![0u8; MAX_FRAME_LEN + 1]),
        Err(BackendError::Dropped(_))
    ));
    assert_eq!(drop_count(&server, "tx_offload_unsupported"), 1);
    assert_eq!(drop_count(&server, "tx_bad_length"), 2);
}

#[test]
fn short_receive_buffer_drops_and_counts() {
    let (mut server, addr) = tcp_listener();
    let mut client = StreamBackend::new(&connect_cfg(&addr), mac(2)).unwrap();
    assert!(pump_until(&mut server, WAIT, |b| b.link_up()));
    client.send(&VnetHdr::default(), &frame(2, 1, 1000)).unwrap();
    let mut small = vec![0u8; 100];
    let deadline = Instant::now() + WAIT;
    loop {
        match server.recv(&mut small) {
            Err(BackendError::Dropped(_)) => break,
            Ok(None) => crate::testutil::wait_readable(&server, Duration::from_millis(20)),
            other => panic!("unexpected {other:?}"),
        };
        assert!(Instant::now() < deadline);
    }
    assert_eq!(drop_count(&server, "rx_too_large_for_buffer"), 1);
}

#[test]
fn stale_unix_socket_is_replaced_but_live_one_and_plain_file_are_not() {
    let path = temp_sock("stale");
    let spec = format!("unix:{}", path.display());
    // A socket file nobody listens on (its listener is gone without cleanup).
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    // std leaves the socket file behind, as a crashed process would.
    assert!(path.exists());
    drop(StreamBackend::new(&listen_cfg(&spec), mac(1)).unwrap());
    // A live listener is not stolen.
    let live = StreamBackend::new(&listen_cfg(&spec), mac(1)).unwrap();
    let err = StreamBackend::new(&listen_cfg(&spec), mac(2)).err().expect("in use").to_string();
    assert!(err.contains("another process is listening"), "{err}");
    drop(live);
    // A regular file is never deleted.
    std::fs::write(&path, b"precious").unwrap();
    let err =
        StreamBackend::new(&listen_cfg(&spec), mac(1)).err().expect("not a socket").to_string();
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn poll_fd_goes_quiet_after_recv_drains_everything() {
    let (mut server, addr) = tcp_listener();
    let mut client = StreamBackend::new(&connect_cfg(&addr), mac(2)).unwrap();
    assert!(pump_until(&mut server, WAIT, |b| b.link_up()));
    for i in 0..5 {
        client.send(&VnetHdr::default(), &frame(2, i, 100)).unwrap();
    }
    let mut got = 0;
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let deadline = Instant::now() + WAIT;
    while got < 5 && Instant::now() < deadline {
        crate::testutil::wait_readable(&server, Duration::from_millis(50));
        // Take one frame per wake-up, as a frontend short of guest buffers would.
        if let Ok(Some(_)) = server.recv(&mut buf) {
            got += 1;
        }
    }
    assert_eq!(got, 5, "buffered frames keep poll_fd readable");
    while let Ok(Some(_)) = server.recv(&mut buf) {}
    assert!(
        !crate::testutil::wait_readable(&server, Duration::from_millis(100)),
        "idle backend must not poll readable"
    );
}
