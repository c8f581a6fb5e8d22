#![allow(dead_code)] // The full register map is documented even where the model only stores values.

//! Register offsets and bit definitions of the Intel 82540EM, as named in the 8254x
//! Software Developer's Manual. Only what the model implements is listed.

// General control.
pub const CTRL: u32 = 0x0000;
pub const STATUS: u32 = 0x0008;
pub const EECD: u32 = 0x0010;
pub const EERD: u32 = 0x0014;
pub const CTRL_EXT: u32 = 0x0018;
pub const FLA: u32 = 0x001c;
pub const MDIC: u32 = 0x0020;
pub const FCAL: u32 = 0x0028;
pub const FCAH: u32 = 0x002c;
pub const FCT: u32 = 0x0030;
pub const VET: u32 = 0x0038;

// Interrupts.
pub const ICR: u32 = 0x00c0;
pub const ITR: u32 = 0x00c4;
pub const ICS: u32 = 0x00c8;
pub const IMS: u32 = 0x00d0;
pub const IMC: u32 = 0x00d8;

// Receive.
pub const RCTL: u32 = 0x0100;
pub const FCTTV: u32 = 0x0170;
pub const TXCW: u32 = 0x0178;
pub const RXCW: u32 = 0x0180;
pub const TCTL: u32 = 0x0400;
pub const TIPG: u32 = 0x0410;
pub const AIT: u32 = 0x0458;
pub const LEDCTL: u32 = 0x0e00;
pub const PBA: u32 = 0x1000;
pub const FCRTL: u32 = 0x2160;
pub const FCRTH: u32 = 0x2168;
pub const RDFH: u32 = 0x2410;
pub const RDFT: u32 = 0x2418;
pub const RDFHS: u32 = 0x2420;
pub const RDFTS: u32 = 0x2428;
pub const RDFPC: u32 = 0x2430;
pub const RDBAL: u32 = 0x2800;
pub const RDBAH: u32 = 0x2804;
pub const RDLEN: u32 = 0x2808;
pub const RDH: u32 = 0x2810;
pub const RDT: u32 = 0x2818;
pub const RDTR: u32 = 0x2820;
pub const RXDCTL: u32 = 0x2828;
pub const RADV: u32 = 0x282c;
pub const RSRPD: u32 = 0x2c00;

// Transmit.
pub const TXDMAC: u32 = 0x3000;
pub const TDFH: u32 = 0x3410;
pub const TDFT: u32 = 0x3418;
pub const TDFHS: u32 = 0x3420;
pub const TDFTS: u32 = 0x3428;
pub const TDFPC: u32 = 0x3430;
pub const TDBAL: u32 = 0x3800;
pub const TDBAH: u32 = 0x3804;
pub const TDLEN: u32 = 0x3808;
pub const TDH: u32 = 0x3810;
pub const TDT: u32 = 0x3818;
pub const TIDV: u32 = 0x3820;
pub const TXDCTL: u32 = 0x3828;
pub const TADV: u32 = 0x382c;
pub const TSPMT: u32 = 0x3830;

// Statistics: every register in this range is a read-to-clear counter.
pub const STATS_START: u32 = 0x4000;
pub const STATS_END: u32 = 0x4100;
pub const CRCERRS: u32 = 0x4000;
pub const MPC: u32 = 0x4010;
pub const PRC64: u32 = 0x405c;
pub const PRC127: u32 = 0x4060;
pub const PRC255: u32 = 0x4064;
pub const PRC511: u32 = 0x4068;
pub const PRC1023: u32 = 0x406c;
pub const PRC1522: u32 = 0x4070;
pub const GPRC: u32 = 0x4074;
pub const BPRC: u32 = 0x4078;
pub const MPRC: u32 = 0x407c;
pub const GPTC: u32 = 0x4080;
pub const GORCL: u32 = 0x4088;
pub const GOTCL: u32 = 0x4090;
pub const RNBC: u32 = 0x40a0;
pub const RUC: u32 = 0x40a4;
pub const ROC: u32 = 0x40ac;
pub const TORL: u32 = 0x40c0;
pub const TOTL: u32 = 0x40c8;
pub const TPR: u32 = 0x40d0;
pub const TPT: u32 = 0x40d4;
pub const PTC64: u32 = 0x40d8;
pub const PTC127: u32 = 0x40dc;
pub const PTC255: u32 = 0x40e0;
pub const PTC511: u32 = 0x40e4;
pub const PTC1023: u32 = 0x40e8;
pub const PTC1522: u32 = 0x40ec;
pub const MPTC: u32 = 0x40f0;
pub const BPTC: u32 = 0x40f4;
pub const TSCTC: u32 = 0x40f8;
pub const TSCTFC: u32 = 0x40fc;

