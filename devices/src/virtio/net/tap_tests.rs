//! virtio-net over a real tap: the simulated driver negotiates features and moves frames
//! through the device thread and a tap in a network namespace the test creates, to and
//! from that namespace's kernel. Offload headers and mergeable RX buffers are checked
//! against what the kernel really does with them. Without root these tests print a note
//! and pass vacuously.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tapir_net::backend::VnetHdr;
use tapir_net::mac::MacAddr;
use tapir_net::tap::{host_side_mac, Tap};

use super::features::*;
use super::{NetCounters, VirtioNet, VirtioNetConfig, CTRL_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::test_frames::*;
use crate::test_netns::{accept_within, NetNs};
use crate::virtio::test_driver::{reg, TestDriver};
use crate::virtio::{status, transport_features, VirtioPciDevice};

const HDR: usize = VnetHdr::LEN;
const WAIT: Duration = Duration::from_secs(10);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const HOST_CIDR: &str = "10.77.0.1/24";
const TAP: &str = "tapir-vt0";
/// The guest's MSS, announced in its SYN.
const GUEST_MSS: u16 = 1460;
const CONFIG_VECTOR: u16 = 0;

fn guest_mac(tail: u8) -> MacAddr {
    MacAddr([0x02, 0x54, 0x00, 0x77, 0x00, tail])
}

/// One frame as the driver reassembles it from the used ring.
struct Received {
    hdr: VnetHdr,
    frame: Vec<u8>,
    /// Used entries (RX buffers) the frame took.
    buffers: usize,
}

/// A virtio-net device on a real tap, driven by the simulated driver.
struct TapNic {
    d: TestDriver,
    counters: Arc<NetCounters>,
    mac: [u8; 6],
    rx_buffer_len: u32,
    /// RX chain head -> the buffer it points at.
    rx_buffers: HashMap<u16, u64>,
    used_backlog: VecDeque<(u32, u32)>,
    next_ip_id: u16,
    /// What recv_until skipped, for failure messages.
    skipped: Vec<String>,
}

impl TapNic {
    fn new(tap: Tap, mac: MacAddr) -> TapNic {
        let cfg = VirtioNetConfig {
            mac,
            mtu: Some(1500),
            queue_size: 256,
        };
        let net = VirtioNet::new(cfg, Box::new(tap)).expect("virtio-net on a tap");
        let counters = net.counters();
        let vectors = VirtioPciDevice::msix_vectors_wanted(&net);
        TapNic {
            d: TestDriver::new(Box::new(net), vectors),
            counters,
            mac: mac.octets(),
            rx_buffer_len: 0,
            rx_buffers: HashMap::new(),
            used_backlog: VecDeque::new(),
            next_ip_id: 1,
            skipped: Vec::new(),
        }
    }

    /// What Linux's virtio_net probe and open do: negotiate `accept(offered)`, read the
    /// MAC and link from config space, set up MSI-X and all three queues, DRIVER_OK, and
    /// post `rx_count` receive buffers of `rx_buffer_len` bytes.
    fn bring_up(
        &mut self,
        accept: impl FnOnce(u64) -> u64,
        rx_count: usize,
        rx_buffer_len: u32,
    ) -> u64 {
        let (features, ok) = self.d.negotiate(accept);
        assert!(ok, "device refused features {features:#x}");
        let config = self.d.device_config(0, 8);
        assert_eq!(config[..6], self.mac, "MAC in config space");
        assert_eq!(
            u16::from_le_bytes([config[6], config[7]]),
            1,
            "tap link is up"
        );
        self.d.enable_msix();
        self.d
            .common_write(reg::CONFIG_MSIX_VECTOR, 2, u64::from(CONFIG_VECTOR));
        for q in [RX_QUEUE, TX_QUEUE, CTRL_QUEUE] {
            self.d.common_write(reg::QUEUE_SELECT, 2, u64::from(q));
            let max = self.d.common_read(reg::QUEUE_SIZE, 2) as u16;
            self.d.setup_queue(q, max, q + 1);
        }
        self.d.driver_ok();
        assert_eq!(
            self.d.status() & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET),
            status::DRIVER_OK
        );
        self.rx_buffer_len = rx_buffer_len;
        for _ in 0..rx_count {
            let addr = self.d.alloc(rx_buffer_len as usize);
            self.post_rx_buffer(addr);
        }
        self.d.kick(RX_QUEUE);
        features
    }

    fn post_rx_buffer(&mut self, addr: u64) {
        let head = self
            .d
            .add_chain(RX_QUEUE, &[(addr, self.rx_buffer_len, true)]);
        self.rx_buffers.insert(head, addr);
    }

    /// Queues `frame` with `hdr` on TX, kicks, and waits for the device to return it.
    fn send(&mut self, hdr: VnetHdr, frame: &[u8]) {
        let addr = self.d.alloc(HDR + frame.len());
        self.d.write_mem(addr, &hdr.to_bytes());
        self.d.write_mem(addr + HDR as u64, frame);
        let head = self
            .d
            .add_chain(TX_QUEUE, &[(addr, (HDR + frame.len()) as u32, false)]);
        self.d.kick(TX_QUEUE);
        let used = self.d.wait_used(TX_QUEUE, 1);
        assert_eq!(used, vec![(u32::from(head), 0)], "TX chain returned");
    }

    /// An IPv4 frame from the guest to the host side of the tap.
    fn ip_frame(&mut self, host_mac: [u8; 6], proto: u8, l4: &[u8]) -> Vec<u8> {
        let id = self.next_ip_id;
        self.next_ip_id = self.next_ip_id.wrapping_add(1);
        eth(
            host_mac,
            self.mac,
            ETHERTYPE_IPV4,
            &ipv4(GUEST_IP, HOST_IP, proto, id, l4),
        )
    }

    fn tcp_frame(
        &mut self,
        host_mac: [u8; 6],
        seg: &TcpSegment<'_>,
        checksum: TcpChecksum,
    ) -> Vec<u8> {
        let id = self.next_ip_id;
        self.next_ip_id = self.next_ip_id.wrapping_add(1);
        eth(host_mac, self.mac, ETHERTYPE_IPV4, &seg.ipv4(id, checksum))
    }

    fn next_used(&mut self, deadline: Instant) -> Option<(u32, u32)> {
        loop {
            if let Some(entry) = self.used_backlog.pop_front() {
                return Some(entry);
            }
            let fresh = self.d.take_used(RX_QUEUE);
            if fresh.is_empty() {
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            self.used_backlog.extend(fresh);
        }
    }

    /// Reads one used RX buffer and gives it straight back to the device.
    fn consume_buffer(&mut self, (id, len): (u32, u32)) -> Vec<u8> {
        let head = u16::try_from(id).expect("used id fits a ring index");
        let addr = self
            .rx_buffers
            .remove(&head)
            .unwrap_or_else(|| panic!("used id {id} was never posted"));
        assert!(
            len <= self.rx_buffer_len,
            "used length {len} exceeds the {}-byte buffer",
            self.rx_buffer_len
        );
        let data = self.d.read_mem(addr, len as usize);
        self.post_rx_buffer(addr);
        self.d.kick(RX_QUEUE);
        data
    }

    /// The next frame the device delivered, put back together from `num_buffers` used
    /// buffers the way virtio_net's receive_mergeable does.
    fn next_frame(&mut self, deadline: Instant) -> Option<Received> {
        let first = self.next_used(deadline)?;
        let mut stream = self.consume_buffer(first);
        let hdr = VnetHdr::from_bytes(&stream).expect("first RX buffer holds a whole header");
        assert!(hdr.num_buffers >= 1, "num_buffers is 0 in {hdr:?}");
        for taken in 1..usize::from(hdr.num_buffers) {
            let Some(next) = self.next_used(deadline) else {
                panic!(
                    "frame announced {} buffers, only {taken} arrived",
                    hdr.num_buffers
                )
            };
            stream.extend(self.consume_buffer(next));
        }
        Some(Received {
            hdr,
            frame: stream.split_off(HDR),
            buffers: usize::from(hdr.num_buffers),
        })
    }

    /// Frames until `pick` accepts one; the others (IPv6 router solicitations and the
    /// like) are remembered for the failure message.
    fn recv_until(&mut self, what: &str, mut pick: impl FnMut(&Received) -> bool) -> Received {
        let deadline = Instant::now() + WAIT;
        loop {
            let Some(r) = self.next_frame(deadline) else {
                panic!("no {what} within {WAIT:?}; skipped: {:?}", self.skipped)
            };
            if pick(&r) {
                return r;
            }
            self.skipped.push(format!(
                "{} bytes, ethertype {:02x?}, {:?}",
                r.frame.len(),
                r.frame.get(12..14),
                r.hdr
            ));
        }
    }

    /// ARP for the host side of the tap; returns its MAC.
    fn arp_for_host(&mut self) -> [u8; 6] {
        self.send(
            VnetHdr::default(),
            &arp_request(self.mac, GUEST_IP, HOST_IP),
        );
        let r = self.recv_until("ARP reply", |r| {
            parse_arp_reply(&r.frame).is_some_and(|a| a.sender_ip == HOST_IP)
        });
        let reply = parse_arp_reply(&r.frame).expect("ARP reply");
        assert_eq!(
            (reply.eth_dst, reply.target_mac, reply.target_ip),
            (self.mac, self.mac, GUEST_IP)
        );
        assert_eq!(
            MacAddr(reply.sender_mac),
            host_side_mac(MacAddr(self.mac)),
            "tap's host-side MAC"
        );
        reply.sender_mac
    }

    fn assert_no_drops(&self) {
        let stats = self.counters.snapshot();
        assert!(
            stats.drops.iter().all(|(_, n)| *n == 0),
            "device drops: {stats}"
        );
    }
}

/// The TCP segment a received frame carries, if it comes from `HOST_IP:port`.
fn tcp_from_host(r: &Received, port: u16) -> Option<TcpView<'_>> {
    let ip = parse_ipv4(&r.frame)?;
    if ip.src != HOST_IP || ip.dst != GUEST_IP {
        return None;
    }
    parse_tcp(&ip).filter(|t| t.sport == port)
}

