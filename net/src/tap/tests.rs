//! Tap tests. The ones marked "real tap" create a network namespace, open a real tap in
//! it from a thread that joined it, and exchange frames with that namespace's kernel.
//! Without root they print a note and pass vacuously.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::time::Duration;

use super::*;
use crate::testutil::{drop_count, eth_frame, recv_until, NetNs};

const WAIT: Duration = Duration::from_secs(5);
const GUEST_MAC: MacAddr = MacAddr([0x02, 0x54, 0x00, 0x12, 0x34, 0x01]);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);

// ---- frame building -------------------------------------------------------------

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload_len: usize) -> Vec<u8> {
    let total = (20 + payload_len) as u16;
    let mut h = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let check = !csum_fold(csum_add(0, &h));
    h[10..12].copy_from_slice(&check.to_be_bytes());
    h
}

fn arp_request(src_mac: MacAddr, src_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4, 0, 1];
    p.extend_from_slice(&src_mac.0);
    p.extend_from_slice(&src_ip.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target.octets());
    eth_frame([0xff; 6], src_mac.0, 0x0806, &p)
}

/// (sender MAC, sender IP) of an ARP reply.
fn parse_arp_reply(f: &[u8]) -> Option<([u8; 6], Ipv4Addr)> {
    if f.len() < 42 || f[12..14] != [0x08, 0x06] || f[20..22] != [0, 2] {
        return None;
    }
    Some((f[22..28].try_into().ok()?, Ipv4Addr::new(f[28], f[29], f[30], f[31])))
}

fn icmp_echo(dst_mac: [u8; 6], id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let check = !csum_fold(csum_add(0, &icmp));
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    let mut ip = ipv4_header(GUEST_IP, HOST_IP, 1, icmp.len());
    ip.extend_from_slice(&icmp);
    eth_frame(dst_mac, GUEST_MAC.0, 0x0800, &ip)
}

fn is_echo_reply(f: &[u8], id: u16, seq: u16) -> bool {
    f.len() >= 42
        && f[12..14] == [0x08, 0x00]
        && f[23] == 1
        && f[34] == 0
        && f[38..40] == id.to_be_bytes()
        && f[40..42] == seq.to_be_bytes()
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

struct Tcp<'a> {
    dst_mac: [u8; 6],
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    options: &'a [u8],
    payload: &'a [u8],
    /// Leave only the pseudo-header sum in the checksum field (CHECKSUM_PARTIAL).
    partial_csum: bool,
}

impl Tcp<'_> {
    fn frame(&self) -> Vec<u8> {
        let header_len = 20 + self.options.len();
        let mut tcp = Vec::with_capacity(header_len + self.payload.len());
        tcp.extend_from_slice(&self.sport.to_be_bytes());
        tcp.extend_from_slice(&self.dport.to_be_bytes());
        tcp.extend_from_slice(&self.seq.to_be_bytes());
        tcp.extend_from_slice(&self.ack.to_be_bytes());
        tcp.push(((header_len / 4) as u8) << 4);
        tcp.push(self.flags);
        tcp.extend_from_slice(&65535u16.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0]);
        tcp.extend_from_slice(self.options);
        tcp.extend_from_slice(self.payload);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&GUEST_IP.octets());
        pseudo.extend_from_slice(&HOST_IP.octets());
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        let check = if self.partial_csum {
            csum_fold(csum_add(0, &pseudo))
        } else {
            !csum_fold(csum_add(csum_add(0, &pseudo), &tcp))
        };
        tcp[16..18].copy_from_slice(&check.to_be_bytes());
        let mut ip = ipv4_header(GUEST_IP, HOST_IP, 6, tcp.len());
        ip.extend_from_slice(&tcp);
        eth_frame(self.dst_mac, GUEST_MAC.0, 0x0800, &ip)
    }
}

/// (seq, ack, flags, payload length) of a TCP segment to `dport`.
fn parse_tcp(f: &[u8], dport: u16) -> Option<(u32, u32, u8, usize)> {
    if f.len() < 54 || f[12..14] != [0x08, 0x00] || f[23] != 6 {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let tcp = f.get(14 + ihl..14 + total)?;
    if tcp.get(2..4)? != dport.to_be_bytes() {
        return None;
    }
    let seq = u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?);
    let ack = u32::from_be_bytes(tcp.get(8..12)?.try_into().ok()?);
    let doff = usize::from(tcp.get(12)? >> 4) * 4;
    Some((seq, ack, *tcp.get(13)?, tcp.len().saturating_sub(doff)))
}

