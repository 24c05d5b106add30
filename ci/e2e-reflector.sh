#!/usr/bin/env bash
# End-to-end test of the block path with a real client: the reflector serves
# a disk whose driver runs in a driver VM; a QEMU guest (TCG) attaches it with
# vhost-user-blk-pci and runs fio with --verify=crc32c.
#   1. build the guest (cached); start the reflector on a fresh 256 MiB image;
#   2. run 1: fio random writes then verified read-back in the guest; the host
#      checks the image while the reflector still runs;
#   3. run 2: QEMU restarted: a fresh guest reconnects and re-verifies the
#      same data through the reflector;
#   4. run 3: fio-verify again while the driver VM is SIGKILLed every 0.5 s
#      (with --device nvme, kills alternate with injected faults: a panic, a
#      lie about a length, a page fault, a hang): fio must pass and the guest
#      kernel must log no I/O error;
#   5. stop the reflector (by pid) and check the image once more on the host.
# Exits 0 when everything passed. Without QEMU or fio it skips loudly, unless
# CI is set, where it fails. Temporary files live in /tmp/e2e-reflector.*,
# removed on success and kept (path printed) on failure.
#
# --device nvme serves the disk on QEMU's NVMe controller model through the
# nvme driver (device=nvme) instead of the simulated controller; --aio
# io_uring has that QEMU reach the image through io_uring (aio=io_uring).
# --dma direct serves it with per-request DMA windows (dma=direct: the
# simulated controller reaches the guest's own buffers, no bounce copy).
#
# Usage: ci/e2e-reflector.sh [--timeout SEC] [--fiosize MIB] [--device sim|nvme] [--dma bounce|direct]
#                            [--aio threads|io_uring]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
log() { printf 'e2e-reflector: %s\n' "$*" >&2; }
die() { printf 'e2e-reflector: FAIL: %s\n' "$*" >&2; exit 1; }

tmo=300 fiosize=48 device=sim dma=bounce aio=
while (($#)); do
    case $1 in
    --device) device=${2:?--device needs sim or nvme}; shift 2 ;;
    --dma) dma=${2:?--dma needs bounce or direct}; shift 2 ;;
    --aio) aio=${2:?--aio needs threads or io_uring}; shift 2 ;;
    --timeout) tmo=${2:?--timeout needs seconds}; shift 2 ;;
    --fiosize) fiosize=${2:?--fiosize needs MiB}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ $device == sim || $device == nvme ]] || die "--device $device: expected sim or nvme"
[[ $dma == bounce || $dma == direct ]] || die "--dma $dma: expected bounce or direct"
[[ $dma == bounce || $device == sim ]] || die "--dma direct is for --device sim only"
[[ -z $aio || ($device == nvme && ($aio == threads || $aio == io_uring)) ]] ||
    die "--aio $aio: expected threads or io_uring, with --device nvme"

for tool in qemu-system-x86_64 fio qemu-img; do
    if ! command -v "$tool" >/dev/null; then
        [[ -n ${CI:-} ]] && die "$tool not found and CI is set: .ci/run must install it (ci/install-e2e-deps.sh)"
        log "*** SKIPPED: $tool not found. Run ci/install-e2e-deps.sh (as root) to enable the QEMU test. ***"
        exit 0
    fi
done
reflector=$repo/target/release/reflector
[[ -x $reflector && -x $repo/target/release/vmm ]] || die "build first: cargo build --release"

log "building the guest kernel and initramfs (cached in target/e2e-guest)"
timeout 900 "$here/build-guest.sh" "$repo/target/e2e-guest" || die "ci/build-guest.sh failed (see above)"

tmp=$(mktemp -d /tmp/e2e-reflector.XXXXXX)
img=$tmp/disk.img sock=$tmp/blk.sock reflector_pid='' ok=0
cleanup() {
    if [[ -n $reflector_pid ]] && kill -0 "$reflector_pid" 2>/dev/null; then
        kill "$reflector_pid" 2>/dev/null || true
        wait "$reflector_pid" 2>/dev/null || true
    fi
    if ((ok)); then rm -rf "$tmp"; else log "kept $tmp (reflector log: $tmp/reflector.log)"; fi
}
trap cleanup EXIT

