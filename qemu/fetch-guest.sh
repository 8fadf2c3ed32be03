#!/usr/bin/env bash
# Fetches what the real-guest tests boot: a Debian kernel (vmlinuz + virtio modules) and a
# static busybox, into qemu/.cache/. Idempotent; a cached kernel is reused without asking apt.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: qemu/fetch-guest.sh [--refresh] [--help]

Downloads a Debian kernel package (linux-image-<ver>-amd64, via `apt-get download`) and,
unless the host's /bin/busybox is already the static one, busybox-static; extracts vmlinuz,
the virtio modules and busybox into qemu/.cache/ (git-ignored). Nothing is installed.

Result (read by build-initramfs.sh and run-guest.sh):
  qemu/.cache/guest.env              KVER=<kernel version>, KERNEL=<vmlinuz path>, ...
  qemu/.cache/kernel/<KVER>/vmlinuz
  qemu/.cache/kernel/<KVER>/modules/<name>.ko   (decompressed; ORDER lists them)
  qemu/.cache/busybox

Which kernel:
  SNAPBLK_GUEST_KERNEL_PKG=linux-image-6.1.0-NN-amd64   use exactly this package
  otherwise the kernel recorded in guest.env is reused if complete, else the package that
  `linux-image-amd64` currently depends on (apt-cache) is fetched.
  --refresh   ignore guest.env and resolve linux-image-amd64 again.

Environment: SNAPBLK_GUEST_CACHE overrides the cache directory (default qemu/.cache).
EOF
}

refresh=0
for a in "$@"; do
    case "$a" in
    -h | --help) usage; exit 0 ;;
    --refresh) refresh=1 ;;
    *) echo "fetch-guest.sh: unknown argument: $a (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "fetch-guest.sh: error: $*" >&2; exit 1; }
