//! A simulated Linux e1000 driver for device tests. It performs the register sequences
//! of drivers/net/ethernet/intel/e1000 (e1000_probe, e1000_reset_hw, e1000_init_hw,
//! e1000_open, e1000_xmit_frame, e1000_intr, e1000_clean_rx_irq) against the model
//! through its BARs, with rings and buffers in a small guest memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tapir_net::backend::{loopback, Offloads};
use tapir_net::mac::MacAddr;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::interrupt::TestIrqLine;
use crate::pci::{PciDevice, PCI_COMMAND, PCI_COMMAND_IO, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY};

use super::eeprom::EEPROM_SUM;
use super::phy::{
    ANAR, ANLPAR, BMCR, BMCR_ANENABLE, BMCR_ANRESTART, BMCR_RESET, BMSR, BMSR_LSTATUS, GBCR, GBSR,
    M88_EXT_SPEC_CTRL, M88_SPEC_CTRL, M88_SPEC_STATUS, PHY_ID1, PHY_ID2,
};
use super::registers::*;
use super::tx::{
    CMD_DEXT, CMD_EOP, CMD_RS, CMD_TSE, CMD_VLE, POPTS_IXSM, POPTS_TXSM, TUCMD_IP, TUCMD_TCP,
    TUCMD_TSE,
};
use super::{E1000, IO_BAR, MMIO_BAR};

pub const MEM_SIZE: usize = 2 << 20;
pub const TX_RING: u64 = 0x1_0000;
pub const RX_RING: u64 = 0x2_0000;
pub const TX_BUFFERS: u64 = 0x4_0000;
pub const RX_BUFFERS: u64 = 0x10_0000;
pub const RING_LEN: u32 = 256;
/// Buffers are spaced for the largest size the tests use (4096 with jumbo frames).
pub const RX_BUFFER_LEN: u64 = 4096;
/// e1000_irq_enable's IMS_ENABLE_MASK.
pub const IMS_ENABLE_MASK: u32 = ICR_RXT0 | ICR_TXDW | ICR_RXDMT0 | ICR_RXSEQ | ICR_LSC;
/// The ITR value e1000_configure_rx programs for 20000 interrupts per second.
pub const LINUX_ITR: u32 = 1_000_000_000 / (20_000 * 256);
/// E1000_MAX_DATA_PER_TXD.
pub const MAX_DATA_PER_TXD: usize = 4096;
const PHY_ADDR: u32 = 1;

/// Polls `cond` until it holds; the device works on its own thread.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Offload requests, as e1000_tso / e1000_tx_csum would build them.
#[derive(Clone, Copy, Debug)]
pub enum TxOffload {
    None,
    Checksum {
        css: u8,
        cso: u8,
        tcp: bool,
    },
    Tso {
        ipcss: u8,
        ipcso: u8,
        ipcse: u16,
        tucss: u8,
        tucso: u8,
        hdr_len: u8,
        mss: u16,
        ipv4: bool,
    },
}

/// One received frame as the driver sees it in the descriptor.
#[derive(Clone, Debug)]
pub struct Received {
    pub data: Vec<u8>,
    pub status: u8,
    pub errors: u8,
    pub special: u16,
    pub descriptors: usize,
}

pub struct TestDriver {
    pub dev: E1000,
    pub mem: GuestMemoryMmap<()>,
    pub irq: Arc<TestIrqLine>,
    pub backend: loopback::LoopbackHandle,
    pub mac: [u8; 6],
    pub tx_count: u32,
    pub rx_count: u32,
    pub tx_next: u32,
    pub rx_next: u32,
    tx_buffer_next: u64,
}

