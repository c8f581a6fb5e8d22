//! Descriptor chains turned into bounds-checked guest buffers.
//!
//! virtio-queue walks the chain (following `next`, switching into indirect tables, and
//! stopping after `queue size` descriptors so a loop cannot hang us). What it cannot tell
//! us is *why* a walk ended. We detect a broken walk ourselves: a well-formed chain always
//! ends with a descriptor that has no NEXT flag, so a walk that stops while the last
//! descriptor still points onward hit a loop, an out-of-range index or an unreadable
//! table. Every buffer is then checked against guest memory before anyone touches it.

use std::ops::Deref;

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use super::device::GuestRam;

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor chain is empty (bad head index or indirect table)")]
    Empty,
    #[error("descriptor chain is cut short (loop, bad next index or unreadable descriptor)")]
    Truncated,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange { addr: u64, len: u32 },
    #[error("descriptor chain holds more than {limit} bytes")]
    TooLong { limit: usize },
}

/// One checked piece of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    addr: GuestAddress,
    len: usize,
}

/// A list of checked guest buffers that together form one logical byte stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestBuffers {
    segments: Vec<Segment>,
    len: usize,
}

impl GuestBuffers {
    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, addr: GuestAddress, len: usize) {
        // Zero-length descriptors are legal but carry nothing; dropping them keeps the
        // copy loops simple.
        if len > 0 {
            self.segments.push(Segment { addr, len });
            self.len += len;
        }
    }

    /// Copies up to `out.len()` bytes starting at byte `offset`; returns bytes copied.
    pub fn read_at(&self, mem: &GuestRam, offset: usize, out: &mut [u8]) -> Result<usize, GuestMemoryError> {
        let mut skip = offset;
        let mut done = 0;
        for seg in &self.segments {
            if done == out.len() {
                break;
            }
            if skip >= seg.len {
                skip -= seg.len;
                continue;
            }
            let n = (seg.len - skip).min(out.len() - done);
            let addr = seg.addr.checked_add(skip as u64).ok_or(GuestMemoryError::InvalidGuestAddress(seg.addr))?;
            mem.read_slice(&mut out[done..done + n], addr)?;
            done += n;
            skip = 0;
        }
        Ok(done)
    }

    /// Copies all bytes into `out`, replacing its contents.
    pub fn read_all(&self, mem: &GuestRam, out: &mut Vec<u8>) -> Result<(), GuestMemoryError> {
        out.clear();
        out.resize(self.len, 0);
        self.read_at(mem, 0, out).map(|_| ())
    }

    /// Writes `data` starting at byte `offset`, as far as the buffers reach; returns bytes
    /// written.
    pub fn write_at(&self, mem: &GuestRam, offset: usize, data: &[u8]) -> Result<usize, GuestMemoryError> {
        let mut skip = offset;
        let mut done = 0;
        for seg in &self.segments {
            if done == data.len() {
                break;
            }
            if skip >= seg.len {
                skip -= seg.len;
                continue;
            }
            let n = (seg.len - skip).min(data.len() - done);
            let addr = seg.addr.checked_add(skip as u64).ok_or(GuestMemoryError::InvalidGuestAddress(seg.addr))?;
            mem.write_slice(&data[done..done + n], addr)?;
            done += n;
            skip = 0;
        }
        Ok(done)
    }
}

/// A walked and checked chain: device-readable buffers first, then device-writable ones,
/// as the specification orders them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedChain {
    pub head: u16,
    pub readable: GuestBuffers,
    pub writable: GuestBuffers,
}

/// A chain that failed the checks; it still has to go back to the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadChain {
    pub head: u16,
    pub error: ChainError,
}

