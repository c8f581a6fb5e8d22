//! Device tests: the simulated Linux driver probes and opens the NIC, then frames go
//! both ways through a loopback backend. Hostile-guest cases follow.

use std::sync::{mpsc, Arc};
use std::time::Duration;

use tapir_net::backend::{Offloads, VnetHdr};
use vm_memory::{Bytes, GuestAddress};

use crate::pci::{
    PciDevice, PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY,
    PCI_STATUS, PCI_STATUS_INTERRUPT,
};

use super::checksum::{self, tests::tcp4_frame, ETHERTYPE_VLAN};
use super::registers::*;
use super::rx::{crc32, STA_EOP, STA_IPCS, STA_TCPCS, STA_VP};
use super::test_driver::*;
use super::tx::tests::linux_tso_request;
use super::{E1000, IO_BAR, MMIO_BAR};

fn drops(d: &TestDriver, reason: &str) -> u64 {
    d.dev.shared().lock().counters.drops_for(reason)
}

fn wait_drop(d: &TestDriver, reason: &str, at_least: u64) {
    wait_for(reason, || drops(d, reason) >= at_least);
}

/// A broadcast frame of `len` bytes with recognisable contents.
fn broadcast_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect();
    if len >= 14 {
        f[..6].copy_from_slice(&[0xff; 6]);
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    }
    f
}

/// A TCP frame addressed to the device's MAC.
fn frame_to(mac: [u8; 6], payload: usize) -> Vec<u8> {
    let mut f = tcp4_frame(payload);
    f[..6].copy_from_slice(&mac);
    f
}

fn tso_offload(mss: u16) -> TxOffload {
    TxOffload::Tso {
        ipcss: 14,
        ipcso: 24,
        ipcse: 33,
        tucss: 34,
        tucso: 50,
        hdr_len: 54,
        mss,
        ipv4: true,
    }
}

// ---- probe, open, data path ----

#[test]
fn linux_probe_reads_mac_from_eeprom_and_finds_phy_and_link() {
    let mut d = TestDriver::new(Offloads::NONE);
    d.probe();
    assert_eq!(d.mac, [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
    assert_eq!(d.er32(RA + 4) & RAH_AV, RAH_AV);
    assert_ne!(d.er32(CTRL) & CTRL_VME, 0);
    assert!(!d.irq.asserted(), "nothing enabled yet");
    d.open();
    assert_ne!(d.er32(TCTL) & TCTL_EN, 0);
    assert_ne!(d.er32(RCTL) & RCTL_EN, 0);
    assert_eq!(d.irq.rising_edges(), 1);
    assert!(!d.irq.asserted(), "ICR read deasserted the line");
}

#[test]
fn eerd_gives_the_same_mac_as_bit_banging() {
    let mut d = TestDriver::new(Offloads::NONE);
    d.probe();
    for word in 0..3u32 {
        d.ew32(EERD, EERD_START | (word << EERD_ADDR_SHIFT));
        let v = d.er32(EERD);
        assert_ne!(v & EERD_DONE, 0);
        assert_eq!((v >> EERD_DATA_SHIFT) as u16, d.read_eeprom(word as u16));
    }
}

#[test]
fn transmitted_frames_reach_the_backend_byte_exact_with_interrupts() {
    let mut d = TestDriver::opened(Offloads::NONE);
    let edges = d.irq.rising_edges();
    let frames: Vec<Vec<u8>> = vec![
        broadcast_frame(60, 1),
        broadcast_frame(1514, 2),
        broadcast_frame(9000, 3),
    ];
    let mut last = 0;
    for f in &frames {
        last = d.xmit(f, TxOffload::None);
    }
    d.wait_tx_done(last);
    d.wait_tx_idle();
    let sent = d.backend.take_sent();
    assert_eq!(sent.len(), 3);
    for ((hdr, got), want) in sent.iter().zip(&frames) {
        assert!(hdr.is_plain());
        assert_eq!(got, want);
    }
    wait_for("TX interrupt", || d.irq.asserted());
    assert!(d.irq.rising_edges() > edges);
    let icr = d.intr();
    assert_ne!(icr & ICR_TXDW, 0);
    assert!(!d.irq.asserted());
    d.irq_enable();
    assert_eq!(d.er32(GPTC), 3);
    assert_eq!(d.er32(GPTC), 0, "statistics clear on read");
    assert_eq!(d.er32(GOTCL), (60 + 1514 + 9000 + 12) as u32);
    assert_eq!(d.er32(BPTC), 3);
}

#[test]
fn short_frames_are_padded_and_split_buffers_are_joined() {
    let mut d = TestDriver::opened(Offloads::NONE);
    let short = broadcast_frame(42, 9);
    let eop = d.xmit(&short, TxOffload::None);
    d.wait_tx_done(eop);
    let frame = broadcast_frame(700, 4);
    let eop = d.queue_frame(&frame, TxOffload::None, 7, None);
    d.ew32(TDT, d.tx_next);
    d.wait_tx_done(eop);
    let sent = d.backend.take_sent();
    assert_eq!(sent[0].1.len(), 60);
    assert_eq!(&sent[0].1[..42], &short[..]);
    assert!(sent[0].1[42..].iter().all(|&b| b == 0));
    assert_eq!(sent[1].1, frame);
}

#[test]
fn checksum_offload_is_done_in_software_for_a_plain_backend() {
    let mut d = TestDriver::opened(Offloads::NONE);
    let reference = tcp4_frame(300);
    let mut partial = reference.clone();
    let loc = checksum::locate_l4(&partial, ETHERTYPE_VLAN).unwrap();
    let seed = checksum::fold(checksum::pseudo_header(&partial, &loc).unwrap());
    partial[50..52].copy_from_slice(&seed.to_be_bytes());
    let eop = d.xmit(
        &partial,
        TxOffload::Checksum {
            css: 34,
            cso: 50,
            tcp: true,
        },
    );
    d.wait_tx_done(eop);
    let sent = d.backend.take_sent();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].0.is_plain());
    assert_eq!(sent[0].1, reference);
}

