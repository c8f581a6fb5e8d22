#!/usr/bin/env bash
# User-mode NAT benchmark: tapir's NAT engine vs slirp4netns and pasta, in one run.
#
# Each engine is attached to a fresh network namespace (tapir through the
# tapir-nat-bench harness, which opens tapir's own tap backend inside it). From inside the
# namespace, iperf3 measures TCP throughput to an iperf3 server on the host's 127.0.0.1
# (reached through the namespace's gateway address, which every engine maps to host
# loopback) in both directions at MTU 1500 and 65520, and sockperf measures TCP
# ping-pong latency at MTU 1500.
#
# Needs root and the Debian packages slirp4netns, passt, iperf3, sockperf.
# Env: NAT_BENCH_SECONDS (default 5) per iperf3 run; NAT_BENCH_LAT_SECONDS (default 3)
# per sockperf round; NAT_BENCH_LAT_ROUNDS (default 3) interleaved latency rounds.
# Last line: "nat ratio tapir/best-peer: min=N.NN" over the four throughput cells.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
T=${NAT_BENCH_SECONDS:-5}
LAT_T=${NAT_BENCH_LAT_SECONDS:-3}
NS=tapirnat$$
IPERF_PORT=$((20000 + $$ % 10000))
SOCKPERF_PORT=$((IPERF_PORT + 1))
WORK=$(mktemp -d /tmp/tapir-nat-bench.XXXXXX)
ENGINE_PID=""
SERVER_PIDS=()

