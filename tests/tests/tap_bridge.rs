//! Issues 3 and 4 end to end: three Debian guests on taps enslaved to one bridge, inside a
//! network namespace the test creates, with no MACs configured.
//!
//! - alpha: virtio-net on the bridge, plus an e1000 on the user-mode NAT (two models in
//!   one guest, distinct MACs, a DHCP lease through the e1000);
//! - beta: virtio-net on the bridge;
//! - gamma: e1000 on the bridge.
//!
//! beta and gamma each send alpha 2 MB with busybox nc, and the checksums must match.
//! Every guest pings the bridge's host-side address, and the host pings every guest.

use std::collections::BTreeSet;
use std::time::Duration;

use tapir_tests::Scenario;

const NETNS: &str = "tapir-e2e-bridge";

fn lines_with<'a>(log: &'a str, prefix: &str) -> Vec<&'a str> {
    log.lines().filter_map(|l| l.trim().strip_prefix(prefix)).collect()
}

/// Waits for a peer, then prints the guest's MAC and pings the bridge's host side.
const COMMON: &str = r#"
set -u
ip link set eth0 up
ip addr add "$ME/24" dev eth0
echo "MAC=$(cat /sys/class/net/eth0/address)"
echo "DRIVER=$(basename $(readlink /sys/class/net/eth0/device/driver))"
wait_for() { i=0; until ping -c1 -W1 "$1" >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 90 ] && return 1; sleep 1; done; }
wait_for 10.10.0.1 && ping -c2 10.10.0.1 >/dev/null && echo PING-HOST-OK
"#;

