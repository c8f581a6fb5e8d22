//! End-to-end test support for tapir: run a shell script either directly on a host with
//! hardware virtualization, or inside an emulated nested-virt VM (QEMU TCG with SVM, KVM
//! loaded inside, the host's `/` shared over 9p) on hosts without it.
//!
//! A test builds its scenario as one script (batch several checks per run: every nested
//! run boots an outer VM first) and asserts on the outcome:
//!
//! ```no_run
//! use std::time::Duration;
//! use tapir_tests::{guest_images, guest_run_arg, tapir_binary, Runner};
//!
//! let runner = Runner::detect().unwrap();
//! let images = guest_images().unwrap();
//! let tapir = tapir_binary().unwrap();
//! // The guest's kernel command line: the guest init runs the command, prints
//! // TAPIR-GUEST-STATUS=<rc> and exits through port 0xf4.
//! let cmdline = format!("console=ttyS0 quiet {} tapir.debug_exit", guest_run_arg("echo hello; exit 7"));
//! let script = format!(
//!     "{tapir} ... (a config naming {kernel}, {initrd} and the cmdline '{cmdline}')\necho TAPIR-EXIT=$?",
//!     tapir = tapir.display(),
//!     kernel = images.vmlinux.display(),
//!     initrd = images.guest_initramfs.display(),
//! );
//! let outcome = runner.run(&script, Duration::from_secs(180)).unwrap();
//! outcome.assert_status(0);
//! assert!(outcome.output.contains("TAPIR-GUEST-STATUS=7"), "{}", outcome.console);
//! ```
//!
//! Environment: `TAPIR_RUNNER=direct|nested` forces a mode, `TAPIR_BIN` names a prebuilt
//! tapir, `TAPIR_GUEST_DIR` moves the image cache (keep it outside /tmp and /run),
//! `TAPIR_RUNNER_LOCK` moves the machine-wide run lock.

mod base64;
mod binary;
mod capture;
mod images;
mod lock;
mod paths;
mod runner;
mod scenario;
pub mod stability;

pub use base64::{base64_encode, guest_run_arg, KERNEL_CMDLINE_MAX};
pub use binary::tapir_binary;
pub use images::{guest_images, GuestImages};
pub use paths::{repo_root, runner_dir};
pub use runner::{Mode, RunOutcome, Runner, RunnerError};
pub use scenario::{guest_cmdline_for, value_after, values_after, Scenario, ScenarioOutcome, NESTED_GUEST_CMDLINE};
