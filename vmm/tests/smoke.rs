//! Smoke tests that run the real `tapir` binary on this host's /dev/kvm with tiny PVH
//! guests (resources/guest/tiny-pvh.py). They need no outer VM, so they run even on a
//! software KVM that cannot boot Linux.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn scratch(name: &str) -> PathBuf {
    let dir = repo().join("target").join("smoke").join(format!("{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny_guest(dir: &Path, args: &[&str]) -> PathBuf {
    let out = dir.join("guest.elf");
    let status = Command::new("python3")
        .arg(repo().join("resources/guest/tiny-pvh.py"))
        .arg(&out)
        .args(args)
        .status()
        .expect("python3 runs");
    assert!(status.success(), "tiny-pvh.py failed");
    out
}

fn tapir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tapir"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("tapir runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn pvh_guest_chooses_exit_status_through_debug_exit() {
    let dir = scratch("debug-exit");
    let kernel = tiny_guest(&dir, &["--serial", "TAPIR-SMOKE-OK\\n", "--exit-value", "5"]);
    let out = tapir(&["--kernel", kernel.to_str().unwrap(), "--memory", "64", "--debug-exit"]);
    assert!(text(&out.stdout).contains("TAPIR-SMOKE-OK"), "stdout: {}", text(&out.stdout));
    assert_eq!(out.status.code(), Some((5 << 1) | 1), "stderr: {}", text(&out.stderr));
}

#[test]
fn config_file_enables_debug_exit() {
    let dir = scratch("no-debug-exit");
    let kernel = tiny_guest(&dir, &[]);
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, format!(r#"{{"kernel": "{}", "debug_exit": true, "memory_mib": 64}}"#, kernel.display())).unwrap();
    let out = tapir(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some((0x2a << 1) | 1), "stderr: {}", text(&out.stderr));
}

#[test]
fn guest_reset_exits_zero() {
    let dir = scratch("reset");
    let kernel = tiny_guest(&dir, &["--reset"]);
    let out = tapir(&["--kernel", kernel.to_str().unwrap(), "--memory", "64"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
fn triple_fault_is_a_clear_error() {
    let dir = scratch("triple-fault");
    let kernel = tiny_guest(&dir, &["--triple-fault"]);
    let out = tapir(&["--kernel", kernel.to_str().unwrap(), "--memory", "64"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "stderr: {err}");
    assert!(err.contains("triple fault") && err.contains("RIP 0x"), "stderr: {err}");
}

#[test]
fn unknown_config_field_is_named() {
    let dir = scratch("bad-field");
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, r#"{"kernel": "/nonexistent", "memroy_mib": 64}"#).unwrap();
    let out = tapir(&["--config", cfg.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains("memroy_mib") && err.contains("vm.json"), "stderr: {err}");
}

#[test]
fn malformed_json_is_a_clear_error() {
    let dir = scratch("bad-json");
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, "{\"kernel\": ").unwrap();
    let out = tapir(&["--config", cfg.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains("line 1"), "stderr: {err}");
}

#[test]
fn missing_kernel_and_initrd_files_are_named() {
    let out = tapir(&["--kernel", "/nonexistent/vmlinuz"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains("`kernel`") && err.contains("/nonexistent/vmlinuz"), "stderr: {err}");

    let dir = scratch("missing-initrd");
    let kernel = tiny_guest(&dir, &[]);
    let out = tapir(&["--kernel", kernel.to_str().unwrap(), "--initrd", "/nonexistent/initrd.gz"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains("`initrd`") && err.contains("/nonexistent/initrd.gz"), "stderr: {err}");

    let out = tapir(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`kernel`"));
}

#[test]
fn corrupt_kernel_image_is_a_clear_error() {
    let dir = scratch("corrupt-kernel");
    let kernel = dir.join("garbage");
    std::fs::write(&kernel, vec![0x5au8; 64 * 1024]).unwrap();
    let out = tapir(&["--kernel", kernel.to_str().unwrap(), "--memory", "64"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "stderr: {err}");
    assert!(err.contains("garbage") && err.contains("kernel"), "stderr: {err}");
}

#[test]
fn out_of_range_values_are_named() {
    let dir = scratch("range");
    let kernel = tiny_guest(&dir, &[]);
    for (args, field) in [
        (vec!["--vcpus", "0"], "`vcpus`"),
        (vec!["--memory", "1"], "`memory_mib`"),
    ] {
        let mut all = vec!["--kernel", kernel.to_str().unwrap()];
        all.extend(args);
        let out = tapir(&all);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "stderr: {err}");
        assert!(err.contains(field), "stderr: {err}");
    }
}

#[test]
fn two_vcpus_boot() {
    let dir = scratch("smp");
    let kernel = tiny_guest(&dir, &["--exit-value", "1"]);
    let out = tapir(&["--kernel", kernel.to_str().unwrap(), "--memory", "64", "--vcpus", "2", "--debug-exit"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
}