#[test]
fn checksum_offload_is_passed_to_a_capable_backend() {
    let mut d = TestDriver::opened(Offloads {
        csum: true,
        ..Offloads::NONE
    });
    let frame = tcp4_frame(300);
    let eop = d.xmit(
        &frame,
        TxOffload::Checksum {
            css: 34,
            cso: 50,
            tcp: true,
        },
    );
    d.wait_tx_done(eop);
    let sent = d.backend.take_sent();
    assert_eq!(sent[0].0.flags, VnetHdr::FLAG_NEEDS_CSUM);
    assert_eq!((sent[0].0.csum_start, sent[0].0.csum_offset), (34, 16));
    assert_eq!(sent[0].1, frame);
}

#[test]
fn tso_is_segmented_in_software_for_a_plain_backend() {
    let mut d = TestDriver::opened(Offloads::NONE);
    let (request, _) = linux_tso_request(10_000, 1448);
    let original = tcp4_frame(10_000);
    let eop = d.xmit(&request, tso_offload(1448));
    d.wait_tx_done(eop);
    let sent = d.backend.take_sent();
    assert_eq!(sent.len(), 7);
    let mut payload = Vec::new();
    for (i, (hdr, seg)) in sent.iter().enumerate() {
        assert!(hdr.is_plain());
        assert!(seg.len() <= 54 + 1448);
        assert_eq!(
            checksum::ipv4_header_ok(seg, 14),
            Some(true),
            "IP checksum of segment {i}"
        );
        let loc = checksum::locate_l4(seg, ETHERTYPE_VLAN).unwrap();
        assert_eq!(
            checksum::l4_ok(seg, &loc),
            Some(true),
            "TCP checksum of segment {i}"
        );
        assert_eq!(checksum::read_u32(seg, 38), Some(1000 + 1448 * i as u32));
        assert_eq!(&seg[..14], &original[..14]);
        payload.extend_from_slice(&seg[54..]);
    }
    assert_eq!(payload, &original[54..]);
    assert_eq!(d.er32(TSCTC), 1);
    assert_eq!(d.er32(GPTC), 7);
}

#[test]
fn tso_is_passed_through_to_a_tso_backend() {
    let mut d = TestDriver::opened(Offloads {
        csum: true,
        tso4: true,
        tso6: true,
        ..Offloads::NONE
    });
    let (request, _) = linux_tso_request(10_000, 1448);
    let eop = d.xmit(&request, tso_offload(1448));
    d.wait_tx_done(eop);
    let sent = d.backend.take_sent();
    assert_eq!(sent.len(), 1);
    let (hdr, frame) = &sent[0];
    assert_eq!(hdr.gso_type, VnetHdr::GSO_TCPV4);
    assert_eq!(hdr.gso_size, 1448);
    assert_eq!(hdr.flags, VnetHdr::FLAG_NEEDS_CSUM);
    assert_eq!(frame.len(), 10_054);
    assert_eq!(checksum::ipv4_header_ok(frame, 14), Some(true));
    let mut completed = frame.clone();
    checksum::insert(&mut completed, 34, None, 50, 0);
    assert_eq!(completed, tcp4_frame(10_000));
}

#[test]
fn vlan_tags_are_inserted_on_transmit() {
    let mut d = TestDriver::opened(Offloads::NONE);
    let frame = broadcast_frame(100, 5);
    let eop = d.queue_frame(&frame, TxOffload::None, 4096, Some(0x0064));
    d.ew32(TDT, d.tx_next);
    d.wait_tx_done(eop);
    let sent = d.backend.take_sent();
    assert_eq!(&sent[0].1[12..16], &[0x81, 0x00, 0x00, 0x64]);
    assert_eq!(&sent[0].1[16..], &frame[12..]);
}

#[test]
fn received_frames_land_in_buffers_with_status_and_interrupt() {
    let mut d = TestDriver::opened(Offloads::NONE);
    let edges = d.irq.rising_edges();
    let tcp = frame_to(d.mac, 200);
    d.backend.inject(VnetHdr::default(), &tcp);
    let rx = d.receive();
    assert_eq!(rx.data.len(), tcp.len() + 4, "length includes the FCS");
    assert_eq!(&rx.data[..tcp.len()], &tcp[..]);
    assert_eq!(&rx.data[tcp.len()..], &crc32(&tcp).to_le_bytes());
    assert_eq!(
        rx.status & (STA_EOP | STA_TCPCS | STA_IPCS),
        STA_EOP | STA_TCPCS | STA_IPCS
    );
    assert_eq!(rx.errors, 0);
    wait_for("RX interrupt", || d.irq.asserted());
    assert!(d.irq.rising_edges() > edges);
    let icr = d.intr();
    assert_ne!(icr & ICR_RXT0, 0);
    assert!(!d.irq.asserted(), "reading ICR acknowledges");
    d.irq_enable();
    assert!(!d.irq.asserted());

    // A 42-byte ARP-sized frame arrives padded to the 60-byte minimum.
    let arp = broadcast_frame(42, 7);
    d.backend.inject(VnetHdr::default(), &arp);
    let rx = d.receive();
    assert_eq!(rx.data.len(), 64);
    assert_eq!(&rx.data[..42], &arp[..]);
    assert!(rx.data[42..60].iter().all(|&b| b == 0));
    assert_eq!(d.er32(GPRC), 2);
    assert_eq!(d.er32(BPRC), 1);
}