log() { echo "fetch-guest.sh: $*" >&2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${SNAPBLK_GUEST_CACHE:-$here/.cache}"
mkdir -p "$cache/debs" "$cache/kernel"

# Modules needed for a vhost-user-blk-pci disk, in insmod order. Missing ones are tolerated
# when the kernel has them built in.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)

# As root, apt would warn that its _apt sandbox user cannot write into the cache.
APT_OPTS=()
[ "$(id -u)" -ne 0 ] || APT_OPTS=(-o APT::Sandbox::User=root)

for tool in apt-get apt-cache dpkg-deb tar; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found: a Debian host is required (see qemu/install-host-deps.sh)"
done

# ---------------------------------------------------------------- busybox (static)
is_static() { file -L "$1" 2>/dev/null | grep -q 'statically linked' || ! ldd "$1" >/dev/null 2>&1; }
fetch_busybox() {
    local out="$cache/busybox"
    if [ -x "$out" ] && "$out" --list >/dev/null 2>&1; then return 0; fi
    if [ -x /bin/busybox ] && is_static /bin/busybox && /bin/busybox --list | grep -qx insmod; then
        cp /bin/busybox "$out.tmp" && mv "$out.tmp" "$out"
        log "busybox: using the host's static /bin/busybox"
        return 0
    fi
    local deb
    deb=$(ls "$cache"/debs/busybox-static_*.deb 2>/dev/null | tail -1 || true)
    if [ -z "$deb" ]; then
        log "busybox: downloading busybox-static"
        (cd "$cache/debs" && apt-get "${APT_OPTS[@]+"${APT_OPTS[@]}"}" download busybox-static >&2) ||
            die "apt-get download busybox-static failed (run 'apt-get update'?)"
        deb=$(ls "$cache"/debs/busybox-static_*.deb | tail -1)
    fi
    local tmp
    tmp=$(mktemp -d "$cache/bb.XXXXXX")
    dpkg-deb -x "$deb" "$tmp"
    [ -x "$tmp/bin/busybox" ] || { rm -rf "$tmp"; die "$deb has no bin/busybox"; }
    mv "$tmp/bin/busybox" "$out"
    rm -rf "$tmp"
}

# ---------------------------------------------------------------- kernel
resolve_kernel_pkg() {
    local dep
    dep=$(apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -1 || true)
    if [ -z "$dep" ] && [ "$(id -u)" -eq 0 ]; then
        log "apt-cache does not know linux-image-amd64: running apt-get update"
        apt-get update -qq >&2 || true
        dep=$(apt-cache depends linux-image-amd64 2>/dev/null |
            sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -1 || true)
    fi
    [ -n "$dep" ] || die "cannot resolve linux-image-amd64 to a concrete kernel package (apt-get update? or set SNAPBLK_GUEST_KERNEL_PKG)"
    echo "$dep"
}

kernel_complete() { [ -n "${1:-}" ] && [ -f "$cache/kernel/$1/.complete" ] && [ -f "$cache/kernel/$1/vmlinuz" ]; }

pkg="${SNAPBLK_GUEST_KERNEL_PKG:-}"
kver=""
if [ -z "$pkg" ] && [ "$refresh" -eq 0 ] && [ -f "$cache/guest.env" ]; then
    kver=$(sed -n 's/^KVER=//p' "$cache/guest.env")
    kernel_complete "$kver" || kver=""
fi
if [ -z "$kver" ]; then
    [ -n "$pkg" ] || pkg=$(resolve_kernel_pkg)
    kver="${pkg#linux-image-}"
    [ "$kver" != "$pkg" ] || die "unexpected kernel package name '$pkg' (want linux-image-<version>)"
fi

kdir="$cache/kernel/$kver"
if ! kernel_complete "$kver"; then
    pkg="linux-image-$kver"
    deb=$(ls "$cache"/debs/"${pkg}"_*.deb 2>/dev/null | tail -1 || true)
    if [ -z "$deb" ]; then
        log "downloading $pkg"
        (cd "$cache/debs" && apt-get "${APT_OPTS[@]+"${APT_OPTS[@]}"}" download "$pkg" >&2) ||
            die "apt-get download $pkg failed (no registry access? run 'apt-get update'?)"
        deb=$(ls "$cache"/debs/"${pkg}"_*.deb | tail -1)
    fi
    log "extracting vmlinuz and virtio modules from $(basename "$deb")"
    tmp=$(mktemp -d "$cache/kx.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    dpkg-deb --fsys-tarfile "$deb" | tar -t >"$tmp/list" || die "cannot read $deb"
    want=()
    while IFS= read -r p; do
        case "$p" in
        */boot/vmlinuz-*) want+=("$p") ;;
        */modules/*/modules.builtin) want+=("$p") ;;
        */modules/*/kernel/drivers/virtio/*.ko* | */modules/*/kernel/drivers/block/virtio_blk.ko*) want+=("$p") ;;
        esac
    done <"$tmp/list"
    [ ${#want[@]} -gt 0 ] || die "$deb contains no vmlinuz"
    mkdir -p "$tmp/x"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp/x" "${want[@]}" || die "extracting from $deb failed"
    vmlinuz=$(find "$tmp/x" -path '*/boot/vmlinuz-*' -type f | head -1)
    [ -n "$vmlinuz" ] || die "$deb contains no boot/vmlinuz-*"
    builtin=$(find "$tmp/x" -name modules.builtin | head -1)

    stage="$tmp/stage"
    mkdir -p "$stage/modules"
    cp "$vmlinuz" "$stage/vmlinuz"
    : >"$stage/modules/ORDER"
    for m in "${MODULES[@]}"; do
        src=$(find "$tmp/x" -name "$m.ko*" -type f | head -1)
        if [ -z "$src" ]; then
            if [ -n "$builtin" ] && grep -q "/$m.ko\$" "$builtin"; then
                log "module $m is built into the kernel"
            else
                log "warning: module $m is neither in $pkg nor listed as built in"
            fi
            continue
        fi
        case "$src" in
        *.ko) cp "$src" "$stage/modules/$m.ko" ;;
        *.ko.xz) xz -dc "$src" >"$stage/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$src" >"$stage/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$src" >"$stage/modules/$m.ko" ;;
        *) die "unknown module compression: $src" ;;
        esac
        echo "$m" >>"$stage/modules/ORDER"
    done
    # Every dependency of a shipped module must be shipped earlier or built in.
    for m in $(cat "$stage/modules/ORDER"); do
        deps=$(grep -a -o 'depends=[a-z0-9_,-]*' "$stage/modules/$m.ko" | head -1 | sed 's/^depends=//' | tr ',' ' ')
        for d in $deps; do
            grep -qx "$d" "$stage/modules/ORDER" ||
                { [ -n "$builtin" ] && grep -q "/$d.ko\$" "$builtin"; } ||
                die "module $m depends on $d, which is not fetched (add it to MODULES in $0)"
        done
    done
    rm -rf "$kdir"
    mv "$stage" "$kdir"
    touch "$kdir/.complete"
    rm -rf "$tmp"
    trap - EXIT
fi

fetch_busybox

cat >"$cache/guest.env.tmp" <<EOF
KVER=$kver
KERNEL=$kdir/vmlinuz
MODULES_DIR=$kdir/modules
BUSYBOX=$cache/busybox
EOF
mv "$cache/guest.env.tmp" "$cache/guest.env"
log "ready: kernel $kver ($(tr '\n' ' ' <"$kdir/modules/ORDER"))"