impl TestDriver {
    /// Creates a device on a loopback backend with the given offloads.
    pub fn new(offloads: Offloads) -> TestDriver {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (backend, handle) = loopback::pair(offloads).unwrap();
        let irq = Arc::new(TestIrqLine::default());
        let mac = MacAddr([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
        let dev = E1000::new(mac, Box::new(backend), mem.clone(), irq.clone()).unwrap();
        TestDriver::with_device(dev, mem, irq, handle)
    }

    /// Wraps a device built elsewhere (e.g. on another backend); `backend` is then only
    /// a placeholder handle.
    pub fn with_device(
        dev: E1000,
        mem: GuestMemoryMmap<()>,
        irq: Arc<TestIrqLine>,
        backend: loopback::LoopbackHandle,
    ) -> TestDriver {
        TestDriver {
            dev,
            mem,
            irq,
            backend,
            mac: [0; 6],
            tx_count: RING_LEN,
            rx_count: RING_LEN,
            tx_next: 0,
            rx_next: 0,
            tx_buffer_next: TX_BUFFERS,
        }
    }

    /// A device that has been probed and opened like `ip link set eth0 up`.
    pub fn opened(offloads: Offloads) -> TestDriver {
        let mut d = TestDriver::new(offloads);
        d.probe();
        d.open();
        d
    }

    pub fn er32(&mut self, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        self.dev.bar_read(MMIO_BAR, u64::from(reg), &mut b);
        u32::from_le_bytes(b)
    }

    pub fn ew32(&mut self, reg: u32, value: u32) {
        self.dev
            .bar_write(MMIO_BAR, u64::from(reg), &value.to_le_bytes());
    }

    fn flush(&mut self) {
        self.er32(STATUS);
    }

    /// E1000_WRITE_REG_IO: IOADDR then IODATA through BAR1.
    pub fn io_write_reg(&mut self, reg: u32, value: u32) {
        self.dev.bar_write(IO_BAR, IOADDR, &reg.to_le_bytes());
        self.dev.bar_write(IO_BAR, IODATA, &value.to_le_bytes());
    }

    pub fn io_read_reg(&mut self, reg: u32) -> u32 {
        self.dev.bar_write(IO_BAR, IOADDR, &reg.to_le_bytes());
        let mut b = [0u8; 4];
        self.dev.bar_read(IO_BAR, IODATA, &mut b);
        u32::from_le_bytes(b)
    }

    // ---- PHY (e1000_read_phy_reg_ex / e1000_write_phy_reg_ex) ----

    pub fn read_phy(&mut self, reg: usize) -> Result<u16, &'static str> {
        self.ew32(
            MDIC,
            ((reg as u32) << MDIC_REG_SHIFT) | (PHY_ADDR << MDIC_PHY_SHIFT) | MDIC_OP_READ,
        );
        for _ in 0..64 {
            let mdic = self.er32(MDIC);
            if mdic & MDIC_READY != 0 {
                if mdic & MDIC_ERROR != 0 {
                    return Err("MDI error");
                }
                return Ok(mdic as u16);
            }
        }
        Err("MDI read did not complete")
    }

    pub fn write_phy(&mut self, reg: usize, value: u16) -> Result<(), &'static str> {
        self.ew32(
            MDIC,
            u32::from(value)
                | ((reg as u32) << MDIC_REG_SHIFT)
                | (PHY_ADDR << MDIC_PHY_SHIFT)
                | MDIC_OP_WRITE,
        );
        for _ in 0..641 {
            if self.er32(MDIC) & MDIC_READY != 0 {
                return Ok(());
            }
        }
        Err("MDI write did not complete")
    }

    // ---- EEPROM (Microwire bit-banging, e1000_read_eeprom) ----

    pub fn read_eeprom(&mut self, offset: u16) -> u16 {
        // e1000_acquire_eeprom
        let mut eecd = self.er32(EECD) | EECD_REQ;
        self.ew32(EECD, eecd);
        eecd = self.er32(EECD);
        assert_ne!(eecd & EECD_GNT, 0, "EEPROM grant");
        eecd &= !(EECD_DI | EECD_SK);
        self.ew32(EECD, eecd);
        eecd |= EECD_CS;
        self.ew32(EECD, eecd);
        // Opcode READ (110) then six address bits.
        self.shift_out_ee_bits(0b110, 3);
        self.shift_out_ee_bits(offset, 6);
        let data = self.shift_in_ee_bits(16);
        // e1000_standby_eeprom, then e1000_release_eeprom
        let mut eecd = self.er32(EECD);
        eecd &= !(EECD_CS | EECD_SK);
        self.ew32(EECD, eecd);
        eecd |= EECD_SK;
        self.ew32(EECD, eecd);
        eecd |= EECD_CS;
        self.ew32(EECD, eecd);
        eecd &= !EECD_SK;
        self.ew32(EECD, eecd);
        eecd &= !(EECD_CS | EECD_DI);
        self.ew32(EECD, eecd);
        self.ew32(EECD, eecd | EECD_SK);
        self.ew32(EECD, eecd);
        self.ew32(EECD, eecd & !EECD_REQ);
        data
    }

