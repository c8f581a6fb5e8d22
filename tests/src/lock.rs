//! Exclusive `flock` on a file, held until dropped. flock locks belong to the open file
//! description, so two threads of one test binary exclude each other as well as two
//! processes do.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock on `path` (created if missing) is ours.
    pub(crate) fn exclusive(path: &Path) -> io::Result<FileLock> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // A lock file another user created may be read-only to us; flock works on it all
        // the same.
        let file = match OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
        {
            Err(error) if error.kind() == io::ErrorKind::PermissionDenied => File::open(path)?,
            other => other?,
        };
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(FileLock { _file: file });
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn second_holder_waits_for_the_first() {
        let dir = crate::paths::runner_dir().join("lock-test");
        let path = dir.join(format!("lock-{}", std::process::id()));
        let first = FileLock::exclusive(&path).unwrap();
        let second_has_it = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&second_has_it);
        let waiter_path = path.clone();
        let waiter = std::thread::spawn(move || {
            let _second = FileLock::exclusive(&waiter_path).unwrap();
            flag.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !second_has_it.load(Ordering::SeqCst),
            "lock was not exclusive"
        );
        drop(first);
        waiter.join().unwrap();
        assert!(second_has_it.load(Ordering::SeqCst));
        let _ = std::fs::remove_file(&path);
    }
}