/// Walks `chain`, checking every buffer against `mem`. `limit` caps the readable and the
/// writable byte totals separately (a device never needs more than a frame's worth).
pub fn parse_chain<M>(chain: DescriptorChain<M>, mem: &GuestRam, limit: usize) -> Result<ParsedChain, BadChain>
where
    M: Deref<Target = GuestRam>,
{
    let head = chain.head_index();
    let bad = |error| BadChain { head, error };
    let mut parsed = ParsedChain { head, readable: GuestBuffers::default(), writable: GuestBuffers::default() };
    let mut count = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        count += 1;
        last_has_next = desc.has_next();
        let len = desc.len() as usize;
        if len > 0 && !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
            return Err(bad(ChainError::OutOfRange { addr: desc.addr().0, len: desc.len() }));
        }
        let target = if desc.is_write_only() {
            &mut parsed.writable
        } else {
            if !parsed.writable.is_empty() {
                return Err(bad(ChainError::ReadableAfterWritable));
            }
            &mut parsed.readable
        };
        if target.len.saturating_add(len) > limit {
            return Err(bad(ChainError::TooLong { limit }));
        }
        target.push(desc.addr(), len);
    }
    if count == 0 {
        return Err(bad(ChainError::Empty));
    }
    if last_has_next {
        return Err(bad(ChainError::Truncated));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};

    const MEM_SIZE: usize = 0x10_0000;

    fn mem() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    /// Publishes `descs` at table index 0 as one chain headed by `head` and parses it.
    fn parse_raw(mem: &GuestRam, descs: &[RawDescriptor], head: u16, limit: usize) -> Result<ParsedChain, BadChain> {
        let vq = MockSplitQueue::new(mem, 16);
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table().store(i as u16, *d).unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(head);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(mem).expect("one chain published");
        parse_chain(chain, mem, limit)
    }

    #[test]
    fn readable_then_writable_chain_parses_and_copies() {
        let m = mem();
        m.write_slice(b"hello ", GuestAddress(0x8000)).unwrap();
        m.write_slice(b"world", GuestAddress(0x9000)).unwrap();
        let descs = [
            desc(0x8000, 6, VRING_DESC_F_NEXT, 1),
            desc(0x9000, 5, VRING_DESC_F_NEXT, 2),
            desc(0xa000, 3, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 3),
            desc(0xb000, 4, VRING_DESC_F_WRITE, 0),
        ];
        let parsed = parse_raw(&m, &descs, 0, 1 << 16).unwrap();
        assert_eq!(parsed.readable.len(), 11);
        assert_eq!(parsed.writable.len(), 7);
        let mut out = Vec::new();
        parsed.readable.read_all(&m, &mut out).unwrap();
        assert_eq!(out, b"hello world");
        assert_eq!(parsed.writable.write_at(&m, 1, b"ABCDEFGH").unwrap(), 6);
        let mut back = [0u8; 4];
        m.read_slice(&mut back, GuestAddress(0xb000)).unwrap();
        assert_eq!(&back, b"CDEF");
        let mut first = [0u8; 3];
        m.read_slice(&mut first, GuestAddress(0xa000)).unwrap();
        assert_eq!(&first, b"\0AB");
    }

    #[test]
    fn out_of_range_buffer_is_rejected() {
        let m = mem();
        let descs = [desc(MEM_SIZE as u64 - 4, 8, 0, 0)];
        let err = parse_raw(&m, &descs, 0, 1 << 16).unwrap_err();
        assert_eq!(err.error, ChainError::OutOfRange { addr: MEM_SIZE as u64 - 4, len: 8 });
        let descs = [desc(u64::MAX - 2, 16, 0, 0)];
        assert!(matches!(parse_raw(&m, &descs, 0, 1 << 16).unwrap_err().error, ChainError::OutOfRange { .. }));
    }

    #[test]
    fn descriptor_loop_is_detected() {
        let m = mem();
        let descs = [desc(0x8000, 10, VRING_DESC_F_NEXT, 1), desc(0x9000, 10, VRING_DESC_F_NEXT, 0)];
        assert_eq!(parse_raw(&m, &descs, 0, 1 << 20).unwrap_err().error, ChainError::Truncated);
    }

    #[test]
    fn next_index_beyond_queue_is_detected() {
        let m = mem();
        let descs = [desc(0x8000, 10, VRING_DESC_F_NEXT, 200)];
        assert_eq!(parse_raw(&m, &descs, 0, 1 << 20).unwrap_err().error, ChainError::Truncated);
    }

    #[test]
    fn head_index_beyond_queue_gives_empty_chain() {
        let m = mem();
        let err = parse_raw(&m, &[desc(0x8000, 10, 0, 0)], 99, 1 << 20).unwrap_err();
        assert_eq!(err, BadChain { head: 99, error: ChainError::Empty });
    }

    #[test]
    fn zero_length_buffers_are_skipped() {
        let m = mem();
        let descs = [desc(0x8000, 0, VRING_DESC_F_NEXT, 1), desc(0x9000, 4, 0, 0)];
        let parsed = parse_raw(&m, &descs, 0, 1 << 20).unwrap();
        assert_eq!(parsed.readable.len(), 4);
        // Even an address outside memory is harmless when nothing is transferred.
        let descs = [desc(u64::MAX, 0, 0, 0)];
        let parsed = parse_raw(&m, &descs, 0, 1 << 20).unwrap();
        assert!(parsed.readable.is_empty());
    }

    #[test]
    fn readable_after_writable_is_rejected() {
        let m = mem();
        let descs = [desc(0x8000, 4, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1), desc(0x9000, 4, 0, 0)];
        assert_eq!(parse_raw(&m, &descs, 0, 1 << 20).unwrap_err().error, ChainError::ReadableAfterWritable);
    }

    #[test]
    fn limit_is_enforced() {
        let m = mem();
        let descs = [desc(0x8000, 0x800, VRING_DESC_F_NEXT, 1), desc(0x9000, 0x801, 0, 0)];
        assert_eq!(parse_raw(&m, &descs, 0, 0x1000).unwrap_err().error, ChainError::TooLong { limit: 0x1000 });
        assert!(parse_raw(&m, &descs, 0, 0x1001).is_ok());
    }

    #[test]
    fn bad_indirect_table_is_rejected() {
        let m = mem();
        // Table length not a multiple of 16.
        let descs = [desc(0x8000, 17, VRING_DESC_F_INDIRECT, 0)];
        assert_eq!(parse_raw(&m, &descs, 0, 1 << 20).unwrap_err().error, ChainError::Empty);
        // Indirect table outside memory.
        let descs = [desc(MEM_SIZE as u64 + 0x1000, 32, VRING_DESC_F_INDIRECT, 0)];
        assert_eq!(parse_raw(&m, &descs, 0, 1 << 20).unwrap_err().error, ChainError::Empty);
    }

    #[test]
    fn indirect_chain_parses() {
        let m = mem();
        m.write_obj(desc(0x9000, 7, VRING_DESC_F_NEXT, 1), GuestAddress(0x8000)).unwrap();
        m.write_obj(desc(0xa000, 9, VRING_DESC_F_WRITE, 0), GuestAddress(0x8010)).unwrap();
        let parsed = parse_raw(&m, &[desc(0x8000, 32, VRING_DESC_F_INDIRECT, 0)], 0, 1 << 20).unwrap();
        assert_eq!((parsed.readable.len(), parsed.writable.len()), (7, 9));
        // An indirect table whose entries loop back on themselves.
        m.write_obj(desc(0xa000, 9, VRING_DESC_F_NEXT, 0), GuestAddress(0x8010)).unwrap();
        assert_eq!(parse_raw(&m, &[desc(0x8000, 32, VRING_DESC_F_INDIRECT, 0)], 0, 1 << 20).unwrap_err().error, ChainError::Truncated);
    }
}