    fn shift_out_ee_bits(&mut self, data: u16, count: u32) {
        let mut eecd = self.er32(EECD) & !EECD_DO;
        for i in (0..count).rev() {
            eecd &= !EECD_DI;
            if data >> i & 1 == 1 {
                eecd |= EECD_DI;
            }
            self.ew32(EECD, eecd);
            self.ew32(EECD, eecd | EECD_SK);
            self.ew32(EECD, eecd);
        }
        eecd &= !EECD_DI;
        self.ew32(EECD, eecd);
    }

    fn shift_in_ee_bits(&mut self, count: u32) -> u16 {
        let mut eecd = self.er32(EECD) & !(EECD_DO | EECD_DI);
        let mut data = 0u16;
        for _ in 0..count {
            data <<= 1;
            self.ew32(EECD, eecd | EECD_SK);
            eecd = self.er32(EECD) & !EECD_DI;
            if eecd & EECD_DO != 0 {
                data |= 1;
            }
            eecd &= !(EECD_SK | EECD_DO);
            self.ew32(EECD, eecd);
        }
        data
    }

    // ---- probe ----

    /// e1000_reset_hw for an 82540.
    pub fn reset_hw(&mut self) {
        self.ew32(IMC, 0xffff_ffff);
        self.ew32(RCTL, 0);
        self.ew32(TCTL, TCTL_PSP);
        self.flush();
        let ctrl = self.er32(CTRL);
        // The 82540 cannot ack a 64-bit write of the reset, so the driver uses I/O.
        self.io_write_reg(CTRL, ctrl | CTRL_RST);
        let manc = self.er32(MANC);
        self.ew32(MANC, manc & !(1 << 13));
        self.ew32(IMC, 0xffff_ffff);
        self.er32(ICR);
    }

