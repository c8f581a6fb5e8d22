//! The counters every backend keeps: frames and bytes each way, and drops by reason.
//! Each backend declares its reasons once, with the names its counters report them under
//! (`drop_reasons!`), and counts them in a `DropCounts` (or a whole `LinkCounters`).

use std::marker::PhantomData;

use crate::backend::BackendCounters;

/// A reason a backend drops a frame; `drop_reasons!` implements it.
pub trait Reason: Copy + 'static {
    /// Every reason, in declaration (and report) order.
    const ALL: &'static [Self];
    /// The counter's name, e.g. `tx_too_large`.
    fn name(self) -> &'static str;
    /// Position in `ALL`.
    fn index(self) -> usize;
}

/// Declares a fieldless enum of drop reasons, each with its counter name:
///
/// ```text
/// drop_reasons! {
///     enum DropKind {
///         TxTooLarge => "tx_too_large",
///     }
/// }
/// ```
///
/// The enum gets `ALL` and `name()` of its own as well as `Reason`.
macro_rules! drop_reasons {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident { $($variant:ident => $label:literal,)* }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $name {
            $($variant,)*
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)*
                }
            }
        }

        impl $crate::counters::Reason for $name {
            const ALL: &'static [Self] = <$name>::ALL;

            fn name(self) -> &'static str {
                <$name>::name(self)
            }

            fn index(self) -> usize {
                self as usize
            }
        }
    };
}
pub(crate) use drop_reasons;

/// One counter per reason of `K`.
#[derive(Clone, Debug)]
pub struct DropCounts<K> {
    counts: Vec<u64>,
    kind: PhantomData<K>,
}

impl<K: Reason> DropCounts<K> {
    pub fn new() -> Self {
        DropCounts { counts: vec![0; K::ALL.len()], kind: PhantomData }
    }

    pub fn count(&mut self, kind: K) {
        if let Some(c) = self.counts.get_mut(kind.index()) {
            *c += 1;
        }
    }

    pub fn get(&self, kind: K) -> u64 {
        self.counts.get(kind.index()).copied().unwrap_or(0)
    }

    /// (name, count) of every reason, zeros included, in declaration order.
    pub fn report(&self) -> Vec<(&'static str, u64)> {
        K::ALL.iter().map(|k| (k.name(), self.get(*k))).collect()
    }
}

impl<K: Reason> Default for DropCounts<K> {
    fn default() -> Self {
        Self::new()
    }
}

/// Traffic and drops of one backend, reported as `BackendCounters`.
#[derive(Clone, Debug)]
pub struct LinkCounters<K> {
    tx_frames: u64,
    tx_bytes: u64,
    rx_frames: u64,
    rx_bytes: u64,
    drops: DropCounts<K>,
}

impl<K: Reason> LinkCounters<K> {
    pub fn new() -> Self {
        LinkCounters {
            tx_frames: 0,
            tx_bytes: 0,
            rx_frames: 0,
            rx_bytes: 0,
            drops: DropCounts::new(),
        }
    }

    /// A frame of `len` bytes went out to the host side.
    pub fn sent(&mut self, len: usize) {
        self.tx_frames += 1;
        self.tx_bytes += len as u64;
    }

    /// A frame of `len` bytes came in for the guest.
    pub fn received(&mut self, len: usize) {
        self.rx_frames += 1;
        self.rx_bytes += len as u64;
    }

    pub fn dropped(&mut self, kind: K) {
        self.drops.count(kind);
    }

    /// Everything, with the backend's own `gauges` added.
    pub fn report(&self, gauges: Vec<(&'static str, u64)>) -> BackendCounters {
        BackendCounters {
            tx_frames: self.tx_frames,
            tx_bytes: self.tx_bytes,
            rx_frames: self.rx_frames,
            rx_bytes: self.rx_bytes,
            drops: self.drops.report(),
            gauges,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    drop_reasons! {
        enum Reason {
            First => "first",
            Second => "second",
        }
    }

    #[test]
    fn counts_by_reason_and_reports_every_reason_by_name() {
        let mut d = DropCounts::<Reason>::new();
        d.count(Reason::Second);
        d.count(Reason::Second);
        assert_eq!((d.get(Reason::First), d.get(Reason::Second)), (0, 2));
        assert_eq!(d.report(), vec![("first", 0), ("second", 2)]);
        assert_eq!(Reason::ALL, &[Reason::First, Reason::Second]);
        assert_eq!(Reason::Second.name(), "second");
    }

    #[test]
    fn link_counters_report_traffic_drops_and_gauges() {
        let mut c = LinkCounters::<Reason>::new();
        c.sent(60);
        c.sent(40);
        c.received(1500);
        c.dropped(Reason::First);
        let r = c.report(vec![("peers", 2)]);
        assert_eq!((r.tx_frames, r.tx_bytes, r.rx_frames, r.rx_bytes), (2, 100, 1, 1500));
        assert_eq!(r.drops, vec![("first", 1), ("second", 0)]);
        assert_eq!(r.gauges, vec![("peers", 2)]);
    }
}