// Receive filtering and offload.
pub const RXCSUM: u32 = 0x5000;
pub const MTA: u32 = 0x5200;
pub const MTA_LEN: u32 = 128;
pub const RA: u32 = 0x5400;
pub const RA_ENTRIES: u32 = 16;
pub const VFTA: u32 = 0x5600;
pub const VFTA_LEN: u32 = 128;

// Wake-up and manageability: stored, otherwise inert.
pub const WUC: u32 = 0x5800;
pub const WUFC: u32 = 0x5808;
pub const WUS: u32 = 0x5810;
pub const MANC: u32 = 0x5820;
pub const IPAV: u32 = 0x5838;
pub const IP4AT: u32 = 0x5840;
pub const IP6AT: u32 = 0x5880;
pub const WUPL: u32 = 0x5900;
pub const WUPM: u32 = 0x5a00;
pub const FFLT: u32 = 0x5f00;
pub const FFMT: u32 = 0x9000;
pub const FFVT: u32 = 0x9800;

/// Size of the MMIO window (BAR0) and of the register file behind it.
pub const MMIO_SIZE: u64 = 0x20000;
/// Size of the I/O window (BAR1): IOADDR at 0, IODATA at 4, the rest reserved.
pub const IO_SIZE: u64 = 64;
pub const IOADDR: u64 = 0;
pub const IODATA: u64 = 4;

// CTRL bits.
pub const CTRL_FD: u32 = 1 << 0;
pub const CTRL_SLU: u32 = 1 << 6;
pub const CTRL_SPD_1000: u32 = 2 << 8;
pub const CTRL_RST: u32 = 1 << 26;
pub const CTRL_VME: u32 = 1 << 30;
pub const CTRL_PHY_RST: u32 = 1 << 31;

// STATUS bits.
pub const STATUS_FD: u32 = 1 << 0;
pub const STATUS_LU: u32 = 1 << 1;
pub const STATUS_SPEED_1000: u32 = 2 << 6;
pub const STATUS_ASDV_1000: u32 = 2 << 8;

// EECD bits.
pub const EECD_SK: u32 = 1 << 0;
pub const EECD_CS: u32 = 1 << 1;
pub const EECD_DI: u32 = 1 << 2;
pub const EECD_DO: u32 = 1 << 3;
pub const EECD_REQ: u32 = 1 << 6;
pub const EECD_GNT: u32 = 1 << 7;
pub const EECD_PRES: u32 = 1 << 8;

// EERD fields.
pub const EERD_START: u32 = 1 << 0;
pub const EERD_DONE: u32 = 1 << 4;
pub const EERD_ADDR_SHIFT: u32 = 8;
pub const EERD_DATA_SHIFT: u32 = 16;

// MDIC fields.
pub const MDIC_DATA_MASK: u32 = 0xffff;
pub const MDIC_REG_SHIFT: u32 = 16;
pub const MDIC_PHY_SHIFT: u32 = 21;
pub const MDIC_OP_WRITE: u32 = 1 << 26;
pub const MDIC_OP_READ: u32 = 2 << 26;
pub const MDIC_READY: u32 = 1 << 28;
pub const MDIC_INT_EN: u32 = 1 << 29;
pub const MDIC_ERROR: u32 = 1 << 30;

// Interrupt cause bits (ICR/ICS/IMS/IMC).
pub const ICR_TXDW: u32 = 1 << 0;
pub const ICR_TXQE: u32 = 1 << 1;
pub const ICR_LSC: u32 = 1 << 2;
pub const ICR_RXSEQ: u32 = 1 << 3;
pub const ICR_RXDMT0: u32 = 1 << 4;
pub const ICR_RXO: u32 = 1 << 6;
pub const ICR_RXT0: u32 = 1 << 7;
pub const ICR_MDAC: u32 = 1 << 9;
/// The cause bits an 82540 implements.
pub const ICR_VALID: u32 = 0x0001_f6df;

