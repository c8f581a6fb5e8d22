//! virtio-net end to end inside the process: a simulated driver (`TestDriver`) programs
//! the PCI transport, negotiates features and moves frames through the device thread to
//! a loopback backend and back.

use std::sync::Arc;
use std::time::Duration;

use tapir_net::backend::loopback::{self, LoopbackHandle};
use tapir_net::backend::{Offloads, VnetHdr, MAX_FRAME_LEN};
use tapir_net::mac::MacAddr;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};

use super::features::*;
use super::*;
use crate::pci::PciDevice;
use crate::virtio::pci_layout as layout;
use crate::virtio::test_driver::{reg, TestDriver, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MEM_SIZE};
use crate::virtio::{status, transport_features, VIRTIO_MSI_NO_VECTOR};

const ALL: Offloads = Offloads { csum: true, tso4: true, tso6: true, tso_ecn: true, ufo: true };
const HDR: usize = VnetHdr::LEN;
const RX: u16 = RX_QUEUE;
const TX: u16 = TX_QUEUE;
const CTRL: u16 = CTRL_QUEUE;
/// MSI-X vectors the harness assigns: queue N gets vector N + 1, config gets 0.
const CONFIG_VECTOR: usize = 0;
const fn queue_vector(q: u16) -> usize {
    q as usize + 1
}

struct Harness {
    d: TestDriver,
    backend: LoopbackHandle,
    counters: Arc<NetCounters>,
    mac: MacAddr,
}

fn harness_with(mac_tail: u8, offloads: Offloads, queue_size: u16, msix: bool) -> Harness {
    let (backend, handle) = loopback::pair(offloads).unwrap();
    let mac = MacAddr([0x02, 0x54, 0x00, 0x00, 0x10, mac_tail]);
    let cfg = VirtioNetConfig { mac, mtu: Some(1500), queue_size };
    let net = VirtioNet::new(cfg, Box::new(backend)).unwrap();
    let counters = net.counters();
    let vectors = if msix { VirtioPciDevice::msix_vectors_wanted(&net) } else { 0 };
    let d = TestDriver::new(Box::new(net), vectors);
    Harness { d, backend: handle, counters, mac }
}

fn harness(mac_tail: u8, offloads: Offloads) -> Harness {
    harness_with(mac_tail, offloads, 256, true)
}

use crate::virtio::VirtioPciDevice;

impl Harness {
    /// Negotiates (accepting what `accept` returns), sets up all three queues and sets
    /// DRIVER_OK. Returns the accepted features.
    fn bring_up(&mut self, accept: impl FnOnce(u64) -> u64) -> u64 {
        let msix = self.d.find_capability(0x11).is_some();
        let (features, ok) = self.d.negotiate(accept);
        assert!(ok, "device refused features {features:#x}");
        if msix {
            self.d.enable_msix();
            self.d.common_write(reg::CONFIG_MSIX_VECTOR, 2, CONFIG_VECTOR as u64);
        }
        for q in [RX, TX, CTRL] {
            let size = if q == CTRL { 64 } else { self.d.common_read_queue_max(q) };
            let vector = if msix { queue_vector(q) as u16 } else { VIRTIO_MSI_NO_VECTOR };
            self.d.setup_queue(q, size, vector);
        }
        self.d.driver_ok();
        assert_eq!(self.d.status() & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET), status::DRIVER_OK);
        features
    }

    /// Queues one frame with its header on TX and kicks.
    fn send(&mut self, hdr: VnetHdr, frame: &[u8]) -> u16 {
        let addr = self.d.alloc(HDR + frame.len());
        self.d.write_mem(addr, &hdr.to_bytes());
        self.d.write_mem(addr + HDR as u64, frame);
        let head = self.d.add_chain(TX, &[(addr, (HDR + frame.len()) as u32, false)]);
        self.d.kick(TX);
        head
    }

    /// Posts `count` receive buffers of `size` bytes and kicks. Returns (head, address).
    fn post_rx(&mut self, count: usize, size: u32) -> Vec<(u16, u64)> {
        let posted = (0..count)
            .map(|_| {
                let addr = self.d.alloc(size as usize);
                (self.d.add_chain(RX, &[(addr, size, true)]), addr)
            })
            .collect();
        self.d.kick(RX);
        posted
    }

    /// Sends a control command; returns the ack byte.
    fn control(&mut self, class: u32, cmd: u32, data: &[u8]) -> u8 {
        let mut command = vec![class as u8, cmd as u8];
        command.extend_from_slice(data);
        let addr = self.d.alloc(command.len());
        let ack = self.d.alloc(1);
        self.d.write_mem(addr, &command);
        self.d.write_mem(ack, &[0xee]);
        self.d.add_chain(CTRL, &[(addr, command.len() as u32, false), (ack, 1, true)]);
        self.d.kick(CTRL);
        let used = self.d.wait_used(CTRL, 1);
        assert_eq!(used[0].1, 1);
        self.d.read_mem(ack, 1)[0]
    }

    fn drops(&self, reason: DropReason) -> u64 {
        self.counters.drops(reason)
    }

    fn wait_sent(&self, count: usize) -> Vec<(VnetHdr, Vec<u8>)> {
        let mut got = Vec::new();
        TestDriver::wait_for("frames at the backend", || {
            got.extend(self.backend.take_sent());
            got.len() >= count
        });
        got
    }
}

