//! The 82540EM's 64-word Microwire EEPROM: the image (MAC address, IDs, checksum) and
//! the serial protocol the Linux driver bit-bangs through EECD, plus the EERD shortcut.

use super::registers::{EECD_CS, EECD_DI, EECD_DO, EECD_GNT, EECD_PRES, EECD_REQ, EECD_SK};

pub const EEPROM_WORDS: usize = 64;
/// The sum of words 0x00..=0x3f that the driver accepts as a valid image.
pub const EEPROM_SUM: u16 = 0xbaba;
const CHECKSUM_WORD: usize = 0x3f;
const ADDRESS_BITS: u32 = 6;
const OPCODE_BITS: u32 = 3;
const OPCODE_READ: u32 = 0b110;

/// EECD bits the guest may set and read back.
const EECD_GUEST_BITS: u32 = EECD_SK | EECD_CS | EECD_DI | EECD_REQ | (3 << 4);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the start bit and then opcode and address bits.
    Command { bits: u32, count: u32 },
    /// Shifting out data; the next rising clock edge presents bit `next`.
    Reading { next: u32 },
    /// An opcode the model does not act on (write, erase, enable): ignore until the
    /// guest drops chip select.
    Ignoring,
}

pub struct Eeprom {
    words: [u16; EEPROM_WORDS],
    eecd: u32,
    phase: Phase,
    data_out: bool,
}

impl Eeprom {
    /// Builds the image of an 82540EM desktop adapter with `mac` and a valid checksum.
    pub fn new(mac: [u8; 6]) -> Self {
        let mut words = [0u16; EEPROM_WORDS];
        for (i, pair) in mac.chunks(2).enumerate() {
            words[i] = u16::from(pair[0]) | (u16::from(pair[1]) << 8);
        }
        // ID LED settings: all ones tells the driver to use its defaults.
        words[0x04] = 0xffff;
        words[0x0b] = super::SUBSYSTEM_ID;
        words[0x0c] = super::VENDOR_ID;
        words[0x0d] = super::DEVICE_ID;
        words[0x0e] = super::VENDOR_ID;
        let partial = words[..CHECKSUM_WORD]
            .iter()
            .fold(0u16, |acc, w| acc.wrapping_add(*w));
        words[CHECKSUM_WORD] = EEPROM_SUM.wrapping_sub(partial);
        Eeprom {
            words,
            eecd: 0,
            phase: Phase::Command { bits: 0, count: 0 },
            data_out: true,
        }
    }

    pub fn word(&self, index: usize) -> Option<u16> {
        self.words.get(index).copied()
    }

    /// EECD as the guest reads it: its own control bits, presence, grant while it
    /// requests access, and the data-out line.
    pub fn read_eecd(&self) -> u32 {
        let mut value = (self.eecd & EECD_GUEST_BITS) | EECD_PRES;
        if self.eecd & EECD_REQ != 0 {
            value |= EECD_GNT;
        }
        if self.data_out {
            value |= EECD_DO;
        }
        value
    }

    /// A guest write to EECD: drives chip select, clock and data-in.
    pub fn write_eecd(&mut self, value: u32) {
        let rising_edge = value & EECD_SK != 0 && self.eecd & EECD_SK == 0;
        self.eecd = value & EECD_GUEST_BITS;
        if value & EECD_CS == 0 {
            // Deselecting ends any command; Microwire parts then report ready.
            self.phase = Phase::Command { bits: 0, count: 0 };
            self.data_out = true;
            return;
        }
        if rising_edge {
            self.clock_in(value & EECD_DI != 0);
        }
    }

