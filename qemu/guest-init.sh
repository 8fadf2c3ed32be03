#!/bin/sh
# /init of snapblk's test guest (busybox ash). Loads the virtio modules, finds the
# vhost-user-blk disks, runs the test named by `snapblk.test=NAME` on the kernel command
# line, prints machine-parseable lines on the console and powers off.
#
# Console protocol (one line each, `key=value` fields separated by single spaces; values
# never contain spaces):
#   SNAPBLK-DISK: name=vda size_sectors=N serial=S queues=Q ro=0|1 cache=write_back|write_through
#                                                                        (one per disk, at boot)
#   SNAPBLK-INFO: ...                                                    (free-form progress)
#   SNAPBLK-RESULT: PASS <test> key=value...                             (exactly one per boot)
#   SNAPBLK-RESULT: FAIL <test> reason=<word> key=value...
#
# Parameters: `snapblk.arg=KEY=VALUE` (repeatable) on the kernel command line; a test reads
# them with `arg KEY DEFAULT`. Command line tokens must not contain spaces.
#
# Adding a test: write `test_NAME() { ...; pass NAME k=v...; }` (or call `fail reason ...`)
# and add NAME to the case statement in run_test. Any shell error or a test that returns
# without calling pass/fail is reported as FAIL.

PATH=/bin:/sbin
export PATH

say() { echo "$*"; }
info() { say "SNAPBLK-INFO: [$(cut -d" " -f1 /proc/uptime 2>/dev/null)] $*"; }

RESULT_PRINTED=0
TEST_NAME=none
pass() {
    # pass [key=value...]
    say "SNAPBLK-RESULT: PASS $TEST_NAME $*"
    RESULT_PRINTED=1
}
fail() {
    # fail REASON [key=value...]
    r=$1
    shift
    say "SNAPBLK-RESULT: FAIL $TEST_NAME reason=$r $*"
    RESULT_PRINTED=1
}

finish() {
    sync
    poweroff -f
    # poweroff -f should not return; keep init alive so the kernel does not panic loudly.
    while :; do sleep 3600; done
}

# ------------------------------------------------------------------ parameters
CMDLINE=
cmdline_value() {
    # cmdline_value NAME: value of the last NAME=... token
    v=
    for tok in $CMDLINE; do
        case "$tok" in "$1="*) v=${tok#"$1="} ;; esac
    done
    echo "$v"
}
arg() {
    # arg KEY DEFAULT: value of the last snapblk.arg=KEY=VALUE, or DEFAULT
    found=0
    v=
    for tok in $CMDLINE; do
        case "$tok" in "snapblk.arg=$1="*)
            v=${tok#"snapblk.arg=$1="}
            found=1
            ;;
        esac
    done
    if [ "$found" = 1 ]; then echo "$v"; else echo "$2"; fi
}

