//! A CMOS real-time clock (MC146818) at ports 0x70/0x71 reporting the host's UTC time.
//!
//! Without it Linux's rtc_cmos driver spins on the "update in progress" bit of an absent
//! chip (all ones) and gives up only after its timeouts, which costs real boot time. Time
//! writes from the guest (hwclock --systohc) are accepted and ignored: the host clock is
//! the source of truth.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::legacy::lock;

pub const RTC_INDEX_PORT: u16 = 0x70;
pub const RTC_DATA_PORT: u16 = 0x71;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_DAY_OF_WEEK: u8 = 0x06;
const REG_DAY_OF_MONTH: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// Register A: 32.768 kHz time base, 1024 Hz periodic rate, never "update in progress".
const REG_A_DEFAULT: u8 = 0x26;
/// Register B: 24-hour mode, BCD.
const REG_B_DEFAULT: u8 = 0x02;
const REG_B_BINARY: u8 = 0x04;
const REG_B_24H: u8 = 0x02;
/// Register D: the battery is good and the time valid.
const REG_D_VALID: u8 = 0x80;

struct State {
    index: u8,
    nvram: [u8; 128],
}

pub struct Rtc {
    state: Mutex<State>,
}

/// (year, month 1-12, day 1-31) from days since 1970-01-01, proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

impl Rtc {
    pub fn new() -> Rtc {
        let mut nvram = [0u8; 128];
        nvram[REG_A as usize] = REG_A_DEFAULT;
        nvram[REG_B as usize] = REG_B_DEFAULT;
        nvram[REG_D as usize] = REG_D_VALID;
        Rtc { state: Mutex::new(State { index: 0, nvram }) }
    }

    fn time_register(reg: u8, reg_b: u8, unix_seconds: i64) -> Option<u8> {
        let days = unix_seconds.div_euclid(86_400);
        let secs_of_day = unix_seconds.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        let hour = secs_of_day / 3600;
        let value = match reg {
            REG_SECONDS => secs_of_day % 60,
            REG_MINUTES => (secs_of_day / 60) % 60,
            REG_HOURS => {
                if reg_b & REG_B_24H != 0 {
                    hour
                } else {
                    // 12-hour mode: 1..=12, PM flag in bit 7 added after encoding.
                    let h12 = match hour % 12 {
                        0 => 12,
                        h => h,
                    };
                    let encoded = if reg_b & REG_B_BINARY != 0 { h12 as u8 } else { to_bcd(h12) };
                    return Some(encoded | if hour >= 12 { 0x80 } else { 0 });
                }
            }
            // 1970-01-01 was a Thursday; Sunday is 1.
            REG_DAY_OF_WEEK => ((days + 4).rem_euclid(7) + 1) as u32,
            REG_DAY_OF_MONTH => day,
            REG_MONTH => month,
            REG_YEAR => year.rem_euclid(100) as u32,
            REG_CENTURY => year.div_euclid(100).clamp(0, 99) as u32,
            _ => return None,
        };
        Some(if reg_b & REG_B_BINARY != 0 { value as u8 } else { to_bcd(value) })
    }

    pub fn read(&self, port: u16) -> u8 {
        let state = lock(&self.state);
        if port != RTC_DATA_PORT {
            return 0xff;
        }
        let reg = state.index;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        if let Some(v) = Self::time_register(reg, state.nvram[REG_B as usize], now) {
            return v;
        }
        match reg {
            REG_C => 0,
            _ => state.nvram[usize::from(reg & 0x7f)],
        }
    }

    pub fn write(&self, port: u16, value: u8) {
        let mut state = lock(&self.state);
        match port {
            // Bit 7 of the index port is the NMI mask, not part of the index.
            RTC_INDEX_PORT => state.index = value & 0x7f,
            RTC_DATA_PORT => {
                let reg = state.index;
                match reg {
                    REG_A => state.nvram[REG_A as usize] = (value & 0x7f) | (REG_A_DEFAULT & 0x70),
                    REG_B => state.nvram[REG_B as usize] = value,
                    REG_C | REG_D => {}
                    r if Self::time_register(r, REG_B_DEFAULT, 0).is_some() => {
                        log::debug!("guest set RTC register {r:#x}; the host clock stays authoritative");
                    }
                    r => state.nvram[usize::from(r & 0x7f)] = value,
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_conversion() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_414), (2025, 11, 22));
    }

    #[test]
    fn registers_in_bcd_and_binary() {
        // 2026-11-22 13:45:09 UTC, a Sunday.
        let t = 1_795_355_109;
        assert_eq!(Rtc::time_register(REG_SECONDS, REG_B_DEFAULT, t), Some(0x09));
        assert_eq!(Rtc::time_register(REG_MINUTES, REG_B_DEFAULT, t), Some(0x45));
        assert_eq!(Rtc::time_register(REG_HOURS, REG_B_DEFAULT, t), Some(0x13));
        assert_eq!(Rtc::time_register(REG_YEAR, REG_B_DEFAULT, t), Some(0x26));
        assert_eq!(Rtc::time_register(REG_CENTURY, REG_B_DEFAULT, t), Some(0x20));
        assert_eq!(Rtc::time_register(REG_MONTH, REG_B_DEFAULT, t), Some(0x11));
        assert_eq!(Rtc::time_register(REG_DAY_OF_MONTH, REG_B_DEFAULT, t), Some(0x22));
        assert_eq!(Rtc::time_register(REG_DAY_OF_WEEK, REG_B_DEFAULT, t), Some(1));
        assert_eq!(Rtc::time_register(REG_HOURS, REG_B_24H | REG_B_BINARY, t), Some(13));
        // 12-hour BCD: 1 PM.
        assert_eq!(Rtc::time_register(REG_HOURS, 0, t), Some(0x81));
    }

    #[test]
    fn never_reports_update_in_progress_and_keeps_nvram() {
        let rtc = Rtc::new();
        rtc.write(RTC_INDEX_PORT, 0x80 | REG_A);
        assert_eq!(rtc.read(RTC_DATA_PORT) & 0x80, 0);
        rtc.write(RTC_INDEX_PORT, REG_D);
        assert_eq!(rtc.read(RTC_DATA_PORT), REG_D_VALID);
        rtc.write(RTC_INDEX_PORT, 0x40);
        rtc.write(RTC_DATA_PORT, 0x5a);
        assert_eq!(rtc.read(RTC_DATA_PORT), 0x5a);
    }
}
