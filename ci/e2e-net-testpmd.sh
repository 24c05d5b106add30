#!/usr/bin/env bash
# Network end-to-end test against the peer backend dpdk-testpmd: testpmd
# serves two vhost-user-net ports (net_vhost PMD, server mode) and
# io-forwards port 0 <-> port 1, so the two QEMU guests of
# ci/qemu-net-pair.sh talk through it. The baseline the reflector's
# vhost-user-net backend is compared with (throughput, ping RTT).
#   1. start dpdk-testpmd (no hugepages, one forwarding core) on two sockets;
#   2. run ci/qemu-net-pair.sh on them (server on port 0, client on port 1);
#   3. stop testpmd (by pid) and show its port statistics.
# Exits with qemu-net-pair.sh's status. Temporary files live in
# /tmp/e2e-net-testpmd.XXXXXX (testpmd.log, guest logs), removed on success
# and kept (path printed) on failure or with --keep-logs.
#
# Usage: ci/e2e-net-testpmd.sh [qemu-net-pair.sh options except --sock-a/--sock-b]
#   e.g. ci/e2e-net-testpmd.sh                      # transfer + ping (defaults)
#        ci/e2e-net-testpmd.sh --ping-only --pings 100   # RTT benchmark
#        ci/e2e-net-testpmd.sh --mib 64 --timeout 900
#   --timeout SEC   also bounds testpmd's lifetime (default 900)
# Env: E2E_TESTPMD (default dpdk-testpmd), E2E_DPDK_PMDS (default
#      /usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0), E2E_TESTPMD_LCORES (default 0-1),
#      E2E_TESTPMD_EXTRA (more testpmd application options, split on spaces;
#      later options win, e.g. "--forward-mode=rxonly" for a peer that drops all).
# One summary line on stdout (qemu-net-pair.sh's E2E-NET-SUMMARY), progress on stderr.
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
log() { printf 'e2e-net-testpmd: %s\n' "$*" >&2; }
die() { printf 'e2e-net-testpmd: FAIL: %s\n' "$*" >&2; exit 1; }

tmo=900 keep=0 args=()
while (($#)); do
    case $1 in
    --timeout) tmo=${2:?--timeout needs seconds}; args+=("$1" "$2"); shift 2 ;;
    --keep-logs) keep=1; args+=("$1"); shift ;;
    --sock-a | --sock-b | --log-dir) die "$1 is chosen by this script" ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$1"); shift ;;
    esac
done
[[ $tmo =~ ^[0-9]+$ ]] || die "--timeout must be a number"

testpmd=${E2E_TESTPMD:-dpdk-testpmd}
pmds=${E2E_DPDK_PMDS:-/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0}
command -v "$testpmd" >/dev/null || die "$testpmd not found (Debian: apt-get install dpdk)"
for p in librte_mempool_ring.so librte_net_vhost.so; do
    [[ -e $pmds/$p ]] || die "$pmds/$p not found: set E2E_DPDK_PMDS to DPDK's PMD directory"
done

tmp=$(mktemp -d /tmp/e2e-net-testpmd.XXXXXX)
prefix=e2enet-$$ # DPDK runtime dir /var/run/dpdk/$prefix: unique per run
tp_wrapper='' ok=0 t0=$EPOCHREALTIME
testpmd_pid() { pgrep -P "$tp_wrapper" | head -1 || true; }
stop_testpmd() {
    local p i
    [[ -n $tp_wrapper ]] || return 0
    # testpmd waits for a line on stdin ("Press enter to exit"), then prints
    # its statistics and exits; a signal is the fallback.
    echo >&8 || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$tp_wrapper" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$tp_wrapper" 2>/dev/null; then
        p=$(testpmd_pid)
        log "testpmd did not exit within 10s of its stdin line: SIGTERM"
        kill -TERM "${p:-$tp_wrapper}" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            kill -0 "$tp_wrapper" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL ${p:+"$p"} "$tp_wrapper" 2>/dev/null || true
    fi
    wait "$tp_wrapper" 2>/dev/null || true
    tp_wrapper=''
}
pair_pid=''
cleanup() {
    in_cleanup=1
    set +e
    if [[ -n $pair_pid ]] && kill -0 "$pair_pid" 2>/dev/null; then
        kill -TERM "$pair_pid" 2>/dev/null
        wait "$pair_pid" 2>/dev/null
    fi
    stop_testpmd
    rm -rf "/var/run/dpdk/$prefix"
    if ((ok && !keep)); then rm -rf "$tmp"; else log "kept $tmp (testpmd.log, guests/)"; fi
}
trap cleanup EXIT
in_cleanup=0
on_signal() {
    [[ $BASHPID == "$$" ]] || return 0
    ((in_cleanup)) && return 0
    log "interrupted by a signal: stopping the guests and testpmd"
    exit 130
}
trap on_signal INT TERM

# testpmd's stdin: a FIFO this script holds open read-write on fd 8, so
# testpmd's read() blocks until we write a line (or this script dies).
mkfifo "$tmp/stdin"
exec 8<>"$tmp/stdin"
s0=$tmp/s0.sock s1=$tmp/s1.sock
# shellcheck disable=SC2206
extra=(${E2E_TESTPMD_EXTRA:-})
log "starting $testpmd on $s0 (port 0, server guest) and $s1 (port 1, client guest)"
# stdbuf: testpmd's stdout is a file, line-buffered so that its markers show.
timeout -k 5 $((tmo + 60)) stdbuf -oL "$testpmd" -l "${E2E_TESTPMD_LCORES:-0-1}" --no-huge -m 1024 --no-pci \
    --file-prefix="$prefix" -d "$pmds/librte_mempool_ring.so" -d "$pmds/librte_net_vhost.so" \
    --vdev "net_vhost0,iface=$s0" --vdev "net_vhost1,iface=$s1" -- \
    --forward-mode=io --nb-cores=1 --total-num-mbufs=16384 --no-mlockall --disable-link-check --auto-start \
    "${extra[@]}" <"$tmp/stdin" >"$tmp/testpmd.log" 2>&1 8<&- &
tp_wrapper=$!
for ((i = 0; i < 300; i++)); do
    grep -q 'Press enter to exit' "$tmp/testpmd.log" && break
    kill -0 "$tp_wrapper" 2>/dev/null || die "testpmd exited at start: $(tail -5 "$tmp/testpmd.log")"
    sleep 0.1
done
grep -q 'Press enter to exit' "$tmp/testpmd.log" || die "testpmd did not start forwarding within 30s (log: $tmp/testpmd.log)"
[[ -S $s0 && -S $s1 ]] || die "testpmd forwards but $s0 / $s1 are not sockets (log: $tmp/testpmd.log)"
log "testpmd (pid $(testpmd_pid)) forwarding after $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')s"

rc=0
"$here/qemu-net-pair.sh" --sock-a "$s0" --sock-b "$s1" --log-dir "$tmp/guests" "${args[@]}" >"$tmp/summary" &
pair_pid=$!
wait "$pair_pid" || rc=$?
pair_pid=''
stop_testpmd
# testpmd's per-port totals (dropped packets show a backend or guest not keeping up).
sed -n '/Forward statistics for port/,/^ *-\{20,\}$/p; /Accumulated forward statistics/,/^ *[+]\{20,\}$/p' "$tmp/testpmd.log" |
    grep -E 'statistics|RX-packets|TX-packets' | sed 's/^ */  testpmd: /' >&2 || true
cat "$tmp/summary"
((rc == 0)) || die "qemu-net-pair.sh failed (status $rc): see above"
ok=1
log "PASS (total $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')s)"
