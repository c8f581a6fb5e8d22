//! QEMU's stream framing: each Ethernet frame is preceded by its length as a 4-byte
//! big-endian integer. The reader works in a fixed buffer, so a peer announcing a huge
//! length gets its connection closed, never a huge allocation.

use std::io;
use std::ops::Range;
use std::os::fd::RawFd;

use crate::backend::MAX_FRAME_LEN;
use crate::sys;

pub const LEN_PREFIX: usize = 4;

/// Room for two largest frames, so one can be in progress while another is complete.
const RX_CAPACITY: usize = 2 * (LEN_PREFIX + MAX_FRAME_LEN);

/// Bytes queued for a peer beyond which a sender is told to wait (or, in a hub, the frame
/// is dropped for that peer).
pub const TX_BACKLOG_LIMIT: usize = 512 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A length of zero or above `MAX_FRAME_LEN`: the stream is garbage or hostile.
    BadLength(u32),
}

pub fn length_prefix(len: usize) -> [u8; LEN_PREFIX] {
    (len as u32).to_be_bytes()
}

pub struct FrameReader {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl FrameReader {
    pub fn new() -> Self {
        FrameReader { buf: vec![0u8; RX_CAPACITY].into_boxed_slice(), start: 0, end: 0 }
    }

    fn buffered(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or(&[])
    }

    /// Whether bytes of an unfinished frame are buffered.
    pub fn has_partial(&self) -> bool {
        self.end > self.start
    }

    /// Length of the next frame if its prefix is buffered and valid.
    fn peek_len(&self) -> Result<Option<usize>, FrameError> {
        let Some(prefix) = self.buffered().get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        if len == 0 || len as usize > MAX_FRAME_LEN {
            return Err(FrameError::BadLength(len));
        }
        Ok(Some(len as usize))
    }

    pub fn has_complete_frame(&self) -> bool {
        matches!(self.peek_len(), Ok(Some(len)) if self.buffered().len() >= LEN_PREFIX + len)
    }

    /// Takes the next complete frame; returns its byte range, valid for `frame()` until the
    /// next `fill_from`.
    pub fn next_frame(&mut self) -> Result<Option<Range<usize>>, FrameError> {
        let Some(len) = self.peek_len()? else {
            return Ok(None);
        };
        if self.buffered().len() < LEN_PREFIX + len {
            return Ok(None);
        }
        let begin = self.start + LEN_PREFIX;
        self.start = begin + len;
        if self.start == self.end {
            // Keep reads landing at the front while the stream is frame-aligned.
            self.start = 0;
            self.end = 0;
        }
        Ok(Some(begin..begin + len))
    }

    pub fn frame(&self, range: Range<usize>) -> &[u8] {
        self.buf.get(range).unwrap_or(&[])
    }

    /// Reads what the socket has into the free space. `Ok(0)` means end of stream;
    /// `WouldBlock` means nothing was waiting. Reads nothing (and returns `WouldBlock`)
    /// when the buffer is full, which only happens while complete frames wait in it.
    pub fn fill_from(&mut self, fd: RawFd) -> io::Result<usize> {
        if self.end == self.buf.len() && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let Some(free) = self.buf.get_mut(self.end..).filter(|f| !f.is_empty()) else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = sys::recv(fd, free, 0)?;
        self.end += n;
        Ok(n)
    }

    /// Appends bytes directly (tests).
    #[cfg(test)]
    pub fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            self.buf[self.end] = b;
            self.end += 1;
        }
    }
}

/// Bytes accepted for a peer but not yet taken by its socket.
#[derive(Default)]
pub struct TxBacklog {
    buf: Vec<u8>,
    head: usize,
}