impl TestDriver {
    fn common_read_queue_max(&mut self, q: u16) -> u16 {
        self.common_write(reg::QUEUE_SELECT, 2, u64::from(q));
        self.common_read(reg::QUEUE_SIZE, 2) as u16
    }
}

/// An Ethernet frame of `len` bytes with a recognisable payload.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    for (i, b) in f.iter_mut().enumerate().skip(14) {
        *b = seed.wrapping_add(i as u8);
    }
    f
}

fn accept_all(f: u64) -> u64 {
    f
}

#[test]
fn negotiates_and_moves_frames_both_ways() {
    let mut h = harness(1, Offloads::NONE);
    let offered = h.d.device_features();
    for bit in [MAC, STATUS, MRG_RXBUF, CTRL_VQ, MTU, transport_features::VERSION_1, transport_features::EVENT_IDX] {
        assert_ne!(offered & bit, 0, "feature {bit:#x} offered");
    }
    assert_eq!(offered & (CSUM | GUEST_CSUM | HOST_TSO4 | GUEST_TSO4 | HOST_UFO | CTRL_GUEST_OFFLOADS), 0);
    let config = h.d.device_config(0, 12);
    assert_eq!(&config[..6], &h.mac.octets());
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1500);
    h.bring_up(accept_all);

    // Guest to backend.
    let out = frame(60, 1);
    let head = h.send(VnetHdr::default(), &out);
    assert_eq!(h.d.wait_used(TX, 1), vec![(u32::from(head), 0)]);
    assert_eq!(h.wait_sent(1), vec![(VnetHdr::default(), out.clone())]);
    TestDriver::wait_for("TX interrupt", || h.d.msix.fired(queue_vector(TX)) >= 1);

    // Backend to guest.
    let posted = h.post_rx(4, 2048);
    let inbound = frame(1514, 7);
    h.backend.inject(VnetHdr::default(), &inbound);
    let used = h.d.wait_used(RX, 1);
    assert_eq!(used, vec![(u32::from(posted[0].0), (HDR + inbound.len()) as u32)]);
    let got = h.d.read_mem(posted[0].1, HDR + inbound.len());
    let hdr = VnetHdr::from_bytes(&got).unwrap();
    assert_eq!(hdr, VnetHdr { num_buffers: 1, ..Default::default() });
    assert_eq!(&got[HDR..], &inbound[..]);
    TestDriver::wait_for("RX interrupt", || h.d.msix.fired(queue_vector(RX)) >= 1);

    let stats = h.counters.snapshot();
    assert_eq!((stats.tx_frames, stats.tx_bytes, stats.rx_frames, stats.rx_bytes), (1, 60, 1, 1514));
    assert!(stats.drops.iter().all(|(_, n)| *n == 0), "{stats}");
    assert!(h.d.dev.stats().contains("tx 1 frames/60 bytes, rx 1 frames/1514 bytes"));
}

