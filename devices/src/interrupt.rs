//! How device models raise interrupts without knowing KVM. The VMM implements these
//! traits (KVM_IRQ_LINE for INTx, irqfd + GSI routing for MSI-X); tests implement them
//! with counters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A level-triggered legacy INTx line (the e1000 has no MSI).
pub trait IrqLine: Send + Sync {
    /// Drives the line: `true` asserts, `false` deasserts. Repeating a level is harmless.
    fn set_level(&self, asserted: bool);
}

/// An MSI message as programmed by the guest into an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// MSI-X vectors of one device. The device keeps the table; the VMM routes and fires.
pub trait MsiVectors: Send + Sync {
    /// The number of vectors this device's table has.
    fn count(&self) -> usize;
    /// Points `vector` at `message`, or disables it when `None` (masked or cleared).
    fn configure(&self, vector: usize, message: Option<MsiMessage>) -> Result<(), String>;
    /// Fires `vector`. Out-of-range vectors are ignored.
    fn trigger(&self, vector: usize);
}

/// An `IrqLine` for tests: records the level and counts rising edges.
#[derive(Default)]
pub struct TestIrqLine {
    level: AtomicBool,
    rising_edges: AtomicU64,
}

impl TestIrqLine {
    pub fn asserted(&self) -> bool {
        self.level.load(Ordering::SeqCst)
    }
    pub fn rising_edges(&self) -> u64 {
        self.rising_edges.load(Ordering::SeqCst)
    }
}

impl IrqLine for TestIrqLine {
    fn set_level(&self, asserted: bool) {
        let was = self.level.swap(asserted, Ordering::SeqCst);
        if asserted && !was {
            self.rising_edges.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// `MsiVectors` for tests: remembers routes and counts triggers per vector.
pub struct TestMsiVectors {
    routes: std::sync::Mutex<Vec<Option<MsiMessage>>>,
    fired: Vec<AtomicU64>,
}

impl TestMsiVectors {
    pub fn new(count: usize) -> Self {
        TestMsiVectors {
            routes: std::sync::Mutex::new(vec![None; count]),
            fired: (0..count).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    pub fn fired(&self, vector: usize) -> u64 {
        self.fired.get(vector).map_or(0, |c| c.load(Ordering::SeqCst))
    }
    pub fn route(&self, vector: usize) -> Option<MsiMessage> {
        self.routes.lock().ok().and_then(|r| r.get(vector).copied().flatten())
    }
}

impl MsiVectors for TestMsiVectors {
    fn count(&self) -> usize {
        self.fired.len()
    }
    fn configure(&self, vector: usize, message: Option<MsiMessage>) -> Result<(), String> {
        let mut routes = self.routes.lock().map_err(|_| "poisoned".to_string())?;
        let slot = routes.get_mut(vector).ok_or_else(|| format!("no MSI-X vector {vector}"))?;
        *slot = message;
        Ok(())
    }
    fn trigger(&self, vector: usize) {
        if let Some(c) = self.fired.get(vector) {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }
}
