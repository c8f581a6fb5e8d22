//! Transmit descriptors, offload contexts and the offloads themselves: checksum
//! insertion and TCP segmentation, either handed to a backend that can do them (as a
//! virtio-net header) or done here in software.
//!
//! The guest controls every field of every descriptor, so offsets are validated before
//! use and a malformed request drops the frame with a reason instead of panicking.

use tapir_net::backend::{Offloads, VnetHdr, MAX_FRAME_LEN};
use thiserror::Error;

use super::checksum::{self, read_u16, read_u32, write_u16, write_u32};

pub const DESCRIPTOR_LEN: u64 = 16;

// Command bits shared by legacy CMD and data DCMD.
pub const CMD_EOP: u8 = 0x01;
pub const CMD_IC: u8 = 0x04;
pub const CMD_TSE: u8 = 0x04;
pub const CMD_RS: u8 = 0x08;
pub const CMD_RPS: u8 = 0x10;
pub const CMD_DEXT: u8 = 0x20;
pub const CMD_VLE: u8 = 0x40;
// Context TUCMD bits.
pub const TUCMD_TCP: u8 = 0x01;
pub const TUCMD_IP: u8 = 0x02;
pub const TUCMD_TSE: u8 = 0x04;
// Data POPTS bits.
pub const POPTS_IXSM: u8 = 0x01;
pub const POPTS_TXSM: u8 = 0x02;
/// Status written back into byte 12 of a descriptor the guest asked to hear about.
pub const STA_DD: u8 = 0x01;
pub const STATUS_OFFSET: u64 = 12;

const DTYP_CONTEXT: u8 = 0;
const DTYP_DATA: u8 = 1;

/// The largest frame the 82540 sends without segmentation.
pub const MAX_PLAIN_FRAME: usize = 16384;
/// The largest TSO request accepted: a 64 KiB payload behind at most 255 header bytes.
pub const MAX_TSO_FRAME: usize = 65536 + 256;
/// More segments than this from one request is treated as an absurd MSS.
pub const MAX_TSO_SEGMENTS: usize = 2048;
const MIN_FRAME: usize = 60;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_PSH: u8 = 0x08;
const TCP_FLAG_CWR: u8 = 0x80;

/// An offload context descriptor's fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxContext {
    pub ipcss: u8,
    pub ipcso: u8,
    pub ipcse: u16,
    pub tucss: u8,
    pub tucso: u8,
    pub tucse: u16,
    pub paylen: u32,
    pub tucmd: u8,
    pub hdr_len: u8,
    pub mss: u16,
}

