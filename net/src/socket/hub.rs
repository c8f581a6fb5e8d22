//! The peers of a stream backend. With one peer it is a point-to-point link; as a hub it
//! holds many, and every frame from one peer goes to all the others (and to the local
//! NIC), while the local NIC's frames go to all peers. There is no MAC learning: a hub
//! floods, like QEMU's.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::framing::{send_frame, FrameError, FrameReader, TxBacklog};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    Open,
    /// The peer closed its side; frames already buffered are still delivered.
    Eof,
    /// Broken (I/O error, bad framing); removed at the next reap.
    Dead,
}

pub struct Peer {
    pub token: u64,
    pub fd: OwnedFd,
    pub name: String,
    pub rx: FrameReader,
    pub tx: TxBacklog,
    pub state: PeerState,
    /// EPOLLOUT is registered (the backlog is not empty).
    pub wants_write: bool,
    /// The fd is in the backend's epoll set.
    pub registered: bool,
}

/// What happened to a frame offered to one peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    Taken,
    /// The peer's backlog is full; the frame was not taken.
    Congested,
    /// The peer is gone; the frame was not taken and the peer is now `Dead`.
    Broken,
}

impl Peer {
    pub fn new(token: u64, fd: OwnedFd, name: String) -> Self {
        Peer {
            token,
            fd,
            name,
            rx: FrameReader::new(),
            tx: TxBacklog::default(),
            state: PeerState::Open,
            wants_write: false,
            registered: false,
        }
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn is_open(&self) -> bool {
        self.state == PeerState::Open
    }

    pub fn offer(&mut self, frame: &[u8]) -> Offer {
        if !self.is_open() {
            return Offer::Broken;
        }
        if self.tx.is_full() {
            return Offer::Congested;
        }
        match send_frame(self.fd.as_raw_fd(), &mut self.tx, frame) {
            Ok(()) => Offer::Taken,
            Err(e) => {
                log::warn!("stream peer {}: send failed: {e}; disconnecting it", self.name);
                self.state = PeerState::Dead;
                Offer::Broken
            }
        }
    }

    pub fn flush(&mut self) {
        if self.state != PeerState::Open {
            return;
        }
        if let Err(e) = self.tx.flush(self.fd.as_raw_fd()) {
            log::warn!("stream peer {}: send failed: {e}; disconnecting it", self.name);
            self.state = PeerState::Dead;
        }
    }

    /// Reads what the socket has. Moves to `Eof` at end of stream and to `Dead` on error.
    pub fn read_some(&mut self) {
        if self.state != PeerState::Open {
            return;
        }
        match self.rx.fill_from(self.fd.as_raw_fd()) {
            Ok(0) => {
                log::info!("stream peer {} disconnected", self.name);
                self.state = PeerState::Eof;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log::warn!("stream peer {}: receive failed: {e}; disconnecting it", self.name);
                self.state = PeerState::Dead;
            }
        }
    }

    /// Whether this peer has nothing more to give and can be removed.
    pub fn finished(&self) -> bool {
        match self.state {
            PeerState::Open => false,
            PeerState::Eof => !self.rx.has_complete_frame(),
            PeerState::Dead => true,
        }
    }
}

/// The connected peers, in arrival order, with round-robin receive for fairness.
#[derive(Default)]
pub struct Peers {
    pub list: Vec<Peer>,
    next_rx: usize,
}

/// One frame taken from a peer.
pub struct Received {
    pub from: usize,
    pub len: usize,
}

pub enum RxEvent {
    Frame(Received),
    /// The frame did not fit the caller's buffer and was discarded.
    TooLarge(usize),
    /// The peer sent a bad length and was marked dead.
    BadLength {
        peer: String,
        len: u32,
    },
}

impl Peers {
    pub fn open_count(&self) -> usize {
        self.list.iter().filter(|p| p.is_open()).count()
    }

    pub fn any_complete_frame(&self) -> bool {
        self.list.iter().any(|p| p.state != PeerState::Dead && p.rx.has_complete_frame())
    }

    pub fn by_token(&mut self, token: u64) -> Option<&mut Peer> {
        self.list.iter_mut().find(|p| p.token == token)
    }

    /// Copies the next buffered frame (round robin over peers) into `buf`.
    pub fn take_frame(&mut self, buf: &mut [u8]) -> Option<RxEvent> {
        let n = self.list.len();
        for k in 0..n {
            let i = (self.next_rx + k) % n;
            let peer = self.list.get_mut(i)?;
            if peer.state == PeerState::Dead {
                continue;
            }
            match peer.rx.next_frame() {
                Ok(Some(range)) => {
                    self.next_rx = i + 1;
                    let frame = peer.rx.frame(range);
                    let Some(dst) = buf.get_mut(..frame.len()) else {
                        return Some(RxEvent::TooLarge(frame.len()));
                    };
                    dst.copy_from_slice(frame);
                    return Some(RxEvent::Frame(Received { from: i, len: frame.len() }));
                }
                Ok(None) => {}
                Err(FrameError::BadLength(len)) => {
                    peer.state = PeerState::Dead;
                    return Some(RxEvent::BadLength { peer: peer.name.clone(), len });
                }
            }
        }
        None
    }

    /// Offers `frame` to every open peer except `except`; returns how many were congested.
    pub fn flood(&mut self, frame: &[u8], except: Option<usize>) -> (usize, usize) {
        let (mut taken, mut congested) = (0, 0);
        for (i, peer) in self.list.iter_mut().enumerate() {
            if Some(i) == except || !peer.is_open() {
                continue;
            }
            match peer.offer(frame) {
                Offer::Taken => taken += 1,
                Offer::Congested => congested += 1,
                Offer::Broken => {}
            }
        }
        (taken, congested)
    }

    /// Removes finished peers, returning them so the caller can deregister and log.
    pub fn reap(&mut self) -> Vec<Peer> {
        let mut removed = Vec::new();
        let mut i = 0;
        while i < self.list.len() {
            if self.list.get(i).is_some_and(Peer::finished) {
                removed.push(self.list.remove(i));
            } else {
                i += 1;
            }
        }
        if self.next_rx >= self.list.len() {
            self.next_rx = 0;
        }
        removed
    }
}