#[test]
fn rx_without_mergeable_buffers_uses_one_chain_and_drops_oversized() {
    let mut h = harness(2, Offloads::NONE);
    h.bring_up(|f| f & !MRG_RXBUF);
    let posted = h.post_rx(2, (HDR + 1514) as u32);
    h.backend.inject(VnetHdr::default(), &frame(3000, 1));
    h.backend.inject(VnetHdr::default(), &frame(1514, 2));
    let used = h.d.wait_used(RX, 1);
    // The oversized frame was dropped; the buffer it could not use took the next frame.
    assert_eq!(used, vec![(u32::from(posted[0].0), (HDR + 1514) as u32)]);
    assert_eq!(h.drops(DropReason::RxBufferTooSmall), 1);
    let got = h.d.read_mem(posted[0].1, HDR + 1514);
    assert_eq!(VnetHdr::from_bytes(&got).unwrap().num_buffers, 1);
    assert_eq!(&got[HDR..], &frame(1514, 2)[..]);
}

#[test]
fn mergeable_rx_spreads_a_large_frame_over_buffers() {
    let mut h = harness(3, ALL);
    h.bring_up(accept_all);
    let posted = h.post_rx(8, 1526);
    let big = frame(4000, 9);
    h.backend.inject(VnetHdr::default(), &big);
    let used = h.d.wait_used(RX, 3);
    let total = HDR + big.len();
    assert_eq!(
        used,
        vec![
            (u32::from(posted[0].0), 1526),
            (u32::from(posted[1].0), 1526),
            (u32::from(posted[2].0), (total - 2 * 1526) as u32)
        ]
    );
    let mut stream = Vec::new();
    for (i, &(_, len)) in used.iter().enumerate() {
        stream.extend(h.d.read_mem(posted[i].1, len as usize));
    }
    assert_eq!(VnetHdr::from_bytes(&stream).unwrap().num_buffers, 3);
    assert_eq!(&stream[HDR..], &big[..]);
    // The next frame starts in the fourth buffer.
    h.backend.inject(VnetHdr::default(), &frame(100, 1));
    assert_eq!(h.d.wait_used(RX, 1), vec![(u32::from(posted[3].0), (HDR + 100) as u32)]);
}

#[test]
fn mergeable_rx_waits_for_enough_buffers() {
    let mut h = harness(4, ALL);
    h.bring_up(accept_all);
    let first = h.post_rx(1, 1526);
    h.backend.inject(VnetHdr::default(), &frame(3000, 3));
    assert!(h.d.settle_used(RX).is_empty(), "a 3000-byte frame does not fit one buffer");
    let more = h.post_rx(2, 1526);
    let used = h.d.wait_used(RX, 2);
    assert_eq!(used[0].0, u32::from(first[0].0));
    assert_eq!(used[1].0, u32::from(more[0].0));
    assert_eq!(used.iter().map(|u| u.1).sum::<u32>() as usize, HDR + 3000);
}

