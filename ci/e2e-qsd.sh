#!/usr/bin/env bash
# Self-test of the end-to-end infrastructure with qemu-storage-daemon as the
# vhost-user-blk backend (the peer the project's reflector is compared with):
#   1. build the guest (cached), create a raw image (256 MiB), start qsd on it;
#   2. boot QEMU + fio with crc32c verify on the device (qemu-blk-fio.sh),
#      then the host-side data check while qsd still runs;
#   3. unless --quick: boot a second guest that re-reads and verifies the same
#      data through the backend (job verify-only);
#   4. unless --quick: with reconnect-ms=1000, kill qsd while fio runs and
#      restart it on the same socket: the guest must finish without errors;
#   5. stop qsd (by pid) and check the image again after the backend exited.
# Exits 0 when everything passed. Temporary files live in /tmp/e2e-qsd.*;
# they are removed on success and kept (path printed) on failure or --keep.
#
# Usage: ci/e2e-qsd.sh [--quick] [--keep] [--timeout SEC] [--fiosize MIB]
#   --timeout SEC   bound for each guest run (default 300)
set -euo pipefail
export LC_ALL=C # also makes $EPOCHREALTIME use a decimal point

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
log() { printf 'e2e-qsd: %s\n' "$*" >&2; }
die() { printf 'e2e-qsd: FAIL: %s\n' "$*" >&2; exit 1; }
dt() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

quick=0 keep=0 tmo=300 fiosize=48
while (($#)); do
    case $1 in
    --quick) quick=1; shift ;;
    --keep) keep=1; shift ;;
    --timeout) tmo=${2:?--timeout needs seconds}; shift 2 ;;
    --fiosize) fiosize=${2:?--fiosize needs MiB}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ $tmo =~ ^[0-9]+$ && $fiosize =~ ^[0-9]+$ ]] || die "--timeout and --fiosize must be numbers"

for t in qemu-storage-daemon qemu-system-x86_64 qemu-img fio; do
    command -v "$t" >/dev/null || die "$t not found: run ci/install-e2e-deps.sh (as root) first"
done

t0=$EPOCHREALTIME
guest=$repo/target/e2e-guest
log "building the guest in $guest (cached)"
timeout 900 "$here/build-guest.sh" "$guest" || die "ci/build-guest.sh failed (see above)"
t_built=$EPOCHREALTIME

tmp=$(mktemp -d /tmp/e2e-qsd.XXXXXX)
img=$tmp/disk.img sock=$tmp/vhost-blk.sock qsd_wrapper='' qsd_pid='' ok=0
img_mib=$((fiosize * 2 + 16 > 256 ? fiosize * 2 + 16 : 256))
timeout 30 qemu-img create -q -f raw "$img" "${img_mib}M" || die "qemu-img create $img failed (disk full?)"

start_qsd() {
    rm -f "$sock" "$tmp/qsd.pid"
    # timeout(1) bounds qsd should this script die; qsd's own pid is in qsd.pid.
    timeout -k 5 $((tmo * 4 + 120)) qemu-storage-daemon \
        --blockdev "driver=file,node-name=f0,filename=$img,aio=threads,cache.direct=off" \
        --blockdev driver=raw,node-name=d0,file=f0 \
        --export "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=$sock,writable=on,num-queues=1" \
        --pidfile "$tmp/qsd.pid" >>"$tmp/qsd.log" 2>&1 &
    qsd_wrapper=$!
    for ((i = 0; i < 100; i++)); do
        [[ -S $sock && -s $tmp/qsd.pid ]] && break
        kill -0 "$qsd_wrapper" 2>/dev/null || die "qemu-storage-daemon exited at start: $(tail -3 "$tmp/qsd.log")"
        sleep 0.1
    done
    [[ -S $sock && -s $tmp/qsd.pid ]] || die "qemu-storage-daemon did not create $sock within 10s (log: $tmp/qsd.log)"
    qsd_pid=$(cat "$tmp/qsd.pid")
    log "qemu-storage-daemon running (pid $qsd_pid) on $sock"
}
stop_qsd() { # stop_qsd [SIGNAL]
    [[ -n $qsd_wrapper ]] || return 0
    # qsd's pid: from its pidfile, or the child of the timeout(1) wrapper.
    [[ -n $qsd_pid ]] || qsd_pid=$(cat "$tmp/qsd.pid" 2>/dev/null || pgrep -P "$qsd_wrapper" | head -1 || true)
    kill -"${1:-TERM}" "${qsd_pid:-$qsd_wrapper}" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$qsd_wrapper" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$qsd_wrapper" 2>/dev/null; then
        log "qemu-storage-daemon (pid $qsd_pid) ignored SIG${1:-TERM} for 10s: killing it"
        kill -KILL ${qsd_pid:+"$qsd_pid"} "$qsd_wrapper" 2>/dev/null || true
    fi
    wait "$qsd_wrapper" 2>/dev/null || true # (2>/dev/null: no "Killed" notice from bash)
    qsd_wrapper='' qsd_pid=''
}
# Guest runs go in the background and are waited for, so that a signal to this
# script is handled at once; cleanup then stops the run (qemu-blk-fio.sh stops
# its QEMU on SIGTERM). qemu-blk-fio.sh bounds its own run time.
child=''
run_child() { # run_child OUTFILE COMMAND...
    local o=$1 rc=0
    shift
    "$@" >"$o" &
    child=$!
    wait "$child" || rc=$?
    child=''
    return "$rc"
}
cleanup() {
    in_cleanup=1
    set +e # best effort from here on; never stop half-way
    if [[ -n $child ]] && kill -0 "$child" 2>/dev/null; then
        kill -TERM "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    stop_qsd
    if ((ok && !keep)); then
        rm -rf "$tmp"
    else
        log "kept $tmp (console logs, qsd.log, disk.img)"
    fi
}
trap cleanup EXIT
# Signals: exit once (cleanup runs from the EXIT trap). A repeated signal,
# e.g. timeout(1) signalling the process and then its group, may still be
# pending when cleanup starts: it must not cut the cleanup short.
in_cleanup=0
on_signal() {
    # Subshells ($(...)) inherit this trap: only the main shell acts.
    [[ $BASHPID == "$$" ]] || return 0
    ((in_cleanup)) && return 0
    log "interrupted by a signal: stopping the guest run and qemu-storage-daemon"
    exit 130
}
trap on_signal INT TERM

seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
start_qsd

# 2. fio with verify, host check while the backend runs.
log "run 1: fio-verify (seed $seed)"
t1=$EPOCHREALTIME
run_child "$tmp/run1.summary" "$here/qemu-blk-fio.sh" --socket "$sock" --image-file "$img" --job fio-verify \
    --seed "$seed" --fiosize "$fiosize" --timeout "$tmo" --log "$tmp/console-fio-verify.log" ||
    die "run 1 (fio-verify) failed: see above and $tmp/console-fio-verify.log"
summary1=$(cat "$tmp/run1.summary")
t1e=$EPOCHREALTIME

if ((!quick)); then
    # 3. A second boot reads the same data back through the backend.
    log "run 2: verify-only (seed $seed): a fresh guest re-reads and verifies the data"
    run_child /dev/null "$here/qemu-blk-fio.sh" --socket "$sock" --job verify-only \
        --seed "$seed" --fiosize "$fiosize" --timeout "$tmo" --log "$tmp/console-verify-only.log" ||
        die "run 2 (verify-only) failed: see above and $tmp/console-verify-only.log"

    # 4. Backend restart under I/O with reconnect-ms=1000.
    seed2=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
    clog=$tmp/console-restart.log
    # Twice the fio region, so the kill lands while fio is writing.
    fiosize3=$((fiosize * 2))
    log "run 3: fio-verify (seed $seed2, ${fiosize3}MiB) with reconnect-ms=1000; qsd is killed and restarted during fio"
    "$here/qemu-blk-fio.sh" --socket "$sock" --image-file "$img" --job fio-verify \
        --seed "$seed2" --fiosize "$fiosize3" --timeout "$tmo" --log "$clog" --reconnect-ms 1000 \
        >"$tmp/run3.summary" &
    child=$!
    for ((i = 0; i < tmo * 10; i++)); do
        grep -q 'E2E-TIME: fio start' "$clog" 2>/dev/null && break
        kill -0 "$child" 2>/dev/null || break
        sleep 0.1
    done
    grep -q 'E2E-TIME: fio start' "$clog" 2>/dev/null || die "run 3: the guest never started fio (see $clog)"
    sleep 1
    log "run 3: killing qemu-storage-daemon (pid $qsd_pid) under I/O"
    stop_qsd KILL
    sleep 1
    start_qsd
    r3=0
    wait "$child" || r3=$?
    child=''
    ((r3 == 0)) || die "run 3 (backend restart with reconnect-ms=1000) failed: see above and $clog"
    grep -q 'E2E-TIME: fio end' "$clog" || die "run 3: fio did not run"
    log "run 3: passed across the backend restart"
    # run 3 overwrote the fio region and wrote its stamp with seed2: check that from now on.
    seed=$seed2 fiosize=$fiosize3
fi

# 5. Stop the backend, then check the image with nothing running.
stop_qsd
log "qemu-storage-daemon stopped; checking the image with no backend running"
"$here/check-image.sh" --image-file "$img" --seed "$seed" --fiosize "$fiosize" --job fio-verify ||
    die "the image does not hold the guest's data after the backend exited"

ok=1
t_end=$EPOCHREALTIME
summary1=${summary1#E2E-SUMMARY: }
log "run 1: ${summary1% log=*}"
log "PASS: guest build/cache $(dt "$t0" "$t_built")s, fio-verify run $(dt "$t1" "$t1e")s, total $(dt "$t0" "$t_end")s"
echo "e2e-qsd: PASS"
