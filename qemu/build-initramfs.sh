#!/usr/bin/env bash
# Builds qemu/.cache/initramfs.cpio.gz: static busybox, the virtio modules fetched by
# fetch-guest.sh, and qemu/guest-init.sh as /init. Rebuilt only when an input changed.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: qemu/build-initramfs.sh [--force] [--help]

Packs a tiny initramfs (cpio newc, gzip) for the snapblk test guest:
  /init                 qemu/guest-init.sh
  /bin/busybox + links  from qemu/.cache/busybox
  /lib/modules/*.ko     virtio modules + ORDER, from qemu/.cache/kernel/<KVER>/modules
Run qemu/fetch-guest.sh first. Output: qemu/.cache/initramfs.cpio.gz (path printed on
stdout). Skips the work when the inputs are unchanged (content hash); --force rebuilds.
Environment: SNAPBLK_GUEST_CACHE overrides the cache directory (default qemu/.cache).
EOF
}

force=0
for a in "$@"; do
    case "$a" in
    -h | --help) usage; exit 0 ;;
    --force) force=1 ;;
    *) echo "build-initramfs.sh: unknown argument: $a (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "build-initramfs.sh: error: $*" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${SNAPBLK_GUEST_CACHE:-$here/.cache}"
env_file="$cache/guest.env"
[ -f "$env_file" ] || die "$env_file missing: run qemu/fetch-guest.sh first"
MODULES_DIR=$(sed -n 's/^MODULES_DIR=//p' "$env_file")
BUSYBOX=$(sed -n 's/^BUSYBOX=//p' "$env_file")
[ -d "$MODULES_DIR" ] && [ -f "$MODULES_DIR/ORDER" ] || die "modules missing ($MODULES_DIR): run qemu/fetch-guest.sh"
[ -x "$BUSYBOX" ] || die "busybox missing ($BUSYBOX): run qemu/fetch-guest.sh"
init="$here/guest-init.sh"
[ -f "$init" ] || die "$init missing"
command -v cpio >/dev/null 2>&1 || die "cpio not found (run qemu/install-host-deps.sh)"

out="$cache/initramfs.cpio.gz"
stamp="$cache/initramfs.inputs"
inputs=$(
    cd /
    sha256sum "$init" "$BUSYBOX" "$MODULES_DIR"/ORDER "$MODULES_DIR"/*.ko 2>/dev/null
    echo "format=1"
)
if [ "$force" -eq 0 ] && [ -f "$out" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ]; then
    echo "$out"
    exit 0
fi

root=$(mktemp -d "$cache/initramfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,lib/modules}
cp "$BUSYBOX" "$root/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    case "$applet" in busybox) continue ;; esac
    ln -s busybox "$root/bin/$applet"
done
ln -s ../bin/busybox "$root/sbin/busybox"
for t in poweroff reboot halt insmod; do ln -sf ../bin/busybox "$root/sbin/$t"; done
cp "$MODULES_DIR"/ORDER "$root/lib/modules/"
for m in $(cat "$MODULES_DIR/ORDER"); do cp "$MODULES_DIR/$m.ko" "$root/lib/modules/"; done
install -m 0755 "$init" "$root/init"

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0) |
    gzip -6 -n >"$out.tmp"
mv "$out.tmp" "$out"
echo "$inputs" >"$stamp"
echo "build-initramfs.sh: built $out ($(du -k "$out" | cut -f1) KiB)" >&2
echo "$out"