#[test]
fn partial_checksums_from_the_backend_are_completed() {
    let mut d = TestDriver::opened(Offloads {
        csum: true,
        tso4: true,
        ..Offloads::NONE
    });
    assert_eq!(
        d.backend.rx_offloads(),
        Offloads {
            csum: true,
            ..Offloads::NONE
        },
        "no GSO on receive"
    );
    let good = frame_to(d.mac, 500);
    let mut partial = good.clone();
    let loc = checksum::locate_l4(&partial, ETHERTYPE_VLAN).unwrap();
    let seed = checksum::fold(checksum::pseudo_header(&partial, &loc).unwrap());
    partial[50..52].copy_from_slice(&seed.to_be_bytes());
    let hdr = VnetHdr {
        flags: VnetHdr::FLAG_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    };
    d.backend.inject(hdr, &partial);
    let rx = d.receive();
    assert_eq!(&rx.data[..good.len()], &good[..]);
    assert_ne!(rx.status & STA_TCPCS, 0);
    assert_eq!(rx.errors, 0);
}

#[test]
fn receive_filter_and_promiscuous_mode() {
    let mut d = TestDriver::opened(Offloads::NONE);
    let stranger = frame_to([0x52, 0x54, 0, 0, 0, 0x99], 10);
    d.backend.inject(VnetHdr::default(), &stranger);
    let mine = frame_to(d.mac, 10);
    d.backend.inject(VnetHdr::default(), &mine);
    let rx = d.receive();
    assert_eq!(&rx.data[..mine.len()], &mine[..]);
    assert_eq!(d.dev.shared().lock().counters.rx_filtered, 1);
    d.set_rx_mode(true, false);
    d.backend.inject(VnetHdr::default(), &stranger);
    let rx = d.receive();
    assert_eq!(&rx.data[..stranger.len()], &stranger[..]);
}

#[test]
fn vlan_tags_are_stripped_on_receive() {
    let mut d = TestDriver::opened(Offloads::NONE);
    let plain = frame_to(d.mac, 100);
    let mut tagged = plain.clone();
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x2a]);
    d.backend.inject(VnetHdr::default(), &tagged);
    let rx = d.receive();
    assert_ne!(rx.status & STA_VP, 0);
    assert_eq!(rx.special, 0x2a);
    assert_eq!(&rx.data[..plain.len()], &plain[..]);
}

#[test]
fn jumbo_frames_chain_across_descriptors() {
    let mut d = TestDriver::opened(Offloads::NONE);
    // e1000_change_mtu to 9000: page-sized buffers with LPE.
    d.setup_rctl(true);
    let frame = frame_to(d.mac, 8900);
    d.backend.inject(VnetHdr::default(), &frame);
    let rx = d.receive();
    assert_eq!(rx.descriptors, 3);
    assert_eq!(rx.data.len(), frame.len() + 4);
    assert!(rx.data[..frame.len()] == frame[..], "frame contents");
    assert_ne!(rx.status & STA_TCPCS, 0);
}

#[test]
fn receive_waits_for_buffers_instead_of_dropping() {
    let mut d = TestDriver::new(Offloads::NONE);
    d.probe();
    d.rx_count = 8;
    d.open();
    // Seven descriptors are posted; send twenty frames.
    for i in 0..20u8 {
        d.backend
            .inject(VnetHdr::default(), &broadcast_frame(100, i));
    }
    // Let the device fill all seven and stall before the driver returns any: a driver
    // that hands buffers back as fast as the worker fills them never runs it dry.
    // RNBC clears on read, so the polls add up.
    let mut no_buffer_events = 0;
    wait_for("RNBC", || {
        no_buffer_events += d.er32(RNBC);
        no_buffer_events >= 1
    });
    for i in 0..20u8 {
        let rx = d.receive();
        assert_eq!(&rx.data[..100], &broadcast_frame(100, i)[..], "frame {i}");
    }
    assert_eq!(d.backend.pending(), 0);
    let counters = d.dev.shared().lock().counters.clone();
    assert_eq!(counters.rx_frames, 20);
    assert!(counters.drops.is_empty() || counters.drops.iter().all(|(r, _)| *r == "rx_disabled"));
}

#[test]
fn link_changes_raise_lsc() {
    let mut d = TestDriver::opened(Offloads::NONE);
    d.backend.set_link_up(false);
    // The worker notices on its next wake-up.
    d.backend
        .inject(VnetHdr::default(), &broadcast_frame(60, 0));
    wait_for("LSC interrupt", || d.irq.asserted());
    let icr = d.intr();
    assert_ne!(icr & ICR_LSC, 0);
    assert_eq!(d.er32(STATUS) & STATUS_LU, 0);
    assert_eq!(
        d.read_phy(super::phy::BMSR).unwrap() & super::phy::BMSR_LSTATUS,
        0
    );
}

#[test]
fn interrupt_throttling_spaces_interrupts() {
    let mut d = TestDriver::opened(Offloads::NONE);
    d.ew32(ITR, 20_000); // 5.12 ms
    let frame = broadcast_frame(60, 1);
    // The first interrupt cannot come before this, so the second may not come before
    // this plus the interval. (Timing from when the test notices the first one would
    // fail whenever the test thread is scheduled late.)
    let before_first = std::time::Instant::now();
    let eop = d.xmit(&frame, TxOffload::None);
    d.wait_tx_done(eop);
    wait_for("first interrupt", || d.irq.asserted());
    d.intr();
    d.irq_enable();
    let eop = d.xmit(&frame, TxOffload::None);
    d.wait_tx_done(eop);
    wait_for("throttled interrupt", || d.irq.asserted());
    assert!(
        before_first.elapsed() >= Duration::from_millis(5),
        "second interrupt came {:?} after the first transmit",
        before_first.elapsed()
    );
}

