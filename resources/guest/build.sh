#!/bin/bash
# Builds the Linux guest images tapir's end-to-end tests boot, from Debian packages only.
#
# Output directory: $TAPIR_GUEST_DIR, or <repo>/target/guest.
#   vmlinuz                   Debian's bzImage (linux-image-amd64)
#   vmlinux                   the ELF kernel extracted from that bzImage
#   modules/                  the kernel modules both initramfs images use (uncompressed .ko)
#   guest-initramfs.cpio.gz   the guest tapir boots (init contract: guest-init)
#   outer-initramfs.cpio.gz   the outer QEMU TCG VM of the nested runner (outer-init)
#   kernel-release            the kernel's uname -r
#
# Idempotent and cached: nothing is rebuilt while every output is newer than this script
# and the files it installs (SOURCES), and downloaded .deb files are kept under debs/. `--force` rebuilds.
# Concurrent invocations serialize on a lock in the output directory.
# Needs: apt-get, dpkg-deb, cpio, gzip, xz, readelf (binutils), flock, mknod (root).
set -euo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
SRC_DIR=$(dirname "$SCRIPT")
REPO=$(cd "$SRC_DIR/../.." && pwd)
OUT=${TAPIR_GUEST_DIR:-$REPO/target/guest}

# Modules for the guest, in load order; dependencies missing from a list are added
# in front of their user.
GUEST_MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
    failover net_failover virtio_net e1000"
OUTER_MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
    irqbypass ccp kvm kvm_amd
    9pnet 9pnet_virtio netfs fscache 9p
    tun llc stp bridge veth"
# iperf3 for throughput tests; its shared libraries come from these packages.
IPERF_PACKAGES="iperf3 libiperf0 libc6 libssl3 libsctp1"

SOURCES="build.sh guest-init outer-init udhcpc-default.script"
OUTPUTS="vmlinuz vmlinux kernel-release modules/modules.order guest-initramfs.cpio.gz
    outer-initramfs.cpio.gz"

