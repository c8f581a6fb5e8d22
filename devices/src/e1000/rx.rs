//! Receive-side decisions that need no guest memory: address filtering, buffer sizes,
//! VLAN stripping, padding, the FCS, and the checksum status the descriptor reports.

use thiserror::Error;

use super::checksum::{self, read_u16};
use super::registers::*;

pub const DESCRIPTOR_LEN: u64 = 16;

pub const STA_DD: u8 = 0x01;
pub const STA_EOP: u8 = 0x02;
pub const STA_IXSM: u8 = 0x04;
pub const STA_VP: u8 = 0x08;
pub const STA_TCPCS: u8 = 0x20;
pub const STA_IPCS: u8 = 0x40;
pub const ERR_TCPE: u8 = 0x20;
pub const ERR_IPE: u8 = 0x40;
pub const ERR_RXE: u8 = 0x80;

const MIN_FRAME: usize = 60;
const FCS_LEN: usize = 4;
/// Longest frame on the wire (with FCS and one VLAN tag) without RCTL.LPE.
const MAX_NORMAL_FRAME: usize = 1522;
/// Longest frame the 82540 receives with RCTL.LPE.
pub const MAX_LONG_FRAME: usize = 16384;

/// Receive buffer size selected by RCTL.BSIZE and RCTL.BSEX.
pub fn buffer_size(rctl: u32) -> usize {
    let code = (rctl >> RCTL_BSIZE_SHIFT) & 3;
    if rctl & RCTL_BSEX == 0 {
        2048 >> code
    } else {
        // BSEX with code 0 is reserved; treat it as the largest size.
        [16384, 16384, 8192, 4096][code as usize]
    }
}

/// The multicast table index for `addr` under RCTL.MO.
pub fn mta_hash(addr: &[u8; 6], multicast_offset: u32) -> u16 {
    let (lo, hi) = (u16::from(addr[4]), u16::from(addr[5]));
    let hash = match multicast_offset & 3 {
        0 => (lo >> 4) | (hi << 4),
        1 => (lo >> 3) | (hi << 5),
        2 => (lo >> 2) | (hi << 6),
        _ => lo | (hi << 8),
    };
    hash & 0x0fff
}

/// The filter registers a frame is checked against.
pub struct Filter<'a> {
    pub rctl: u32,
    /// RAL/RAH pairs.
    pub receive_addresses: &'a [u32],
    pub multicast_table: &'a [u32],
    pub vlan_table: &'a [u32],
    pub vlan_ethertype: u16,
}

impl Filter<'_> {
    pub fn accepts(&self, frame: &[u8]) -> bool {
        let Some(dst) = frame.get(..6).and_then(|d| <[u8; 6]>::try_from(d).ok()) else {
            return false;
        };
        if self.rctl & RCTL_VFE != 0 && read_u16(frame, 12) == Some(self.vlan_ethertype) {
            let vid = read_u16(frame, 14).unwrap_or(0) & 0x0fff;
            let word = self
                .vlan_table
                .get(usize::from(vid >> 5))
                .copied()
                .unwrap_or(0);
            if word >> (vid & 31) & 1 == 0 {
                return false;
            }
        }
        let multicast = dst[0] & 1 == 1;
        if dst == [0xff; 6] && self.rctl & RCTL_BAM != 0 {
            return true;
        }
        if (multicast && self.rctl & RCTL_MPE != 0) || (!multicast && self.rctl & RCTL_UPE != 0) {
            return true;
        }
        if self.exact_match(&dst) {
            return true;
        }
        multicast && dst != [0xff; 6] && {
            let hash = mta_hash(&dst, self.rctl >> RCTL_MO_SHIFT);
            let word = self
                .multicast_table
                .get(usize::from(hash >> 5))
                .copied()
                .unwrap_or(0);
            word >> (hash & 31) & 1 == 1
        }
    }

    fn exact_match(&self, dst: &[u8; 6]) -> bool {
        self.receive_addresses.chunks_exact(2).any(|pair| {
            let (low, high) = (pair[0], pair[1]);
            let valid = high & RAH_AV != 0 && high & RAH_ASEL_MASK == 0;
            let mut addr = [0u8; 6];
            addr[..4].copy_from_slice(&low.to_le_bytes());
            addr[4..].copy_from_slice(&high.to_le_bytes()[..2]);
            valid && addr == *dst
        })
    }
}

/// Receive configuration snapshot.
#[derive(Clone, Copy, Debug)]
pub struct RxConfig {
    pub rctl: u32,
    pub strip_vlan: bool,
    pub vlan_ethertype: u16,
    pub rxcsum: u32,
}

/// What the last descriptor of a frame reports besides DD and EOP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxMeta {
    pub status: u8,
    pub errors: u8,
    pub special: u16,
    /// Frame length on the wire including FCS, for statistics.
    pub wire_len: usize,
}

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum RxError {
    #[error("frame shorter than an Ethernet header")]
    Runt,
    #[error("frame longer than the receiver accepts")]
    Oversize,
}

