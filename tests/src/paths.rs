//! Where the runner keeps its files. Everything lives under `<repo>/target`, which the
//! nested runner's outer VM sees at the same path (unlike /tmp and /run, which are fresh
//! tmpfs mounts inside it).

use std::path::PathBuf;

/// The workspace root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// `<repo>/target/runner`: scripts, lock files and scratch space of the runner. Tests may
/// put their own scratch files here too (it is visible in both modes).
pub fn runner_dir() -> PathBuf {
    repo_root().join("target").join("runner")
}

/// Cargo's target directory, honouring CARGO_TARGET_DIR like cargo does.
pub(crate) fn cargo_target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                repo_root().join(dir)
            }
        }
        None => repo_root().join("target"),
    }
}
