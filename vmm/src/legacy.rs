//! Legacy port-I/O devices: the 16550 UART at 0x3f8, the i8042 reset line, and the
//! isa-debug-exit port that turns a guest's byte into tapir's exit status.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Why the VM stops. Sent by whichever thread notices first; the main thread acts on the
/// first one it receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitRequest {
    /// The guest reset the machine (i8042 pulse): a normal shutdown, status 0.
    Reset,
    /// The guest wrote this byte to the debug-exit port.
    DebugExit(u8),
    /// The user typed the escape sequence (Ctrl-A x) or sent a signal.
    User(String),
    /// A vCPU hit something it cannot continue from.
    Fatal(String),
    /// Not a stop: log every device's counters and keep running (SIGUSR1).
    DumpStats,
}

pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
pub const DEBUG_EXIT_LEN: u16 = 4;

/// vm-superio's interrupt trigger backed by an irqfd.
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

type Uart = Serial<IrqFdTrigger, NoEvents, Box<dyn Write + Send>>;

/// The UART plus the host input that did not fit in its FIFO yet.
pub struct SerialConsole {
    uart: Mutex<Uart>,
    pending_input: Mutex<VecDeque<u8>>,
    input_room: Condvar,
}

impl SerialConsole {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Arc<SerialConsole> {
        Arc::new(SerialConsole {
            uart: Mutex::new(Serial::new(IrqFdTrigger(irq), out)),
            pending_input: Mutex::new(VecDeque::new()),
            input_room: Condvar::new(),
        })
    }

    pub fn read(&self, offset: u8) -> u8 {
        let value = lock(&self.uart).read(offset);
        if offset == 0 {
            self.refill_fifo();
        }
        value
    }

    pub fn write(&self, offset: u8, value: u8) {
        if let Err(e) = lock(&self.uart).write(offset, value) {
            log::warn!("serial: {e:?}");
        }
    }

    /// Moves pending host input into the guest-visible FIFO as room allows.
    fn refill_fifo(&self) {
        let mut pending = lock(&self.pending_input);
        if pending.is_empty() {
            return;
        }
        let mut uart = lock(&self.uart);
        let room = uart.fifo_capacity();
        if room == 0 {
            return;
        }
        let chunk: Vec<u8> = pending.iter().take(room).copied().collect();
        match uart.enqueue_raw_bytes(&chunk) {
            Ok(n) => {
                let n = n.min(pending.len());
                pending.drain(..n);
            }
            Err(e) => log::warn!("serial input: {e:?}"),
        }
        self.input_room.notify_all();
    }

    /// Queues host keystrokes for the guest, blocking while a large backlog is pending so
    /// a paste cannot grow memory without bound.
    pub fn queue_input(&self, bytes: &[u8]) {
        const MAX_BACKLOG: usize = 64 * 1024;
        {
            let mut pending = lock(&self.pending_input);
            while pending.len() > MAX_BACKLOG {
                pending = self.input_room.wait(pending).unwrap_or_else(|p| p.into_inner());
            }
            pending.extend(bytes.iter().copied());
        }
        self.refill_fifo();
    }
}

/// Recover from a poisoned lock: device state stays usable even if a thread panicked
/// while holding it, which is better than taking the whole VM down.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Just enough of an i8042 for Linux's reboot path (`reboot=k`), and no more.
///
/// The status register always reads "output buffer full, input buffer empty". Linux's
/// i8042 driver drains the output buffer before probing, gives up after 16 reads and
/// reports "No controller found" at once, instead of waiting out command timeouts (half
/// a second or more of boot time). The reboot path only waits for "input buffer empty",
/// then sends 0xFE, which pulses the CPU reset line.
pub struct I8042 {
    exit: Sender<ExitRequest>,
}

impl I8042 {
    const CMD_RESET_CPU: u8 = 0xfe;

    pub fn new(exit: Sender<ExitRequest>) -> Self {
        I8042 { exit }
    }

    const STATUS_OUTPUT_FULL: u8 = 0x01;

    pub fn read(&self, port: u16) -> u8 {
        if port == I8042_COMMAND_PORT {
            Self::STATUS_OUTPUT_FULL
        } else {
            0
        }
    }

    pub fn write(&self, port: u16, value: u8) {
        if port == I8042_COMMAND_PORT && value == Self::CMD_RESET_CPU {
            let _ = self.exit.send(ExitRequest::Reset);
        }
    }
}

/// QEMU's isa-debug-exit semantics: a write of V makes the VMM exit with (V << 1) | 1.
pub struct DebugExit {
    exit: Sender<ExitRequest>,
}

impl DebugExit {
    pub fn new(exit: Sender<ExitRequest>) -> Self {
        DebugExit { exit }
    }

    pub fn write(&self, data: &[u8]) {
        if let Some(&value) = data.first() {
            let _ = self.exit.send(ExitRequest::DebugExit(value));
        }
    }

    /// The process exit status QEMU would give for a guest write of `value`.
    pub fn status_for(value: u8) -> i32 {
        (i32::from(value) << 1) | 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn debug_exit_status_matches_qemu() {
        assert_eq!(DebugExit::status_for(0), 1);
        assert_eq!(DebugExit::status_for(5), 11);
        assert_eq!(DebugExit::status_for(0x7f), 255);
    }

    #[test]
    fn i8042_reset_command_requests_reset() {
        let (tx, rx) = channel();
        let kbd = I8042::new(tx);
        kbd.write(I8042_DATA_PORT, 0xfe);
        assert!(rx.try_recv().is_err());
        kbd.write(I8042_COMMAND_PORT, 0xfe);
        assert_eq!(rx.try_recv(), Ok(ExitRequest::Reset));
        assert_eq!(kbd.read(I8042_COMMAND_PORT) & 0x02, 0);
    }

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_output_and_input_backlog() {
        let out = Capture::default();
        let console = SerialConsole::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        for b in b"hi" {
            console.write(0, *b);
        }
        assert_eq!(&*lock(&out.0), b"hi");
        // More input than the 64-byte FIFO holds: the rest waits and arrives as the
        // guest reads.
        let input: Vec<u8> = (0..100u8).collect();
        console.queue_input(&input);
        let mut got = Vec::new();
        for _ in 0..100 {
            got.push(console.read(0));
        }
        assert_eq!(got, input);
    }
}
