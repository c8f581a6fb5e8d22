//! virtio-net feature bits: what to offer for a backend's offloads, which combinations a
//! driver may accept, and how negotiated bits map onto the backend's `Offloads`.

use tapir_net::backend::{Offloads, VnetHdr};
use virtio_bindings::virtio_net::*;

pub const fn bit(feature: u32) -> u64 {
    1u64 << feature
}

pub const CSUM: u64 = bit(VIRTIO_NET_F_CSUM);
pub const GUEST_CSUM: u64 = bit(VIRTIO_NET_F_GUEST_CSUM);
pub const CTRL_GUEST_OFFLOADS: u64 = bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS);
pub const MTU: u64 = bit(VIRTIO_NET_F_MTU);
pub const MAC: u64 = bit(VIRTIO_NET_F_MAC);
pub const GUEST_TSO4: u64 = bit(VIRTIO_NET_F_GUEST_TSO4);
pub const GUEST_TSO6: u64 = bit(VIRTIO_NET_F_GUEST_TSO6);
pub const GUEST_ECN: u64 = bit(VIRTIO_NET_F_GUEST_ECN);
pub const GUEST_UFO: u64 = bit(VIRTIO_NET_F_GUEST_UFO);
pub const HOST_TSO4: u64 = bit(VIRTIO_NET_F_HOST_TSO4);
pub const HOST_TSO6: u64 = bit(VIRTIO_NET_F_HOST_TSO6);
pub const HOST_ECN: u64 = bit(VIRTIO_NET_F_HOST_ECN);
pub const HOST_UFO: u64 = bit(VIRTIO_NET_F_HOST_UFO);
pub const MRG_RXBUF: u64 = bit(VIRTIO_NET_F_MRG_RXBUF);
pub const STATUS: u64 = bit(VIRTIO_NET_F_STATUS);
pub const CTRL_VQ: u64 = bit(VIRTIO_NET_F_CTRL_VQ);
pub const CTRL_MAC_ADDR: u64 = bit(VIRTIO_NET_F_CTRL_MAC_ADDR);

/// The receive-side offload bits, which are also the bit numbers the control queue's
/// GUEST_OFFLOADS_SET command uses.
pub const GUEST_OFFLOAD_BITS: u64 = GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN | GUEST_UFO;

/// Features offered for a backend with these offloads. Each offload is offered in both
/// directions only if the backend has it, and only with the checksum offload it depends on.
pub fn offered(offloads: Offloads, mtu: bool) -> u64 {
    let mut f = MAC | STATUS | MRG_RXBUF | CTRL_VQ | CTRL_MAC_ADDR;
    if mtu {
        f |= MTU;
    }
    if offloads.csum {
        f |= CSUM | GUEST_CSUM;
        if offloads.tso4 {
            f |= HOST_TSO4 | GUEST_TSO4;
        }
        if offloads.tso6 {
            f |= HOST_TSO6 | GUEST_TSO6;
        }
        if offloads.tso_ecn && (offloads.tso4 || offloads.tso6) {
            f |= HOST_ECN | GUEST_ECN;
        }
        if offloads.ufo {
            f |= HOST_UFO | GUEST_UFO;
        }
        f |= CTRL_GUEST_OFFLOADS;
    }
    f
}

/// The dependency rules of virtio 1.x 5.1.3.1 for the bits we offer.
pub fn validate(features: u64) -> Result<(), String> {
    let has = |b: u64| features & b == b;
    let any = |b: u64| features & b != 0;
    let rules: [(u64, bool, &str); 6] = [
        (GUEST_TSO4 | GUEST_TSO6 | GUEST_UFO, has(GUEST_CSUM), "GUEST_TSO4/TSO6/UFO need GUEST_CSUM"),
        (GUEST_ECN, any(GUEST_TSO4 | GUEST_TSO6), "GUEST_ECN needs GUEST_TSO4 or GUEST_TSO6"),
        (HOST_TSO4 | HOST_TSO6 | HOST_UFO, has(CSUM), "HOST_TSO4/TSO6/UFO need CSUM"),
        (HOST_ECN, any(HOST_TSO4 | HOST_TSO6), "HOST_ECN needs HOST_TSO4 or HOST_TSO6"),
        (CTRL_GUEST_OFFLOADS, has(CTRL_VQ), "CTRL_GUEST_OFFLOADS needs CTRL_VQ"),
        (CTRL_MAC_ADDR, has(CTRL_VQ), "CTRL_MAC_ADDR needs CTRL_VQ"),
    ];
    for (bits, satisfied, rule) in rules {
        if any(bits) && !satisfied {
            return Err(format!("feature set {features:#x} breaks a dependency: {rule}"));
        }
    }
    Ok(())
}

/// Offloads the guest accepts on receive (GUEST_* bits, or a GUEST_OFFLOADS_SET mask).
pub fn guest_offloads(bits: u64) -> Offloads {
    Offloads {
        csum: bits & GUEST_CSUM != 0,
        tso4: bits & GUEST_TSO4 != 0,
        tso6: bits & GUEST_TSO6 != 0,
        tso_ecn: bits & GUEST_ECN != 0,
        ufo: bits & GUEST_UFO != 0,
    }
}

