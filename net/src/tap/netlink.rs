//! One rtnetlink query (RTM_GETLINK) that tells what the ioctls cannot: an interface's
//! bridge master and, for a tap, its owner and how many fds are attached as queues.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HDR_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_TUN_OWNER: u16 = 1;
const IFLA_TUN_MULTI_QUEUE: u16 = 7;
const IFLA_TUN_NUM_QUEUES: u16 = 8;
const IFLA_TUN_PERSIST: u16 = 6;
/// Attribute types carry NLA_F_NESTED and NLA_F_NET_BYTEORDER in their top bits.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// What we learn about one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    /// ifindex of the bridge (or bond) this interface is a port of.
    pub master: Option<u32>,
    /// `IFLA_INFO_KIND`, e.g. "tun" or "bridge".
    pub kind: Option<String>,
    /// Tap attributes (kernel 4.20+; absent on older kernels).
    pub tun_owner: Option<u32>,
    pub tun_multi_queue: Option<bool>,
    pub tun_persist: Option<bool>,
    pub tun_num_queues: Option<u32>,
}

/// Asks the kernel about interface `index` in the calling thread's network namespace.
pub fn query_link(index: u32) -> io::Result<LinkInfo> {
    // SAFETY: plain socket(2) call; the result is checked.
    let raw = unsafe {
        libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE)
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };

    let mut req = [0u8; NLMSG_HDR_LEN + IFINFOMSG_LEN];
    let req_len = req.len() as u32;
    req[0..4].copy_from_slice(&req_len.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence number
    req[NLMSG_HDR_LEN] = libc::AF_UNSPEC as u8;
    req[NLMSG_HDR_LEN + 4..NLMSG_HDR_LEN + 8].copy_from_slice(&(index as i32).to_ne_bytes());

    // SAFETY: `req` is a live buffer; a zeroed sockaddr_nl addresses the kernel.
    let sent = unsafe {
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        libc::sendto(
            sock.as_raw_fd(),
            req.as_ptr() as *const libc::c_void,
            req.len(),
            0,
            &kernel as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }

    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: `buf` is a live, writable buffer of the given length.
    let n = unsafe {
        libc::recv(sock.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_response(buf.get(..n as usize).unwrap_or(&[]))
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(i..i + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(i..i + 4)?.try_into().ok()?))
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed rtnetlink response")
}

fn parse_response(msg: &[u8]) -> io::Result<LinkInfo> {
    let len = u32_at(msg, 0).ok_or_else(malformed)? as usize;
    let kind = u16_at(msg, 4).ok_or_else(malformed)?;
    let body = msg.get(NLMSG_HDR_LEN..len.min(msg.len())).ok_or_else(malformed)?;
    match kind {
        NLMSG_ERROR => {
            let errno = u32_at(body, 0).ok_or_else(malformed)? as i32;
            Err(io::Error::from_raw_os_error(-errno))
        }
        RTM_NEWLINK => {
            let attrs = body.get(IFINFOMSG_LEN..).ok_or_else(malformed)?;
            let mut info = LinkInfo::default();
            for (ty, data) in Attrs(attrs) {
                match ty {
                    IFLA_MASTER => info.master = u32_at(data, 0),
                    IFLA_LINKINFO => parse_linkinfo(data, &mut info),
                    _ => {}
                }
            }
            Ok(info)
        }
        _ => Err(malformed()),
    }
}

fn parse_linkinfo(data: &[u8], info: &mut LinkInfo) {
    for (ty, value) in Attrs(data) {
        match ty {
            IFLA_INFO_KIND => {
                let name: Vec<u8> = value.iter().copied().take_while(|&c| c != 0).collect();
                info.kind = Some(String::from_utf8_lossy(&name).into_owned());
            }
            IFLA_INFO_DATA => {
                for (tun_ty, tun_value) in Attrs(value) {
                    match tun_ty {
                        IFLA_TUN_OWNER => info.tun_owner = u32_at(tun_value, 0),
                        IFLA_TUN_MULTI_QUEUE => {
                            info.tun_multi_queue = tun_value.first().map(|&b| b != 0)
                        }
                        IFLA_TUN_PERSIST => info.tun_persist = tun_value.first().map(|&b| b != 0),
                        IFLA_TUN_NUM_QUEUES => info.tun_num_queues = u32_at(tun_value, 0),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
}

/// Iterates over (type, payload) of a run of 4-byte-aligned rtattrs, stopping at the first
/// malformed one.
struct Attrs<'a>(&'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let len = usize::from(u16_at(self.0, 0)?);
        let ty = u16_at(self.0, 2)? & NLA_TYPE_MASK;
        if len < 4 {
            return None;
        }
        let payload = self.0.get(4..len)?;
        let aligned = (len + 3) & !3;
        self.0 = self.0.get(aligned..).unwrap_or(&[]);
        Some((ty, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn newlink(attrs: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; NLMSG_HDR_LEN + IFINFOMSG_LEN];
        m.extend_from_slice(attrs);
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
        m
    }

    #[test]
    fn parses_master_and_tun_data() {
        let tun_data = [
            attr(IFLA_TUN_OWNER, &1000u32.to_ne_bytes()),
            attr(IFLA_TUN_MULTI_QUEUE, &[1]),
            attr(IFLA_TUN_NUM_QUEUES, &2u32.to_ne_bytes()),
        ]
        .concat();
        let linkinfo =
            [attr(IFLA_INFO_KIND, b"tun\0"), attr(IFLA_INFO_DATA | 0x8000, &tun_data)].concat();
        let msg = newlink(
            &[attr(IFLA_MASTER, &7u32.to_ne_bytes()), attr(IFLA_LINKINFO | 0x8000, &linkinfo)]
                .concat(),
        );
        let info = parse_response(&msg).unwrap();
        assert_eq!(info.master, Some(7));
        assert_eq!(info.kind.as_deref(), Some("tun"));
        assert_eq!(info.tun_owner, Some(1000));
        assert_eq!(info.tun_multi_queue, Some(true));
        assert_eq!(info.tun_num_queues, Some(2));
    }

    #[test]
    fn truncated_and_garbage_responses_do_not_panic() {
        let msg = newlink(&attr(IFLA_MASTER, &7u32.to_ne_bytes()));
        for cut in 0..msg.len() {
            let _ = parse_response(&msg[..cut]);
        }
        // An attribute claiming more bytes than exist ends the walk.
        let mut bogus = newlink(&attr(IFLA_MASTER, &7u32.to_ne_bytes()));
        let at = NLMSG_HDR_LEN + IFINFOMSG_LEN;
        bogus[at..at + 2].copy_from_slice(&400u16.to_ne_bytes());
        assert_eq!(parse_response(&bogus).unwrap().master, None);
        // A zero-length attribute does not loop forever.
        let mut zero = newlink(&[0u8; 8]);
        zero.extend_from_slice(&[0u8; 4]);
        assert_eq!(parse_response(&zero).unwrap(), LinkInfo::default());
    }

    #[test]
    fn error_message_maps_to_errno() {
        let mut m = vec![0u8; NLMSG_HDR_LEN + 4];
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m[NLMSG_HDR_LEN..].copy_from_slice(&(-libc::ENODEV).to_ne_bytes());
        assert_eq!(parse_response(&m).unwrap_err().raw_os_error(), Some(libc::ENODEV));
    }
}
