//! Loads the kernel, initrd and command line, and writes the boot structures for either
//! entry: PVH (ELF vmlinux with a XEN_ELFNOTE_PHYS32_ENTRY note, 32-bit protected mode)
//! or the 64-bit Linux boot protocol (bzImage, zero page, long mode).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, elf::PvhBootCapability, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

/// Linux's x86 COMMAND_LINE_SIZE, including the terminating NUL.
pub const CMDLINE_MAX: usize = 2048;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// loadflags: the kernel is loaded high (at 1 MiB).
const LOADED_HIGH: u8 = 0x01;
/// loadflags: heap_end_ptr is valid.
const CAN_USE_HEAP: u8 = 0x80;
/// Offset of the 64-bit entry point from the start of the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel { path: String, source: std::io::Error },
    #[error("kernel {path} is neither an ELF vmlinux nor a bzImage (first bytes {magic:02x?})")]
    UnknownKernelFormat { path: String, magic: Vec<u8> },
    #[error("kernel {path} is an ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); use the bzImage or a kernel built with CONFIG_PVH")]
    NoPvhEntry { path: String },
    #[error("cannot load kernel {path}: {source}")]
    Load { path: String, source: linux_loader::loader::Error },
    #[error("bzImage {path} has no valid setup header")]
    NoSetupHeader { path: String },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd { path: String, source: std::io::Error },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}; give the VM more memory")]
    InitrdTooLarge { path: String, size: u64, limit: u64 },
    #[error("kernel command line is {0} bytes; the limit is {limit}", limit = CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    #[error("cannot write boot structure '{what}' to guest memory: {source}")]
    GuestWrite { what: &'static str, source: vm_memory::GuestMemoryError },
}

/// How the vCPU must be started to enter the loaded kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// 32-bit protected mode, paging off, EBX = start_info.
    Pvh { entry: u64 },
    /// 64-bit long mode, identity-mapped, RSI = zero page.
    Linux64 { entry: u64 },
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    value: T,
    addr: u64,
) -> Result<(), BootError> {
    mem.write_obj(value, GuestAddress(addr)).map_err(|source| BootError::GuestWrite { what, source })
}

/// The e820 map both boot protocols hand the guest.
fn memory_map(memory_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, MPTABLE_ADDR, E820_RAM), (MPTABLE_ADDR, EBDA_END - MPTABLE_ADDR, E820_RESERVED)];
    for (start, size) in ram_regions(memory_bytes) {
        let (start, size) = if start == 0 { (HIGH_MEMORY_START, size - HIGH_MEMORY_START) } else { (start, size) };
        map.push((start, size, E820_RAM));
    }
    map
}

/// The end of RAM below the MMIO hole.
fn low_ram_end(memory_bytes: u64) -> u64 {
    memory_bytes.min(MMIO_HOLE_START)
}

struct LoadedInitrd {
    addr: u64,
    size: u64,
}

fn load_initrd(mem: &GuestMemoryMmap, path: &Path, memory_bytes: u64, max_addr: u64, kernel_end: u64) -> Result<LoadedInitrd, BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::ReadInitrd { path: path.display().to_string(), source })?;
    let size = data.len() as u64;
    let top = low_ram_end(memory_bytes).min(max_addr.saturating_add(1));
    let addr = top.checked_sub(size).map(|a| a & !0xfff).filter(|&a| a >= kernel_end);
    let Some(addr) = addr else {
        return Err(BootError::InitrdTooLarge { path: path.display().to_string(), size, limit: top });
    };
    mem.write_slice(&data, GuestAddress(addr)).map_err(|source| BootError::GuestWrite { what: "initrd", source })?;
    Ok(LoadedInitrd { addr, size })
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR)).map_err(|source| BootError::GuestWrite { what: "command line", source })
}

