//! The device thread: one epoll loop over the queue kicks, the backend's fd and a stop
//! eventfd. vCPU threads never run the data path: kicks arrive as ioeventfds, interrupts
//! leave through the transport (irqfd for MSI-X).

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{error, warn};
use tapir_net::backend::Backend;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::datapath::DataPath;
use crate::virtio::log_sparingly;

const TOKEN_STOP: u64 = 0;
const TOKEN_BACKEND: u64 = 1;
const TOKEN_RX: u64 = 2;
const TOKEN_TX: u64 = 3;
const TOKEN_CTRL: u64 = 4;

/// Link state and counters are refreshed at least this often even when idle.
const TICK: Duration = Duration::from_millis(1000);

pub(super) struct Kicks {
    pub rx: EventFd,
    pub tx: EventFd,
    pub ctrl: Option<EventFd>,
}

pub(super) struct Worker {
    datapath: DataPath,
    epoll: Epoll,
    kicks: Kicks,
    /// Kept open for as long as it is registered with `epoll`.
    _stop: EventFd,
    backend_fd: RawFd,
    backend_registered: bool,
    epoll_errors: u64,
}

impl Worker {
    /// Sets up the epoll set. Nothing runs yet; on failure the data path comes back.
    pub fn new(datapath: DataPath, kicks: Kicks, stop: EventFd) -> Result<Worker, Box<(DataPath, io::Error)>> {
        let backend_fd = datapath.backend.poll_fd();
        match Self::event_set(&kicks, &stop, backend_fd) {
            Ok(epoll) => {
                Ok(Worker { datapath, epoll, kicks, _stop: stop, backend_fd, backend_registered: true, epoll_errors: 0 })
            }
            Err(e) => Err(Box::new((datapath, e))),
        }
    }

    fn event_set(kicks: &Kicks, stop: &EventFd, backend_fd: RawFd) -> io::Result<Epoll> {
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token: u64| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token));
        add(stop.as_raw_fd(), TOKEN_STOP)?;
        add(kicks.rx.as_raw_fd(), TOKEN_RX)?;
        add(kicks.tx.as_raw_fd(), TOKEN_TX)?;
        if let Some(ctrl) = &kicks.ctrl {
            add(ctrl.as_raw_fd(), TOKEN_CTRL)?;
        }
        add(backend_fd, TOKEN_BACKEND)?;
        Ok(epoll)
    }

    /// Starts the thread; joining it returns the backend.
    pub fn spawn(self, name: String) -> io::Result<JoinHandle<Box<dyn Backend>>> {
        thread::Builder::new().name(name).spawn(move || self.run())
    }

    fn run(mut self) -> Box<dyn Backend> {
        // Kicks may have come before activation and frames may be waiting: one full pass.
        let (mut run_rx, mut run_tx, mut run_ctrl) = (true, true, true);
        let mut last_tick = Instant::now();
        let mut events = [EpollEvent::default(); 8];
        loop {
            let ctrl_more = run_ctrl && self.datapath.process_ctrl();
            let tx_more = run_tx && self.datapath.process_tx();
            let rx_more = run_rx && self.datapath.process_rx();
            self.datapath.check_link();
            let now = Instant::now();
            if now.duration_since(last_tick) >= TICK {
                self.datapath.tick(now);
                last_tick = now;
            }
            self.sync_backend_interest();

            let busy = ctrl_more || tx_more || rx_more;
            let timeout = if busy { 0 } else { TICK.as_millis() as i32 };
            let ready = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    error!("virtio-net: device thread cannot wait for events, stopping: {e}");
                    return self.datapath.into_backend();
                }
            };
            (run_rx, run_tx, run_ctrl) = (rx_more, tx_more, ctrl_more);
            for event in events.iter().take(ready) {
                match event.data() {
                    TOKEN_STOP => return self.datapath.into_backend(),
                    TOKEN_RX => {
                        let _ = self.kicks.rx.read();
                        self.datapath.rx_kicked();
                        run_rx = true;
                    }
                    TOKEN_TX => {
                        let _ = self.kicks.tx.read();
                        run_tx = true;
                    }
                    TOKEN_CTRL => {
                        if let Some(ctrl) = &self.kicks.ctrl {
                            let _ = ctrl.read();
                        }
                        run_ctrl = true;
                    }
                    TOKEN_BACKEND => run_rx = true,
                    _ => {}
                }
            }
        }
    }

    /// Polls the backend only while a frame could go somewhere. Without this, a level-
    /// triggered backend fd would spin the thread while the guest has no RX buffers.
    fn sync_backend_interest(&mut self) {
        let want = self.datapath.wants_backend_events();
        if want == self.backend_registered {
            return;
        }
        let result = if want {
            self.epoll.ctl(ControlOperation::Add, self.backend_fd, EpollEvent::new(EventSet::IN, TOKEN_BACKEND))
        } else {
            self.epoll.ctl(ControlOperation::Delete, self.backend_fd, EpollEvent::default())
        };
        match result {
            Ok(()) => self.backend_registered = want,
            Err(e) => {
                self.epoll_errors += 1;
                if log_sparingly(self.epoll_errors) {
                    warn!("virtio-net: cannot change backend polling: {e} ({} so far)", self.epoll_errors);
                }
            }
        }
    }
}
