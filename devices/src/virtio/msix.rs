//! The MSI-X table and pending-bit array (PCI 3.0 section 6.8.2).
//!
//! The table lives here; the VMM owns the routes. Whenever the effective state of a
//! vector changes (its entry is rewritten, or it or the whole function is masked or
//! unmasked, or MSI-X is switched on or off), the VMM hears about it through
//! `MsiVectors::configure`: `Some(message)` when the vector may fire, `None` otherwise.
//! A vector that fires while masked sets its pending bit and is delivered on unmask.

use std::sync::Arc;

use log::warn;

use crate::interrupt::{MsiMessage, MsiVectors};

/// Bytes per table entry: address low, address high, data, vector control.
pub const MSIX_ENTRY_SIZE: usize = 16;
/// Vector control bit 0.
const ENTRY_MASKED: u32 = 1;

/// Message control register bits (in the capability's 16-bit control word).
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;

pub struct MsixTable {
    entries: Vec<[u8; MSIX_ENTRY_SIZE]>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    /// What the VMM was last told for each vector, so it only hears about changes.
    routed: Vec<Option<MsiMessage>>,
    vectors: Arc<dyn MsiVectors>,
}

impl MsixTable {
    /// A table with `vectors.count()` entries, all masked, MSI-X disabled (reset state).
    pub fn new(vectors: Arc<dyn MsiVectors>) -> Self {
        let count = vectors.count();
        let mut masked_entry = [0u8; MSIX_ENTRY_SIZE];
        masked_entry[12..16].copy_from_slice(&ENTRY_MASKED.to_le_bytes());
        MsixTable {
            entries: vec![masked_entry; count],
            pending: vec![0; count.div_ceil(64)],
            enabled: false,
            function_masked: false,
            routed: vec![None; count],
            vectors,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Size of the pending-bit array in bytes.
    pub fn pba_len(&self) -> usize {
        self.pending.len() * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Applies the message control bits the guest wrote to the capability.
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & MSIX_CONTROL_ENABLE != 0;
        let function_masked = control & MSIX_CONTROL_FUNCTION_MASK != 0;
        if enabled == self.enabled && function_masked == self.function_masked {
            return;
        }
        self.enabled = enabled;
        self.function_masked = function_masked;
        for vector in 0..self.entries.len() {
            self.refresh(vector);
        }
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.table_byte(offset.saturating_add(i as u64)).unwrap_or(0);
        }
    }

    fn table_byte(&self, offset: u64) -> Option<u8> {
        let offset = usize::try_from(offset).ok()?;
        self.entries.get(offset / MSIX_ENTRY_SIZE)?.get(offset % MSIX_ENTRY_SIZE).copied()
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let mut touched: Vec<usize> = Vec::with_capacity(2);
        for (i, &b) in data.iter().enumerate() {
            let Some(off) = offset.checked_add(i as u64).and_then(|o| usize::try_from(o).ok()) else { break };
            let vector = off / MSIX_ENTRY_SIZE;
            let Some(entry) = self.entries.get_mut(vector) else { break };
            if let Some(slot) = entry.get_mut(off % MSIX_ENTRY_SIZE) {
                *slot = b;
            }
            if touched.last() != Some(&vector) {
                touched.push(vector);
            }
        }
        for vector in touched {
            self.refresh(vector);
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let byte = offset.saturating_add(i as u64);
            let word = usize::try_from(byte / 8).ok().and_then(|w| self.pending.get(w));
            *b = word.map_or(0, |w| (w >> ((byte % 8) * 8)) as u8);
        }
    }

    /// Fires `vector`, or marks it pending when masked. Vectors past the table are ignored.
    pub fn fire(&mut self, vector: u16) {
        let vector = usize::from(vector);
        if vector >= self.entries.len() {
            return;
        }
        if self.may_fire(vector) {
            self.vectors.trigger(vector);
        } else {
            self.set_pending(vector, true);
        }
    }

    pub fn is_pending(&self, vector: usize) -> bool {
        self.pending.get(vector / 64).is_some_and(|w| w & (1u64 << (vector % 64)) != 0)
    }

    fn set_pending(&mut self, vector: usize, pending: bool) {
        if let Some(word) = self.pending.get_mut(vector / 64) {
            let bit = 1u64 << (vector % 64);
            if pending {
                *word |= bit;
            } else {
                *word &= !bit;
            }
        }
    }

    fn entry_word(&self, vector: usize, index: usize) -> u32 {
        let Some(entry) = self.entries.get(vector) else { return 0 };
        let mut word = [0u8; 4];
        if let Some(bytes) = entry.get(index * 4..index * 4 + 4) {
            word.copy_from_slice(bytes);
        }
        u32::from_le_bytes(word)
    }

    fn message(&self, vector: usize) -> MsiMessage {
        let address = u64::from(self.entry_word(vector, 0)) | (u64::from(self.entry_word(vector, 1)) << 32);
        MsiMessage { address, data: self.entry_word(vector, 2) }
    }

    fn may_fire(&self, vector: usize) -> bool {
        self.enabled && !self.function_masked && self.entry_word(vector, 3) & ENTRY_MASKED == 0
    }

    /// Tells the VMM about a changed route and delivers what was held back while masked.
    fn refresh(&mut self, vector: usize) {
        let effective = self.may_fire(vector).then(|| self.message(vector));
        if self.routed.get(vector).copied().flatten() != effective {
            if let Err(e) = self.vectors.configure(vector, effective) {
                warn!("virtio-pci: cannot route MSI-X vector {vector}: {e}");
            }
            if let Some(slot) = self.routed.get_mut(vector) {
                *slot = effective;
            }
        }
        if effective.is_some() && self.is_pending(vector) {
            self.set_pending(vector, false);
            self.vectors.trigger(vector);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::TestMsiVectors;

    fn program(table: &mut MsixTable, vector: usize, address: u64, data: u32, masked: bool) {
        let base = (vector * MSIX_ENTRY_SIZE) as u64;
        table.write_table(base, &address.to_le_bytes());
        table.write_table(base + 8, &data.to_le_bytes());
        table.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn entries_start_masked_and_disabled() {
        let vectors = Arc::new(TestMsiVectors::new(3));
        let table = MsixTable::new(vectors.clone());
        let mut ctrl = [0u8; 4];
        table.read_table(2 * 16 + 12, &mut ctrl);
        assert_eq!(u32::from_le_bytes(ctrl), 1);
        assert!(!table.enabled());
        assert_eq!(table.pba_len(), 8);
    }

    #[test]
    fn route_follows_enable_and_masks() {
        let vectors = Arc::new(TestMsiVectors::new(2));
        let mut table = MsixTable::new(vectors.clone());
        program(&mut table, 1, 0xfee0_0000, 0x4021, false);
        // Unmasked entry, but MSI-X still disabled: no route yet.
        assert_eq!(vectors.route(1), None);
        table.set_control(MSIX_CONTROL_ENABLE);
        let msg = MsiMessage { address: 0xfee0_0000, data: 0x4021 };
        assert_eq!(vectors.route(1), Some(msg));
        table.set_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        assert_eq!(vectors.route(1), None);
        table.set_control(MSIX_CONTROL_ENABLE);
        assert_eq!(vectors.route(1), Some(msg));
        table.write_table(16 + 12, &1u32.to_le_bytes());
        assert_eq!(vectors.route(1), None);
        assert_eq!(vectors.route(0), None);
    }

    #[test]
    fn masked_fire_is_pending_until_unmask() {
        let vectors = Arc::new(TestMsiVectors::new(2));
        let mut table = MsixTable::new(vectors.clone());
        table.set_control(MSIX_CONTROL_ENABLE);
        program(&mut table, 0, 0xfee0_0000, 0x30, true);
        table.fire(0);
        assert_eq!(vectors.fired(0), 0);
        let mut pba = [0u8; 8];
        table.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        // Unmask through a 4-byte write to vector control.
        table.write_table(12, &0u32.to_le_bytes());
        assert_eq!(vectors.fired(0), 1);
        table.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        table.fire(0);
        assert_eq!(vectors.fired(0), 2);
    }

    #[test]
    fn function_mask_holds_back_and_releases() {
        let vectors = Arc::new(TestMsiVectors::new(1));
        let mut table = MsixTable::new(vectors.clone());
        program(&mut table, 0, 0xfee0_0000, 0x30, false);
        table.set_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        table.fire(0);
        assert_eq!(vectors.fired(0), 0);
        assert!(table.is_pending(0));
        table.set_control(MSIX_CONTROL_ENABLE);
        assert_eq!(vectors.fired(0), 1);
        assert!(!table.is_pending(0));
    }

    #[test]
    fn out_of_range_accesses_are_ignored() {
        let vectors = Arc::new(TestMsiVectors::new(1));
        let mut table = MsixTable::new(vectors.clone());
        table.write_table(16, &[0xff; 8]);
        table.write_table(u64::MAX - 2, &[0xff; 8]);
        let mut data = [0xaau8; 8];
        table.read_table(u64::MAX - 2, &mut data);
        assert_eq!(data, [0; 8]);
        table.read_pba(u64::MAX - 1, &mut data);
        table.fire(7);
        assert_eq!(vectors.fired(0), 0);
    }
}
