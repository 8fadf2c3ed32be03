#!/usr/bin/env bash
# Boots N VMs, each on its own fresh writable snapshot of one image served by snapblk, and
# deletes the snapshots afterwards.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: qemu/boot-snapshot-vms.sh [OPTIONS] N IMAGE [-- RUN-GUEST-OPTIONS... [-- TEST [KEY=VALUE...]]]

Snapshot-per-VM recipe:
  1. uses the snapblk daemon reachable on --control, or else starts `snapblk serve` on IMAGE
     (origin socket DIR/origin.sock, control socket --control or DIR/control.sock);
  2. creates N writable snapshots PREFIX1..PREFIXN, each served on DIR/PREFIXi.sock;
  3. boots N VMs at once, VM i on PREFIXi.sock, and waits for all of them;
  4. deletes the snapshots (their cache space is freed) and stops the daemon if it started
     it. The image itself is never written.

By default each VM is the snapblk test guest (qemu/run-guest.sh SOCKET -- TEST, TEST
defaulting to `info`); RUN-GUEST-OPTIONS and TEST [KEY=VALUE...] are passed to run-guest.sh.
With --exec, each VM is your own command instead, run by bash with SNAPBLK_SOCKET (the
vhost-user socket), SNAPBLK_VM (the snapshot's name) and SNAPBLK_INDEX (1..N) set, e.g.

  qemu/boot-snapshot-vms.sh --exec 'qemu-system-x86_64 -accel kvm -m 1G \
      -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
      -chardev socket,id=d0,path=$SNAPBLK_SOCKET \
      -device vhost-user-blk-pci,chardev=d0,num-queues=2 \
      -kernel bzImage -append "root=/dev/vda console=ttyS0" -nographic' 3 golden.img

Options:
  --control PATH     control socket of a running snapblk; if nothing answers there, a daemon
                     is started with this control socket
  --snapblk BIN      snapblk binary (default: snapblk in PATH, else target/{release,debug})
  --dir DIR          sockets, logs and VM output (default: a new directory under /tmp)
  --prefix NAME      snapshot name prefix (default vm-<pid>-)
  --exec COMMAND     run COMMAND per VM instead of qemu/run-guest.sh (see above)
  --keep             do not delete the snapshots at the end
  -h, --help         this text

Each VM's output goes to DIR/<name>.out and is printed when all VMs are done.
Exit status: 0 if every VM exited 0; 1 if one did not; 2 usage or setup error.
EOF
}

