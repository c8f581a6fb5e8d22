//! `UserNetConfig`: the JSON shape of `"backend": {"type": "user", ...}`, QEMU's defaults,
//! and validation that names the offending field and value.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("user net: field '{field}' has bad value '{value}': {reason}")]
    Field { field: &'static str, value: String, reason: &'static str },
    #[error("user net: hostfwd rule '{rule}': {reason}")]
    HostFwd { rule: String, reason: String },
}

fn field_err(field: &'static str, value: impl ToString, reason: &'static str) -> ConfigError {
    ConfigError::Field { field, value: value.to_string(), reason }
}

/// The user-mode NAT's configuration. Every field has QEMU's default.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct UserNetConfig {
    /// Virtual network, CIDR.
    pub net: String,
    /// Gateway and host address inside the virtual network.
    pub host: String,
    /// DNS relay address inside the virtual network.
    pub dns: String,
    /// First address handed out by DHCP.
    pub dhcp_start: String,
    /// The guest reaches nothing outside the virtual network (port forwards still work).
    pub restrict: bool,
    /// Guest traffic to `host` reaches the host's 127.0.0.1.
    pub host_loopback: bool,
    /// QEMU spelling: `tcp:[hostaddr]:hostport-[guestaddr]:guestport`, `udp:...`.
    pub hostfwd: Vec<String>,
    /// DNS upstream, `ip` or `ip:port`; default: first IPv4 nameserver in /etc/resolv.conf.
    pub dns_upstream: Option<String>,
    /// Hostname handed out by DHCP (option 12).
    pub hostname: Option<String>,
    /// MTU announced by DHCP (option 26) and used to size MSS.
    pub mtu: u32,
    /// DHCP lease time in seconds.
    pub lease_secs: u32,
    /// Concurrent flows (TCP + UDP + ICMP) at most.
    pub max_flows: usize,
    /// Outbound TCP connections waiting for the host's connect() at most.
    pub max_half_open: usize,
    pub tcp_idle_timeout_secs: u64,
    pub udp_idle_timeout_secs: u64,
    pub icmp_idle_timeout_secs: u64,
    /// Give up on a host connect() (or a guest that never answers a forwarded SYN) after this.
    pub tcp_connect_timeout_secs: u64,
}

impl Default for UserNetConfig {
    fn default() -> Self {
        UserNetConfig {
            net: "10.0.2.0/24".into(),
            host: "10.0.2.2".into(),
            dns: "10.0.2.3".into(),
            dhcp_start: "10.0.2.15".into(),
            restrict: false,
            host_loopback: true,
            hostfwd: Vec::new(),
            dns_upstream: None,
            hostname: None,
            mtu: 1500,
            lease_secs: 86400,
            max_flows: 4096,
            max_half_open: 256,
            tcp_idle_timeout_secs: 7200,
            udp_idle_timeout_secs: 240,
            icmp_idle_timeout_secs: 10,
            tcp_connect_timeout_secs: 20,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwdProto {
    Tcp,
    Udp,
}

/// One parsed hostfwd rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFwd {
    pub rule: String,
    pub proto: FwdProto,
    pub host: SocketAddrV4,
    /// `None`: the guest's DHCP address.
    pub guest_addr: Option<Ipv4Addr>,
    pub guest_port: u16,
}

/// The validated, typed form of a `UserNetConfig`.
#[derive(Clone, Debug)]
pub struct NetParams {
    pub net: Ipv4Addr,
    pub prefix: u8,
    pub host: Ipv4Addr,
    pub dns: Ipv4Addr,
    pub dhcp_start: Ipv4Addr,
    pub restrict: bool,
    pub host_loopback: bool,
    pub hostfwd: Vec<HostFwd>,
    pub dns_upstream: Option<SocketAddrV4>,
    pub hostname: Option<String>,
    pub mtu: u32,
    pub lease_secs: u32,
    pub max_flows: usize,
    pub max_half_open: usize,
    pub tcp_idle: Duration,
    pub udp_idle: Duration,
    pub icmp_idle: Duration,
    pub tcp_connect_timeout: Duration,
}

impl NetParams {
    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(prefix_mask(self.prefix))
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & prefix_mask(self.prefix) == u32::from(self.net)
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net) | !prefix_mask(self.prefix))
    }
}

