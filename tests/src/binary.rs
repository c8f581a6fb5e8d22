//! Locates the `tapir` binary for e2e scripts. Cargo only gives `CARGO_BIN_EXE_tapir` to
//! the tapir package's own tests, so this crate builds it: `cargo build --release -p
//! tapir`, once per test process. Release, because in the nested runner tapir itself runs
//! under TCG emulation, where a debug build's slowness shows in every test.
//! `TAPIR_BIN=/abs/path` skips the build and uses that binary.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::paths::{cargo_target_dir, repo_root};
use crate::runner::{run_build_step, RunnerError};

/// A cold release build of the workspace on a busy 2-core machine.
const BUILD_TIMEOUT: Duration = Duration::from_secs(1800);

static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The tapir binary: `$TAPIR_BIN`, or `<target>/release/tapir` freshly built by cargo
/// (cargo makes that a no-op when nothing changed, and serializes concurrent builds).
pub fn tapir_binary() -> Result<PathBuf, RunnerError> {
    if let Some(path) = std::env::var_os("TAPIR_BIN").filter(|path| !path.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(RunnerError::Setup(format!(
                "TAPIR_BIN={} is not a file",
                path.display()
            )));
        }
        return Ok(path);
    }
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(path) = built.as_ref() {
        return Ok(path.clone());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(repo_root())
        .args(["build", "--release", "-p", "tapir"]);
    run_build_step(command, "cargo build -p tapir", BUILD_TIMEOUT, |status, tail| {
        RunnerError::TapirBuild { status, tail }
    })?;
    let path = cargo_target_dir().join("release").join("tapir");
    if !path.is_file() {
        return Err(RunnerError::Setup(format!(
            "cargo built tapir but {} is missing",
            path.display()
        )));
    }
    *built = Some(path.clone());
    Ok(path)
}