#[test]
#[ignore = "several concurrent guests in the emulated nested runner stall or crash at random (TCG-emulated SVM); run with `cargo test -- --ignored`"]
fn guests_on_a_bridge_ping_and_transfer_intact() {
    let mut s = Scenario::new("bridge").expect("scenario");
    let alpha = format!(
        r#"ME=10.10.0.2
{COMMON}
ip link set eth1 up
echo "MAC1=$(cat /sys/class/net/eth1/address)"
echo "DRIVER1=$(basename $(readlink /sys/class/net/eth1/device/driver))"
udhcpc -i eth1 -n -q -t 10 -T 2 >/dev/null 2>&1 && echo "LEASE1=$(ip -4 -o addr show eth1 | awk '{{print $4}}')"
printf '#!/bin/sh\ncat > /tmp/from-beta\n' > /tmp/rb.sh
printf '#!/bin/sh\ncat > /tmp/from-gamma\n' > /tmp/rg.sh
chmod +x /tmp/rb.sh /tmp/rg.sh
echo LISTENING
nc -l -p 5000 -e /tmp/rb.sh
echo "GOT-BETA=$(sha256sum < /tmp/from-beta | cut -d' ' -f1) $(wc -c < /tmp/from-beta)"
nc -l -p 5001 -e /tmp/rg.sh
echo "GOT-GAMMA=$(sha256sum < /tmp/from-gamma | cut -d' ' -f1) $(wc -c < /tmp/from-gamma)"
exit 0
"#
    );
    let sender = |me: &str, port: u16| {
        format!(
            r#"ME={me}
{COMMON}
dmesg | grep -q 'NIC Link is Up' && echo E1000-LINK-UP
head -c 2097152 /dev/urandom > /tmp/payload
echo "SENT=$(sha256sum < /tmp/payload | cut -d' ' -f1) $(wc -c < /tmp/payload)"
wait_for 10.10.0.2 && echo PING-PEER-OK
i=0
until nc 10.10.0.2 {port} < /tmp/payload 2>/dev/null; do i=$((i+1)); [ $i -gt 120 ] && exit 3; sleep 1; done
echo SEND-DONE
exit 0
"#
        )
    };
    let tap = r#"{"type": "tap", "bridge": "br0"}"#;
    s.guest(
        "alpha",
        1,
        &format!(r#"[{{"model": "virtio-net", "backend": {tap}}}, {{"model": "e1000", "backend": {{"type": "user"}}}}]"#),
        &alpha,
    )
    .unwrap();
    s.guest("beta", 1, &format!(r#"[{{"model": "virtio-net", "backend": {tap}}}]"#), &sender("10.10.0.3", 5000))
        .unwrap();
    s.guest("gamma", 1, &format!(r#"[{{"model": "e1000", "backend": {tap}}}]"#), &sender("10.10.0.4", 5001)).unwrap();

    let script = format!(
        r#"
ip netns del {NETNS} 2>/dev/null
ip netns add {NETNS}
trap 'ip netns del {NETNS}' EXIT
ip -n {NETNS} link set lo up
ip -n {NETNS} link add br0 type bridge
ip -n {NETNS} addr add 10.10.0.1/24 dev br0
ip -n {NETNS} link set br0 up
ip netns exec {NETNS} {alpha} & A=$!
ip netns exec {NETNS} {beta} & B=$!
ip netns exec {NETNS} {gamma} & C=$!
# The host side reaches every guest while they run (one prober per guest, so a guest
# that finishes early is not missed).
for ip in 10.10.0.2 10.10.0.3 10.10.0.4; do
  ( i=0; until ip netns exec {NETNS} ping -c1 -W1 $ip >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 300 ] && exit 1; sleep 0.5; done
    echo HOST-PINGED-$ip ) &
done
i=0; until [ "$(ip -n {NETNS} link show master br0 | grep -c 'state UP')" = 3 ]; do i=$((i+1)); [ $i -gt 300 ] && break; sleep 1; done
echo "BRIDGE-PORTS-UP=$(ip -n {NETNS} link show master br0 | grep -c 'state UP')"
{wait_a}{wait_b}{wait_c}
"#,
        alpha = s.tapir_command("alpha", ""),
        beta = s.tapir_command("beta", ""),
        gamma = s.tapir_command("gamma", ""),
        wait_a = Scenario::record_exit("alpha", "A"),
        wait_b = Scenario::record_exit("beta", "B"),
        wait_c = Scenario::record_exit("gamma", "C"),
    );
    let out = s.run(&script, Duration::from_secs(900)).expect("runner");
    let dump = out.dump();
    out.outcome.assert_status(0);
    for vm in ["alpha", "beta", "gamma"] {
        assert_eq!(out.exit_status(vm), Some(1), "{vm} exits 0 through debug-exit\n{dump}");
        assert!(out.log(vm).contains("PING-HOST-OK"), "{vm} pings the bridge address\n{dump}");
    }
    for ip in ["10.10.0.2", "10.10.0.3", "10.10.0.4"] {
        assert!(out.outcome.output.contains(&format!("HOST-PINGED-{ip}")), "host pings {ip}\n{dump}");
    }
    assert!(out.outcome.output.contains("BRIDGE-PORTS-UP=3"), "taps are attached and up\n{dump}");

    // Distinct derived MACs, all locally administered unicast, none QEMU's default.
    let mut macs = BTreeSet::new();
    for (vm, key) in [("alpha", "MAC="), ("alpha", "MAC1="), ("beta", "MAC="), ("gamma", "MAC=")] {
        let mac = lines_with(out.log(vm), key).first().map(|m| m.to_string()).unwrap_or_default();
        let first = u8::from_str_radix(mac.get(0..2).unwrap_or("zz"), 16).unwrap_or(1);
        assert_eq!(first & 0b11, 0b10, "{vm} {key}{mac} is locally administered unicast\n{dump}");
        assert!(macs.insert(mac), "{vm} {key} collides\n{dump}");
    }
    assert!(!macs.contains("52:54:00:12:34:56"));

    assert_eq!(lines_with(out.log("alpha"), "DRIVER="), vec!["virtio_net"], "{dump}");
    assert_eq!(lines_with(out.log("alpha"), "DRIVER1="), vec!["e1000"], "{dump}");
    assert_eq!(lines_with(out.log("gamma"), "DRIVER="), vec!["e1000"], "{dump}");
    assert!(out.log("gamma").contains("E1000-LINK-UP"), "e1000 reports link up\n{dump}");
    assert_eq!(lines_with(out.log("alpha"), "LEASE1="), vec!["10.0.2.15/24"], "DHCP through e1000 + NAT\n{dump}");

    let sent_beta = lines_with(out.log("beta"), "SENT=");
    let sent_gamma = lines_with(out.log("gamma"), "SENT=");
    assert_eq!(sent_beta.len(), 1, "{dump}");
    assert!(sent_beta[0].ends_with(" 2097152"), "{dump}");
    assert_eq!(lines_with(out.log("alpha"), "GOT-BETA="), sent_beta, "virtio-net transfer intact\n{dump}");
    assert_eq!(lines_with(out.log("alpha"), "GOT-GAMMA="), sent_gamma, "e1000 transfer intact\n{dump}");
}
