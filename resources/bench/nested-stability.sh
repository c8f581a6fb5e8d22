#!/usr/bin/env bash
# Issue 11's measured comparison: the same two-guest 2 MiB transfer over a `stream`
# socket link, N times with tapir and N times with QEMU as the inner VMM, for the e1000
# and for virtio-net, in the e2e runner (the emulated nested-virt runner on hosts without
# hardware virtualization). Same kernel, same initramfs, same guest scripts, VMMs
# alternating, no retries.
#
#   resources/bench/nested-stability.sh N [e1000|virtio|both]
#
# Prints one line per run, one line per VMM and model (runs, transfers completed, guest
# triple faults, guest kernel crashes, stalls, hangs, outer-kernel crashes, outer-VM
# breakage), and last `nested failure rate tapir/qemu: e1000=… virtio=…`. Exits 1 when
# tapir fails more often than QEMU for a model.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
runs=${1:?usage: nested-stability.sh N [e1000|virtio|both]}
bash "$repo/resources/setup.sh"
cargo build --release -q -p tapir-tests --bin tapir-nested-stability --manifest-path "$repo/Cargo.toml"
target=${CARGO_TARGET_DIR:-$repo/target}
exec "$target/release/tapir-nested-stability" "$runs" "${2:-both}"
