//! Multi-VM scenarios on top of the runner: each guest gets a JSON config and its own
//! initramfs (the shared guest image plus a tiny cpio holding `/etc/tapir/run`, so guest
//! scripts are not limited by the kernel command line), and writes its console to a log
//! file the test reads after the run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

pub struct Scenario {
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
}

impl ScenarioOutcome {
    pub fn log(&self, vm: &str) -> &str {
        self.logs.get(vm).map(String::as_str).unwrap_or("")
    }

    /// Everything, for assertion messages.
    pub fn dump(&self) -> String {
        let mut s = format!("--- runner console ---\n{}\n", self.outcome.console);
        for (vm, log) in &self.logs {
            s.push_str(&format!("--- {vm} console ---\n{log}\n"));
        }
        s
    }

    /// The exit status the outer script recorded for `vm` with `record_exit`.
    pub fn exit_status(&self, vm: &str) -> Option<i32> {
        let key = format!("TAPIR-EXIT-{vm}=");
        self.outcome.output.lines().find_map(|l| l.trim().strip_prefix(&key)?.trim().parse().ok())
    }
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

impl Scenario {
    pub fn new(name: &str) -> Result<Scenario, RunnerError> {
        let images = guest_images()?;
        let tapir = tapir_binary()?;
        let dir = runner_dir().join(format!("scenario-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| RunnerError::Setup(format!("{}: {e}", dir.display())))?;
        let mode = Mode::detect()?;
        Ok(Scenario { dir, tapir, images, guests: Vec::new(), mode })
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
        let initrd_path = self.dir.join(format!("{vm}.initrd"));
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

    pub fn tapir_path(&self) -> &Path {
        &self.tapir
    }

    pub fn run(&self, script: &str, timeout: Duration) -> Result<ScenarioOutcome, RunnerError> {
        let outcome = Runner::detect()?.run(script, timeout)?;
        let mut logs = BTreeMap::new();
        for vm in &self.guests {
            let log = std::fs::read_to_string(self.dir.join(format!("{vm}.log"))).unwrap_or_default();
            logs.insert(vm.clone(), log.replace("\r\n", "\n"));
        }
        Ok(ScenarioOutcome { outcome, logs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
