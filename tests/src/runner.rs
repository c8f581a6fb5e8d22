//! Runs an e2e shell script where tapir can boot a real Linux guest: directly on a host
//! with hardware virtualization, or inside the emulated nested-virt outer VM.

use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::capture::{run_captured, Capture, CaptureEnd};
use crate::images::{guest_images, GuestImages};
use crate::lock::FileLock;
use crate::paths::runner_dir;

/// Printed by the outer VM's init right before the script starts.
pub(crate) const READY_MARKER: &str = "TAPIR-RUNNER-READY";
/// Printed by the outer VM's init with the script's exit status.
pub(crate) const STATUS_MARKER: &str = "TAPIR-RUNNER-STATUS=";
/// After the status marker the outer VM only syncs and powers off.
const POWEROFF_GRACE: Duration = Duration::from_secs(15);
/// What the outer kernel prints when it dies. Under TCG-emulated SVM it sometimes takes an
/// interrupt between #VMEXIT and the VMLOAD of its own state (GIF is meant to hold it off),
/// runs the handler on the guest's GS base and faults: "general protection fault" or
/// "stack guard page", then "Kernel panic", or it hangs after the oops. Hardware never
/// does this.
pub(crate) const OUTER_KERNEL_CRASH: [&str; 4] =
    ["Kernel panic - not syncing", "BUG: ", "general protection fault", "stack guard page"];

/// The first crash signature on the outer VM's console, if any.
pub(crate) fn outer_kernel_crash(console: &str) -> Option<&'static str> {
    OUTER_KERNEL_CRASH.iter().copied().find(|sign| console.contains(sign))
}
const QEMU: &str = "qemu-system-x86_64";
/// The environment a script starts with, in both modes (the outer VM's init sets the same).
const SCRIPT_ENV: [(&str, &str); 4] = [
    ("HOME", "/root"),
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("TERM", "dumb"),
    ("LANG", "C.UTF-8"),
];
const TAIL_LINES: usize = 80;
/// Variables of the test's own environment that scripts inherit (written into the script,
/// so they reach the outer VM too): tapir's logging and Rust backtraces.
const PASSED_THROUGH_ENV: [&str; 2] = ["RUST_LOG", "RUST_BACKTRACE"];
/// Machine-wide, not per checkout: several worktrees' tests must not boot outer VMs at the
/// same time either. `TAPIR_RUNNER_LOCK` overrides it.
const DEFAULT_LOCK: &str = "/tmp/tapir-runner.lock";

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("TAPIR_RUNNER={0:?}: expected `direct` or `nested`")]
    BadMode(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error("run timed out after {timeout:?}; output tail:\n{tail}")]
    Timeout { timeout: Duration, tail: String },
    #[error("the outer VM ended without a {STATUS_MARKER} line ({end}); output tail:\n{tail}")]
    NoStatus { end: String, tail: String },
    #[error("resources/guest/build.sh failed ({status}); output tail:\n{tail}")]
    ImageBuild { status: String, tail: String },
    #[error("cargo build --release -p tapir failed ({status}); output tail:\n{tail}")]
    TapirBuild { status: String, tail: String },
}

/// Where scripts run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// On this host, which has hardware virtualization (`kvm_intel` or `kvm_amd`).
    Direct,
    /// Inside an outer QEMU TCG VM (`-machine q35 -cpu max`, emulated SVM) that loads
    /// kvm-amd and sees the host's `/` over virtio-9p; the script runs in `chroot /host`.
    Nested,
}

impl fmt::Display for Mode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Mode::Direct => "direct",
            Mode::Nested => "nested",
        })
    }
}

impl Mode {
    /// `TAPIR_RUNNER` if set (`direct` or `nested`), else what the host supports.
    pub fn detect() -> Result<Mode, RunnerError> {
        match std::env::var("TAPIR_RUNNER") {
            Ok(value) if !value.is_empty() => Mode::parse(&value),
            _ => Ok(if host_has_hardware_kvm() {
                Mode::Direct
            } else {
                Mode::Nested
            }),
        }
    }

    fn parse(value: &str) -> Result<Mode, RunnerError> {
        match value {
            "direct" => Ok(Mode::Direct),
            "nested" => Ok(Mode::Nested),
            other => Err(RunnerError::BadMode(other.to_string())),
        }
    }
}

/// A usable /dev/kvm backed by VT-x or AMD-V. This matters because /dev/kvm can also come
/// from a software hypervisor (kvm_pvm) that cannot boot an unmodified Linux kernel.
fn host_has_hardware_kvm() -> bool {
    let hardware_module = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|module| Path::new("/sys/module").join(module).exists());
    hardware_module
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