// ---- helpers ---------------------------------------------------------------------

fn link_line(ns: &NetNs, ifname: &str) -> String {
    ns.ip(&["-o", "link", "show", "dev", ifname])
}

fn link_exists(ns: &NetNs, ifname: &str) -> bool {
    ns.try_run(&["ip", "link", "show", "dev", ifname]).status.success()
}

fn is_up(line: &str) -> bool {
    line.split(['<', '>']).nth(1).is_some_and(|flags| flags.split(',').any(|f| f == "UP"))
}

fn named(ifname: &str) -> TapConfig {
    TapConfig { ifname: Some(ifname.into()), ..Default::default() }
}

/// Creates `ifname` in `ns` with the host address and a static neighbour for the guest.
fn tap_with_address(ns: &NetNs, ifname: &str) -> Tap {
    let tap = ns.enter(|| Tap::open(&named(ifname), Some(GUEST_MAC))).unwrap();
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", ifname]);
    ns.ip(&[
        "neigh",
        "replace",
        &GUEST_IP.to_string(),
        "lladdr",
        &GUEST_MAC.to_string(),
        "dev",
        ifname,
    ]);
    tap
}

/// Resolves the host side's MAC the way a guest would: ARP.
fn arp_for_host(tap: &mut Tap) -> [u8; 6] {
    tap.send(&VnetHdr::default(), &arp_request(GUEST_MAC, GUEST_IP, HOST_IP)).unwrap();
    let (_, reply) = recv_until(tap, WAIT, |_, f| parse_arp_reply(f).is_some()).expect("ARP reply");
    let (mac, ip) = parse_arp_reply(&reply).unwrap();
    assert_eq!(ip, HOST_IP);
    mac
}

// ---- config (no root needed) -------------------------------------------------------

