//! Counting: the guest-visible statistics registers (read-to-clear) and the device's
//! own counters for the VMM's exit log, including drops by reason.

use std::fmt::Write as _;

use super::registers::*;

/// Adds to a 32-bit statistics register; the hardware counters saturate.
fn add32(regs: &mut [u32], reg: u32, n: u64) {
    if let Some(r) = regs.get_mut((reg / 4) as usize) {
        *r = r.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
    }
}

/// Adds to a low/high register pair holding a 64-bit count.
fn add64(regs: &mut [u32], low_reg: u32, n: u64) {
    let i = (low_reg / 4) as usize;
    if let (Some(&low), Some(&high)) = (regs.get(i), regs.get(i + 1)) {
        let v = (u64::from(high) << 32 | u64::from(low)).saturating_add(n);
        regs[i] = v as u32;
        regs[i + 1] = (v >> 32) as u32;
    }
}

fn size_bucket(first: u32, wire_len: usize) -> u32 {
    let index = match wire_len {
        0..=64 => 0,
        65..=127 => 1,
        128..=255 => 2,
        256..=511 => 3,
        512..=1023 => 4,
        _ => 5,
    };
    first + index * 4
}

/// Records received frames (`wire_len` includes the FCS) in the statistics registers.
pub fn count_rx(regs: &mut [u32], dst: &[u8], wire_len: usize) {
    add32(regs, TPR, 1);
    add32(regs, GPRC, 1);
    add64(regs, TORL, wire_len as u64);
    add64(regs, GORCL, wire_len as u64);
    if wire_len <= 1522 {
        add32(regs, size_bucket(PRC64, wire_len), 1);
    }
    if dst.get(..6) == Some(&[0xff; 6][..]) {
        add32(regs, BPRC, 1);
    } else if dst.first().is_some_and(|b| b & 1 == 1) {
        add32(regs, MPRC, 1);
    }
}

/// Records `frames` transmitted frames; `first_len` excludes the FCS.
pub fn count_tx(
    regs: &mut [u32],
    dst: &[u8],
    frames: u32,
    bytes: u64,
    first_len: usize,
    tso: bool,
) {
    if frames == 0 {
        return;
    }
    let n = u64::from(frames);
    let octets = bytes + 4 * n;
    add32(regs, TPT, n);
    add32(regs, GPTC, n);
    add64(regs, TOTL, octets);
    add64(regs, GOTCL, octets);
    if first_len + 4 <= 1522 {
        add32(regs, size_bucket(PTC64, first_len + 4), n);
    }
    if dst.get(..6) == Some(&[0xff; 6][..]) {
        add32(regs, BPTC, n);
    } else if dst.first().is_some_and(|b| b & 1 == 1) {
        add32(regs, MPTC, n);
    }
    if tso {
        add32(regs, TSCTC, 1);
    }
}

pub fn count_reg(regs: &mut [u32], reg: u32, n: u64) {
    add32(regs, reg, n);
}

/// The device's own counters, reported by `PciDevice::stats()`.
#[derive(Clone, Debug, Default)]
pub struct DeviceCounters {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub interrupts: u64,
    /// Frames the receive filter rejected (normal traffic for other hosts).
    pub rx_filtered: u64,
    /// Drops and guest errors by reason.
    pub drops: Vec<(&'static str, u64)>,
}

impl DeviceCounters {
    /// Counts one event and logs it, rate-limited to powers of two per reason so a
    /// hostile guest cannot flood the log.
    pub fn drop_event(&mut self, reason: &'static str, detail: &dyn std::fmt::Display) {
        let count = match self.drops.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                self.drops.push((reason, 1));
                1
            }
        };
        if count.is_power_of_two() {
            log::warn!("e1000: {reason} (#{count}): {detail}");
        }
    }

    /// Counts events that are normal in some states (receiving while the interface is
    /// down) without logging them.
    pub fn quiet_event(&mut self, reason: &'static str, n: u64) {
        match self.drops.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, count)) => *count += n,
            None => self.drops.push((reason, n)),
        }
    }

    #[cfg(test)]
    pub fn drops_for(&self, reason: &str) -> u64 {
        self.drops
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "tx {} frames/{} bytes, rx {} frames/{} bytes, {} interrupts, rx_filtered={}",
            self.tx_frames,
            self.tx_bytes,
            self.rx_frames,
            self.rx_bytes,
            self.interrupts,
            self.rx_filtered
        );
        for (reason, n) in &self.drops {
            let _ = write!(s, ", {reason}={n}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_accumulate_and_saturate() {
        let mut regs = vec![0u32; (MMIO_SIZE / 4) as usize];
        count_rx(&mut regs, &[0xff; 6], 64);
        count_rx(&mut regs, &[0x01, 0, 0x5e, 0, 0, 1], 1518);
        assert_eq!(regs[(GPRC / 4) as usize], 2);
        assert_eq!(regs[(BPRC / 4) as usize], 1);
        assert_eq!(regs[(MPRC / 4) as usize], 1);
        assert_eq!(regs[(PRC64 / 4) as usize], 1);
        assert_eq!(regs[(PRC1522 / 4) as usize], 1);
        assert_eq!(regs[(GORCL / 4) as usize], 64 + 1518);
        regs[(GOTCL / 4) as usize] = u32::MAX;
        count_tx(&mut regs, &[0x52; 6], 1, 60, 60, false);
        assert_eq!(regs[(GOTCL / 4) as usize + 1], 1);
        regs[(TPT / 4) as usize] = u32::MAX;
        count_tx(&mut regs, &[0x52; 6], 3, 3000, 1000, true);
        assert_eq!(regs[(TPT / 4) as usize], u32::MAX);
        assert_eq!(regs[(TSCTC / 4) as usize], 1);
    }

    #[test]
    fn drop_events_are_counted_by_reason() {
        let mut c = DeviceCounters::default();
        c.drop_event("tx_bad_addr", &"x");
        c.drop_event("tx_bad_addr", &"y");
        c.drop_event("rx_oversize", &"z");
        assert_eq!(c.drops_for("tx_bad_addr"), 2);
        assert_eq!(c.drops_for("missing"), 0);
        assert!(c.summary().contains("rx_oversize=1"));
    }
}