impl TxContext {
    pub fn is_tso(&self) -> bool {
        self.tucmd & TUCMD_TSE != 0
    }
    fn ipv4(&self) -> bool {
        self.tucmd & TUCMD_IP != 0
    }
    fn tcp(&self) -> bool {
        self.tucmd & TUCMD_TCP != 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxDescriptor {
    Legacy {
        addr: u64,
        len: u16,
        cso: u8,
        cmd: u8,
        css: u8,
        special: u16,
    },
    Context(TxContext),
    Data {
        addr: u64,
        len: u32,
        dcmd: u8,
        popts: u8,
        special: u16,
    },
    /// An extended descriptor with a type the 82540 does not define.
    Reserved {
        cmd: u8,
    },
}

impl TxDescriptor {
    pub fn parse(raw: &[u8; 16]) -> TxDescriptor {
        let u16_at = |i: usize| u16::from_le_bytes([raw[i], raw[i + 1]]);
        let addr = u64::from_le_bytes([
            raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
        ]);
        let cmd = raw[11];
        if cmd & CMD_DEXT == 0 {
            return TxDescriptor::Legacy {
                addr,
                len: u16_at(8),
                cso: raw[10],
                cmd,
                css: raw[13],
                special: u16_at(14),
            };
        }
        let len20 = u32::from_le_bytes([raw[8], raw[9], raw[10], 0]) & 0x000f_ffff;
        match raw[10] >> 4 {
            DTYP_CONTEXT => TxDescriptor::Context(TxContext {
                ipcss: raw[0],
                ipcso: raw[1],
                ipcse: u16_at(2),
                tucss: raw[4],
                tucso: raw[5],
                tucse: u16_at(6),
                paylen: len20,
                tucmd: cmd,
                hdr_len: raw[13],
                mss: u16_at(14),
            }),
            DTYP_DATA => TxDescriptor::Data {
                addr,
                len: len20,
                dcmd: cmd,
                popts: raw[13],
                special: u16_at(14),
            },
            _ => TxDescriptor::Reserved { cmd },
        }
    }

    pub fn command(&self) -> u8 {
        match *self {
            TxDescriptor::Legacy { cmd, .. } => cmd,
            TxDescriptor::Context(ctx) => ctx.tucmd,
            TxDescriptor::Data { dcmd, .. } => dcmd,
            TxDescriptor::Reserved { cmd } => cmd,
        }
    }

    /// The guest wants the DD bit written back.
    pub fn reports_status(&self) -> bool {
        self.command() & (CMD_RS | CMD_RPS) != 0
    }
}

/// The offload a whole packet asks for, decided by its first data descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offload {
    None,
    /// Legacy descriptor checksum: sum from `css` to the end, store at `cso`.
    Legacy {
        css: u8,
        cso: u8,
    },
    Checksum {
        ctx: TxContext,
        ip: bool,
        l4: bool,
    },
    Tso {
        ctx: TxContext,
        ip: bool,
        l4: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameMeta {
    pub offload: Offload,
    /// VLAN tag to insert (descriptor VLE with CTRL.VME set).
    pub vlan: Option<u16>,
}

/// What the backend can take and how the MAC is configured.
#[derive(Clone, Copy, Debug)]
pub struct TxCaps {
    pub offloads: Offloads,
    /// TCTL.PSP: pad short frames to 64 bytes on the wire (60 without FCS).
    pub pad_short: bool,
    /// VET: the ethertype of inserted VLAN tags.
    pub vlan_ethertype: u16,
}

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum TxError {
    #[error("packet has no data")]
    Empty,
    #[error("packet larger than the MAC can send")]
    Oversize,
    #[error("checksum offsets outside the packet")]
    BadChecksumOffsets,
    #[error("TSO context with an invalid MSS")]
    BadMss,
    #[error("TSO context with an invalid header length or offsets")]
    BadHeaderLength,
}

impl TxError {
    pub fn reason(&self) -> &'static str {
        match self {
            TxError::Empty => "tx_empty",
            TxError::Oversize => "tx_oversize",
            TxError::BadChecksumOffsets => "tx_bad_csum_offsets",
            TxError::BadMss => "tx_tso_bad_mss",
            TxError::BadHeaderLength => "tx_tso_bad_header",
        }
    }
}

/// What one packet became on the wire, for the statistics registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxSummary {
    /// Wire frames (segments) accepted by the backend.
    pub frames: u32,
    /// Their bytes, without FCS.
    pub bytes: u64,
    /// Length of the first frame, without FCS (for size histograms).
    pub first_len: usize,
    /// Frames the backend refused.
    pub refused: u32,
    pub tso: bool,
}

/// Sends one frame: `Ok` when the backend took it.
pub type Emit<'a> = dyn FnMut(&VnetHdr, &[u8]) -> bool + 'a;

/// Applies the packet's offloads and hands the resulting frame(s) to `emit`.
/// `frame` holds the packet as gathered from the descriptors and may be modified.
pub fn transmit(
    frame: &mut Vec<u8>,
    meta: &FrameMeta,
    caps: &TxCaps,
    scratch: &mut Vec<u8>,
    emit: &mut Emit<'_>,
) -> Result<TxSummary, TxError> {
    if frame.is_empty() {
        return Err(TxError::Empty);
    }
    match meta.offload {
        Offload::Tso { ctx, ip, l4 } => {
            transmit_tso(frame, &ctx, ip, l4, meta.vlan, caps, scratch, emit)
        }
        _ if frame.len() > MAX_PLAIN_FRAME => Err(TxError::Oversize),
        Offload::None => Ok(send_one(frame, VnetHdr::default(), meta.vlan, caps, emit)),
        Offload::Legacy { css, cso } => {
            if !checksum::insert(frame, usize::from(css), None, usize::from(cso), 0) {
                return Err(TxError::BadChecksumOffsets);
            }
            Ok(send_one(frame, VnetHdr::default(), meta.vlan, caps, emit))
        }
        Offload::Checksum { ctx, ip, l4 } => {
            if ip && !insert_ip_checksum(frame, &ctx) {
                return Err(TxError::BadChecksumOffsets);
            }
            let mut hdr = VnetHdr::default();
            if l4 {
                let start = usize::from(ctx.tucss);
                let store = usize::from(ctx.tucso);
                let to_end = ctx.tucse == 0 || usize::from(ctx.tucse) + 1 == frame.len();
                let in_range = start < frame.len() && store >= start && store + 2 <= frame.len();
                if caps.offloads.csum && to_end && in_range {
                    hdr.flags = VnetHdr::FLAG_NEEDS_CSUM;
                    hdr.csum_start = u16::from(ctx.tucss);
                    hdr.csum_offset = u16::from(ctx.tucso - ctx.tucss);
                } else if !insert_l4_checksum(frame, &ctx, 0) {
                    return Err(TxError::BadChecksumOffsets);
                }
            }
            Ok(send_one(frame, hdr, meta.vlan, caps, emit))
        }
    }
}

fn end_of(ipcse_or_tucse: u16) -> Option<usize> {
    (ipcse_or_tucse != 0).then_some(usize::from(ipcse_or_tucse))
}

fn insert_ip_checksum(frame: &mut [u8], ctx: &TxContext) -> bool {
    checksum::insert(
        frame,
        usize::from(ctx.ipcss),
        end_of(ctx.ipcse),
        usize::from(ctx.ipcso),
        0,
    )
}

fn insert_l4_checksum(frame: &mut [u8], ctx: &TxContext, extra: u64) -> bool {
    checksum::insert(
        frame,
        usize::from(ctx.tucss),
        end_of(ctx.tucse),
        usize::from(ctx.tucso),
        extra,
    )
}

/// Pads, tags and emits one finished frame.
fn send_one(
    frame: &mut Vec<u8>,
    mut hdr: VnetHdr,
    vlan: Option<u16>,
    caps: &TxCaps,
    emit: &mut Emit<'_>,
) -> TxSummary {
    if caps.pad_short && frame.len() < MIN_FRAME {
        frame.resize(MIN_FRAME, 0);
    }
    if let Some(tci) = vlan {
        if frame.len() >= 12 {
            let mut tag = [0u8; 4];
            tag[..2].copy_from_slice(&caps.vlan_ethertype.to_be_bytes());
            tag[2..].copy_from_slice(&tci.to_be_bytes());
            frame.splice(12..12, tag);
            if hdr.flags & VnetHdr::FLAG_NEEDS_CSUM != 0 {
                hdr.csum_start += 4;
            }
            if hdr.hdr_len != 0 {
                hdr.hdr_len += 4;
            }
        }
    }
    let accepted = emit(&hdr, frame);
    TxSummary {
        frames: u32::from(accepted),
        bytes: if accepted { frame.len() as u64 } else { 0 },
        first_len: frame.len(),
        refused: u32::from(!accepted),
        tso: false,
    }
}

/// Checks a TSO context against the packet it applies to.
fn validate_tso(frame: &[u8], ctx: &TxContext, ip: bool) -> Result<(), TxError> {
    let frame_len = frame.len();
    let hdr_len = usize::from(ctx.hdr_len);
    let (ipcss, tucss, tucso) = (
        usize::from(ctx.ipcss),
        usize::from(ctx.tucss),
        usize::from(ctx.tucso),
    );
    let l4_header = if ctx.tcp() { 20 } else { 8 };
    let ip_header = if ctx.ipv4() { 20 } else { 40 };
    if hdr_len == 0
        || hdr_len > frame_len
        || ipcss + ip_header > hdr_len
        || tucss < ipcss + ip_header
        || tucss + l4_header > hdr_len
        || tucso < tucss
        || tucso + 2 > hdr_len
        || (ip && usize::from(ctx.ipcso) + 2 > hdr_len)
    {
        return Err(TxError::BadHeaderLength);
    }
    // The header must end where the L4 header says it does (Linux sets hdr_len to the
    // transport offset plus tcp_hdrlen); anything else would copy payload as header.
    let l4_len = if ctx.tcp() {
        frame.get(tucss + 12).map_or(0, |d| usize::from(d >> 4) * 4)
    } else {
        8
    };
    if l4_len < l4_header || tucss + l4_len != hdr_len {
        return Err(TxError::BadHeaderLength);
    }
    if frame_len > MAX_TSO_FRAME {
        return Err(TxError::Oversize);
    }
    let mss = usize::from(ctx.mss);
    let payload = frame_len - hdr_len;
    if mss == 0 || hdr_len + mss > MAX_PLAIN_FRAME || payload.div_ceil(mss) > MAX_TSO_SEGMENTS {
        return Err(TxError::BadMss);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn transmit_tso(
    frame: &mut Vec<u8>,
    ctx: &TxContext,
    ip: bool,
    l4: bool,
    vlan: Option<u16>,
    caps: &TxCaps,
    scratch: &mut Vec<u8>,
    emit: &mut Emit<'_>,
) -> Result<TxSummary, TxError> {
    validate_tso(frame, ctx, ip)?;
    let hdr_len = usize::from(ctx.hdr_len);
    let mss = usize::from(ctx.mss);
    let payload = frame.len() - hdr_len;
    let cwr = frame
        .get(usize::from(ctx.tucss) + 13)
        .is_some_and(|f| f & TCP_FLAG_CWR != 0);
    let backend_tso = if ctx.ipv4() {
        caps.offloads.tso4
    } else {
        caps.offloads.tso6
    };
    let ip_len_fits = frame.len() - usize::from(ctx.ipcss) <= usize::from(u16::MAX);
    if l4
        && ctx.tcp()
        && caps.offloads.csum
        && backend_tso
        && (!cwr || caps.offloads.tso_ecn)
        && ip_len_fits
        && frame.len() + 4 <= MAX_FRAME_LEN
    {
        let mut summary = pass_tso_through(frame, ctx, ip, cwr, vlan, caps, emit)?;
        // Count what the wire will carry: one frame per segment.
        let segments = payload.div_ceil(mss).max(1);
        if summary.frames == 1 {
            summary.frames = segments as u32;
            summary.bytes += ((segments - 1) * hdr_len) as u64;
            summary.first_len = (hdr_len + mss.min(payload)).max(MIN_FRAME);
        }
        return Ok(summary);
    }
    segment_in_software(frame, ctx, ip, l4, vlan, caps, scratch, emit)
}

/// Hands the whole request to a TSO-capable backend as one GSO frame.
fn pass_tso_through(
    frame: &mut Vec<u8>,
    ctx: &TxContext,
    ip: bool,
    cwr: bool,
    vlan: Option<u16>,
    caps: &TxCaps,
    emit: &mut Emit<'_>,
) -> Result<TxSummary, TxError> {
    let len = frame.len();
    let (tucss, tucso) = (usize::from(ctx.tucss), usize::from(ctx.tucso));
    fix_ip_lengths(frame, ctx, len)?;
    if ip && ctx.ipv4() && !insert_ip_checksum(frame, ctx) {
        return Err(TxError::BadChecksumOffsets);
    }
    // The driver seeded the field with the pseudo-header sum without length; a partial
    // checksum carries it with the length included and uncomplemented.
    let seed = u64::from(read_u16(frame, tucso).ok_or(TxError::BadHeaderLength)?);
    write_u16(frame, tucso, checksum::fold(seed + (len - tucss) as u64));
    let single = len - usize::from(ctx.hdr_len) <= usize::from(ctx.mss);
    let mut gso_type = if ctx.ipv4() {
        VnetHdr::GSO_TCPV4
    } else {
        VnetHdr::GSO_TCPV6
    };
    if cwr {
        gso_type |= VnetHdr::GSO_ECN;
    }
    let hdr = VnetHdr {
        flags: VnetHdr::FLAG_NEEDS_CSUM,
        gso_type: if single { VnetHdr::GSO_NONE } else { gso_type },
        hdr_len: if single { 0 } else { u16::from(ctx.hdr_len) },
        gso_size: if single { 0 } else { ctx.mss },
        csum_start: tucss as u16,
        csum_offset: (tucso - tucss) as u16,
        num_buffers: 0,
    };
    let mut summary = send_one(frame, hdr, vlan, caps, emit);
    summary.tso = true;
    Ok(summary)
}

/// Sets the IP length fields for a frame (or segment) of `len` bytes.
fn fix_ip_lengths(frame: &mut [u8], ctx: &TxContext, len: usize) -> Result<(), TxError> {
    let ipcss = usize::from(ctx.ipcss);
    let ok = if ctx.ipv4() {
        write_u16(frame, ipcss + 2, (len - ipcss) as u16)
    } else {
        write_u16(frame, ipcss + 4, (len - ipcss - 40) as u16)
    };
    ok.then_some(()).ok_or(TxError::BadHeaderLength)
}

#[allow(clippy::too_many_arguments)]
fn segment_in_software(
    frame: &[u8],
    ctx: &TxContext,
    ip: bool,
    l4: bool,
    vlan: Option<u16>,
    caps: &TxCaps,
    segment: &mut Vec<u8>,
    emit: &mut Emit<'_>,
) -> Result<TxSummary, TxError> {
    let hdr_len = usize::from(ctx.hdr_len);
    let mss = usize::from(ctx.mss);
    let (header, payload) = frame.split_at(hdr_len);
    let (ipcss, tucss) = (usize::from(ctx.ipcss), usize::from(ctx.tucss));
    let ip_id = read_u16(header, ipcss + 4).ok_or(TxError::BadHeaderLength)?;
    let seq = if ctx.tcp() {
        read_u32(header, tucss + 4).ok_or(TxError::BadHeaderLength)?
    } else {
        0
    };
    let chunks: Vec<&[u8]> = if payload.is_empty() {
        vec![&[][..]]
    } else {
        payload.chunks(mss).collect()
    };
    let count = chunks.len();
    let mut summary = TxSummary {
        tso: true,
        ..Default::default()
    };
    for (i, chunk) in chunks.into_iter().enumerate() {
        segment.clear();
        segment.extend_from_slice(header);
        segment.extend_from_slice(chunk);
        let len = segment.len();
        fix_ip_lengths(segment, ctx, len)?;
        if ctx.ipv4() {
            write_u16(segment, ipcss + 4, ip_id.wrapping_add(i as u16));
        }
        if ctx.tcp() {
            write_u32(segment, tucss + 4, seq.wrapping_add((i * mss) as u32));
            if i + 1 < count {
                if let Some(flags) = segment.get_mut(tucss + 13) {
                    *flags &= !(TCP_FLAG_FIN | TCP_FLAG_PSH);
                }
            }
        } else {
            write_u16(segment, tucss + 4, (len - tucss) as u16);
        }
        if ip && ctx.ipv4() && !insert_ip_checksum(segment, ctx) {
            return Err(TxError::BadChecksumOffsets);
        }
        // The seed lacks the segment length; the hardware adds it per segment.
        if l4 && !insert_l4_checksum(segment, ctx, (len - tucss) as u64) {
            return Err(TxError::BadChecksumOffsets);
        }
        let one = send_one(segment, VnetHdr::default(), vlan, caps, emit);
        if i == 0 {
            summary.first_len = one.first_len;
        }
        summary.frames += one.frames;
        summary.bytes += one.bytes;
        summary.refused += one.refused;
    }
    Ok(summary)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::e1000::checksum::{tests::tcp4_frame, ETHERTYPE_VLAN};

    fn caps(offloads: Offloads) -> TxCaps {
        TxCaps {
            offloads,
            pad_short: true,
            vlan_ethertype: 0x8100,
        }
    }

    type Sent = Vec<(VnetHdr, Vec<u8>)>;

    fn collect(
        frame: &mut Vec<u8>,
        meta: FrameMeta,
        caps: &TxCaps,
    ) -> (Result<TxSummary, TxError>, Sent) {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        let r = transmit(frame, &meta, caps, &mut scratch, &mut |h, f| {
            out.push((*h, f.to_vec()));
            true
        });
        (r, out)
    }

    /// The context the Linux driver builds for a TSO skb, with the header prepared the
    /// way e1000_tso prepares it.
    pub(crate) fn linux_tso_request(payload_len: usize, mss: u16) -> (Vec<u8>, TxContext) {
        let mut f = tcp4_frame(payload_len);
        f[16..18].copy_from_slice(&[0, 0]);
        f[24..26].copy_from_slice(&[0, 0]);
        let pseudo = checksum::add(u64::from(checksum::PROTO_TCP), &f[26..34]);
        f[50..52].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
        let ctx = TxContext {
            ipcss: 14,
            ipcso: 24,
            ipcse: 33,
            tucss: 34,
            tucso: 50,
            tucse: 0,
            paylen: payload_len as u32,
            tucmd: TUCMD_TSE | TUCMD_TCP | TUCMD_IP | CMD_DEXT,
            hdr_len: 54,
            mss,
        };
        (f, ctx)
    }

    #[test]
    fn parses_the_three_descriptor_layouts() {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&0x1000u64.to_le_bytes());
        raw[8..10].copy_from_slice(&60u16.to_le_bytes());
        raw[11] = CMD_EOP | CMD_RS;
        match TxDescriptor::parse(&raw) {
            TxDescriptor::Legacy { addr, len, cmd, .. } => {
                assert_eq!((addr, len, cmd), (0x1000, 60, CMD_EOP | CMD_RS))
            }
            other => panic!("{other:?}"),
        }
        raw[8..11].copy_from_slice(&[0x34, 0x12, 0x1f]);
        raw[11] = CMD_DEXT | CMD_EOP | CMD_TSE;
        raw[13] = POPTS_TXSM;
        match TxDescriptor::parse(&raw) {
            TxDescriptor::Data { len, popts, .. } => {
                assert_eq!((len, popts), (0xf1234, POPTS_TXSM))
            }
            other => panic!("{other:?}"),
        }
        raw[10] = 0x00;
        raw[11] = CMD_DEXT | TUCMD_TSE;
        raw[14..16].copy_from_slice(&1448u16.to_le_bytes());
        match TxDescriptor::parse(&raw) {
            TxDescriptor::Context(ctx) => assert!(ctx.is_tso() && ctx.mss == 1448),
            other => panic!("{other:?}"),
        }
        raw[10] = 0x50;
        assert_eq!(
            TxDescriptor::parse(&raw),
            TxDescriptor::Reserved {
                cmd: CMD_DEXT | TUCMD_TSE
            }
        );
    }

    #[test]
    fn software_checksum_matches_a_reference_frame() {
        let reference = tcp4_frame(200);
        let mut frame = reference.clone();
        // Partial checksum as Linux hands it: pseudo-header with length in the field.
        let loc = checksum::locate_l4(&frame, ETHERTYPE_VLAN).unwrap();
        let seed = checksum::fold(checksum::pseudo_header(&frame, &loc).unwrap());
        frame[50..52].copy_from_slice(&seed.to_be_bytes());
        let ctx = TxContext {
            tucss: 34,
            tucso: 50,
            tucmd: CMD_DEXT | TUCMD_TCP,
            ..Default::default()
        };
        let meta = FrameMeta {
            offload: Offload::Checksum {
                ctx,
                ip: false,
                l4: true,
            },
            vlan: None,
        };
        let (r, out) = collect(&mut frame, meta, &caps(Offloads::NONE));
        assert_eq!(r.unwrap().frames, 1);
        assert_eq!(out[0].1, reference);
        assert!(out[0].0.is_plain());
    }

    #[test]
    fn checksum_is_passed_through_when_the_backend_can() {
        let mut frame = tcp4_frame(200);
        let ctx = TxContext {
            tucss: 34,
            tucso: 50,
            tucmd: CMD_DEXT | TUCMD_TCP,
            ..Default::default()
        };
        let meta = FrameMeta {
            offload: Offload::Checksum {
                ctx,
                ip: false,
                l4: true,
            },
            vlan: Some(0x0123),
        };
        let offloads = Offloads {
            csum: true,
            ..Offloads::NONE
        };
        let (_, out) = collect(&mut frame, meta, &caps(offloads));
        let (hdr, wire) = &out[0];
        assert_eq!(hdr.flags, VnetHdr::FLAG_NEEDS_CSUM);
        assert_eq!((hdr.csum_start, hdr.csum_offset), (38, 16));
        assert_eq!(&wire[12..16], &[0x81, 0x00, 0x01, 0x23]);
    }

    #[test]
    fn bad_checksum_offsets_drop_the_frame() {
        let mut frame = vec![0u8; 60];
        let ctx = TxContext {
            tucss: 200,
            tucso: 250,
            ..Default::default()
        };
        let meta = FrameMeta {
            offload: Offload::Checksum {
                ctx,
                ip: true,
                l4: true,
            },
            vlan: None,
        };
        let (r, out) = collect(&mut frame, meta, &caps(Offloads::NONE));
        assert_eq!(r, Err(TxError::BadChecksumOffsets));
        assert!(out.is_empty());
        let meta = FrameMeta {
            offload: Offload::Legacy { css: 10, cso: 59 },
            vlan: None,
        };
        assert_eq!(
            collect(&mut frame, meta, &caps(Offloads::NONE)).0,
            Err(TxError::BadChecksumOffsets)
        );
    }

    #[test]
    fn software_tso_produces_valid_segments() {
        let (mut frame, ctx) = linux_tso_request(3000, 1000);
        let original = frame.clone();
        let meta = FrameMeta {
            offload: Offload::Tso {
                ctx,
                ip: true,
                l4: true,
            },
            vlan: None,
        };
        let (r, out) = collect(&mut frame, meta, &caps(Offloads::NONE));
        let summary = r.unwrap();
        assert_eq!(summary.frames, 3);
        assert_eq!(out.len(), 3);
        for (i, (hdr, seg)) in out.iter().enumerate() {
            assert!(hdr.is_plain());
            assert_eq!(seg.len(), 54 + 1000);
            assert_eq!(checksum::ipv4_header_ok(seg, 14), Some(true));
            let loc = checksum::locate_l4(seg, ETHERTYPE_VLAN).unwrap();
            assert_eq!(checksum::l4_ok(seg, &loc), Some(true), "segment {i}");
            assert_eq!(read_u16(seg, 18), Some(0x1234 + i as u16));
            assert_eq!(read_u32(seg, 38), Some(1000 + 1000 * i as u32));
            assert_eq!(&seg[54..], &original[54 + 1000 * i..54 + 1000 * (i + 1)]);
            let psh = seg[47] & TCP_FLAG_PSH != 0;
            assert_eq!(psh, i == 2);
        }
    }

    #[test]
    fn tso_goes_to_a_capable_backend_as_one_gso_frame() {
        let (mut frame, ctx) = linux_tso_request(3000, 1448);
        let meta = FrameMeta {
            offload: Offload::Tso {
                ctx,
                ip: true,
                l4: true,
            },
            vlan: None,
        };
        let offloads = Offloads {
            csum: true,
            tso4: true,
            ..Offloads::NONE
        };
        let (r, out) = collect(&mut frame, meta, &caps(offloads));
        assert_eq!(r.unwrap().frames, 3);
        assert_eq!(out.len(), 1);
        let (hdr, wire) = &out[0];
        assert_eq!(hdr.gso_type, VnetHdr::GSO_TCPV4);
        assert_eq!(
            (hdr.gso_size, hdr.hdr_len, hdr.csum_start, hdr.csum_offset),
            (1448, 54, 34, 16)
        );
        assert_eq!(read_u16(wire, 16), Some(3040));
        assert_eq!(checksum::ipv4_header_ok(wire, 14), Some(true));
        // Completing the partial checksum the way the host would gives a valid frame.
        let mut done = wire.clone();
        assert!(checksum::insert(&mut done, 34, None, 50, 0));
        let loc = checksum::locate_l4(&done, ETHERTYPE_VLAN).unwrap();
        assert_eq!(checksum::l4_ok(&done, &loc), Some(true));
    }

    #[test]
    fn absurd_tso_contexts_are_rejected() {
        let opts = caps(Offloads::NONE);
        for (mss, hdr_len, tucss, expected) in [
            (0u16, 54u8, 34u8, TxError::BadMss),
            (1, 54, 34, TxError::BadMss),
            (u16::MAX, 54, 34, TxError::BadMss),
            (1000, 0, 34, TxError::BadHeaderLength),
            (1000, 255, 34, TxError::BadHeaderLength),
            (1000, 40, 34, TxError::BadHeaderLength),
            (1000, 54, 250, TxError::BadHeaderLength),
            (1000, 54, 0, TxError::BadHeaderLength),
        ] {
            let (mut frame, mut ctx) = linux_tso_request(3000, mss);
            frame.truncate(200);
            if mss == 1 {
                frame = linux_tso_request(5000, mss).0;
            }
            ctx.hdr_len = hdr_len;
            ctx.tucss = tucss;
            let meta = FrameMeta {
                offload: Offload::Tso {
                    ctx,
                    ip: true,
                    l4: true,
                },
                vlan: None,
            };
            let (r, out) = collect(&mut frame, meta, &opts);
            assert_eq!(
                r,
                Err(expected),
                "mss {mss} hdr_len {hdr_len} tucss {tucss}"
            );
            assert!(out.is_empty());
        }
    }

    #[test]
    fn plain_frames_are_padded_and_limited() {
        let mut short = vec![0xaa; 42];
        let meta = FrameMeta {
            offload: Offload::None,
            vlan: None,
        };
        let (_, out) = collect(&mut short, meta, &caps(Offloads::NONE));
        assert_eq!(out[0].1.len(), 60);
        assert_eq!(&out[0].1[42..], &[0u8; 18]);
        let mut huge = vec![0u8; MAX_PLAIN_FRAME + 1];
        assert_eq!(
            collect(&mut huge, meta, &caps(Offloads::NONE)).0,
            Err(TxError::Oversize)
        );
        assert_eq!(
            collect(&mut Vec::new(), meta, &caps(Offloads::NONE)).0,
            Err(TxError::Empty)
        );
    }
}
