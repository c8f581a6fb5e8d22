//! A non-blocking one-shot timerfd that wakes the worker when a throttled interrupt
//! may be raised (ITR).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

pub struct ItrTimer {
    fd: OwnedFd,
}

impl ItrTimer {
    pub fn new() -> io::Result<Self> {
        // SAFETY: timerfd_create has no memory-safety preconditions; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the fd was just created and is owned by nothing else.
        Ok(ItrTimer {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Fires once after `after` (at least one nanosecond: zero would disarm).
    pub fn arm(&self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(after.subsec_nanos() as i32),
            },
        };
        // SAFETY: `spec` is a valid itimerspec and the old-value pointer may be null.
        let ret =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Consumes an expiry so the fd stops polling readable. Returns whether it had fired.
    pub fn drain(&self) -> bool {
        let mut expirations = 0u64;
        // SAFETY: reads 8 bytes into a valid u64 from a non-blocking timerfd we own.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                &mut expirations as *mut u64 as *mut libc::c_void,
                8,
            )
        };
        n == 8
    }
}

impl AsRawFd for ItrTimer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_and_drains() {
        let t = ItrTimer::new().unwrap();
        assert!(!t.drain());
        t.arm(Duration::from_micros(50)).unwrap();
        let mut pfd = libc::pollfd {
            fd: t.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
        assert_eq!(n, 1);
        assert!(t.drain());
        assert!(!t.drain());
    }
}
