//! tapir: boot a Linux guest under KVM from a JSON config, with virtio-net or e1000 NICs on
//! tap, user-mode NAT or socket backends.
//!
//! Exit status: odd values are the guest's (debug-exit port: (V << 1) | 1); even values
//! are tapir's own: 0 guest reset/poweroff or user quit, 2 bad config or command line,
//! 4 VM setup failed, 6 the guest crashed the VM (triple fault, KVM internal error).

mod boot;
mod config;
mod cpu;
mod interrupts;
mod io_bus;
mod layout;
mod legacy;
mod logger;
mod mptable;
mod nic_config;
mod nics;
mod pci_root;
mod rtc;
mod terminal;
mod vcpu;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use config::VmConfig;
use legacy::{DebugExit, ExitRequest};
use vm::{Vm, VmOutcome};

pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_SETUP: u8 = 4;
pub const EXIT_GUEST_CRASH: u8 = 6;

#[derive(Parser, Debug)]
#[command(name = "tapir", version, about = "A lean KVM virtual machine monitor with real networking")]
struct Cli {
    /// JSON VM description (see README "Configuration").
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Kernel image: a bzImage, or an ELF vmlinux with a PVH entry note.
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (replaces the config's).
    #[arg(long)]
    cmdline: Option<String>,
    /// Appended to the kernel command line (the config's or the default one).
    #[arg(long)]
    append: Option<String>,
    /// Guest memory in MiB.
    #[arg(long)]
    memory: Option<u64>,
    #[arg(long)]
    vcpus: Option<u8>,
    /// VM name (seeds derived MAC addresses).
    #[arg(long)]
    name: Option<String>,
    /// Enable the isa-debug-exit port at 0xf4.
    #[arg(long)]
    debug_exit: bool,
    /// Check the config and print it as tapir understands it, without starting a VM.
    #[arg(long)]
    check: bool,
}

fn load_config(cli: &Cli) -> Result<VmConfig, config::ConfigError> {
    let mut cfg = match &cli.config {
        Some(path) => VmConfig::from_file(path)?,
        None => VmConfig::default(),
    };
    if let Some(k) = &cli.kernel {
        cfg.kernel = Some(k.clone());
    }
    if let Some(i) = &cli.initrd {
        cfg.initrd = Some(i.clone());
    }
    if let Some(c) = &cli.cmdline {
        cfg.cmdline = Some(c.clone());
    }
    if let Some(a) = &cli.append {
        cfg.cmdline_append = Some(match cfg.cmdline_append.take() {
            Some(existing) => format!("{existing} {a}"),
            None => a.clone(),
        });
    }
    if let Some(m) = cli.memory {
        cfg.memory_mib = m;
    }
    if let Some(v) = cli.vcpus {
        cfg.vcpus = v;
    }
    if let Some(n) = &cli.name {
        cfg.name = n.clone();
    }
    if cli.debug_exit {
        cfg.debug_exit = true;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Stops the VM on SIGINT/SIGTERM/SIGHUP so devices are shut down, taps deleted and the
/// terminal restored. SIGUSR1 logs every NIC's counters without stopping.
fn spawn_signal_thread(exit: std::sync::mpsc::Sender<ExitRequest>) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGUSR1] {
        set.add(s);
    }
    if let Err(e) = set.thread_block() {
        log::warn!("cannot block signals: {e}");
        return;
    }
    let _ = std::thread::Builder::new().name("signals".into()).spawn(move || {
        while let Ok(signal) = set.wait() {
            if signal == Signal::SIGUSR1 {
                let _ = exit.send(ExitRequest::DumpStats);
                continue;
            }
            let _ = exit.send(ExitRequest::User(format!("terminating on signal {signal}")));
            return;
        }
    });
}

fn main() -> ExitCode {
    logger::init();
    let cli = Cli::parse();
    let cfg = match load_config(&cli) {
        Ok(cfg) => cfg,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.check {
        println!("{cfg:#?}");
        for (index, nic) in cfg.nics.iter().enumerate() {
            println!("nics[{index}]: {} mac {}", nic.model, nic.effective_mac(&cfg.name, index));
        }
        return ExitCode::SUCCESS;
    }
    // Block signals before any thread exists so every thread inherits the mask and only
    // the signal thread receives them.
    let (signal_tx, signal_rx) = std::sync::mpsc::channel::<ExitRequest>();
    spawn_signal_thread(signal_tx);
    terminal::enter_raw_mode();
    let vm = match Vm::build(&cfg) {
        Ok(vm) => vm,
        Err(e) => {
            terminal::restore();
            log::error!("{e}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    let forward = vm.exit_sender();
    std::thread::spawn(move || {
        while let Ok(request) = signal_rx.recv() {
            if forward.send(request).is_err() {
                return;
            }
        }
    });
    let outcome = vm.wait();
    terminal::restore();
    let code = match outcome {
        VmOutcome::Reset => {
            log::info!("guest reset the machine; exiting");
            0
        }
        VmOutcome::DebugExit(v) => {
            log::info!("guest wrote {v:#x} to the debug-exit port");
            DebugExit::status_for(v)
        }
        VmOutcome::User(why) => {
            log::info!("{why}");
            0
        }
        VmOutcome::Fatal(why) => {
            log::error!("{why}");
            i32::from(EXIT_GUEST_CRASH)
        }
    };
    // vCPU threads may still sit in KVM_RUN; exiting the process ends them.
    std::process::exit(code)
}
