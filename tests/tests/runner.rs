//! Tests of the e2e runner itself, in whatever mode this host selects (nested here).

use std::time::{Duration, Instant};

use tapir_tests::{guest_images, guest_run_arg, Mode, Runner};

/// One outer-VM run (they cost ~10 s each here) checks the basics: status, output, host
/// paths shared both ways, and a private /tmp.
#[test]
fn trivial_script_reports_status_and_output() {
    let runner = Runner::detect().expect("runner");
    std::fs::create_dir_all(tapir_tests::runner_dir()).expect("runner dir");
    let marker = tapir_tests::runner_dir().join(format!("seen-{}", std::process::id()));
    std::fs::write(&marker, "from the host\n").expect("marker");
    let out_file = marker.with_extension("out");
    let script = format!(
        "echo hi\ncat {marker} || exit 1\necho written-inside > {out}\n\
         echo scratch > /tmp/scratch && cat /tmp/scratch\nexit 3",
        marker = marker.display(),
        out = out_file.display(),
    );
    let started = Instant::now();
    let outcome = runner.run(&script, Duration::from_secs(180)).expect("run");
    eprintln!(
        "{} mode: trivial run took {:?} wall ({:?} with the lock wait)",
        outcome.mode,
        outcome.elapsed,
        started.elapsed()
    );
    outcome.assert_status(3);
    assert_eq!(
        outcome.output, "hi\nfrom the host\nscratch\n",
        "console:\n{}",
        outcome.console
    );
    let written = std::fs::read_to_string(&out_file).expect("file written by the script");
    assert_eq!(written, "written-inside\n");
    let _ = std::fs::remove_file(&marker);
    let _ = std::fs::remove_file(&out_file);
}

/// Direct mode checks timeouts cheaply on every run; this is the nested flavour.
#[test]
#[ignore = "spends 40 s of a 2-core machine waiting for a timeout"]
fn timeout_is_an_error_with_the_output_tail() {
    let runner = Runner::detect().expect("runner");
    // Nested mode spends its first ~10 s booting the outer VM.
    let timeout = match runner.mode() {
        Mode::Direct => Duration::from_secs(2),
        Mode::Nested => Duration::from_secs(40),
    };
    let error = runner
        .run("echo before-the-hang; sleep 600", timeout)
        .expect_err("the script must time out");
    let message = error.to_string();
    assert!(message.contains("timed out"), "{message}");
    assert!(message.contains("before-the-hang"), "{message}");
}

/// Validates the whole nested stack without tapir: inside the runner, QEMU with KVM boots
/// the Debian guest kernel and the guest initramfs, which runs a `tapir.run=` command,
/// gets a DHCP lease over e1000 and exits through isa-debug-exit. QEMU reports
/// debug-exit byte 5 as exit status (5 << 1) | 1 = 11.
#[test]
#[ignore = "validation aid for the runner and guest images; tapir's own e2e tests cover this path"]
fn qemu_kvm_boots_the_guest_image_inside_the_runner() {
    let runner = Runner::detect().expect("runner");
    let images = guest_images().expect("guest images");
    let guest_command = "echo GUEST-OK; udhcpc -i eth0 -n -q -t 5 && ping -c 1 -W 5 10.0.2.2 && echo GUEST-NET-OK; exit 5";
    let script = format!(
        "qemu-system-x86_64 -enable-kvm -cpu host -m 256 -kernel {kernel} -initrd {initrd} \
         -append 'console=ttyS0 quiet {run} tapir.debug_exit' \
         -device isa-debug-exit,iobase=0xf4,iosize=4 -netdev user,id=n -device e1000,netdev=n \
         -display none -no-reboot -nodefaults -serial stdio </dev/null\n\
         echo QEMU-EXIT=$?",
        kernel = images.vmlinuz.display(),
        initrd = images.guest_initramfs.display(),
        run = guest_run_arg(guest_command),
    );
    let started = Instant::now();
    let outcome = runner.run(&script, Duration::from_secs(300)).expect("run");
    eprintln!(
        "{} mode: QEMU-in-runner boot took {:?} wall ({:?} with the lock wait)",
        outcome.mode,
        outcome.elapsed,
        started.elapsed()
    );
    outcome.assert_status(0);
    for expected in [
        "TAPIR-GUEST-READY",
        "GUEST-OK",
        "GUEST-NET-OK",
        "TAPIR-GUEST-STATUS=5",
        "QEMU-EXIT=11",
    ] {
        assert!(
            outcome.output.contains(expected),
            "missing {expected}; console:\n{}",
            outcome.console
        );
    }
}

/// Builds tapir in release from inside a test (cargo test must not hold a lock that
/// blocks the nested cargo build) and finds the binary.
#[test]
#[ignore = "builds the tapir binary in release mode, which takes minutes"]
fn tapir_binary_is_built_and_found() {
    let started = Instant::now();
    let path = tapir_tests::tapir_binary().expect("tapir binary");
    eprintln!(
        "tapir_binary() took {:?}: {}",
        started.elapsed(),
        path.display()
    );
    assert!(path.is_absolute() && path.is_file(), "{}", path.display());
    assert!(path.ends_with("release/tapir"));
    assert_eq!(tapir_tests::tapir_binary().expect("second call"), path);
}

/// Direct mode needs no KVM to run a script, so it is checked on every host.
#[test]
fn direct_mode_runs_scripts_on_this_host() {
    let runner = Runner::new(Mode::Direct).expect("direct runner");
    let outcome = runner
        .run(
            "echo out; echo err >&2; pwd; echo \"$HOME\"; exit 9",
            Duration::from_secs(30),
        )
        .expect("run");
    outcome.assert_status(9);
    assert_eq!(outcome.output, "out\nerr\n/\n/root\n");
    let error = runner
        .run("echo waiting; sleep 600", Duration::from_secs(1))
        .expect_err("must time out");
    assert!(
        matches!(error, tapir_tests::RunnerError::Timeout { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("waiting"), "{error}");
}