fn prefix_mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix as u32)
    }
}

fn parse_ip(field: &'static str, v: &str) -> Result<Ipv4Addr, ConfigError> {
    v.parse().map_err(|_| field_err(field, v, "not an IPv4 address"))
}

/// `ip` or `ip:port` (port 53 by default).
pub fn parse_dns_upstream(v: &str) -> Option<SocketAddrV4> {
    if let Ok(ip) = v.parse::<Ipv4Addr>() {
        return Some(SocketAddrV4::new(ip, 53));
    }
    v.parse::<SocketAddrV4>().ok().filter(|a| a.port() != 0)
}

impl UserNetConfig {
    pub fn validate(&self) -> Result<NetParams, ConfigError> {
        let (net_s, prefix_s) = self
            .net
            .split_once('/')
            .ok_or_else(|| field_err("net", &self.net, "expected CIDR like 10.0.2.0/24"))?;
        let net = parse_ip("net", net_s)?;
        let prefix: u8 = prefix_s
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| field_err("net", &self.net, "prefix length must be 8..=30"))?;
        if u32::from(net) & !prefix_mask(prefix) != 0 {
            return Err(field_err("net", &self.net, "host bits set in network address"));
        }
        let mut p = NetParams {
            net,
            prefix,
            host: parse_ip("host", &self.host)?,
            dns: parse_ip("dns", &self.dns)?,
            dhcp_start: parse_ip("dhcp_start", &self.dhcp_start)?,
            restrict: self.restrict,
            host_loopback: self.host_loopback,
            hostfwd: Vec::new(),
            dns_upstream: None,
            hostname: self.hostname.clone(),
            mtu: self.mtu,
            lease_secs: self.lease_secs,
            max_flows: self.max_flows,
            max_half_open: self.max_half_open,
            tcp_idle: Duration::from_secs(self.tcp_idle_timeout_secs),
            udp_idle: Duration::from_secs(self.udp_idle_timeout_secs),
            icmp_idle: Duration::from_secs(self.icmp_idle_timeout_secs),
            tcp_connect_timeout: Duration::from_secs(self.tcp_connect_timeout_secs),
        };
        let (net_addr, bcast, mask) =
            (u32::from(net), u32::from(p.broadcast()), prefix_mask(prefix));
        let special = move |ip: Ipv4Addr| {
            let v = u32::from(ip);
            v == net_addr || v == bcast || v & mask != net_addr
        };
        for (field, ip) in [("host", p.host), ("dns", p.dns), ("dhcp_start", p.dhcp_start)] {
            if special(ip) {
                return Err(field_err(field, ip, "must be a host address inside 'net'"));
            }
        }
        if p.host == p.dns {
            return Err(field_err("dns", p.dns, "must differ from 'host'"));
        }
        if p.dhcp_start == p.host || p.dhcp_start == p.dns {
            return Err(field_err("dhcp_start", p.dhcp_start, "collides with 'host' or 'dns'"));
        }
        if !(576..=65520).contains(&self.mtu) {
            return Err(field_err("mtu", self.mtu, "must be 576..=65520"));
        }
        if self.lease_secs < 60 {
            return Err(field_err("lease_secs", self.lease_secs, "must be at least 60"));
        }
        if self.max_flows == 0 || self.max_flows > 1 << 20 {
            return Err(field_err("max_flows", self.max_flows, "must be 1..=1048576"));
        }
        if self.max_half_open == 0 {
            return Err(field_err("max_half_open", self.max_half_open, "must be at least 1"));
        }
        for (field, v) in [
            ("tcp_idle_timeout_secs", self.tcp_idle_timeout_secs),
            ("udp_idle_timeout_secs", self.udp_idle_timeout_secs),
            ("icmp_idle_timeout_secs", self.icmp_idle_timeout_secs),
            ("tcp_connect_timeout_secs", self.tcp_connect_timeout_secs),
        ] {
            if v == 0 {
                return Err(field_err(field, v, "must be at least 1"));
            }
        }
        if let Some(h) = &self.hostname {
            let ok = !h.is_empty()
                && h.len() <= 63
                && h.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.');
            if !ok {
                return Err(field_err("hostname", h, "1-63 characters of [A-Za-z0-9.-]"));
            }
        }
        if let Some(u) = &self.dns_upstream {
            p.dns_upstream = Some(
                parse_dns_upstream(u)
                    .ok_or_else(|| field_err("dns_upstream", u, "expected ip or ip:port"))?,
            );
        }
        for rule in &self.hostfwd {
            let fwd = parse_hostfwd(rule)?;
            if let Some(g) = fwd.guest_addr {
                if special(g) || g == p.host || g == p.dns {
                    return Err(ConfigError::HostFwd {
                        rule: rule.clone(),
                        reason: format!("guest address {g} is not a guest address in {}", self.net),
                    });
                }
            }
            if p.hostfwd.iter().any(|o| o.proto == fwd.proto && o.host == fwd.host) {
                return Err(ConfigError::HostFwd {
                    rule: rule.clone(),
                    reason: "duplicate host address and port".into(),
                });
            }
            p.hostfwd.push(fwd);
        }
        Ok(p)
    }
}