#[test]
fn pci_status_and_intx_disable_follow_the_interrupt() {
    let mut d = TestDriver::opened(Offloads::NONE);
    d.ew32(ICS, ICR_RXT0);
    // The previous interrupt was moments ago, so ITR may hold this one back briefly.
    wait_for("interrupt", || d.irq.asserted());
    let mut status = [0u8; 2];
    d.dev.config_read(PCI_STATUS, &mut status);
    assert_ne!(u16::from_le_bytes(status) & PCI_STATUS_INTERRUPT, 0);
    let cmd = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE;
    d.dev.config_write(PCI_COMMAND, &cmd.to_le_bytes());
    assert!(!d.irq.asserted());
    d.intr();
    d.dev.config_read(PCI_STATUS, &mut status);
    assert_eq!(u16::from_le_bytes(status) & PCI_STATUS_INTERRUPT, 0);
}

#[test]
fn bar_layout_and_identity() {
    let d = TestDriver::new(Offloads::NONE);
    let bars = d.dev.config().bars().to_vec();
    assert_eq!(bars.len(), 2);
    assert_eq!((bars[0].index, bars[0].size), (MMIO_BAR, 0x20000));
    assert_eq!((bars[1].index, bars[1].size), (IO_BAR, 64));
    assert_eq!(d.dev.config().read8(crate::pci::PCI_INTERRUPT_PIN), 1);
    assert_eq!(d.dev.config().read32(8) >> 8, 0x020000);
}

#[test]
fn shutdown_stops_the_worker_and_reports_counters() {
    let mut d = TestDriver::opened(Offloads::NONE);
    let eop = d.xmit(&broadcast_frame(60, 1), TxOffload::None);
    d.wait_tx_done(eop);
    d.dev.shutdown();
    let stats = d.dev.stats();
    assert!(stats.contains("tx 1 frames"), "{stats}");
    assert!(stats.contains("backend loopback"), "{stats}");
    d.dev.shutdown();
}

#[test]
fn rejects_a_multicast_mac() {
    let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (backend, _) = tapir_net::backend::loopback::pair(Offloads::NONE).unwrap();
    let irq = std::sync::Arc::new(crate::interrupt::TestIrqLine::default());
    let mac = tapir_net::mac::MacAddr([1, 2, 3, 4, 5, 6]);
    assert!(E1000::new(mac, Box::new(backend), mem, irq).is_err());
}

// ---- hostile guests ----

#[test]
fn tx_tail_beyond_the_ring_stops_transmit_until_fixed() {
    let mut d = TestDriver::opened(Offloads::NONE);
    d.queue_frame(&broadcast_frame(60, 1), TxOffload::None, 4096, None);
    d.ew32(TDT, RING_LEN + 5);
    wait_drop(&d, "tx_ring_invalid", 1);
    assert!(d.backend.take_sent().is_empty());
    d.ew32(TDT, d.tx_next);
    d.wait_tx_idle();
    assert_eq!(d.backend.take_sent().len(), 1);
}

#[test]
fn rx_tail_beyond_the_ring_drops_and_counts() {
    let mut d = TestDriver::opened(Offloads::NONE);
    d.ew32(RDT, 0xffff);
    d.backend
        .inject(VnetHdr::default(), &broadcast_frame(60, 1));
    wait_drop(&d, "rx_ring_invalid", 1);
    assert_eq!(d.rx_descriptor(0)[12], 0, "nothing written");
}

#[test]
fn zero_length_rings_are_refused() {
    let mut d = TestDriver::opened(Offloads::NONE);
    d.ew32(TDLEN, 0);
    d.ew32(TDT, 3);
    d.ew32(RDLEN, 0x7f);
    d.backend
        .inject(VnetHdr::default(), &broadcast_frame(60, 1));
    wait_drop(&d, "tx_ring_invalid", 1);
    wait_drop(&d, "rx_ring_invalid", 1);
    assert!(d.backend.take_sent().is_empty());
}

#[test]
fn tx_buffers_outside_guest_memory_are_dropped_and_completed() {
    let mut d = TestDriver::opened(Offloads::NONE);
    let mut desc = [0u8; 16];
    desc[..8].copy_from_slice(&(MEM_SIZE as u64 - 8).to_le_bytes());
    desc[8..10].copy_from_slice(&64u16.to_le_bytes());
    desc[11] = 0x01 | 0x08;
    d.write_tx_descriptor(0, &desc);
    desc[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    d.write_tx_descriptor(1, &desc);
    d.tx_next = 2;
    d.ew32(TDT, 2);
    d.wait_tx_done(1);
    assert_eq!(drops(&d, "tx_bad_buffer_address"), 2);
    assert!(d.backend.take_sent().is_empty());
    // The ring keeps working.
    let eop = d.xmit(&broadcast_frame(60, 2), TxOffload::None);
    d.wait_tx_done(eop);
    assert_eq!(d.backend.take_sent().len(), 1);
}

#[test]
fn tx_ring_outside_guest_memory_stops_transmit() {
    let mut d = TestDriver::opened(Offloads::NONE);
    d.ew32(TDBAL, 0xffff_f000);
    d.ew32(TDBAH, 0xffff_ffff);
    d.ew32(TDLEN, 4096);
    d.ew32(TDH, 0);
    d.ew32(TDT, 4);
    wait_drop(&d, "tx_descriptor_unreadable", 1);
    d.ew32(TDT, 5);
    wait_drop(&d, "tx_descriptor_unreadable", 2);
    // Unrelated wake-ups (a received frame) do not count the same fault again.
    d.backend
        .inject(VnetHdr::default(), &broadcast_frame(60, 1));
    d.receive();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        drops(&d, "tx_descriptor_unreadable"),
        2,
        "counted once per new tail"
    );
}