/// The guest's end of one TCP connection, driven by hand.
struct GuestTcp {
    host_mac: [u8; 6],
    sport: u16,
    dport: u16,
    snd_nxt: u32,
    rcv_nxt: u32,
    /// The window the host advertised.
    peer_window: u16,
}

impl GuestTcp {
    /// SYN (MSS option only: no window scaling, SACK or timestamps), SYN-ACK, ACK.
    fn connect(nic: &mut TapNic, host_mac: [u8; 6], sport: u16, dport: u16) -> GuestTcp {
        let iss = 0x1000_0000;
        let mss = GUEST_MSS.to_be_bytes();
        let options = [2, 4, mss[0], mss[1]];
        let syn = TcpSegment {
            src: GUEST_IP,
            dst: HOST_IP,
            sport,
            dport,
            seq: iss,
            ack: 0,
            flags: TCP_SYN,
            window: 65535,
            options: &options,
            payload: &[],
        };
        let frame = nic.tcp_frame(host_mac, &syn, TcpChecksum::Full);
        nic.send(VnetHdr::default(), &frame);
        let r = nic.recv_until("SYN-ACK", |r| {
            tcp_from_host(r, dport).is_some_and(|t| {
                t.dport == sport && t.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
            })
        });
        let synack = tcp_from_host(&r, dport).expect("SYN-ACK");
        assert_eq!(synack.ack, iss.wrapping_add(1));
        let mut conn = GuestTcp {
            host_mac,
            sport,
            dport,
            snd_nxt: iss.wrapping_add(1),
            rcv_nxt: synack.seq.wrapping_add(1),
            peer_window: synack.window,
        };
        conn.send(nic, TCP_ACK, &[], VnetHdr::default(), TcpChecksum::Full);
        conn
    }

