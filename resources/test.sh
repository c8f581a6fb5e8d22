#!/usr/bin/env bash
# Runs every test: unit and device tests, backend tests on real taps and sockets,
# smoke tests on this host's /dev/kvm, and end-to-end tests that boot Debian guests
# (directly on hardware KVM, or inside the emulated nested-virt runner elsewhere).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/resources/setup.sh"
cd "$repo"
exec cargo test --release --workspace --no-fail-fast "$@"