#[test]
fn rx_buffers_outside_guest_memory_return_error_descriptors() {
    let mut d = TestDriver::opened(Offloads::NONE);
    d.write_rx_descriptor(0, 0xdead_0000_0000);
    d.backend
        .inject(VnetHdr::default(), &broadcast_frame(100, 1));
    let rx = d.receive();
    assert_ne!(rx.errors & super::rx::ERR_RXE, 0);
    assert!(rx.data.is_empty());
    assert_eq!(drops(&d, "rx_bad_address"), 1);
    // The next frame uses a good buffer again.
    d.backend
        .inject(VnetHdr::default(), &broadcast_frame(100, 2));
    let rx = d.receive();
    assert_eq!(&rx.data[..100], &broadcast_frame(100, 2)[..]);
}

#[test]
fn rx_ring_base_outside_guest_memory_drops_frames() {
    let mut d = TestDriver::opened(Offloads::NONE);
    d.ew32(RDBAL, 0xfff0_0000);
    d.ew32(RDBAH, 0x7fff);
    d.ew32(RDH, 0);
    d.ew32(RDT, 10);
    d.backend
        .inject(VnetHdr::default(), &broadcast_frame(100, 1));
    wait_drop(&d, "rx_bad_address", 1);
}

#[test]
fn absurd_tso_contexts_are_dropped_and_counted() {
    let mut d = TestDriver::opened(Offloads::NONE);
    let (request, _) = linux_tso_request(3000, 1000);
    let cases = [
        TxOffload::Tso {
            ipcss: 14,
            ipcso: 24,
            ipcse: 33,
            tucss: 34,
            tucso: 50,
            hdr_len: 54,
            mss: 0,
            ipv4: true,
        },
        TxOffload::Tso {
            ipcss: 14,
            ipcso: 24,
            ipcse: 33,
            tucss: 34,
            tucso: 50,
            hdr_len: 54,
            mss: 1,
            ipv4: true,
        },
        TxOffload::Tso {
            ipcss: 14,
            ipcso: 24,
            ipcse: 33,
            tucss: 34,
            tucso: 50,
            hdr_len: 54,
            mss: 0xffff,
            ipv4: true,
        },
        TxOffload::Tso {
            ipcss: 14,
            ipcso: 24,
            ipcse: 33,
            tucss: 34,
            tucso: 50,
            hdr_len: 255,
            mss: 1000,
            ipv4: true,
        },
        TxOffload::Tso {
            ipcss: 14,
            ipcso: 24,
            ipcse: 33,
            tucss: 34,
            tucso: 50,
            hdr_len: 0,
            mss: 1000,
            ipv4: true,
        },
        TxOffload::Tso {
            ipcss: 200,
            ipcso: 250,
            ipcse: 0,
            tucss: 220,
            tucso: 240,
            hdr_len: 54,
            mss: 1000,
            ipv4: true,
        },
    ];
    for offload in cases {
        let eop = d.xmit(&request, offload);
        d.wait_tx_done(eop);
    }
    assert!(d.backend.take_sent().is_empty());
    let bad = drops(&d, "tx_tso_bad_mss") + drops(&d, "tx_tso_bad_header");
    assert_eq!(bad, 6);
    assert_eq!(d.er32(TSCTFC), 6);
    let eop = d.xmit(&request, tso_offload(1000));
    d.wait_tx_done(eop);
    assert_eq!(d.backend.take_sent().len(), 3);
}

#[test]
fn tso_data_without_a_context_is_dropped() {
    let mut d = TestDriver::opened(Offloads::NONE);
    let mut desc = [0u8; 16];
    desc[..8].copy_from_slice(&TX_BUFFERS.to_le_bytes());
    desc[8..10].copy_from_slice(&100u16.to_le_bytes());
    desc[10] = 0x10;
    desc[11] = 0x20 | 0x04 | 0x01 | 0x08;
    desc[13] = 0x02;
    d.write_tx_descriptor(0, &desc);
    d.tx_next = 1;
    d.ew32(TDT, 1);
    d.wait_tx_done(0);
    assert_eq!(drops(&d, "tx_tso_without_context"), 1);
}

#[test]
fn zero_length_descriptors_are_harmless() {
    let mut d = TestDriver::opened(Offloads::NONE);
    // A lone zero-length EOP descriptor: nothing to send.
    let eop = d.queue_frame(&[], TxOffload::None, 4096, None);
    d.ew32(TDT, d.tx_next);
    d.wait_tx_done(eop);
    assert_eq!(drops(&d, "tx_empty"), 1);
    // Zero-length descriptors inside a chain contribute nothing.
    let frame = broadcast_frame(200, 3);
    let first = d.queue_frame(&frame[..100], TxOffload::None, 4096, None);
    let mut raw = [0u8; 16];
    d.mem
        .read_slice(&mut raw, GuestAddress(TX_RING + u64::from(first) * 16))
        .unwrap();
    raw[11] &= !0x09;
    d.write_tx_descriptor(first, &raw);
    let mut empty = [0u8; 16];
    empty[11] = 0x02;
    d.write_tx_descriptor(d.tx_next, &empty);
    d.tx_next += 1;
    let eop = d.queue_frame(&frame[100..], TxOffload::None, 4096, None);
    d.ew32(TDT, d.tx_next);
    d.wait_tx_done(eop);
    let sent = d.backend.take_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1, frame);
}

