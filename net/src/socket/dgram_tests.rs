use std::time::Duration;

use super::*;
use crate::backend::MAX_FRAME_LEN;
use crate::testutil::{drop_count, eth_frame, gauge, recv_until, NetNs};

const WAIT: Duration = Duration::from_secs(3);

fn mac(n: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 1, n])
}

fn frame(from: u8, tag: u8) -> Vec<u8> {
    eth_frame([0xff; 6], mac(from).0, 0x88b5, &[tag; 50])
}

/// Two ports free right now on 127.0.0.1 (the tiny race with other processes is fine).
fn free_udp_ports() -> (u16, u16) {
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

/// A unicast link from 127.0.0.1:`local` to 127.0.0.1:`remote`.
fn unicast_cfg(local: u16, remote: u16) -> DgramConfig {
    DgramConfig {
        local: Some(format!("127.0.0.1:{local}")),
        remote: Some(format!("127.0.0.1:{remote}")),
        ..Default::default()
    }
}

fn quiet(backend: &mut dyn Backend) -> bool {
    recv_until(backend, Duration::from_millis(150), |_, _| true).is_none()
}

#[test]
fn config_parses_and_rejects_unknown_fields() {
    let cfg: DgramConfig = serde_json::from_str(
        r#"{"mcast": "230.0.0.1:1234", "ttl": 2, "loopback": true, "local_addr": "127.0.0.1"}"#,
    )
    .unwrap();
    assert_eq!(cfg.mcast.as_deref(), Some("230.0.0.1:1234"));
    assert_eq!(cfg.ttl, Some(2));
    let err =
        serde_json::from_str::<DgramConfig>(r#"{"mcast": "230.0.0.1:1", "tll": 2}"#).unwrap_err();
    assert!(err.to_string().contains("tll"), "{err}");
}

#[test]
fn invalid_configs_name_the_field() {
    let cases = [
        (DgramConfig::default(), "\"remote\""),
        (DgramConfig { remote: Some("127.0.0.1:9".into()), ..Default::default() }, "\"local\""),
        (
            DgramConfig {
                mcast: Some("230.0.0.1:9".into()),
                remote: Some("127.0.0.1:9".into()),
                ..Default::default()
            },
            "\"mcast\"",
        ),
        (
            DgramConfig { mcast: Some("10.0.0.1:9".into()), ..Default::default() },
            "\"mcast\": \"10.0.0.1:9\"",
        ),
        (
            DgramConfig { mcast: Some("230.0.0.1:9".into()), ttl: Some(300), ..Default::default() },
            "\"ttl\"",
        ),
        (
            DgramConfig {
                mcast: Some("230.0.0.1:9".into()),
                local_addr: Some("nope".into()),
                ..Default::default()
            },
            "\"local_addr\"",
        ),
        (
            DgramConfig {
                remote: Some("127.0.0.1:9".into()),
                local: Some("127.0.0.1:0".into()),
                ttl: Some(1),
                ..Default::default()
            },
            "\"ttl\"",
        ),
    ];
    for (cfg, needle) in cases {
        let msg = DgramBackend::new(&cfg, mac(1)).err().expect("should fail").to_string();
        assert!(msg.contains(needle), "{msg:?} should contain {needle:?}");
    }
}

#[test]
fn unicast_pair_moves_frames_both_ways_and_ignores_strangers() {
    let (pa, pb) = free_udp_ports();
    let mut a = DgramBackend::new(&unicast_cfg(pa, pb), mac(1)).unwrap();
    let mut b = DgramBackend::new(&unicast_cfg(pb, pa), mac(2)).unwrap();
    assert_eq!(a.supported_offloads(), Offloads::NONE);
    assert!(a.link_up());

    a.send(&VnetHdr::default(), &frame(1, 7)).unwrap();
    assert_eq!(recv_until(&mut b, WAIT, |_, _| true).map(|(_, f)| f), Some(frame(1, 7)));
    b.send(&VnetHdr::default(), &frame(2, 8)).unwrap();
    assert_eq!(recv_until(&mut a, WAIT, |_, _| true).map(|(_, f)| f), Some(frame(2, 8)));

    // A third party cannot inject frames.
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger.send_to(&frame(9, 9), ("127.0.0.1", pa)).unwrap();
    assert!(quiet(&mut a));

    // A runt from the peer is counted, not delivered.
    drop(b);
    let peer = UdpSocket::bind(("127.0.0.1", pb)).unwrap();
    peer.send_to(&[1, 2, 3], ("127.0.0.1", pa)).unwrap();
    assert!(quiet(&mut a));
    assert_eq!(drop_count(&a, "rx_runt"), 1);
}

#[test]
fn unicast_peer_down_is_counted_not_fatal() {
    let (pa, pb) = free_udp_ports();
    let mut a = DgramBackend::new(&unicast_cfg(pa, pb), mac(1)).unwrap();
    // Nobody listens on pb: the kernel reports port unreachable on a later call.
    for _ in 0..3 {
        let _ = a.send(&VnetHdr::default(), &frame(1, 1));
        std::thread::sleep(Duration::from_millis(20));
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        assert!(a.recv(&mut buf).unwrap().is_none());
    }
    assert!(drop_count(&a, "tx_peer_unreachable") >= 1);
    assert!(a.counters().tx_frames >= 1);
}

#[test]
fn offloaded_and_oversized_frames_are_refused() {
    let (pa, pb) = free_udp_ports();
    let mut a = DgramBackend::new(&unicast_cfg(pa, pb), mac(1)).unwrap();
    let tso = VnetHdr { gso_type: VnetHdr::GSO_TCPV4, ..Default::default() };
    assert!(matches!(a.send(&tso, &frame(1, 1)), Err(BackendError::Dropped(_))));
    assert!(matches!(
        a.send(&VnetHdr::default(), &vec![0u8; 65508]),
        Err(BackendError::Dropped(_))
    ));
    assert_eq!(drop_count(&a, "tx_offload_unsupported"), 1);
    assert_eq!(drop_count(&a, "tx_too_large_for_udp"), 1);
}

/// Multicast needs the MULTICAST flag on lo, which this host's lo may lack, so the test
/// runs in a namespace of its own.
#[test]
fn multicast_reaches_every_other_member_but_not_the_sender() {
    let Some(ns) = NetNs::new() else { return };
    ns.ip(&["link", "set", "lo", "multicast", "on"]);
    let cfg = DgramConfig {
        mcast: Some("230.0.0.1:20001".into()),
        local_addr: Some("127.0.0.1".into()),
        ..Default::default()
    };
    let mut members: Vec<DgramBackend> =
        ns.enter(|| (1..=3).map(|i| DgramBackend::new(&cfg, mac(i)).unwrap()).collect());

    for sender in 0..3 {
        let f = frame(sender as u8 + 1, 0x30 + sender as u8);
        members[sender].send(&VnetHdr::default(), &f).unwrap();
        for (i, member) in members.iter_mut().enumerate() {
            if i == sender {
                continue;
            }
            let got = recv_until(member, WAIT, |_, _| true).map(|(_, v)| v);
            assert_eq!(got.as_ref(), Some(&f), "member {i} from {sender}");
        }
    }
    for (i, member) in members.iter_mut().enumerate() {
        assert!(quiet(member), "member {i} must not hear itself");
        assert_eq!(gauge(member, "own_frames_ignored"), 1, "member {i}");
        assert_eq!(member.counters().rx_frames, 2);
        assert_eq!(drop_count(member, "rx_mac_conflict"), 0);
    }

    // Someone else using member 0's MAC is a conflict: dropped, counted.
    let intruder = ns.enter(|| UdpSocket::bind("127.0.0.1:0").unwrap());
    intruder.send_to(&frame(1, 0x99), "230.0.0.1:20001").unwrap();
    assert!(quiet(&mut members[0]));
    assert_eq!(drop_count(&members[0], "rx_mac_conflict"), 1);
    let got = recv_until(&mut members[1], WAIT, |_, _| true).map(|(_, v)| v);
    assert_eq!(got, Some(frame(1, 0x99)), "other members still get it");
}
