#!/usr/bin/env bash
# Boots the snapblk test guest under QEMU (TCG) with one vhost-user-blk-pci disk per socket,
# runs one guest test and exits 0 only if the guest reported PASS.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: qemu/run-guest.sh [OPTIONS] SOCKET[,PROP=VAL...] [SOCKET...] -- TEST [KEY=VALUE...]

Boots qemu-system-x86_64 (TCG) with the kernel and initramfs from qemu/.cache (running
fetch-guest.sh and build-initramfs.sh first; both are no-ops when cached), attaching one
vhost-user-blk-pci device per SOCKET (guest disks vda, vdb, ... in that order). The guest
/init (qemu/guest-init.sh) runs TEST with every KEY=VALUE passed as `snapblk.arg=KEY=VALUE`
on the kernel command line, and powers off.

  SOCKET                vhost-user socket a backend (snapblk, qemu-storage-daemon) listens on.
                        Text after a comma is appended to that -device, e.g.
                        /tmp/s.sock,num-queues=1 or /tmp/s.sock,serial=abc
  TEST                  guest test: pattern | readonly | info (see qemu/guest-init.sh)
  KEY=VALUE             test arguments, e.g. seed=7 span_mib=16 mode=write disk=vdb

Options:
  --timeout SEC         kill QEMU after SEC seconds (default 120, env SNAPBLK_GUEST_TIMEOUT)
  --log FILE            console log (default qemu/.cache/logs/<time>-<pid>.log)
  --num-queues N        default num-queues of each device (default 2)
  --smp N               guest vCPUs (default 2; the guest uses at most this many queues)
  --mem MIB             guest memory, shared memfd (default 256)
  --cpu MODEL           QEMU -cpu model (default max)
  --append ARGS         extra kernel command line
  --reconnect-ms MS     add reconnect-ms=MS to every vhost-user chardev, so that QEMU
                        reconnects (and the guest's I/O resumes) when the backend restarts
  --stdin               feed run-guest.sh's stdin to the guest's serial console (default:
                        /dev/null); a guest test can then wait for a line from the host
  --qmp PATH            a QMP monitor on the unix socket PATH (for migrate, quit, ...)
  --incoming URI        start as a live migration's destination (QEMU -incoming URI, e.g.
                        unix:/tmp/mig.sock): the guest runs once a source migrated to it
  --qemu BIN            QEMU binary (default qemu-system-x86_64, env SNAPBLK_QEMU)
  --no-prepare          do not run fetch-guest.sh / build-initramfs.sh
  -h, --help            this text

Output: the guest's SNAPBLK-* lines on stdout, e.g.
  SNAPBLK-DISK: name=vda size_sectors=131072 serial=abc queues=2 ro=0 cache=write_back
  SNAPBLK-RESULT: PASS pattern disk=vda size_sectors=131072 serial=abc queues=2 ro=0 seed=1 ...
Exit status: 0 PASS; 1 guest reported FAIL; 3 no result (timeout, crash, QEMU error);
2 usage or setup error. On failure the log's tail is printed on stderr.
EOF
}

die() { echo "run-guest.sh: error: $*" >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${SNAPBLK_GUEST_CACHE:-$here/.cache}"
timeout_s="${SNAPBLK_GUEST_TIMEOUT:-120}"
log=""
nq=2
smp=2
mem=256
cpu=max
extra_append=""
qemu="${SNAPBLK_QEMU:-qemu-system-x86_64}"
prepare=1
reconnect_ms=""
use_stdin=0
qmp=""
incoming=""
sockets=()
test_name=""
test_args=()

while [ $# -gt 0 ]; do
    case "$1" in
    -h | --help) usage; exit 0 ;;
    --timeout) timeout_s="${2:?--timeout needs a value}"; shift 2 ;;
    --log) log="${2:?--log needs a value}"; shift 2 ;;
    --num-queues) nq="${2:?--num-queues needs a value}"; shift 2 ;;
    --smp) smp="${2:?--smp needs a value}"; shift 2 ;;
    --mem) mem="${2:?--mem needs a value}"; shift 2 ;;
    --cpu) cpu="${2:?--cpu needs a value}"; shift 2 ;;
    --append) extra_append="${2?--append needs a value}"; shift 2 ;;
    --qemu) qemu="${2:?--qemu needs a value}"; shift 2 ;;
    --reconnect-ms) reconnect_ms="${2:?--reconnect-ms needs a value}"; shift 2 ;;
    --stdin) use_stdin=1; shift ;;
    --qmp) qmp="${2:?--qmp needs a value}"; shift 2 ;;
    --incoming) incoming="${2:?--incoming needs a value}"; shift 2 ;;
    --no-prepare) prepare=0; shift ;;
    --)
        shift
        [ $# -gt 0 ] || die "missing TEST after -- (see --help)"
        test_name="$1"
        shift
        test_args=("$@")
        break
        ;;
    -*) die "unknown option: $1 (see --help)" ;;
    *) sockets+=("$1"); shift ;;
    esac