    /// Sends one segment at snd_nxt (which it does not advance: the caller decides
    /// whether the kernel took the data).
    fn send(
        &mut self,
        nic: &mut TapNic,
        flags: u8,
        payload: &[u8],
        hdr: VnetHdr,
        checksum: TcpChecksum,
    ) {
        let seg = TcpSegment {
            src: GUEST_IP,
            dst: HOST_IP,
            sport: self.sport,
            dport: self.dport,
            seq: self.snd_nxt,
            ack: self.rcv_nxt,
            flags,
            window: 65535,
            options: &[],
            payload,
        };
        let frame = nic.tcp_frame(self.host_mac, &seg, checksum);
        nic.send(hdr, &frame);
    }

    /// Waits for the host to acknowledge everything up to `ack`.
    fn wait_acked(&self, nic: &mut TapNic, ack: u32) {
        let (sport, dport) = (self.sport, self.dport);
        nic.recv_until(&format!("ACK {ack}"), |r| {
            tcp_from_host(r, dport)
                .is_some_and(|t| t.dport == sport && t.flags & TCP_ACK != 0 && t.ack == ack)
        });
    }
}

/// A checksum-offload header for a TCP/IPv4 frame without IP options.
fn tcp_csum_hdr() -> VnetHdr {
    VnetHdr {
        flags: VnetHdr::FLAG_NEEDS_CSUM,
        csum_start: L4_OFFSET as u16,
        csum_offset: 16,
        ..Default::default()
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(7).wrapping_add(seed) % 251) as u8)
        .collect()
}