#[test]
fn a_chain_without_eop_across_the_whole_ring_is_dropped() {
    let mut d = TestDriver::opened(Offloads::NONE);
    let start = d.er32(TDH);
    // Every descriptor the guest can hand over, none ending the packet.
    for i in 0..RING_LEN - 1 {
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&TX_BUFFERS.to_le_bytes());
        desc[8..10].copy_from_slice(&64u16.to_le_bytes());
        desc[11] = 0x02 | 0x08;
        d.write_tx_descriptor((start + i) % RING_LEN, &desc);
    }
    let tail = (start + RING_LEN - 1) % RING_LEN;
    d.tx_next = tail;
    d.ew32(TDT, tail);
    wait_drop(&d, "tx_no_eop", 1);
    d.wait_tx_idle();
    assert!(d.backend.take_sent().is_empty());
    let eop = d.xmit(&broadcast_frame(60, 1), TxOffload::None);
    d.wait_tx_done(eop);
    assert_eq!(d.backend.take_sent().len(), 1);
}

#[test]
fn an_unfinished_chain_waits_for_the_rest() {
    let mut d = TestDriver::opened(Offloads::NONE);
    let frame = broadcast_frame(300, 8);
    let eop = d.queue_frame(&frame, TxOffload::None, 100, None);
    // Only the first two of three descriptors are handed over.
    d.ew32(TDT, eop);
    std::thread::sleep(Duration::from_millis(20));
    assert!(d.backend.take_sent().is_empty());
    assert_eq!(d.er32(TDH), eop - 2, "head stays at the packet start");
    d.ew32(TDT, d.tx_next);
    d.wait_tx_done(eop);
    assert_eq!(d.backend.take_sent()[0].1, frame);
}

#[test]
fn rdlen_is_masked_to_whole_descriptor_blocks() {
    let mut d = TestDriver::new(Offloads::NONE);
    d.probe();
    d.rx_count = 56;
    d.open();
    d.ew32(RDLEN, 1000);
    assert_eq!(d.er32(RDLEN), 896);
    for i in 0..60u8 {
        d.backend
            .inject(VnetHdr::default(), &broadcast_frame(80, i));
        let rx = d.receive();
        assert_eq!(&rx.data[..80], &broadcast_frame(80, i)[..]);
    }
}

#[test]
fn packets_larger_than_16k_are_dropped_both_ways() {
    let mut d = TestDriver::opened(Offloads::NONE);
    d.setup_rctl(true);
    d.backend
        .inject(VnetHdr::default(), &broadcast_frame(20_000, 1));
    wait_drop(&d, "rx_oversize", 1);
    assert_eq!(d.er32(ROC), 1);
    let eop = d.xmit(&broadcast_frame(20_000, 2), TxOffload::None);
    d.wait_tx_done(eop);
    assert_eq!(drops(&d, "tx_oversize"), 1);
    assert!(d.backend.take_sent().is_empty());
    // Without LPE, a 1600-byte frame is already too long.
    d.setup_rctl(false);
    d.backend
        .inject(VnetHdr::default(), &broadcast_frame(1600, 3));
    wait_drop(&d, "rx_oversize", 2);
}

#[test]
fn ioaddr_pointing_at_unimplemented_registers() {
    let mut d = TestDriver::opened(Offloads::NONE);
    assert_eq!(d.io_read_reg(STATUS) & STATUS_LU, STATUS_LU);
    assert_eq!(d.io_read_reg(0x1fff0), 0);
    d.io_write_reg(0x1fff0, 0xdead_beef);
    assert_eq!(drops(&d, "unimplemented_register"), 2);
    assert_eq!(d.io_read_reg(0xffff_fff0), 0);
    d.io_write_reg(0x0002_0000, 1);
    assert_eq!(drops(&d, "io_bad_address"), 2);
    let mut b = [0u8; 4];
    d.dev.bar_read(IO_BAR, 0x20, &mut b);
    d.dev.bar_write(IO_BAR, 0x3c, &b);
    assert_eq!(drops(&d, "unimplemented_register"), 4);
    // IOADDR reads back as written.
    d.dev.bar_write(IO_BAR, IOADDR, &0x1234u32.to_le_bytes());
    d.dev.bar_read(IO_BAR, IOADDR, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x1234);
}

#[test]
fn odd_sized_and_unaligned_accesses_do_not_panic() {
    let mut d = TestDriver::opened(Offloads::NONE);
    for len in [1usize, 2, 3, 4, 8] {
        for offset in [0u64, 1, 3, 0xc0, 0x1fffc, 0x1ffff, 0x20000, u64::MAX - 3] {
            let mut buf = vec![0u8; len];
            d.dev.bar_read(MMIO_BAR, offset, &mut buf);
            d.dev.bar_write(MMIO_BAR, offset.wrapping_add(0x400), &buf);
            d.dev.bar_read(IO_BAR, offset, &mut buf);
            d.dev.bar_write(IO_BAR, offset, &buf);
            d.dev.bar_read(7, offset, &mut buf);
        }
    }
    let mut buf = [0u8; 8];
    d.dev.config_read(250, &mut buf);
    d.dev.config_write(252, &buf);
    // An 8-byte read covers two registers.
    d.dev.bar_read(MMIO_BAR, u64::from(RDBAL), &mut buf);
    assert_eq!(
        u32::from_le_bytes(buf[..4].try_into().unwrap()),
        RX_RING as u32
    );
}

