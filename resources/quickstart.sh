#!/usr/bin/env bash
# Boots tapir's default guest (resources/examples/default.json: a Debian kernel and a
# busybox initramfs with one virtio-net NIC on the built-in user-mode NAT).
#
#   resources/quickstart.sh                 interactive shell on the guest console
#   resources/quickstart.sh --run 'CMD'     run CMD in the guest, exit with its status
#
# On a host whose /dev/kvm cannot boot Linux (software KVM, or none), the guest runs
# inside the emulated nested-virt runner, with a scripted demo instead of a shell.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
command=""
if [ "${1:-}" = "--run" ]; then
    command=${2:?"--run needs a command"}
fi

bash "$repo/resources/setup.sh"
tapir="$repo/target/release/tapir"
config="$repo/resources/examples/default.json"

hardware_kvm() {
    { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; } && [ -w /dev/kvm ]
}

to_guest_status() {
    # tapir exits (rc << 1) | 1 when the guest reports rc through the debug-exit port.
    local s=$1
    if [ $((s & 1)) -eq 1 ]; then echo $((s >> 1)); else echo "$s"; fi
}

if hardware_kvm && [ "${TAPIR_RUNNER:-}" != nested ]; then
    if [ -z "$command" ]; then
        echo "quickstart: booting $config (Ctrl-A x quits; try 'udhcpc -i eth0' then 'ping 10.0.2.2')"
        exec "$tapir" --config "$config"
    fi
    set +e
    "$tapir" --config "$config" --append "tapir.debug_exit tapir.run=$(printf '%s' "$command" | base64 -w0)"
    exit "$(to_guest_status $?)"
fi

echo "quickstart: this host's /dev/kvm cannot boot Linux; running the guest inside the emulated nested-virt runner (about a minute)"
if [ -z "$command" ]; then
    command='udhcpc -i eth0 -n -q -t 10 -T 2 >/dev/null 2>&1; ip -4 addr show eth0; ip route;
ping -c 2 10.0.2.2 && echo "gateway answers";
wget -q -O - http://10.0.2.2:8000/hello.txt'
fi
mkdir -p "$repo/target/runner/quickstart"
echo "hello from the host, fetched through tapir's user-mode NAT" > "$repo/target/runner/quickstart/hello.txt"
script="$repo/target/runner/quickstart/run.sh"
cat > "$script" <<SCRIPT
#!/bin/bash
cd '$repo/target/runner/quickstart'
python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &
server=\$!
sleep 1
'$tapir' --config '$config' --append "tapir.debug_exit tapir.run=$(printf '%s' "$command" | base64 -w0)"
status=\$?
kill \$server
exit \$status
SCRIPT
cargo build --release -q -p tapir-tests --bin tapir-runner --manifest-path "$repo/Cargo.toml"
set +e
"$repo/target/release/tapir-runner" "$script" 600
exit "$(to_guest_status $?)"
