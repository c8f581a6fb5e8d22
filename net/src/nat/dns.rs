//! DNS relay upstream selection. Queries to the DNS address travel as ordinary UDP/TCP
//! NAT flows whose host end is the upstream resolver; this module only picks it.
//!
//! A loopback stub in resolv.conf (127.0.0.53 for systemd-resolved, 127.0.0.1 for
//! dnsmasq) needs no special case: the engine's sockets live in the host's network
//! namespace, so the stub is reachable, unlike for a NAT running inside the guest's.

use std::net::SocketAddrV4;

use super::config::nameserver_from_resolv_conf;

pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The configured upstream, else the first IPv4 nameserver of the host.
pub fn choose_upstream(
    configured: Option<SocketAddrV4>,
    resolv_conf: &str,
) -> Option<SocketAddrV4> {
    configured.or_else(|| {
        let text = std::fs::read_to_string(resolv_conf).ok()?;
        nameserver_from_resolv_conf(&text).map(|ip| SocketAddrV4::new(ip, 53))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn configured_upstream_wins_and_stub_resolvers_are_kept() {
        let dir = std::env::temp_dir().join(format!("tapir-nat-dns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("resolv.conf");
        std::fs::write(&f, "nameserver 127.0.0.53\noptions edns0\n").unwrap();
        let path = f.to_str().unwrap();
        assert_eq!(
            choose_upstream(None, path),
            Some(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 53), 53))
        );
        let c = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5353);
        assert_eq!(choose_upstream(Some(c), path), Some(c));
        assert_eq!(choose_upstream(None, "/nonexistent/resolv.conf"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
