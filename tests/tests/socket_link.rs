//! Issue 6 end to end, with tapir running as `nobody` (no root, no capabilities):
//!
//! 1. two guests on a `stream` link (one listens, one connects; virtio-net and e1000)
//!    ping each other;
//! 2. three guests on one `dgram` multicast group all reach each other;
//! 3. a router guest with a user-NAT NIC and a `stream` hub NIC forwards for a client
//!    guest (ip_forward plus a default route), and the client fetches a page from a host
//!    HTTP server on loopback through it.
//!
//! Each guest boots once the one before it has reached its init: two kernels booting at
//! once is when the emulated nested runner breaks guests most (see README, "Tests").

use std::time::Duration;

use tapir_tests::Scenario;

const MCAST_NETNS: &str = "tapir-e2e-mcast";

fn ping_all(me: &str, peers: &[&str]) -> String {
    let mut s = format!(
        "ip link set eth0 up\nip addr add {me}/24 dev eth0\n\
         wait_for() {{ i=0; until ping -c1 -W1 \"$1\" >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 240 ] && return 1; sleep 1; done; }}\n"
    );
    for p in peers {
        s.push_str(&format!("wait_for {p} && echo REACHED-{p}\n"));
    }
    // Stay up until the others have reached us too.
    s.push_str("sleep 8\nexit 0\n");
    s
}

#[test]
fn socket_links_connect_guests_without_root() {
    let mut s = Scenario::new("socket").expect("scenario");
    s.guest(
        "left",
        1,
        r#"[{"model": "virtio-net", "backend": {"type": "stream", "listen": "127.0.0.1:7100"}}]"#,
        &ping_all("10.20.0.1", &["10.20.0.2"]),
    )
    .unwrap();
    s.guest(
        "right",
        1,
        r#"[{"model": "e1000", "backend": {"type": "stream", "connect": "127.0.0.1:7100", "connect_timeout_ms": 60000}}]"#,
        &ping_all("10.20.0.2", &["10.20.0.1"]),
    )
    .unwrap();
    let mcast = r#"[{"model": "virtio-net", "backend": {"type": "dgram", "mcast": "230.0.0.1:1234", "ttl": 1, "loopback": true, "local_addr": "127.0.0.1"}}]"#;
    let members = ["10.30.0.1", "10.30.0.2", "10.30.0.3"];
    for (i, me) in members.iter().enumerate() {
        let peers: Vec<&str> = members.iter().filter(|p| *p != me).copied().collect();
        s.guest(&format!("m{i}"), 1, mcast, &ping_all(me, &peers)).unwrap();
    }
    let router = r#"
ip link set eth0 up
udhcpc -i eth0 -n -q -t 10 -T 2 >/dev/null 2>&1 && echo "LEASE=$(ip -4 -o addr show eth0 | awk '{print $4}')"
ip link set eth1 up
ip addr add 10.40.0.1/24 dev eth1
echo 1 > /proc/sys/net/ipv4/ip_forward
echo FORWARDING
i=0; until ping -c1 -W1 10.40.0.2 >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 240 ] && exit 2; sleep 1; done
echo CLIENT-REACHED
# Keep routing until the client VM is gone (its end of the hub link closes).
while ping -c1 -W3 10.40.0.2 >/dev/null 2>&1; do sleep 2; done
exit 0
"#;
    s.guest(
        "router",
        1,
        r#"[{"model": "virtio-net", "backend": {"type": "user"}},
            {"model": "e1000", "backend": {"type": "stream", "listen": "unix:/tmp/tapir-e2e-lan.sock", "hub": true}}]"#,
        router,
    )
    .unwrap();
    let client = r#"