/// Builds the bytes the guest receives: VLAN tag stripped if asked, padded to the
/// minimum frame, FCS appended unless RCTL.SECRC strips it. `trusted` says the L4
/// checksum is known good (the backend verified or computed it).
pub fn prepare(
    frame: &[u8],
    trusted: bool,
    cfg: &RxConfig,
    out: &mut Vec<u8>,
) -> Result<RxMeta, RxError> {
    if frame.len() < 14 {
        return Err(RxError::Runt);
    }
    let max = if cfg.rctl & RCTL_LPE != 0 {
        MAX_LONG_FRAME
    } else {
        MAX_NORMAL_FRAME
    };
    let wire_len = frame.len().max(MIN_FRAME) + FCS_LEN;
    if wire_len > max {
        return Err(RxError::Oversize);
    }
    let mut meta = RxMeta {
        wire_len,
        ..Default::default()
    };
    out.clear();
    let tagged = frame.len() >= 18 && read_u16(frame, 12) == Some(cfg.vlan_ethertype);
    if tagged && cfg.strip_vlan {
        meta.special = read_u16(frame, 14).unwrap_or(0);
        meta.status |= STA_VP;
        out.extend_from_slice(&frame[..12]);
        out.extend_from_slice(&frame[16..]);
    } else {
        out.extend_from_slice(frame);
    }
    let (status, errors) = checksum_status(out, cfg, trusted);
    meta.status |= status;
    meta.errors |= errors;
    if out.len() < MIN_FRAME {
        out.resize(MIN_FRAME, 0);
    }
    if cfg.rctl & RCTL_SECRC == 0 {
        let fcs = crc32(out);
        out.extend_from_slice(&fcs.to_le_bytes());
    }
    Ok(meta)
}

fn checksum_status(frame: &[u8], cfg: &RxConfig, trusted: bool) -> (u8, u8) {
    if cfg.rxcsum & (RXCSUM_IPOFLD | RXCSUM_TUOFLD) == 0 {
        return (STA_IXSM, 0);
    }
    let (mut status, mut errors) = (0, 0);
    if cfg.rxcsum & RXCSUM_IPOFLD != 0 {
        if let Some((l3, checksum::ETHERTYPE_IPV4)) = checksum::l3_start(frame, cfg.vlan_ethertype)
        {
            match checksum::ipv4_header_ok(frame, l3) {
                Some(true) => status |= STA_IPCS,
                Some(false) => {
                    status |= STA_IPCS;
                    errors |= ERR_IPE;
                }
                None => {}
            }
        }
    }
    if cfg.rxcsum & RXCSUM_TUOFLD != 0 {
        if let Some(loc) = checksum::locate_l4(frame, cfg.vlan_ethertype) {
            status |= STA_TCPCS;
            if !trusted && checksum::l4_ok(frame, &loc) != Some(true) {
                errors |= ERR_TCPE;
            }
        }
    }
    (status, errors)
}