/// Offload features a Linux guest takes when the device offers them.
const OFFLOADS_WANTED: u64 = CSUM | GUEST_CSUM | HOST_TSO4 | GUEST_TSO4 | MRG_RXBUF | CTRL_VQ;

fn assert_offers_offloads(nic: &mut TapNic) {
    let offered = nic.d.device_features();
    let wanted = OFFLOADS_WANTED | transport_features::VERSION_1 | MAC | STATUS | MTU;
    assert_eq!(
        offered & wanted,
        wanted,
        "offered {offered:#x}: a vnet_hdr tap has csum and TSO"
    );
}

#[test]
fn arp_and_ping_through_a_real_tap_with_mergeable_buffers() {
    let Some(ns) = NetNs::new() else { return };
    let mac = guest_mac(1);
    let tap = ns.tap_with_address(TAP, HOST_CIDR, &GUEST_IP.to_string(), mac);
    let mut nic = TapNic::new(tap, mac);
    assert_offers_offloads(&mut nic);
    // Small mergeable buffers, so a full-sized frame has to span several.
    let features = nic.bring_up(|offered| offered, 64, 256);
    assert_ne!(features & MRG_RXBUF, 0);
    let tap_rx_before = ns.if_counter(TAP, "rx_packets");

    let host_mac = nic.arp_for_host();

    let data = pattern(1400, 3);
    let echo = icmp_echo_request(0x7a9, 1, &data);
    let frame = nic.ip_frame(host_mac, PROTO_ICMP, &echo);
    nic.send(VnetHdr::default(), &frame);
    let r = nic.recv_until("echo reply", |r| {
        parse_ipv4(&r.frame)
            .is_some_and(|ip| ip.src == HOST_IP && parse_echo_reply(&ip, 0x7a9, 1).is_some())
    });
    let ip = parse_ipv4(&r.frame).expect("IPv4");
    assert_eq!(
        parse_echo_reply(&ip, 0x7a9, 1).as_deref(),
        Some(&data[..]),
        "echo data comes back intact"
    );
    assert_eq!(ip.dst, GUEST_IP);
    assert_eq!(r.frame[..6], mac.octets());
    assert_eq!(
        r.frame.len(),
        14 + 20 + 8 + data.len(),
        "nothing more, nothing less"
    );
    // 12 + 1442 bytes in 256-byte buffers.
    assert_eq!(r.buffers, (HDR + r.frame.len()).div_ceil(256));
    // The kernel finished the ICMP checksum itself; the header may only say it is valid.
    assert_eq!(r.hdr.gso_type, VnetHdr::GSO_NONE);
    assert_eq!(r.hdr.flags & VnetHdr::FLAG_NEEDS_CSUM, 0);

    assert!(
        ns.if_counter(TAP, "rx_packets") >= tap_rx_before + 2,
        "the tap saw the guest's ARP and ping"
    );
    assert!(
        nic.d.msix.fired(usize::from(RX_QUEUE) + 1) >= 1,
        "RX interrupt"
    );
    assert!(
        nic.d.msix.fired(usize::from(TX_QUEUE) + 1) >= 1,
        "TX interrupt"
    );
    let stats = nic.counters.snapshot();
    assert_eq!(
        (stats.tx_frames, stats.tx_bytes),
        (2, (42 + frame.len()) as u64)
    );
    assert!(stats.rx_frames >= 2, "{stats}");
    nic.assert_no_drops();

    // Dropping the NIC stops its device thread (it would otherwise sit on the tap's fd).
    let thread = "vnet-770001";
    assert!(thread_exists(thread), "device thread {thread} runs");
    drop(nic);
    wait_until("device thread gone", || !thread_exists(thread));
}