#[test]
fn unexpected_gso_and_bad_vnet_headers_from_the_backend() {
    let mut d = TestDriver::opened(Offloads {
        csum: true,
        ..Offloads::NONE
    });
    let frame = frame_to(d.mac, 3000);
    d.backend.inject(
        VnetHdr {
            gso_type: VnetHdr::GSO_TCPV4,
            gso_size: 1448,
            ..Default::default()
        },
        &frame,
    );
    let bad = VnetHdr {
        flags: VnetHdr::FLAG_NEEDS_CSUM,
        csum_start: 60000,
        csum_offset: 16,
        ..Default::default()
    };
    d.backend.inject(bad, &frame_to(d.mac, 10));
    wait_drop(&d, "rx_unexpected_gso", 1);
    wait_drop(&d, "rx_bad_vnet_hdr", 1);
    let ok = frame_to(d.mac, 10);
    d.backend.inject(VnetHdr::default(), &ok);
    assert_eq!(&d.receive().data[..ok.len()], &ok[..]);
}

#[test]
fn reset_during_traffic_is_safe() {
    let mut d = TestDriver::opened(Offloads::NONE);
    for i in 0..50u8 {
        d.backend
            .inject(VnetHdr::default(), &broadcast_frame(500, i));
        d.queue_frame(&broadcast_frame(500, i), TxOffload::None, 128, None);
    }
    d.ew32(TDT, d.tx_next);
    d.ew32(CTRL, CTRL_RST);
    assert_eq!(d.er32(TCTL), 0);
    assert_eq!(d.er32(IMS), 0);
    // Probe and open again, as the driver would after a reset.
    d.probe();
    d.open();
    let eop = d.xmit(&broadcast_frame(60, 1), TxOffload::None);
    d.wait_tx_done(eop);
}

/// Runs `write` on another thread while the test holds the worker's DMA gate, as a
/// worker preempted mid-copy would; reports whether the write returned before the gate
/// was released.
fn returns_during_dma(d: &mut TestDriver, write: impl FnOnce(&mut TestDriver) + Send) -> bool {
    let shared = Arc::clone(d.dev.shared());
    let gate = shared.dma_gate();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(move || {
            write(d);
            let _ = done_tx.send(());
        });
        let returned = done_rx.recv_timeout(Duration::from_millis(300)).is_ok();
        drop(gate);
        returned
    })
}

#[test]
fn writes_that_take_rings_away_wait_for_in_flight_dma() {
    let mut d = TestDriver::opened(Offloads::NONE);
    let rctl = d.er32(RCTL);
    assert!(
        !returns_during_dma(&mut d, |d| d.ew32(RCTL, rctl & !RCTL_EN)),
        "RCTL"
    );
    let tctl = d.er32(TCTL);
    assert!(
        !returns_during_dma(&mut d, |d| d.ew32(TCTL, tctl & !TCTL_EN)),
        "TCTL"
    );
    assert!(
        !returns_during_dma(&mut d, |d| d.ew32(RDBAL, 0x3000)),
        "RDBAL"
    );
    assert!(
        !returns_during_dma(&mut d, |d| d.ew32(CTRL, CTRL_RST)),
        "reset"
    );
    let bus_master_off = |d: &mut TestDriver| {
        d.dev
            .config_write(PCI_COMMAND, &PCI_COMMAND_MEMORY.to_le_bytes());
    };
    assert!(
        !returns_during_dma(&mut d, bus_master_off),
        "bus master off"
    );

    // The per-packet doorbells and interrupt registers never wait on the data path.
    let mut d = TestDriver::opened(Offloads::NONE);
    assert!(returns_during_dma(&mut d, |d| d.ew32(RDT, 3)), "RDT");
    assert!(returns_during_dma(&mut d, |d| d.ew32(TDT, 0)), "TDT");
    assert!(returns_during_dma(&mut d, |d| d.ew32(IMS, ICR_RXT0)), "IMS");
    assert!(
        returns_during_dma(&mut d, |d| {
            d.er32(ICR);
        }),
        "ICR read"
    );
}

#[test]
fn the_worker_touches_guest_memory_only_while_holding_the_dma_gate() {
    let mut d = TestDriver::opened(Offloads::NONE);
    let shared = Arc::clone(d.dev.shared());
    let gate = shared.dma_gate();
    d.backend
        .inject(VnetHdr::default(), &broadcast_frame(300, 1));
    let frame = broadcast_frame(200, 2);
    let eop = d.queue_frame(&frame, TxOffload::None, 4096, None);
    d.ew32(TDT, d.tx_next);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        d.rx_descriptor(d.rx_next)[12] & 1,
        0,
        "receive DMA without the gate"
    );
    assert_eq!(
        d.tx_status(eop) & 1,
        0,
        "transmit status written without the gate"
    );
    drop(gate);
    d.wait_tx_done(eop);
    assert_eq!(d.receive().data[..300], broadcast_frame(300, 1)[..]);
}

#[test]
fn random_register_and_descriptor_garbage_does_not_panic() {
    let mut d = TestDriver::opened(Offloads {
        csum: true,
        tso4: true,
        ..Offloads::NONE
    });
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // Garbage descriptors in both rings.
    for i in 0..RING_LEN {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&next().to_le_bytes());
        raw[8..].copy_from_slice(&next().to_le_bytes());
        if i % 3 == 0 {
            raw[..8].copy_from_slice(&(next() % MEM_SIZE as u64).to_le_bytes());
        }
        d.write_tx_descriptor(i, &raw);
        d.mem
            .write_slice(&raw, GuestAddress(RX_RING + u64::from(i) * 16))
            .unwrap();
    }
    d.ew32(TDT, RING_LEN - 1);
    let registers = [
        CTRL, RCTL, TCTL, RDT, TDT, RDH, TDH, RDLEN, TDLEN, ITR, IMS, IMC, ICS, ICR, EECD, EERD,
        MDIC, RXCSUM,
    ];
    for _ in 0..3000 {
        let r = next();
        let reg = registers[(r % registers.len() as u64) as usize];
        let value = (r >> 16) as u32;
        if reg == CTRL {
            d.ew32(reg, value & !CTRL_RST);
        } else if r & 1 == 0 {
            d.ew32(reg, value);
        } else {
            d.er32(reg);
        }
        if r % 7 == 0 {
            let len = (next() % 2000) as usize + 1;
            let hdr = VnetHdr {
                flags: (next() % 4) as u8,
                csum_start: (next() % 3000) as u16,
                csum_offset: (next() % 100) as u16,
                ..Default::default()
            };
            d.backend.inject(hdr, &broadcast_frame(len, r as u8));
        }
    }
    // The device still answers and shuts down cleanly.
    d.er32(STATUS);
    d.dev.shutdown();
}