#[test]
fn offloads_pass_through_when_backend_supports_them() {
    let mut h = harness(5, ALL);
    let offered = h.d.device_features();
    let all_offloads = CSUM | GUEST_CSUM | HOST_TSO4 | HOST_TSO6 | HOST_ECN | HOST_UFO | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN | GUEST_UFO;
    assert_eq!(offered & all_offloads, all_offloads);
    h.bring_up(accept_all);
    assert_eq!(h.backend.rx_offloads(), ALL);

    let tso = VnetHdr {
        flags: VnetHdr::FLAG_NEEDS_CSUM,
        gso_type: VnetHdr::GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    let big = frame(20000, 4);
    h.send(tso, &big);
    assert_eq!(h.wait_sent(1), vec![(tso, big.clone())]);

    // Offsets pointing past the frame never reach the backend.
    h.send(VnetHdr { csum_start: 60, csum_offset: 6, ..tso }, &frame(64, 1));
    h.send(VnetHdr { gso_size: 0, ..tso }, &big);
    h.d.wait_used(TX, 3);
    assert_eq!(h.drops(DropReason::TxBadOffloadHeader), 2);
    assert!(h.backend.take_sent().is_empty());

    let rx_hdr = VnetHdr { gso_type: VnetHdr::GSO_TCPV6 | VnetHdr::GSO_ECN, ..tso };
    h.post_rx(16, 4096);
    h.backend.inject(rx_hdr, &big);
    let used = h.d.wait_used(RX, 5);
    assert_eq!(used.iter().map(|u| u.1).sum::<u32>() as usize, HDR + big.len());
    let first_rx = layout_addr_of_first_rx(&mut h);
    let got = h.d.read_mem(first_rx, HDR);
    assert_eq!(VnetHdr::from_bytes(&got).unwrap(), VnetHdr { num_buffers: 5, ..rx_hdr });
}

/// The address of the first RX buffer the harness posted (rings come first, then buffers
/// in allocation order; RX buffers were the first allocation after TX frames here).
fn layout_addr_of_first_rx(h: &mut Harness) -> u64 {
    let dq = h.d.queues[usize::from(RX)];
    let mut desc = [0u8; 8];
    desc.copy_from_slice(&h.d.read_mem(dq.desc, 8));
    u64::from_le_bytes(desc)
}

#[test]
fn guest_declining_offloads_gets_plain_frames() {
    let mut h = harness(6, ALL);
    h.bring_up(|f| f & !(GUEST_OFFLOAD_BITS | CTRL_GUEST_OFFLOADS | HOST_TSO4 | HOST_TSO6 | HOST_ECN | HOST_UFO));
    assert_eq!(h.backend.rx_offloads(), Offloads::NONE);
    // A TSO request the guest never negotiated.
    let tso = VnetHdr { flags: 1, gso_type: VnetHdr::GSO_TCPV4, gso_size: 1448, ..Default::default() };
    h.send(tso, &frame(3000, 1));
    h.d.wait_used(TX, 1);
    assert_eq!(h.drops(DropReason::TxOffloadNotNegotiated), 1);
    // Checksum offload alone was negotiated (CSUM) and passes.
    let csum = VnetHdr { flags: 1, csum_start: 34, csum_offset: 6, ..Default::default() };
    h.send(csum, &frame(100, 1));
    assert_eq!(h.wait_sent(1)[0].0, csum);
    // A backend breaking its contract cannot push offloads on the guest.
    h.post_rx(2, 2048);
    h.backend.inject(VnetHdr { flags: VnetHdr::FLAG_NEEDS_CSUM, ..Default::default() }, &frame(100, 1));
    h.backend.inject(VnetHdr { flags: VnetHdr::FLAG_DATA_VALID, ..Default::default() }, &frame(100, 2));
    let used = h.d.wait_used(RX, 1);
    assert_eq!(h.drops(DropReason::RxOffloadNotNegotiated), 1);
    let first_rx = layout_addr_of_first_rx(&mut h);
    let got = h.d.read_mem(first_rx, used[0].1 as usize);
    // Without GUEST_CSUM the flags must be zero, DATA_VALID included.
    assert_eq!(VnetHdr::from_bytes(&got).unwrap(), VnetHdr { num_buffers: 1, ..Default::default() });
}

#[test]
fn backend_without_offloads_hides_offload_features() {
    let mut h = harness(7, Offloads { csum: false, ..ALL });
    let offered = h.d.device_features();
    assert_eq!(offered & (CSUM | GUEST_CSUM | HOST_TSO4 | GUEST_TSO4 | HOST_UFO | GUEST_UFO | HOST_ECN), 0);
    h.bring_up(accept_all);
    h.send(VnetHdr { flags: VnetHdr::FLAG_NEEDS_CSUM, ..Default::default() }, &frame(100, 1));
    h.d.wait_used(TX, 1);
    assert_eq!(h.drops(DropReason::TxOffloadNotNegotiated), 1);
    assert!(h.backend.take_sent().is_empty());
}

/// CPU time (user + system, in clock ticks) of this process's thread named `name`.
fn thread_cpu_ticks(name: &str) -> Option<u64> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path();
        let comm = std::fs::read_to_string(path.join("comm")).ok()?;
        if comm.trim() == name {
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            let after = stat.rsplit(')').next()?;
            let fields: Vec<&str> = after.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of stat, i.e. 12 and 13 after ")".
            return Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?);
        }
    }
    None
}

