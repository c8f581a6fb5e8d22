//! virtio-net on top of a `tapir_net::backend::Backend`.
//!
//! Queues: 0 = receive, 1 = transmit, 2 = control. One queue pair; MQ is not offered.
//! The data path runs on one device thread per NIC, started at DRIVER_OK and stopped
//! (handing the backend back) at reset, so it can be started again.

mod config_space;
mod counters;
mod ctrl;
mod datapath;
pub mod features;
mod rx;
mod tx;
mod worker;

#[cfg(test)]
mod tap_tests;
#[cfg(test)]
mod tests;

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{error, warn};
use tapir_net::backend::{Backend, Offloads};
use tapir_net::mac::{MacAddr, MacError};
use thiserror::Error;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use counters::{DropReason, NetCounters, NetStats};

use self::config_space::{NetConfigSpace, CONFIG_LEN};
use self::datapath::{DataPath, DataPathParts, QueueSlot};
use self::worker::{Kicks, Worker};
use super::device::{ActivateError, Activation, ActiveQueue, VirtioDevice};
use super::log_sparingly;

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const CTRL_QUEUE: u16 = 2;
const CTRL_QUEUE_SIZE: u16 = 64;
/// Used in the MTU field when no MTU is configured; the field is then not offered.
const DEFAULT_MTU: u16 = 1500;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioNetConfig {
    pub mac: MacAddr,
    /// Offered to the guest (VIRTIO_NET_F_MTU) when set; 68 to 65535.
    pub mtu: Option<u16>,
    /// Size of the RX and TX rings: a power of two, 2 to 32768.
    pub queue_size: u16,
}

impl VirtioNetConfig {
    pub const DEFAULT_QUEUE_SIZE: u16 = 256;

    pub fn new(mac: MacAddr) -> Self {
        VirtioNetConfig { mac, mtu: None, queue_size: Self::DEFAULT_QUEUE_SIZE }
    }
}

#[derive(Debug, Error)]
pub enum NetError {
    #[error("invalid MAC for a NIC: {0}")]
    Mac(#[from] MacError),
    #[error("MTU {0} is outside 68..=65535")]
    Mtu(u16),
    #[error("queue size {0} is not a power of two between 2 and 32768")]
    QueueSize(u16),
    #[error("cannot create eventfd: {0}")]
    EventFd(io::Error),
}

enum State {
    Idle(Box<dyn Backend>),
    Running { stop: EventFd, thread: JoinHandle<Box<dyn Backend>> },
    /// The device thread died and took the backend with it.
    Lost,
}

pub struct VirtioNet {
    name: String,
    queue_size: u16,
    offered: u64,
    config: Arc<NetConfigSpace>,
    counters: Arc<NetCounters>,
    state: State,
    ignored_config_writes: u64,
}

impl VirtioNet {
    pub fn new(cfg: VirtioNetConfig, backend: Box<dyn Backend>) -> Result<VirtioNet, NetError> {
        let mac = cfg.mac.validate_for_nic()?;
        if let Some(mtu) = cfg.mtu {
            if mtu < 68 {
                return Err(NetError::Mtu(mtu));
            }
        }
        if !cfg.queue_size.is_power_of_two() || !(2..=32768).contains(&cfg.queue_size) {
            return Err(NetError::QueueSize(cfg.queue_size));
        }
        let offered = features::offered(backend.supported_offloads(), cfg.mtu.is_some());
        let config = NetConfigSpace::new(mac.octets(), cfg.mtu.unwrap_or(DEFAULT_MTU), 1, backend.link_up());
        Ok(VirtioNet {
            name: format!("virtio-net {mac}"),
            queue_size: cfg.queue_size,
            offered,
            config: Arc::new(config),
            counters: Arc::new(NetCounters::default()),
            state: State::Idle(backend),
            ignored_config_writes: 0,
        })
    }

    /// Live counters, also readable while the device runs.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// The MAC the guest currently uses (it may change it through the control queue).
    pub fn mac(&self) -> MacAddr {
        MacAddr(self.config.mac())
    }

    pub fn is_running(&self) -> bool {
        matches!(self.state, State::Running { .. })
    }

    fn stop(&mut self) {
        let state = std::mem::replace(&mut self.state, State::Lost);
        self.state = match state {
            State::Running { stop, thread } => {
                if let Err(e) = stop.write(1) {
                    error!("{}: cannot signal the device thread to stop: {e}", self.name);
                }
                match thread.join() {
                    Ok(backend) => State::Idle(backend),
                    Err(_) => {
                        error!("{}: device thread panicked; the NIC is dead until the VM restarts", self.name);
                        State::Lost
                    }
                }
            }
            other => other,
        };
    }
}

impl Drop for VirtioNet {
    /// A VMM that forgets `shutdown` must not leave the device thread running.
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn pci_class(&self) -> u32 {
        0x02_0000
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size, self.queue_size, CTRL_QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        self.offered
    }