/// Parses QEMU's `tcp:[hostaddr]:hostport-[guestaddr]:guestport`.
pub fn parse_hostfwd(rule: &str) -> Result<HostFwd, ConfigError> {
    let err =
        |reason: &str| ConfigError::HostFwd { rule: rule.to_string(), reason: reason.to_string() };
    let (proto, rest) = match rule.split_once(':') {
        Some(("tcp", r)) | Some(("", r)) => (FwdProto::Tcp, r),
        Some(("udp", r)) => (FwdProto::Udp, r),
        _ => return Err(err("expected 'tcp:' or 'udp:' prefix")),
    };
    let (host_part, guest_part) = rest
        .split_once('-')
        .ok_or_else(|| err("expected '[hostaddr]:hostport-[guestaddr]:guestport'"))?;
    let (haddr, hport) =
        host_part.rsplit_once(':').ok_or_else(|| err("missing ':' before host port"))?;
    let (gaddr, gport) =
        guest_part.rsplit_once(':').ok_or_else(|| err("missing ':' before guest port"))?;
    let host_ip = if haddr.is_empty() {
        Ipv4Addr::LOCALHOST
    } else {
        haddr.parse().map_err(|_| err("host address is not IPv4"))?
    };
    let host_port: u16 = hport.parse().map_err(|_| err("host port is not 0-65535"))?;
    let guest_addr = if gaddr.is_empty() {
        None
    } else {
        Some(gaddr.parse().map_err(|_| err("guest address is not IPv4"))?)
    };
    let guest_port: u16 = gport.parse().map_err(|_| err("guest port is not 0-65535"))?;
    if guest_port == 0 {
        return Err(err("guest port must not be 0"));
    }
    Ok(HostFwd {
        rule: rule.to_string(),
        proto,
        host: SocketAddrV4::new(host_ip, host_port),
        guest_addr,
        guest_port,
    })
}

