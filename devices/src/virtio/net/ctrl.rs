//! The control queue (virtio 1.x 5.1.6.5): a `{class, command}` header and its data,
//! device-readable, followed by one device-writable ack byte.
//!
//! Supported: GUEST_OFFLOADS_SET (switch receive offloads at run time, e.g. `ethtool
//! -K`), MAC_ADDR_SET (the guest's `ip link set address`). Anything else is answered
//! with VIRTIO_NET_ERR and counted.

use log::warn;
use tapir_net::backend::Offloads;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::QueueT;

use super::counters::DropReason;
use super::datapath::{DataPath, QueueSlot};
use super::features;
use crate::virtio::chain::{parse_chain, ParsedChain};
use crate::virtio::log_sparingly;
use crate::virtio::ring::{self, RingFault};

/// No command we support carries more than a u64; anything much longer is refused.
const CTRL_CHAIN_LIMIT: usize = 4096;
const CTRL_BUDGET: usize = 64;

impl DataPath {
    /// Answers queued control commands. Returns true when its budget ran out.
    pub fn process_ctrl(&mut self) -> bool {
        let Some(mut slot) = self.ctrl.take() else { return false };
        let more = self.process_ctrl_queue(&mut slot);
        DataPath::notify_if_needed(&mut slot, &self.mem, &self.counters, self.interrupt.as_ref());
        self.ctrl = Some(slot);
        more
    }

    fn process_ctrl_queue(&mut self, slot: &mut QueueSlot) -> bool {
        if slot.faulted {
            return false;
        }
        for _ in 0..CTRL_BUDGET {
            match ring::pending_chains(&slot.queue, &self.mem) {
                Err(fault) => {
                    DataPath::fault(slot, &self.counters, self.interrupt.as_ref(), &fault);
                    return false;
                }
                Ok(0) => match slot.queue.enable_notification(&self.mem) {
                    Ok(true) => continue,
                    Ok(false) => return false,
                    Err(e) => {
                        DataPath::fault(slot, &self.counters, self.interrupt.as_ref(), &RingFault::Memory(e));
                        return false;
                    }
                },
                Ok(_) => {}
            }
            let Some(chain) = slot.queue.pop_descriptor_chain(&self.mem) else { return false };
            let (head, used) = match parse_chain(chain, &self.mem, CTRL_CHAIN_LIMIT) {
                Ok(parsed) => (parsed.head, self.answer(&parsed)),
                Err(bad) => {
                    DataPath::drop_frame(&self.counters, DropReason::CtrlBadChain, &format_args!("chain {}: {}", bad.head, bad.error));
                    (bad.head, 0)
                }
            };
            DataPath::return_chain(slot, &self.mem, &self.counters, self.interrupt.as_ref(), head, used);
        }
        true
    }

    /// Runs one command and writes its ack; returns the used length.
    fn answer(&mut self, chain: &ParsedChain) -> u32 {
        if chain.writable.is_empty() || chain.readable.len() < 2 {
            DataPath::drop_frame(
                &self.counters,
                DropReason::CtrlBadChain,
                &format_args!("chain {}: {} readable / {} writable bytes", chain.head, chain.readable.len(), chain.writable.len()),
            );
            return 0;
        }
        let mut command = Vec::new();
        if let Err(e) = chain.readable.read_all(&self.mem, &mut command) {
            DataPath::drop_frame(&self.counters, DropReason::CtrlBadChain, &e);
            return 0;
        }
        let (class, cmd, data) = match command.as_slice() {
            [class, cmd, data @ ..] => (u32::from(*class), u32::from(*cmd), data),
            _ => return 0,
        };
        let ack = match self.run_command(class, cmd, data) {
            Ok(()) => VIRTIO_NET_OK,
            Err(why) => {
                let n = self.counters.count_drop(DropReason::CtrlRejected);
                if log_sparingly(n) {
                    warn!("virtio-net: control command {class}/{cmd} refused: {why} ({n} so far)");
                }
                VIRTIO_NET_ERR
            }
        };
        match chain.writable.write_at(&self.mem, 0, &[ack as u8]) {
            Ok(1) => 1,
            _ => {
                DataPath::drop_frame(&self.counters, DropReason::CtrlBadChain, &"ack not writable");
                0
            }
        }
    }

    fn run_command(&mut self, class: u32, cmd: u32, data: &[u8]) -> Result<(), String> {
        match (class, cmd) {
            (VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET)
                if self.features & features::CTRL_GUEST_OFFLOADS != 0 =>
            {
                let bits = data.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).ok_or("short command")?;
                let negotiated = self.features & features::GUEST_OFFLOAD_BITS;
                if bits & !negotiated != 0 {
                    return Err(format!("offloads {bits:#x} were not negotiated ({negotiated:#x})"));
                }
                features::validate(bits)?;
                self.set_rx_offloads(features::guest_offloads(bits))
            }
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) if self.features & features::CTRL_MAC_ADDR != 0 => {
                let mac: [u8; 6] = data.get(..6).and_then(|b| b.try_into().ok()).ok_or("short command")?;
                if mac[0] & 1 != 0 || mac == [0; 6] {
                    return Err("not a unicast address".into());
                }
                self.config.set_mac(mac);
                Ok(())
            }
            _ => Err("unsupported or not negotiated".into()),
        }
    }

    /// Tells the backend what the guest now accepts; on failure nothing changes.
    fn set_rx_offloads(&mut self, offloads: Offloads) -> Result<(), String> {
        self.backend.set_rx_offloads(offloads).map_err(|e| format!("backend refused offloads: {e}"))?;
        self.rx.offloads = offloads;
        Ok(())
    }
}
