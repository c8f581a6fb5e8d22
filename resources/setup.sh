#!/usr/bin/env bash
# One-time set-up for building, running and testing tapir on a Debian/Ubuntu host:
# installs the Debian packages the tests and the nested-virt runner use (when run as
# root; otherwise says what to install), builds tapir, and builds the guest images.
# Safe to run again: every step skips what is already done.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
packages=(qemu-system-x86 busybox-static cpio xz-utils iproute2 iputils-ping python3 time)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "setup: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "setup: missing Debian packages: ${missing[*]}" >&2
        echo "setup: run 'sudo apt-get install ${missing[*]}' or run this script as root" >&2
        exit 1
    fi
fi

echo "setup: building tapir (release)"
cargo build --release -q -p tapir --manifest-path "$repo/Cargo.toml"
echo "setup: building guest images"
bash "$repo/resources/guest/build.sh"