# ------------------------------------------------------------------ disks
disk_size() { cat "/sys/block/$1/size"; }
disk_serial() {
    # Empty when the device has no serial (GET_ID unsupported). Spaces become '_'.
    s=$(cat "/sys/block/$1/serial" 2>/dev/null | tr -d '\n\000' | tr ' ' '_')
    echo "$s"
}
disk_queues() { ls "/sys/block/$1/mq" 2>/dev/null | wc -l; }
disk_ro() { cat "/sys/block/$1/ro"; }
# "write_back" when the device offers FLUSH (fsync then reaches the backend), else "write_through"
disk_cache() { tr ' ' '_' <"/sys/block/$1/queue/write_cache" 2>/dev/null || echo unknown; }
disk_fields() {
    echo "disk=$1 size_sectors=$(disk_size "$1") serial=$(disk_serial "$1") queues=$(disk_queues "$1") ro=$(disk_ro "$1") cache=$(disk_cache "$1")"
}
DISKS=
find_disks() {
    DISKS=
    for d in /sys/block/vd*; do
        [ -e "$d" ] || continue
        DISKS="$DISKS ${d##*/}"
    done
    DISKS=${DISKS# }
}
# require_disk NAME: fails the test unless /dev/NAME exists
require_disk() {
    if [ ! -b "/dev/$1" ]; then
        fail no-disk "disk=$1" "disks=$(echo "$DISKS" | tr ' ' ',')"
        return 1
    fi
}

# ------------------------------------------------------------------ pattern
# The deterministic pattern (tests/guest.rs computes the same bytes):
#   Every 512-byte sector s that the pattern covers holds one line of exactly 512 bytes:
#     "SNAPBLK seed=%010d sector=%012d " + fill char repeated to 511 bytes + "\n"
#   where fill char = 'a' + (seed + s) % 26. The covered sectors ("extents") are, for every
#   MiB i < span_mib: the first 4 KiB of MiB i (sectors i*2048 .. i*2048+7); the whole MiB when
#   full_every > 0 and i % full_every == full_offset; and the last 4 KiB of the span.
#   Everything else is left untouched.
#
# pattern_awk SEED: reads "first_sector count" lines, prints those pattern sectors
pattern_awk() {
    awk -v seed="$1" 'BEGIN {
        for (k = 0; k < 26; k++) {
            c = sprintf("%c", 97 + k)
            f = c
            while (length(f) < 512) f = f f
            fill[k] = f
        }
    }
    {
        for (s = $1; s < $1 + $2; s++) {
            line = sprintf("SNAPBLK seed=%010d sector=%012d ", seed, s)
            printf "%s%s\n", line, substr(fill[(seed + s) % 26], 1, 511 - length(line))
        }
    }'
}
# pattern_gen SEED FIRST_SECTOR COUNT: prints COUNT pattern sectors
pattern_gen() { echo "$2 $3" | pattern_awk "$1"; }
# pattern_extents SPAN_MIB FULL_EVERY FULL_OFFSET: prints "first_sector count" lines
pattern_extents() {
    awk -v span="$1" -v every="$2" -v off="$3" 'BEGIN {
        for (i = 0; i < span; i++) {
            if (every > 0 && i % every == off) print i * 2048, 2048
            else print i * 2048, 8
        }
        last = span * 2048 - 8
        if (!(every > 0 && (span - 1) % every == off) && last > (span - 1) * 2048) print last, 8
    }'
}

DIRECT_OK=1
# write_sectors DEV FIRST COUNT FILE [FILE_OFFSET_IN_4K_BLOCKS]
write_sectors() {
    if [ "$DIRECT_OK" = 1 ]; then
        dd if="$4" of="$1" bs=4096 skip="${5:-0}" seek=$(($2 / 8)) count=$(($3 / 8)) oflag=direct conv=notrunc 2>/tmp/dd.err && return 0
        # Fall back to buffered I/O if O_DIRECT is refused.
        if grep -qi 'invalid argument' /tmp/dd.err; then DIRECT_OK=0; info "O_DIRECT refused; using buffered I/O"; else cat /tmp/dd.err >&2; return 1; fi
    fi
    dd if="$4" of="$1" bs=4096 skip="${5:-0}" seek=$(($2 / 8)) count=$(($3 / 8)) conv=notrunc 2>/tmp/dd.err || { cat /tmp/dd.err >&2; return 1; }
}
# read_sectors DEV FIRST COUNT > FILE
read_sectors() {
    if [ "$DIRECT_OK" = 1 ]; then
        dd if="$1" bs=4096 skip=$(($2 / 8)) count=$(($3 / 8)) iflag=direct 2>/tmp/dd.err
    else
        dd if="$1" bs=4096 skip=$(($2 / 8)) count=$(($3 / 8)) 2>/tmp/dd.err
    fi
}
drop_caches() {
    blockdev --flushbufs "$1" 2>/dev/null || true
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
}
flush_disk() {
    # fsync on the block device sends a virtio-blk FLUSH.
    sync "$1" 2>/dev/null || dd if=/dev/null of="$1" count=0 conv=fsync 2>/dev/null || sync
}