/// The Ethernet FCS: CRC-32 (IEEE 802.3, reflected), slicing by eight.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = crc ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        crc = CRC_TABLES[7][(lo & 0xff) as usize]
            ^ CRC_TABLES[6][((lo >> 8) & 0xff) as usize]
            ^ CRC_TABLES[5][((lo >> 16) & 0xff) as usize]
            ^ CRC_TABLES[4][(lo >> 24) as usize]
            ^ CRC_TABLES[3][c[4] as usize]
            ^ CRC_TABLES[2][c[5] as usize]
            ^ CRC_TABLES[1][c[6] as usize]
            ^ CRC_TABLES[0][c[7] as usize];
    }
    for &b in chunks.remainder() {
        crc = CRC_TABLES[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut tables = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
            bit += 1;
        }
        tables[0][i] = crc;
        i += 1;
    }
    let mut t = 1;
    while t < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = tables[t - 1][i];
            tables[t][i] = (prev >> 8) ^ tables[0][(prev & 0xff) as usize];
            i += 1;
        }
        t += 1;
    }
    tables
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e1000::checksum::tests::tcp4_frame;

    fn cfg(rctl: u32) -> RxConfig {
        RxConfig {
            rctl,
            strip_vlan: false,
            vlan_ethertype: 0x8100,
            rxcsum: RXCSUM_TUOFLD | RXCSUM_IPOFLD,
        }
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        let long: Vec<u8> = (0..1000u32).map(|i| (i * 31) as u8).collect();
        let bytewise = long.iter().fold(!0u32, |crc, &b| {
            CRC_TABLES[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
        });
        assert_eq!(crc32(&long), !bytewise);
    }

    #[test]
    fn buffer_sizes_follow_bsize_and_bsex() {
        assert_eq!(buffer_size(0), 2048);
        assert_eq!(buffer_size(3 << RCTL_BSIZE_SHIFT), 256);
        assert_eq!(buffer_size(RCTL_BSEX | (3 << RCTL_BSIZE_SHIFT)), 4096);
        assert_eq!(buffer_size(RCTL_BSEX | (1 << RCTL_BSIZE_SHIFT)), 16384);
        assert_eq!(buffer_size(RCTL_BSEX), 16384);
    }

    #[test]
    fn filter_follows_addresses_hash_and_promiscuous_bits() {
        let own = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let mut ra = [0u32; 32];
        ra[0] = u32::from_le_bytes([own[0], own[1], own[2], own[3]]);
        ra[1] = u32::from(u16::from_le_bytes([own[4], own[5]])) | RAH_AV;
        let mut mta = [0u32; 128];
        let group = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];
        let hash = mta_hash(&group, 0);
        mta[usize::from(hash >> 5)] |= 1 << (hash & 31);
        let vfta = [0u32; 128];
        let frame_to = |dst: [u8; 6]| {
            let mut f = vec![0u8; 60];
            f[..6].copy_from_slice(&dst);
            f
        };
        let filter = |rctl| Filter {
            rctl,
            receive_addresses: &ra,
            multicast_table: &mta,
            vlan_table: &vfta,
            vlan_ethertype: 0x8100,
        };
        assert!(filter(0).accepts(&frame_to(own)));
        assert!(!filter(0).accepts(&frame_to([0x52, 0x54, 0, 0, 0, 9])));
        assert!(filter(RCTL_UPE).accepts(&frame_to([0x52, 0x54, 0, 0, 0, 9])));
        assert!(!filter(0).accepts(&frame_to([0xff; 6])));
        assert!(filter(RCTL_BAM).accepts(&frame_to([0xff; 6])));
        assert!(filter(0).accepts(&frame_to(group)));
        assert!(!filter(0).accepts(&frame_to([0x01, 0x00, 0x5e, 0x00, 0x00, 0x01])));
        assert!(filter(RCTL_MPE).accepts(&frame_to([0x01, 0x00, 0x5e, 0x00, 0x00, 0x01])));
        assert!(!filter(RCTL_UPE).accepts(&[0u8; 5]));
        // A tagged frame for an unregistered VLAN is filtered when VFE is on.
        let mut tagged = frame_to(own);
        tagged[12..16].copy_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        assert!(filter(0).accepts(&tagged));
        assert!(!filter(RCTL_VFE).accepts(&tagged));
    }

    #[test]
    fn prepare_pads_appends_fcs_and_reports_checksums() {
        let mut out = Vec::new();
        let arp = vec![0xffu8; 42];
        let meta = prepare(&arp, false, &cfg(0), &mut out).unwrap();
        assert_eq!(out.len(), 64);
        assert_eq!(meta.wire_len, 64);
        assert_eq!(&out[60..], &crc32(&out[..60]).to_le_bytes());
        prepare(&arp, false, &cfg(RCTL_SECRC), &mut out).unwrap();
        assert_eq!(out.len(), 60);

        let good = tcp4_frame(100);
        let meta = prepare(&good, false, &cfg(RCTL_SECRC), &mut out).unwrap();
        assert_eq!((meta.status, meta.errors), (STA_TCPCS | STA_IPCS, 0));
        let mut bad = good.clone();
        bad[70] ^= 1;
        let meta = prepare(&bad, false, &cfg(RCTL_SECRC), &mut out).unwrap();
        assert_eq!(meta.errors, ERR_TCPE);
        let meta = prepare(&bad, true, &cfg(RCTL_SECRC), &mut out).unwrap();
        assert_eq!(meta.errors, 0);
        let no_offload = RxConfig {
            rxcsum: 0,
            ..cfg(0)
        };
        assert_eq!(
            prepare(&good, false, &no_offload, &mut out).unwrap().status,
            STA_IXSM
        );
    }

    #[test]
    fn prepare_strips_vlan_and_enforces_lengths() {
        let mut out = Vec::new();
        let mut tagged = tcp4_frame(100);
        tagged.splice(12..12, [0x81, 0x00, 0x20, 0x07]);
        let strip = RxConfig {
            strip_vlan: true,
            ..cfg(RCTL_SECRC)
        };
        let meta = prepare(&tagged, false, &strip, &mut out).unwrap();
        assert_eq!(meta.special, 0x2007);
        assert_ne!(meta.status & STA_VP, 0);
        assert_eq!(out, tcp4_frame(100));
        assert_eq!(
            prepare(&[0u8; 13], false, &cfg(0), &mut out),
            Err(RxError::Runt)
        );
        assert_eq!(
            prepare(&vec![0u8; 1519], false, &cfg(0), &mut out),
            Err(RxError::Oversize)
        );
        assert!(prepare(&vec![0u8; 1518], false, &cfg(0), &mut out).is_ok());
        assert!(prepare(&vec![0u8; 9000], false, &cfg(RCTL_LPE), &mut out).is_ok());
        assert_eq!(
            prepare(&vec![0u8; 16381], false, &cfg(RCTL_LPE), &mut out),
            Err(RxError::Oversize)
        );
    }
}