/// The result of one script run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub mode: Mode,
    /// The script's exit status (128 + signal number if a signal ended it).
    pub status: i32,
    /// The script's stdout and stderr (in nested mode, the console between the outer
    /// init's markers, so kernel warnings can be interleaved). `\r\n` becomes `\n`.
    pub output: String,
    /// Everything: in nested mode the outer VM's whole console, else same as `output`.
    pub console: String,
    /// Wall time of the run, including the outer VM's boot in nested mode.
    pub elapsed: Duration,
}

impl RunOutcome {
    pub fn success(&self) -> bool {
        self.status == 0
    }

    /// Panics, showing the console, unless the script exited with `expected`.
    #[track_caller]
    pub fn assert_status(&self, expected: i32) {
        assert_eq!(
            self.status, expected,
            "script exited with {} (expected {expected}) in {} mode; console:\n{}",
            self.status, self.mode, self.console
        );
    }
}

/// Runs e2e scripts. One run at a time machine-wide: every run holds an exclusive flock
/// on `/tmp/tapir-runner.lock` (or `$TAPIR_RUNNER_LOCK`), because an outer VM wants both
/// cores of a small machine, and direct-mode scripts share host names (taps, bridges,
/// netns).
#[derive(Debug, Clone)]
pub struct Runner {
    mode: Mode,
    /// Kernel and initramfs of the outer VM (nested mode only).
    outer: Option<GuestImages>,
}

static SCRIPT_SEQUENCE: AtomicU64 = AtomicU64::new(0);

impl Runner {
    /// Direct mode on hosts with hardware virtualization, otherwise nested; the
    /// environment variable `TAPIR_RUNNER=direct|nested` overrides.
    pub fn detect() -> Result<Runner, RunnerError> {
        Runner::new(Mode::detect()?)
    }

    /// A runner in `mode`. Nested mode needs qemu-system-x86_64 and builds the guest
    /// images (its outer VM boots the same Debian kernel).
    pub fn new(mode: Mode) -> Result<Runner, RunnerError> {
        let outer = match mode {
            Mode::Direct => None,
            Mode::Nested => {
                if find_in_path(QEMU).is_none() {
                    return Err(RunnerError::Setup(format!(
                        "{QEMU} is not in PATH; the nested runner needs it (apt-get install qemu-system-x86)"
                    )));
                }
                Some(guest_images()?)
            }
        };
        Ok(Runner { mode, outer })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Runs `script` (bash; a first line starting with `#!` picks another interpreter)
    /// as root with cwd `/` and only HOME, PATH, TERM, LANG (and RUST_LOG and
    /// RUST_BACKTRACE when the caller has them) set, and returns its exit
    /// status and output. Paths in the script must be absolute host paths outside /tmp
    /// and /run: in nested mode those two are fresh tmpfs mounts inside the outer VM.
    /// `timeout` counts from the start of the run (in nested mode it includes about 10 s of
    /// outer VM boot), not from the time spent waiting for the lock.
    pub fn run(&self, script: &str, timeout: Duration) -> Result<RunOutcome, RunnerError> {
        let lock_path = lock_path();
        let _lock = FileLock::exclusive(&lock_path).map_err(|source| RunnerError::Io {
            what: format!("locking {}", lock_path.display()),
            source,
        })?;
        let script_path = write_script(&runner_dir(), script)?;
        let result = match &self.outer {
            None => run_direct(&script_path, timeout),
            Some(images) => run_nested(images, &script_path, timeout),
        };
        let _ = std::fs::remove_file(&script_path);
        result
    }
}

fn lock_path() -> PathBuf {
    match std::env::var_os("TAPIR_RUNNER_LOCK") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(DEFAULT_LOCK),
    }
}

/// `export NAME='value'` lines for the passed-through variables the caller has.
fn passed_through_exports() -> String {
    PASSED_THROUGH_ENV
        .iter()
        .filter_map(|name| {
            let value = std::env::var(name).ok()?;
            Some(format!("export {name}={}\n", shell_quote(&value)))
        })
        .collect()
}

/// Whether a `#!` line runs a POSIX shell, which understands the export lines.
fn is_shell(interpreter: &str) -> bool {
    let program = interpreter.split_whitespace().next().unwrap_or_default();
    let name = program.rsplit('/').next().unwrap_or_default();
    matches!(name, "sh" | "bash" | "dash" | "ash")
}

fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn write_script(dir: &Path, script: &str) -> Result<PathBuf, RunnerError> {
    let scripts = dir.join("scripts");
    let io_error = |source| RunnerError::Io {
        what: format!("writing a script in {}", scripts.display()),
        source,
    };
    std::fs::create_dir_all(&scripts).map_err(io_error)?;
    let sequence = SCRIPT_SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let path = scripts.join(format!("run-{}-{sequence}.sh", std::process::id()));
    let exports = passed_through_exports();
    let body = match script
        .strip_prefix("#!")
        .map(|rest| rest.split_once('\n').unwrap_or((rest, "")))
    {
        None => format!("#!/bin/bash\n{exports}{script}\n"),
        Some((interpreter, rest)) if is_shell(interpreter) => {
            format!("#!{interpreter}\n{exports}{rest}")
        }
        Some(_) => script.to_string(),
    };
    std::fs::write(&path, body).map_err(io_error)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(io_error)?;
    Ok(path)
}

