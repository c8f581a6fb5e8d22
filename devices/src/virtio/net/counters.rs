//! virtio-net counters: frames and bytes per direction, and every drop by its reason.
//! Updated by the device thread, read by anyone (`VirtioNet::counters`).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tapir_net::backend::BackendCounters;

macro_rules! drop_reasons {
    ($($variant:ident => $name:literal,)*) => {
        /// Why a frame, a buffer or a command went nowhere.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum DropReason { $($variant,)* }

        impl DropReason {
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];
            pub const COUNT: usize = Self::ALL.len();

            pub fn name(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)* }
            }
        }
    };
}

drop_reasons! {
    TxBadChain => "tx_bad_chain",
    TxHeaderTooShort => "tx_header_too_short",
    TxFrameTooLarge => "tx_frame_too_large",
    TxRuntFrame => "tx_runt_frame",
    TxOffloadNotNegotiated => "tx_offload_not_negotiated",
    TxBadOffloadHeader => "tx_bad_offload_header",
    TxGuestMemory => "tx_guest_memory",
    TxBackendBusy => "tx_backend_busy",
    TxBackendDropped => "tx_backend_dropped",
    TxBackendError => "tx_backend_error",
    RxBadChain => "rx_bad_chain",
    RxBufferTooSmall => "rx_buffer_too_small",
    RxFrameExceedsRing => "rx_frame_exceeds_ring",
    RxOffloadNotNegotiated => "rx_offload_not_negotiated",
    RxGuestMemory => "rx_guest_memory",
    RxBackendError => "rx_backend_error",
    RxDiscardedOnReset => "rx_discarded_on_reset",
    CtrlBadChain => "ctrl_bad_chain",
    CtrlRejected => "ctrl_rejected",
    RingFault => "ring_fault",
}

#[derive(Default)]
pub struct NetCounters {
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    drops: [AtomicU64; DropReason::COUNT],
    /// The backend's own counters as of the device thread's last look (the backend lives
    /// on that thread while the device runs).
    backend: Mutex<Option<BackendCounters>>,
}

/// A point-in-time copy of the counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Every reason, including those still at zero.
    pub drops: Vec<(&'static str, u64)>,
    pub backend: Option<BackendCounters>,
}

impl NetStats {
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops.iter().find(|(n, _)| *n == reason.name()).map_or(0, |(_, c)| *c)
    }
}

impl fmt::Display for NetStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tx {} frames/{} bytes, rx {} frames/{} bytes",
            self.tx_frames, self.tx_bytes, self.rx_frames, self.rx_bytes
        )?;
        for (name, n) in self.drops.iter().filter(|(_, n)| *n > 0) {
            write!(f, ", drop[{name}]={n}")?;
        }
        if let Some(backend) = &self.backend {
            write!(f, "; backend: {backend}")?;
        }
        Ok(())
    }
}

impl NetCounters {
    pub fn snapshot(&self) -> NetStats {
        NetStats {
            tx_frames: self.tx_frames.load(Ordering::Relaxed),
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
            rx_frames: self.rx_frames.load(Ordering::Relaxed),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
            drops: DropReason::ALL.iter().map(|&r| (r.name(), self.drops(r))).collect(),
            backend: self.backend.lock().map(|b| b.clone()).unwrap_or_else(|p| p.into_inner().clone()),
        }
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops.get(reason as usize).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counts one drop and returns the new total for that reason.
    pub(crate) fn count_drop(&self, reason: DropReason) -> u64 {
        self.drops.get(reason as usize).map_or(0, |c| c.fetch_add(1, Ordering::Relaxed) + 1)
    }

    pub(crate) fn count_tx(&self, bytes: usize) {
        self.tx_frames.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn count_rx(&self, bytes: usize) {
        self.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn store_backend(&self, counters: BackendCounters) {
        let mut slot = self.backend.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(counters);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_a_slot() {
        let counters = NetCounters::default();
        for &reason in DropReason::ALL {
            assert_eq!(counters.count_drop(reason), 1);
        }
        assert_eq!(counters.snapshot().drops.len(), DropReason::ALL.len());
        assert!(counters.snapshot().drops.iter().all(|(_, n)| *n == 1));
    }

    #[test]
    fn summary_lists_only_nonzero_drops() {
        let counters = NetCounters::default();
        counters.count_tx(60);
        counters.count_drop(DropReason::TxRuntFrame);
        let line = counters.snapshot().to_string();
        assert_eq!(line, "tx 1 frames/60 bytes, rx 0 frames/0 bytes, drop[tx_runt_frame]=1");
    }
}
