//! The register file and everything behind it that the vCPU path and the worker share:
//! register semantics, reset, EEPROM, PHY, interrupt logic with throttling, counters.
//! It lives behind one mutex; callers keep their critical sections short.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::interrupt::IrqLine;

use super::eeprom::Eeprom;
use super::itr_timer::ItrTimer;
use super::phy::Phy;
use super::registers::*;
use super::rx::{Filter, RxConfig};
use super::stats::DeviceCounters;

/// A descriptor ring as the registers describe it, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    pub base: u64,
    /// Number of descriptors (RDLEN/TDLEN divided by 16).
    pub count: u32,
    pub head: u32,
    pub tail: u32,
    /// Changes whenever the guest reprograms the ring or resets the device; a worker
    /// holding an older generation must not write the head back.
    pub generation: u64,
}

impl Ring {
    /// Descriptors the hardware owns (between head and tail).
    pub fn owned(&self) -> u32 {
        (self.tail + self.count - self.head) % self.count
    }
}

/// Why a ring cannot be used as programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingFault {
    ZeroLength,
    HeadOutOfRange,
    TailOutOfRange,
}

impl RingFault {
    pub fn describe(&self) -> &'static str {
        match self {
            RingFault::ZeroLength => "descriptor ring length is zero",
            RingFault::HeadOutOfRange => "head index beyond the ring",
            RingFault::TailOutOfRange => "tail index beyond the ring",
        }
    }
}

pub struct State {
    regs: Vec<u32>,
    eeprom: Eeprom,
    phy: Phy,
    mac: [u8; 6],
    irq: Arc<dyn IrqLine>,
    timer: ItrTimer,
    /// The device's interrupt output after throttling (PCI status "interrupt").
    asserted: bool,
    /// What the INTx line was last driven to.
    line_level: bool,
    last_assert: Option<Instant>,
    timer_armed: bool,
    intx_disabled: bool,
    bus_master: bool,
    tx_generation: u64,
    rx_generation: u64,
    reset_generation: u64,
    pub counters: DeviceCounters,
}

fn idx(offset: u32) -> usize {
    (offset / 4) as usize
}

impl State {
    pub fn new(mac: [u8; 6], link_up: bool, irq: Arc<dyn IrqLine>, timer: ItrTimer) -> Self {
        let mut state = State {
            regs: vec![0; (MMIO_SIZE / 4) as usize],
            eeprom: Eeprom::new(mac),
            phy: Phy::new(link_up),
            mac,
            irq,
            timer,
            asserted: false,
            line_level: false,
            last_assert: None,
            timer_armed: false,
            intx_disabled: false,
            bus_master: false,
            tx_generation: 0,
            rx_generation: 0,
            reset_generation: 0,
            counters: DeviceCounters::default(),
        };
        state.reset();
        state
    }

    fn reg(&self, offset: u32) -> u32 {
        self.regs.get(idx(offset)).copied().unwrap_or(0)
    }

    fn set(&mut self, offset: u32, value: u32) {
        if let Some(r) = self.regs.get_mut(idx(offset)) {
            *r = value;
        }
    }

    /// Device reset (CTRL.RST and power-on): everything but PCI configuration, the
    /// EEPROM contents and the PHY.
    fn reset(&mut self) {
        self.regs.fill(0);
        self.set(CTRL, CTRL_FD | CTRL_SLU | CTRL_SPD_1000);
        self.set(LEDCTL, 0x0706_8302);
        self.set(PBA, 0x0010_0030);
        self.set(VET, u32::from(super::checksum::ETHERTYPE_VLAN));
        self.set(RXCSUM, RXCSUM_IPOFLD | RXCSUM_TUOFLD);
        // The MAC auto-loads the station address from the EEPROM into RA[0].
        let [a, b, c, d, e, f] = self.mac;
        self.set(RA, u32::from_le_bytes([a, b, c, d]));
        self.set(RA + 4, u32::from(u16::from_le_bytes([e, f])) | RAH_AV);
        self.eeprom.write_eecd(0);
        self.tx_generation += 1;
        self.rx_generation += 1;
        self.reset_generation += 1;
        self.last_assert = None;
        self.update_irq();
    }

