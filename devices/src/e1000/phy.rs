//! The Marvell 88E1011 gigabit PHY inside the 82540EM, reached through MDIC. Link and
//! auto-negotiation follow the backend's link state: negotiation completes at once at
//! 1000 Mb/s full duplex whenever the link is up.

use super::registers::{
    MDIC_DATA_MASK, MDIC_ERROR, MDIC_OP_READ, MDIC_OP_WRITE, MDIC_PHY_SHIFT, MDIC_READY,
    MDIC_REG_SHIFT,
};

/// The only PHY address on the MDIO bus.
pub const PHY_ADDRESS: u32 = 1;

pub const BMCR: usize = 0;
pub const BMSR: usize = 1;
pub const PHY_ID1: usize = 2;
pub const PHY_ID2: usize = 3;
pub const ANAR: usize = 4;
pub const ANLPAR: usize = 5;
pub const ANER: usize = 6;
pub const GBCR: usize = 9;
pub const GBSR: usize = 10;
pub const EXT_STATUS: usize = 15;
pub const M88_SPEC_CTRL: usize = 16;
pub const M88_SPEC_STATUS: usize = 17;
pub const M88_EXT_SPEC_CTRL: usize = 20;

pub const BMCR_RESET: u16 = 1 << 15;
pub const BMCR_ANENABLE: u16 = 1 << 12;
pub const BMCR_ANRESTART: u16 = 1 << 9;
pub const BMCR_FULLDPLX: u16 = 1 << 8;
pub const BMCR_SPEED1000: u16 = 1 << 6;
pub const BMSR_LSTATUS: u16 = 1 << 2;
pub const BMSR_ANEGCOMPLETE: u16 = 1 << 5;

/// Capabilities: extended registers, auto-negotiation, preamble suppression, extended
/// status, 10/100 half and full duplex.
const BMSR_CAPABILITIES: u16 = 0x7949;
/// 88E1011 identifier (OUI 0x005043, model 0x02), revision 0.
const ID1: u16 = 0x0141;
const ID2: u16 = 0x0c20;
/// The link partner advertises 10/100 half and full duplex, pause, and acknowledges.
const LINK_PARTNER_ABILITY: u16 = 0x45e1;
/// Local and remote receivers OK; partner is 1000BASE-T full and half duplex capable.
const GBSR_LINK_UP: u16 = 0x3c00;
/// 1000BASE-T full and half duplex capable.
const EXT_STATUS_VALUE: u16 = 0x3000;
/// Speed 1000, full duplex, speed/duplex resolved, link up.
const M88_STATUS_LINK_UP: u16 = 0xac00;

/// Registers the guest may change; the others are status and read-only.
const WRITABLE: [bool; 32] = {
    let mut w = [false; 32];
    w[BMCR] = true;
    w[ANAR] = true;
    w[7] = true;
    w[GBCR] = true;
    w[M88_SPEC_CTRL] = true;
    w[18] = true;
    w[M88_EXT_SPEC_CTRL] = true;
    w[22] = true;
    w[24] = true;
    w[25] = true;
    w[26] = true;
    w[29] = true;
    w[30] = true;
    w
};

pub struct Phy {
    regs: [u16; 32],
    link_up: bool,
}

/// The outcome of one MDIC command.
pub struct MdicResult {
    /// The value MDIC reads back: data (for reads), ready, and error if the access failed.
    pub mdic: u32,
    /// The link state the PHY reports changed (restarted negotiation, reset).
    pub link_changed: bool,
}

impl Phy {
    pub fn new(link_up: bool) -> Self {
        let mut phy = Phy {
            regs: [0; 32],
            link_up,
        };
        phy.reset();
        phy
    }

    /// Power-on defaults (CTRL.PHY_RST).
    pub fn reset(&mut self) {
        self.regs = [0; 32];
        self.regs[BMCR] = BMCR_ANENABLE | BMCR_FULLDPLX | BMCR_SPEED1000;
        self.regs[PHY_ID1] = ID1;
        self.regs[PHY_ID2] = ID2;
        self.regs[ANAR] = 0x01e1;
        self.regs[GBCR] = 0x0300;
        self.regs[EXT_STATUS] = EXT_STATUS_VALUE;
        self.regs[M88_SPEC_CTRL] = 0x0068;
        self.regs[M88_EXT_SPEC_CTRL] = 0x0d60;
        self.refresh_status();
    }

    pub fn link_up(&self) -> bool {
        self.link_up
    }

    pub fn set_link(&mut self, up: bool) {
        self.link_up = up;
        self.refresh_status();
    }

