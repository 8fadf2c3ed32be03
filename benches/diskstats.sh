#!/bin/bash
# What the disk does while one vs_qsd run goes: reads, writes (with their average size) and
# flushes per second, from /proc/diskstats of the disk that holds $TMPDIR, sampled every second.
# Use it to count device operations per guest request (docs/benchmarks.md, 2026-12-04 night).
#
# usage: benches/diskstats.sh VS_QSD_BINARY [vs_qsd options...]
#   e.g. TMPDIR=/var/tmp benches/diskstats.sh target/release/deps/vs_qsd-HASH --bench --direct \
#        --snapshot --image-mib 8192 --backends qsd-native --rounds 1 --secs 25 \
#        --filter 4k-randwrite-qd32/q1
# The table of the run goes to standard error; the samples (one line a second) to standard output.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,10p' "$0"; exit 2; }
bin=$1; shift
src=$(findmnt -n -o SOURCE -T "${TMPDIR:-/tmp}")
dev=$(basename "$(readlink -f "$src")")
grep -q " $dev " /proc/diskstats || { echo "no /proc/diskstats line for $dev ($src)" >&2; exit 1; }
sync # the last run's writeback would show up as this run's
"$bin" "$@" >&2 &
run=$!
prev=$(grep " $dev " /proc/diskstats)
while kill -0 "$run" 2>/dev/null; do
    sleep 1
    cur=$(grep " $dev " /proc/diskstats)
    # Fields after the name: reads, merged, sectors read, ms, writes, merged, sectors written,
    # ms, in flight, io ms, weighted ms, discards (4 fields), flushes, flush ms.
    paste <(echo "$prev" | awk '{for (i=4; i<=NF; i++) print $i}') \
          <(echo "$cur" | awk '{for (i=4; i<=NF; i++) print $i}') |
        awk -v t="$(date +%T)" '{d[NR]=$2-$1} END {
            printf "%s reads/s %6d (%6.1f KiB) writes/s %6d (%7.1f KiB) flushes/s %4d\n",
                t, d[1], d[1] ? d[3]/2/d[1] : 0, d[5], d[5] ? d[7]/2/d[5] : 0, d[16] }'
    prev=$cur
done
wait "$run"