    pub fn reset_generation(&self) -> u64 {
        self.reset_generation
    }

    /// A guest register read (dword-aligned offset inside BAR0).
    pub fn read(&mut self, offset: u32) -> u32 {
        match classify(offset) {
            None => {
                self.counters.drop_event(
                    "unimplemented_register",
                    &format_args!("read at {offset:#07x}"),
                );
                0
            }
            Some(RegKind::Plain) => self.reg(offset),
            Some(RegKind::Counter) => {
                let value = self.reg(offset);
                self.set(offset, 0);
                value
            }
            Some(RegKind::Special) => self.read_special(offset),
        }
    }

    fn read_special(&mut self, offset: u32) -> u32 {
        match offset {
            STATUS => {
                let link = self.phy.link_up() && self.reg(CTRL) & CTRL_PHY_RST == 0;
                STATUS_FD | STATUS_SPEED_1000 | STATUS_ASDV_1000 | if link { STATUS_LU } else { 0 }
            }
            EECD => self.eeprom.read_eecd(),
            ICR => {
                let value = self.reg(ICR);
                self.set(ICR, 0);
                self.update_irq();
                value
            }
            // Write-only registers.
            ICS | IMC => 0,
            _ => self.reg(offset),
        }
    }

    /// A guest register write. Returns true when the worker should look at the rings.
    pub fn write(&mut self, offset: u32, value: u32) -> bool {
        match classify(offset) {
            None => {
                self.counters.drop_event(
                    "unimplemented_register",
                    &format_args!("write of {value:#x} at {offset:#07x}"),
                );
                false
            }
            Some(RegKind::Plain) => {
                self.set(offset, value);
                false
            }
            Some(RegKind::Counter) => false,
            Some(RegKind::Special) => self.write_special(offset, value),
        }
    }

    fn write_special(&mut self, offset: u32, value: u32) -> bool {
        match offset {
            CTRL => {
                if value & CTRL_RST != 0 {
                    self.reset();
                    return true;
                }
                let old = self.reg(CTRL);
                self.set(CTRL, value);
                if old & CTRL_PHY_RST != 0 && value & CTRL_PHY_RST == 0 {
                    self.phy.reset();
                }
                false
            }
            STATUS => false,
            EECD => {
                self.eeprom.write_eecd(value);
                false
            }
            EERD => {
                if value & EERD_START != 0 {
                    let addr = (value >> EERD_ADDR_SHIFT) & 0xff;
                    let data = self.eeprom.word(addr as usize).unwrap_or(0);
                    self.set(
                        EERD,
                        (u32::from(data) << EERD_DATA_SHIFT)
                            | (addr << EERD_ADDR_SHIFT)
                            | EERD_DONE,
                    );
                } else {
                    self.set(EERD, value & !EERD_DONE);
                }
                false
            }
            MDIC => {
                let result = self.phy.mdic_command(value);
                self.set(MDIC, result.mdic);
                let mut cause = 0;
                if value & MDIC_INT_EN != 0 {
                    cause |= ICR_MDAC;
                }
                if result.link_changed {
                    cause |= ICR_LSC;
                }
                self.raise(cause);
                false
            }
            ICR => {
                let pending = self.reg(ICR) & !value;
                self.set(ICR, pending);
                self.update_irq();
                false
            }
            ICS => {
                self.raise(value & ICR_VALID);
                false
            }
            IMS => {
                let mask = self.reg(IMS) | (value & ICR_VALID);
                self.set(IMS, mask);
                self.update_irq();
                false
            }
            IMC => {
                let mask = self.reg(IMS) & !value;
                self.set(IMS, mask);
                self.update_irq();
                false
            }
            ITR => {
                self.set(ITR, value & 0xffff);
                false
            }
            RCTL => {
                self.set(RCTL, value);
                true
            }
            TCTL => {
                self.set(TCTL, value);
                true
            }
            RDBAL | TDBAL => self.write_ring(offset, value & RING_BASE_LOW_MASK),
            RDLEN | TDLEN => self.write_ring(offset, value & RING_LEN_MASK),
            RDH | TDH => self.write_ring(offset, value & RING_INDEX_MASK),
            RDBAH | TDBAH => self.write_ring(offset, value),
            RDT | TDT => {
                self.set(offset, value & RING_INDEX_MASK);
                true
            }
            _ => {
                self.set(offset, value);
                false
            }
        }
    }

