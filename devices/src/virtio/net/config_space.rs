//! The virtio-net device configuration space (`struct virtio_net_config`), shared
//! between the transport's vCPU-side reads and the device thread, which updates the
//! link status and, through the control queue, the MAC.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP;

/// mac[6], status, max_virtqueue_pairs, mtu: the fields up to the ones we offer.
pub const CONFIG_LEN: usize = 12;

pub struct NetConfigSpace {
    default_mac: [u8; 6],
    mac: Mutex<[u8; 6]>,
    link_up: AtomicBool,
    max_virtqueue_pairs: u16,
    mtu: u16,
}

impl NetConfigSpace {
    pub fn new(mac: [u8; 6], mtu: u16, max_virtqueue_pairs: u16, link_up: bool) -> Self {
        NetConfigSpace {
            default_mac: mac,
            mac: Mutex::new(mac),
            link_up: AtomicBool::new(link_up),
            max_virtqueue_pairs,
            mtu,
        }
    }

    pub fn mac(&self) -> [u8; 6] {
        *self.mac.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_mac(&self, mac: [u8; 6]) {
        *self.mac.lock().unwrap_or_else(|p| p.into_inner()) = mac;
    }

    /// A device reset forgets a MAC the driver set through the control queue.
    pub fn restore_default_mac(&self) {
        self.set_mac(self.default_mac);
    }

    pub fn link_up(&self) -> bool {
        self.link_up.load(Ordering::SeqCst)
    }

    /// Records the link state; returns true when it changed.
    pub fn set_link_up(&self, up: bool) -> bool {
        self.link_up.swap(up, Ordering::SeqCst) != up
    }

    fn bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..6].copy_from_slice(&self.mac());
        let status = if self.link_up() { VIRTIO_NET_S_LINK_UP as u16 } else { 0 };
        b[6..8].copy_from_slice(&status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| bytes.get(o).copied())
                .unwrap_or(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_virtio_net_config() {
        let cs = NetConfigSpace::new([2, 0, 0, 0, 0, 1], 9000, 1, true);
        let mut all = [0u8; 16];
        cs.read(0, &mut all);
        assert_eq!(&all[..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(u16::from_le_bytes([all[6], all[7]]), 1);
        assert_eq!(u16::from_le_bytes([all[8], all[9]]), 1);
        assert_eq!(u16::from_le_bytes([all[10], all[11]]), 9000);
        assert_eq!(&all[12..], &[0; 4]);
        assert!(cs.set_link_up(false));
        assert!(!cs.set_link_up(false));
        let mut status = [0u8; 2];
        cs.read(6, &mut status);
        assert_eq!(status, [0, 0]);
        cs.read(u64::MAX, &mut status);
        assert_eq!(status, [0, 0]);
        cs.set_mac([2, 9, 9, 9, 9, 9]);
        cs.restore_default_mac();
        assert_eq!(cs.mac(), [2, 0, 0, 0, 0, 1]);
    }
}
