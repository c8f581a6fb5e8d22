//! Multi-VM scenarios on top of the runner: each guest gets a JSON config and its own
//! initramfs (the shared guest image plus a tiny cpio holding `/etc/tapir/run`, so guest
//! scripts are not limited by the kernel command line), and writes its console to a log
//! file the test reads after the run.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::runner::outer_kernel_crash;
use crate::{guest_images, runner_dir, tapir_binary, GuestImages, Mode, RunOutcome, Runner, RunnerError};

/// Kernel parameters every nested-runner guest needs. QEMU's TCG emulation of SVM does
/// not intercept XSETBV, so the outer KVM never learns the guest's XCR0: it reports a
/// stale XSAVE size (the guest warns "XSAVE consistency problem") and context-switches
/// AVX state with the wrong XCR0, which corrupts concurrently running guests and made
/// them triple-fault at random. `noxsave` keeps guests on FXSAVE. Hardware KVM does not
/// need it. `no_timer_check` and `tsc=reliable`: a guest starved of emulated CPU by its
/// neighbours can miss the timer-IRQ check's deadline and panic before its console is up.
/// The rest only saves emulated CPU time: speculation mitigations and the crypto
/// self-tests cost seconds of boot under TCG.
pub const NESTED_GUEST_CMDLINE: &str = "noxsave no_timer_check tsc=reliable mitigations=off cryptomgr.notests";

/// Extra guest kernel parameters for the runner mode of this host.
pub fn guest_cmdline_for(mode: Mode) -> &'static str {
    match mode {
        Mode::Nested => NESTED_GUEST_CMDLINE,
        Mode::Direct => "",
    }
}

/// How often a nested scenario runs before its failure counts. See `emulator_failure`.
const NESTED_ATTEMPTS: u32 = 5;
/// In nested mode, a guest that has not reached its init by then is taken as stalled by
/// the emulator. Concurrent guests reach init within about 30 s there.
const NESTED_BOOT_DEADLINE_SECS: u32 = 180;
const STALL_MARKER: &str = "TAPIR-SCENARIO-STALLED=";
const EARLY_CRASH_MARKER: &str = "TAPIR-SCENARIO-CRASHED-BEFORE-INIT=";
const LATE_CRASH_MARKER: &str = "TAPIR-SCENARIO-CRASHED-AFTER-INIT=";
/// tapir's log line for a guest triple fault.
const TRIPLE_FAULT: &str = "guest triple fault";
const GUEST_READY_MARKER: &str = "TAPIR-GUEST-READY";
/// tapir's default kernel command line (vmm/src/config.rs), which scenario configs keep.
const SCENARIO_BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=noearly";

/// How the emulated nested runner broke a run.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Breakage {
    /// The outer kernel oopsed or panicked (the signature seen on its console).
    OuterKernel(String),
    /// The outer VM ended without its status line or any oops: it reset itself.
    OuterVmEnded(String),
    /// The guest never reached its init.
    Stalled(String),
    /// The guest triple-faulted while its kernel booted, before its init ran.
    EarlyTripleFault(String),
    /// The guest triple-faulted after its init had started.
    LateTripleFault(String),
}

impl std::fmt::Display for Breakage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Breakage::OuterKernel(sign) => write!(f, "the outer kernel crashed ({sign:?} on its console)"),
            Breakage::OuterVmEnded(end) => write!(f, "the outer VM ended before the script did ({end})"),
            Breakage::Stalled(vm) => {
                write!(f, "guest {vm} did not reach its init within {NESTED_BOOT_DEADLINE_SECS} s")
            }
            Breakage::EarlyTripleFault(vm) => {
                write!(f, "guest {vm} triple-faulted while its kernel booted, before its init ran")
            }
            Breakage::LateTripleFault(vm) => write!(f, "guest {vm} triple-faulted after its init had started"),
        }
    }
}