# pattern_setup: reads the pattern args into disk dev seed span every offset fields and
# writes /tmp/extents. Returns 1 (after printing FAIL) on bad args.
pattern_setup() {
    disk=$(arg disk vda)
    seed=$(arg seed 1)
    every=$(arg full_every 8)
    offset=$(arg full_offset 3)
    require_disk "$disk" || return 1
    dev=/dev/$disk
    size=$(disk_size "$disk")
    disk_mib=$((size / 2048))
    span=$(arg span_mib "$disk_mib")
    fields="$(disk_fields "$disk") seed=$seed span_mib=$span"
    if [ "$span" -lt 1 ] || [ "$span" -gt "$disk_mib" ]; then
        fail bad-span "$fields"
        return 1
    fi
    pattern_extents "$span" "$every" "$offset" >/tmp/extents
    pattern_plan
}
# pattern_plan: plans the batches for the extents in /tmp/extents (4 KiB aligned "first count"
# lines) into /tmp/plan, n_ext, n_sec, n_batch; pattern_write/pattern_verify then use them
# with $dev, $seed and $fields.
pattern_plan() {
    n_ext=$(wc -l </tmp/extents)
    n_sec=$(awk '{ s += $2 } END { print s + 0 }' /tmp/extents)
    # Batches of at most ~4 MiB of pattern: "batch first count file_block" lines.
    awk '{ if (used > 0 && used + $2 > 8192) { b++; used = 0 }
           print b + 0, $1, $2, used / 8; used += $2 }' /tmp/extents >/tmp/plan
    n_batch=$(($(tail -n 1 /tmp/plan | cut -d" " -f1) + 1))
    [ "$n_ext" -gt 0 ] || n_batch=0
}
# extents_minus A B: the sectors of extent file A not covered by extent file B, as
# "first count" runs
extents_minus() {
    awk 'FNR == NR { for (s = $1; s < $1 + $2; s++) cov[s] = 1; next }
    {
        run = -1
        for (s = $1; s < $1 + $2; s++) {
            if (s in cov) { if (run >= 0) print run, s - run; run = -1 }
            else if (run < 0) run = s
        }
        if (run >= 0) print run, $1 + $2 - run
    }' "$2" "$1"
}
# pattern_batch B: writes /tmp/pb (this batch's "first count file_block" lines) and /tmp/x
# (the batch's expected bytes, extents concatenated)
pattern_batch() {
    awk -v b="$1" '$1 == b { print $2, $3, $4 }' /tmp/plan >/tmp/pb
    awk '{ print $1, $2 }' /tmp/pb | pattern_awk "$seed" >/tmp/x
}
# pattern_write: writes the pattern described by pattern_setup's variables; 1 = FAIL printed
pattern_write() {
    info "pattern: writing $n_ext extents ($n_sec sectors, $n_batch batches) over $span MiB of $dev seed=$seed"
    b=0
    while [ "$b" -lt "$n_batch" ]; do
        pattern_batch "$b"
        while read -r first count fblk; do
            write_sectors "$dev" "$first" "$count" /tmp/x "$fblk" || { fail write-error "$fields sector=$first"; return 1; }
        done </tmp/pb
        b=$((b + 1))
    done
}
# pattern_verify: reads back and compares; 1 = FAIL printed
pattern_verify() {
    drop_caches "$dev"
    info "pattern: verifying $n_ext extents ($n_sec sectors) of $dev seed=$seed"
    b=0
    while [ "$b" -lt "$n_batch" ]; do
        pattern_batch "$b"
        rerr=
        while read -r first count fblk; do
            read_sectors "$dev" "$first" "$count" || rerr=$first
        done </tmp/pb >/tmp/y
        [ -z "$rerr" ] || { fail read-error "$fields sector=$rerr"; return 1; }
        # md5sum is much faster than busybox cmp (byte by byte) under TCG; cmp locates.
        if [ "$(md5sum </tmp/x)" != "$(md5sum </tmp/y)" ]; then
            off=$(cmp -l /tmp/x /tmp/y 2>/dev/null | head -n 1 | awk '{ print $1 }')
            [ -n "$off" ] || off=$(($(wc -c </tmp/y) + 1))
            fs=$(((off - 1) / 512))
            bad=$(awk -v fs="$fs" 'fs >= $3 * 8 && fs < $3 * 8 + $2 { print $1 + fs - $3 * 8; exit }' /tmp/pb)
            got=$(dd if=/tmp/y bs=512 skip="$fs" count=1 2>/dev/null | head -c 40 | tr -c 'A-Za-z0-9=' '_')
            fail mismatch "$fields sector=${bad:-unknown} got=$got"
            return 1
        fi
        b=$((b + 1))
    done
}

