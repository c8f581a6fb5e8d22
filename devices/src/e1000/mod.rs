//! Intel 82540EM (e1000) gigabit Ethernet controller, as driven by Linux's unmodified
//! e1000 driver: PCI 8086:100e, BAR0 128 KiB MMIO, BAR1 64-byte I/O window, legacy
//! INTx on pin A.
//!
//! The vCPU threads reach the registers through `PciDevice`; a worker thread of the
//! device's own moves frames between the descriptor rings and the backend.
//!
//! What the VMM does with it:
//! - `E1000::new(mac, backend, guest_memory, irq)` starts the worker thread;
//!   `PciDevice::shutdown()` (or drop) stops it, after which `stats()` also carries
//!   the backend's counters.
//! - Place BAR0 (32-bit memory, `MMIO_SIZE`) and BAR1 (I/O, `IO_SIZE`) and route both:
//!   the Linux driver resets the 82540 through the I/O window (IOADDR/IODATA).
//! - Route INTA to a level-triggered input; `irq.set_level` follows ICR & IMS (with
//!   ITR throttling) and drops when the guest reads ICR or masks.
//! - No doorbells: TDT/RDT writes carry values, so they must reach `bar_write`.
//! - DMA happens only while the guest has set PCI bus mastering.

mod checksum;
mod device;
mod eeprom;
mod itr_timer;
mod phy;
mod registers;
mod rx;
mod state;
mod stats;
mod tx;
mod worker;

#[cfg(test)]
mod tap_tests;
#[cfg(test)]
mod test_driver;
#[cfg(test)]
mod tests;

pub use device::{E1000Error, E1000, INTERRUPT_PIN, IO_BAR, MMIO_BAR};
pub use registers::{IO_SIZE, MMIO_SIZE};

pub const VENDOR_ID: u16 = 0x8086;
pub const DEVICE_ID: u16 = 0x100e;
/// Subsystem of the 82540EM desktop adapter.
pub const SUBSYSTEM_ID: u16 = 0x001e;