ip link set eth0 up
ip addr add 10.40.0.2/24 dev eth0
ip route add default via 10.40.0.1
i=0; until ping -c1 -W1 10.40.0.1 >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 120 ] && exit 2; sleep 1; done
echo ROUTER-REACHED
# Not `wget -T`: Debian's busybox 1.35 wget segfaults with it; `timeout` bounds it.
i=0; until timeout 15 wget -q -O /tmp/page http://10.0.2.2:8001/page.txt; do i=$((i+1)); [ $i -gt 10 ] && exit 3; sleep 1; done
echo "FETCHED=$(cat /tmp/page)"
exit 0
"#;
    s.guest(
        "client",
        1,
        r#"[{"model": "virtio-net", "backend": {"type": "stream", "connect": "unix:/tmp/tapir-e2e-lan.sock", "connect_timeout_ms": 60000}}]"#,
        client,
    )
    .unwrap();

    let dir = s.dir().display().to_string();
    let script = format!(
        r#"
chmod 666 /dev/kvm
# Phase 1: stream pair.
{left} & L=$!
{ready_l}{right} & R=$!
{wait_l}{wait_r}
# Phase 2: multicast, in a namespace whose loopback carries multicast.
ip netns del {MCAST_NETNS} 2>/dev/null
ip netns add {MCAST_NETNS}
ip -n {MCAST_NETNS} link set lo up multicast on
ip -n {MCAST_NETNS} route add 224.0.0.0/4 dev lo
ip netns exec {MCAST_NETNS} {m0} & M0=$!
{ready_m0}ip netns exec {MCAST_NETNS} {m1} & M1=$!
{ready_m1}ip netns exec {MCAST_NETNS} {m2} & M2=$!
{wait_m0}{wait_m1}{wait_m2}
ip netns del {MCAST_NETNS}
# Phase 3: router and client; the host's HTTP server is on loopback.
cd '{dir}' && echo "routed page" > page.txt
python3 -m http.server 8001 --bind 127.0.0.1 >/dev/null 2>&1 & H=$!
{router} & RT=$!
{ready_rt}{client} & C=$!
{wait_c}{wait_rt}
kill $H
"#,
        left = s.unprivileged_tapir_command("left", ""),
        right = s.unprivileged_tapir_command("right", ""),
        m0 = s.unprivileged_tapir_command("m0", ""),
        m1 = s.unprivileged_tapir_command("m1", ""),
        m2 = s.unprivileged_tapir_command("m2", ""),
        router = s.unprivileged_tapir_command("router", ""),
        client = s.unprivileged_tapir_command("client", ""),
        ready_l = s.wait_until_ready("left", "L", 240),
        ready_m0 = s.wait_until_ready("m0", "M0", 240),
        ready_m1 = s.wait_until_ready("m1", "M1", 240),
        ready_rt = s.wait_until_ready("router", "RT", 240),
        wait_l = Scenario::record_exit("left", "L"),
        wait_r = Scenario::record_exit("right", "R"),
        wait_m0 = Scenario::record_exit("m0", "M0"),
        wait_m1 = Scenario::record_exit("m1", "M1"),
        wait_m2 = Scenario::record_exit("m2", "M2"),
        wait_rt = Scenario::record_exit("router", "RT"),
        wait_c = Scenario::record_exit("client", "C"),
    );
    let out = s.run(&script, Duration::from_secs(1200)).expect("runner");
    let dump = out.dump();
    out.outcome.assert_status(0);
    assert!(out.log("left").contains("REACHED-10.20.0.2"), "stream: left reaches right\n{dump}");
    assert!(out.log("right").contains("REACHED-10.20.0.1"), "stream: right reaches left\n{dump}");
    for (i, me) in ["10.30.0.1", "10.30.0.2", "10.30.0.3"].iter().enumerate() {
        for peer in ["10.30.0.1", "10.30.0.2", "10.30.0.3"].iter().filter(|p| *p != me) {
            assert!(out.log(&format!("m{i}")).contains(&format!("REACHED-{peer}")), "multicast: m{i} reaches {peer}\n{dump}");
        }
    }
    assert!(out.log("router").contains("LEASE=10.0.2.15/24"), "{dump}");
    assert!(out.log("client").contains("ROUTER-REACHED"), "{dump}");
    assert!(out.log("client").contains("FETCHED=routed page"), "client fetches through the router\n{dump}");
    for vm in ["left", "right", "m0", "m1", "m2", "router", "client"] {
        assert_eq!(out.exit_status(vm), Some(1), "{vm} ends cleanly\n{dump}");
    }
}