# test pattern: args disk=vda seed=1 span_mib=<whole disk> full_every=8 full_offset=3
#   mode=both|write|verify, corrupt=<MiB index> (test-only: after writing, damage that MiB's
#   first 4 KiB so that verification must fail)
test_pattern() {
    mode=$(arg mode both)
    corrupt=$(arg corrupt "")
    pattern_setup || return 0
    fields="$fields mode=$mode"
    case "$mode" in
    both | write | verify) ;;
    *) fail bad-mode "$fields"; return 0 ;;
    esac
    if [ "$mode" != verify ]; then
        pattern_write || return 0
        if [ -n "$corrupt" ]; then
            info "pattern: test-only corruption of MiB $corrupt"
            pattern_gen $((seed + 1)) $((corrupt * 2048)) 8 >/tmp/x
            write_sectors "$dev" $((corrupt * 2048)) 8 /tmp/x || { fail write-error "$fields"; return 0; }
        fi
        flush_disk "$dev"
    fi
    if [ "$mode" != write ]; then
        pattern_verify || return 0
    fi
    pass "$fields extents=$n_ext sectors=$n_sec"
}

# test readonly: args disk=vda; seed=N (optional: also verify the pattern the host put
#   there, with span_mib/full_every/full_offset as for `pattern`)
test_readonly() {
    disk=$(arg disk vda)
    require_disk "$disk" || return 0
    dev=/dev/$disk
    rofields=$(disk_fields "$disk")
    if [ "$(disk_ro "$disk")" != 1 ]; then
        fail not-ro "$rofields"
        return 0
    fi
    # Reads must work.
    if ! read_sectors "$dev" 0 8 >/tmp/y || [ "$(wc -c </tmp/y)" != 4096 ]; then
        fail read-error "$rofields"
        return 0
    fi
    # Writes must fail: direct, buffered+fsync, and after trying to clear the ro flag.
    pattern_gen 99 0 8 >/tmp/x
    if dd if=/tmp/x of="$dev" bs=4096 count=1 oflag=direct conv=notrunc 2>/dev/null; then
        fail write-succeeded "$rofields how=direct"
        return 0
    fi
    if dd if=/tmp/x of="$dev" bs=4096 count=1 conv=notrunc,fsync 2>/dev/null; then
        fail write-succeeded "$rofields how=buffered"
        return 0
    fi
    blockdev --setrw "$dev" 2>/dev/null || true
    if dd if=/tmp/x of="$dev" bs=4096 count=1 oflag=direct conv=notrunc 2>/dev/null; then
        fail write-succeeded "$rofields how=setrw"
        return 0
    fi
    if [ -n "$(arg seed "")" ]; then
        pattern_setup || return 0
        pattern_verify || return 0
        pass "$rofields verified=1 seed=$seed span_mib=$span sectors=$n_sec"
    else
        pass "$rofields verified=0"
    fi
}

