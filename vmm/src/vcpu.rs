//! vCPU threads: run KVM_RUN, dispatch port and MMIO exits to the bus, and turn anything
//! the VMM cannot continue from into an `ExitRequest::Fatal` naming the exit and RIP.

use std::sync::mpsc::Sender;
use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::io_bus::IoBus;
use crate::legacy::ExitRequest;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

fn rip(vcpu: &VcpuFd) -> String {
    vcpu.get_regs().map(|r| format!("{:#x}", r.rip)).unwrap_or_else(|e| format!("unknown ({e})"))
}

/// Runs one vCPU until the VM stops or it hits an exit it cannot handle.
pub fn run(index: u8, mut vcpu: VcpuFd, bus: Arc<IoBus>, exit: Sender<ExitRequest>) {
    loop {
        let fatal = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.pio_read(port, data);
                continue;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                bus.pio_write(port, data);
                continue;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                bus.mmio_read(addr, data);
                continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                bus.mmio_write(addr, data);
                continue;
            }
            Ok(VcpuExit::Intr) => continue,
            Ok(VcpuExit::SystemEvent(kind, _)) if kind == KVM_SYSTEM_EVENT_RESET => {
                let _ = exit.send(ExitRequest::Reset);
                return;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) if kind == KVM_SYSTEM_EVENT_SHUTDOWN => {
                let _ = exit.send(ExitRequest::Reset);
                return;
            }
            Ok(VcpuExit::Shutdown) => "guest triple fault (KVM_EXIT_SHUTDOWN)".to_string(),
            Ok(VcpuExit::Hlt) => "vCPU halted with no way to wake it (KVM_EXIT_HLT)".to_string(),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                format!("KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, cpu {cpu})")
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: KVM filled the `internal` member for KVM_EXIT_INTERNAL_ERROR.
                let sub = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let what = match sub {
                    1 => "emulation failure",
                    2 => "simultaneous exceptions",
                    3 => "delivery event",
                    _ => "unknown",
                };
                format!("KVM_EXIT_INTERNAL_ERROR (suberror {sub}: {what})")
            }
            Ok(other) => format!("unhandled KVM exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => format!("KVM_RUN failed: {e}"),
        };
        let message = format!("vCPU {index} stopped: {fatal} at RIP {}", rip(&vcpu));
        let _ = exit.send(ExitRequest::Fatal(message));
        return;
    }
}
