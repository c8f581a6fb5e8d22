//! Issues 3 and 4 end to end: pairs of Debian guests on taps that tapir creates and
//! enslaves to one bridge, inside a network namespace the test creates, with no MACs
//! configured. Each pair is its own scenario, so a run has two guests at once.
//!
//! - virtio-net pair (issue 3): two guests with virtio-net on the bridge.
//! - e1000 pair (issue 4): a guest whose only NIC is an e1000 on the bridge, and a guest
//!   with an e1000 on the bridge plus a virtio-net on the user-mode NAT (two models in one
//!   guest, distinct MACs, a DHCP lease through the second NIC).
//!
//! In each pair the guests ping each other, the sender moves 2 MB to the receiver with
//! busybox nc (checksums compared), both ping the bridge's host-side address, and the
//! host pings both. Every MAC is derived, locally administered, distinct, and the one
//! tapir's startup log names.

use std::collections::BTreeSet;
use std::time::Duration;

use tapir_tests::{value_after, values_after as lines_with, Scenario, ScenarioOutcome};

const NETNS: &str = "tapir-e2e-bridge";
const BRIDGE_HOST: &str = "10.10.0.1";
const PAYLOAD_BYTES: usize = 2 * 1024 * 1024;

/// Empty when the line is missing, so the assertions that follow name what was expected.
fn value<'a>(log: &'a str, prefix: &str) -> &'a str {
    value_after(log, prefix).unwrap_or_default()
}

