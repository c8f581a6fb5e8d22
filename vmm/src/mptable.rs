//! The Intel MultiProcessor table (spec 1.4): how the guest learns its CPUs, the IOAPIC,
//! and which IOAPIC pin each PCI slot's INTx line drives. Without ACPI, Linux
//! (CONFIG_X86_MPPARSE) reads this to route e1000's legacy interrupt.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{EBDA_END, IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_ADDR};

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Polarity and trigger "conform to the bus": active-high edge for ISA, active-low level
/// for PCI.
const IRQ_FLAGS_CONFORMING: u16 = 0;
const PCI_BUS_ID: u8 = 0;
const ISA_BUS_ID: u8 = 1;
/// Family 6 stepping reported for each CPU entry; Linux only uses it in a log line.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC feature flags.
const CPU_FEATURES: u32 = 0x201;

#[derive(Debug, Error)]
pub enum MptableError {
    #[error("MP table for {0} CPUs and {1} PCI interrupts does not fit below {EBDA_END:#x}")]
    TooLarge(usize, usize),
    #[error("cannot write the MP table to guest memory: {0}")]
    GuestWrite(vm_memory::GuestMemoryError),
}

/// One PCI function's INTx wiring: slot `device` on bus 0, `pin` 1..=4 (INTA..INTD),
/// drives IOAPIC input `ioapic_pin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIrq {
    pub device: u8,
    pub pin: u8,
    pub ioapic_pin: u8,
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

fn interrupt_entry(kind: u8, irq_type: u8, flags: u16, bus: u8, bus_irq: u8, apic: u8, pin: u8) -> [u8; 8] {
    let f = flags.to_le_bytes();
    [kind, irq_type, f[0], f[1], bus, bus_irq, apic, pin]
}

/// Builds the floating pointer and configuration table as one byte image placed at
/// `MPTABLE_ADDR`.
pub fn build(num_cpus: u8, pci_irqs: &[PciIrq]) -> Result<Vec<u8>, MptableError> {
    let ioapic_id = num_cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, PCI_BUS_ID]);
    entries.extend_from_slice(b"PCI   ");
    entries.extend_from_slice(&[MP_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 2;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in 0..16u8 {
        entries.extend_from_slice(&interrupt_entry(MP_INTSRC, MP_IRQ_INT, IRQ_FLAGS_CONFORMING, ISA_BUS_ID, irq, ioapic_id, irq));
        count += 1;
    }
    for p in pci_irqs {
        let source = (p.device << 2) | (p.pin.saturating_sub(1) & 3);
        entries.extend_from_slice(&interrupt_entry(MP_INTSRC, MP_IRQ_INT, IRQ_FLAGS_CONFORMING, PCI_BUS_ID, source, ioapic_id, p.ioapic_pin));
        count += 1;
    }
    entries.extend_from_slice(&interrupt_entry(MP_LINTSRC, MP_IRQ_EXTINT, IRQ_FLAGS_CONFORMING, ISA_BUS_ID, 0, 0xff, 0));
    entries.extend_from_slice(&interrupt_entry(MP_LINTSRC, MP_IRQ_NMI, IRQ_FLAGS_CONFORMING, ISA_BUS_ID, 0, 0xff, 1));
    count += 2;

    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_len = HEADER_LEN + entries.len();
    if MPTABLE_ADDR as usize + FLOATING_LEN + table_len > EBDA_END as usize {
        return Err(MptableError::TooLarge(num_cpus as usize, pci_irqs.len()));
    }
    let table_addr = MPTABLE_ADDR as u32 + FLOATING_LEN as u32;

    let mut floating = vec![0u8; FLOATING_LEN];
    floating[0..4].copy_from_slice(b"_MP_");
    floating[4..8].copy_from_slice(&table_addr.to_le_bytes());
    floating[8] = 1; // length in 16-byte units
    floating[9] = 4; // spec revision 1.4
    floating[10] = checksum(&floating);

    let mut header = vec![0u8; HEADER_LEN];
    header[0..4].copy_from_slice(b"PCMP");
    header[4..6].copy_from_slice(&(table_len as u16).to_le_bytes());
    header[6] = 4;
    header[8..16].copy_from_slice(b"TAPIR   ");
    header[16..28].copy_from_slice(b"TAPIR-VM    ");
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut image = floating;
    image.extend_from_slice(&table);
    Ok(image)
}

pub fn write(mem: &GuestMemoryMmap, num_cpus: u8, pci_irqs: &[PciIrq]) -> Result<(), MptableError> {
    let image = build(num_cpus, pci_irqs)?;
    mem.write_slice(&image, GuestAddress(MPTABLE_ADDR)).map_err(MptableError::GuestWrite)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        let irqs = [PciIrq { device: 1, pin: 1, ioapic_pin: 16 }, PciIrq { device: 2, pin: 1, ioapic_pin: 17 }];
        let image = build(2, &irqs).unwrap();
        assert_eq!(&image[0..4], b"_MP_");
        assert_eq!(sum(&image[0..16]), 0);
        let table_addr = u32::from_le_bytes(image[4..8].try_into().unwrap());
        assert_eq!(table_addr as u64, MPTABLE_ADDR + 16);
        let table = &image[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        // 2 CPUs + 2 buses + 1 IOAPIC + 16 ISA + 2 PCI + 2 local entries.
        assert_eq!(u16::from_le_bytes([table[34], table[35]]), 25);
    }

    #[test]
    fn pci_source_irq_encodes_device_and_pin() {
        let image = build(1, &[PciIrq { device: 3, pin: 1, ioapic_pin: 18 }]).unwrap();
        let table = &image[16..];
        let found = table.windows(8).any(|w| w == [MP_INTSRC, MP_IRQ_INT, 0, 0, PCI_BUS_ID, 3 << 2, 1, 18]);
        assert!(found, "PCI interrupt entry for device 3 INTA -> pin 18 missing");
    }

    #[test]
    fn refuses_tables_that_overflow_base_memory() {
        let irqs: Vec<PciIrq> = (0..200).map(|d| PciIrq { device: d as u8, pin: 1, ioapic_pin: 16 }).collect();
        assert!(matches!(build(32, &irqs), Err(MptableError::TooLarge(..))));
    }
}
