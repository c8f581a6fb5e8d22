//! The guest images built by `resources/guest/build.sh` (Debian kernel + busybox
//! initramfs images), built once per cache directory and reused.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::paths::repo_root;
use crate::runner::{run_build_step, RunnerError};

/// Downloading the 70 MB kernel package and unpacking it takes well under this.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// Paths of the built guest images (all absolute, all outside /tmp, so usable from
/// scripts in both runner modes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImages {
    /// `$TAPIR_GUEST_DIR`, or `<repo>/target/guest`.
    pub dir: PathBuf,
    /// Debian's bzImage.
    pub vmlinuz: PathBuf,
    /// The ELF kernel inside it (it has a PVH entry note).
    pub vmlinux: PathBuf,
    /// initramfs of the guest tapir boots; see `resources/guest/guest-init` for its
    /// contract (`tapir.run=`, `tapir.debug_exit`, `TAPIR-GUEST-*` markers).
    pub guest_initramfs: PathBuf,
    /// initramfs of the nested runner's outer VM.
    pub outer_initramfs: PathBuf,
    /// The modules both initramfs images carry, in the kernel tree's layout.
    pub modules: PathBuf,
    /// `uname -r` of the kernel.
    pub kernel_release: String,
}

static BUILT: Mutex<Option<GuestImages>> = Mutex::new(None);

fn images_dir() -> PathBuf {
    match std::env::var_os("TAPIR_GUEST_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => repo_root().join("target").join("guest"),
    }
}

/// Runs build.sh (a no-op when its outputs are current) once per process and returns the
/// image paths. Threads wait on a mutex here; processes wait on build.sh's own lock.
pub fn guest_images() -> Result<GuestImages, RunnerError> {
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(images) = built.as_ref() {
        return Ok(images.clone());
    }
    let dir = images_dir();
    let mut command = Command::new(repo_root().join("resources/guest/build.sh"));
    command.env("TAPIR_GUEST_DIR", &dir);
    run_build_step(command, "resources/guest/build.sh", BUILD_TIMEOUT, |status, tail| {
        RunnerError::ImageBuild { status, tail }
    })?;
    let kernel_release = std::fs::read_to_string(dir.join("kernel-release"))
        .map_err(|source| RunnerError::Io {
            what: format!("reading {}/kernel-release", dir.display()),
            source,
        })?
        .trim()
        .to_string();
    let images = GuestImages {
        vmlinuz: dir.join("vmlinuz"),
        vmlinux: dir.join("vmlinux"),
        guest_initramfs: dir.join("guest-initramfs.cpio.gz"),
        outer_initramfs: dir.join("outer-initramfs.cpio.gz"),
        modules: dir.join("modules"),
        kernel_release,
        dir,
    };
    *built = Some(images.clone());
    Ok(images)
}