    fn clock_in(&mut self, data_in: bool) {
        self.phase = match self.phase {
            // Leading zeros before the start bit are ignored.
            Phase::Command { count: 0, .. } if !data_in => Phase::Command { bits: 0, count: 0 },
            Phase::Command { bits, count } => {
                let bits = (bits << 1) | u32::from(data_in);
                let count = count + 1;
                if count < OPCODE_BITS + ADDRESS_BITS {
                    Phase::Command { bits, count }
                } else if bits >> ADDRESS_BITS == OPCODE_READ {
                    // A dummy zero precedes the data bits.
                    self.data_out = false;
                    Phase::Reading {
                        next: (bits & ((1 << ADDRESS_BITS) - 1)) * 16,
                    }
                } else {
                    Phase::Ignoring
                }
            }
            Phase::Reading { next } => {
                // Sequential reads run on into the following words.
                let word = self.words[(next as usize / 16) % EEPROM_WORDS];
                self.data_out = (word >> (15 - next % 16)) & 1 == 1;
                Phase::Reading {
                    next: (next + 1) % (EEPROM_WORDS as u32 * 16),
                }
            }
            Phase::Ignoring => Phase::Ignoring,
        };
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Reads one word the way e1000_read_eeprom does for Microwire parts.
    pub(crate) fn bitbang_read(
        mut write: impl FnMut(u32),
        mut read: impl FnMut() -> u32,
        addr: u16,
    ) -> u16 {
        let mut eecd = EECD_REQ;
        write(eecd);
        eecd |= EECD_CS;
        write(eecd);
        let command = (OPCODE_READ << ADDRESS_BITS) | u32::from(addr);
        for i in (0..OPCODE_BITS + ADDRESS_BITS).rev() {
            eecd &= !EECD_DI;
            if command >> i & 1 == 1 {
                eecd |= EECD_DI;
            }
            write(eecd);
            write(eecd | EECD_SK);
            write(eecd);
        }
        eecd &= !EECD_DI;
        write(eecd);
        let mut data = 0u16;
        for _ in 0..16 {
            write(eecd | EECD_SK);
            data = (data << 1) | u16::from(read() & EECD_DO != 0);
            write(eecd);
        }
        // Standby then release, as the driver does between and after words.
        write(eecd & !(EECD_CS | EECD_SK));
        write(EECD_REQ);
        write(0);
        data
    }

    #[test]
    fn image_holds_mac_and_valid_checksum() {
        let eeprom = Eeprom::new([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(eeprom.word(0), Some(0x5452));
        assert_eq!(eeprom.word(1), Some(0x1200));
        assert_eq!(eeprom.word(2), Some(0x5634));
        let sum = (0..EEPROM_WORDS).fold(0u16, |acc, i| acc.wrapping_add(eeprom.word(i).unwrap()));
        assert_eq!(sum, EEPROM_SUM);
        assert_eq!(eeprom.word(64), None);
    }

    #[test]
    fn microwire_read_returns_every_word() {
        let mut eeprom = Eeprom::new([2, 0, 0, 0xab, 0xcd, 0xef]);
        let expected: Vec<u16> = (0..EEPROM_WORDS).map(|i| eeprom.word(i).unwrap()).collect();
        for (addr, want) in expected.iter().enumerate() {
            let cell = std::cell::RefCell::new(&mut eeprom);
            let got = bitbang_read(
                |v| cell.borrow_mut().write_eecd(v),
                || cell.borrow().read_eecd(),
                addr as u16,
            );
            assert_eq!(got, *want, "word {addr}");
        }
    }

    #[test]
    fn grant_follows_request_and_unknown_opcodes_are_ignored() {
        let mut eeprom = Eeprom::new([2, 0, 0, 0, 0, 1]);
        assert_eq!(eeprom.read_eecd() & EECD_GNT, 0);
        eeprom.write_eecd(EECD_REQ);
        assert_ne!(eeprom.read_eecd() & EECD_GNT, 0);
        assert_ne!(eeprom.read_eecd() & EECD_PRES, 0);
        // Opcode 101 (write) followed by garbage clocks: no output, no panic.
        eeprom.write_eecd(EECD_REQ | EECD_CS);
        for bit in [1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1] {
            let di = if bit == 1 { EECD_DI } else { 0 };
            eeprom.write_eecd(EECD_REQ | EECD_CS | di);
            eeprom.write_eecd(EECD_REQ | EECD_CS | di | EECD_SK);
        }
        assert_ne!(eeprom.read_eecd() & EECD_DO, 0);
    }
}