# Run 3 makes a fault every 0.5 s, at the edge of the default budget (20
# per 10 s, after which the device fails its requests): the budget is the
# unit and KVM tests' business, the replay this test's.
log "starting the reflector on $img (device=$device, dma=$dma${aio:+, aio=$aio})"
ctl=$tmp/ctl
timeout -k 5 $((tmo * 4 + 120)) "$reflector" serve --control "$ctl" --blk "socket=$sock,image=$img,size=256M,name=e2e,device=$device,dma=$dma${aio:+,aio=$aio},fault_budget=100" \
    >"$tmp/reflector.log" 2>&1 &
reflector_pid=$!
for _ in $(seq 300); do
    [[ -S $sock ]] && grep -q "controller ready" "$tmp/reflector.log" && break
    kill -0 "$reflector_pid" 2>/dev/null || die "the reflector exited: $(tail -5 "$tmp/reflector.log")"
    sleep 0.1
done
[[ -S $sock ]] || die "the reflector did not serve $sock within 30 s"

seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
log "run 1: fio random writes + crc32c verify in a QEMU guest (seed $seed)"
summary=$(timeout $((tmo + 120)) "$here/qemu-blk-fio.sh" --socket "$sock" --image-file "$img" --job fio-verify \
    --seed "$seed" --fiosize "$fiosize" --timeout "$tmo" --log "$tmp/console-run1.log") ||
    die "run 1 failed: see above and $tmp/console-run1.log"
log "run 1: ${summary#E2E-SUMMARY: }"

log "run 2: QEMU restarted; a new guest re-reads and verifies the data through the reflector"
timeout $((tmo + 120)) "$here/qemu-blk-fio.sh" --socket "$sock" --job verify-only \
    --seed "$seed" --fiosize "$fiosize" --timeout "$tmo" --log "$tmp/console-run2.log" >/dev/null ||
    die "run 2 failed: see above and $tmp/console-run2.log"

seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ') fiosize=96
faults=(panic lie page-fault hang)
log "run 3: fio-verify (seed $seed, ${fiosize} MiB) while the driver VM is SIGKILLed every 0.5 s$([[ $device == nvme ]] && echo ", alternating with injected faults (${faults[*]})")"
"$here/qemu-blk-fio.sh" --socket "$sock" --job fio-verify --seed "$seed" --fiosize "$fiosize" \
    --timeout "$tmo" --log "$tmp/console-run3.log" >"$tmp/run3.summary" &
guest_pid=$!
kills=0 injected=0 round=0
while kill -0 "$guest_pid" 2>/dev/null; do
    sleep 0.5
    round=$((round + 1))
    if [[ $device == nvme ]] && ((round % 2 == 0)); then
        fault=${faults[$(((round / 2) % ${#faults[@]}))]}
        if "$reflector" inject --control "$ctl" e2e "$fault" >/dev/null 2>&1; then injected=$((injected + 1)); fi
    elif "$reflector" kill --control "$ctl" e2e >/dev/null 2>&1; then
        kills=$((kills + 1))
    fi
done
wait "$guest_pid" || die "run 3 failed across $kills driver VM kills: see above and $tmp/console-run3.log"
if grep -E "E2E-DMESG: .*(I/O error|blk_update_request|critical)" "$tmp/console-run3.log"; then
    die "the guest kernel logged I/O errors (above) while driver VMs were killed"
fi
((kills >= 3)) || die "only $kills kills landed during run 3: the guest finished too fast to test anything"
status=$("$reflector" status --control "$ctl")
log "run 3: $(sed 's/^E2E-SUMMARY: //; s/ log=.*//' "$tmp/run3.summary")"
log "run 3: passed across $kills SIGKILLs of the driver VM and $injected injected faults; reflector status:"
printf '%s\n' "$status" >&2

grep -q "client connected" "$tmp/reflector.log" || die "the reflector never logged a client"
kill "$reflector_pid"
wait "$reflector_pid" 2>/dev/null || true
reflector_pid=''
if grep -E "panicked| ERROR " "$tmp/reflector.log"; then
    die "the reflector logged errors (above)"
fi
log "reflector stopped; checking the image on the host"
"$here/check-image.sh" --image-file "$img" --seed "$seed" --fiosize "$fiosize" --job fio-verify ||
    die "the image does not hold what the guest wrote"
ok=1
log "PASS"
