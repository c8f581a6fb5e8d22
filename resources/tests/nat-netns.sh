#!/usr/bin/env bash
# End-to-end check of tapir's user-mode NAT with a real Linux network stack as the
# "guest": a network namespace whose tap is served by tapir-nat-bench. Exercises the
# issue's typical use with busybox: udhcpc gets 10.0.2.15, ping 10.0.2.2 answers, a file
# crosses with nc in both directions (host listener via 10.0.2.2, and a hostfwd into the
# namespace), and a DNS query reaches a local responder through 10.0.2.3.
# Needs root and busybox. Traffic stays on loopback and inside the namespace.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
NS=tapirnate2e$$
WORK=$(mktemp -d /tmp/tapir-nat-e2e.XXXXXX)
PIDS=()
FWD_PORT=$((30000 + $$ % 10000))
HOST_PORT=$((FWD_PORT + 1))
DNS_PORT=$((FWD_PORT + 2))
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; exit 1; }

(cd "$ROOT" && cargo build -q -p tapir-net --bin tapir-nat-bench)
BIN=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/tapir-nat-bench

# A DNS responder on host loopback that answers every query with its own bytes + QR set.
python3 - "$DNS_PORT" >"$WORK/dns.log" 2>&1 <<'PY' &
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    q, a = s.recvfrom(512)
    # Answer: same header with QR, RA, ANCOUNT=1; the question; one A record 10.9.8.7.
    hdr = q[:2] + b"\x81\x80" + q[4:6] + b"\x00\x01\x00\x00\x00\x00"
    ans = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x0a\x09\x08\x07"
    s.sendto(hdr + q[12:] + ans, a)
PY
PIDS+=($!)

ip netns add "$NS"
ip netns exec "$NS" ip link set lo up
"$BIN" --netns "/run/netns/$NS" --tap tap0 --mtu 1500 --dns-upstream "127.0.0.1:$DNS_PORT" \
    --hostfwd "tcp:127.0.0.1:$FWD_PORT-:23" 2>"$WORK/nat.log" &
PIDS+=($!)
for _ in $(seq 1 100); do ip netns exec "$NS" ip link show tap0 >/dev/null 2>&1 && break; sleep 0.05; done
ip netns exec "$NS" ip link set tap0 up

cat >"$WORK/udhcpc.sh" <<'SH'
#!/bin/sh
case "$1" in
bound|renew)
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route add default via "$router"
    echo "$ip $router $dns $mtu" > "$LEASE_FILE"
    ;;
esac
SH
chmod +x "$WORK/udhcpc.sh"
LEASE_FILE="$WORK/lease" ip netns exec "$NS" busybox udhcpc -i tap0 -n -q -t 5 -s "$WORK/udhcpc.sh" >/dev/null 2>&1 ||
    fail "udhcpc got no lease"
read -r ip router dns _ <"$WORK/lease"
[ "$ip" = 10.0.2.15 ] && [ "$router" = 10.0.2.2 ] && [ "$dns" = 10.0.2.3 ] || fail "lease $ip $router $dns"
echo "ok: DHCP lease $ip router $router dns $dns"

ip netns exec "$NS" busybox ping -c 2 -W 2 10.0.2.2 >/dev/null || fail "ping 10.0.2.2"
echo "ok: ping 10.0.2.2"

head -c 3000000 /dev/urandom >"$WORK/file"
python3 - "$HOST_PORT" "$WORK/file" <<'PY' &
import socket, sys
l = socket.socket()
l.bind(("127.0.0.1", int(sys.argv[1])))
l.listen(1)
c, _ = l.accept()
c.sendall(open(sys.argv[2], "rb").read())
c.close()
PY
PIDS+=($!)
sleep 0.3
ip netns exec "$NS" timeout 20 busybox nc 10.0.2.2 "$HOST_PORT" >"$WORK/got" </dev/null || true
cmp -s "$WORK/file" "$WORK/got" || fail "host -> guest file transfer ($(stat -c %s "$WORK/got") bytes)"
echo "ok: 3 MB host -> guest via nc 10.0.2.2"

ip netns exec "$NS" busybox nc -l -p 23 >"$WORK/got2" &
PIDS+=($!)
sleep 0.3
python3 - "$FWD_PORT" "$WORK/file" <<'PY' || true
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
c.sendall(open(sys.argv[2], "rb").read())
c.shutdown(socket.SHUT_WR)
c.settimeout(20)
while c.recv(4096):
    pass
PY
sleep 0.5
cmp -s "$WORK/file" "$WORK/got2" || fail "hostfwd transfer ($(stat -c %s "$WORK/got2") bytes)"
echo "ok: 3 MB host -> guest via hostfwd tcp::$FWD_PORT-:23"

out=$(ip netns exec "$NS" busybox nslookup tapir.test 10.0.2.3 2>&1 || true)
echo "$out" | grep -q "10.9.8.7" || fail "DNS via 10.0.2.3: $out"
echo "ok: DNS query relayed through 10.0.2.3"
echo "nat-netns: 5 passed, 0 failed"