# test overlay: a VM on a writable snapshot of a golden image. Args: disk=vda span_mib=<disk>
#   base_seed base_every=8 base_offset=3 (the golden pattern the host put there),
#   seed full_every=8 full_offset=0 (this VM's own pattern).
#   Verifies the golden pattern, writes its own pattern (direct I/O + FLUSH), drops caches,
#   verifies its own pattern and the golden pattern wherever it did not write.
test_overlay() {
    bseed=$(arg base_seed 1)
    bevery=$(arg base_every 8)
    boffset=$(arg base_offset 3)
    CMDLINE="$CMDLINE snapblk.arg=full_every=$(arg full_every 8) snapblk.arg=full_offset=$(arg full_offset 0)"
    pattern_setup || return 0
    own_seed=$seed
    cp /tmp/extents /tmp/own
    pattern_extents "$span" "$bevery" "$boffset" >/tmp/golden
    extents_minus /tmp/golden /tmp/own >/tmp/rest
    ofields=$fields

    # 1. The snapshot shows the golden image.
    seed=$bseed
    fields="$ofields phase=golden-before"
    cp /tmp/golden /tmp/extents
    pattern_plan
    pattern_verify || return 0
    golden_sec=$n_sec
    # 2. Own data, flushed, read back.
    seed=$own_seed
    fields="$ofields phase=own"
    cp /tmp/own /tmp/extents
    pattern_plan
    pattern_write || return 0
    flush_disk "$dev"
    pattern_verify || return 0
    own_sec=$n_sec
    # 3. The golden pattern is intact wherever this VM did not write.
    seed=$bseed
    fields="$ofields phase=golden-after"
    cp /tmp/rest /tmp/extents
    pattern_plan
    pattern_verify || return 0
    pass "$ofields base_seed=$bseed golden_sectors=$golden_sec own_sectors=$own_sec rest_sectors=$n_sec"
}