die() { echo "boot-snapshot-vms.sh: error: $*" >&2; exit 2; }
log() { echo "boot-snapshot-vms.sh: $*" >&2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
control=""
snapblk=""
dir=""
prefix="vm-$$-"
exec_cmd=""
keep=0
pos=()
rg_opts=()
rg_test=(info)
while [ $# -gt 0 ]; do
    case "$1" in
    -h | --help) usage; exit 0 ;;
    --control) control="${2:?--control needs a value}"; shift 2 ;;
    --snapblk) snapblk="${2:?--snapblk needs a value}"; shift 2 ;;
    --dir) dir="${2:?--dir needs a value}"; shift 2 ;;
    --prefix) prefix="${2:?--prefix needs a value}"; shift 2 ;;
    --exec) exec_cmd="${2:?--exec needs a value}"; shift 2 ;;
    --keep) keep=1; shift ;;
    --)
        shift
        while [ $# -gt 0 ] && [ "$1" != -- ]; do rg_opts+=("$1"); shift; done
        if [ $# -gt 0 ]; then
            shift
            [ $# -gt 0 ] || die "missing TEST after the second --"
            rg_test=("$@")
        fi
        break
        ;;
    -*) die "unknown option: $1 (see --help)" ;;
    *) pos+=("$1"); shift ;;
    esac
done
[ ${#pos[@]} -eq 2 ] || die "want N and IMAGE (see --help)"
n="${pos[0]}"
image="${pos[1]}"
[[ "$n" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number: $n"
[[ "$prefix" =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad --prefix: $prefix"

if [ -z "$snapblk" ]; then
    if command -v snapblk >/dev/null 2>&1; then
        snapblk=snapblk
    elif [ -x "$here/../target/release/snapblk" ]; then
        snapblk="$here/../target/release/snapblk"
    elif [ -x "$here/../target/debug/snapblk" ]; then
        snapblk="$here/../target/debug/snapblk"
    else
        die "snapblk not found (cargo build, or --snapblk BIN)"
    fi
fi
if [ -z "$dir" ]; then
    dir=$(mktemp -d /tmp/snapblk-vms.XXXXXX)
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
[ -n "$control" ] || control="$dir/control.sock"

daemon_pid=""
created=()
vm_pids=()
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local rc=$?
    for p in "${vm_pids[@]+"${vm_pids[@]}"}"; do
        if kill -0 "$p" 2>/dev/null; then
            pkill -TERM -P "$p" 2>/dev/null || true  # timeout(1) passes it on to QEMU
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
    if [ "$keep" -eq 0 ]; then
        for name in "${created[@]+"${created[@]}"}"; do
            # A VM that just exited may still count as connected for a moment.
            ok=0
            for _ in 1 2 3 4 5 6 7 8 9 10; do
                if "$snapblk" snapshot delete "$name" --control "$control" >/dev/null 2>"$dir/delete.err"; then
                    ok=1
                    break
                fi
                sleep 0.5
            done
            if [ "$ok" -eq 1 ]; then
                log "deleted snapshot $name"
            else
                log "could not delete $name: $(cat "$dir/delete.err"); forcing"
                "$snapblk" snapshot delete "$name" --force --control "$control" >/dev/null || rc=1
            fi
        done
    fi
    if [ -n "$daemon_pid" ]; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
        log "stopped snapblk (pid $daemon_pid)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. A daemon: the running one, or a new one on IMAGE.
if "$snapblk" snapshot list --control "$control" >/dev/null 2>&1; then
    log "using the snapblk daemon on $control"
else
    [ -f "$image" ] || die "image $image not found"
    log "starting snapblk on $image (log $dir/snapblk.log)"
    "$snapblk" serve --origin "$image" --socket "$dir/origin.sock" --control "$control" \
        >"$dir/snapblk.out" 2>"$dir/snapblk.log" &
    daemon_pid=$!
    for _ in $(seq 1 200); do
        grep -q serving "$dir/snapblk.out" 2>/dev/null && break
        kill -0 "$daemon_pid" 2>/dev/null || { daemon_pid=""; die "snapblk exited: $(tail -n 5 "$dir/snapblk.log")"; }
        sleep 0.1
    done
    grep -q serving "$dir/snapblk.out" || die "snapblk did not start serving within 20 s"
fi

# 2. N writable snapshots, each served on its own socket.
for i in $(seq 1 "$n"); do
    name="$prefix$i"
    "$snapblk" snapshot create "$name" --writable --socket "$dir/$name.sock" --control "$control" >/dev/null ||
        die "cannot create snapshot $name"
    created+=("$name")
    log "created writable snapshot $name on $dir/$name.sock"
done

# 3. N VMs at once.
for i in $(seq 1 "$n"); do
    name="$prefix$i"
    sock="$dir/$name.sock"
    if [ -n "$exec_cmd" ]; then
        SNAPBLK_SOCKET="$sock" SNAPBLK_VM="$name" SNAPBLK_INDEX="$i" \
            bash -c "$exec_cmd" >"$dir/$name.out" 2>&1 &
    else
        "$here/run-guest.sh" --log "$dir/$name.console.log" "${rg_opts[@]+"${rg_opts[@]}"}" \
            "$sock" -- "${rg_test[@]}" >"$dir/$name.out" 2>&1 &
    fi
    vm_pids+=($!)
    log "booting VM $i on $name (pid $!)"
done
failed=0
for i in $(seq 1 "$n"); do
    name="$prefix$i"
    if wait "${vm_pids[$((i - 1))]}"; then st=0; else st=$?; fi
    echo "===== $name (exit $st) ====="
    cat "$dir/$name.out"
    [ "$st" -eq 0 ] || failed=1
done
vm_pids=()
log "all $n VMs done; output in $dir"
# 4. Teardown happens in the EXIT trap.
exit "$failed"