/// Offloads the guest may ask for on transmit (CSUM and HOST_* bits).
pub fn host_offloads(features: u64) -> Offloads {
    Offloads {
        csum: features & CSUM != 0,
        tso4: features & HOST_TSO4 != 0,
        tso6: features & HOST_TSO6 != 0,
        tso_ecn: features & HOST_ECN != 0,
        ufo: features & HOST_UFO != 0,
    }
}

/// Whether a header asks only for offloads in `allowed`.
pub fn hdr_within(hdr: &VnetHdr, allowed: Offloads) -> bool {
    if hdr.flags & VnetHdr::FLAG_NEEDS_CSUM != 0 && !allowed.csum {
        return false;
    }
    let gso_ok = match hdr.gso_type & !VnetHdr::GSO_ECN {
        VnetHdr::GSO_NONE => hdr.gso_type & VnetHdr::GSO_ECN == 0,
        VnetHdr::GSO_TCPV4 => allowed.tso4,
        VnetHdr::GSO_TCPV6 => allowed.tso6,
        VnetHdr::GSO_UDP => allowed.ufo,
        _ => false,
    };
    gso_ok && (hdr.gso_type & VnetHdr::GSO_ECN == 0 || allowed.tso_ecn)
}

/// Whether a header's offsets fit its frame, so a software backend asked to finish a
/// checksum or segment a frame is never pointed outside it.
pub fn hdr_fits(hdr: &VnetHdr, frame_len: usize) -> bool {
    let csum_ok = hdr.flags & VnetHdr::FLAG_NEEDS_CSUM == 0
        || usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2 <= frame_len;
    let gso_ok = hdr.gso_type & !VnetHdr::GSO_ECN == VnetHdr::GSO_NONE || hdr.gso_size > 0;
    csum_ok && gso_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Offloads = Offloads { csum: true, tso4: true, tso6: true, tso_ecn: true, ufo: true };

    #[test]
    fn plain_backend_gets_no_offload_bits() {
        let f = offered(Offloads::NONE, false);
        assert_eq!(f & (CSUM | GUEST_CSUM | HOST_TSO4 | GUEST_TSO4 | HOST_UFO | CTRL_GUEST_OFFLOADS | MTU), 0);
        assert_eq!(f & (MAC | STATUS | MRG_RXBUF | CTRL_VQ), MAC | STATUS | MRG_RXBUF | CTRL_VQ);
    }

    #[test]
    fn offloads_need_checksum_support() {
        let f = offered(Offloads { csum: false, ..ALL }, true);
        assert_eq!(f & (HOST_TSO4 | GUEST_TSO4 | HOST_ECN | HOST_UFO), 0);
        assert_ne!(f & MTU, 0);
        let f = offered(Offloads { ufo: false, tso6: false, ..ALL }, false);
        assert_eq!(f & (HOST_UFO | GUEST_UFO | HOST_TSO6), 0);
        assert_eq!(f & (CSUM | HOST_TSO4 | GUEST_TSO4 | HOST_ECN), CSUM | HOST_TSO4 | GUEST_TSO4 | HOST_ECN);
    }

    #[test]
    fn dependency_rules() {
        assert!(validate(offered(ALL, true)).is_ok());
        assert!(validate(GUEST_TSO4).is_err());
        assert!(validate(GUEST_TSO4 | GUEST_CSUM).is_ok());
        assert!(validate(HOST_ECN | CSUM).is_err());
        assert!(validate(HOST_UFO).is_err());
        assert!(validate(CTRL_MAC_ADDR).is_err());
        assert!(validate(0).is_ok());
    }

    #[test]
    fn header_checks() {
        let tso4 = VnetHdr { flags: 1, gso_type: VnetHdr::GSO_TCPV4, ..Default::default() };
        assert!(hdr_within(&tso4, ALL));
        assert!(!hdr_within(&tso4, Offloads { tso4: false, ..ALL }));
        assert!(!hdr_within(&tso4, Offloads::NONE));
        let ecn = VnetHdr { gso_type: VnetHdr::GSO_TCPV6 | VnetHdr::GSO_ECN, ..tso4 };
        assert!(!hdr_within(&ecn, Offloads { tso_ecn: false, ..ALL }));
        assert!(hdr_within(&ecn, ALL));
        let unknown = VnetHdr { gso_type: 5, ..Default::default() };
        assert!(!hdr_within(&unknown, ALL));
        let ecn_alone = VnetHdr { gso_type: VnetHdr::GSO_ECN, ..Default::default() };
        assert!(!hdr_within(&ecn_alone, ALL));
        assert!(hdr_within(&VnetHdr { flags: VnetHdr::FLAG_DATA_VALID, ..Default::default() }, Offloads::NONE));
        assert_eq!(guest_offloads(GUEST_CSUM | GUEST_TSO6), Offloads { csum: true, tso6: true, ..Offloads::NONE });
        let csum = VnetHdr { flags: 1, csum_start: 34, csum_offset: 16, ..Default::default() };
        assert!(hdr_fits(&csum, 52));
        assert!(!hdr_fits(&csum, 51));
        assert!(!hdr_fits(&VnetHdr { csum_start: u16::MAX, csum_offset: u16::MAX, ..csum }, 100));
        assert!(!hdr_fits(&VnetHdr { gso_type: VnetHdr::GSO_TCPV4, gso_size: 0, ..csum }, 100));
        assert_eq!(host_offloads(CSUM | HOST_UFO), Offloads { csum: true, ufo: true, ..Offloads::NONE });
    }
}