/// Loads everything and returns where to start the boot vCPU.
pub fn load(
    mem: &GuestMemoryMmap,
    memory_bytes: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootEntry, BootError> {
    let kpath = kernel.display().to_string();
    let mut file = File::open(kernel).map_err(|source| BootError::OpenKernel { path: kpath.clone(), source })?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(|source| BootError::OpenKernel { path: kpath.clone(), source })?;
    file.seek(SeekFrom::Start(0)).map_err(|source| BootError::OpenKernel { path: kpath.clone(), source })?;
    write_cmdline(mem, cmdline)?;

    if n == 4 && magic == *b"\x7fELF" {
        let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START)))
            .map_err(|source| BootError::Load { path: kpath.clone(), source })?;
        let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
            return Err(BootError::NoPvhEntry { path: kpath });
        };
        let initrd = match initrd {
            Some(p) => Some(load_initrd(mem, p, memory_bytes, u64::from(u32::MAX), loaded.kernel_end)?),
            None => None,
        };
        write_pvh_start_info(mem, memory_bytes, initrd.as_ref())?;
        return Ok(BootEntry::Pvh { entry: entry.0 });
    }

    let loaded = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START))).map_err(|source| {
        if matches!(source, linux_loader::loader::Error::Bzimage(_)) && n >= 2 && magic[..2] != [b'M', b'Z'] {
            BootError::UnknownKernelFormat { path: kpath.clone(), magic: magic[..n].to_vec() }
        } else {
            BootError::Load { path: kpath.clone(), source }
        }
    })?;
    let Some(mut hdr) = loaded.setup_header else {
        return Err(BootError::NoSetupHeader { path: kpath });
    };
    if hdr.header != KERNEL_HDR_MAGIC {
        return Err(BootError::NoSetupHeader { path: kpath });
    }
    let mut params = boot_params::default();
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline.len() as u32;
    if let Some(p) = initrd {
        let max = if hdr.initrd_addr_max == 0 { 0x37ff_ffff } else { u64::from(hdr.initrd_addr_max) };
        let rd = load_initrd(mem, p, memory_bytes, max, loaded.kernel_end)?;
        hdr.ramdisk_image = rd.addr as u32;
        hdr.ramdisk_size = rd.size as u32;
    }
    params.hdr = hdr;
    let map = memory_map(memory_bytes);
    for (slot, (addr, size, kind)) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry { addr: *addr, size: *size, r#type: *kind };
    }
    params.e820_entries = map.len() as u8;
    write(mem, "zero page", params, ZERO_PAGE_ADDR)?;
    Ok(BootEntry::Linux64 { entry: loaded.kernel_load.0 + STARTUP_64_OFFSET })
}

fn write_pvh_start_info(mem: &GuestMemoryMmap, memory_bytes: u64, initrd: Option<&LoadedInitrd>) -> Result<(), BootError> {
    let map = memory_map(memory_bytes);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry { addr: *addr, size: *size, type_: *kind, reserved: 0 };
        write(mem, "PVH memory map", entry, PVH_MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64)?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some(rd) = initrd {
        let module = hvm_modlist_entry { paddr: rd.addr, size: rd.size, cmdline_paddr: 0, reserved: 0 };
        write(mem, "PVH module list", module, PVH_MODLIST_ADDR)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    write(mem, "PVH start info", info, PVH_START_INFO_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    #[test]
    fn memory_map_reserves_mptable_and_skips_low_hole() {
        let map = memory_map(128 << 20);
        assert_eq!(map[0], (0, MPTABLE_ADDR, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIGH_MEMORY_START, (128 << 20) - HIGH_MEMORY_START, E820_RAM));
    }

    #[test]
    fn garbage_kernel_is_a_clear_error() {
        let path = std::env::temp_dir().join(format!("tapir-garbage-kernel-{}", std::process::id()));
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let err = load(&mem(64 << 20), 64 << 20, &path, None, "console=ttyS0").unwrap_err();
        let _ = std::fs::remove_file(&path);
        let text = err.to_string();
        assert!(text.contains("neither an ELF vmlinux nor a bzImage") || text.contains("cannot load kernel"), "{text}");
    }

    #[test]
    fn overlong_cmdline_is_rejected() {
        let long = "a".repeat(CMDLINE_MAX);
        assert!(matches!(write_cmdline(&mem(1 << 20), &long), Err(BootError::CmdlineTooLong(_))));
    }
}
