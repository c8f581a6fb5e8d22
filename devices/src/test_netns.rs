//! Network namespaces for device tests that run a real tap. Each test gets its own
//! namespace, named after the process and a counter so parallel tests (and parallel test
//! processes) never collide, and the guard deletes it on drop, also when the test panics.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tapir_net::mac::MacAddr;
use tapir_net::tap::{Tap, TapConfig};

static NEXT_NETNS: AtomicUsize = AtomicUsize::new(0);

/// A network namespace `tapir-dev-<pid>-<n>`, deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace with `lo` up; `None` (and a note on stderr) without root.
    pub fn new() -> Option<NetNs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: needs root to create network namespaces");
            return None;
        }
        let n = NEXT_NETNS.fetch_add(1, Ordering::SeqCst);
        let name = format!("tapir-dev-{}-{n}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // From here on the guard owns the namespace, whatever fails next.
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        Some(ns)
    }

    /// Runs a command inside the namespace.
    pub fn try_run(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .expect("run ip netns exec")
    }

    /// Runs a command inside the namespace; panics when it fails.
    pub fn run(&self, cmd: &[&str]) -> String {
        let out = self.try_run(cmd);
        assert!(
            out.status.success(),
            "in {}: {cmd:?} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut cmd = vec!["ip"];
        cmd.extend_from_slice(args);
        self.run(&cmd)
    }

    /// Runs `f` on a short-lived thread that joined this namespace. Taps and sockets it
    /// creates stay in the namespace and work from any thread afterwards.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let file = File::open(&path).expect("open netns");
                    // SAFETY: setns on a valid namespace fd; it changes only this thread,
                    // which ends when `f` returns.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("thread in netns panicked")
        })
    }

    /// Creates tap `ifname` (with a virtio-net header) in the namespace, gives it
    /// `host_cidr`, and pins `guest_ip` to `guest_mac` so the kernel needs no ARP for it.
    pub fn tap_with_address(
        &self,
        ifname: &str,
        host_cidr: &str,
        guest_ip: &str,
        guest_mac: MacAddr,
    ) -> Tap {
        let cfg = TapConfig {
            ifname: Some(ifname.into()),
            fd: None,
            bridge: None,
            vnet_hdr: true,
        };
        let tap = self
            .enter(|| Tap::open(&cfg, Some(guest_mac)))
            .expect("open tap in netns");
        self.ip(&["addr", "add", host_cidr, "dev", ifname]);
        self.ip(&["link", "set", ifname, "up"]);
        self.ip(&[
            "neigh",
            "replace",
            guest_ip,
            "lladdr",
            &guest_mac.to_string(),
            "dev",
            ifname,
        ]);
        tap
    }

    /// A TCP listener inside the namespace.
    pub fn listen(&self, addr: (std::net::Ipv4Addr, u16)) -> TcpListener {
        let listener = self
            .enter(|| TcpListener::bind(addr))
            .expect("bind in netns");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        listener
    }

    /// A counter of the namespace's interface, from /sys/class/net/IF/statistics.
    pub fn if_counter(&self, ifname: &str, counter: &str) -> u64 {
        let path = format!("/sys/class/net/{ifname}/statistics/{counter}");
        self.run(&["cat", &path])
            .trim()
            .parse()
            .expect("numeric counter")
    }

    /// A field of /proc/net/snmp (e.g. ("Tcp", "InCsumErrors")) as the namespace sees it.
    pub fn snmp(&self, proto: &str, field: &str) -> u64 {
        let text = self.run(&["cat", "/proc/net/snmp"]);
        let prefix = format!("{proto}:");
        let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
        let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
            panic!("no {proto} rows in /proc/net/snmp:\n{text}")
        };
        let index = names
            .split_whitespace()
            .position(|n| n == field)
            .expect("snmp field");
        values
            .split_whitespace()
            .nth(index)
            .and_then(|v| v.parse().ok())
            .expect("snmp value")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Accepts one connection on a non-blocking listener, waiting at most `timeout`.
pub fn accept_within(listener: &TcpListener, timeout: Duration) -> Option<TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).ok()?;
                return Some(conn);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => return None,
        }
    }
}