// RCTL bits.
pub const RCTL_EN: u32 = 1 << 1;
pub const RCTL_UPE: u32 = 1 << 3;
pub const RCTL_MPE: u32 = 1 << 4;
pub const RCTL_LPE: u32 = 1 << 5;
pub const RCTL_RDMTS_SHIFT: u32 = 8;
pub const RCTL_MO_SHIFT: u32 = 12;
pub const RCTL_BAM: u32 = 1 << 15;
pub const RCTL_BSIZE_SHIFT: u32 = 16;
pub const RCTL_VFE: u32 = 1 << 18;
pub const RCTL_BSEX: u32 = 1 << 25;
pub const RCTL_SECRC: u32 = 1 << 26;

// TCTL bits.
pub const TCTL_EN: u32 = 1 << 1;
pub const TCTL_PSP: u32 = 1 << 3;

// RXCSUM bits.
pub const RXCSUM_IPOFLD: u32 = 1 << 8;
pub const RXCSUM_TUOFLD: u32 = 1 << 9;

// RAH bits.
pub const RAH_AV: u32 = 1 << 31;
pub const RAH_ASEL_MASK: u32 = 3 << 16;

/// Ring base/length registers ignore the low bits: descriptors are 16 bytes and rings
/// are allocated in 128-byte units.
pub const RING_BASE_LOW_MASK: u32 = !0xf;
pub const RING_LEN_MASK: u32 = 0x000f_ff80;
/// Head and tail registers hold 16 bits.
pub const RING_INDEX_MASK: u32 = 0xffff;

/// What a register does when the guest touches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegKind {
    /// Stored as written, read back as stored.
    Plain,
    /// A statistics counter: read returns the count and clears it; writes are ignored.
    Counter,
    /// Has side effects handled by the device state.
    Special,
}

/// Classifies a dword-aligned register offset; `None` for registers the model does
/// not implement.
pub fn classify(offset: u32) -> Option<RegKind> {
    use RegKind::*;
    let in_table = |base: u32, words: u32| offset >= base && offset < base + words * 4;
    let kind = match offset {
        CTRL | STATUS | EECD | EERD | MDIC | ICR | ICS | IMS | IMC | RCTL | TCTL | RDBAL
        | RDBAH | RDLEN | RDH | RDT | TDBAL | TDBAH | TDLEN | TDH | TDT | ITR => Special,
        CTRL_EXT | FLA | FCAL | FCAH | FCT | VET | FCTTV | TXCW | RXCW | TIPG | AIT | LEDCTL
        | PBA | FCRTL | FCRTH | RDFH | RDFT | RDFHS | RDFTS | RDFPC | RDTR | RXDCTL | RADV
        | RSRPD | TXDMAC | TDFH | TDFT | TDFHS | TDFTS | TDFPC | TIDV | TXDCTL | TADV | TSPMT
        | RXCSUM | WUC | WUFC | WUS | MANC | IPAV | WUPL => Plain,
        _ if (STATS_START..STATS_END).contains(&offset) => Counter,
        _ if in_table(MTA, MTA_LEN) || in_table(RA, RA_ENTRIES * 2) || in_table(VFTA, VFTA_LEN) => {
            Plain
        }
        _ if in_table(IP4AT, 7) || in_table(IP6AT, 4) || in_table(WUPM, 32) => Plain,
        _ if in_table(FFLT, 8) || in_table(FFMT, 256) || in_table(FFVT, 256) => Plain,
        _ => return None,
    };
    Some(kind)
}

/// Writes that can disable, reset or move a descriptor ring. A tail write only hands
/// the device more descriptors, so the hot path (RDT/TDT) is not among them.
pub fn may_take_rings_away(offset: u32) -> bool {
    matches!(
        offset,
        CTRL | RCTL | TCTL | RDBAL | RDBAH | RDLEN | RDH | TDBAL | TDBAH | TDLEN | TDH
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_known_and_unknown_offsets() {
        assert_eq!(classify(CTRL), Some(RegKind::Special));
        assert_eq!(classify(GPRC), Some(RegKind::Counter));
        assert_eq!(classify(MTA + 127 * 4), Some(RegKind::Plain));
        assert_eq!(classify(RA + RA_ENTRIES * 8), None);
        assert_eq!(classify(RA + 31 * 4), Some(RegKind::Plain));
        assert_eq!(classify(0x0004), None);
        assert_eq!(classify(0x1fffc), None);
        assert_eq!(classify(0x3840), None);
    }
}
