//! Host-wide registry of MACs in use, so a second tapir on the same host refuses to start
//! a NIC with a MAC another running VM already has (two NICs with one MAC on a bridge
//! steal each other's frames).
//!
//! One file per MAC in a directory, holding the VM name and pid, locked with `flock` for
//! as long as the claim lives. The kernel drops the lock when the process dies, however
//! it dies, so a file that exists but is not locked is stale and is taken over.
//!
//! Directories: `/run/tapir/macs` for root, `$XDG_RUNTIME_DIR/tapir/macs` otherwise (or
//! `$TMPDIR/tapir-<uid>/macs` without XDG_RUNTIME_DIR). Different users therefore have
//! different registries; collisions between users' VMs are not detected.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::mac::MacAddr;

#[derive(Debug, Error)]
pub enum MacRegistryError {
    #[error(
        "MAC {mac} of VM {vm:?} is already in use by VM {holder:?} ({holder_pid}) on this host. \
         Two NICs with one MAC lose each other's frames: give one of them a different \"mac\", \
         or leave \"mac\" unset to get one derived from the VM name"
    )]
    InUse { mac: MacAddr, vm: String, holder: String, holder_pid: String },
    #[error("MAC registry {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "MAC registry directory {dir} belongs to uid {owner}, not to this user (uid {me}); \
         refusing to use it"
    )]
    ForeignDirectory { dir: PathBuf, owner: u32, me: u32 },
}

/// The longest holder record we read back; anything longer is not ours.
const MAX_RECORD_LEN: u64 = 4096;

pub struct MacRegistry {
    dir: PathBuf,
}

/// A MAC held for one VM. Dropping it releases the lock and removes the file.
#[derive(Debug)]
pub struct MacClaim {
    /// Held open only for its flock, which lives as long as this open file description.
    _lock: File,
    path: PathBuf,
    mac: MacAddr,
    identity: (u64, u64),
}

/// Who holds a claim, as recorded in its file.
#[derive(Debug, Default, PartialEq, Eq)]
struct Holder {
    vm: Option<String>,
    pid: Option<u32>,
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn file_name(mac: MacAddr) -> String {
    mac.to_string().replace(':', "-")
}

/// Keeps a VM name printable and one line long in the record and in messages.
fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_control() { '?' } else { c }).take(256).collect()
}

fn parse_record(text: &str) -> Holder {
    let mut holder = Holder::default();
    for line in text.lines() {
        if let Some(vm) = line.strip_prefix("vm=") {
            holder.vm = Some(sanitize(vm));
        } else if let Some(pid) = line.strip_prefix("pid=") {
            holder.pid = pid.trim().parse().ok();
        }
    }
    holder
}

fn read_record(file: &mut File) -> Holder {
    let mut text = String::new();
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.take(MAX_RECORD_LEN).read_to_string(&mut text);
    parse_record(&text)
}

/// Tries to take an exclusive flock without waiting; `Ok(false)` when another open file
/// description holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    loop {
        // SAFETY: flock on an fd we own, with constant flags.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(err),
        }
    }
}

