//! Locates the `tapir` binary for e2e scripts. Cargo only gives `CARGO_BIN_EXE_tapir` to
//! the tapir package's own tests, so this crate builds it: `cargo build --release -p
//! tapir`, once per test process. Release, because in the nested runner tapir itself runs
//! under TCG emulation, where a debug build's slowness shows in every test.
//! `TAPIR_BIN=/abs/path` skips the build and uses that binary.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::capture::{run_captured, CaptureEnd};
use crate::paths::{cargo_target_dir, repo_root};
use crate::runner::{output_tail, RunnerError};

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
    let capture =
        run_captured(command, BUILD_TIMEOUT, &|_| false, Duration::ZERO).map_err(|source| {
            RunnerError::Io {
                what: "running cargo build -p tapir".into(),
                source,
            }
        })?;
    let text = String::from_utf8_lossy(&capture.output);
    match capture.end {
        CaptureEnd::Exited(status) if status.success() => {}
        CaptureEnd::Exited(status) => {
            return Err(RunnerError::TapirBuild {
                status: status.to_string(),
                tail: output_tail(&text),
            })
        }
        _ => {
            return Err(RunnerError::TapirBuild {
                status: format!("timed out after {BUILD_TIMEOUT:?}"),
                tail: output_tail(&text),
            })
        }
    }
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