#[test]
fn config_defaults_and_unknown_fields() {
    let cfg: TapConfig = serde_json::from_str(r#"{"ifname": "tap0"}"#).unwrap();
    assert_eq!(
        cfg,
        TapConfig { ifname: Some("tap0".into()), fd: None, bridge: None, vnet_hdr: true }
    );
    let cfg: TapConfig =
        serde_json::from_str(r#"{"fd": 5, "bridge": "br0", "vnet_hdr": false}"#).unwrap();
    assert_eq!(cfg.fd, Some(5));
    assert!(!cfg.vnet_hdr);
    let err =
        serde_json::from_str::<TapConfig>(r#"{"ifname": "tap0", "brige": "br0"}"#).unwrap_err();
    assert!(err.to_string().contains("brige"), "{err}");
}

#[test]
fn bad_names_and_fds_are_rejected_naming_field_and_value() {
    let cases = [
        (named("a-name-much-too-long"), "\"ifname\": \"a-name-much-too-long\""),
        (named(""), "\"ifname\""),
        (named("tap/0"), "\"ifname\": \"tap/0\""),
        (named("tap 0"), "\"ifname\""),
        (TapConfig { bridge: Some("br%d".into()), ..Default::default() }, "\"bridge\": \"br%d\""),
        (TapConfig { fd: Some(-3), ..Default::default() }, "\"fd\": \"-3\""),
        (
            TapConfig { fd: Some(987_654), ..Default::default() },
            "\"fd\": \"987654\" is not an open file descriptor",
        ),
    ];
    for (cfg, needle) in cases {
        let msg = Tap::open(&cfg, None).err().expect("should fail").to_string();
        assert!(msg.contains(needle), "{msg:?} should contain {needle:?}");
    }
}

#[test]
fn fd_that_is_not_a_tap_is_rejected_and_left_open() {
    let file = std::fs::File::open("/dev/null").unwrap();
    let raw = file.as_raw_fd();
    let msg = Tap::open(&TapConfig { fd: Some(raw), ..Default::default() }, None)
        .err()
        .expect("not a tap")
        .to_string();
    assert!(msg.contains(&format!("\"fd\": \"{raw}\"")) && msg.contains("not a tap"), "{msg}");
    assert!(sys::fd_is_open(raw), "a rejected fd is not ours to close");
}

#[test]
fn host_side_mac_differs_from_guest_and_stays_local_unicast() {
    for guest in [GUEST_MAC, MacAddr([0xfe, 1, 2, 3, 4, 5]), MacAddr::derive("vm", 0)] {
        let host = host_side_mac(guest);
        assert_ne!(host, guest);
        assert!(host.is_locally_administered() && !host.is_multicast());
        assert_eq!(host.0[1..], guest.0[1..]);
    }
}

#[test]
fn offload_flags_follow_tun_rules() {
    assert_eq!(offload_flags(Offloads::NONE), 0);
    // Nothing without checksum offload.
    assert_eq!(offload_flags(Offloads { tso4: true, ..Offloads::NONE }), 0);
    let all = Offloads { csum: true, tso4: true, tso6: true, tso_ecn: true, ufo: true };
    assert_eq!(
        offload_flags(all),
        sys::TUN_F_CSUM | sys::TUN_F_TSO4 | sys::TUN_F_TSO6 | sys::TUN_F_TSO_ECN | sys::TUN_F_UFO
    );
    // ECN only rides along with a TSO flag.
    assert_eq!(
        offload_flags(Offloads { csum: true, tso_ecn: true, ..Offloads::NONE }),
        sys::TUN_F_CSUM
    );
}

// ---- real taps ----------------------------------------------------------------------

#[test]
fn created_tap_answers_arp_and_ping_and_vanishes_on_drop() {
    let Some(ns) = NetNs::new() else { return };
    let mut tap = tap_with_address(&ns, "tpt0");
    assert!(tap.created());
    assert_eq!(tap.ifname(), "tpt0");
    let line = link_line(&ns, "tpt0");
    assert!(is_up(&line), "created tap must be up: {line}");
    assert!(line.contains(&host_side_mac(GUEST_MAC).to_string()), "host-side MAC: {line}");

    let offloads = tap.supported_offloads();
    assert!(offloads.csum && offloads.tso4 && offloads.tso6, "{offloads:?}");

    let host_mac = arp_for_host(&mut tap);
    assert_eq!(MacAddr(host_mac), host_side_mac(GUEST_MAC));

    tap.send(&VnetHdr::default(), &icmp_echo(host_mac, 0x4242, 7, b"tapir ping payload")).unwrap();
    let reply = recv_until(&mut tap, WAIT, |_, f| is_echo_reply(f, 0x4242, 7)).map(|(_, f)| f);
    let reply = reply.expect("echo reply");
    assert!(reply.ends_with(b"tapir ping payload"));
    let c = tap.counters();
    assert!(c.tx_frames >= 2 && c.rx_frames >= 2, "{c}");
    assert!(c.drops.iter().all(|(_, n)| *n == 0), "{c}");

    drop(tap);
    assert!(!link_exists(&ns, "tpt0"), "a tap tapir created must vanish with it");
}

#[test]
fn kernel_named_tap_gets_a_number() {
    let Some(ns) = NetNs::new() else { return };
    let tap = ns.enter(|| Tap::open(&TapConfig::default(), None)).unwrap();
    assert!(
        tap.ifname().starts_with("tapir") && tap.ifname() != DEFAULT_IFNAME_PATTERN,
        "{}",
        tap.ifname()
    );
    assert!(link_exists(&ns, tap.ifname()));
}

#[test]
fn tso_frame_with_partial_checksum_reaches_a_listener_and_kernel_sends_tso_back() {
    let Some(ns) = NetNs::new() else { return };
    let mut tap = tap_with_address(&ns, "tpo0");
    let listener = ns.enter(|| TcpListener::bind((HOST_IP, 7000))).unwrap();
    let offloads = tap.supported_offloads();
    tap.set_rx_offloads(offloads).unwrap();
    assert!(tap.rx_offloads().tso4);
    let host_mac = arp_for_host(&mut tap);

    // Handshake by hand: SYN with MSS 1460, no window scaling.
    let (sport, dport, isn) = (40000u16, 7000u16, 1000u32);
    let mss = [2, 4, 0x05, 0xb4];
    let seg = |seq, ack, flags, options: &[u8], payload: &[u8], partial_csum| {
        Tcp { dst_mac: host_mac, sport, dport, seq, ack, flags, options, payload, partial_csum }
            .frame()
    };
    tap.send(&VnetHdr::default(), &seg(isn, 0, SYN, &mss, &[], false)).unwrap();
    let (_, synack) = recv_until(&mut tap, WAIT, |_, f| {
        parse_tcp(f, sport).is_some_and(|(_, _, flags, _)| flags & (SYN | ACK) == SYN | ACK)
    })
    .expect("SYN-ACK");
    let (their_isn, ack, _, _) = parse_tcp(&synack, sport).unwrap();
    assert_eq!(ack, isn + 1);
    tap.send(&VnetHdr::default(), &seg(isn + 1, their_isn + 1, ACK, &[], &[], false)).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();

    // One 3000-byte super-frame, segmented by the kernel into 1000-byte segments, with
    // only the pseudo-header checksum filled in.
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let gso = VnetHdr {
        flags: VnetHdr::FLAG_NEEDS_CSUM,
        gso_type: VnetHdr::GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1000,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    tap.send(&gso, &seg(isn + 1, their_isn + 1, PSH | ACK, &[], &data, true)).unwrap();
    let mut got = vec![0u8; data.len()];
    conn.read_exact(&mut got).expect("listener receives the TSO data");
    assert_eq!(got, data);

    // The other way: with TSO negotiated, the kernel hands us a super-frame.
    let reply: Vec<u8> = (0..12_000u32).map(|i| (i % 253) as u8).collect();
    conn.write_all(&reply).unwrap();
    let (hdr, big) = recv_until(&mut tap, WAIT, |h, f| {
        parse_tcp(f, sport).is_some_and(|(_, _, _, len)| len > 0) && h.gso_type != VnetHdr::GSO_NONE
    })
    .expect("a GSO frame from the kernel");
    assert_eq!(hdr.gso_type & !VnetHdr::GSO_ECN, VnetHdr::GSO_TCPV4);
    assert!(big.len() > 1514, "super-frame of {} bytes", big.len());
    assert!(hdr.gso_size > 0 && usize::from(hdr.gso_size) <= 1460);
    assert_eq!(hdr.num_buffers, 0);
}

#[test]
fn partial_checksum_frames_are_held_back_until_negotiated() {
    let Some(ns) = NetNs::new() else { return };
    let mut tap = tap_with_address(&ns, "tpc0");
    let host_mac = arp_for_host(&mut tap);
    let _listener = ns.enter(|| TcpListener::bind((HOST_IP, 7001))).unwrap();
    // No offloads negotiated: what the kernel sends is complete (no NEEDS_CSUM, no GSO).
    let syn = Tcp {
        dst_mac: host_mac,
        sport: 40001,
        dport: 7001,
        seq: 5,
        ack: 0,
        flags: SYN,
        options: &[2, 4, 0x05, 0xb4],
        payload: &[],
        partial_csum: false,
    };
    tap.send(&VnetHdr::default(), &syn.frame()).unwrap();
    let (hdr, _) =
        recv_until(&mut tap, WAIT, |_, f| parse_tcp(f, 40001).is_some()).expect("SYN-ACK");
    assert!(hdr.is_plain(), "{hdr:?}");
}

#[test]
fn vnet_hdr_off_means_no_offloads_and_plain_frames() {
    let Some(ns) = NetNs::new() else { return };
    let cfg = TapConfig { vnet_hdr: false, ..named("tpv0") };
    let mut tap = ns.enter(|| Tap::open(&cfg, Some(GUEST_MAC))).unwrap();
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "tpv0"]);
    assert_eq!(tap.supported_offloads(), Offloads::NONE);
    let host_mac = arp_for_host(&mut tap);
    assert_eq!(MacAddr(host_mac), host_side_mac(GUEST_MAC));
    let gso = VnetHdr { flags: VnetHdr::FLAG_NEEDS_CSUM, ..Default::default() };
    assert!(matches!(
        tap.send(&gso, &arp_request(GUEST_MAC, GUEST_IP, HOST_IP)),
        Err(BackendError::Dropped(_))
    ));
    assert_eq!(drop_count(&tap, "tx_offload_without_vnet_hdr"), 1);
}

#[test]
fn existing_single_queue_tap_is_attached_and_left_in_place() {
    let Some(ns) = NetNs::new() else { return };
    ns.ip(&["tuntap", "add", "dev", "tps0", "mode", "tap"]);
    let mut tap = ns.enter(|| Tap::open(&named("tps0"), Some(GUEST_MAC))).unwrap();
    assert!(!tap.created());
    assert!(is_up(&link_line(&ns, "tps0")), "an attached tap is brought up too");
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "tps0"]);
    let host_mac = arp_for_host(&mut tap);
    assert_ne!(MacAddr(host_mac), GUEST_MAC);
    // A single-queue tap takes one fd only.
    let err = ns.enter(|| Tap::open(&named("tps0"), None)).err().expect("busy");
    assert!(matches!(err, TapError::Busy { .. }), "{err}");
    drop(tap);
    assert!(link_exists(&ns, "tps0"), "a pre-existing tap stays");
}