#[test]
fn rx_without_buffers_waits_without_spinning() {
    let mut h = harness(0x77, ALL);
    h.bring_up(accept_all);
    for i in 0..3 {
        h.backend.inject(VnetHdr::default(), &frame(200, i));
    }
    assert!(h.d.settle_used(RX).is_empty());
    let thread = "vnet-001077";
    TestDriver::wait_for("device thread", || thread_cpu_ticks(thread).is_some());
    let before = thread_cpu_ticks(thread).expect("device thread exists");
    std::thread::sleep(Duration::from_millis(500));
    let after = thread_cpu_ticks(thread).unwrap();
    assert!(after - before <= 5, "device thread used {} ticks while idle", after - before);
    // One frame is held by the device, the rest wait in the backend.
    assert_eq!(h.backend.pending(), 2);
    // EVENT_IDX: the device asked to be kicked on the next buffer.
    assert_eq!(h.d.avail_event(RX), 0);
    h.post_rx(3, 2048);
    let used = h.d.wait_used(RX, 3);
    assert!(used.iter().all(|u| u.1 as usize == HDR + 200));
    assert_eq!(h.backend.pending(), 0);
}

#[test]
fn malformed_tx_chains_are_consumed_and_counted() {
    let mut h = harness(8, Offloads::NONE);
    h.bring_up(accept_all);
    let good = h.d.alloc(HDR + 60);
    h.d.write_mem(good, &VnetHdr::default().to_bytes());
    h.d.write_mem(good + HDR as u64, &frame(60, 1));

    // Buffer past the end of guest memory.
    h.d.add_chain(TX, &[(MEM_SIZE as u64 - 8, 100, false)]);
    // Buffer at an address that wraps around.
    h.d.add_chain(TX, &[(u64::MAX - 16, 64, false)]);
    // A device-writable buffer in a TX chain.
    h.d.add_chain(TX, &[(good, (HDR + 60) as u32, true)]);
    // A header cut short, and a chain of only zero-length buffers.
    h.d.add_chain(TX, &[(good, 8, false)]);
    h.d.add_chain(TX, &[(good, 0, false), (good, 0, false)]);
    // A frame shorter than an Ethernet header.
    h.d.add_chain(TX, &[(good, (HDR + 10) as u32, false)]);
    // More than 64 KiB of frame, spread over descriptors that all point at one buffer.
    let chunk = h.d.alloc(0x8000);
    h.d.add_chain(TX, &[(chunk, 0x8000, false), (chunk, 0x8000, false), (chunk, 0x8000, false)]);
    h.d.kick(TX);
    let used = h.d.wait_used(TX, 7);
    assert!(used.iter().all(|u| u.1 == 0));
    assert_eq!(h.drops(DropReason::TxBadChain), 3);
    assert_eq!(h.drops(DropReason::TxHeaderTooShort), 2);
    assert_eq!(h.drops(DropReason::TxRuntFrame), 1);
    assert_eq!(h.drops(DropReason::TxFrameTooLarge), 1);

    // A descriptor loop: 200 -> 201 -> 200.
    h.d.write_desc(TX, 200, good, 4, DESC_F_NEXT, 201);
    h.d.write_desc(TX, 201, good, 4, DESC_F_NEXT, 200);
    h.d.publish(TX, 200);
    // A next index past the ring.
    h.d.write_desc(TX, 202, good, 4, DESC_F_NEXT, 999);
    h.d.publish(TX, 202);
    // An indirect table with a length that is not a multiple of 16.
    h.d.write_desc(TX, 203, good, 17, DESC_F_INDIRECT, 0);
    h.d.publish(TX, 203);
    // An indirect table outside guest memory.
    h.d.write_desc(TX, 204, MEM_SIZE as u64, 64, DESC_F_INDIRECT, 0);
    h.d.publish(TX, 204);
    h.d.kick(TX);
    let used = h.d.wait_used(TX, 4);
    assert_eq!(used.iter().map(|u| u.0).collect::<Vec<_>>(), vec![200, 202, 203, 204]);
    assert_eq!(h.drops(DropReason::TxBadChain), 7);

    // A head index past the ring cannot be returned at all; it is counted.
    h.d.publish(TX, 4000);
    h.d.kick(TX);
    TestDriver::wait_for("bad head counted", || h.drops(DropReason::TxBadChain) == 8);

    // None of that broke the device.
    assert!(h.backend.take_sent().is_empty());
    h.d.add_chain(TX, &[(good, 6, false), (good + 6, 0, false), (good + 6, (HDR + 60 - 6) as u32, false)]);
    h.d.kick(TX);
    assert_eq!(h.wait_sent(1), vec![(VnetHdr::default(), frame(60, 1))]);
    assert_eq!(h.d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn malformed_rx_chains_are_consumed_and_counted() {
    let mut h = harness(9, Offloads::NONE);
    h.bring_up(accept_all);
    let buf = h.d.alloc(2048);
    let readable = h.d.add_chain(RX, &[(buf, 2048, false)]);
    let tiny = h.d.add_chain(RX, &[(buf, 8, true)]);
    let outside = h.d.add_chain(RX, &[(MEM_SIZE as u64 - 100, 2048, true)]);
    let mixed = h.d.add_chain(RX, &[(buf, 100, true), (buf, 100, false)]);
    h.d.write_desc(RX, 100, buf, 1024, DESC_F_WRITE | DESC_F_NEXT, 100);
    h.d.publish(RX, 100);
    let good = h.d.add_chain(RX, &[(buf, 0, true), (buf, 2048, true)]);
    h.d.kick(RX);
    h.backend.inject(VnetHdr::default(), &frame(500, 5));
    let used = h.d.wait_used(RX, 6);
    assert_eq!(
        used,
        vec![
            (u32::from(readable), 0),
            (u32::from(tiny), 0),
            (u32::from(outside), 0),
            (u32::from(mixed), 0),
            (100, 0),
            (u32::from(good), (HDR + 500) as u32)
        ]
    );
    assert_eq!(h.drops(DropReason::RxBadChain), 5);
    assert_eq!(&h.d.read_mem(buf + HDR as u64, 500), &frame(500, 5)[..]);
    assert_eq!(h.d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn corrupt_avail_index_sets_needs_reset_and_reset_recovers() {
    let mut h = harness(10, Offloads::NONE);
    h.bring_up(accept_all);
    h.d.force_avail_idx(TX, 1000);
    h.d.kick(TX);
    TestDriver::wait_for("NEEDS_RESET", || h.d.status() & status::DEVICE_NEEDS_RESET != 0);
    TestDriver::wait_for("config interrupt", || h.d.msix.fired(CONFIG_VECTOR) >= 1);
    assert_eq!(h.drops(DropReason::RingFault), 1);
    h.bring_up(accept_all);
    h.send(VnetHdr::default(), &frame(60, 2));
    assert_eq!(h.wait_sent(1).len(), 1);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut h = harness(11, Offloads::NONE);
    h.bring_up(accept_all);
    h.d.set_used_event(TX, 100);
    for i in 0..3 {
        h.send(VnetHdr::default(), &frame(60, i));
    }
    h.wait_sent(3);
    h.d.wait_used(TX, 3);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.d.msix.fired(queue_vector(TX)), 0, "used_event 100 not reached");
    // The device re-armed its avail_event where it stopped reading.
    assert_eq!(h.d.avail_event(TX), 3);
    // Ask for an interrupt at the next completion.
    h.d.set_used_event(TX, 3);
    h.send(VnetHdr::default(), &frame(60, 9));
    TestDriver::wait_for("TX interrupt", || h.d.msix.fired(queue_vector(TX)) == 1);
}

#[test]
fn link_status_follows_backend() {
    let mut h = harness(12, Offloads::NONE);
    h.bring_up(accept_all);
    let generation = h.d.common_read(reg::CONFIG_GENERATION, 1);
    h.backend.set_link_up(false);
    // Any wake-up makes the device look at the link; a TX kick is the quickest.
    h.d.kick(TX);
    TestDriver::wait_for("link down", || h.d.device_config(6, 2) == vec![0, 0]);
    TestDriver::wait_for("config interrupt", || h.d.msix.fired(CONFIG_VECTOR) == 1);
    assert_ne!(h.d.common_read(reg::CONFIG_GENERATION, 1), generation);
    h.backend.set_link_up(true);
    // Without a kick the periodic check notices within a second or so.
    TestDriver::wait_for("link up", || h.d.device_config(6, 2) == vec![1, 0]);
    TestDriver::wait_for("config interrupt", || h.d.msix.fired(CONFIG_VECTOR) == 2);
}

#[test]
fn reset_stops_the_device_and_it_restarts() {
    let mut h = harness(13, Offloads::NONE);
    for round in 0..3u8 {
        h.bring_up(accept_all);
        h.send(VnetHdr::default(), &frame(60, round));
        assert_eq!(h.wait_sent(1)[0].1, frame(60, round));
        h.post_rx(1, 2048);
        h.backend.inject(VnetHdr::default(), &frame(80, round));
        h.d.wait_used(RX, 1);
        h.d.set_status(0);
        assert_eq!(h.d.status(), 0);
        // Stopped: nothing takes frames from the backend any more.
        h.backend.inject(VnetHdr::default(), &frame(80, 0xff));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(h.backend.pending(), 1);
        // Drain it through a fresh activation next round.
        h.bring_up(accept_all);
        h.post_rx(1, 2048);
        h.d.wait_used(RX, 1);
        h.d.set_status(0);
    }
    let stats = h.counters.snapshot();
    assert_eq!((stats.tx_frames, stats.rx_frames), (3, 6));
}

#[test]
fn control_queue_commands() {
    let mut h = harness(14, ALL);
    h.bring_up(accept_all);
    assert_eq!(h.backend.rx_offloads(), ALL);
    let csum_only = GUEST_CSUM.to_le_bytes();
    assert_eq!(h.control(VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, &csum_only), VIRTIO_NET_OK as u8);
    assert_eq!(h.backend.rx_offloads(), Offloads { csum: true, ..Offloads::NONE });
    // TSO without checksum breaks the dependency rules.
    let bad = GUEST_TSO4.to_le_bytes();
    assert_eq!(h.control(VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, &bad), VIRTIO_NET_ERR as u8);
    assert_eq!(h.control(VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, &[1, 2]), VIRTIO_NET_ERR as u8);
    let mac = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];
    assert_eq!(h.control(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, &mac), VIRTIO_NET_OK as u8);
    assert_eq!(h.d.device_config(0, 6), mac.to_vec());
    assert_eq!(h.control(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, &[0xff; 6]), VIRTIO_NET_ERR as u8);
    // Not offered, so refused.
    assert_eq!(h.control(VIRTIO_NET_CTRL_RX, 0, &[1]), VIRTIO_NET_ERR as u8);
    assert_eq!(h.drops(DropReason::CtrlRejected), 4);
    // A command with nowhere to put the ack.
    let cmd = h.d.alloc(2);
    h.d.add_chain(CTRL, &[(cmd, 2, false)]);
    h.d.kick(CTRL);
    assert_eq!(h.d.wait_used(CTRL, 1)[0].1, 0);
    assert_eq!(h.drops(DropReason::CtrlBadChain), 1);
    // A reset forgets the MAC the guest set.
    h.d.set_status(0);
    assert_eq!(h.d.device_config(0, 6), h.mac.octets().to_vec());
}

#[test]
fn intx_mode_delivers_frames() {
    let mut h = harness_with(15, Offloads::NONE, 256, false);
    h.bring_up(accept_all);
    h.send(VnetHdr::default(), &frame(60, 1));
    h.wait_sent(1);
    TestDriver::wait_for("INTx asserted", || h.d.intx.asserted());
    assert_eq!(h.d.read(layout::ISR_OFFSET, 1) & 1, 1);
    assert!(!h.d.intx.asserted());
}

#[test]
fn large_tx_batches_all_arrive() {
    let mut h = harness_with(16, Offloads::NONE, 1024, true);
    h.bring_up(accept_all);
    let base = h.d.alloc(700 * (HDR + 64));
    for i in 0..700u64 {
        let addr = base + i * (HDR + 64) as u64;
        h.d.write_mem(addr, &VnetHdr::default().to_bytes());
        h.d.write_mem(addr + HDR as u64, &frame(64, i as u8));
        h.d.add_chain(TX, &[(addr, (HDR + 64) as u32, false)]);
    }
    h.d.kick(TX);
    let sent = h.wait_sent(700);
    assert!(sent.iter().enumerate().all(|(i, (_, f))| *f == frame(64, i as u8)));
    assert_eq!(h.d.wait_used(TX, 700).len(), 700);
}

#[test]
fn shutdown_stops_the_device_thread() {
    let mut h = harness(0x78, Offloads::NONE);
    h.bring_up(accept_all);
    // The thread names itself once it runs, and leaves /proc shortly after it is joined.
    TestDriver::wait_for("device thread", || thread_cpu_ticks("vnet-001078").is_some());
    h.d.dev.shutdown();
    TestDriver::wait_for("device thread gone", || thread_cpu_ticks("vnet-001078").is_none());
    assert!(h.d.dev.stats().starts_with("virtio-net 02:54:00:00:10:78: tx 0 frames"));
    // Dropping a running device stops its thread too.
    h.bring_up(accept_all);
    TestDriver::wait_for("device thread", || thread_cpu_ticks("vnet-001078").is_some());
    drop(h);
    TestDriver::wait_for("device thread gone", || thread_cpu_ticks("vnet-001078").is_none());
}

#[test]
fn frames_larger_than_a_backend_frame_are_dropped_not_truncated() {
    let mut h = harness(17, ALL);
    h.bring_up(accept_all);
    let addr = h.d.alloc(HDR + MAX_FRAME_LEN + 1);
    h.d.write_mem(addr, &VnetHdr::default().to_bytes());
    h.d.add_chain(TX, &[(addr, (HDR + MAX_FRAME_LEN + 1) as u32, false)]);
    h.d.kick(TX);
    h.d.wait_used(TX, 1);
    assert_eq!(h.drops(DropReason::TxFrameTooLarge), 1);
    // Exactly the limit passes.
    h.d.add_chain(TX, &[(addr, (HDR + MAX_FRAME_LEN) as u32, false)]);
    h.d.kick(TX);
    assert_eq!(h.wait_sent(1)[0].1.len(), MAX_FRAME_LEN);
}