[ "$(id -u)" = 0 ] || { echo "nat.sh: needs root (network namespaces, taps)" >&2; exit 1; }
missing=()
for pkg in iproute2:ip iperf3:iperf3 sockperf:sockperf slirp4netns:slirp4netns passt:pasta python3:python3; do
    command -v "${pkg#*:}" >/dev/null || missing+=("${pkg%%:*}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "nat.sh: installing ${missing[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

(cd "$ROOT" && cargo build --release -q -p tapir-net --bin tapir-nat-bench)
BIN=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/tapir-nat-bench

stop_engine() {
    if [ -n "$ENGINE_PID" ]; then
        kill "$ENGINE_PID" 2>/dev/null || true
        wait "$ENGINE_PID" 2>/dev/null || true
        ENGINE_PID=""
    fi
    ip netns del "$NS" 2>/dev/null || true
}

cleanup() {
    stop_engine
    for p in "${SERVER_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

in_ns() { ip netns exec "$NS" "$@"; }

# Waits until the namespace has a default route; prints the gateway.
wait_gateway() {
    for _ in $(seq 1 100); do
        gw=$(in_ns ip -4 route show default 2>/dev/null | awk '/default/ {print $3; exit}')
        if [ -n "$gw" ]; then echo "$gw"; return 0; fi
        sleep 0.1
    done
    echo "nat.sh: namespace never got a default route" >&2
    return 1
}

start_engine() { # engine mtu
    local engine=$1 mtu=$2
    ip netns add "$NS"
    in_ns ip link set lo up
    case $engine in
    tapir)
        "$BIN" --netns "/run/netns/$NS" --tap tap0 --mtu "$mtu" 2>"$WORK/tapir.log" &
        ENGINE_PID=$!
        for _ in $(seq 1 100); do in_ns ip link show tap0 >/dev/null 2>&1 && break; sleep 0.05; done
        # What a DHCP client would configure from tapir's lease.
        in_ns ip link set tap0 mtu "$mtu" up
        in_ns ip addr add 10.0.2.15/24 dev tap0
        in_ns ip route add default via 10.0.2.2
        ;;
    slirp4netns)
        slirp4netns --configure --mtu="$mtu" --netns-type=path "/run/netns/$NS" tap0 \
            >"$WORK/slirp.log" 2>&1 &
        ENGINE_PID=$!
        ;;
    pasta)
        pasta --runas 0 --config-net -m "$mtu" -t none -u none -T none -U none \
            --netns "/run/netns/$NS" --netns-only -f >"$WORK/pasta.log" 2>&1 &
        ENGINE_PID=$!
        ;;
    esac
    GW=$(wait_gateway)
}

iperf_gbps() { # extra iperf3 args...
    in_ns timeout $((T + 20)) iperf3 -c "$GW" -p "$IPERF_PORT" -t "$T" -J "$@" >"$WORK/iperf.json" 2>/dev/null || true
    python3 - "$WORK/iperf.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
    print("%.2f" % (d["end"]["sum_received"]["bits_per_second"] / 1e9))
except Exception:
    print("0.00")
PY
}

sockperf_p50() {
    in_ns timeout $((T + 20)) sockperf ping-pong --tcp -i "$GW" -p "$SOCKPERF_PORT" -t "$LAT_T" \
        >"$WORK/sockperf.txt" 2>&1 || true
    awk '/percentile 50.000/ {print $NF; found=1} END {if (!found) print "nan"}' "$WORK/sockperf.txt"
}

iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT" >/dev/null 2>&1 &
SERVER_PIDS+=($!)
sockperf server --tcp -i 127.0.0.1 -p "$SOCKPERF_PORT" >/dev/null 2>&1 &
SERVER_PIDS+=($!)
sleep 0.5

declare -A RES LAT LATMED
printf '%-12s %-10s %6s %10s\n' engine direction mtu Gbps
for mtu in 1500 65520; do
    for engine in tapir slirp4netns pasta; do
        start_engine "$engine" "$mtu"
        up=$(iperf_gbps)
        down=$(iperf_gbps -R)
        RES[$engine,up,$mtu]=$up
        RES[$engine,down,$mtu]=$down
        printf '%-12s %-10s %6s %10s\n' "$engine" "ns->host" "$mtu" "$up"
        printf '%-12s %-10s %6s %10s\n' "$engine" "host->ns" "$mtu" "$down"
        stop_engine
    done
done
# Latency is measured in interleaved rounds (median of the rounds' p50s), so a burst of
# load from elsewhere on the machine hits every engine alike.
ROUNDS=${NAT_BENCH_LAT_ROUNDS:-3}
for round in $(seq 1 "$ROUNDS"); do
    for engine in tapir slirp4netns pasta; do
        start_engine "$engine" 1500
        LAT[$engine]="${LAT[$engine]:-} $(sockperf_p50)"
        stop_engine
    done
done
for engine in tapir slirp4netns pasta; do
    med=$(echo "${LAT[$engine]}" | tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    LATMED[$engine]=$med
    printf '%-12s latency tcp ping-pong p50 mtu 1500: %s usec (rounds:%s)\n' "$engine" "$med" "${LAT[$engine]}"
done
if [ -s "$WORK/tapir.log" ]; then
    echo "tapir engine log (last run):"
    sed 's/^/  /' "$WORK/tapir.log"
fi

python3 - <<PY
cells = [("up", 1500), ("down", 1500), ("up", 65520), ("down", 65520)]
res = {
$(for k in "${!RES[@]}"; do echo "    \"$k\": ${RES[$k]},"; done)
}
ratios = []
for d, m in cells:
    t = res["tapir,%s,%d" % (d, m)]
    best = max(res["slirp4netns,%s,%d" % (d, m)], res["pasta,%s,%d" % (d, m)])
    r = t / best if best > 0 else float("inf")
    ratios.append(r)
    print("ratio %-4s mtu %5d: tapir %.2f / best peer %.2f = %.2f" % (d, m, t, best, r))
lat = {"tapir": float("${LATMED[tapir]}"), "slirp4netns": float("${LATMED[slirp4netns]}"), "pasta": float("${LATMED[pasta]}")}
best_lat = min(lat["slirp4netns"], lat["pasta"])
print("latency p50 tapir %.3f usec vs best peer %.3f usec: %s" % (lat["tapir"], best_lat, "ok" if lat["tapir"] <= best_lat else "WORSE by %.1f%%" % (100 * (lat["tapir"] / best_lat - 1))))
print("nat ratio tapir/best-peer: min=%.2f" % min(ratios))
PY
