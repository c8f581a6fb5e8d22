#!/usr/bin/env bash
# Boot benchmark: exec -> guest exit for a tiny PVH guest that writes to port 0xf4, under
# tapir and under QEMU microvm, alternating, on this host's /dev/kvm. Prints the median
# wall time and peak RSS of each, and the ratio tapir/qemu as the last line.
#
#   resources/bench/boot.sh [RUNS]      (default 20 runs each; at least 10)
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
runs=${1:-20}
if [ "$runs" -lt 10 ]; then runs=10; fi

[ -x /usr/bin/time ] || { echo "boot.sh: GNU time is missing (apt-get install time)" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "boot.sh: qemu-system-x86_64 is missing (apt-get install qemu-system-x86)" >&2; exit 2; }
[ -r /dev/kvm ] || { echo "boot.sh: /dev/kvm is not accessible" >&2; exit 2; }

cargo build --release -q -p tapir --manifest-path "$repo/Cargo.toml"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 "$repo/resources/guest/tiny-pvh.py" "$work/tiny.elf" --exit-value 0x2a

TAPIR="$repo/target/release/tapir" GUEST="$work/tiny.elf" RUNS="$runs" python3 - <<'EOF'
import os, statistics, subprocess, time

guest, runs = os.environ["GUEST"], int(os.environ["RUNS"])
# Same guest, same memory, same exit device; the expected status is (0x2a << 1) | 1.
commands = {
    "tapir": [os.environ["TAPIR"], "--kernel", guest, "--memory", "128", "--debug-exit"],
    "qemu": ["qemu-system-x86_64", "-machine", "microvm", "-accel", "kvm", "-m", "128",
             "-nodefaults", "-no-user-config", "-display", "none",
             "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", guest],
}
expected = (0x2a << 1) | 1
results = {name: ([], []) for name in commands}

rss_file = os.path.join(os.path.dirname(guest), "rss")

def run(argv):
    # GNU time reports the peak RSS of the measured program alone; our own rusage would
    # also count the Python interpreter the child was forked from.
    start = time.perf_counter()
    code = subprocess.call(["/usr/bin/time", "-f", "%M", "-o", rss_file] + argv,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    if code != expected:
        raise SystemExit(f"boot.sh: {argv[0]} exited {code}, expected {expected}")
    with open(rss_file) as f:
        rss_kib = float(f.read().split()[-1])
    return wall, rss_kib / 1024.0

for name, argv in commands.items():  # warm the page cache once
    run(argv)
for _ in range(runs):
    for name, argv in commands.items():
        wall, rss = run(argv)
        results[name][0].append(wall)
        results[name][1].append(rss)

med = {name: (statistics.median(w), statistics.median(r)) for name, (w, r) in results.items()}
for name, (wall, rss) in med.items():
    print(f"{name:6s} runs={runs} median wall={wall * 1000:.1f} ms  median peak RSS={rss:.1f} MiB")
print(f"boot ratio tapir/qemu: wall={med['tapir'][0] / med['qemu'][0]:.2f} rss={med['tapir'][1] / med['qemu'][1]:.2f}")
EOF
