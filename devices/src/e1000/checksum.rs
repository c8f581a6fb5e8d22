//! Internet checksums and the little frame parsing the NIC needs to offload them.
//! Every offset here comes from a guest or the network, so every access is checked.

/// Adds `data` to a running ones-complement sum as big-endian 16-bit words. An odd
/// trailing byte counts as the high half of a word, as RFC 1071 requires.
pub fn add(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        // Two 32-bit halves keep the accumulator far from overflow.
        sum += v >> 32;
        sum += v & 0xffff_ffff;
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for c in &mut rest {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = rest.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a running sum to 16 bits (not complemented).
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum to store: the complement of the folded sum, with zero sent as 0xffff
/// (a UDP checksum of zero would mean "none"; for TCP both encodings are equal).
pub fn finish(sum: u64) -> u16 {
    match !fold(sum) {
        0 => 0xffff,
        c => c,
    }
}

pub fn read_u16(frame: &[u8], at: usize) -> Option<u16> {
    let b = frame.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

pub fn write_u16(frame: &mut [u8], at: usize, value: u16) -> bool {
    match at.checked_add(2).and_then(|end| frame.get_mut(at..end)) {
        Some(b) => {
            b.copy_from_slice(&value.to_be_bytes());
            true
        }
        None => false,
    }
}

pub fn read_u32(frame: &[u8], at: usize) -> Option<u32> {
    let b = frame.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

pub fn write_u32(frame: &mut [u8], at: usize, value: u32) -> bool {
    match at.checked_add(4).and_then(|end| frame.get_mut(at..end)) {
        Some(b) => {
            b.copy_from_slice(&value.to_be_bytes());
            true
        }
        None => false,
    }
}

/// The e1000 offload primitive: sums `frame[start..=end]` (to the frame's end when
/// `end` is `None`) including whatever the checksum field holds as a seed, adds
/// `extra`, and stores the result at `store_at`. `false` when an offset is out of range.
pub fn insert(
    frame: &mut [u8],
    start: usize,
    end: Option<usize>,
    store_at: usize,
    extra: u64,
) -> bool {
    let stop = match end {
        Some(e) => match e.checked_add(1) {
            Some(s) if s <= frame.len() => s,
            _ => return false,
        },
        None => frame.len(),
    };
    if start >= stop || store_at.checked_add(2).is_none_or(|e| e > frame.len()) {
        return false;
    }
    let sum = add(extra, &frame[start..stop]);
    write_u16(frame, store_at, finish(sum))
}

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Where the layers of a TCP or UDP frame start, as far as offloads care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L4Location {
    pub l3_start: usize,
    pub l4_start: usize,
    pub protocol: u8,
    pub ipv4: bool,
    /// Length of the L4 header plus payload, from the IP length field.
    pub l4_len: usize,
}

/// Finds the IP header after an Ethernet header (with at most one VLAN tag).
pub fn l3_start(frame: &[u8], vlan_ethertype: u16) -> Option<(usize, u16)> {
    let mut ethertype = read_u16(frame, 12)?;
    let mut at = 14;
    if ethertype == vlan_ethertype || ethertype == ETHERTYPE_VLAN {
        ethertype = read_u16(frame, 16)?;
        at = 18;
    }
    Some((at, ethertype))
}

/// IPv4 header checksum verdict: `None` when the frame carries no IPv4 header.
pub fn ipv4_header_ok(frame: &[u8], l3: usize) -> Option<bool> {
    let first = *frame.get(l3)?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0xf) * 4;
    let header = frame.get(l3..l3.checked_add(ihl)?)?;
    if ihl < 20 {
        return Some(false);
    }
    Some(fold(add(0, header)) == 0xffff)
}

/// Locates an unfragmented TCP or UDP payload over IPv4 or IPv6 (without extension
/// headers). Anything else is `None`: the NIC then makes no L4 checksum claim.
pub fn locate_l4(frame: &[u8], vlan_ethertype: u16) -> Option<L4Location> {
    let (l3, ethertype) = l3_start(frame, vlan_ethertype)?;
    match ethertype {
        ETHERTYPE_IPV4 => {
            let first = *frame.get(l3)?;
            let ihl = usize::from(first & 0xf) * 4;
            if first >> 4 != 4 || ihl < 20 {
                return None;
            }
            let total = usize::from(read_u16(frame, l3 + 2)?);
            let fragment = read_u16(frame, l3 + 6)? & 0x3fff;
            let protocol = *frame.get(l3 + 9)?;
            if fragment != 0 || total < ihl || l3 + total > frame.len() {
                return None;
            }
            Some(L4Location {
                l3_start: l3,
                l4_start: l3 + ihl,
                protocol,
                ipv4: true,
                l4_len: total - ihl,
            })
        }
        ETHERTYPE_IPV6 => {
            if *frame.get(l3)? >> 4 != 6 {
                return None;
            }
            let payload = usize::from(read_u16(frame, l3 + 4)?);
            let protocol = *frame.get(l3 + 6)?;
            if l3 + 40 + payload > frame.len() {
                return None;
            }
            Some(L4Location {
                l3_start: l3,
                l4_start: l3 + 40,
                protocol,
                ipv4: false,
                l4_len: payload,
            })
        }
        _ => None,
    }
    .filter(|l| l.protocol == PROTO_TCP || l.protocol == PROTO_UDP)
}

/// The pseudo-header sum for an L4 segment of `l4_len` bytes.
pub fn pseudo_header(frame: &[u8], loc: &L4Location) -> Option<u64> {
    let (src, len) = if loc.ipv4 {
        (loc.l3_start + 12, 8)
    } else {
        (loc.l3_start + 8, 32)
    };
    let addresses = frame.get(src..src + len)?;
    Some(add(u64::from(loc.protocol) + loc.l4_len as u64, addresses))
}

/// Verifies a TCP or UDP checksum. A UDP checksum of zero means "not computed" and
/// passes.
pub fn l4_ok(frame: &[u8], loc: &L4Location) -> Option<bool> {
    let segment = frame.get(loc.l4_start..loc.l4_start.checked_add(loc.l4_len)?)?;
    if loc.protocol == PROTO_UDP && loc.ipv4 && read_u16(segment, 6)? == 0 {
        return Some(true);
    }
    Some(fold(add(pseudo_header(frame, loc)?, segment)) == 0xffff)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An Ethernet + IPv4 + TCP frame with correct checksums and `payload_len` bytes.
    pub(crate) fn tcp4_frame(payload_len: usize) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + payload_len];
        f[0..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let ip_len = (20 + 20 + payload_len) as u16;
        f[14] = 0x45;
        f[16..18].copy_from_slice(&ip_len.to_be_bytes());
        f[18..20].copy_from_slice(&0x1234u16.to_be_bytes());
        f[20] = 0x40;
        f[22] = 64;
        f[23] = PROTO_TCP;
        f[26..30].copy_from_slice(&[10, 0, 2, 15]);
        f[30..34].copy_from_slice(&[10, 0, 2, 2]);
        f[34..36].copy_from_slice(&40000u16.to_be_bytes());
        f[36..38].copy_from_slice(&80u16.to_be_bytes());
        f[38..42].copy_from_slice(&1000u32.to_be_bytes());
        f[46] = 0x50;
        f[47] = 0x18;
        f[48..50].copy_from_slice(&65535u16.to_be_bytes());
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        assert!(insert(&mut f, 14, Some(33), 24, 0));
        let loc = locate_l4(&f, ETHERTYPE_VLAN).unwrap();
        let seed = pseudo_header(&f, &loc).unwrap();
        assert!(insert(&mut f, 34, None, 50, seed));
        f
    }

    #[test]
    fn sums_match_rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(add(0, &data)), 0xddf2);
        assert_eq!(fold(add(0, &[0xab])), 0xab00);
        assert_eq!(finish(0xffff), 0xffff);
    }

    #[test]
    fn built_frame_verifies_and_corruption_is_detected() {
        let mut f = tcp4_frame(101);
        assert_eq!(ipv4_header_ok(&f, 14), Some(true));
        let loc = locate_l4(&f, ETHERTYPE_VLAN).unwrap();
        assert_eq!(loc.l4_len, 121);
        assert_eq!(l4_ok(&f, &loc), Some(true));
        f[60] ^= 0x40;
        assert_eq!(l4_ok(&f, &loc), Some(false));
        f[15] ^= 1;
        assert_eq!(ipv4_header_ok(&f, 14), Some(false));
    }

    #[test]
    fn parsing_rejects_truncated_and_lying_headers() {
        let f = tcp4_frame(10);
        for cut in 0..f.len() {
            let _ = locate_l4(&f[..cut], ETHERTYPE_VLAN);
            let _ = ipv4_header_ok(&f[..cut], 14);
        }
        let mut lying = f.clone();
        lying[16..18].copy_from_slice(&9000u16.to_be_bytes());
        assert_eq!(locate_l4(&lying, ETHERTYPE_VLAN), None);
        let mut fragment = f.clone();
        fragment[20] = 0x20;
        assert_eq!(locate_l4(&fragment, ETHERTYPE_VLAN), None);
        let mut short_ihl = f;
        short_ihl[14] = 0x41;
        assert_eq!(locate_l4(&short_ihl, ETHERTYPE_VLAN), None);
    }

    #[test]
    fn insert_rejects_out_of_range_offsets() {
        let mut f = vec![0u8; 20];
        assert!(!insert(&mut f, 0, None, 19, 0));
        assert!(!insert(&mut f, 25, None, 0, 0));
        assert!(!insert(&mut f, 0, Some(20), 0, 0));
        assert!(!insert(&mut f, 0, Some(usize::MAX), 0, 0));
        assert!(insert(&mut f, 0, Some(19), 0, 0));
    }
}