impl TxBacklog {
    pub fn len(&self) -> usize {
        self.buf.len() - self.head
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_full(&self) -> bool {
        self.len() >= TX_BACKLOG_LIMIT
    }

    pub fn push(&mut self, parts: &[&[u8]]) {
        for part in parts {
            self.buf.extend_from_slice(part);
        }
    }

    /// Writes as much as the socket takes. `Ok(true)` when the backlog is empty.
    pub fn flush(&mut self, fd: RawFd) -> io::Result<bool> {
        while self.head < self.buf.len() {
            let pending = self.buf.get(self.head..).unwrap_or(&[]);
            match sys::send_parts(fd, &[pending]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.head += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.head == self.buf.len() {
            self.buf.clear();
            self.head = 0;
            // Give back memory a burst made us take.
            if self.buf.capacity() > 4 * TX_BACKLOG_LIMIT {
                self.buf.shrink_to(TX_BACKLOG_LIMIT);
            }
            return Ok(true);
        }
        if self.head > self.buf.len() / 2 {
            self.buf.drain(..self.head);
            self.head = 0;
        }
        Ok(false)
    }
}

/// Sends one frame with its prefix: directly when nothing is queued, else behind the
/// queue. Returns `Ok(())` when the frame was taken (sent or queued).
pub fn send_frame(fd: RawFd, backlog: &mut TxBacklog, frame: &[u8]) -> io::Result<()> {
    let prefix = length_prefix(frame.len());
    if !backlog.is_empty() {
        backlog.push(&[&prefix, frame]);
        backlog.flush(fd)?;
        return Ok(());
    }
    let total = LEN_PREFIX + frame.len();
    let sent = match sys::send_parts(fd, &[&prefix, frame]) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if sent < total {
        // Queue exactly the bytes the socket did not take, to keep the stream aligned.
        if sent < LEN_PREFIX {
            backlog.push(&[prefix.get(sent..).unwrap_or(&[]), frame]);
        } else {
            backlog.push(&[frame.get(sent - LEN_PREFIX..).unwrap_or(&[])]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(frame: &[u8]) -> Vec<u8> {
        let mut v = length_prefix(frame.len()).to_vec();
        v.extend_from_slice(frame);
        v
    }

    #[test]
    fn splits_frames_arriving_byte_by_byte() {
        let mut reader = FrameReader::new();
        let stream = [framed(b"first frame"), framed(b"second")].concat();
        let mut got = Vec::new();
        for &b in &stream {
            reader.push(&[b]);
            while let Some(range) = reader.next_frame().unwrap() {
                got.push(reader.frame(range).to_vec());
            }
        }
        assert_eq!(got, vec![b"first frame".to_vec(), b"second".to_vec()]);
        assert!(!reader.has_partial());
    }

    #[test]
    fn zero_length_is_rejected() {
        let mut reader = FrameReader::new();
        reader.push(&[0, 0, 0, 0]);
        assert_eq!(reader.next_frame(), Err(FrameError::BadLength(0)));
    }

    #[test]
    fn oversized_length_is_rejected_before_any_payload() {
        for len in [MAX_FRAME_LEN as u32 + 1, 0x0010_0000, u32::MAX] {
            let mut reader = FrameReader::new();
            reader.push(&len.to_be_bytes());
            assert_eq!(reader.next_frame(), Err(FrameError::BadLength(len)));
            assert!(!reader.has_complete_frame());
        }
    }

    #[test]
    fn largest_frame_fits_after_a_partial_one() {
        let mut reader = FrameReader::new();
        let big = vec![0xabu8; MAX_FRAME_LEN];
        reader.push(&framed(&big));
        reader.push(&framed(&big)[..100]);
        let first = reader.next_frame().unwrap().unwrap();
        assert_eq!(first.len(), MAX_FRAME_LEN);
        assert_eq!(reader.next_frame().unwrap(), None);
        reader.push(&framed(&big)[100..]);
        let second = reader.next_frame().unwrap().unwrap();
        assert_eq!(reader.frame(second), &big[..]);
    }

    #[test]
    fn short_prefix_waits_for_more() {
        let mut reader = FrameReader::new();
        reader.push(&[0, 0]);
        assert_eq!(reader.next_frame(), Ok(None));
        assert!(reader.has_partial());
    }

    #[test]
    fn backlog_keeps_stream_aligned_through_a_full_socket() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut backlog = TxBacklog::default();
        let frame: Vec<u8> = (0..60_000u32).map(|i| i as u8).collect();
        let mut sent = 0;
        while !backlog.is_full() {
            send_frame(a.as_raw_fd(), &mut backlog, &frame).unwrap();
            sent += 1;
        }
        assert!(!backlog.is_empty());
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut chunk = vec![0u8; 65536];
            let want = sent * (LEN_PREFIX + 60_000);
            while all.len() < want {
                let n = b.read(&mut chunk).unwrap();
                assert!(n > 0);
                all.extend_from_slice(&chunk[..n]);
            }
            all
        });
        let mut drained = false;
        while !drained {
            drained = backlog.flush(a.as_raw_fd()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let all = reader.join().unwrap();
        let mut rx = FrameReader::new();
        let mut count = 0;
        for chunk in all.chunks(10_000) {
            rx.push(chunk);
            while let Some(range) = rx.next_frame().unwrap() {
                assert_eq!(rx.frame(range), &frame[..]);
                count += 1;
            }
        }
        assert_eq!(count, sent);
    }
}