    /// e1000_probe through register_netdev, then the VLAN setup that follows.
    pub fn probe(&mut self) {
        // pci_enable_device + pci_set_master
        let mut id = [0u8; 4];
        self.dev.config_read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x100e_8086);
        self.dev.config_write(
            PCI_COMMAND,
            &(PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER).to_le_bytes(),
        );
        // e1000_init_hw_struct: media type and bus info come from STATUS.
        let status = self.er32(STATUS);
        assert_eq!(status & (1 << 5), 0, "copper, not TBI");
        // e1000_sw_init -> e1000_irq_disable
        self.ew32(IMC, !0);
        self.flush();
        // e1000_init_eeprom_params: EECD.SIZE clear means 64 words.
        assert_eq!(self.er32(EECD) & (1 << 9), 0);
        self.reset_hw();
        let sum = (0..=0x3f).fold(0u16, |acc, w| acc.wrapping_add(self.read_eeprom(w)));
        assert_eq!(sum, EEPROM_SUM, "EEPROM checksum");
        for i in 0..3u16 {
            let word = self.read_eeprom(i);
            self.mac[usize::from(i) * 2] = word as u8;
            self.mac[usize::from(i) * 2 + 1] = (word >> 8) as u8;
        }
        self.read_eeprom(0x24);
        self.reset();
        // e1000_vlan_filter_on_off(false) and e1000_vlan_mode with CTAG_RX on.
        let rctl = self.er32(RCTL);
        self.ew32(RCTL, rctl & !RCTL_VFE);
        let ctrl = self.er32(CTRL);
        self.ew32(CTRL, ctrl | CTRL_VME);
    }

    /// e1000_reset: PBA, reset_hw, init_hw, VET, PHY info.
    pub fn reset(&mut self) {
        self.ew32(PBA, 0x30);
        self.reset_hw();
        self.ew32(WUC, 0);
        self.init_hw();
        self.ew32(VET, 0x8100);
        self.phy_get_info();
    }

    fn init_hw(&mut self) {
        // e1000_id_led_init
        self.read_eeprom(0x04);
        self.er32(LEDCTL);
        self.er32(STATUS);
        self.ew32(VET, 0);
        for i in 0..VFTA_LEN {
            self.ew32(VFTA + i * 4, 0);
        }
        // e1000_init_rx_addrs
        let m = self.mac;
        self.ew32(RA, u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
        self.ew32(RA + 4, u32::from(u16::from_le_bytes([m[4], m[5]])) | RAH_AV);
        for i in 1..RA_ENTRIES {
            self.ew32(RA + i * 8, 0);
            self.ew32(RA + i * 8 + 4, 0);
        }
        for i in 0..MTA_LEN {
            self.ew32(MTA + i * 4, 0);
        }
        self.setup_link();
        let txdctl = self.er32(TXDCTL);
        self.ew32(TXDCTL, (txdctl & !0x003f_0000) | 0x0100_0000);
        // e1000_clear_hw_cntrs
        for reg in (STATS_START..STATS_END).step_by(4) {
            self.er32(reg);
        }
    }

    fn setup_link(&mut self) {
        let word0f = self.read_eeprom(0x0f);
        let _flow_control = word0f & 0x3000;
        // e1000_copper_link_preconfig
        let ctrl = self.er32(CTRL);
        self.ew32(CTRL, (ctrl | CTRL_SLU) & !((1 << 11) | (1 << 12)));
        // e1000_detect_gig_phy
        let id = u32::from(self.read_phy(PHY_ID1).unwrap()) << 16
            | u32::from(self.read_phy(PHY_ID2).unwrap() & 0xfff0);
        assert_eq!(id, 0x0141_0c20, "M88E1011_I_PHY_ID");
        // e1000_copper_link_mgp_setup
        let pscr = self.read_phy(M88_SPEC_CTRL).unwrap();
        self.write_phy(M88_SPEC_CTRL, (pscr | 0x0800) | 0x0060)
            .unwrap();
        let epscr = self.read_phy(M88_EXT_SPEC_CTRL).unwrap();
        self.write_phy(M88_EXT_SPEC_CTRL, epscr | 0x0070).unwrap();
        let bmcr = self.read_phy(BMCR).unwrap();
        self.write_phy(BMCR, bmcr | BMCR_RESET).unwrap();
        // e1000_copper_link_autoneg -> e1000_phy_setup_autoneg
        let anar = self.read_phy(ANAR).unwrap();
        let gbcr = self.read_phy(GBCR).unwrap();
        self.write_phy(ANAR, (anar & !0x01e0) | 0x01e0).unwrap();
        self.write_phy(GBCR, (gbcr & !0x0300) | 0x0200).unwrap();
        let bmcr = self.read_phy(BMCR).unwrap();
        self.write_phy(BMCR, bmcr | BMCR_ANENABLE | BMCR_ANRESTART)
            .unwrap();
        // Link check: PHY status twice, then post-config.
        self.read_phy(BMSR).unwrap();
        let bmsr = self.read_phy(BMSR).unwrap();
        if bmsr & BMSR_LSTATUS != 0 {
            let tctl = self.er32(TCTL);
            self.ew32(TCTL, (tctl & !(0x3ff << 12)) | (0x40 << 12));
            self.read_phy(BMSR).unwrap();
            self.read_phy(BMSR).unwrap();
            self.read_phy(ANAR).unwrap();
            self.read_phy(ANLPAR).unwrap();
            self.er32(STATUS);
        }
        self.ew32(FCT, 0x8808);
        self.ew32(FCAH, 0x0100);
        self.ew32(FCAL, 0x00c2_8001);
        self.ew32(FCTTV, 0x0680);
        self.ew32(FCRTL, 0);
        self.ew32(FCRTH, 0);
    }

    fn phy_get_info(&mut self) {
        self.read_phy(BMSR).unwrap();
        let bmsr = self.read_phy(BMSR).unwrap();
        if bmsr & BMSR_LSTATUS != 0 {
            self.read_phy(M88_SPEC_CTRL).unwrap();
            let pssr = self.read_phy(M88_SPEC_STATUS).unwrap();
            assert_eq!(pssr & 0xc000, 0x8000, "1000 Mb/s");
            self.read_phy(GBSR).unwrap();
        }
    }

    // ---- open ----

    /// e1000_open: power up the PHY, configure, enable interrupts, kick the watchdog
    /// with an LSC, then run the watchdog's link-up path from the interrupt.
    pub fn open(&mut self) {
        let bmcr = self.read_phy(BMCR).unwrap();
        self.write_phy(BMCR, bmcr & !(1 << 11)).unwrap();
        self.set_rx_mode(false, false);
        self.configure_tx();
        self.setup_rctl(false);
        self.configure_rx();
        self.alloc_rx_buffers(self.rx_count - 1);
        self.ew32(IMS, IMS_ENABLE_MASK);
        self.flush();
        self.ew32(ICS, ICR_LSC);
        assert!(self.irq.asserted(), "LSC raised on open");
        let icr = self.intr();
        assert_ne!(icr & ICR_LSC, 0);
        self.watchdog();
    }

    /// e1000_set_rx_mode.
    pub fn set_rx_mode(&mut self, promisc: bool, allmulti: bool) {
        let mut rctl = self.er32(RCTL);
        if promisc {
            rctl |= RCTL_UPE | RCTL_MPE;
            rctl &= !RCTL_VFE;
        } else {
            rctl &= !(RCTL_UPE | RCTL_MPE);
            if allmulti {
                rctl |= RCTL_MPE;
            }
        }
        self.ew32(RCTL, rctl);
        for i in 1..RA_ENTRIES {
            self.ew32(RA + i * 8, 0);
            self.ew32(RA + i * 8 + 4, 0);
        }
        for i in (0..MTA_LEN).rev() {
            self.ew32(MTA + i * 4, 0);
        }
    }

    pub fn configure_tx(&mut self) {
        self.ew32(TDLEN, self.tx_count * 16);
        self.ew32(TDBAH, (TX_RING >> 32) as u32);
        self.ew32(TDBAL, TX_RING as u32);
        self.ew32(TDT, 0);
        self.ew32(TDH, 0);
        self.tx_next = 0;
        self.ew32(TIPG, 8 | (8 << 10) | (6 << 20));
        self.ew32(TIDV, 8);
        self.ew32(TADV, 32);
        let tctl = self.er32(TCTL) & !(0xff << 4);
        self.ew32(TCTL, tctl | TCTL_PSP | (1 << 24) | (0x0f << 4));
        // Clear the ring memory as dma_alloc_coherent + memset do.
        self.mem
            .write_slice(
                &vec![0u8; self.tx_count as usize * 16],
                GuestAddress(TX_RING),
            )
            .unwrap();
    }

    /// e1000_setup_rctl (2048-byte buffers unless `jumbo`, then 4096 with LPE).
    pub fn setup_rctl(&mut self, jumbo: bool) {
        let mut rctl = self.er32(RCTL) & !(3 << RCTL_MO_SHIFT);
        rctl |= RCTL_BAM | (0 << RCTL_RDMTS_SHIFT);
        rctl &= !(3 << RCTL_BSIZE_SHIFT);
        if jumbo {
            rctl |= RCTL_LPE | RCTL_BSEX | (3 << RCTL_BSIZE_SHIFT);
        } else {
            rctl &= !(RCTL_LPE | RCTL_BSEX);
        }
        self.ew32(RCTL, rctl);
    }

    pub fn configure_rx(&mut self) {
        let rctl = self.er32(RCTL);
        self.ew32(RCTL, rctl & !RCTL_EN);
        self.ew32(RDTR, 0);
        self.ew32(RADV, 8);
        self.ew32(ITR, LINUX_ITR);
        self.ew32(RDLEN, self.rx_count * 16);
        self.ew32(RDBAH, (RX_RING >> 32) as u32);
        self.ew32(RDBAL, RX_RING as u32);
        self.ew32(RDT, 0);
        self.ew32(RDH, 0);
        self.rx_next = 0;
        let rxcsum = self.er32(RXCSUM);
        self.ew32(RXCSUM, rxcsum | RXCSUM_TUOFLD);
        self.ew32(RCTL, rctl | RCTL_EN);
    }

    pub fn rx_buffer(&self, index: u32) -> u64 {
        RX_BUFFERS + u64::from(index) * RX_BUFFER_LEN
    }

    /// e1000_alloc_rx_buffers: fill `count` descriptors from next_to_use, then write
    /// RDT to the last one filled (the legacy driver's convention).
    pub fn alloc_rx_buffers(&mut self, count: u32) {
        for i in 0..count {
            let index = (self.rx_next + i) % self.rx_count;
            self.write_rx_descriptor(index, self.rx_buffer(index));
        }
        let tail = (self.rx_next + count) % self.rx_count;
        self.ew32(RDT, tail);
    }

    pub fn write_rx_descriptor(&self, index: u32, buffer: u64) {
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&buffer.to_le_bytes());
        self.mem
            .write_slice(&desc, GuestAddress(RX_RING + u64::from(index) * 16))
            .unwrap();
    }

    // ---- interrupts ----

    /// e1000_intr up to napi_schedule: read ICR (acknowledging it) and mask everything.
    pub fn intr(&mut self) -> u32 {
        let icr = self.er32(ICR);
        self.ew32(IMC, !0);
        self.flush();
        icr
    }

    /// The end of e1000_clean: re-enable interrupts.
    pub fn irq_enable(&mut self) {
        self.ew32(IMS, IMS_ENABLE_MASK);
        self.flush();
    }

    /// e1000_watchdog's link-up path: check the link and enable transmits.
    pub fn watchdog(&mut self) {
        self.read_phy(BMSR).unwrap();
        let bmsr = self.read_phy(BMSR).unwrap();
        assert_ne!(bmsr & BMSR_LSTATUS, 0, "PHY reports link");
        let status = self.er32(STATUS);
        assert_eq!(
            status & (STATUS_LU | STATUS_FD | STATUS_SPEED_1000),
            STATUS_LU | STATUS_FD | STATUS_SPEED_1000
        );
        let tctl = self.er32(TCTL);
        self.ew32(TCTL, tctl | TCTL_EN);
        self.irq_enable();
    }

    // ---- transmit ----

    fn tx_descriptor_address(&self, index: u32) -> u64 {
        TX_RING + u64::from(index) * 16
    }

    pub fn write_tx_descriptor(&self, index: u32, raw: &[u8; 16]) {
        self.mem
            .write_slice(raw, GuestAddress(self.tx_descriptor_address(index)))
            .unwrap();
    }

    pub fn tx_status(&self, index: u32) -> u8 {
        self.mem
            .read_obj(GuestAddress(self.tx_descriptor_address(index) + 12))
            .unwrap()
    }

    fn stage(&mut self, data: &[u8]) -> u64 {
        let addr = self.tx_buffer_next;
        if addr + data.len() as u64 > RX_BUFFERS {
            self.tx_buffer_next = TX_BUFFERS;
            return self.stage(data);
        }
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        self.tx_buffer_next = (addr + data.len() as u64 + 63) & !63;
        addr
    }

    /// Queues descriptors for `frame` like e1000_xmit_frame (without writing TDT):
    /// a context descriptor when offloading, then buffers of at most `chunk` bytes.
    /// Returns the index of the EOP descriptor.
    pub fn queue_frame(
        &mut self,
        frame: &[u8],
        offload: TxOffload,
        chunk: usize,
        vlan: Option<u16>,
    ) -> u32 {
        let (mut lower_cmd, mut popts) = (0u8, 0u8);
        match offload {
            TxOffload::None => {}
            TxOffload::Checksum { css, cso, tcp } => {
                let mut ctx = [0u8; 16];
                ctx[4] = css;
                ctx[5] = cso;
                ctx[11] = CMD_DEXT | if tcp { TUCMD_TCP } else { 0 };
                self.write_tx_descriptor(self.tx_next, &ctx);
                self.tx_next = (self.tx_next + 1) % self.tx_count;
                lower_cmd = CMD_DEXT;
                popts = POPTS_TXSM;
            }
            TxOffload::Tso {
                ipcss,
                ipcso,
                ipcse,
                tucss,
                tucso,
                hdr_len,
                mss,
                ipv4,
            } => {
                let mut ctx = [0u8; 16];
                ctx[0] = ipcss;
                ctx[1] = ipcso;
                ctx[2..4].copy_from_slice(&ipcse.to_le_bytes());
                ctx[4] = tucss;
                ctx[5] = tucso;
                let paylen = (frame.len() - usize::from(hdr_len)) as u32;
                ctx[8..12].copy_from_slice(&paylen.to_le_bytes());
                ctx[11] = CMD_DEXT | TUCMD_TSE | TUCMD_TCP | if ipv4 { TUCMD_IP } else { 0 };
                ctx[13] = hdr_len;
                ctx[14..16].copy_from_slice(&mss.to_le_bytes());
                self.write_tx_descriptor(self.tx_next, &ctx);
                self.tx_next = (self.tx_next + 1) % self.tx_count;
                lower_cmd = CMD_DEXT | CMD_TSE;
                popts = POPTS_TXSM | if ipv4 { POPTS_IXSM } else { 0 };
            }
        }
        if vlan.is_some() {
            lower_cmd |= CMD_VLE;
        }
        let pieces: Vec<&[u8]> = if frame.is_empty() {
            vec![frame]
        } else {
            frame.chunks(chunk.max(1)).collect()
        };
        let mut last = self.tx_next;
        for (i, piece) in pieces.iter().enumerate() {
            let addr = self.stage(piece);
            let mut desc = [0u8; 16];
            desc[..8].copy_from_slice(&addr.to_le_bytes());
            desc[8..10].copy_from_slice(&(piece.len() as u16).to_le_bytes());
            let mut cmd = lower_cmd | 0x02; // IFCS
            if lower_cmd & CMD_DEXT != 0 {
                desc[10] = 0x10; // DTYP data
                desc[13] = popts;
            }
            if i + 1 == pieces.len() {
                cmd |= CMD_EOP | CMD_RS;
            }
            desc[11] = cmd;
            if let Some(tag) = vlan {
                desc[14..16].copy_from_slice(&tag.to_le_bytes());
            }
            last = self.tx_next;
            self.write_tx_descriptor(self.tx_next, &desc);
            self.tx_next = (self.tx_next + 1) % self.tx_count;
        }
        last
    }

    /// e1000_xmit_frame: queue and ring the doorbell.
    pub fn xmit(&mut self, frame: &[u8], offload: TxOffload) -> u32 {
        let eop = self.queue_frame(frame, offload, MAX_DATA_PER_TXD, None);
        self.ew32(TDT, self.tx_next);
        eop
    }

    /// Waits for the device to write DD into descriptor `index`.
    pub fn wait_tx_done(&mut self, index: u32) {
        wait_for("TX descriptor done", || self.tx_status(index) & 1 == 1);
    }

    /// Waits for the device to consume the ring up to the tail.
    pub fn wait_tx_idle(&mut self) {
        let tail = self.er32(TDT);
        wait_for("TX head to reach tail", || self.er32(TDH) == tail);
    }

    // ---- receive ----

    pub fn rx_descriptor(&self, index: u32) -> [u8; 16] {
        let mut raw = [0u8; 16];
        self.mem
            .read_slice(&mut raw, GuestAddress(RX_RING + u64::from(index) * 16))
            .unwrap();
        raw
    }

    /// e1000_clean_rx_irq for one frame (possibly chained as in the jumbo path):
    /// waits for DD, collects buffers until EOP, clears status and returns the buffers
    /// to the device.
    pub fn receive(&mut self) -> Received {
        let mut data = Vec::new();
        let mut descriptors = 0;
        loop {
            let index = self.rx_next;
            wait_for("RX descriptor done", || {
                self.rx_descriptor(index)[12] & 1 == 1
            });
            let raw = self.rx_descriptor(index);
            let len = usize::from(u16::from_le_bytes([raw[8], raw[9]]));
            let buffer = u64::from_le_bytes(raw[..8].try_into().unwrap());
            let mut chunk = vec![0u8; len];
            self.mem
                .read_slice(&mut chunk, GuestAddress(buffer))
                .unwrap();
            data.extend_from_slice(&chunk);
            descriptors += 1;
            // Give the buffer back: clear the status and move the tail.
            self.write_rx_descriptor(index, self.rx_buffer(index));
            let tail = self.er32(RDT);
            self.ew32(RDT, (tail + 1) % self.rx_count);
            self.rx_next = (index + 1) % self.rx_count;
            if raw[12] & 0x02 != 0 {
                return Received {
                    data,
                    status: raw[12],
                    errors: raw[13],
                    special: u16::from_le_bytes([raw[14], raw[15]]),
                    descriptors,
                };
            }
        }
    }
}
