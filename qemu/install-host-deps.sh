#!/usr/bin/env bash
# Installs what a fresh Debian bookworm machine lacks to run snapblk's guest tests, NBD tests,
# power-cut tests and benchmarks: QEMU 10 (bookworm-backports) with qemu-img/qemu-io/qemu-nbd,
# qemu-storage-daemon, busybox-static, cpio, libnbd's nbdinfo and nbdcopy, nbdkit (with its
# file plugin and delay/error/log filters, for the remote-origin tests and benchmark) and fuse3
# (fusermount3, for the FUSE file system of tests/power_cut.rs), systemd-socket-activate
# (systemd) and virt-xml-validate (libvirt-clients, libxml2-utils) for tests/activation.rs.
# Idempotent: does nothing when everything is already there.
set -euo pipefail

need=()
qemu_ok() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 &&
        qemu-system-x86_64 --version | grep -qE 'version (9|[1-9][0-9])\.'
}
qemu_ok || need+=(qemu)
command -v qemu-storage-daemon >/dev/null 2>&1 || need+=(qemu)
for tool in qemu-img qemu-io qemu-nbd; do
    command -v "$tool" >/dev/null 2>&1 || need+=(qemu)
done
for tool in nbdinfo nbdcopy; do
    command -v "$tool" >/dev/null 2>&1 || need+=(nbd)
done
command -v nbdkit >/dev/null 2>&1 || need+=(nbdkit)
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 || need+=(busybox)
command -v cpio >/dev/null 2>&1 || need+=(cpio)
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
# tests/activation.rs: systemd's socket activation helper, and libvirt's XML validator (which
# runs xmllint).
command -v systemd-socket-activate >/dev/null 2>&1 || need+=(systemd)
command -v virt-xml-validate >/dev/null 2>&1 || need+=(libvirt)
command -v xmllint >/dev/null 2>&1 || need+=(libvirt)
[ ${#need[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

src=/etc/apt/sources.list.d/bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    $SUDO tee "$src" >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils qemu-block-extra >/dev/null
$SUDO apt-get install -y -qq busybox-static cpio xz-utils zstd libnbd-bin nbdkit fuse3 \
    systemd libvirt-clients libxml2-utils >/dev/null
qemu-system-x86_64 --version | head -1