# test stream: numbered records written one after the other, each flushed before it is
#   announced. Args: disk=vda base=1000 records=64 slots=32 rec_kib=64 snap_at=0 snap_wait=60
#   Record g (generation g) goes to slot g % slots (byte offset slot * rec_kib KiB) and holds
#   the pattern sectors of seed base+g (see pattern_awk). After writing it with O_DIRECT and
#   fsync-ing the device (virtio FLUSH) the guest prints
#     SNAPBLK-REC: gen=G slot=S
#   With snap_at=K > 0, after K records (gens 0..K-1) it prints `SNAPBLK-SNAP-NOW: gen=K` and
#   waits (up to snap_wait s) for a line on the console before writing gen K. At the end it
#   reads every slot back (direct I/O) and checks that each holds its latest generation, and
#   that the kernel logged no I/O error.
test_stream() {
    disk=$(arg disk vda)
    base=$(arg base 1000)
    records=$(arg records 64)
    slots=$(arg slots 32)
    rec_kib=$(arg rec_kib 64)
    snap_at=$(arg snap_at 0)
    snap_wait=$(arg snap_wait 60)
    readback=$(arg readback 0)
    require_disk "$disk" || return 0
    dev=/dev/$disk
    rs=$((rec_kib * 2))
    fields="$(disk_fields "$disk") base=$base records=$records slots=$slots rec_kib=$rec_kib snap_at=$snap_at"
    if [ $((slots * rs)) -gt "$(disk_size "$disk")" ] || [ $((rec_kib % 4)) -ne 0 ]; then
        fail bad-args "$fields"
        return 0
    fi
    info "stream: $records records of $rec_kib KiB over $slots slots of $dev"
    g=0
    while [ "$g" -lt "$records" ]; do
        if [ "$snap_at" -gt 0 ] && [ "$g" -eq "$snap_at" ]; then
            say "SNAPBLK-SNAP-NOW: gen=$g"
            # shellcheck disable=SC3045 # busybox ash has read -t
            if ! read -r -t "$snap_wait" reply; then
                fail snap-timeout "$fields gen=$g"
                return 0
            fi
            info "stream: host said '$reply'; continuing"
        fi
        slot=$((g % slots))
        pattern_gen $((base + g)) $((slot * rs)) "$rs" >/tmp/r
        if ! dd if=/tmp/r of="$dev" bs=$((rs * 512)) seek="$slot" count=1 oflag=direct conv=notrunc 2>/tmp/dd.err; then
            fail write-error "$fields gen=$g slot=$slot err=$(tr -c 'A-Za-z0-9' '_' </tmp/dd.err | head -c 80)"
            return 0
        fi
        if ! sync "$dev" 2>/tmp/sync.err; then
            fail flush-error "$fields gen=$g slot=$slot err=$(tr -c 'A-Za-z0-9' '_' </tmp/sync.err | head -c 80)"
            return 0
        fi
        # readback=1: read the record back through the page cache (the backend writes
        # those pages; a migration must carry them), and check it.
        if [ "$readback" = 1 ]; then
            dd if="$dev" of=/tmp/rb bs=$((rs * 512)) skip="$slot" count=1 2>/dev/null
            if [ "$(md5sum </tmp/rb)" != "$(md5sum </tmp/r)" ]; then
                fail readback-mismatch "$fields gen=$g slot=$slot"
                return 0
            fi
        fi
        say "SNAPBLK-REC: gen=$g slot=$slot"
        g=$((g + 1))
    done
    # Every slot must hold its latest generation.
    used=$slots
    [ "$records" -ge "$slots" ] || used=$records
    awk -v n="$records" -v slots="$slots" -v used="$used" -v rs="$rs" -v base="$base" 'BEGIN {
        for (s = 0; s < used; s++) {
            g = s + int((n - 1 - s) / slots) * slots
            print base + g, s * rs, rs
        }
    }' >/tmp/latest
    : >/tmp/x
    while read -r sd first count; do pattern_gen "$sd" "$first" "$count" >>/tmp/x; done </tmp/latest
    if [ "$readback" = 1 ]; then
        # First from the page cache the read-backs filled (before any migration, maybe).
        dd if="$dev" of=/tmp/y bs=$((rs * 512)) count="$used" 2>/dev/null
        if [ "$(md5sum </tmp/x)" != "$(md5sum </tmp/y)" ]; then
            fail cached-mismatch "$fields"
            return 0
        fi
    fi
    drop_caches "$dev"
    if ! dd if="$dev" of=/tmp/y bs=$((rs * 512)) count="$used" iflag=direct 2>/tmp/dd.err; then
        fail read-error "$fields"
        return 0
    fi
    if [ "$(md5sum </tmp/x)" != "$(md5sum </tmp/y)" ]; then
        off=$(cmp -l /tmp/x /tmp/y 2>/dev/null | head -n 1 | awk '{ print $1 }')
        [ -n "$off" ] || off=1
        fs=$(((off - 1) / 512))
        got=$(dd if=/tmp/y bs=512 skip="$fs" count=1 2>/dev/null | head -c 40 | tr -c 'A-Za-z0-9=' '_')
        fail mismatch "$fields sector=$fs got=$got"
        return 0
    fi
    if dmesg | grep -i -E 'I/O error|blk_update_request|critical' >/tmp/ioerr; then
        info "stream: kernel log: $(head -n 3 /tmp/ioerr | tr '\n' '|')"
        fail kernel-io-error "$fields"
        return 0
    fi
    pass "$fields written=$records verified_slots=$used"
}