/// A backend whose fd has hung up, whose receive fails and whose send refuses, for
/// the worker's error paths.
struct BrokenBackend {
    read_end: std::os::fd::OwnedFd,
    recv_error: bool,
}

impl BrokenBackend {
    fn new(recv_error: bool) -> Self {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` has room for the two descriptors pipe(2) returns.
        assert_eq!(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) },
            0
        );
        // SAFETY: both fds were just created and are owned here; closing the write end
        // makes the read end report POLLHUP.
        unsafe { libc::close(fds[1]) };
        let read_end =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
        BrokenBackend {
            read_end,
            recv_error,
        }
    }
}

impl tapir_net::backend::Backend for BrokenBackend {
    fn kind(&self) -> &'static str {
        "broken"
    }
    fn poll_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.read_end)
    }
    fn supported_offloads(&self) -> Offloads {
        Offloads::NONE
    }
    fn set_rx_offloads(&mut self, _: Offloads) -> std::io::Result<()> {
        Err(std::io::Error::other("no offloads here"))
    }
    fn send(&mut self, _: &VnetHdr, _: &[u8]) -> Result<(), tapir_net::backend::BackendError> {
        Err(tapir_net::backend::BackendError::WouldBlock)
    }
    fn recv(
        &mut self,
        _: &mut [u8],
    ) -> Result<Option<(VnetHdr, usize)>, tapir_net::backend::BackendError> {
        if self.recv_error {
            return Err(std::io::Error::other("tap went away").into());
        }
        Ok(None)
    }
    fn counters(&self) -> tapir_net::backend::BackendCounters {
        Default::default()
    }
}

#[test]
fn broken_backends_are_contained() {
    for recv_error in [false, true] {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = std::sync::Arc::new(crate::interrupt::TestIrqLine::default());
        let mac = tapir_net::mac::MacAddr([0x52, 0x54, 0, 0, 0, 7]);
        let mut dev = E1000::new(mac, Box::new(BrokenBackend::new(recv_error)), mem, irq).unwrap();
        let failed = |dev: &E1000| dev.shared().lock().counters.drops_for("backend_failed");
        wait_for(
            &format!("backend marked failed (recv_error {recv_error})"),
            || failed(&dev) == 1,
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(failed(&dev), 1, "reported once, not in a loop");
        dev.shutdown();
    }
}

#[test]
fn refused_sends_are_counted() {
    let mem =
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let irq = std::sync::Arc::new(crate::interrupt::TestIrqLine::default());
    let mac = tapir_net::mac::MacAddr([0x52, 0x54, 0, 0, 0, 8]);
    let dev = E1000::new(
        mac,
        Box::new(BrokenBackend::new(false)),
        mem.clone(),
        irq.clone(),
    )
    .unwrap();
    let (_, handle) = tapir_net::backend::loopback::pair(Offloads::NONE).unwrap();
    let mut d = TestDriver::with_device(dev, mem, irq, handle);
    d.probe();
    d.open();
    let eop = d.xmit(&broadcast_frame(60, 1), TxOffload::None);
    d.wait_tx_done(eop);
    wait_drop(&d, "tx_backend_refused", 1);
    assert_eq!(d.er32(GPTC), 0);
}

#[test]
fn sustained_traffic_both_ways_wraps_the_rings_without_loss() {
    let mut d = TestDriver::new(Offloads::NONE);
    d.probe();
    d.tx_count = 16;
    d.rx_count = 16;
    d.open();
    let edges = d.irq.rising_edges();
    let rounds = 600usize;
    let mut sent_frames = Vec::new();
    for i in 0..rounds {
        let len = 60 + (i * 37) % 1400;
        let out = broadcast_frame(len, i as u8);
        // Keep at most a few packets in flight so the small ring never overflows.
        let eop = d.xmit(&out, TxOffload::None);
        sent_frames.push(out);
        d.backend
            .inject(VnetHdr::default(), &broadcast_frame(len, !(i as u8)));
        let rx = d.receive();
        assert_eq!(rx.data.len(), len + 4, "frame {i}");
        assert!(
            rx.data[..len] == broadcast_frame(len, !(i as u8))[..],
            "frame {i}"
        );
        d.wait_tx_done(eop);
        if d.irq.asserted() {
            d.intr();
            d.irq_enable();
        }
    }
    let sent = d.backend.take_sent();
    assert_eq!(sent.len(), rounds);
    for (i, (got, want)) in sent.iter().zip(&sent_frames).enumerate() {
        assert!(got.1 == *want, "tx frame {i}");
    }
    assert!(d.irq.rising_edges() > edges + 10, "interrupts kept coming");
    let c = d.dev.shared().lock().counters.clone();
    assert_eq!((c.tx_frames, c.rx_frames), (rounds as u64, rounds as u64));
    assert!(
        c.drops.iter().all(|(r, _)| *r == "rx_disabled"),
        "{:?}",
        c.drops
    );
}
