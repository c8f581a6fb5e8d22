//! The one seam between NIC frontends (virtio-net, e1000) and backends (tap, user NAT,
//! socket). A frontend holds a `Box<dyn Backend>` and never learns which one it is.
//!
//! Every frame crosses the seam with its `virtio_net_hdr` offload metadata. Backends that
//! carry offloads natively (tap with IFF_VNET_HDR) pass it through; the others report no
//! offload support, and frontends then hand them plain, fully checksummed frames.

use std::io;
use std::os::unix::io::RawFd;

use thiserror::Error;

/// The largest frame (without virtio header) a backend may hand a frontend: a 64 KiB GSO
/// super-frame plus an Ethernet header and a VLAN tag.
pub const MAX_FRAME_LEN: usize = 65536 + 14 + 4;

/// `virtio_net_hdr_v1` as it appears on the wire between virtio-net and a vnet-hdr tap:
/// 12 bytes, little endian.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VnetHdr {
    pub const LEN: usize = 12;

    /// The L4 checksum is partial: fill it in from `csum_start`, store at `+csum_offset`.
    pub const FLAG_NEEDS_CSUM: u8 = 1;
    /// The checksum has been verified (or the frame never left the host).
    pub const FLAG_DATA_VALID: u8 = 2;

    pub const GSO_NONE: u8 = 0;
    pub const GSO_TCPV4: u8 = 1;
    pub const GSO_UDP: u8 = 3;
    pub const GSO_TCPV6: u8 = 4;
    pub const GSO_ECN: u8 = 0x80;

    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Parses the first 12 bytes of `b`; `None` when `b` is shorter than a header.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < Self::LEN {
            return None;
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        })
    }

    /// True when the frame needs no offload work at all.
    pub fn is_plain(&self) -> bool {
        self.flags & Self::FLAG_NEEDS_CSUM == 0 && self.gso_type & !Self::GSO_ECN == Self::GSO_NONE
    }
}

/// Offloads, in the vocabulary of TUNSETOFFLOAD and the virtio-net feature bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Partial checksums (`FLAG_NEEDS_CSUM`) are accepted.
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub tso_ecn: bool,
    pub ufo: bool,
}

impl Offloads {
    pub const NONE: Offloads =
        Offloads { csum: false, tso4: false, tso6: false, tso_ecn: false, ufo: false };

    /// The intersection of two offload sets.
    pub fn and(self, other: Offloads) -> Offloads {
        Offloads {
            csum: self.csum && other.csum,
            tso4: self.tso4 && other.tso4,
            tso6: self.tso6 && other.tso6,
            tso_ecn: self.tso_ecn && other.tso_ecn,
            ufo: self.ufo && other.ufo,
        }
    }
}

#[derive(Debug, Error)]
pub enum BackendError {
    /// The backend cannot take or give a frame right now; poll its fd and retry.
    #[error("backend would block")]
    WouldBlock,
    /// The frame was not accepted (malformed, too large, link down); the backend counted it.
    #[error("frame dropped: {0}")]
    Dropped(&'static str),
    /// The host side is gone (tap deleted, peer closed for good).
    #[error("backend I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Per-backend counters, reported at exit and through the VMM's stats channel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendCounters {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Drops with the reason that caused them, e.g. ("ip_fragment", 3).
    pub drops: Vec<(&'static str, u64)>,
    /// Free-form extra gauges, e.g. ("tcp_flows_open", 2).
    pub gauges: Vec<(&'static str, u64)>,
}

impl std::fmt::Display for BackendCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tx {} frames/{} bytes, rx {} frames/{} bytes",
            self.tx_frames, self.tx_bytes, self.rx_frames, self.rx_bytes
        )?;
        for (name, n) in self.drops.iter().filter(|(_, n)| *n > 0) {
            write!(f, ", drop[{name}]={n}")?;
        }
        for (name, n) in &self.gauges {
            write!(f, ", {name}={n}")?;
        }
        Ok(())
    }
}

/// A network backend as seen by a NIC frontend.
///
/// Contract:
/// - `poll_fd` is level-triggered: while it polls readable, the frontend calls `recv`
///   until it returns `Ok(None)`. Backends with internal work (NAT timers, socket
///   reconnects) do that work inside `recv`, so `Ok(None)` after a wake-up is normal.
/// - After every wake-up the frontend re-reads `link_up` to notice link changes.
/// - `send` never blocks. `WouldBlock` means the frontend may retry later (or drop and
///   count); `Dropped` means the backend already counted the frame as lost.
/// - Frames handed to `send` carry offloads only out of `supported_offloads()`. Frames
///   from `recv` carry offloads only out of what was last given to `set_rx_offloads`.
pub trait Backend: Send {
    /// Short name for logs: "tap", "user", "stream", "dgram".
    fn kind(&self) -> &'static str;

    /// Polls readable when `recv` may have a frame or internal work to do.
    fn poll_fd(&self) -> RawFd;

    /// Offloads this backend can accept in `send`.
    fn supported_offloads(&self) -> Offloads;

    /// Offloads the guest accepts in received frames (a subset of `supported_offloads`).
    fn set_rx_offloads(&mut self, offloads: Offloads) -> io::Result<()>;

    /// Sends one Ethernet frame (without any virtio header) with its offload metadata.
    fn send(&mut self, hdr: &VnetHdr, frame: &[u8]) -> Result<(), BackendError>;

    /// Receives one frame into `buf` (which should hold `MAX_FRAME_LEN` bytes). Returns
    /// its offload metadata and length, or `None` when nothing is ready.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(VnetHdr, usize)>, BackendError>;