    fn validate_features(&self, features: u64) -> Result<(), String> {
        features::validate(features)
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field is read-only for a virtio 1.x driver (the MAC changes through the
        // control queue).
        self.ignored_config_writes += 1;
        if log_sparingly(self.ignored_config_writes) {
            warn!("{}: driver wrote {} bytes at config offset {offset}; ignored", self.name, data.len());
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let backend = match std::mem::replace(&mut self.state, State::Lost) {
            State::Idle(backend) => backend,
            State::Lost => return Err(ActivateError::Unusable),
            running @ State::Running { .. } => {
                self.state = running;
                return Err(ActivateError::AlreadyActive);
            }
        };
        match self.start(backend, activation) {
            Ok((thread, stop)) => {
                self.state = State::Running { stop, thread };
                Ok(())
            }
            Err((Some(backend), e)) => {
                self.state = State::Idle(backend);
                Err(e)
            }
            Err((None, e)) => {
                error!("{}: the device thread could not start and the backend is gone: {e}", self.name);
                Err(e)
            }
        }
    }

    fn reset(&mut self) {
        self.stop();
        self.config.restore_default_mac();
    }

    fn stats(&self) -> String {
        let mut stats = self.counters.snapshot();
        if let State::Idle(backend) = &self.state {
            stats.backend = Some(backend.counters());
        }
        format!("{}: {stats}", self.name)
    }
}

/// What `start` gives back on failure: the backend, unless it went down with a thread
/// that never started.
type StartError = (Option<Box<dyn Backend>>, ActivateError);

impl VirtioNet {
    /// Starts the device thread for `activation`.
    fn start(
        &mut self,
        mut backend: Box<dyn Backend>,
        activation: Activation,
    ) -> Result<(JoinHandle<Box<dyn Backend>>, EventFd), StartError> {
        let features = activation.features;
        let mut queues: [Option<ActiveQueue>; 3] = [None, None, None];
        for q in activation.queues {
            if let Some(slot) = queues.get_mut(usize::from(q.index)) {
                *slot = Some(q);
            }
        }
        let [rx, tx, ctrl] = queues;
        let ready = |q: Option<ActiveQueue>, index: u16| match q {
            Some(q) if q.queue.ready() => Ok(q),
            _ => Err(ActivateError::QueueNotReady(index)),
        };
        let queues = ready(rx, RX_QUEUE).and_then(|rx| Ok((rx, ready(tx, TX_QUEUE)?))).and_then(|(rx, tx)| {
            let ctrl = if features & features::CTRL_VQ != 0 { Some(ready(ctrl, CTRL_QUEUE)?) } else { None };
            Ok((rx, tx, ctrl))
        });
        let (rx, tx, ctrl) = match queues {
            Ok(q) => q,
            Err(e) => return Err((Some(backend), e)),
        };
        let (stop, worker_stop) = match EventFd::new(EFD_NONBLOCK).and_then(|s| s.try_clone().map(|c| (s, c))) {
            Ok(pair) => pair,
            Err(e) => return Err((Some(backend), ActivateError::Io(e))),
        };

        // Tell the backend what the guest accepts on receive; if it refuses, plain
        // frames are always acceptable.
        let wanted = features::guest_offloads(features).and(backend.supported_offloads());
        let rx_offloads = match backend.set_rx_offloads(wanted) {
            Ok(()) => wanted,
            Err(e) => {
                warn!("{}: backend refused receive offloads {wanted:?}: {e}; using plain frames", self.name);
                if let Err(e) = backend.set_rx_offloads(Offloads::NONE) {
                    warn!("{}: backend refused plain frames too: {e}", self.name);
                }
                Offloads::NONE
            }
        };
        self.config.set_link_up(backend.link_up());

        let (ctrl_slot, ctrl_kick) = match ctrl {
            Some(c) => (Some(QueueSlot::new(CTRL_QUEUE, c.queue)), Some(c.kick)),
            None => (None, None),
        };
        let kicks = Kicks { rx: rx.kick, tx: tx.kick, ctrl: ctrl_kick };
        let datapath = DataPath::new(DataPathParts {
            mem: activation.mem,
            features,
            backend,
            rx_offloads,
            interrupt: activation.interrupt,
            counters: self.counters.clone(),
            config: self.config.clone(),
            rx: QueueSlot::new(RX_QUEUE, rx.queue),
            tx: QueueSlot::new(TX_QUEUE, tx.queue),
            ctrl: ctrl_slot,
        });
        let worker = Worker::new(datapath, kicks, worker_stop)
            .map_err(|failed| {
                let (datapath, e) = *failed;
                (Some(datapath.into_backend()), ActivateError::Io(e))
            })?;
        // Thread names are cut at 15 bytes; the MAC's last three octets tell NICs apart.
        let mac = self.config.mac();
        let thread_name = format!("vnet-{:02x}{:02x}{:02x}", mac[3], mac[4], mac[5]);
        let thread = worker.spawn(thread_name).map_err(|e| (None, ActivateError::Io(e)))?;
        Ok((thread, stop))
    }
}
