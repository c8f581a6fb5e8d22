//! Test helpers: network namespaces the tests create (and always delete), and waiting
//! for a backend to produce something.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::backend::{Backend, VnetHdr, MAX_FRAME_LEN};

static NEXT_NETNS: AtomicUsize = AtomicUsize::new(0);

/// Whether this test process may create namespaces and taps.
pub fn have_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A network namespace `tapir-test-<pid>-<n>`, deleted on drop (also when a test panics).
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace with `lo` up; `None` (and a note on stderr) without root.
    pub fn new() -> Option<NetNs> {
        if !have_root() {
            eprintln!("skipping: needs root to create network namespaces");
            return None;
        }
        let n = NEXT_NETNS.fetch_add(1, Ordering::SeqCst);
        let name = format!("tapir-test-{}-{n}", std::process::id());
        let out = Command::new("ip").args(["netns", "add", &name]).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        Some(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace; panics when it fails.
    pub fn run(&self, cmd: &[&str]) -> String {
        let out = self.try_run(cmd);
        assert!(
            out.status.success(),
            "in {}: {:?} failed: {}{}",
            self.name,
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_run(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .expect("run ip netns exec")
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut cmd = vec!["ip"];
        cmd.extend_from_slice(args);
        self.run(&cmd)
    }

    /// Runs `f` on a thread that has joined this namespace: sockets and taps it creates
    /// belong to the namespace and keep working from any thread afterwards.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let file = File::open(&path).expect("open netns");
                    // SAFETY: setns on a valid namespace fd; it changes only this thread.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("thread in netns panicked")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Waits until `poll_fd` is readable (at most `timeout`); true when it is.
pub fn wait_readable(backend: &dyn Backend, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd: backend.poll_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    n > 0
}

/// Receives frames until `pick` accepts one or `timeout` passes, driving the backend the
/// way a frontend would (poll, then recv until None).
pub fn recv_until(
    backend: &mut dyn Backend,
    timeout: Duration,
    mut pick: impl FnMut(&VnetHdr, &[u8]) -> bool,
) -> Option<(VnetHdr, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    loop {
        while let Ok(Some((hdr, len))) = backend.recv(&mut buf) {
            if pick(&hdr, &buf[..len]) {
                return Some((hdr, buf[..len].to_vec()));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        wait_readable(backend, left.min(Duration::from_millis(50)));
    }
}

/// Drives `backend` (recv until None) until `cond` holds or `timeout` passes.
pub fn pump_until(
    backend: &mut dyn Backend,
    timeout: Duration,
    mut cond: impl FnMut(&dyn Backend) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    loop {
        while let Ok(Some(_)) = backend.recv(&mut buf) {}
        if cond(backend) {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        wait_readable(backend, left.min(Duration::from_millis(20)));
    }
}

/// The drop counter `name` of `backend` (0 if it has none by that name).
pub fn drop_count(backend: &dyn Backend, name: &str) -> u64 {
    backend.counters().drops.iter().find(|(n, _)| *n == name).map_or(0, |(_, c)| *c)
}

/// The gauge `name` of `backend` (0 if it has none by that name).
pub fn gauge(backend: &dyn Backend, name: &str) -> u64 {
    backend.counters().gauges.iter().find(|(n, _)| *n == name).map_or(0, |(_, c)| *c)
}

/// An Ethernet frame: dst, src, ethertype, payload.
pub fn eth_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}