/// Brings the bridge NIC (nics[0], which tapir puts at PCI 00:01.0; Linux may name it
/// eth1 when another driver loads first) up with address `$ME`, prints its MAC and
/// driver, and pings the bridge's host side and then `$PEER`.
const BRIDGE_NIC: &str = r#"
set -u
# The interface of the PCI function 00:0N.0 (virtio-net's sits one level down, on virtioM).
nic_at() {
  for n in /sys/class/net/*; do
    case "$(readlink -f $n/device)" in */0000:00:0$1.0|*/0000:00:0$1.0/*) basename $n; return ;; esac
  done
}
BR=$(nic_at 1)
ip link set "$BR" up
ip addr add "$ME/24" dev "$BR"
echo "MAC=$(cat /sys/class/net/$BR/address)"
echo "DRIVER=$(basename $(readlink /sys/class/net/$BR/device/driver))"
# The guests boot one after the other, so the first may wait a whole boot for its peer.
wait_for() { i=0; until ping -c1 -W1 "$1" >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 240 ] && return 1; sleep 1; done; }
wait_for 10.10.0.1 && ping -c2 10.10.0.1 >/dev/null && echo PING-HOST-OK
wait_for "$PEER" && ping -c2 "$PEER" >/dev/null && echo PING-PEER-OK
dmesg | grep -q 'NIC Link is Up' && echo E1000-LINK-UP"#;

fn receiver(me: &str, peer: &str, extra: &str) -> String {
    format!(
        r#"ME={me}
PEER={peer}
{BRIDGE_NIC}
{extra}
printf '#!/bin/sh\ncat > /tmp/received\n' > /tmp/receive.sh
chmod +x /tmp/receive.sh
timeout 300 nc -l -p 5000 -e /tmp/receive.sh
echo "GOT=$(sha256sum < /tmp/received | cut -d' ' -f1) $(wc -c < /tmp/received)"
exit 0
"#
    )
}

fn sender(me: &str, peer: &str) -> String {
    format!(
        r#"ME={me}
PEER={peer}
{BRIDGE_NIC}
head -c {PAYLOAD_BYTES} /dev/urandom > /tmp/payload
echo "SENT=$(sha256sum < /tmp/payload | cut -d' ' -f1) $(wc -c < /tmp/payload)"
i=0
until nc {peer} 5000 < /tmp/payload 2>/dev/null; do i=$((i+1)); [ $i -gt 120 ] && exit 3; sleep 1; done
echo SEND-DONE
exit 0
"#
    )
}

/// Runs the two guests (each given as name, IPv4 address on the bridge, and NICs JSON)
/// on one bridge, the second started once the first's init runs; the host pings both
/// while they run.
fn run_pair(scenario: &mut Scenario, guests: [(&str, &str, String, String); 2]) -> ScenarioOutcome {
    let mut start = String::new();
    let mut wait = String::new();
    let mut probe = String::new();
    for (i, (vm, ip, nics, script)) in guests.iter().enumerate() {
        scenario.guest(vm, 1, nics, script).expect("guest");
        start.push_str(&format!("ip netns exec {NETNS} {} & P{i}=$!\n", scenario.tapir_command(vm, "")));
        if i + 1 < guests.len() {
            start.push_str(&scenario.wait_until_ready(vm, &format!("P{i}"), 240));
        }
        wait.push_str(&Scenario::record_exit(vm, &format!("P{i}")));
        // One prober per guest, so a guest that finishes early is not missed.
        probe.push_str(&format!(
            "( i=0; until ip netns exec {NETNS} ping -c1 -W1 {ip} >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 300 ] && exit 1; sleep 0.5; done\n  echo HOST-PINGED-{ip} ) &\n"
        ));
    }
    let script = format!(
        r#"
ip netns del {NETNS} 2>/dev/null
ip netns add {NETNS}
trap 'ip netns del {NETNS}' EXIT
ip -n {NETNS} link set lo up
ip -n {NETNS} link add br0 type bridge
ip -n {NETNS} addr add {BRIDGE_HOST}/24 dev br0
ip -n {NETNS} link set br0 up
{start}{probe}
# Both taps enslaved, up and with carrier at some point while the guests run.
( i=0; until [ "$(ip -n {NETNS} -o link show master br0 | grep -c 'UP,LOWER_UP')" = 2 ]; do i=$((i+1)); [ $i -gt 300 ] && exit 1; sleep 1; done
  echo BRIDGE-PORTS-UP=2 ) &
{wait}
"#
    );
    let out = scenario.run(&script, Duration::from_secs(360)).expect("runner");
    let dump = out.dump();
    out.outcome.assert_status(0);
    assert!(out.outcome.output.contains("BRIDGE-PORTS-UP=2"), "both taps are attached and up\n{dump}");
    for (vm, ip, _, _) in &guests {
        assert_eq!(out.exit_status(vm), Some(1), "{vm} exits 0 through debug-exit\n{dump}");
        let log = out.log(vm);
        assert!(log.contains("PING-HOST-OK"), "{vm} pings the bridge address\n{dump}");
        assert!(log.contains("PING-PEER-OK"), "{vm} pings the other guest\n{dump}");
        assert!(out.outcome.output.contains(&format!("HOST-PINGED-{ip}")), "host pings {vm}\n{dump}");
    }
    out
}

/// The MAC a guest saw on `ethN` for each key, checked against tapir's startup log line
/// for that NIC, locally administered unicast, none QEMU's default, and all distinct.
fn assert_distinct_derived_macs(out: &ScenarioOutcome, nics: &[(&str, &str, usize)]) {
    let dump = out.dump();
    let mut macs = BTreeSet::new();
    for (vm, key, index) in nics {
        let log = out.log(vm);
        let mac = value(log, key);
        let first = u8::from_str_radix(mac.get(0..2).unwrap_or("zz"), 16).unwrap_or(1);
        assert_eq!(first & 0b11, 0b10, "{vm} {key}{mac} is locally administered unicast\n{dump}");
        assert_ne!(mac, "52:54:00:12:34:56", "{dump}");
        let startup = lines_with(log, &format!("tapir: info: nics[{index}]: "));
        assert!(
            startup.first().is_some_and(|line| line.contains(&format!(" mac {mac} "))),
            "{vm}'s startup log names the MAC its guest sees ({mac})\n{dump}"
        );
        assert!(macs.insert(mac.to_string()), "{vm} {key}{mac} collides\n{dump}");
    }
}

fn assert_transfer_intact(out: &ScenarioOutcome, sender: &str, receiver: &str) {
    let dump = out.dump();
    let sent = value(out.log(sender), "SENT=");
    assert!(sent.ends_with(&format!(" {PAYLOAD_BYTES}")), "{sender} made its payload\n{dump}");
    assert_eq!(value(out.log(receiver), "GOT="), sent, "{sender} -> {receiver} arrived intact\n{dump}");
}

#[test]
fn virtio_net_guests_on_a_bridge_ping_and_transfer_intact() {
    let mut s = Scenario::new("bridge-virtio").expect("scenario");
    let nics = r#"[{"model": "virtio-net", "backend": {"type": "tap", "bridge": "br0"}}]"#.to_string();
    let out = run_pair(
        &mut s,
        [
            ("alpha", "10.10.0.2", nics.clone(), receiver("10.10.0.2", "10.10.0.3", "")),
            ("beta", "10.10.0.3", nics, sender("10.10.0.3", "10.10.0.2")),
        ],
    );
    let dump = out.dump();
    for vm in ["alpha", "beta"] {
        assert_eq!(lines_with(out.log(vm), "DRIVER="), vec!["virtio_net"], "{dump}");
    }
    assert_distinct_derived_macs(&out, &[("alpha", "MAC=", 0), ("beta", "MAC=", 0)]);
    assert_transfer_intact(&out, "beta", "alpha");
}

#[test]
fn e1000_guests_on_a_bridge_ping_and_transfer_intact() {
    let mut s = Scenario::new("bridge-e1000").expect("scenario");
    let e1000_only = r#"[{"model": "e1000", "backend": {"type": "tap", "bridge": "br0"}}]"#.to_string();
    let both_models = r#"[{"model": "e1000", "backend": {"type": "tap", "bridge": "br0"}},
                          {"model": "virtio-net", "backend": {"type": "user"}}]"#
        .to_string();
    let second_nic = r#"
SECOND=$(nic_at 2)
ip link set "$SECOND" up
echo "MAC1=$(cat /sys/class/net/$SECOND/address)"
echo "DRIVER1=$(basename $(readlink /sys/class/net/$SECOND/device/driver))"
udhcpc -i "$SECOND" -n -q -t 10 -T 2 >/dev/null 2>&1 && echo "LEASE1=$(ip -4 -o addr show "$SECOND" | awk '{print $4}')"
"#;
    let out = run_pair(
        &mut s,
        [
            ("gamma", "10.10.0.4", e1000_only, sender("10.10.0.4", "10.10.0.5")),
            ("delta", "10.10.0.5", both_models, receiver("10.10.0.5", "10.10.0.4", second_nic)),
        ],
    );
    let dump = out.dump();
    for vm in ["gamma", "delta"] {
        assert_eq!(lines_with(out.log(vm), "DRIVER="), vec!["e1000"], "{dump}");
        assert!(out.log(vm).contains("E1000-LINK-UP"), "{vm}'s e1000 reports its link up\n{dump}");
    }
    assert_eq!(lines_with(out.log("delta"), "DRIVER1="), vec!["virtio_net"], "{dump}");
    assert_eq!(lines_with(out.log("delta"), "LEASE1="), vec!["10.0.2.15/24"], "DHCP on the second NIC\n{dump}");
    assert_distinct_derived_macs(&out, &[("gamma", "MAC=", 0), ("delta", "MAC=", 0), ("delta", "MAC1=", 1)]);
    assert_transfer_intact(&out, "gamma", "delta");
}