/// Why a nested run failed for reasons outside tapir, if it did (an outer VM that ends
/// without its status line is the other case; `Scenario::run` sees that one itself).
/// QEMU's own nested guests suffer the same there: with QEMU as the inner VMM and the
/// same kernel and e1000 pair booting at once, the outer kernel panicked or a guest
/// reset itself before its init in 4 runs of 4; booted one after the other, all 5
/// reached init, and 1 of their 5 e1000 transfers crashed the outer kernel. A triple
/// fault after init could in principle be a device writing guest memory it does not
/// own, but tapir's guests also triple-fault there with no frame moved by any NIC (the
/// e1000 pair's second guest, right after its ready marker), and page poisoning with
/// slub_debug in the guests found nothing over three e1000 transfers. A tapir bug that
/// always crashes a guest still fails: it breaks every one of the runs. `console` is
/// the outer VM's console, or its tail from the runner's error.
pub(crate) fn emulator_failure(console: &str) -> Option<Breakage> {
    if let Some(sign) = outer_kernel_crash(console) {
        return Some(Breakage::OuterKernel(sign.to_string()));
    }
    console.lines().find_map(|line| {
        let named = |marker: &str| line.split_once(marker).map(|(_, vm)| vm.trim().to_string());
        named(STALL_MARKER)
            .map(Breakage::Stalled)
            .or_else(|| named(EARLY_CRASH_MARKER).map(Breakage::EarlyTripleFault))
            .or_else(|| named(LATE_CRASH_MARKER).map(Breakage::LateTripleFault))
    })
}

pub struct Scenario {
    name: String,
    dir: PathBuf,
    tapir: PathBuf,
    images: GuestImages,
    guests: Vec<String>,
    mode: Mode,
}

/// What a scenario run produced: the runner's outcome plus each guest's console log.
pub struct ScenarioOutcome {
    pub outcome: RunOutcome,
    pub logs: BTreeMap<String, String>,
    /// Runs it took; earlier ones hit an emulator failure (nested mode only).
    pub attempts: u32,
}

impl ScenarioOutcome {
    pub fn log(&self, vm: &str) -> &str {
        self.logs.get(vm).map(String::as_str).unwrap_or("")
    }

    /// Everything, for assertion messages.
    pub fn dump(&self) -> String {
        let mut s = format!("--- runner console (attempt {}) ---\n{}\n", self.attempts, self.outcome.console);
        for (vm, log) in &self.logs {
            s.push_str(&format!("--- {vm} console ---\n{log}\n"));
        }
        s
    }

    /// The exit status the outer script recorded for `vm` with `record_exit`.
    pub fn exit_status(&self, vm: &str) -> Option<i32> {
        value_after(&self.outcome.output, &format!("TAPIR-EXIT-{vm}="))?.trim().parse().ok()
    }
}

/// The rest of every log line that starts with `prefix` (leading blanks ignored), in
/// order. Guest scripts and outer scripts report results as `KEY=value` lines.
pub fn values_after<'a>(log: &'a str, prefix: &str) -> Vec<&'a str> {
    log.lines().filter_map(|l| l.trim().strip_prefix(prefix)).collect()
}

/// The rest of the first log line that starts with `prefix`.
pub fn value_after<'a>(log: &'a str, prefix: &str) -> Option<&'a str> {
    log.lines().find_map(|l| l.trim().strip_prefix(prefix))
}