/// Whether this process has a thread named `name`.
fn thread_exists(name: &str) -> bool {
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .any(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tso_and_partial_checksums_from_the_guest_reach_a_kernel_listener() {
    let Some(ns) = NetNs::new() else { return };
    let mac = guest_mac(2);
    let tap = ns.tap_with_address(TAP, HOST_CIDR, &GUEST_IP.to_string(), mac);
    let listener = ns.listen((HOST_IP, 7000));
    let mut nic = TapNic::new(tap, mac);
    assert_offers_offloads(&mut nic);
    let features = nic.bring_up(|offered| offered, 64, 1526);
    assert_eq!(features & OFFLOADS_WANTED, OFFLOADS_WANTED);
    let host_mac = nic.arp_for_host();
    let mut tcp = GuestTcp::connect(&mut nic, host_mac, 40000, 7000);
    let mut conn =
        accept_within(&listener, WAIT).expect("the kernel completes the hand-made handshake");
    conn.set_read_timeout(Some(WAIT)).unwrap();

    // One TSO super-frame: 16000 bytes for 1000-byte segments, with only the
    // pseudo-header sum in the checksum field.
    let data = pattern(16_000, 1);
    assert!(
        usize::from(tcp.peer_window) >= data.len(),
        "window {}",
        tcp.peer_window
    );
    let gso = VnetHdr {
        gso_type: VnetHdr::GSO_TCPV4,
        gso_size: 1000,
        hdr_len: 54,
        ..tcp_csum_hdr()
    };
    let tap_rx_before = ns.if_counter(TAP, "rx_packets");
    tcp.send(
        &mut nic,
        TCP_ACK | TCP_PSH,
        &data,
        gso,
        TcpChecksum::Partial,
    );
    tcp.snd_nxt = tcp.snd_nxt.wrapping_add(data.len() as u32);
    tcp.wait_acked(&mut nic, tcp.snd_nxt);
    let mut got = vec![0u8; data.len()];
    conn.read_exact(&mut got)
        .expect("the listener gets the TSO data");
    assert!(got == data, "TSO data arrives intact");
    assert_eq!(
        ns.if_counter(TAP, "rx_packets") - tap_rx_before,
        1,
        "one frame carried all 16000 bytes"
    );
    // The kernel took it as a GSO packet: its receive-MSS estimate comes from gso_size
    // (a plain 16000-byte segment would have made it the advertised MSS, 1460).
    let ss = ns.run(&["ss", "-tinH", "state", "established", "sport", "=", ":7000"]);
    assert!(ss.contains("rcvmss:1000"), "ss: {ss}");

    // A partial checksum without NEEDS_CSUM is a bad checksum: the kernel drops it.
    let csum_errors = ns.snmp("Tcp", "InCsumErrors");
    let small = pattern(100, 2);
    tcp.send(
        &mut nic,
        TCP_ACK | TCP_PSH,
        &small,
        VnetHdr::default(),
        TcpChecksum::Partial,
    );
    wait_until("TCP checksum error in the namespace", || {
        ns.snmp("Tcp", "InCsumErrors") > csum_errors
    });
    conn.set_nonblocking(true).unwrap();
    let mut probe = [0u8; 1];
    let err = conn.read(&mut probe).expect_err("nothing delivered");
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    conn.set_nonblocking(false).unwrap();

    // The same segment with checksum offload requested is accepted.
    tcp.send(
        &mut nic,
        TCP_ACK | TCP_PSH,
        &small,
        tcp_csum_hdr(),
        TcpChecksum::Partial,
    );
    tcp.snd_nxt = tcp.snd_nxt.wrapping_add(small.len() as u32);
    tcp.wait_acked(&mut nic, tcp.snd_nxt);
    let mut got = vec![0u8; small.len()];
    conn.read_exact(&mut got).unwrap();
    assert_eq!(got, small);
    assert_eq!(ns.snmp("Tcp", "InCsumErrors"), csum_errors + 1);

    // ARP, SYN, ACK, the super-frame, the bad segment and the good one.
    let stats = nic.counters.snapshot();
    assert_eq!(stats.tx_frames, 6, "{stats}");
    nic.assert_no_drops();
}

/// One in-order data segment the guest received.
struct DataFrame {
    hdr: VnetHdr,
    frame_len: usize,
    buffers: usize,
    payload_len: usize,
    /// The checksum field verifies as a complete checksum.
    checksum_ok: bool,
    /// The checksum field holds the pseudo-header sum over the whole segment, as a
    /// CHECKSUM_PARTIAL packet must.
    partial_seed_ok: bool,
}

/// The host writes `data` to the guest over `conn`; the guest receives and ACKs every
/// segment by hand and checks the stream. Returns the data-carrying frames.
fn download(nic: &mut TapNic, tcp: &mut GuestTcp, conn: &TcpStream, data: &[u8]) -> Vec<DataFrame> {
    let mut writer = conn.try_clone().unwrap();
    // If the guest side stops ACKing, the writer gives up instead of blocking the test.
    writer.set_write_timeout(Some(WAIT)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (sport, dport) = (tcp.sport, tcp.dport);
    std::thread::scope(|scope| {
        let written = scope.spawn(move || writer.write_all(data));
        let mut stream = Vec::with_capacity(data.len());
        let mut frames = Vec::new();
        while stream.len() < data.len() {
            assert!(
                Instant::now() < deadline,
                "{} of {} bytes after 30 s",
                stream.len(),
                data.len()
            );
            let r = nic.recv_until("data from the host", |r| {
                tcp_from_host(r, dport).is_some_and(|t| t.dport == sport)
            });
            let ip = parse_ipv4(&r.frame).expect("IPv4");
            assert_eq!(
                r.frame.len(),
                14 + ip.total_len,
                "frame is exactly the IP packet"
            );
            let seg = parse_tcp(&ip).expect("TCP");
            if !seg.payload.is_empty() && seg.seq == tcp.rcv_nxt {
                stream.extend_from_slice(seg.payload);
                tcp.rcv_nxt = tcp.rcv_nxt.wrapping_add(seg.payload.len() as u32);
                let field = u16::from_be_bytes([ip.payload[16], ip.payload[17]]);
                let seed = fold(pseudo_header_sum(
                    HOST_IP,
                    GUEST_IP,
                    PROTO_TCP,
                    ip.payload.len(),
                ));
                frames.push(DataFrame {
                    hdr: r.hdr,
                    frame_len: r.frame.len(),
                    buffers: r.buffers,
                    payload_len: seg.payload.len(),
                    checksum_ok: seg.checksum_ok,
                    partial_seed_ok: field == seed,
                });
            }
            tcp.send(nic, TCP_ACK, &[], VnetHdr::default(), TcpChecksum::Full);
        }
        assert!(
            stream == data,
            "the guest receives the host's bytes in order and intact"
        );
        written
            .join()
            .expect("writer thread")
            .expect("host write completes");
        frames
    })
}

fn connected(
    tail: u8,
    accept: impl FnOnce(u64) -> u64,
    port: u16,
) -> Option<(NetNs, TapNic, GuestTcp, TcpStream)> {
    let ns = NetNs::new()?;
    let mac = guest_mac(tail);
    let tap = ns.tap_with_address(TAP, HOST_CIDR, &GUEST_IP.to_string(), mac);
    let listener = ns.listen((HOST_IP, port));
    let mut nic = TapNic::new(tap, mac);
    assert_offers_offloads(&mut nic);
    // Linux-sized mergeable buffers; 160 of them hold two 64 KiB super-frames.
    nic.bring_up(accept, 160, 1526);
    let host_mac = nic.arp_for_host();
    let tcp = GuestTcp::connect(&mut nic, host_mac, 40001, port);
    let conn =
        accept_within(&listener, WAIT).expect("the kernel completes the hand-made handshake");
    // Whatever order the caller drops these in, the namespace goes away: `ip netns del`
    // removes its name, and the tap's and sockets' references end with them.
    Some((ns, nic, tcp, conn))
}

#[test]
fn kernel_gso_frames_arrive_in_mergeable_buffers_when_guest_tso_is_negotiated() {
    let Some((_ns, mut nic, mut tcp, conn)) = connected(3, |offered| offered, 7001) else {
        return;
    };
    let data = pattern(120_000, 3);
    let frames = download(&mut nic, &mut tcp, &conn, &data);

    let gso: Vec<&DataFrame> = frames
        .iter()
        .filter(|f| f.hdr.gso_type != VnetHdr::GSO_NONE)
        .collect();
    assert!(
        !gso.is_empty(),
        "no GSO frame among {} data frames",
        frames.len()
    );
    for f in &gso {
        let h = f.hdr;
        assert_eq!(h.gso_type & !VnetHdr::GSO_ECN, VnetHdr::GSO_TCPV4, "{h:?}");
        assert_eq!(
            h.flags & VnetHdr::FLAG_NEEDS_CSUM,
            VnetHdr::FLAG_NEEDS_CSUM,
            "GSO implies a partial checksum: {h:?}"
        );
        assert_eq!(
            (usize::from(h.csum_start), h.csum_offset),
            (L4_OFFSET, 16),
            "{h:?}"
        );
        assert!(h.gso_size > 0 && h.gso_size <= GUEST_MSS, "{h:?}");
        assert!(
            f.payload_len > usize::from(h.gso_size),
            "a super-frame holds more than one segment: {h:?}"
        );
        assert!(f.frame_len > 1514, "{}-byte GSO frame", f.frame_len);
        assert!(f.partial_seed_ok, "partial checksum field in {h:?}");
        // It took as many 1526-byte buffers as its bytes need, and said so in num_buffers.
        assert!(
            f.buffers > 1 && f.buffers >= (HDR + f.frame_len).div_ceil(1526),
            "{} buffers for {} bytes",
            f.buffers,
            f.frame_len
        );
        assert_eq!(usize::from(h.num_buffers), f.buffers);
    }
    for f in frames
        .iter()
        .filter(|f| f.hdr.gso_type == VnetHdr::GSO_NONE)
    {
        assert!(
            f.frame_len <= 1514,
            "{}-byte frame without GSO",
            f.frame_len
        );
        assert!(
            f.checksum_ok || (f.hdr.flags & VnetHdr::FLAG_NEEDS_CSUM != 0 && f.partial_seed_ok),
            "{:?}",
            f.hdr
        );
    }
    nic.assert_no_drops();
    let stats = nic.counters.snapshot();
    assert!(stats.rx_bytes > data.len() as u64, "{stats}");
}

#[test]
fn without_guest_offloads_the_kernel_sends_plain_mtu_sized_frames() {
    let no_guest_offloads = |offered: u64| offered & !(GUEST_OFFLOAD_BITS | CTRL_GUEST_OFFLOADS);
    let Some((_ns, mut nic, mut tcp, conn)) = connected(4, no_guest_offloads, 7002) else {
        return;
    };
    let data = pattern(40_000, 4);
    let frames = download(&mut nic, &mut tcp, &conn, &data);
    assert!(frames.len() >= data.len().div_ceil(usize::from(GUEST_MSS)));
    for f in &frames {
        // No offload flags at all (not even DATA_VALID, which needs GUEST_CSUM), a real
        // checksum, and one buffer each.
        assert_eq!(
            f.hdr,
            VnetHdr {
                num_buffers: 1,
                ..Default::default()
            }
        );
        assert!(
            f.frame_len <= 1514 && f.payload_len <= usize::from(GUEST_MSS),
            "{} bytes",
            f.frame_len
        );
        assert!(f.checksum_ok, "the kernel finished the checksum");
        assert_eq!(f.buffers, 1);
    }
    nic.assert_no_drops();
}
