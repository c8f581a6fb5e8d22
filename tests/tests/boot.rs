//! Issue 2 end to end: a Debian kernel and initramfs boot under tapir, through both entry
//! paths (bzImage 64-bit boot protocol, and the ELF vmlinux's PVH note), with two vCPUs,
//! and the guest's init chooses tapir's exit status through the debug-exit port.

use std::time::Duration;

use tapir_tests::Scenario;

#[test]
fn debian_guest_boots_both_ways_and_sets_exit_status() {
    let mut s = Scenario::new("boot").expect("scenario");
    let probe = "echo TAPIR-E2E-BOOT-OK; \
                 echo CPUS=$(grep -c ^processor /proc/cpuinfo); \
                 echo BRIDGE=$(cat /sys/bus/pci/devices/0000:00:00.0/vendor)$(cat /sys/bus/pci/devices/0000:00:00.0/class); \
                 echo RTC-YEAR=$(date +%Y); \
                 exit 7\n";
    s.guest("bzimage", 2, "[]", probe).unwrap();
    s.guest("pvh", 1, "[]", "echo TAPIR-E2E-PVH-OK; exit 3\n").unwrap();
    let vmlinux = s.images().vmlinux.display().to_string();
    let script = format!(
        "{}\necho TAPIR-EXIT-bzimage=$?\n{}\necho TAPIR-EXIT-pvh=$?\n",
        s.tapir_command("bzimage", ""),
        s.tapir_command("pvh", &format!("--kernel '{vmlinux}'")),
    );
    let out = s.run(&script, Duration::from_secs(600)).expect("runner");
    out.outcome.assert_status(0);
    let bz = out.log("bzimage");
    assert!(bz.contains("TAPIR-E2E-BOOT-OK"), "{}", out.dump());
    assert!(bz.contains("CPUS=2"), "two vCPUs online\n{}", out.dump());
    assert!(bz.contains("BRIDGE=0x1b360x060000"), "host bridge enumerated\n{}", out.dump());
    assert!(bz.contains("RTC-YEAR=20"), "{}", out.dump());
    assert!(bz.contains("TAPIR-GUEST-STATUS=7"), "{}", out.dump());
    assert_eq!(out.exit_status("bzimage"), Some((7 << 1) | 1), "{}", out.dump());
    assert!(out.log("pvh").contains("TAPIR-E2E-PVH-OK"), "{}", out.dump());
    assert!(out.log("pvh").contains("PVH boot"), "{}", out.dump());
    assert_eq!(out.exit_status("pvh"), Some((3 << 1) | 1), "{}", out.dump());
}
