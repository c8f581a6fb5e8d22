//! Issues 5 and 4 end to end: a Debian guest with one NIC on the built-in user-mode NAT,
//! once with virtio-net and once with an e1000 as its only NIC. The guest gets a DHCP
//! lease, pings the gateway, resolves a name through the DNS relay, moves a file both
//! ways with busybox nc through 10.0.2.2 (checksums compared), fetches a page with wget
//! from a host HTTP server on loopback, and serves the host through a hostfwd.
//! The host side is tests/support/nat_host.py.

use std::time::Duration;

use tapir_tests::{repo_root, value_after as value, Scenario};

#[test]
fn virtio_net_guest_on_user_nat_reaches_the_host_and_is_reached() {
    guest_on_user_nat_reaches_the_host_and_is_reached("virtio-net", "virtio_net");
}

#[test]
fn e1000_guest_on_user_nat_reaches_the_host_and_is_reached() {
    let log = guest_on_user_nat_reaches_the_host_and_is_reached("e1000", "e1000");
    assert!(log.contains("E1000-PROBED"), "Linux's e1000 driver bound the device\n{log}");
    assert!(log.contains("E1000-LINK-UP"), "the e1000 reports its link up\n{log}");
}

/// Runs the scenario with one NIC of `model` and returns the guest's console log.
/// `driver` is the Linux driver that must bind it.
fn guest_on_user_nat_reaches_the_host_and_is_reached(model: &str, driver: &str) -> String {
    let mut s = Scenario::new(&format!("user-nat-{model}")).expect("scenario");
    let guest = r#"
DRIVER=$(basename $(readlink /sys/class/net/eth0/device/driver))
echo "DRIVER=$DRIVER"
ip link set eth0 up
dmesg | grep -q 'Intel(R) PRO/1000 Network Connection' && echo E1000-PROBED
udhcpc -i eth0 -n -q -t 10 -T 2 >/dev/null 2>&1
echo "LEASE=$(ip -4 -o addr show eth0 | awk '{print $4}')"
echo "ROUTE=$(ip route | grep default)"
ping -c1 -W5 10.0.2.2 >/dev/null && echo PING-GW-OK
ping -c1 -W5 10.0.2.3 >/dev/null && echo PING-DNS-OK
nslookup tapir.test 10.0.2.3 2>&1 | grep -q 10.1.2.3 && echo DNS-OK
if [ "$DRIVER" = e1000 ]; then
  i=0; until dmesg | grep -q 'NIC Link is Up'; do i=$((i+1)); [ $i -gt 5 ] && break; sleep 1; done
  dmesg | grep -q 'NIC Link is Up' && echo E1000-LINK-UP
fi
printf '#!/bin/sh\ncat > /tmp/down\n' > /tmp/recv.sh; chmod +x /tmp/recv.sh
nc 10.0.2.2 12345 -e /tmp/recv.sh
echo "DOWN=$(sha256sum < /tmp/down | cut -d' ' -f1) $(wc -c < /tmp/down)"
head -c 3145728 /dev/urandom > /tmp/up
echo "UP=$(sha256sum < /tmp/up | cut -d' ' -f1) $(wc -c < /tmp/up)"
nc 10.0.2.2 12346 < /tmp/up
wget -q -O /tmp/page http://10.0.2.2:8000/page.txt && echo "WGET=$(cat /tmp/page)"
printf '#!/bin/sh\necho GUEST-SERVICE-OK\n' > /tmp/svc.sh; chmod +x /tmp/svc.sh
nc -l -p 8080 -e /tmp/svc.sh
echo SERVED
exit 0
"#;
    let nics = format!(
        r#"[{{"model": "{model}", "backend": {{"type": "user", "dns_upstream": "127.0.0.1:5353",
                    "hostfwd": ["tcp:127.0.0.1:5555-:8080"]}}}}]"#
    );
    s.guest("nat", 1, &nics, guest).unwrap();
    let dir = s.dir().display().to_string();
    let helper = repo_root().join("tests/support/nat_host.py");
    let script = format!(
        r#"
cd '{dir}'
head -c 2097152 /dev/urandom > download.bin
echo "HOST-FILE=$(sha256sum < download.bin | cut -d' ' -f1) $(wc -c < download.bin)"
echo "hello through the NAT" > page.txt
python3 '{helper}' download.bin '{dir}' & H=$!
sleep 1
{tapir}
echo TAPIR-EXIT-nat=$?
sleep 1
echo "HOST-GOT=$(cat upload.sha)"
echo "HOSTFWD=$(cat hostfwd.txt)"
kill $H
"#,
        helper = helper.display(),
        tapir = s.tapir_command("nat", ""),
    );
    let out = s.run(&script, Duration::from_secs(300)).expect("runner");
    let dump = out.dump();
    out.outcome.assert_status(0);
    let log = out.log("nat");
    let host = &out.outcome.output;
    assert_eq!(value(log, "DRIVER="), Some(driver), "{dump}");
    assert_eq!(value(log, "LEASE="), Some("10.0.2.15/24"), "{dump}");
    assert!(value(log, "ROUTE=").is_some_and(|r| r.contains("10.0.2.2")), "{dump}");
    assert!(log.contains("PING-GW-OK") && log.contains("PING-DNS-OK"), "{dump}");
    assert!(log.contains("DNS-OK"), "DNS relay answered from the configured upstream\n{dump}");
    let host_file = value(host, "HOST-FILE=");
    assert!(host_file.is_some_and(|v| v.ends_with(" 2097152")), "{dump}");
    assert_eq!(value(log, "DOWN="), host_file, "download intact\n{dump}");
    let up = value(log, "UP=");
    assert!(up.is_some_and(|v| v.ends_with(" 3145728")), "{dump}");
    assert_eq!(value(host, "HOST-GOT="), up, "upload intact\n{dump}");
    assert_eq!(value(log, "WGET="), Some("hello through the NAT"), "{dump}");
    assert_eq!(value(host, "HOSTFWD="), Some("GUEST-SERVICE-OK"), "hostfwd into the guest\n{dump}");
    assert_eq!(out.exit_status("nat"), Some(1), "{dump}");
    log.to_string()
}