done
[ ${#sockets[@]} -gt 0 ] || die "no SOCKET given (see --help)"
[ -n "$test_name" ] || die "no TEST given: SOCKET... -- TEST [KEY=VALUE...] (see --help)"
for v in "$timeout_s" "$nq" "$smp" "$mem" ${reconnect_ms:+"$reconnect_ms"}; do
    [[ "$v" =~ ^[0-9]+$ ]] || die "not a number: $v"
done
[[ "$test_name" =~ ^[A-Za-z0-9_-]+$ ]] || die "bad test name: $test_name"
for a in "${test_args[@]+"${test_args[@]}"}"; do
    [[ "$a" =~ ^[A-Za-z0-9_]+=[^[:space:]]*$ ]] || die "bad test argument '$a' (want KEY=VALUE without spaces)"
done
command -v "$qemu" >/dev/null 2>&1 || die "$qemu not found (run qemu/install-host-deps.sh)"
command -v timeout >/dev/null 2>&1 || die "timeout(1) not found"

if [ "$prepare" -eq 1 ]; then
    "$here/fetch-guest.sh" >&2 || die "qemu/fetch-guest.sh failed"
    "$here/build-initramfs.sh" >/dev/null || die "qemu/build-initramfs.sh failed"
fi
[ -f "$cache/guest.env" ] || die "$cache/guest.env missing: run qemu/fetch-guest.sh"
kernel=$(sed -n 's/^KERNEL=//p' "$cache/guest.env")
initrd="$cache/initramfs.cpio.gz"
[ -f "$kernel" ] || die "kernel $kernel missing: run qemu/fetch-guest.sh"
[ -f "$initrd" ] || die "$initrd missing: run qemu/build-initramfs.sh"

if [ -z "$log" ]; then
    mkdir -p "$cache/logs"
    log="$cache/logs/$(date -u +%Y%m%dT%H%M%S)-$$.log"
fi
mkdir -p "$(dirname "$log")"

devargs=()
i=0
for s in "${sockets[@]}"; do
    path="${s%%,*}"
    props=""
    [ "$path" = "$s" ] || props=",${s#*,}"
    [ -S "$path" ] || die "$path is not a socket (is the backend running?)"
    case "$props" in *num-queues=*) ;; *) props=",num-queues=$nq$props" ;; esac
    chardev="socket,id=vhu$i,path=$path"
    [ -z "$reconnect_ms" ] || chardev+=",reconnect-ms=$reconnect_ms"
    devargs+=(-chardev "$chardev" -device "vhost-user-blk-pci,chardev=vhu$i,id=disk$i$props")
    i=$((i + 1))
done

append="console=ttyS0 panic=-1 loglevel=4 mitigations=off snapblk.test=$test_name snapblk.disks=${#sockets[@]}"
for a in "${test_args[@]+"${test_args[@]}"}"; do append+=" snapblk.arg=$a"; done
[ -z "$extra_append" ] || append+=" $extra_append"

# shellcheck disable=SC2054 # commas belong to QEMU option values
cmd=(
    "$qemu" -nodefaults -no-user-config -machine pc -accel tcg -cpu "$cpu" -smp "$smp"
    -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -numa node,memdev=mem -m "${mem}M"
    -display none -monitor none -serial stdio -no-reboot
    -kernel "$kernel" -initrd "$initrd" -append "$append"
    "${devargs[@]}"
)
[ -z "$qmp" ] || cmd+=(-qmp "unix:$qmp,server=on,wait=off")
[ -z "$incoming" ] || cmd+=(-incoming "$incoming")
{
    echo "# run-guest.sh $(date -u +%FT%TZ): ${cmd[*]}"
} >"$log"

run_qemu() {
    start=$(date +%s)
    set +e
    if [ "$use_stdin" -eq 1 ]; then
        timeout --kill-after=5 "$timeout_s" "${cmd[@]}" >>"$log" 2>&1
    else
        timeout --kill-after=5 "$timeout_s" "${cmd[@]}" </dev/null >>"$log" 2>&1
    fi
    rc=$?
    set -e
    elapsed=$(($(date +%s) - start))
    echo "# run-guest.sh: qemu exit status $rc after ${elapsed}s" >>"$log"
}
run_qemu
# QEMU 10's TCG occasionally aborts on an internal assertion of its own while the guest boots
# (physmem.c iotlb_to_section; seen once in about 80 boots here), before the guest has said
# anything. That is QEMU's failure, not the backend's: boot once more. (The guest kernel may
# already have probed the disk through the backend; the backend serves the next connection.)
# A guest that got as far as reporting a disk is never retried, and --stdin runs (fed by a
# test) are not either. The log keeps both boots and both exit statuses.
if [ "$rc" -eq 134 ] && [ "$use_stdin" -eq 0 ] &&
    grep -aq 'iotlb_to_section: Assertion' "$log" && ! grep -aq '^SNAPBLK-' "$log"; then
    echo "run-guest.sh: qemu aborted in iotlb_to_section before the guest started; booting once more" >&2
    echo "# run-guest.sh: retrying after qemu's own assertion failure" >>"$log"
    run_qemu
fi

tr -d '\r' <"$log" | grep -a '^SNAPBLK-\(DISK\|RESULT\):' || true
result=$(tr -d '\r' <"$log" | grep -a '^SNAPBLK-RESULT:' | tail -1 || true)

fail_tail() {
    echo "run-guest.sh: $1 (log: $log)" >&2
    echo "----- last 40 lines of $log -----" >&2
    tr -d '\r' <"$log" | tail -n 40 >&2
    echo "-----" >&2
}
case "$result" in
"SNAPBLK-RESULT: PASS "*)
    [ "$rc" -eq 0 ] || echo "run-guest.sh: warning: qemu exit status $rc after PASS" >&2
    echo "run-guest.sh: PASS $test_name in ${elapsed}s (log: $log)" >&2
    exit 0
    ;;
"SNAPBLK-RESULT: FAIL "*)
    fail_tail "guest test $test_name FAILED"
    exit 1
    ;;
*)
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        fail_tail "timeout after ${timeout_s}s without a result"
    else
        fail_tail "no result from guest (qemu exit status $rc)"
    fi
    exit 3
    ;;
esac