#[test]
fn existing_multi_queue_tap_with_an_owner_process_is_refused() {
    let Some(ns) = NetNs::new() else { return };
    ns.ip(&["tuntap", "add", "dev", "tpm0", "mode", "tap", "multi_queue", "vnet_hdr"]);
    let first = ns.enter(|| Tap::open(&named("tpm0"), None)).unwrap();
    let err = ns.enter(|| Tap::open(&named("tpm0"), None)).err().expect("in use");
    let msg = err.to_string();
    assert!(matches!(err, TapError::AlreadyAttached { queues: 1, .. }), "{msg}");
    assert!(msg.contains("\"tpm0\""), "{msg}");
    drop(first);
    // Another test forking at this moment briefly holds a copy of the closed fd (until
    // its exec), which still counts as a queue; allow for that.
    let deadline = std::time::Instant::now() + WAIT;
    let again = loop {
        match ns.enter(|| Tap::open(&named("tpm0"), None)) {
            Ok(tap) => break tap,
            Err(TapError::AlreadyAttached { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("reopen after release: {e}"),
        }
    };
    assert!(!again.created());
}

#[test]
fn non_tap_interface_is_refused() {
    let Some(ns) = NetNs::new() else { return };
    let err = ns.enter(|| Tap::open(&named("lo"), None)).err().expect("lo is no tap");
    assert!(matches!(err, TapError::NotATap { .. }), "{err}");
    ns.ip(&["tuntap", "add", "dev", "tun9", "mode", "tun"]);
    let err = ns.enter(|| Tap::open(&named("tun9"), None)).err().expect("tun is no tap");
    assert!(matches!(err, TapError::NotATap { .. }), "{err}");
}

#[test]
fn bridge_attach_sets_master_and_brings_tap_up() {
    let Some(ns) = NetNs::new() else { return };
    ns.ip(&["link", "add", "brt0", "type", "bridge"]);
    let cfg = TapConfig { bridge: Some("brt0".into()), ..named("tpb0") };
    let tap = ns.enter(|| Tap::open(&cfg, Some(GUEST_MAC))).unwrap();
    let line = link_line(&ns, "tpb0");
    assert!(line.contains("master brt0"), "{line}");
    assert!(is_up(&line), "{line}");
    // Opening a tap already on the bridge is fine; one on another bridge is not.
    drop(tap);
    ns.ip(&["tuntap", "add", "dev", "tpb1", "mode", "tap"]);
    ns.ip(&["link", "set", "tpb1", "master", "brt0"]);
    let cfg1 = TapConfig { bridge: Some("brt0".into()), ..named("tpb1") };
    drop(ns.enter(|| Tap::open(&cfg1, None)).unwrap());
    ns.ip(&["link", "add", "brt1", "type", "bridge"]);
    let other = TapConfig { bridge: Some("brt1".into()), ..named("tpb1") };
    let msg = ns.enter(|| Tap::open(&other, None)).err().expect("on brt0").to_string();
    assert!(
        msg.contains("\"bridge\": \"brt1\"") && msg.contains("already a port of brt0"),
        "{msg}"
    );
}

#[test]
fn bridge_that_is_missing_or_not_a_bridge_is_named() {
    let Some(ns) = NetNs::new() else { return };
    let cfg = TapConfig { bridge: Some("nobr0".into()), ..named("tpx0") };
    let msg = ns.enter(|| Tap::open(&cfg, None)).err().expect("no bridge").to_string();
    assert!(msg.contains("\"bridge\": \"nobr0\" does not exist"), "{msg}");
    let cfg = TapConfig { bridge: Some("lo".into()), ..named("tpx0") };
    let msg = ns.enter(|| Tap::open(&cfg, None)).err().expect("lo").to_string();
    assert!(msg.contains("\"bridge\": \"lo\" is not a bridge"), "{msg}");
    // The tap created for the failed attempt does not linger.
    assert!(!link_exists(&ns, "tpx0"));
}

#[test]
fn vanishing_tap_logs_once_counts_drops_and_stops_polling() {
    let Some(ns) = NetNs::new() else { return };
    let mut tap = tap_with_address(&ns, "tpg0");
    let fd_before = tap.poll_fd();
    ns.ip(&["link", "del", "tpg0"]);

    let mut buf = vec![0u8; MAX_FRAME_LEN];
    // The first recv notices and reports it; afterwards the backend is quietly down.
    assert!(matches!(tap.recv(&mut buf), Err(BackendError::Io(_))));
    assert!(tap.is_gone());
    assert!(!tap.link_up());
    assert_eq!(tap.poll_fd(), fd_before, "the fd number a frontend registered stays valid");
    let mut pfd = libc::pollfd { fd: tap.poll_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 200) };
    assert_eq!(n, 0, "a gone tap must not poll ready (revents {:#x})", pfd.revents);
    assert!(tap.recv(&mut buf).unwrap().is_none());
    for _ in 0..3 {
        assert!(matches!(tap.send(&VnetHdr::default(), &[0u8; 60]), Err(BackendError::Dropped(_))));
    }
    assert_eq!(drop_count(&tap, "tap_gone"), 3);
    tap.set_rx_offloads(Offloads::NONE).unwrap();
}

#[test]
fn vanishing_tap_noticed_on_send() {
    let Some(ns) = NetNs::new() else { return };
    let mut tap = tap_with_address(&ns, "tpg1");
    ns.ip(&["link", "del", "tpg1"]);
    assert!(matches!(tap.send(&VnetHdr::default(), &[0u8; 60]), Err(BackendError::Io(_))));
    assert!(matches!(tap.send(&VnetHdr::default(), &[0u8; 60]), Err(BackendError::Dropped(_))));
    assert_eq!(drop_count(&tap, "tap_gone"), 2);
}

#[test]
fn tap_set_down_counts_drops_and_recovers() {
    let Some(ns) = NetNs::new() else { return };
    let mut tap = tap_with_address(&ns, "tpd0");
    ns.ip(&["link", "set", "tpd0", "down"]);
    let arp = arp_request(GUEST_MAC, GUEST_IP, HOST_IP);
    assert!(matches!(tap.send(&VnetHdr::default(), &arp), Err(BackendError::Dropped(_))));
    assert_eq!(drop_count(&tap, "tap_down"), 1);
    assert!(tap.link_up(), "down is not gone");
    ns.ip(&["link", "set", "tpd0", "up"]);
    ns.ip(&["addr", "replace", &format!("{HOST_IP}/24"), "dev", "tpd0"]);
    arp_for_host(&mut tap);
}

#[test]
fn launcher_fd_is_adopted() {
    let Some(ns) = NetNs::new() else { return };
    let raw = ns.enter(|| {
        let fd = sys::open_tun_device().unwrap();
        let flags = sys::IFF_TAP | sys::IFF_NO_PI | sys::IFF_VNET_HDR;
        sys::set_iff(fd.as_fd(), "tpf0", flags).unwrap();
        fd.into_raw_fd()
    });
    let wrong = TapConfig { fd: Some(raw), ..named("other0") };
    let msg = Tap::open(&wrong, None).err().expect("name mismatch").to_string();
    assert!(msg.contains("\"ifname\": \"other0\"") && msg.contains("tpf0"), "{msg}");

    let cfg = TapConfig { fd: Some(raw), ..Default::default() };
    let mut tap = ns.enter(|| Tap::open(&cfg, Some(GUEST_MAC))).unwrap();
    assert_eq!(tap.ifname(), "tpf0");
    assert!(!tap.created());
    assert!(tap.supported_offloads().csum);
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "tpf0"]);
    arp_for_host(&mut tap);
}