    fn write_ring(&mut self, offset: u32, value: u32) -> bool {
        self.set(offset, value);
        if offset >= TDBAL {
            self.tx_generation += 1;
        } else {
            self.rx_generation += 1;
        }
        true
    }

    /// Sets interrupt causes and updates the line.
    pub fn raise(&mut self, causes: u32) {
        if causes != 0 {
            let icr = self.reg(ICR) | causes;
            self.set(ICR, icr);
        }
        self.update_irq();
    }

    /// Drives INTx from ICR & IMS, holding back a new assertion until the ITR interval
    /// since the previous one has passed (the timer then calls back in).
    pub fn update_irq(&mut self) {
        let pending = self.reg(ICR) & self.reg(IMS) != 0;
        if !pending {
            self.asserted = false;
        } else if !self.asserted {
            let interval = Duration::from_nanos(u64::from(self.reg(ITR) & 0xffff) * 256);
            let now = Instant::now();
            let ready_at = self.last_assert.map(|last| last + interval);
            match ready_at {
                Some(at) if at > now => {
                    if !self.timer_armed {
                        match self.timer.arm(at - now) {
                            Ok(()) => self.timer_armed = true,
                            // Without a timer, throttling would strand the interrupt.
                            Err(e) => {
                                log::warn!("e1000: ITR timer: {e}");
                                self.assert_now(now);
                            }
                        }
                    }
                }
                _ => self.assert_now(now),
            }
        }
        let level = self.asserted && !self.intx_disabled;
        if level != self.line_level {
            self.line_level = level;
            self.irq.set_level(level);
        }
    }

    fn assert_now(&mut self, now: Instant) {
        self.asserted = true;
        self.last_assert = Some(now);
        self.counters.interrupts += 1;
    }

    /// The worker saw the ITR timer expire.
    pub fn itr_expired(&mut self) {
        self.timer_armed = false;
        self.update_irq();
    }

    pub fn itr_timer(&self) -> &ItrTimer {
        &self.timer
    }

    /// PCI status bit 3.
    pub fn interrupt_status(&self) -> bool {
        self.asserted
    }

    /// PCI command register changes: INTx disable masks the line, bus mastering gates
    /// all descriptor and buffer DMA.
    pub fn set_pci_command(&mut self, intx_disabled: bool, bus_master: bool) {
        self.intx_disabled = intx_disabled;
        self.bus_master = bus_master;
        self.update_irq();
    }

    /// The backend's link state; a change raises LSC.
    pub fn set_link(&mut self, up: bool) {
        if self.phy.link_up() != up {
            self.phy.set_link(up);
            self.raise(ICR_LSC);
        }
    }

    fn ring(&self, base_low: u32, generation: u64) -> Result<Ring, RingFault> {
        let base = u64::from(self.reg(base_low + 4)) << 32 | u64::from(self.reg(base_low));
        let count = self.reg(base_low + 8) / 16;
        let head = self.reg(base_low + 0x10);
        let tail = self.reg(base_low + 0x18);
        if count == 0 {
            Err(RingFault::ZeroLength)
        } else if head >= count {
            Err(RingFault::HeadOutOfRange)
        } else if tail >= count {
            Err(RingFault::TailOutOfRange)
        } else {
            Ok(Ring {
                base,
                count,
                head,
                tail,
                generation,
            })
        }
    }

    /// The transmit ring, or `None` while transmit is disabled.
    pub fn tx_ring(&self) -> Option<Result<Ring, RingFault>> {
        (self.bus_master && self.reg(TCTL) & TCTL_EN != 0)
            .then(|| self.ring(TDBAL, self.tx_generation))
    }

    pub fn tx_generation(&self) -> u64 {
        self.tx_generation
    }

