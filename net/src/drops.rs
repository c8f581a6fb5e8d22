//! Drop counters by reason. Each backend declares its reasons once, with the names its
//! counters report them under (`drop_reasons!`), and counts them in a `DropCounts`.

use std::marker::PhantomData;

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

        impl $crate::drops::Reason for $name {
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
}