/// First IPv4 `nameserver` in resolv.conf text.
pub fn nameserver_from_resolv_conf(text: &str) -> Option<Ipv4Addr> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("nameserver"), Some(ip)) => ip.parse::<Ipv4Addr>().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_qemus() {
        let p = UserNetConfig::default().validate().unwrap();
        assert_eq!(p.net, Ipv4Addr::new(10, 0, 2, 0));
        assert_eq!(p.prefix, 24);
        assert_eq!(p.host, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(p.dns, Ipv4Addr::new(10, 0, 2, 3));
        assert_eq!(p.dhcp_start, Ipv4Addr::new(10, 0, 2, 15));
        assert!(p.host_loopback && !p.restrict);
        assert_eq!(p.mask(), Ipv4Addr::new(255, 255, 255, 0));
    }

    #[test]
    fn json_uses_defaults_and_rejects_unknown_fields() {
        let c: UserNetConfig = serde_json::from_str(r#"{"restrict": true}"#).unwrap();
        assert!(c.restrict);
        assert_eq!(c.net, "10.0.2.0/24");
        assert!(serde_json::from_str::<UserNetConfig>(r#"{"restirct": true}"#).is_err());
    }

    #[test]
    fn works_inside_an_internally_tagged_backend_enum() {
        #[derive(Deserialize, Debug)]
        #[serde(tag = "type", rename_all = "lowercase")]
        enum BackendCfg {
            User(UserNetConfig),
        }
        let b: BackendCfg =
            serde_json::from_str(r#"{"type": "user", "hostfwd": ["tcp::5555-:23"]}"#).unwrap();
        let BackendCfg::User(c) = b;
        assert_eq!(c.hostfwd, vec!["tcp::5555-:23".to_string()]);
        assert!(serde_json::from_str::<BackendCfg>(r#"{"type": "user", "bogus": 1}"#).is_err());
    }

    #[test]
    fn errors_name_field_and_value() {
        let c = UserNetConfig { host: "10.0.3.2".into(), ..Default::default() };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("'host'") && e.contains("10.0.3.2"), "{e}");
        let c = UserNetConfig { net: "10.0.2.1/24".into(), ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("'net'"));
        let c = UserNetConfig { mtu: 100, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("'mtu' has bad value '100'"));
        let c = UserNetConfig { dns_upstream: Some("nope".into()), ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("dns_upstream"));
        let c = UserNetConfig { hostname: Some("bad name".into()), ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("hostname"));
    }

    #[test]
    fn hostfwd_parses_qemu_spelling() {
        let f = parse_hostfwd("tcp::5555-:23").unwrap();
        assert_eq!(f.proto, FwdProto::Tcp);
        assert_eq!(f.host, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5555));
        assert_eq!((f.guest_addr, f.guest_port), (None, 23));
        let f = parse_hostfwd("udp:127.0.0.1:6000-10.0.2.15:7").unwrap();
        assert_eq!(f.proto, FwdProto::Udp);
        assert_eq!(f.guest_addr, Some(Ipv4Addr::new(10, 0, 2, 15)));
        for bad in [
            "tcp:5555-:23",
            "sctp::1-:2",
            "tcp::1:2",
            "tcp::x-:2",
            "tcp::1-:0",
            "tcp::1-:70000",
            "tcp:::1-:2",
        ] {
            let e = parse_hostfwd(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        let c = UserNetConfig { hostfwd: vec!["tcp::1-10.0.9.9:2".into()], ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("tcp::1-10.0.9.9:2"));
    }

    #[test]
    fn dns_upstream_and_resolv_conf() {
        assert_eq!(parse_dns_upstream("127.0.0.1"), Some("127.0.0.1:53".parse().unwrap()));
        assert_eq!(parse_dns_upstream("127.0.0.1:5353"), Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(parse_dns_upstream("127.0.0.1:0"), None);
        let text = "# c\nsearch x\nnameserver ::1\nnameserver 127.0.0.53\nnameserver 1.1.1.1\n";
        assert_eq!(nameserver_from_resolv_conf(text), Some(Ipv4Addr::new(127, 0, 0, 53)));
        assert_eq!(nameserver_from_resolv_conf("nameserver\n"), None);
    }
}
