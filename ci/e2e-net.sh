#!/usr/bin/env bash
# End-to-end test of the net path with real clients: the reflector serves two
# vhost-user-net devices on one switch, each driven by a net driver VM; two
# QEMU guests (TCG) attach them with virtio-net-pci (ci/qemu-net-pair.sh).
#   1. build the guest (cached); start the reflector;
#   2. run 1: the guests ping each other, then send a checksummed TCP
#      transfer (sha256 compared on both ends);
#   3. run 2: the same while both net driver VMs are SIGKILLed in turn every
#      0.5 s: the transfer must complete with the right checksum, the guests'
#      carrier must never drop, and the ping loss during it is reported;
#   4. stop the reflector (by pid); it must have logged no error.
# Without QEMU it skips loudly, unless CI is set, where it fails. Temporary
# files live in /tmp/e2e-net.*, removed on success, kept (path printed) on
# failure.
#
# Usage: ci/e2e-net.sh [--timeout SEC] [--mib N] [--spare] [--device sim|e1000e]
#   --mib N    MiB of the first transfer (default 32); the second, under
#              kills, sends three times as much (so that it lasts long enough)
#   --spare    serve with spare=on (warm spare driver VMs)
#   --device e1000e  the cards are QEMU's e1000e models, driven by the
#              e1000e driver, instead of the simulated card
# Prints the two E2E-NET-SUMMARY lines of the runs on stdout.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
log() { printf 'e2e-net: %s\n' "$*" >&2; }
die() { printf 'e2e-net: FAIL: %s\n' "$*" >&2; exit 1; }

tmo=600 mib=32 extra=''
while (($#)); do
    case $1 in
    --timeout) tmo=${2:?--timeout needs seconds}; shift 2 ;;
    --mib) mib=${2:?--mib needs MiB}; shift 2 ;;
    --spare) extra=$extra,spare=on; shift ;;
    --device)
        [[ ${2:-} == sim || ${2:-} == e1000e ]] || die "--device needs sim or e1000e"
        extra=$extra,device=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done

if ! command -v qemu-system-x86_64 >/dev/null; then
    [[ -n ${CI:-} ]] && die "qemu-system-x86_64 not found and CI is set: .ci/run must install it (ci/install-e2e-deps.sh)"
    log "*** SKIPPED: qemu-system-x86_64 not found. Run ci/install-e2e-deps.sh (as root) to enable the QEMU test. ***"
    exit 0
fi
reflector=$repo/target/release/reflector
[[ -x $reflector && -x $repo/target/release/vmm ]] || die "build first: cargo build --release"

log "building the guest kernel and initramfs (cached in target/e2e-guest)"
timeout 900 "$here/build-guest.sh" "$repo/target/e2e-guest" || die "ci/build-guest.sh failed (see above)"

tmp=$(mktemp -d /tmp/e2e-net.XXXXXX)
sock_a=$tmp/a.sock sock_b=$tmp/b.sock ctl=$tmp/ctl reflector_pid='' ok=0
cleanup() {
    if [[ -n $reflector_pid ]] && kill -0 "$reflector_pid" 2>/dev/null; then
        kill "$reflector_pid" 2>/dev/null || true
        wait "$reflector_pid" 2>/dev/null || true
    fi
    if ((ok)); then rm -rf "$tmp"; else log "kept $tmp (reflector log: $tmp/reflector.log)"; fi
}
trap cleanup EXIT

log "starting the reflector: two net devices on switch lan${extra:+ ($extra)}"
timeout -k 5 $((tmo * 2 + 120)) "$reflector" serve --control "$ctl" \
    --net "socket=$sock_a,mac=52:54:00:00:00:01,switch=lan,name=neta$extra" \
    --net "socket=$sock_b,mac=52:54:00:00:00:02,switch=lan,name=netb$extra" \
    >"$tmp/reflector.log" 2>&1 &
reflector_pid=$!
for _ in $(seq 300); do
    [[ -S $sock_b ]] && (($(grep -c "card ready" "$tmp/reflector.log") >= 2)) && break
    kill -0 "$reflector_pid" 2>/dev/null || die "the reflector exited: $(tail -5 "$tmp/reflector.log")"
    sleep 0.1
done
[[ -S $sock_b ]] || die "the reflector did not serve $sock_b within 30 s"

pair() { # pair RUN MIB [qemu-net-pair.sh options...]
    local run=$1 size=$2
    shift 2
    timeout $((tmo + 60)) "$here/qemu-net-pair.sh" --sock-a "$sock_a" --sock-b "$sock_b" --mib "$size" \
        --timeout "$tmo" --log-dir "$tmp/$run" "$@" || die "$run failed: see above and $tmp/$run"
}

log "run 1: ping, then a $mib MiB TCP transfer checked with sha256"
summary1=$(pair run1 "$mib")
log "run 1: ${summary1#E2E-NET-SUMMARY: }"

# The kill loop runs while the transfer does; it counts the kills that
# landed (a restart must happen before the next kill of that device).
cat >"$tmp/kill-loop.sh" <<EOF
#!/usr/bin/env bash
n=0
while :; do
    for device in neta netb; do
        sleep 0.5
        if "$reflector" kill --control "$ctl" "\$device" >/dev/null 2>&1; then
            # Written aside and renamed: the loop is stopped by a signal at any
            # moment, and a truncated count would read as no kill at all.
            n=\$((n + 1)); echo "\$n" >"$tmp/kills.new" && mv "$tmp/kills.new" "$tmp/kills"
        fi
    done
done
EOF
chmod +x "$tmp/kill-loop.sh"
log "run 2: a $((mib * 3)) MiB transfer while the net driver VMs are SIGKILLed in turn every 0.5 s"
summary2=$(pair run2 $((mib * 3)) --during "$tmp/kill-loop.sh")
kills=$(cat "$tmp/kills" 2>/dev/null || echo 0)
log "run 2: ${summary2#E2E-NET-SUMMARY: }"
((kills >= 2)) || die "only $kills kills landed during run 2: the transfer finished too fast to test anything (raise --mib)"
[[ $summary2 == *"link_down_samples=0 "* || $summary2 == *"link_down_samples=0" ]] ||
    die "a guest saw its link go down while driver VMs were killed: $summary2"
status=$("$reflector" status --control "$ctl")
log "run 2: passed across $kills SIGKILLs of net driver VMs; reflector status:"
printf '%s\n' "$status" >&2

kill "$reflector_pid"
wait "$reflector_pid" 2>/dev/null || true
reflector_pid=''
if grep -E "panicked| ERROR " "$tmp/reflector.log"; then
    die "the reflector logged errors (above)"
fi
printf '%s kills=0\n%s kills=%s\n' "$summary1" "$summary2" "$kills"
ok=1
log "PASS"
