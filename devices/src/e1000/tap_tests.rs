//! e1000 over a real tap: the simulated Linux e1000 driver probes and opens the NIC, then
//! frames go both ways between the device and the kernel of a network namespace the
//! test creates. Without root the test prints a note and passes vacuously.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tapir_net::backend::{loopback, Offloads};
use tapir_net::mac::MacAddr;
use tapir_net::tap::host_side_mac;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::registers::*;
use super::rx::{crc32, STA_EOP, STA_TCPCS};
use super::test_driver::{wait_for, Received, TestDriver, TxOffload, MEM_SIZE};
use super::E1000;
use crate::interrupt::TestIrqLine;
use crate::pci::PciDevice;
use crate::test_frames::*;
use crate::test_netns::{accept_within, NetNs};

const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
const TAP: &str = "tapir-et0";
const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x77, 0x01, 0x02]);

/// The frame without its FCS, after checking the FCS and the descriptor status.
fn frame_of(rx: &Received) -> &[u8] {
    let len = rx.data.len();
    assert!(
        len >= 64,
        "{len}-byte frame: short frames are padded to 60 plus the FCS"
    );
    assert_eq!(
        rx.data[len - 4..],
        crc32(&rx.data[..len - 4]).to_le_bytes(),
        "FCS"
    );
    assert_ne!(rx.status & STA_EOP, 0);
    assert_eq!(rx.errors, 0, "descriptor errors");
    &rx.data[..len - 4]
}

/// Receives like e1000_clean_rx_irq until `pick` accepts a frame (without FCS).
fn receive_until(d: &mut TestDriver, what: &str, mut pick: impl FnMut(&[u8]) -> bool) -> Received {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut skipped = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "no {what}; skipped {skipped:?}");
        let rx = d.receive();
        if pick(frame_of(&rx)) {
            return rx;
        }
        skipped.push(rx.data.len());
    }
}

#[test]
fn e1000_exchanges_arp_ping_and_tcp_with_the_kernel_through_a_real_tap() {
    let Some(ns) = NetNs::new() else { return };
    let tap = ns.tap_with_address(TAP, "10.77.1.1/24", &GUEST_IP.to_string(), GUEST_MAC);
    let listener = ns.listen((HOST_IP, 7100));
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let irq = Arc::new(TestIrqLine::default());
    let dev =
        E1000::new(GUEST_MAC, Box::new(tap), mem.clone(), irq.clone()).expect("e1000 on a tap");
    // The driver only uses this handle with loopback devices.
    let (_, unused) = loopback::pair(Offloads::NONE).unwrap();
    let mut d = TestDriver::with_device(dev, mem, irq, unused);
    d.probe();
    assert_eq!(d.mac, GUEST_MAC.octets(), "MAC from the EEPROM");
    d.open();
    // Statistics clear on read; start from zero.
    d.er32(GPTC);
    d.er32(GPRC);
    let tap_rx_before = ns.if_counter(TAP, "rx_packets");

    // ARP: guest -> kernel -> guest.
    let eop = d.xmit(&arp_request(d.mac, GUEST_IP, HOST_IP), TxOffload::None);
    d.wait_tx_done(eop);
    let rx = receive_until(&mut d, "ARP reply", |f| {
        parse_arp_reply(f).is_some_and(|a| a.sender_ip == HOST_IP)
    });
    let reply = parse_arp_reply(frame_of(&rx)).unwrap();
    assert_eq!(
        rx.data.len(),
        64,
        "a 42-byte ARP reply is padded to 60 and gets its FCS"
    );
    assert_eq!(
        (reply.eth_dst, reply.target_mac, reply.target_ip),
        (d.mac, d.mac, GUEST_IP)
    );
    assert_eq!(MacAddr(reply.sender_mac), host_side_mac(GUEST_MAC));
    let host_mac = reply.sender_mac;
    wait_for("RX interrupt", || d.irq.asserted());
    let icr = d.intr();
    assert_ne!(icr & ICR_RXT0, 0, "ICR {icr:#x}");
    d.irq_enable();

    // ICMP echo.
    let data: Vec<u8> = (0..56u8).collect();
    let echo = icmp_echo_request(0x0e10, 1, &data);
    let frame = eth(
        host_mac,
        d.mac,
        ETHERTYPE_IPV4,
        &ipv4(GUEST_IP, HOST_IP, PROTO_ICMP, 1, &echo),
    );
    let eop = d.xmit(&frame, TxOffload::None);
    d.wait_tx_done(eop);
    let rx = receive_until(&mut d, "echo reply", |f| {
        parse_ipv4(f)
            .is_some_and(|ip| ip.src == HOST_IP && parse_echo_reply(&ip, 0x0e10, 1).is_some())
    });
    let ip = parse_ipv4(frame_of(&rx)).unwrap();
    assert_eq!(ip.dst, GUEST_IP);
    assert_eq!(parse_echo_reply(&ip, 0x0e10, 1), Some(data));

    // TCP SYN to a listener: the kernel hands its SYN-ACK over with a partial checksum
    // (the tap has checksum offload on), and the model must finish it.
    let options = [2, 4, 0x05, 0xb4];
    let syn = TcpSegment {
        src: GUEST_IP,
        dst: HOST_IP,
        sport: 41000,
        dport: 7100,
        seq: 77,
        ack: 0,
        flags: TCP_SYN,
        window: 65535,
        options: &options,
        payload: &[],
    };
    let frame = eth(
        host_mac,
        d.mac,
        ETHERTYPE_IPV4,
        &syn.ipv4(2, TcpChecksum::Full),
    );
    let eop = d.xmit(&frame, TxOffload::None);
    d.wait_tx_done(eop);
    let is_synack = |f: &[u8]| {
        parse_ipv4(f).and_then(|ip| parse_tcp(&ip).map(|t| (t.sport, t.dport, t.flags)))
            == Some((7100, 41000, TCP_SYN | TCP_ACK))
    };
    let rx = receive_until(&mut d, "SYN-ACK", is_synack);
    let ip = parse_ipv4(frame_of(&rx)).unwrap();
    let synack = parse_tcp(&ip).unwrap();
    assert!(
        synack.checksum_ok,
        "SYN-ACK arrives with a complete TCP checksum"
    );
    assert_eq!(synack.ack, 78);
    assert_ne!(
        rx.status & STA_TCPCS,
        0,
        "the descriptor reports the TCP checksum checked"
    );
    let ack = TcpSegment {
        seq: 78,
        ack: synack.seq.wrapping_add(1),
        flags: TCP_ACK,
        options: &[],
        ..syn
    };
    let frame = eth(
        host_mac,
        d.mac,
        ETHERTYPE_IPV4,
        &ack.ipv4(3, TcpChecksum::Full),
    );
    let eop = d.xmit(&frame, TxOffload::None);
    d.wait_tx_done(eop);
    assert!(
        accept_within(&listener, Duration::from_secs(10)).is_some(),
        "the kernel completed the handshake"
    );

    assert_eq!(d.er32(GPTC), 4, "ARP, ping, SYN, ACK");
    assert!(d.er32(GPRC) >= 3);
    assert_eq!(
        ns.if_counter(TAP, "rx_packets") - tap_rx_before,
        4,
        "the tap saw exactly the guest's frames"
    );
    d.dev.shutdown();
    let stats = d.dev.stats();
    assert!(stats.contains("backend tap: tx 4 frames"), "{stats}");
}
