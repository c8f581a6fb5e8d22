//! Per-vCPU architectural state for direct boot: CPUID, MSRs, FPU, LAPIC, and the
//! registers and segments of the chosen entry (PVH 32-bit or Linux 64-bit).

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::BootEntry;
use crate::layout::*;

#[derive(Debug, Error)]
pub enum CpuError {
    #[error("KVM_SET_CPUID2 failed: {0}")]
    SetCpuid(kvm_ioctls::Error),
    #[error("KVM_SET_MSRS failed: {0}")]
    SetMsrs(kvm_ioctls::Error),
    #[error("KVM_SET_MSRS set {set} of {wanted} MSRs")]
    PartialMsrs { set: usize, wanted: usize },
    #[error("building the MSR list failed")]
    MsrList,
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(kvm_ioctls::Error),
    #[error("KVM LAPIC get/set failed: {0}")]
    Lapic(kvm_ioctls::Error),
    #[error("KVM_SET_REGS/SREGS failed: {0}")]
    Regs(kvm_ioctls::Error),
    #[error("cannot write {what} to guest memory: {source}")]
    GuestWrite { what: &'static str, source: vm_memory::GuestMemoryError },
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// XSAVE feature bit of protection keys (PKRU) and the legacy area plus header size.
const XFEATURE_PKRU: u32 = 9;
const XSAVE_LEGACY_AND_HEADER: u32 = 576;

/// Adjusts the host-supported CPUID for vCPU `index` of `count`.
///
/// Protection keys are hidden: nested KVM reports PKRU in leaf 0xD with a size the guest
/// kernel's own layout disagrees with ("XSAVE consistency problem"), and guests gain
/// little from it.
pub fn cpuid_for(base: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    let leaf = |function: u32, index: u32| {
        base.as_slice().iter().find(|e| e.function == function && e.index == index).copied()
    };
    let has_avx = leaf(1, 0).is_some_and(|e| e.ecx & (1 << 28) != 0);
    let has_avx512 = leaf(7, 0).is_some_and(|e| e.ebx & (1 << 16) != 0);
    // XSAVE components whose CPUID feature is absent would make the guest's size
    // calculation disagree with leaf 0xD's.
    let mut unusable = 1u32 << XFEATURE_PKRU;
    if !has_avx {
        unusable |= 1 << 2;
    }
    if !has_avx512 {
        unusable |= 0b111 << 5;
    }
    let mut xsave_components = 0u32;
    let mut xsave_extents: Vec<(u32, u32)> = Vec::new();
    for entry in cpuid.as_slice() {
        if entry.function == 0xd {
            if entry.index == 0 {
                xsave_components = entry.eax & !unusable;
            } else if entry.index >= 2 && entry.index < 32 {
                xsave_extents.push((entry.index, entry.ebx.saturating_add(entry.eax)));
            }
        }
    }
    let xsave_max = xsave_extents
        .iter()
        .filter(|(component, _)| xsave_components & (1 << component) != 0)
        .map(|(_, end)| *end)
        .fold(XSAVE_LEGACY_AND_HEADER, u32::max);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            7 if entry.index == 0 => {
                // PKU and OSPKE.
                entry.ecx &= !((1 << 3) | (1 << 4));
            }
            0xd if entry.index == 0 => {
                entry.eax = xsave_components;
                entry.ecx = xsave_max;
            }
            0xd if entry.index >= 2 && entry.index < 32 && unusable & (1 << entry.index) != 0 => {
                entry.eax = 0;
                entry.ebx = 0;
            }
            1 => {
                // Initial APIC id, logical processor count, HTT when there is more than one.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                if count > 1 {
                    entry.edx |= 1 << 28;
                }
                // Tell the guest it runs on a hypervisor so it uses the KVM paravirt leaves.
                entry.ecx |= 1 << 31;
            }
            4 => {
                // Cores per package minus one, in bits 31..26; keep the cache description.
                entry.eax = (entry.eax & 0x03ff_ffff) | (u32::from(count.saturating_sub(1)) << 26);
            }
            0xb => {
                // Extended topology: SMT level with one thread, core level with `count`.
                entry.edx = u32::from(index);
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 0x100;
                    }
                    1 => {
                        entry.eax = bits_for(count);
                        entry.ebx = u32::from(count);
                        entry.ecx = 0x201;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            _ => {}
        }
    }
    cpuid
}

