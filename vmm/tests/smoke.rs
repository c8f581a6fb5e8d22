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

fn check_macs(name: &str, nics: &str) -> Vec<String> {
    let dir = scratch(&format!("mac-{name}"));
    let kernel = tiny_guest(&dir, &[]);
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, format!(r#"{{"name": "{name}", "kernel": "{}", "nics": {nics}}}"#, kernel.display())).unwrap();
    let out = tapir(&["--config", cfg.to_str().unwrap(), "--check"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    text(&out.stdout).lines().filter_map(|l| l.split(" mac ").nth(1).map(str::to_string)).collect()
}

const TWO_NICS: &str = r#"[{"model": "virtio-net", "backend": {"type": "stream", "listen": "127.0.0.1:0"}},
                          {"model": "e1000", "backend": {"type": "stream", "listen": "127.0.0.1:0"}}]"#;

#[test]
fn derived_macs_are_stable_per_name_and_distinct_across_names() {
    let a1 = check_macs("web", TWO_NICS);
    let a2 = check_macs("web", TWO_NICS);
    let b = check_macs("db", TWO_NICS);
    assert_eq!(a1.len(), 2);
    assert_eq!(a1, a2, "same name, same MACs");
    assert_ne!(a1[0], a1[1], "each NIC has its own MAC");
    assert!(a1.iter().all(|m| !b.contains(m)), "different names, different MACs: {a1:?} {b:?}");
    assert!(a1.iter().all(|m| m != "52:54:00:12:34:56"));
}

#[test]
fn invalid_and_duplicate_macs_in_one_vm_are_rejected() {
    let dir = scratch("bad-mac");
    let kernel = tiny_guest(&dir, &[]);
    for (nics, needle) in [
        (r#"[{"model": "e1000", "mac": "01:00:5e:00:00:01", "backend": {"type": "stream", "listen": "127.0.0.1:0"}}]"#, "multicast"),
        (r#"[{"model": "e1000", "mac": "52:54:00:zz:00:01", "backend": {"type": "stream", "listen": "127.0.0.1:0"}}]"#, "not a MAC"),
        (r#"[{"model": "e1000", "mac": "02:00:00:00:00:01", "backend": {"type": "stream", "listen": "127.0.0.1:0"}},
             {"model": "virtio-net", "mac": "02:00:00:00:00:01", "backend": {"type": "stream", "listen": "127.0.0.1:0"}}]"#, "already used by nics[0]"),
    ] {
        let cfg = dir.join("vm.json");
        std::fs::write(&cfg, format!(r#"{{"kernel": "{}", "nics": {nics}}}"#, kernel.display())).unwrap();
        let out = tapir(&["--config", cfg.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "stderr: {err}");
        assert!(err.contains("mac") && err.contains(needle), "stderr: {err}");
    }
}

#[test]
fn a_second_running_vm_with_the_same_mac_is_refused() {
    let dir = scratch("dup-mac");
    // No debug-exit: the guest halts with interrupts off and the VM stays up.
    let kernel = tiny_guest(&dir, &[]);
    let registry = dir.join("registry");
    let nic = r#"[{"model": "virtio-net", "mac": "02:aa:bb:cc:dd:01", "backend": {"type": "stream", "listen": "127.0.0.1:0"}}]"#;
    let write_cfg = |name: &str| {
        let cfg = dir.join(format!("{name}.json"));
        std::fs::write(&cfg, format!(r#"{{"name": "{name}", "kernel": "{}", "memory_mib": 32, "nics": {nic}}}"#, kernel.display())).unwrap();
        cfg
    };
    let first_cfg = write_cfg("first-vm");
    let second_cfg = write_cfg("second-vm");
    let mut first = Command::new(env!("CARGO_BIN_EXE_tapir"))
        .args(["--config", first_cfg.to_str().unwrap()])
        .env("TAPIR_MAC_REGISTRY", &registry)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::read_dir(&registry).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "first VM never claimed its MAC");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = Command::new(env!("CARGO_BIN_EXE_tapir"))
        .args(["--config", second_cfg.to_str().unwrap()])
        .env("TAPIR_MAC_REGISTRY", &registry)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let _ = first.kill();
    let _ = first.wait();
    let err = text(&second.stderr);
    assert_eq!(second.status.code(), Some(4), "stderr: {err}");
    assert!(err.contains("first-vm") && err.contains("second-vm") && err.contains("02:aa:bb:cc:dd:01"), "stderr: {err}");
}

#[test]
fn sigusr1_logs_counters_and_sigterm_stops_cleanly() {
    let dir = scratch("signals");
    let kernel = tiny_guest(&dir, &[]);
    let cfg = dir.join("vm.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"name": "sig", "kernel": "{}", "memory_mib": 32,
                "nics": [{{"model": "e1000", "backend": {{"type": "stream", "listen": "127.0.0.1:0"}}}}]}}"#,
            kernel.display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tapir"))
        .args(["--config", cfg.to_str().unwrap()])
        .env("TAPIR_MAC_REGISTRY", dir.join("registry"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    std::thread::sleep(std::time::Duration::from_millis(500));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {err}");
    // One stats line from SIGUSR1 while running, one at exit.
    let stats_lines = err.lines().filter(|l| l.contains("e1000") && l.contains(": tx ")).count();
    assert_eq!(stats_lines, 2, "stderr: {err}");
    assert!(err.contains("terminating on signal SIGTERM"), "stderr: {err}");
}
