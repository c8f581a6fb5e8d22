//! End-to-end test support for tapir: run a shell script either directly on a host with
//! hardware virtualization, or inside an emulated nested-virt VM (QEMU TCG with SVM, KVM
//! loaded inside, the host's `/` shared over 9p) on hosts without it.
//!
//! ```no_run
//! use std::time::Duration;
//! use tapir_tests::{guest_images, guest_run_arg, tapir_binary, Runner};
//!
//! let runner = Runner::detect().unwrap();
//! let images = guest_images().unwrap();
//! let tapir = tapir_binary().unwrap();
//! let script = format!(
//!     "{} --kernel {} --initrd {} --cmdline 'console=ttyS0 {} tapir.debug_exit'",
//!     tapir.display(),
//!     images.vmlinux.display(),
//!     images.guest_initramfs.display(),
//!     guest_run_arg("echo hello"),
//! );
//! let outcome = runner.run(&script, Duration::from_secs(120)).unwrap();
//! assert!(outcome.output.contains("hello"), "{}", outcome.console);
//! ```

mod base64;
mod binary;
mod capture;
mod images;
mod lock;
mod paths;
mod runner;

pub use base64::{base64_encode, guest_run_arg, KERNEL_CMDLINE_MAX};
pub use binary::tapir_binary;
pub use images::{guest_images, GuestImages};
pub use paths::{repo_root, runner_dir};
pub use runner::{Mode, RunOutcome, Runner, RunnerError};