#[test]
fn launcher_tun_fd_is_refused() {
    let Some(ns) = NetNs::new() else { return };
    let fd = ns.enter(|| {
        let fd = sys::open_tun_device().unwrap();
        sys::set_iff(fd.as_fd(), "tpl3", libc::IFF_TUN as c_short | sys::IFF_NO_PI).unwrap();
        fd
    });
    let cfg = TapConfig { fd: Some(fd.as_raw_fd()), ..Default::default() };
    let msg = Tap::open(&cfg, None).err().expect("tun").to_string();
    assert!(msg.contains("tun (layer 3)"), "{msg}");
}

#[test]
fn short_receive_buffer_still_gets_small_frames() {
    let Some(ns) = NetNs::new() else { return };
    let mut tap = tap_with_address(&ns, "tps9");
    tap.send(&VnetHdr::default(), &arp_request(GUEST_MAC, GUEST_IP, HOST_IP)).unwrap();
    let mut small = vec![0u8; 1600];
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Ok(Some((_, len))) = tap.recv(&mut small) {
            if parse_arp_reply(&small[..len]).is_some() {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no ARP reply");
        crate::testutil::wait_readable(&tap, Duration::from_millis(50));
    }
}

// ---- without CAP_NET_ADMIN ------------------------------------------------------------

const CHILD_ENV: &str = "TAPIR_TEST_NOCAP_NETNS";
/// From <linux/capability.h>.
const CAP_NET_ADMIN: libc::c_ulong = 12;

/// Runs in a child process that lacks CAP_NET_ADMIN (see the test below); does nothing
/// when run directly.
#[test]
#[ignore = "helper run by non_root_errors_explain_how_to_precreate_the_tap"]
fn child_without_cap_net_admin() {
    let Ok(netns) = std::env::var(CHILD_ENV) else { return };
    let file = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
    // SAFETY: setns on a valid namespace fd; affects this thread only.
    assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);

    let err = Tap::open(&TapConfig { bridge: Some("brn0".into()), ..named("tpn0") }, None)
        .err()
        .expect("creating needs CAP_NET_ADMIN");
    println!("CREATE-ERROR: {err}");

    // A tap pre-created for this user opens without the capability.
    let mut tap = Tap::open(&named("tpu0"), Some(GUEST_MAC)).expect("user-owned tap");
    assert!(!tap.created());
    assert!(tap.supported_offloads().csum);
    tap.set_rx_offloads(tap.supported_offloads()).unwrap();
    println!("OPENED-OWNED-TAP");
}

#[test]
fn non_root_errors_explain_how_to_precreate_the_tap() {
    use std::os::unix::process::CommandExt;
    let Some(ns) = NetNs::new() else { return };
    ns.ip(&["tuntap", "add", "dev", "tpu0", "mode", "tap", "user", "0", "vnet_hdr", "multi_queue"]);
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "tap::tests::child_without_cap_net_admin",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, ns.name());
    // SAFETY: the closure only makes an async-signal-safe prctl call.
    unsafe {
        cmd.pre_exec(|| {
            // Dropping it from the bounding set removes it from root's capabilities after exec.
            if libc::prctl(libc::PR_CAPBSET_DROP, CAP_NET_ADMIN, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "ip tuntap add dev tpn0 mode tap user $USER vnet_hdr multi_queue && ip link set tpn0 up && ip link set tpn0 master brn0"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("CAP_NET_ADMIN"), "{stdout}");
    assert!(stdout.contains("OPENED-OWNED-TAP"), "{stdout}");
    assert!(!link_exists(&ns, "tpn0"));
}