/// Bits of APIC id needed to number `count` cores.
fn bits_for(count: u8) -> u32 {
    let mut bits = 0;
    while (1u32 << bits) < u32::from(count) {
        bits += 1;
    }
    bits
}

pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ];
    let list: Vec<kvm_msr_entry> =
        entries.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    let msrs = Msrs::from_entries(&list).map_err(|_| CpuError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(CpuError::SetMsrs)?;
    if set != list.len() {
        return Err(CpuError::PartialMsrs { set, wanted: list.len() });
    }
    Ok(())
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(CpuError::SetFpu)
}

/// LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as the BIOS would leave them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), CpuError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu.get_lapic().map_err(CpuError::Lapic)?;
    let mut set_mode = |offset: usize, mode: u32| {
        let reg = &mut lapic.regs[offset..offset + 4];
        let value = u32::from_le_bytes([reg[0] as u8, reg[1] as u8, reg[2] as u8, reg[3] as u8]);
        let updated = (value & !0x700) | (mode << 8);
        for (dst, src) in reg.iter_mut().zip(updated.to_le_bytes()) {
            *dst = src as _;
        }
    };
    set_mode(APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(CpuError::Lapic)
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (u64::from(base & 0xff00_0000) << 32)
        | (u64::from(flags & 0xf0ff) << 40)
        | (u64::from(limit & 0x000f_0000) << 32)
        | (u64::from(base & 0x00ff_ffff) << 16)
        | u64::from(limit & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 { (limit_raw << 12) | 0xfff } else { limit_raw };
    kvm_segment {
        base,
        limit,
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the identity-mapping page tables (first 4 GiB, 2 MiB pages) for long mode.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    let w = |addr: u64, value: u64, what: &'static str| {
        mem.write_obj(value, GuestAddress(addr)).map_err(|source| CpuError::GuestWrite { what, source })
    };
    w(PML4_ADDR, PDPT_ADDR | 0x03, "PML4")?;
    for gib in 0..4u64 {
        let pd = PD_ADDR + gib * 0x1000;
        w(PDPT_ADDR + gib * 8, pd | 0x03, "PDPT")?;
        for i in 0..512u64 {
            w(pd + i * 8, ((gib << 30) + (i << 21)) | 0x83, "page directory")?;
        }
    }
    Ok(())
}

/// Sets registers and segments so vCPU 0 starts at the kernel's entry.
pub fn setup_boot_registers(vcpu: &VcpuFd, mem: &GuestMemoryMmap, entry: BootEntry) -> Result<(), CpuError> {
    let long_mode = matches!(entry, BootEntry::Linux64 { .. });
    let code = if long_mode { gdt_entry(0xa09b, 0, 0xfffff) } else { gdt_entry(0xc09b, 0, 0xfffff) };
    let gdt = [0u64, code, gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x008b, 0, 0x67)];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|source| CpuError::GuestWrite { what: "GDT", source })?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(|source| CpuError::GuestWrite { what: "IDT", source })?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(CpuError::Regs)?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let code_seg = segment_from_gdt(gdt[1], 1);
    let data_seg = segment_from_gdt(gdt[2], 2);
    let tss_seg = segment_from_gdt(gdt[3], 3);
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.tr = tss_seg;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match entry {
        BootEntry::Pvh { entry } => {
            regs.rip = entry;
            regs.rbx = PVH_START_INFO_ADDR;
        }
        BootEntry::Linux64 { entry } => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_ADDR;
        }
    }
    vcpu.set_sregs(&sregs).map_err(CpuError::Regs)?;
    vcpu.set_regs(&regs).map_err(CpuError::Regs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code.base, code.limit, code.l, code.db, code.type_), (0, 0xffff_ffff, 1, 0, 0xb));
        let code32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db, code32.selector), (0, 1, 8));
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.limit, tss.type_, tss.g), (0x67, 0xb, 0));
    }

    #[test]
    fn topology_bits() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(32), 5);
    }
}