    fn refresh_status(&mut self) {
        let up = self.link_up;
        self.regs[BMSR] = BMSR_CAPABILITIES
            | if up {
                BMSR_LSTATUS | BMSR_ANEGCOMPLETE
            } else {
                0
            };
        self.regs[ANLPAR] = if up { LINK_PARTNER_ABILITY } else { 0 };
        self.regs[ANER] = if up { 1 } else { 0 };
        self.regs[GBSR] = if up { GBSR_LINK_UP } else { 0 };
        self.regs[M88_SPEC_STATUS] = if up { M88_STATUS_LINK_UP } else { 0 };
    }

    pub fn read(&self, reg: usize) -> u16 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    pub fn write(&mut self, reg: usize, value: u16) {
        if !WRITABLE.get(reg).copied().unwrap_or(false) {
            return;
        }
        if reg == BMCR {
            // Reset and restart self-clear; negotiation completes immediately, and
            // software reset keeps configuration (it commits it on a real 88E1011).
            self.regs[BMCR] = value & !(BMCR_RESET | BMCR_ANRESTART);
            self.refresh_status();
            return;
        }
        self.regs[reg] = value;
    }

    /// Executes the command the guest wrote to MDIC.
    pub fn mdic_command(&mut self, mdic: u32) -> MdicResult {
        let reg = ((mdic >> MDIC_REG_SHIFT) & 0x1f) as usize;
        let phy_address = (mdic >> MDIC_PHY_SHIFT) & 0x1f;
        let op = mdic & (3 << 26);
        let base = mdic & !(MDIC_READY | MDIC_ERROR);
        if phy_address != PHY_ADDRESS || (op != MDIC_OP_READ && op != MDIC_OP_WRITE) {
            return MdicResult {
                mdic: base | MDIC_READY | MDIC_ERROR,
                link_changed: false,
            };
        }
        if op == MDIC_OP_READ {
            let data = u32::from(self.read(reg));
            return MdicResult {
                mdic: (base & !MDIC_DATA_MASK) | data | MDIC_READY,
                link_changed: false,
            };
        }
        let restart = reg == BMCR && (mdic as u16) & (BMCR_RESET | BMCR_ANRESTART) != 0;
        self.write(reg, mdic as u16);
        MdicResult {
            mdic: base | MDIC_READY,
            link_changed: restart && self.link_up,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_cmd(reg: u32) -> u32 {
        MDIC_OP_READ | (PHY_ADDRESS << MDIC_PHY_SHIFT) | (reg << MDIC_REG_SHIFT)
    }

    #[test]
    fn identifies_as_m88e1011_with_link_and_autoneg_complete() {
        let mut phy = Phy::new(true);
        let id1 = phy.mdic_command(read_cmd(2)).mdic;
        let id2 = phy.mdic_command(read_cmd(3)).mdic;
        assert_eq!((id1 & 0xffff) << 16 | (id2 & 0xfff0), 0x0141_0c20);
        let bmsr = phy.mdic_command(read_cmd(1)).mdic;
        assert_ne!(bmsr & MDIC_READY, 0);
        assert_eq!(bmsr & MDIC_ERROR, 0);
        assert_ne!(bmsr as u16 & BMSR_LSTATUS, 0);
        assert_ne!(bmsr as u16 & BMSR_ANEGCOMPLETE, 0);
        assert_eq!(phy.read(GBSR) & 0x0c00, 0x0c00);
    }

    #[test]
    fn wrong_phy_address_reports_error() {
        let mut phy = Phy::new(true);
        let bad = MDIC_OP_READ | (2 << MDIC_PHY_SHIFT) | (1 << MDIC_REG_SHIFT);
        let out = phy.mdic_command(bad).mdic;
        assert_ne!(out & MDIC_ERROR, 0);
        assert_ne!(out & MDIC_READY, 0);
        let no_op = (PHY_ADDRESS << MDIC_PHY_SHIFT) | (1 << MDIC_REG_SHIFT);
        assert_ne!(phy.mdic_command(no_op).mdic & MDIC_ERROR, 0);
    }

    #[test]
    fn writes_stick_and_control_bits_self_clear() {
        let mut phy = Phy::new(true);
        let write = |reg: u32, v: u16| {
            MDIC_OP_WRITE | (PHY_ADDRESS << MDIC_PHY_SHIFT) | (reg << MDIC_REG_SHIFT) | u32::from(v)
        };
        phy.mdic_command(write(4, 0x0de1));
        assert_eq!(phy.read(ANAR), 0x0de1);
        let r = phy.mdic_command(write(0, BMCR_ANENABLE | BMCR_ANRESTART | BMCR_RESET));
        assert!(r.link_changed);
        assert_eq!(phy.read(BMCR) & (BMCR_ANRESTART | BMCR_RESET), 0);
        // Read-only registers ignore writes.
        phy.mdic_command(write(2, 0));
        assert_eq!(phy.read(PHY_ID1), 0x0141);
        phy.set_link(false);
        assert_eq!(phy.read(BMSR) & BMSR_LSTATUS, 0);
        assert_eq!(phy.read(99), 0);
    }
}