/// A cpio "newc" archive with one regular file, appended to the base initramfs: Linux
/// unpacks concatenated archives in order.
fn newc_archive(path: &str, mode: u32, data: &[u8]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{ino:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{size:08X}{:08X}{:08X}{:08X}{:08X}{namesize:08X}{:08X}",
            0, 0, 0, 0, 0,
            uid = 0, gid = 0, nlink = 1, mtime = 0,
            size = data.len(),
            namesize = name.len() + 1,
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    entry(&mut out, 1, path, mode, data);
    entry(&mut out, 2, "TRAILER!!!", 0, &[]);
    out
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// The shell job behind `Scenario::stall_watchdog`: every `poll_secs`, for each guest
/// (name, log path) whose log exists, starts its clock. When a log shows a triple fault
/// (before or after the ready marker), or `deadline_secs` have passed with neither the
/// ready marker nor a tapir error in it, the job prints the matching marker, runs `stop`
/// and ends.
fn stall_watchdog_script(guests: &[(String, PathBuf)], deadline_secs: u32, poll_secs: u32, stop: &str) -> String {
    let names: Vec<&str> = guests.iter().map(|(vm, _)| vm.as_str()).collect();
    let logs: Vec<String> = guests.iter().map(|(_, log)| shell_quote(log)).collect();
    format!(
        r#"( while sleep {poll_secs}; do
    now=$(date +%s); set -- {names}; i=0
    for log in {logs}; do
      vm=$1; shift; i=$((i + 1))
      [ -e "$log" ] || continue
      if grep -q '{TRIPLE_FAULT}' "$log"; then
        if grep -q {GUEST_READY_MARKER} "$log"; then echo "{LATE_CRASH_MARKER}$vm"; else echo "{EARLY_CRASH_MARKER}$vm"; fi
        {stop}; exit 0
      fi
      eval "started=\${{started_$i:-}}"
      [ -n "$started" ] || {{ eval "started_$i=$now"; continue; }}
      [ $((now - started)) -ge {deadline_secs} ] || continue
      grep -q -e {GUEST_READY_MARKER} -e '^tapir: error' "$log" && continue
      echo "{STALL_MARKER}$vm"; {stop}; exit 0
    done
  done ) &"#,
        names = names.join(" "),
        logs = logs.join(" "),
    )
}

impl Scenario {
    pub fn new(name: &str) -> Result<Scenario, RunnerError> {
        let images = guest_images()?;
        let tapir = tapir_binary()?;
        let dir = runner_dir().join(format!("scenario-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| RunnerError::Setup(format!("{}: {e}", dir.display())))?;
        let mode = Mode::detect()?;
        Ok(Scenario { name: name.to_string(), dir, tapir, images, guests: Vec::new(), mode })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn images(&self) -> &GuestImages {
        &self.images
    }

    /// Writes guest `vm`'s config and initramfs. `nics` is the JSON array of NICs, and
    /// `guest_script` runs in the guest as /etc/tapir/run; its exit status becomes
    /// tapir's through the debug-exit port ((status << 1) | 1).
    pub fn guest(&mut self, vm: &str, vcpus: u8, nics: &str, guest_script: &str) -> Result<PathBuf, RunnerError> {
        let io = |e: std::io::Error| RunnerError::Setup(format!("scenario {}: {e}", self.dir.display()));
        let mut initrd = std::fs::read(&self.images.guest_initramfs).map_err(io)?;
        // The kernel looks for the next archive's magic only at 4-byte offsets, and
        // skips zero padding to get there.
        while initrd.len() % 4 != 0 {
            initrd.push(0);
        }
        initrd.extend_from_slice(&newc_archive("etc/tapir/run", 0o100755, guest_script.as_bytes()));
        let initrd_path = self.initrd_path(vm);
        std::fs::write(&initrd_path, initrd).map_err(io)?;
        let config = format!(
            r#"{{"name": "{vm}", "vcpus": {vcpus}, "memory_mib": 256, "kernel": "{kernel}", "initrd": "{initrd}",
  "cmdline_append": "quiet tapir.debug_exit {extra}", "debug_exit": true, "nics": {nics}}}"#,
            extra = guest_cmdline_for(self.mode),
            kernel = self.images.vmlinuz.display(),
            initrd = initrd_path.display(),
        );
        let config_path = self.dir.join(format!("{vm}.json"));
        std::fs::write(&config_path, config).map_err(io)?;
        self.guests.push(vm.to_string());
        Ok(config_path)
    }

    /// A shell command that runs guest `vm` with its console in its log file; `extra`
    /// is appended to tapir's arguments (e.g. `--kernel ...`).
    pub fn tapir_command(&self, vm: &str, extra: &str) -> String {
        format!(
            "{} --config {} {extra} > {} 2>&1",
            shell_quote(&self.tapir),
            shell_quote(&self.dir.join(format!("{vm}.json"))),
            shell_quote(&self.dir.join(format!("{vm}.log"))),
        )
    }

    /// Like `tapir_command`, but tapir runs as `nobody` with no capabilities, to show a
    /// scenario needs no privileges (the script must make /dev/kvm accessible first).
    pub fn unprivileged_tapir_command(&self, vm: &str, extra: &str) -> String {
        format!(
            "setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all {} --config {} {extra} > {} 2>&1",
            shell_quote(&self.tapir),
            shell_quote(&self.dir.join(format!("{vm}.json"))),
            shell_quote(&self.dir.join(format!("{vm}.log"))),
        )
    }

    /// Shell lines that wait for the backgrounded guest whose pid is in `$pidvar` and
    /// print its exit status for `ScenarioOutcome::exit_status`.
    pub fn record_exit(vm: &str, pidvar: &str) -> String {
        format!("wait ${pidvar}; echo TAPIR-EXIT-{vm}=$?\n")
    }

    /// Shell lines that wait until guest `vm` (pid in `$pidvar`) has printed its init's
    /// ready marker, has exited, or `secs` have passed. Starting the next guest only then
    /// keeps two kernels from booting at once, which is when the emulated runner breaks
    /// guests most (see `emulator_failure`).
    pub fn wait_until_ready(&self, vm: &str, pidvar: &str, secs: u32) -> String {
        format!(
            "i=0; until grep -q {GUEST_READY_MARKER} {log} 2>/dev/null || ! kill -0 ${pidvar} 2>/dev/null; do i=$((i+1)); [ $i -gt {secs} ] && break; sleep 1; done\n",
            log = shell_quote(&self.log_path(vm)),
        )
    }

    pub fn tapir_path(&self) -> &Path {
        &self.tapir
    }

    /// Where guest `vm`'s console (and tapir's messages about it) goes.
    pub fn log_path(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.log"))
    }

    /// Guest `vm`'s initramfs: the shared image plus its `/etc/tapir/run`.
    pub fn initrd_path(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.initrd"))
    }

    /// The kernel command line tapir gives guest `vm` (its default plus the scenario's
    /// `cmdline_append`), so another VMM can boot the same guest the same way.
    pub fn guest_kernel_cmdline(&self) -> String {
        format!("{SCENARIO_BASE_CMDLINE} quiet tapir.debug_exit {}", guest_cmdline_for(self.mode))
    }

    /// Runs `script`; `timeout` applies to each attempt. In nested mode, a run that the
    /// emulator broke (see `emulator_failure`) is repeated, up to `NESTED_ATTEMPTS` runs,
    /// and the broken run's guest logs are kept as `<vm>.attempt<N>.log`. Every guest the
    /// script starts must reach its init.
    pub fn run(&self, script: &str, timeout: Duration) -> Result<ScenarioOutcome, RunnerError> {
        let runner = Runner::detect()?;
        let (script, attempts) = match self.mode {
            Mode::Direct => (script.to_string(), 1),
            Mode::Nested => (format!("{}\n{script}", self.stall_watchdog()), NESTED_ATTEMPTS),
        };
        let mut attempt = 1;
        loop {
            for vm in &self.guests {
                let _ = std::fs::remove_file(self.log_path(vm));
            }
            let result = runner.run(&script, timeout);
            let failure = match &result {
                Ok(outcome) => emulator_failure(&outcome.console),
                Err(RunnerError::Timeout { tail, .. }) => emulator_failure(tail),
                Err(RunnerError::NoStatus { tail, end }) => {
                    emulator_failure(tail).or_else(|| Some(Breakage::OuterVmEnded(end.clone())))
                }
                Err(_) => None,
            };
            match failure {
                Some(reason) if self.mode == Mode::Nested && attempt < attempts => {
                    // Straight to stderr, past the test harness's capture: a retry must show
                    // in the CI log even when the test then passes.
                    let _ = writeln!(
                        std::io::stderr(),
                        "scenario {}: attempt {attempt} of {attempts} broke in the emulated nested runner: {reason}; running it again",
                        self.name
                    );
                    for vm in &self.guests {
                        let _ = std::fs::rename(self.log_path(vm), self.dir.join(format!("{vm}.attempt{attempt}.log")));
                    }
                    attempt += 1;
                }
                _ => {
                    let outcome = result?;
                    let mut logs = BTreeMap::new();
                    for vm in &self.guests {
                        let log = std::fs::read_to_string(self.log_path(vm)).unwrap_or_default();
                        logs.insert(vm.clone(), log.replace("\r\n", "\n"));
                    }
                    return Ok(ScenarioOutcome { outcome, logs, attempts: attempt });
                }
            }
        }
    }

    /// A background job for the outer VM. It starts each guest's clock when its log
    /// appears (scenarios may start guests in phases). When a guest triple-faults (before
    /// or after its init's ready marker), or runs for the boot deadline without that
    /// marker and without tapir having stopped it, the job names the guest and stops
    /// every tapir process, so the run ends at once instead of at the timeout. The outer
    /// VM runs nothing else, so stopping every tapir there is safe.
    fn stall_watchdog(&self) -> String {
        let guests: Vec<(String, PathBuf)> = self.guests.iter().map(|vm| (vm.clone(), self.log_path(vm))).collect();
        stall_watchdog_script(&guests, NESTED_BOOT_DEADLINE_SECS, 5, "pkill -x tapir")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_found_by_prefix_in_order() {
        let log = "[ 1.0] noise\nDRIVER=e1000\n  DRIVER1=virtio_net\nDRIVER=again\nXDRIVER=no\n";
        assert_eq!(values_after(log, "DRIVER="), vec!["e1000", "again"]);
        assert_eq!(value_after(log, "DRIVER1="), Some("virtio_net"));
        assert_eq!(value_after(log, "LEASE="), None);
    }

    #[test]
    fn outer_kernel_crashes_and_stalled_guests_are_emulator_failures() {
        let crash = "[  134.6] BUG: TASK stack guard page was hit at 00000000\n[  134.7] Kernel panic - not syncing: Fatal exception";
        assert!(matches!(emulator_failure(crash), Some(Breakage::OuterKernel(_))));
        let stalled = "TAPIR-RUNNER-READY\nTAPIR-SCENARIO-STALLED=beta\nTAPIR-EXIT-beta=143\n";
        assert_eq!(emulator_failure(stalled), Some(Breakage::Stalled("beta".into())));
        // A guest's own failure is tapir's to answer for, not the emulator's.
        let guest_failed = "TAPIR-RUNNER-READY\nTAPIR-EXIT-alpha=7\nTAPIR-RUNNER-STATUS=1\n";
        assert_eq!(emulator_failure(guest_failed), None);
    }

    #[test]
    fn the_watchdog_names_guests_the_emulator_broke_and_spares_the_rest() {
        let dir = std::env::temp_dir().join(format!("tapir-watchdog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = |vm: &str, text: &str| {
            let path = dir.join(format!("{vm}.log"));
            std::fs::write(&path, text).unwrap();
            (vm.to_string(), path)
        };
        let guests = [
            log("booted", "[ 0.1] ACPI\nTAPIR-GUEST-READY\n"),
            log("refused", "tapir: error: nics[0].mac: bad\n"),
            log("stalled", "[ 0.1] ACPI BIOS Error\n"),
            (String::from("never-started"), dir.join("never-started.log")),
        ];
        let job = stall_watchdog_script(&guests, 1, 1, "echo STOPPED");
        let out = std::process::Command::new("bash").arg("-c").arg(format!("{job}\nwait")).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout,
            "TAPIR-SCENARIO-STALLED=stalled\nSTOPPED\n",
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(emulator_failure(&stdout), Some(Breakage::Stalled("stalled".into())));
        assert_eq!(emulator_failure(&stdout).unwrap().to_string(), "guest stalled did not reach its init within 180 s");

        // A triple fault counts at once, and the watchdog tells before init from after.
        let fault = "tapir: error: vCPU 0 stopped: guest triple fault (KVM_EXIT_SHUTDOWN) at RIP 0xfff0\n";
        let watch = |guests: &[(String, PathBuf)]| {
            let job = stall_watchdog_script(guests, 600, 1, "echo STOPPED");
            let out = std::process::Command::new("bash").arg("-c").arg(format!("{job}\nwait")).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let stdout = watch(&[log("fine", "TAPIR-GUEST-READY\n"), log("reset-early", &format!("[ 0.1] ACPI\n{fault}"))]);
        assert_eq!(stdout, "TAPIR-SCENARIO-CRASHED-BEFORE-INIT=reset-early\nSTOPPED\n");
        assert_eq!(emulator_failure(&stdout), Some(Breakage::EarlyTripleFault("reset-early".into())));
        let stdout =
            watch(&[log("fine", "TAPIR-GUEST-READY\n"), log("reset-later", &format!("TAPIR-GUEST-READY\n{fault}"))]);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(stdout, "TAPIR-SCENARIO-CRASHED-AFTER-INIT=reset-later\nSTOPPED\n");
        assert_eq!(
            emulator_failure(&stdout).unwrap().to_string(),
            "guest reset-later triple-faulted after its init had started"
        );
    }

    #[test]
    fn newc_archive_layout() {
        let a = newc_archive("etc/tapir/run", 0o100755, b"echo hi\n");
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("etc/tapir/run\0"));
        assert!(text.contains("echo hi\n"));
        assert!(text.contains("TRAILER!!!\0"));
        // The header's size field is the file size in hex.
        assert_eq!(&a[54..62], b"00000008");
    }
}