    /// Whether the link is up (a socket backend without a peer reports down).
    fn link_up(&self) -> bool {
        true
    }

    fn counters(&self) -> BackendCounters;
}

/// An in-memory backend for device tests: frames sent by the frontend are recorded, and
/// frames queued with `inject` are handed to the frontend. Its poll fd is an eventfd that
/// is readable while injected frames are pending.
pub mod loopback {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Shared {
        sent: Vec<(VnetHdr, Vec<u8>)>,
        pending: VecDeque<(VnetHdr, Vec<u8>)>,
        rx_offloads: Offloads,
        link_up: bool,
    }

    /// The test's handle on a `LoopbackBackend` that a device owns.
    #[derive(Clone)]
    pub struct LoopbackHandle {
        shared: Arc<Mutex<Shared>>,
        event_fd: RawFd,
    }

    pub struct LoopbackBackend {
        shared: Arc<Mutex<Shared>>,
        event_fd: RawFd,
        offloads: Offloads,
        counters: BackendCounters,
    }

    fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
        shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Creates a backend and the handle a test drives it with.
    pub fn pair(offloads: Offloads) -> io::Result<(LoopbackBackend, LoopbackHandle)> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let shared = Arc::new(Mutex::new(Shared { link_up: true, ..Default::default() }));
        Ok((
            LoopbackBackend {
                shared: shared.clone(),
                event_fd: fd,
                offloads,
                counters: BackendCounters::default(),
            },
            LoopbackHandle { shared, event_fd: fd },
        ))
    }

    impl LoopbackHandle {
        /// Queues a frame for the frontend to receive.
        pub fn inject(&self, hdr: VnetHdr, frame: &[u8]) {
            lock(&self.shared).pending.push_back((hdr, frame.to_vec()));
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own.
            unsafe { libc::write(self.event_fd, &one as *const u64 as *const libc::c_void, 8) };
        }
        /// Takes every frame the frontend has sent so far.
        pub fn take_sent(&self) -> Vec<(VnetHdr, Vec<u8>)> {
            std::mem::take(&mut lock(&self.shared).sent)
        }
        pub fn pending(&self) -> usize {
            lock(&self.shared).pending.len()
        }
        pub fn rx_offloads(&self) -> Offloads {
            lock(&self.shared).rx_offloads
        }
        pub fn set_link_up(&self, up: bool) {
            lock(&self.shared).link_up = up;
        }
    }

    impl Backend for LoopbackBackend {
        fn kind(&self) -> &'static str {
            "loopback"
        }
        fn poll_fd(&self) -> RawFd {
            self.event_fd
        }
        fn supported_offloads(&self) -> Offloads {
            self.offloads
        }
        fn set_rx_offloads(&mut self, offloads: Offloads) -> io::Result<()> {
            lock(&self.shared).rx_offloads = offloads;
            Ok(())
        }
        fn send(&mut self, hdr: &VnetHdr, frame: &[u8]) -> Result<(), BackendError> {
            self.counters.tx_frames += 1;
            self.counters.tx_bytes += frame.len() as u64;
            lock(&self.shared).sent.push((*hdr, frame.to_vec()));
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(VnetHdr, usize)>, BackendError> {
            let mut shared = lock(&self.shared);
            let Some((hdr, frame)) = shared.pending.pop_front() else {
                let mut count: u64 = 0;
                // SAFETY: reads 8 bytes into a valid u64 from an eventfd we own.
                unsafe {
                    libc::read(self.event_fd, &mut count as *mut u64 as *mut libc::c_void, 8)
                };
                return Ok(None);
            };
            if frame.len() > buf.len() {
                return Err(BackendError::Dropped("frame larger than receive buffer"));
            }
            buf[..frame.len()].copy_from_slice(&frame);
            self.counters.rx_frames += 1;
            self.counters.rx_bytes += frame.len() as u64;
            Ok(Some((hdr, frame.len())))
        }
        fn link_up(&self) -> bool {
            lock(&self.shared).link_up
        }
        fn counters(&self) -> BackendCounters {
            self.counters.clone()
        }
    }

    impl Drop for LoopbackBackend {
        fn drop(&mut self) {
            // SAFETY: the fd is ours and closed once; the handle only writes to it and
            // ignores errors after this point.
            unsafe { libc::close(self.event_fd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vnet_hdr_round_trips_little_endian() {
        let hdr = VnetHdr {
            flags: VnetHdr::FLAG_NEEDS_CSUM,
            gso_type: VnetHdr::GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let bytes = hdr.to_bytes();
        assert_eq!(&bytes[4..6], &1448u16.to_le_bytes());
        assert_eq!(VnetHdr::from_bytes(&bytes), Some(hdr));
        assert!(!hdr.is_plain());
        assert!(VnetHdr::default().is_plain());
    }

    #[test]
    fn vnet_hdr_rejects_short_input() {
        assert_eq!(VnetHdr::from_bytes(&[0u8; 11]), None);
    }

    #[test]
    fn loopback_moves_frames_both_ways() {
        let (mut backend, handle) = loopback::pair(Offloads::NONE).unwrap();
        backend.send(&VnetHdr::default(), b"abc").unwrap();
        assert_eq!(handle.take_sent(), vec![(VnetHdr::default(), b"abc".to_vec())]);
        handle.inject(VnetHdr::default(), b"xyz!");
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let (_, len) = backend.recv(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..len], b"xyz!");
        assert!(backend.recv(&mut buf).unwrap().is_none());
        assert_eq!(backend.counters().rx_frames, 1);
    }
}