impl MacRegistry {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        MacRegistry { dir: dir.into() }
    }

    pub fn default_dir() -> PathBuf {
        let me = euid();
        if me == 0 {
            return PathBuf::from("/run/tapir/macs");
        }
        match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
            Some(runtime) if runtime.is_absolute() => runtime.join("tapir").join("macs"),
            _ => std::env::temp_dir().join(format!("tapir-{me}")).join("macs"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn prepare_dir(&self) -> Result<(), MacRegistryError> {
        let io_err = |source| MacRegistryError::Io { path: self.dir.clone(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(io_err)?;
        let owner = std::fs::metadata(&self.dir).map_err(io_err)?.uid();
        let me = euid();
        if owner != me && me != 0 {
            return Err(MacRegistryError::ForeignDirectory { dir: self.dir.clone(), owner, me });
        }
        Ok(())
    }

    /// Claims `mac` for VM `vm_name` for as long as the returned claim lives.
    pub fn claim(&self, mac: MacAddr, vm_name: &str) -> Result<MacClaim, MacRegistryError> {
        self.prepare_dir()?;
        let path = self.dir.join(file_name(mac));
        let io_err = |source| MacRegistryError::Io { path: path.clone(), source };
        // A releasing holder unlinks the file before unlocking it, so the file we lock
        // may already be unlinked; then we start over with a fresh one.
        for _ in 0..16 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .map_err(io_err)?;
            if !try_lock(&file).map_err(io_err)? {
                let holder = read_record(&mut file);
                let holder_pid = match holder.pid {
                    Some(pid) if pid == std::process::id() => {
                        format!("this very process, pid {pid}: two NICs of one VM share it")
                    }
                    Some(pid) => format!("pid {pid}"),
                    None => "pid unknown".to_string(),
                };
                return Err(MacRegistryError::InUse {
                    mac,
                    vm: sanitize(vm_name),
                    holder: holder.vm.unwrap_or_else(|| "?".to_string()),
                    holder_pid,
                });
            }
            let ours = file.metadata().map_err(io_err)?;
            let identity = (ours.dev(), ours.ino());
            match std::fs::symlink_metadata(&path) {
                Ok(now) if (now.dev(), now.ino()) == identity => {}
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(e)),
            }
            let previous = read_record(&mut file);
            if previous != Holder::default() {
                log::info!(
                    "MAC {mac}: taking over a stale claim by VM {:?} (pid {}), which is no longer running",
                    previous.vm.as_deref().unwrap_or("?"),
                    previous.pid.map_or_else(|| "?".to_string(), |p| p.to_string())
                );
            }
            let record = format!("vm={}\npid={}\n", sanitize(vm_name), std::process::id());
            file.set_len(0).map_err(io_err)?;
            file.seek(SeekFrom::Start(0)).map_err(io_err)?;
            file.write_all(record.as_bytes()).map_err(io_err)?;
            return Ok(MacClaim { _lock: file, path, mac, identity });
        }
        Err(io_err(io::Error::other("the claim file kept being replaced; giving up")))
    }
}

impl MacClaim {
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for MacClaim {
    fn drop(&mut self) {
        // Unlink before the lock goes away with the fd, and only if the file is still ours.
        if let Ok(now) = std::fs::symlink_metadata(&self.path) {
            if (now.dev(), now.ino()) == self.identity {
                let _ = std::fs::remove_file(&self.path);
            }
        }
        // `_lock` closes after this, releasing the lock.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tapir-macreg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn mac(s: &str) -> MacAddr {
        s.parse().unwrap()
    }

    #[test]
    fn claim_writes_record_and_release_removes_it() {
        let dir = temp_dir("basic");
        let registry = MacRegistry::new(&dir);
        let claim = registry.claim(mac("52:54:00:00:00:01"), "web").unwrap();
        let text = std::fs::read_to_string(claim.path()).unwrap();
        assert_eq!(text, format!("vm=web\npid={}\n", std::process::id()));
        assert!(claim.path().ends_with("52-54-00-00-00-01"));
        let path = claim.path().to_path_buf();
        drop(claim);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn second_claim_is_refused_naming_both_vms() {
        let dir = temp_dir("conflict");
        let registry = MacRegistry::new(&dir);
        let m = mac("52:54:00:00:00:02");
        let _first = registry.claim(m, "alpha").unwrap();
        // flock locks belong to open file descriptions, so this second open conflicts.
        let err = registry.claim(m, "beta").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"alpha\""), "{msg}");
        assert!(msg.contains("\"beta\""), "{msg}");
        assert!(msg.contains("52:54:00:00:00:02"), "{msg}");
        assert!(msg.contains("two NICs of one VM"), "{msg}");
        // Other MACs are unaffected.
        let _other = registry.claim(mac("52:54:00:00:00:03"), "beta").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn release_then_reclaim() {
        let dir = temp_dir("reclaim");
        let registry = MacRegistry::new(&dir);
        let m = mac("52:54:00:00:00:04");
        drop(registry.claim(m, "one").unwrap());
        let again = registry.claim(m, "two").unwrap();
        assert!(std::fs::read_to_string(again.path()).unwrap().starts_with("vm=two\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_unlocked_file_is_taken_over() {
        let dir = temp_dir("stale");
        std::fs::create_dir_all(&dir).unwrap();
        let m = mac("52:54:00:00:00:05");
        std::fs::write(dir.join(file_name(m)), "vm=crashed\npid=999999\n").unwrap();
        let registry = MacRegistry::new(&dir);
        let claim = registry.claim(m, "fresh").unwrap();
        let text = std::fs::read_to_string(claim.path()).unwrap();
        assert_eq!(text, format!("vm=fresh\npid={}\n", std::process::id()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn claim_held_by_another_process_is_refused_until_it_exits() {
        let dir = temp_dir("process");
        std::fs::create_dir_all(&dir).unwrap();
        let m = mac("52:54:00:00:00:06");
        let path = dir.join(file_name(m));
        std::fs::write(&path, "vm=other-vm\npid=4242\n").unwrap();
        // util-linux flock(1) holds the lock the way another tapir would.
        // --no-fork: the lock holder is the process we kill, not an orphaned child.
        let mut holder = match Command::new("flock")
            .arg("--no-fork")
            .arg(&path)
            .args(["sleep", "30"])
            .stdout(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                eprintln!("skipping: flock(1) unavailable: {e}");
                return;
            }
        };
        // Wait until flock(1) holds the lock: until then our own probe gets it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let probe = File::open(&path).unwrap();
            if !try_lock(&probe).unwrap() {
                break;
            }
            drop(probe);
            assert!(Instant::now() < deadline, "flock(1) never took the lock");
            std::thread::sleep(Duration::from_millis(20));
        }
        let registry = MacRegistry::new(&dir);
        let err = registry.claim(m, "mine").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("\"other-vm\"") && msg.contains("pid 4242") && msg.contains("\"mine\""),
            "{msg}"
        );
        holder.kill().unwrap();
        holder.wait().unwrap();
        let claim = registry.claim(m, "mine").unwrap();
        assert!(std::fs::read_to_string(claim.path()).unwrap().starts_with("vm=mine\n"));
        drop(claim);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_with_newlines_cannot_forge_records() {
        assert_eq!(sanitize("a\nvm=b"), "a?vm=b");
        assert_eq!(
            parse_record("vm=x\npid=12\ngarbage\n"),
            Holder { vm: Some("x".into()), pid: Some(12) }
        );
        assert_eq!(parse_record("pid=notanumber"), Holder { vm: None, pid: None });
    }

    #[test]
    fn default_dir_is_absolute() {
        assert!(MacRegistry::default_dir().is_absolute());
        assert!(MacRegistry::default_dir().ends_with("macs"));
    }
}
