//! QEMU-style socket backends that link VMs without root: `stream` (TCP or UNIX stream,
//! frames prefixed with a 4-byte big-endian length, optionally a hub of many peers) and
//! `dgram` (one frame per UDP datagram, unicast or multicast).

pub mod dgram;
mod framing;
mod hub;
pub mod stream;

pub use dgram::{DgramBackend, DgramConfig, DgramError};
pub use stream::{StreamBackend, StreamConfig, StreamError};

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

/// Where a stream socket listens or connects: `"host:port"` (TCP; `[v6]:port` for IPv6)
/// or a UNIX socket path, written `"unix:/path"` or as a path containing a `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamAddr {
    Tcp(String),
    Unix(PathBuf),
}

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_UNIX_PATH_LEN: usize = 107;

impl StreamAddr {
    pub fn parse(s: &str) -> Result<StreamAddr, String> {
        let unix = s.strip_prefix("unix:").or(if s.contains('/') { Some(s) } else { None });
        if let Some(path) = unix {
            if path.is_empty() {
                return Err("has an empty UNIX socket path".into());
            }
            if path.len() > MAX_UNIX_PATH_LEN {
                return Err(format!(
                    "is a UNIX socket path longer than {MAX_UNIX_PATH_LEN} bytes, the kernel's limit"
                ));
            }
            if path.contains('\0') {
                return Err("contains a NUL byte".into());
            }
            return Ok(StreamAddr::Unix(PathBuf::from(path)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(StreamAddr::Tcp(s.to_string()))
            }
            _ => Err("is neither host:port nor a UNIX socket path (unix:/path)".into()),
        }
    }
}

impl std::fmt::Display for StreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamAddr::Tcp(hostport) => write!(f, "tcp:{hostport}"),
            StreamAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Resolves `host:port`, returning a message fit for a config error on failure.
fn resolve(hostport: &str) -> Result<Vec<SocketAddr>, String> {
    match hostport.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                Err("resolves to no address".into())
            } else {
                Ok(addrs)
            }
        }
        Err(e) => Err(format!("cannot be resolved: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix_addresses() {
        assert_eq!(
            StreamAddr::parse("127.0.0.1:5000"),
            Ok(StreamAddr::Tcp("127.0.0.1:5000".into()))
        );
        assert_eq!(StreamAddr::parse("[::1]:5000"), Ok(StreamAddr::Tcp("[::1]:5000".into())));
        assert_eq!(StreamAddr::parse("localhost:0"), Ok(StreamAddr::Tcp("localhost:0".into())));
        assert_eq!(
            StreamAddr::parse("unix:/tmp/a.sock"),
            Ok(StreamAddr::Unix("/tmp/a.sock".into()))
        );
        assert_eq!(StreamAddr::parse("/run/x.sock"), Ok(StreamAddr::Unix("/run/x.sock".into())));
        assert_eq!(StreamAddr::parse("./rel.sock"), Ok(StreamAddr::Unix("./rel.sock".into())));
    }

    #[test]
    fn rejects_bad_addresses() {
        for bad in ["", "127.0.0.1", "127.0.0.1:", ":5000", "host:99999", "unix:", "host:port"] {
            assert!(StreamAddr::parse(bad).is_err(), "{bad:?}");
        }
        let long = format!("unix:/{}", "a".repeat(200));
        assert!(StreamAddr::parse(&long).unwrap_err().contains("longer than"));
    }
}
