//! Per-NIC NAT counters: frames in/out per protocol, drops by reason, flows open.

use crate::backend::BackendCounters;
use crate::counters::{drop_reasons, DropCounts};

drop_reasons! {
    /// Why a frame (or a flow) was dropped.
    pub enum DropReason {
        EthTruncated => "eth_truncated",
        Oversized => "oversized",
        NotForUs => "eth_not_for_us",
        EthertypeUnsupported => "ethertype_unsupported",
        ArpMalformed => "arp_malformed",
        ArpNotForUs => "arp_not_for_us",
        Ipv4Malformed => "ipv4_malformed",
        Ipv4BadChecksum => "ipv4_bad_checksum",
        IpFragment => "ip_fragment",
        IpProtoUnsupported => "ip_proto_unsupported",
        BadSource => "bad_source",
        MartianDestination => "martian_destination",
        NoRoute => "no_route",
        Restricted => "restricted",
        HostLoopbackDisabled => "host_loopback_disabled",
        L4Malformed => "l4_malformed",
        L4BadChecksum => "l4_bad_checksum",
        GsoUnsupported => "gso_unsupported",
        DhcpMalformed => "dhcp_malformed",
        DhcpIgnored => "dhcp_ignored",
        NoDnsUpstream => "no_dns_upstream",
        FlowLimit => "flow_limit",
        HalfOpenLimit => "half_open_limit",
        NoFd => "no_fd",
        SocketError => "socket_error",
        IcmpUnavailable => "icmp_unavailable",
        IcmpUnsupported => "icmp_unsupported",
        TcpNoFlow => "tcp_no_flow",
        TcpOutOfWindow => "tcp_out_of_window",
        TcpConnectFailed => "tcp_connect_failed",
        UdpSendFailed => "udp_send_failed",
        RxQueueFull => "rx_queue_full",
        RxBufferTooSmall => "rx_buffer_too_small",
        HostFwdCollision => "hostfwd_collision",
    }
}

/// Protocols counted separately, in and out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Arp = 0,
    Dhcp = 1,
    Dns = 2,
    Icmp = 3,
    Udp = 4,
    Tcp = 5,
    Other = 6,
}

const PROTO_NAMES: [(&str, &str); 7] = [
    ("arp_in", "arp_out"),
    ("dhcp_in", "dhcp_out"),
    ("dns_in", "dns_out"),
    ("icmp_in", "icmp_out"),
    ("udp_in", "udp_out"),
    ("tcp_in", "tcp_out"),
    ("other_in", "other_out"),
];

#[derive(Clone, Debug, Default)]
pub struct NatCounters {
    pub frames_from_guest: u64,
    pub bytes_from_guest: u64,
    pub frames_to_guest: u64,
    pub bytes_to_guest: u64,
    proto_in: [u64; 7],
    proto_out: [u64; 7],
    drops: DropCounts<DropReason>,
    pub tcp_urgent_seen: u64,
    pub ip_options_seen: u64,
    /// Packets from sources behind a routing guest (outside the virtual network).
    pub routed_from_guest: u64,
    pub tcp_retransmits: u64,
    pub tcp_flows_total: u64,
}

/// Flow gauges sampled when counters are read.
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowGauges {
    pub tcp_open: usize,
    pub tcp_half_open: usize,
    pub udp_open: usize,
    pub icmp_open: usize,
    pub dhcp_leases: usize,
    pub hostfwd_listeners: usize,
}

impl NatCounters {
    pub fn new() -> Self {
        NatCounters::default()
    }
    pub fn drop(&mut self, reason: DropReason) {
        self.drops.count(reason);
        log::debug!("user net: dropped ({})", reason.name());
    }
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops.get(reason)
    }
    pub fn count_in(&mut self, p: Proto) {
        self.proto_in[p as usize] += 1;
    }
    pub fn count_out(&mut self, p: Proto, bytes: usize) {
        self.proto_out[p as usize] += 1;
        self.frames_to_guest += 1;
        self.bytes_to_guest += bytes as u64;
    }
    pub fn proto_in(&self, p: Proto) -> u64 {
        self.proto_in[p as usize]
    }
    pub fn proto_out(&self, p: Proto) -> u64 {
        self.proto_out[p as usize]
    }

    pub fn to_backend(&self, g: FlowGauges) -> BackendCounters {
        let mut gauges: Vec<(&'static str, u64)> = Vec::new();
        for (i, (i_name, o_name)) in PROTO_NAMES.iter().enumerate() {
            gauges.push((i_name, self.proto_in[i]));
            gauges.push((o_name, self.proto_out[i]));
        }
        gauges.extend([
            ("tcp_flows_open", g.tcp_open as u64),
            ("tcp_half_open", g.tcp_half_open as u64),
            ("udp_flows_open", g.udp_open as u64),
            ("icmp_flows_open", g.icmp_open as u64),
            ("dhcp_leases", g.dhcp_leases as u64),
            ("hostfwd_listeners", g.hostfwd_listeners as u64),
            ("tcp_flows_total", self.tcp_flows_total),
            ("tcp_retransmits", self.tcp_retransmits),
            ("tcp_urgent_seen", self.tcp_urgent_seen),
            ("ip_options_seen", self.ip_options_seen),
            ("routed_in", self.routed_from_guest),
        ]);
        BackendCounters {
            tx_frames: self.frames_from_guest,
            tx_bytes: self.bytes_from_guest,
            rx_frames: self.frames_to_guest,
            rx_bytes: self.bytes_to_guest,
            drops: self.drops.report(),
            gauges,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_reported_by_name() {
        let mut c = NatCounters::new();
        c.drop(DropReason::IpFragment);
        c.drop(DropReason::IpFragment);
        c.count_in(Proto::Tcp);
        c.count_out(Proto::Arp, 42);
        let b = c.to_backend(FlowGauges { tcp_open: 3, ..Default::default() });
        assert!(b.drops.contains(&("ip_fragment", 2)));
        assert!(b.gauges.contains(&("tcp_in", 1)));
        assert!(b.gauges.contains(&("arp_out", 1)));
        assert!(b.gauges.contains(&("tcp_flows_open", 3)));
        assert_eq!((b.rx_frames, b.rx_bytes), (1, 42));
        assert!(b.to_string().contains("drop[ip_fragment]=2"));
    }
}