fn run_direct(script: &Path, timeout: Duration) -> Result<RunOutcome, RunnerError> {
    let mut command = Command::new(script);
    command.env_clear().envs(SCRIPT_ENV).current_dir("/");
    let capture = run_captured(command, timeout, &|_| false, Duration::ZERO).map_err(|source| {
        RunnerError::Io {
            what: format!("running {}", script.display()),
            source,
        }
    })?;
    let Capture {
        output,
        end,
        elapsed,
    } = capture;
    let text = normalize(&output);
    match end {
        CaptureEnd::Exited(status) => Ok(RunOutcome {
            mode: Mode::Direct,
            status: shell_status(status),
            output: text.clone(),
            console: text,
            elapsed,
        }),
        CaptureEnd::TimedOut | CaptureEnd::KilledAfterDone => Err(RunnerError::Timeout {
            timeout,
            tail: output_tail(&text),
        }),
    }
}

fn run_nested(
    images: &GuestImages,
    script: &Path,
    timeout: Duration,
) -> Result<RunOutcome, RunnerError> {
    let script = script
        .to_str()
        .filter(|path| !path.contains(char::is_whitespace))
        .ok_or_else(|| {
            RunnerError::Setup(format!(
                "script path {} cannot go on a kernel command line",
                script.display()
            ))
        })?;
    if ["/tmp/", "/run/"]
        .iter()
        .any(|prefix| script.starts_with(prefix))
    {
        return Err(RunnerError::Setup(format!(
            "script path {script} is under /tmp or /run, which the outer VM replaces with tmpfs"
        )));
    }
    let mut command = Command::new(QEMU);
    command
        .args(["-machine", "q35", "-cpu", "max", "-smp", "2", "-m", "3072"])
        .args([
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        // The ELF vmlinux boots through its PVH note: that skips decompressing the
        // bzImage under TCG and saves about 6 s per run.
        .arg("-kernel")
        .arg(&images.vmlinux)
        .arg("-initrd")
        .arg(&images.outer_initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 tapir.script={script}"
        ))
        // multidevs=remap: / spans several host filesystems; keep their inodes apart.
        .args([
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=passthrough,id=host0,multidevs=remap",
        ]);
    // A crashed outer kernel may hang instead of powering off; its run is over either way
    // (the grace period still collects the oops).
    let done = |output: &[u8]| {
        let console = String::from_utf8_lossy(output);
        find_status(&console).is_some() || outer_kernel_crash(&console).is_some()
    };
    let capture = run_captured(command, timeout, &done, POWEROFF_GRACE).map_err(|source| {
        RunnerError::Io {
            what: format!("running {QEMU}"),
            source,
        }
    })?;
    let Capture {
        output,
        end,
        elapsed,
    } = capture;
    let console = normalize(&output);
    let end = match end {
        CaptureEnd::TimedOut => {
            return Err(RunnerError::Timeout {
                timeout,
                tail: output_tail(&console),
            })
        }
        CaptureEnd::Exited(status) => format!("{QEMU} {status}"),
        CaptureEnd::KilledAfterDone => format!("{QEMU} killed: no power-off after the status line"),
    };
    let Some(status) = find_status(&console) else {
        return Err(RunnerError::NoStatus {
            end,
            tail: output_tail(&console),
        });
    };
    Ok(RunOutcome {
        mode: Mode::Nested,
        status,
        output: script_output(&console),
        console,
        elapsed,
    })
}

/// Exit status in the shell's convention: the code, or 128 + the signal.
fn shell_status(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(-1)
}

fn normalize(output: &[u8]) -> String {
    String::from_utf8_lossy(output).replace("\r\n", "\n")
}

/// The status from the last marker line. The marker may follow other text on its line
/// (a kernel message without a newline), so it is searched anywhere in the line.
pub(crate) fn find_status(console: &str) -> Option<i32> {
    console.lines().rev().find_map(|line| {
        let (_, rest) = line.split_once(STATUS_MARKER)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

/// The text between the ready marker's line and the last status marker.
pub(crate) fn script_output(console: &str) -> String {
    let Some(ready) = console.find(READY_MARKER) else {
        return String::new();
    };
    let after_ready = console.get(ready..).unwrap_or_default();
    let start = after_ready
        .find('\n')
        .map_or(after_ready.len(), |newline| newline + 1);
    let body = after_ready.get(start..).unwrap_or_default();
    let end = body.rfind(STATUS_MARKER).unwrap_or(body.len());
    body.get(..end).unwrap_or_default().to_string()
}

/// The last lines of `text`, for error messages.
/// Runs a build step (cargo, build.sh) to completion. A failed or timed-out step becomes
/// the error `failed` makes from a status description and the output's tail.
pub(crate) fn run_build_step(
    command: Command,
    what: &str,
    timeout: Duration,
    failed: fn(String, String) -> RunnerError,
) -> Result<(), RunnerError> {
    let capture = run_captured(command, timeout, &|_| false, Duration::ZERO)
        .map_err(|source| RunnerError::Io { what: format!("running {what}"), source })?;
    let text = String::from_utf8_lossy(&capture.output);
    match capture.end {
        CaptureEnd::Exited(status) if status.success() => Ok(()),
        CaptureEnd::Exited(status) => Err(failed(status.to_string(), output_tail(&text))),
        _ => Err(failed(format!("timed out after {timeout:?}"), output_tail(&text))),
    }
}

pub(crate) fn output_tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines
        .get(lines.len().saturating_sub(TAIL_LINES)..)
        .unwrap_or_default()
        .join("\n")
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modes_and_rejects_others() {
        assert_eq!(Mode::parse("direct").unwrap(), Mode::Direct);
        assert_eq!(Mode::parse("nested").unwrap(), Mode::Nested);
        assert!(matches!(
            Mode::parse("Nested"),
            Err(RunnerError::BadMode(_))
        ));
        assert!(matches!(Mode::parse("auto"), Err(RunnerError::BadMode(_))));
    }

    #[test]
    fn finds_the_last_status_marker() {
        let console = "boot\nTAPIR-RUNNER-STATUS=1\nmore\n[ 1.0] msgTAPIR-RUNNER-STATUS=42\n[ 2.0] reboot: Power down\n";
        assert_eq!(find_status(console), Some(42));
    }

    #[test]
    fn ignores_status_markers_without_digits() {
        assert_eq!(
            find_status("TAPIR-RUNNER-STATUS=\nTAPIR-RUNNER-STATUS=x\n"),
            None
        );
        assert_eq!(find_status("nothing here"), None);
        assert_eq!(
            find_status("TAPIR-RUNNER-STATUS=99999999999999999999\n"),
            None
        );
    }

    #[test]
    fn script_output_is_between_the_markers() {
        let console = "kernel noise\nTAPIR-RUNNER-READY\nhi\nthere\nTAPIR-RUNNER-STATUS=3\n[ 9.1] reboot: Power down\n";
        assert_eq!(script_output(console), "hi\nthere\n");
        assert_eq!(script_output("no markers at all"), "");
        assert_eq!(script_output("TAPIR-RUNNER-READY"), "");
        assert_eq!(
            script_output("TAPIR-RUNNER-READY\nunfinished"),
            "unfinished"
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let text: String = (0..200).map(|index| format!("line {index}\n")).collect();
        let tail = output_tail(&text);
        assert!(tail.starts_with(&format!("line {}", 200 - TAIL_LINES)));
        assert!(tail.ends_with("line 199"));
        assert_eq!(output_tail("short"), "short");
    }

    #[test]
    fn signals_map_to_shell_statuses() {
        assert_eq!(shell_status(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(
            shell_status(ExitStatus::from_raw(libc::SIGKILL)),
            128 + libc::SIGKILL
        );
    }

    #[test]
    fn quotes_values_for_the_shell() {
        assert_eq!(shell_quote("debug"), "'debug'");
        assert_eq!(shell_quote("it's $HOME"), r"'it'\''s $HOME'");
        assert!(is_shell("/bin/sh") && is_shell("/usr/bin/bash -e") && is_shell("/bin/dash"));
        assert!(
            !is_shell("/usr/bin/python3") && !is_shell("/usr/bin/env python3") && !is_shell("")
        );
    }

    #[test]
    fn scripts_get_a_bash_shebang_unless_they_have_one() {
        let dir = runner_dir().join(format!("script-test-{}", std::process::id()));
        let exports = passed_through_exports();
        let read = |path: &Path| std::fs::read_to_string(path).unwrap();
        let plain = write_script(&dir, "echo hi").unwrap();
        assert_eq!(read(&plain), format!("#!/bin/bash\n{exports}echo hi\n"));
        let own = write_script(&dir, "#!/bin/sh -e\necho hi\n").unwrap();
        assert_eq!(read(&own), format!("#!/bin/sh -e\n{exports}echo hi\n"));
        let python = write_script(&dir, "#!/usr/bin/python3\nprint(1)\n").unwrap();
        assert_eq!(read(&python), "#!/usr/bin/python3\nprint(1)\n");
        assert_ne!(plain, own);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
