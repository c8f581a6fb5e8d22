//! Routes port I/O and MMIO exits to the device that decodes the address. Accesses
//! nothing decodes read as all ones and are logged once per address, like an empty bus.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::legacy::{
    lock, DebugExit, SerialConsole, I8042, DEBUG_EXIT_LEN, DEBUG_EXIT_PORT, I8042_COMMAND_PORT, I8042_DATA_PORT,
    SERIAL_PORT_BASE, SERIAL_PORT_LEN,
};
use crate::pci_root::{PciRoot, CONFIG_ADDRESS_PORT};
use crate::rtc::{Rtc, RTC_DATA_PORT, RTC_INDEX_PORT};

pub struct IoBus {
    pub serial: Option<Arc<SerialConsole>>,
    pub i8042: I8042,
    pub debug_exit: Option<DebugExit>,
    pub pci: Arc<PciRoot>,
    rtc: Rtc,
    unclaimed_seen: Mutex<HashSet<(bool, u64)>>,
}

fn in_range(port: u16, base: u16, len: u16) -> bool {
    port >= base && port - base < len
}

impl IoBus {
    pub fn new(serial: Option<Arc<SerialConsole>>, i8042: I8042, debug_exit: Option<DebugExit>, pci: Arc<PciRoot>) -> Self {
        IoBus { serial, i8042, debug_exit, pci, rtc: Rtc::new(), unclaimed_seen: Mutex::new(HashSet::new()) }
    }

    fn note_unclaimed(&self, mmio: bool, addr: u64, write: bool) {
        const MAX_REMEMBERED: usize = 256;
        let mut seen = lock(&self.unclaimed_seen);
        if seen.len() < MAX_REMEMBERED && seen.insert((mmio, addr)) {
            let space = if mmio { "MMIO" } else { "port" };
            let dir = if write { "write" } else { "read" };
            log::debug!("unclaimed {space} {dir} at {addr:#x}");
        }
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if in_range(port, SERIAL_PORT_BASE, SERIAL_PORT_LEN) {
            if let (Some(serial), Some(first)) = (&self.serial, data.first_mut()) {
                *first = serial.read((port - SERIAL_PORT_BASE) as u8);
                return;
            }
        } else if port == I8042_DATA_PORT || port == I8042_COMMAND_PORT {
            data.fill(0);
            if let Some(first) = data.first_mut() {
                *first = self.i8042.read(port);
            }
            return;
        } else if port == RTC_INDEX_PORT || port == RTC_DATA_PORT {
            data.fill(0);
            if let Some(first) = data.first_mut() {
                *first = self.rtc.read(port);
            }
            return;
        } else if in_range(port, CONFIG_ADDRESS_PORT, 8) {
            self.pci.pio_read(port, data);
            return;
        } else if self.pci.io_bar_read(port, data) {
            return;
        }
        data.fill(0xff);
        self.note_unclaimed(false, u64::from(port), false);
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if in_range(port, SERIAL_PORT_BASE, SERIAL_PORT_LEN) {
            if let (Some(serial), Some(first)) = (&self.serial, data.first()) {
                serial.write((port - SERIAL_PORT_BASE) as u8, *first);
                return;
            }
        } else if port == I8042_DATA_PORT || port == I8042_COMMAND_PORT {
            if let Some(first) = data.first() {
                self.i8042.write(port, *first);
            }
            return;
        } else if port == RTC_INDEX_PORT || port == RTC_DATA_PORT {
            if let Some(first) = data.first() {
                self.rtc.write(port, *first);
            }
            return;
        } else if in_range(port, DEBUG_EXIT_PORT, DEBUG_EXIT_LEN) {
            if let Some(debug_exit) = &self.debug_exit {
                debug_exit.write(data);
                return;
            }
        } else if in_range(port, CONFIG_ADDRESS_PORT, 8) {
            self.pci.pio_write(port, data);
            return;
        } else if self.pci.io_bar_write(port, data) {
            return;
        }
        self.note_unclaimed(false, u64::from(port), true);
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.pci.mmio_read(addr, data) {
            data.fill(0xff);
            self.note_unclaimed(true, addr, false);
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.pci.mmio_write(addr, data) {
            self.note_unclaimed(true, addr, true);
        }
    }
}
