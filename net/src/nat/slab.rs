//! A slab with generation-tagged handles, so an epoll event or a queued work item that
//! outlives its flow is recognised as stale instead of hitting a new flow in the same slot.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Handle {
    pub idx: u32,
    pub gen: u32,
}

const GEN_MASK: u32 = 0x00ff_ffff;

impl Handle {
    /// Packs kind, generation and index into an epoll token.
    pub fn token(self, kind: u8) -> u64 {
        ((kind as u64) << 56) | (((self.gen & GEN_MASK) as u64) << 32) | self.idx as u64
    }
    pub fn from_token(token: u64) -> (u8, Handle) {
        ((token >> 56) as u8, Handle { idx: token as u32, gen: ((token >> 32) as u32) & GEN_MASK })
    }
}

struct Entry<T> {
    gen: u32,
    val: Option<T>,
}

pub struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { entries: Vec::new(), free: Vec::new(), len: 0 }
    }
}

impl<T> Slab<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn insert(&mut self, val: T) -> Handle {
        self.len += 1;
        if let Some(idx) = self.free.pop() {
            if let Some(e) = self.entries.get_mut(idx as usize) {
                e.gen = (e.gen + 1) & GEN_MASK;
                e.val = Some(val);
                return Handle { idx, gen: e.gen };
            }
        }
        let idx = self.entries.len() as u32;
        self.entries.push(Entry { gen: 0, val: Some(val) });
        Handle { idx, gen: 0 }
    }
    pub fn get(&self, h: Handle) -> Option<&T> {
        self.entries.get(h.idx as usize).filter(|e| e.gen == h.gen).and_then(|e| e.val.as_ref())
    }
    pub fn get_mut(&mut self, h: Handle) -> Option<&mut T> {
        self.entries.get_mut(h.idx as usize).filter(|e| e.gen == h.gen).and_then(|e| e.val.as_mut())
    }
    pub fn remove(&mut self, h: Handle) -> Option<T> {
        let e = self.entries.get_mut(h.idx as usize).filter(|e| e.gen == h.gen)?;
        let v = e.val.take()?;
        self.free.push(h.idx);
        self.len -= 1;
        Some(v)
    }
    pub fn handles(&self) -> Vec<Handle> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.val.is_some())
            .map(|(i, e)| Handle { idx: i as u32, gen: e.gen })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_handles_miss() {
        let mut s = Slab::default();
        let a = s.insert(1);
        assert_eq!(s.remove(a), Some(1));
        let b = s.insert(2);
        assert_eq!(a.idx, b.idx);
        assert!(s.get(a).is_none());
        assert_eq!(s.get(b), Some(&2));
        let (kind, h) = Handle::from_token(b.token(3));
        assert_eq!((kind, h), (3, b));
        assert_eq!(s.len(), 1);
    }
}
