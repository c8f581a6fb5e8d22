//! The guest-physical address map. Low memory holds the boot structures, the MMIO hole
//! below 4 GiB holds PCI BARs, the IOAPIC and the LAPIC, and RAM that does not fit below
//! the hole continues at 4 GiB.

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
pub const PVH_MODLIST_ADDR: u64 = 0x6f00;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
/// Four page directories of 2 MiB pages identity-map the first 4 GiB.
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// The MP floating pointer and table sit in the last KiB of base memory, where Linux
/// scans for them.
pub const MPTABLE_ADDR: u64 = 0x9fc00;
pub const EBDA_END: u64 = 0xa0000;
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// PCI BARs are allocated here; the hole ends where the IOAPIC begins.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const PCI_MMIO_END: u64 = 0xfec0_0000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
pub const FOUR_GIB: u64 = 0x1_0000_0000;
pub const TSS_ADDR: u64 = 0xfffb_d000;
pub const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// PCI I/O BARs come from this port range, clear of every legacy device.
pub const PCI_IO_START: u16 = 0xc000;
pub const PCI_IO_END: u16 = 0xffff;

/// Guest RAM as (start, size) pairs for a VM of `memory_bytes`.
pub fn ram_regions(memory_bytes: u64) -> Vec<(u64, u64)> {
    if memory_bytes <= MMIO_HOLE_START {
        vec![(0, memory_bytes)]
    } else {
        vec![(0, MMIO_HOLE_START), (FOUR_GIB, memory_bytes - MMIO_HOLE_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_vm_is_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_vm_skips_the_mmio_hole() {
        let r = ram_regions(4 << 30);
        assert_eq!(r, vec![(0, MMIO_HOLE_START), (FOUR_GIB, (4 << 30) - MMIO_HOLE_START)]);
        assert_eq!(r.iter().map(|(_, s)| s).sum::<u64>(), 4 << 30);
    }
}
