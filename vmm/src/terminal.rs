//! The host terminal: raw mode while the guest owns the console (restored on every exit
//! path, including panics), and the stdin pump with QEMU's Ctrl-A escape (Ctrl-A x quits,
//! Ctrl-A a sends a literal Ctrl-A).

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use nix::sys::termios::{self, SetArg, Termios};

use crate::legacy::{ExitRequest, SerialConsole};

static SAVED: Mutex<Option<Termios>> = Mutex::new(None);
/// Set while the terminal is raw, so log lines add the carriage return raw mode drops.
pub static RAW_MODE: AtomicBool = AtomicBool::new(false);

const CTRL_A: u8 = 0x01;

fn stdin_fd() -> BorrowedFd<'static> {
    // SAFETY: fd 0 stays open for the life of the process.
    unsafe { BorrowedFd::borrow_raw(0) }
}

pub fn stdin_is_tty() -> bool {
    nix::unistd::isatty(stdin_fd()).unwrap_or(false)
}

/// Puts stdin in raw mode if it is a terminal, and arranges restoration on panic.
pub fn enter_raw_mode() {
    if !stdin_is_tty() {
        return;
    }
    let Ok(original) = termios::tcgetattr(stdin_fd().as_fd()) else { return };
    let mut raw = original.clone();
    termios::cfmakeraw(&mut raw);
    // Keep output post-processing so the guest's "\n" still renders as a new line for
    // tapir's own messages; the guest sends "\r\n" itself.
    raw.output_flags = original.output_flags;
    if termios::tcsetattr(stdin_fd(), SetArg::TCSANOW, &raw).is_ok() {
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some(original);
        RAW_MODE.store(true, Ordering::SeqCst);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    }
}

/// Restores the terminal; harmless to call more than once.
pub fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(original) = saved {
        let _ = termios::tcsetattr(stdin_fd(), SetArg::TCSANOW, &original);
        RAW_MODE.store(false, Ordering::SeqCst);
    }
}

/// Translates host keystrokes: returns the bytes for the guest, and whether the user
/// asked to quit.
pub struct EscapeFilter {
    after_ctrl_a: bool,
}

impl EscapeFilter {
    pub fn new() -> Self {
        EscapeFilter { after_ctrl_a: false }
    }

    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.after_ctrl_a {
                self.after_ctrl_a = false;
                match b {
                    b'x' | b'X' => return (out, true),
                    b'a' | CTRL_A => out.push(CTRL_A),
                    other => {
                        out.push(CTRL_A);
                        out.push(other);
                    }
                }
            } else if b == CTRL_A {
                self.after_ctrl_a = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

/// Forwards stdin to the serial console until EOF. The escape only applies on a
/// terminal; piped input is passed through untouched.
pub fn spawn_stdin_pump(console: Arc<SerialConsole>, exit: Sender<ExitRequest>) {
    let interactive = stdin_is_tty();
    let spawned = std::thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 256];
        let mut filter = EscapeFilter::new();
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("stdin: {e}");
                    return;
                }
            };
            if interactive {
                let (bytes, quit) = filter.feed(&buf[..n]);
                console.queue_input(&bytes);
                if quit {
                    let _ = exit.send(ExitRequest::User("Ctrl-A x".into()));
                    return;
                }
            } else {
                console.queue_input(&buf[..n]);
            }
        }
    });
    if let Err(e) = spawned {
        log::warn!("cannot start the stdin thread, the console is output-only: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut f = EscapeFilter::new();
        assert_eq!(f.feed(b"ls\r"), (b"ls\r".to_vec(), false));
        assert_eq!(f.feed(&[CTRL_A, b'a']), (vec![CTRL_A], false));
        assert_eq!(f.feed(&[b'q', CTRL_A]), (vec![b'q'], false));
        // The escape spans reads.
        assert_eq!(f.feed(b"x"), (vec![], true));
        let mut f = EscapeFilter::new();
        assert_eq!(f.feed(&[CTRL_A, b'c']), (vec![CTRL_A, b'c'], false));
    }
}