log() { echo "build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

up_to_date() {
    local output source
    for output in $OUTPUTS; do
        [[ -e $OUT/$output ]] || return 1
        for source in $SOURCES; do
            [[ $OUT/$output -nt $SRC_DIR/$source ]] || return 1
        done
    done
}

if [[ ${1:-} != --force ]] && up_to_date; then
    log "up to date: $OUT"
    exit 0
fi

DEBS=$OUT/debs
WORK=$OUT/work
rm -rf "$WORK"
mkdir -p "$DEBS" "$WORK"
trap 'rm -rf "$WORK"' EXIT

# apt-get download into $DEBS unless a deb of that package is already there.
fetch() {
    local package missing=()
    for package in "$@"; do
        compgen -G "$DEBS/${package}_*.deb" >/dev/null || missing+=("$package")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "downloading ${missing[*]}"
    if ! (cd "$DEBS" && apt-get download "${missing[@]}" >/dev/null 2>&1); then
        log "apt-get download failed; running apt-get update and retrying"
        apt-get update >/dev/null
        (cd "$DEBS" && apt-get download "${missing[@]}" >/dev/null) || die "cannot download ${missing[*]}"
    fi
}

# The deb of one package, exactly one.
deb_of() {
    local debs=("$DEBS/${1}"_*.deb)
    [[ ${#debs[@]} -eq 1 && -f ${debs[0]} ]] || die "expected one deb for $1 in $DEBS, found ${debs[*]}"
    echo "${debs[0]}"
}

# linux-image-amd64 is a metapackage; the kernel is in the package it depends on.
kernel_package() {
    local cached
    cached=$(compgen -G "$DEBS/linux-image-[0-9]*-amd64_*.deb" | head -n1 || true)
    if [[ -n $cached ]]; then
        basename "$cached" | cut -d_ -f1
        return
    fi
    fetch linux-image-amd64
    dpkg-deb -f "$(deb_of linux-image-amd64)" Depends | tr ',' '\n' |
        sed -n 's/^ *\(linux-image-[0-9][^ ]*-amd64\).*/\1/p' | head -n1
}

KERNEL_PKG=$(kernel_package)
[[ -n $KERNEL_PKG ]] || die "cannot tell which kernel package linux-image-amd64 depends on"
fetch "$KERNEL_PKG" busybox-static $IPERF_PACKAGES

log "unpacking $KERNEL_PKG"
KROOT=$WORK/kernel
mkdir -p "$KROOT"
dpkg-deb -x "$(deb_of "$KERNEL_PKG")" "$KROOT"
VMLINUZ=$(compgen -G "$KROOT/boot/vmlinuz-*" | head -n1) || die "no vmlinuz in $KERNEL_PKG"
KVER=${VMLINUZ##*/vmlinuz-}
KMODS=$KROOT/lib/modules/$KVER
[[ -d $KMODS ]] || die "no /lib/modules/$KVER in $KERNEL_PKG"

# vmlinux: the bzImage payload is an xz stream; the first xz magic that decompresses to
# an ELF file is it. --single-stream ignores the bzImage bytes that follow the stream.
extract_vmlinux() {
    local offset
    for offset in $(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$VMLINUZ" | cut -d: -f1); do
        # Process substitution, not a pipe: tail dies of SIGPIPE once xz stops reading.
        if xz -dc --single-stream < <(tail -c +$((offset + 1)) "$VMLINUZ") >"$WORK/vmlinux" 2>/dev/null &&
            [[ $(head -c 4 "$WORK/vmlinux" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; then
            return 0
        fi
    done
    die "no xz-compressed ELF found in $VMLINUZ"
}
log "extracting vmlinux"
extract_vmlinux

# Module dependencies, read from each .ko's .modinfo "depends=" (no kmod needed).
declare -A MODULE_PATH
while IFS= read -r ko; do
    name=$(basename "$ko" .ko)
    MODULE_PATH[${name//-/_}]=$ko
done < <(find "$KMODS/kernel" -name '*.ko')

module_depends() {
    tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '
}

# Appends $1 and, first, its dependencies to the global ORDER (no duplicates).
ORDER=()
add_module() {
    local name=${1//-/_} dep present
    [[ -n ${MODULE_PATH[$name]:-} ]] || die "module $1 is not in $KERNEL_PKG"
    for present in "${ORDER[@]}"; do [[ $present == "$name" ]] && return 0; done
    for dep in $(module_depends "${MODULE_PATH[$name]}"); do
        add_module "$dep"
    done
    ORDER+=("$name")
}

module_order() {
    local module
    ORDER=()
    for module in $1; do add_module "$module"; done
    echo "${ORDER[@]}"
}

GUEST_ORDER=$(module_order "$GUEST_MODULES")
OUTER_ORDER=$(module_order "$OUTER_MODULES")

# modules/: the .ko files both images use, under their path in the kernel tree.
mkdir -p "$WORK/modules"
for name in $GUEST_ORDER $OUTER_ORDER; do
    relative=${MODULE_PATH[$name]#$KMODS/}
    mkdir -p "$WORK/modules/$(dirname "$relative")"
    cp -f "${MODULE_PATH[$name]}" "$WORK/modules/$relative"
done
printf '%s\n' $GUEST_ORDER $OUTER_ORDER | awk '!seen[$0]++' >"$WORK/modules/modules.order"

BUSYBOX_ROOT=$WORK/busybox
dpkg-deb -x "$(deb_of busybox-static)" "$BUSYBOX_ROOT"
BUSYBOX=$BUSYBOX_ROOT/bin/busybox
[[ -x $BUSYBOX ]] || die "no /bin/busybox in busybox-static"

# A root with busybox, its applet links, /dev/console and the given modules.
make_root() {
    local root=$1 modules=$2 applet name
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/tapir,lib/modules,proc,sys,dev,tmp,run,root}
    cp "$BUSYBOX" "$root/bin/busybox"
    for applet in $("$BUSYBOX" --list-full); do
        # --list-full contains busybox itself; a link over the binary breaks every applet.
        [[ ${applet##*/} == busybox ]] && continue
        [[ -e $root/$applet ]] || ln -s /bin/busybox "$root/$applet"
    done
    # The kernel opens /dev/console for init before init can mount devtmpfs.
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3
    for name in $modules; do
        cp "${MODULE_PATH[$name]}" "$root/lib/modules/$name.ko"
        echo "$name" >>"$root/etc/tapir/modules"
    done
    echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
    echo "root:x:0:" >"$root/etc/group"
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost\n' >"$root/etc/hosts"
    chmod 1777 "$root/tmp"
}

pack() {
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -6 -n >"$2"
}

# iperf3 and the shared libraries it needs (by DT_NEEDED, recursively), into $1.
install_iperf3() {
    local root=$1 pkgroot=$WORK/iperf3 package needed lib found queue done_libs=" "
    for package in $IPERF_PACKAGES; do
        dpkg-deb -x "$(deb_of "$package")" "$pkgroot"
    done
    install -D -m 755 "$pkgroot/usr/bin/iperf3" "$root/usr/bin/iperf3"
    mkdir -p "$root/lib/x86_64-linux-gnu" "$root/lib64"
    queue=$(readelf -d "$pkgroot/usr/bin/iperf3" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
    while [[ -n $queue ]]; do
        set -- $queue
        lib=$1
        shift
        queue="$*"
        [[ $done_libs == *" $lib "* ]] && continue
        done_libs+="$lib "
        found=$(find "$pkgroot/lib" "$pkgroot/usr/lib" -name "$lib" \( -type f -o -type l \) | head -n1)
        [[ -n $found ]] || die "iperf3 needs $lib, which none of $IPERF_PACKAGES has"
        cp -L "$found" "$root/lib/x86_64-linux-gnu/$lib"
        for needed in $(readelf -d "$found" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
            queue+=" $needed"
        done
    done
    cp -L "$pkgroot/lib64/ld-linux-x86-64.so.2" "$root/lib64/ld-linux-x86-64.so.2"
}

log "building guest-initramfs.cpio.gz"
GUEST_ROOT=$WORK/guest-root
make_root "$GUEST_ROOT" "$GUEST_ORDER"
install -m 755 "$SRC_DIR/guest-init" "$GUEST_ROOT/init"
install -D -m 755 "$SRC_DIR/udhcpc-default.script" "$GUEST_ROOT/etc/udhcpc/default.script"
install_iperf3 "$GUEST_ROOT"
pack "$GUEST_ROOT" "$WORK/guest-initramfs.cpio.gz"

log "building outer-initramfs.cpio.gz"
OUTER_ROOT=$WORK/outer-root
make_root "$OUTER_ROOT" "$OUTER_ORDER"
install -m 755 "$SRC_DIR/outer-init" "$OUTER_ROOT/init"
mkdir -p "$OUTER_ROOT/host"
pack "$OUTER_ROOT" "$WORK/outer-initramfs.cpio.gz"

cp "$VMLINUZ" "$WORK/vmlinuz"
echo "$KVER" >"$WORK/kernel-release"

# Publish: move each output into place (outputs last, so a half-built dir is never
# taken as up to date).
rm -rf "$OUT/modules"
mv "$WORK/modules" "$OUT/modules"
for output in vmlinuz vmlinux kernel-release guest-initramfs.cpio.gz outer-initramfs.cpio.gz; do
    mv -f "$WORK/$output" "$OUT/$output"
done
touch "$OUT/modules/modules.order"
log "built $OUT (kernel $KVER)"
