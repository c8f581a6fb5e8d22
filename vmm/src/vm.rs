//! Builds a VM from a validated config and runs it until the guest or the user stops it.

use std::io::Write;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootEntry, BootError};
use crate::config::VmConfig;
use crate::cpu::{self, CpuError};
use crate::interrupts::GsiRouter;
use crate::io_bus::IoBus;
use crate::layout::{ram_regions, IDENTITY_MAP_ADDR, TSS_ADDR};
use crate::legacy::{DebugExit, ExitRequest, SerialConsole, I8042, SERIAL_IRQ};
use crate::mptable::{self, MptableError};
use crate::nics::{self, NicError, Nics};
use crate::pci_root::PciRoot;

#[derive(Debug, Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is the kvm module loaded and do you have access to /dev/kvm?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM setup failed at {step}: {source}")]
    Kvm { step: &'static str, source: kvm_ioctls::Error },
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory { mib: u64, reason: String },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("vCPU {index}: {source}")]
    Cpu { index: u8, source: CpuError },
    #[error(transparent)]
    Mptable(#[from] MptableError),
    #[error(transparent)]
    Nic(#[from] NicError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("no kernel given: set `kernel` in the config or pass --kernel")]
    NoKernel,
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

fn kvm_step(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { step, source }
}

/// How the VM ended, mapped to tapir's exit status by `main`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    Reset,
    DebugExit(u8),
    User(String),
    Fatal(String),
}

pub struct Vm {
    _vm: Arc<VmFd>,
    _memory: GuestMemoryMmap,
    pci: Arc<PciRoot>,
    nics: Nics,
    exit_rx: Receiver<ExitRequest>,
    exit_tx: Sender<ExitRequest>,
}

fn create_memory(vm: &VmFd, memory_bytes: u64, mib: u64) -> Result<GuestMemoryMmap, VmError> {
    let ranges: Vec<(GuestAddress, usize)> =
        ram_regions(memory_bytes).into_iter().map(|(start, size)| (GuestAddress(start), size as usize)).collect();
    let memory = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory { mib, reason: e.to_string() })?;
    for (slot, region) in memory.iter().enumerate() {
        let mapping = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mmap owned by `memory`, which the Vm keeps for as
        // long as the VM exists.
        unsafe { vm.set_user_memory_region(mapping) }.map_err(kvm_step("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(memory)
}

impl Vm {
    pub fn build(cfg: &VmConfig) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_step("KVM_CREATE_VM"))?);
        vm.set_tss_address(TSS_ADDR as usize).map_err(kvm_step("KVM_SET_TSS_ADDR"))?;
        // Only VMX needs the identity map; other hosts may refuse it harmlessly.
        let _ = vm.set_identity_map_address(IDENTITY_MAP_ADDR);
        vm.create_irq_chip().map_err(kvm_step("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() })
            .map_err(kvm_step("KVM_CREATE_PIT2"))?;

        let memory_bytes = cfg.memory_mib << 20;
        let memory = create_memory(&vm, memory_bytes, cfg.memory_mib)?;
        let (exit_tx, exit_rx) = channel();

        let serial = if cfg.serial {
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
            vm.register_irqfd(&irq, SERIAL_IRQ).map_err(kvm_step("KVM_IRQFD for the serial port"))?;
            let out: Box<dyn Write + Send> = Box::new(std::io::stdout());
            Some(SerialConsole::new(irq, out))
        } else {
            None
        };

        let router = GsiRouter::new(vm.clone());
        let mut pci = PciRoot::new(Some(vm.clone()));
        let nics = nics::attach_all(cfg, &vm, &router, &memory, &mut pci)?;
        let pci = Arc::new(pci);

        let cmdline = cfg.effective_cmdline();
        let kernel = cfg.kernel.as_deref().ok_or(VmError::NoKernel)?;
        let entry = boot::load(&memory, memory_bytes, kernel, cfg.initrd.as_deref(), &cmdline)?;
        mptable::write(&memory, cfg.vcpus, &nics.pci_irqs)?;

        let bus = Arc::new(IoBus::new(
            serial.clone(),
            I8042::new(exit_tx.clone()),
            cfg.debug_exit.then(|| DebugExit::new(exit_tx.clone())),
            pci.clone(),
        ));

        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_step("KVM_GET_SUPPORTED_CPUID"))?;
        if log::log_enabled!(log::Level::Debug) {
            for e in cpu::cpuid_for(&base_cpuid, 0, cfg.vcpus).as_slice() {
                log::debug!(
                    "cpuid {:#x}/{:#x}: eax={:#010x} ebx={:#010x} ecx={:#010x} edx={:#010x}",
                    e.function, e.index, e.eax, e.ebx, e.ecx, e.edx
                );
            }
        }
        let mut vcpus = Vec::new();
        for index in 0..cfg.vcpus {
            let vcpu = vm.create_vcpu(u64::from(index)).map_err(kvm_step("KVM_CREATE_VCPU"))?;
            let cpu_err = |source| VmError::Cpu { index, source };
            vcpu.set_cpuid2(&cpu::cpuid_for(&base_cpuid, index, cfg.vcpus))
                .map_err(|e| cpu_err(CpuError::SetCpuid(e)))?;
            cpu::setup_msrs(&vcpu).map_err(cpu_err)?;
            cpu::setup_fpu(&vcpu).map_err(cpu_err)?;
            cpu::setup_lapic(&vcpu).map_err(cpu_err)?;
            if index == 0 {
                cpu::setup_boot_registers(&vcpu, &memory, entry).map_err(cpu_err)?;
            }
            vcpus.push(vcpu);
        }
        log::info!(
            "VM '{}': {} vCPU(s), {} MiB, {} boot, kernel {}",
            cfg.name,
            cfg.vcpus,
            cfg.memory_mib,
            match entry {
                BootEntry::Pvh { .. } => "PVH",
                BootEntry::Linux64 { .. } => "64-bit Linux",
            },
            cfg.kernel.as_deref().map(|p| p.display().to_string()).unwrap_or_default()
        );

        if let Some(serial) = &serial {
            crate::terminal::spawn_stdin_pump(serial.clone(), exit_tx.clone());
        }
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let bus = bus.clone();
            let exit = exit_tx.clone();
            std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || crate::vcpu::run(index as u8, vcpu, bus, exit))
                .map_err(VmError::Thread)?;
        }
        nics.start()?;
        Ok(Vm { _vm: vm, _memory: memory, pci, nics, exit_rx, exit_tx })
    }

    /// A sender other threads (signal handling) can use to stop the VM.
    pub fn exit_sender(&self) -> Sender<ExitRequest> {
        self.exit_tx.clone()
    }

    /// Blocks until the first stop request, then shuts devices down and reports.
    pub fn wait(self) -> VmOutcome {
        let request = loop {
            match self.exit_rx.recv() {
                Ok(ExitRequest::DumpStats) => self.log_stats(),
                Ok(request) => break request,
                Err(_) => break ExitRequest::Fatal("all vCPU threads vanished".into()),
            }
        };
        let _ = std::io::stdout().flush();
        for device in self.pci.devices() {
            let mut dev = crate::legacy::lock(device);
            dev.shutdown();
            let stats = dev.stats();
            if !stats.is_empty() {
                log::info!("{stats}");
            }
        }
        drop(self.nics);
        match request {
            ExitRequest::Reset => VmOutcome::Reset,
            ExitRequest::DebugExit(v) => VmOutcome::DebugExit(v),
            ExitRequest::User(why) => VmOutcome::User(why),
            ExitRequest::Fatal(why) => VmOutcome::Fatal(why),
            ExitRequest::DumpStats => VmOutcome::Fatal("stats request ended the VM".into()),
        }
    }

    fn log_stats(&self) {
        for device in self.pci.devices() {
            let stats = crate::legacy::lock(device).stats();
            if !stats.is_empty() {
                log::info!("{stats}");
            }
        }
    }
}
