//! Runs a child process with stdout and stderr merged into one pipe, collecting the
//! output until the child exits, a deadline passes, or the output says it is done.

use std::io::{self, PipeReader, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long to keep reading after the child has exited, for output its leftover
/// descendants still hold (they are killed, but a setsid one escapes the group kill).
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
const POLL_INTERVAL_MS: i32 = 50;

#[derive(Debug)]
pub(crate) enum CaptureEnd {
    Exited(ExitStatus),
    /// The deadline passed; the child's process group was killed.
    TimedOut,
    /// `done` matched the output but the child did not exit within the grace period;
    /// it was killed.
    KilledAfterDone,
}

#[derive(Debug)]
pub(crate) struct Capture {
    pub(crate) output: Vec<u8>,
    pub(crate) end: CaptureEnd,
    pub(crate) elapsed: Duration,
}

/// Spawns `command` in its own process group with stdin from /dev/null. The whole group
/// is killed when the child exits, times out, or overstays `grace` after `done` first
/// returns true for the output so far.
pub(crate) fn run_captured(
    mut command: Command,
    timeout: Duration,
    done: &dyn Fn(&[u8]) -> bool,
    grace: Duration,
) -> io::Result<Capture> {
    let (mut reader, writer) = io::pipe()?;
    command
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .process_group(0);
    let start = Instant::now();
    let mut child = command.spawn()?;
    // The Command holds our copies of the pipe's write end; EOF needs them closed.
    drop(command);
    set_nonblocking(&reader)?;

    let deadline = start + timeout;
    let mut output = Vec::new();
    let mut done_at: Option<Instant> = None;
    loop {
        let got_data = read_available(&mut reader, &mut output)?;
        if got_data && done_at.is_none() && done(&output) {
            done_at = Some(Instant::now());
        }
        if exited_without_reaping(&child)? {
            kill_group(&child);
            let status = child.wait()?;
            drain(&mut reader, &mut output)?;
            return Ok(Capture {
                output,
                end: CaptureEnd::Exited(status),
                elapsed: start.elapsed(),
            });
        }
        let now = Instant::now();
        let end = if now >= deadline {
            Some(CaptureEnd::TimedOut)
        } else if done_at.is_some_and(|at| now >= at + grace) {
            Some(CaptureEnd::KilledAfterDone)
        } else {
            None
        };
        if let Some(end) = end {
            kill_group(&child);
            child.wait()?;
            drain(&mut reader, &mut output)?;
            return Ok(Capture {
                output,
                end,
                elapsed: start.elapsed(),
            });
        }
        wait_readable(&reader, POLL_INTERVAL_MS)?;
    }
}

fn set_nonblocking(reader: &PipeReader) -> io::Result<()> {
    let fd = reader.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads whatever is ready. Returns whether anything was read; EOF reads nothing.
fn read_available(reader: &mut PipeReader, output: &mut Vec<u8>) -> io::Result<bool> {
    let mut buffer = [0u8; 16 * 1024];
    let mut got_data = false;
    loop {
        match reader.read(&mut buffer) {
            Ok(0) => return Ok(got_data),
            Ok(count) => {
                output.extend_from_slice(buffer.get(..count).unwrap_or_default());
                got_data = true;
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(got_data),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        }
    }
}

/// Reads until EOF or DRAIN_LIMIT.
fn drain(reader: &mut PipeReader, output: &mut Vec<u8>) -> io::Result<()> {
    let limit = Instant::now() + DRAIN_LIMIT;
    let mut buffer = [0u8; 16 * 1024];
    while Instant::now() < limit {
        match reader.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(count) => output.extend_from_slice(buffer.get(..count).unwrap_or_default()),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                wait_readable(reader, POLL_INTERVAL_MS)?
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

fn wait_readable(reader: &PipeReader, timeout_ms: i32) -> io::Result<()> {
    let mut pollfd = libc::pollfd {
        fd: reader.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    let rc = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
    if rc < 0 {
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    if rc > 0 && pollfd.revents & libc::POLLHUP != 0 && pollfd.revents & libc::POLLIN == 0 {
        // Every writer is gone: don't spin on an always-ready descriptor.
        std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS as u64));
    }
    Ok(())
}

/// Whether the child has exited, leaving it a zombie so that its pid, which is also its
/// process group id, cannot be reused before the group is killed.
fn exited_without_reaping(child: &Child) -> io::Result<bool> {
    let pid = child.id();
    // SAFETY: siginfo_t is plain data; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waitid on our own child with a valid siginfo_t pointer.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            // SAFETY: reading si_pid of a siginfo_t waitid filled in (0 = still running).
            return Ok(unsafe { info.si_pid() } != 0);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

fn kill_group(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: signals the child's own process group (it was spawned with
        // process_group(0) and is not reaped yet). ESRCH (group already empty) is fine.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> Command {
        let mut command = Command::new("/bin/sh");
        command.arg("-c").arg(script);
        command
    }

    fn never_done(_: &[u8]) -> bool {
        false
    }

    #[test]
    fn collects_stdout_and_stderr_and_the_status() {
        let capture = run_captured(
            shell("echo out; echo err >&2; exit 4"),
            Duration::from_secs(10),
            &never_done,
            Duration::ZERO,
        )
        .unwrap();
        let text = String::from_utf8_lossy(&capture.output);
        assert!(text.contains("out\n") && text.contains("err\n"), "{text}");
        match capture.end {
            CaptureEnd::Exited(status) => assert_eq!(status.code(), Some(4)),
            other => panic!("unexpected end {other:?}"),
        }
    }

    #[test]
    fn times_out_and_kills_the_group() {
        let start = Instant::now();
        let capture = run_captured(
            shell("echo started; sleep 30 & sleep 30"),
            Duration::from_millis(500),
            &never_done,
            Duration::ZERO,
        )
        .unwrap();
        assert!(
            matches!(capture.end, CaptureEnd::TimedOut),
            "{:?}",
            capture.end
        );
        assert!(String::from_utf8_lossy(&capture.output).contains("started"));
        // The background sleep held the pipe open; killing the group released it quickly.
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "took {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn leftover_background_children_do_not_hold_the_run() {
        let start = Instant::now();
        let capture = run_captured(
            shell("sleep 30 & echo bye"),
            Duration::from_secs(20),
            &never_done,
            Duration::ZERO,
        )
        .unwrap();
        assert!(matches!(capture.end, CaptureEnd::Exited(_)));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "took {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn kills_a_child_that_overstays_after_done() {
        let done = |output: &[u8]| output.windows(4).any(|window| window == b"DONE");
        let capture = run_captured(
            shell("echo DONE; sleep 30"),
            Duration::from_secs(20),
            &done,
            Duration::from_millis(300),
        )
        .unwrap();
        assert!(
            matches!(capture.end, CaptureEnd::KilledAfterDone),
            "{:?}",
            capture.end
        );
        assert!(capture.elapsed < Duration::from_secs(5));
    }
}