    /// The receive ring, or `None` while receive is disabled.
    pub fn rx_ring(&self) -> Option<Result<Ring, RingFault>> {
        (self.bus_master && self.reg(RCTL) & RCTL_EN != 0)
            .then(|| self.ring(RDBAL, self.rx_generation))
    }

    pub fn rx_generation(&self) -> u64 {
        self.rx_generation
    }

    pub fn pad_short_frames(&self) -> bool {
        self.reg(TCTL) & TCTL_PSP != 0
    }

    pub fn vlan_enabled(&self) -> bool {
        self.reg(CTRL) & CTRL_VME != 0
    }

    pub fn vlan_ethertype(&self) -> u16 {
        self.reg(VET) as u16
    }

    pub fn rx_config(&self) -> RxConfig {
        RxConfig {
            rctl: self.reg(RCTL),
            strip_vlan: self.vlan_enabled(),
            vlan_ethertype: self.vlan_ethertype(),
            rxcsum: self.reg(RXCSUM),
        }
    }

    pub fn filter(&self) -> Filter<'_> {
        let table = |base: u32, words: u32| &self.regs[idx(base)..idx(base) + words as usize];
        Filter {
            rctl: self.reg(RCTL),
            receive_addresses: table(RA, RA_ENTRIES * 2),
            multicast_table: table(MTA, MTA_LEN),
            vlan_table: table(VFTA, VFTA_LEN),
            vlan_ethertype: self.vlan_ethertype(),
        }
    }

    pub fn stats_regs(&mut self) -> &mut [u32] {
        &mut self.regs
    }

    /// The worker finished transmit descriptors up to `new_head`.
    pub fn complete_tx(&mut self, generation: u64, new_head: u32, reported: bool) {
        if generation != self.tx_generation {
            return;
        }
        self.set(TDH, new_head);
        let mut causes = 0;
        if reported {
            causes |= ICR_TXDW;
        }
        if new_head == self.reg(TDT) {
            causes |= ICR_TXQE;
        }
        self.raise(causes);
    }

    /// The worker filled receive descriptors up to `new_head`.
    pub fn complete_rx(&mut self, generation: u64, new_head: u32) {
        if generation != self.rx_generation {
            return;
        }
        self.set(RDH, new_head);
        let mut causes = ICR_RXT0;
        if let Ok(ring) = self.ring(RDBAL, self.rx_generation) {
            let shift = ((self.reg(RCTL) >> RCTL_RDMTS_SHIFT) & 3) + 1;
            if ring.owned() <= ring.count >> shift {
                causes |= ICR_RXDMT0;
            }
        }
        self.raise(causes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::TestIrqLine;

    fn state() -> (State, Arc<TestIrqLine>) {
        let irq = Arc::new(TestIrqLine::default());
        let mut s = State::new(
            [2, 0, 0, 0, 0, 1],
            true,
            irq.clone(),
            ItrTimer::new().unwrap(),
        );
        s.set_pci_command(false, true);
        (s, irq)
    }

    #[test]
    fn icr_is_read_to_clear_and_drives_the_line() {
        let (mut s, irq) = state();
        s.write(ICS, ICR_TXDW);
        assert!(!irq.asserted(), "masked causes do not interrupt");
        s.write(IMS, ICR_TXDW | ICR_RXT0);
        assert!(irq.asserted());
        assert!(s.interrupt_status());
        assert_eq!(s.read(IMS), ICR_TXDW | ICR_RXT0);
        assert_eq!(s.read(ICR), ICR_TXDW);
        assert!(!irq.asserted());
        assert_eq!(s.read(ICR), 0);
        s.write(ICS, ICR_RXT0);
        assert!(irq.asserted());
        s.write(IMC, ICR_RXT0);
        assert!(!irq.asserted());
        s.set_pci_command(true, true);
        s.write(IMS, ICR_RXT0);
        assert!(!irq.asserted(), "INTx disable masks the line");
        assert!(s.interrupt_status());
    }

    #[test]
    fn itr_holds_back_the_next_assertion() {
        let (mut s, irq) = state();
        s.write(ITR, 40_000); // 10.24 ms
        s.write(IMS, ICR_TXDW);
        s.write(ICS, ICR_TXDW);
        assert_eq!(irq.rising_edges(), 1);
        s.read(ICR);
        s.write(ICS, ICR_TXDW);
        assert!(
            !irq.asserted(),
            "second interrupt within the interval is delayed"
        );
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(s.itr_timer()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 2000) }, 1);
        assert!(s.itr_timer().drain());
        s.itr_expired();
        assert!(irq.asserted());
        assert_eq!(irq.rising_edges(), 2);
    }

    #[test]
    fn reset_restores_defaults_and_self_clears() {
        let (mut s, irq) = state();
        s.write(IMS, ICR_LSC);
        s.write(ICS, ICR_LSC);
        s.write(RDLEN, 4096);
        let rx_gen = s.rx_generation();
        assert!(s.write(CTRL, CTRL_RST | CTRL_SLU));
        assert_eq!(s.read(CTRL) & CTRL_RST, 0);
        assert_eq!(s.read(IMS), 0);
        assert_eq!(s.read(RDLEN), 0);
        assert!(!irq.asserted());
        assert_ne!(s.rx_generation(), rx_gen);
        assert_eq!(s.read(RA + 4), 0x0100 | RAH_AV);
        assert_ne!(s.read(STATUS) & STATUS_LU, 0);
    }

    #[test]
    fn ring_registers_are_masked_and_validated() {
        let (mut s, _) = state();
        s.write(TCTL, TCTL_EN);
        s.write(TDLEN, 1000);
        assert_eq!(s.read(TDLEN), 896);
        s.write(TDBAL, 0x1234_5678);
        assert_eq!(s.read(TDBAL), 0x1234_5670);
        assert_eq!(s.tx_ring().unwrap().unwrap().count, 56);
        s.write(TDT, 56);
        assert_eq!(s.tx_ring(), Some(Err(RingFault::TailOutOfRange)));
        s.write(TDT, 0x1_0003);
        assert_eq!(s.read(TDT), 3);
        s.write(TDLEN, 0x7f);
        assert_eq!(s.tx_ring(), Some(Err(RingFault::ZeroLength)));
        s.write(TCTL, 0);
        assert_eq!(s.tx_ring(), None);
    }

    #[test]
    fn statistics_clear_on_read_and_unknown_registers_are_counted() {
        let (mut s, _) = state();
        super::super::stats::count_rx(s.stats_regs(), &[0xff; 6], 64);
        assert_eq!(s.read(GPRC), 1);
        assert_eq!(s.read(GPRC), 0);
        s.write(GPRC, 77);
        assert_eq!(s.read(GPRC), 0);
        assert_eq!(s.read(0x0004), 0);
        s.write(0x1fffc, 1);
        assert_eq!(s.counters.drops_for("unimplemented_register"), 2);
    }

    #[test]
    fn eerd_reads_the_eeprom() {
        let (mut s, _) = state();
        s.write(EERD, EERD_START | (1 << EERD_ADDR_SHIFT));
        let v = s.read(EERD);
        assert_ne!(v & EERD_DONE, 0);
        assert_eq!(v >> EERD_DATA_SHIFT, 0x0000);
        s.write(EERD, EERD_START | (2 << EERD_ADDR_SHIFT));
        assert_eq!(s.read(EERD) >> EERD_DATA_SHIFT, 0x0100);
        s.write(EERD, EERD_START | (200 << EERD_ADDR_SHIFT));
        assert_ne!(s.read(EERD) & EERD_DONE, 0);
    }

    #[test]
    fn link_changes_raise_lsc_and_show_in_status_and_phy() {
        let (mut s, irq) = state();
        s.write(IMS, ICR_LSC);
        s.set_link(false);
        assert!(irq.asserted());
        assert_eq!(s.read(STATUS) & STATUS_LU, 0);
        assert_eq!(s.read(ICR) & ICR_LSC, ICR_LSC);
        s.set_link(false);
        assert_eq!(s.read(ICR), 0);
    }
}