# test resize: the host grows the disk while the guest runs (snapblk resize). The guest says
# SNAPBLK-RESIZE-NOW, polls /sys/block/DISK/size until it reads want_sectors (no reboot, no
# rescan: the config-change interrupt), then reads zeros in the last 4 KiB of the new end,
# writes a pattern record there and reads it back past the page cache.
test_resize() {
    disk=$(arg disk vda)
    want=$(arg want_sectors 0)
    wait_s=$(arg wait 30)
    seed=$(arg seed 4242)
    require_disk "$disk" || return 0
    dev=/dev/$disk
    old=$(disk_size "$disk")
    fields="disk=$disk old_sectors=$old want_sectors=$want"
    say "SNAPBLK-RESIZE-NOW: size_sectors=$old"
    i=0
    while [ "$(disk_size "$disk")" != "$want" ]; do
        i=$((i + 1))
        if [ $i -gt $((wait_s * 10)) ]; then
            fail no-resize "$fields now_sectors=$(disk_size "$disk")"
            return 0
        fi
        sleep 0.1
    done
    info "resize: $dev has $want sectors after $((i / 10)).$((i % 10)) s"
    end=$((want - 8))
    drop_caches "$dev"
    if ! dd if="$dev" of=/tmp/tail bs=512 skip="$end" count=8 iflag=direct 2>/tmp/dd.err; then
        fail read-error "$fields err=$(tr -c 'A-Za-z0-9' '_' </tmp/dd.err | head -c 80)"
        return 0
    fi
    nonzero=$(tr -d '\000' </tmp/tail | wc -c)
    if [ "$nonzero" -ne 0 ]; then
        fail not-zeros "$fields nonzero=$nonzero"
        return 0
    fi
    pattern_gen "$seed" "$end" 8 >/tmp/rec
    if ! dd if=/tmp/rec of="$dev" bs=512 seek="$end" count=8 oflag=direct conv=notrunc 2>/tmp/dd.err; then
        fail write-error "$fields err=$(tr -c 'A-Za-z0-9' '_' </tmp/dd.err | head -c 80)"
        return 0
    fi
    flush_disk "$dev"
    drop_caches "$dev"
    dd if="$dev" of=/tmp/back bs=512 skip="$end" count=8 iflag=direct 2>/dev/null
    if [ "$(md5sum </tmp/rec)" != "$(md5sum </tmp/back)" ]; then
        fail mismatch "$fields"
        return 0
    fi
    if dmesg | grep -i -E 'I/O error|blk_update_request' >/tmp/ioerr; then
        fail kernel-io-error "$fields"
        return 0
    fi
    pass "$fields new_sectors=$(disk_size "$disk") waited_ds=$i record_sector=$end"
}

# test info: just report the disks
test_info() {
    pass "disks=$(echo "$DISKS" | tr ' ' ',')"
}

run_test() {
    case "$TEST_NAME" in
    pattern) test_pattern ;;
    readonly) test_readonly ;;
    info) test_info ;;
    overlay) test_overlay ;;
    stream) test_stream ;;
    resize) test_resize ;;
    *) fail unknown-test "known=pattern,readonly,info,overlay,stream,resize" ;;
    esac
}

# ------------------------------------------------------------------ main
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
mount -t tmpfs tmpfs /tmp
# The initramfs has no /dev/console node, so the kernel could not give init a console.
exec </dev/console >/dev/console 2>&1
CMDLINE=$(cat /proc/cmdline)

main() {
    TEST_NAME=$(cmdline_value snapblk.test)
    [ -n "$TEST_NAME" ] || TEST_NAME=none
    info "guest up: kernel $(uname -r), test=$TEST_NAME, cmdline: $CMDLINE"

    if [ -f /lib/modules/ORDER ]; then
        for m in $(cat /lib/modules/ORDER); do
            [ -f "/lib/modules/$m.ko" ] || continue
            insmod "/lib/modules/$m.ko" 2>/tmp/insmod.err ||
                grep -q 'File exists' /tmp/insmod.err ||
                info "insmod $m failed: $(cat /tmp/insmod.err)"
        done
    fi
    # Wait (up to ~10 s) for as many disks as the host attached (snapblk.disks=N).
    want=$(cmdline_value snapblk.disks)
    [ -n "$want" ] || want=1
    i=0
    while :; do
        find_disks
        n=0
        for d in $DISKS; do n=$((n + 1)); done
        [ "$n" -ge "$want" ] && break
        i=$((i + 1))
        [ $i -ge 100 ] && break
        sleep 0.1
    done
    for d in $DISKS; do
        say "SNAPBLK-DISK: $(disk_fields "$d" | sed 's/^disk=/name=/')"
    done

    run_test
    [ "$RESULT_PRINTED" = 1 ] || fail no-result "test-function-returned-without-result"
}

# Run in a subshell so that an aborting or crashing test cannot kill init (a kernel panic);
# it prints its own result line.
(main)
status=$?
[ $status -eq 0 ] || say "SNAPBLK-RESULT: FAIL $(cmdline_value snapblk.test) reason=init-error status=$status"
finish
