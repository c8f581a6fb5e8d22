//! MAC addresses: parsing, validation, and the stable per-VM derivation that keeps two
//! VMs on one bridge from sharing QEMU's fixed 52:54:00:12:34:56.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MacError {
    #[error("'{0}' is not a MAC address (expected six hex octets like 52:54:00:ab:cd:ef)")]
    Syntax(String),
    #[error(
        "{0} is a multicast address; a NIC needs a unicast MAC (clear bit 0 of the first octet)"
    )]
    Multicast(MacAddr),
    #[error("{0} is the all-zero address")]
    Zero(MacAddr),
}

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    pub fn is_broadcast(&self) -> bool {
        self.0 == [0xff; 6]
    }

    pub fn is_locally_administered(&self) -> bool {
        self.0[0] & 2 == 2
    }

    /// Accepts the address as a NIC's own: unicast and non-zero.
    pub fn validate_for_nic(self) -> Result<MacAddr, MacError> {
        if self.0 == [0; 6] {
            Err(MacError::Zero(self))
        } else if self.is_multicast() {
            Err(MacError::Multicast(self))
        } else {
            Ok(self)
        }
    }

    /// A locally administered unicast MAC derived from the VM name and NIC index. The same
    /// pair always gives the same MAC (FNV-1a is fixed, unlike std's hasher), and
    /// different names give different MACs with overwhelming probability.
    pub fn derive(vm_name: &str, nic_index: usize) -> MacAddr {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for &b in bytes {
                hash ^= u64::from(b);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        feed(b"tapir-mac-v1\0");
        feed(vm_name.as_bytes());
        feed(&[0]);
        feed(&(nic_index as u64).to_le_bytes());
        // Fold the high half in so all 64 bits influence the 48 we keep.
        let mixed = hash ^ (hash >> 29);
        let b = mixed.to_be_bytes();
        // 0x02: locally administered, unicast.
        MacAddr([(b[2] & 0xfc) | 0x02, b[3], b[4], b[5], b[6], b[7]])
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(MacError::Syntax(s.to_string()));
        }
        let mut out = [0u8; 6];
        for (slot, part) in out.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(MacError::Syntax(s.to_string()));
            }
            *slot = u8::from_str_radix(part, 16).map_err(|_| MacError::Syntax(s.to_string()))?;
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.0, [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!("52-54-00-ab-cd-0f".parse::<MacAddr>().unwrap(), mac);
    }

    #[test]
    fn rejects_bad_syntax() {
        for bad in
            ["", "52:54:00:ab:cd", "52:54:00:ab:cd:0f:11", "5:54:00:ab:cd:0f", "zz:54:00:ab:cd:0f"]
        {
            assert!(matches!(bad.parse::<MacAddr>(), Err(MacError::Syntax(_))), "{bad}");
        }
    }

    #[test]
    fn rejects_multicast_and_zero_for_nics() {
        let mcast: MacAddr = "01:00:5e:00:00:01".parse().unwrap();
        assert_eq!(mcast.validate_for_nic(), Err(MacError::Multicast(mcast)));
        assert!(MacAddr([0; 6]).validate_for_nic().is_err());
        assert!(MacAddr::BROADCAST.validate_for_nic().is_err());
    }

    #[test]
    fn derived_mac_is_stable_unicast_and_local() {
        let a = MacAddr::derive("web", 0);
        assert_eq!(a, MacAddr::derive("web", 0));
        assert!(!a.is_multicast());
        assert!(a.is_locally_administered());
        assert!(a.validate_for_nic().is_ok());
    }

    #[test]
    fn derived_macs_differ_across_names_and_indices() {
        let mut seen = std::collections::HashSet::new();
        for name in ["vm0", "vm1", "vm2", "web", "db", "a", "b"] {
            for idx in 0..4 {
                assert!(seen.insert(MacAddr::derive(name, idx)), "{name}/{idx} collided");
            }
        }
        assert_ne!(MacAddr::derive("vm0", 0), "52:54:00:12:34:56".parse().unwrap());
    }
}
