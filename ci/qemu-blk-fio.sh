#!/usr/bin/env bash
# Boots a real QEMU guest (TCG) with a vhost-user-blk-pci device on a
# vhost-user socket served by any backend, runs a job in the guest (fio with
# crc32c verify by default), and exits 0 only when the guest reports
# "E2E-RESULT: pass" (and, with --image-file, when the host finds in the image
# what the guest wrote).
#
# Usage: ci/qemu-blk-fio.sh --socket SOCK [options]
#   --socket SOCK        vhost-user-blk unix socket (the backend listens on it)
#   --image-file IMG     raw image behind the backend: after QEMU exits, check on
#                        the host that the guest's data is in it
#   --job JOB            fio-verify (default) | verify-only | write-pattern | shell-exit
#   --timeout SEC        bound for the whole guest run; QEMU is killed after it (default 600)
#   --log FILE           serial console log (default: a file under /tmp, removed
#                        on success, kept on failure)
#   --seed N             seed of the data written (default: random); verify-only
#                        needs the seed of the earlier fio-verify run
#   --fiosize MIB        size of the fio region (default 48)
#   --iodepth N          fio iodepth in the guest (default 32)
#   --reconnect-ms MS    add reconnect-ms=MS to the chardev (env E2E_RECONNECT_MS;
#                        --reconnect is short for --reconnect-ms 1000)
#   --guest-dir DIR      guest built by ci/build-guest.sh (default target/e2e-guest;
#                        built on demand)
#   --bzimage            boot vmlinuz instead of vmlinux (PVH)
#   --seabios            QEMU's default firmware instead of qboot
#   --smp N              guest vCPUs (default 1: the machine has 2 cores)
#   --mem MIB            guest RAM (default 512)
#   --num-queues N       virtqueues of the device (default 1)
# Env: E2E_ACCEL (default "tcg,thread=multi"; e.g. "kvm" on hardware KVM),
#      E2E_CPU (default "max"; "host" with kvm), E2E_QEMU (default qemu-system-x86_64),
#      E2E_QEMU_EXTRA (more QEMU arguments, split on spaces).
#
# With --image-file (raw), after QEMU exits, ci/check-image.sh checks on the
# host that the image holds the run's stamp and fio's verified blocks.
# Progress and the guest's markers go to stderr; on success one line
# "E2E-SUMMARY: result=pass job=... boot_to_init_s=... write_iops=..." goes to stdout.
set -euo pipefail
export LC_ALL=C # also makes $EPOCHREALTIME use a decimal point

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
. "$here/e2e-common.sh"

log() { printf 'qemu-blk-fio: %s\n' "$*" >&2; }
die() { printf 'qemu-blk-fio: ERROR: %s\n' "$*" >&2; exit 1; }
dt() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

sock='' image='' job=fio-verify tmo=600 logf='' seed='' fiosize=$E2E_FIO_DEFAULT_MIB iodepth=32
reconnect=${E2E_RECONNECT_MS:-} guest=$repo/target/e2e-guest kernel=vmlinux smp=1 mem=512 nq=1
# qboot (shipped with QEMU) starts the kernel about 0.4 s sooner than SeaBIOS.
bios=/usr/share/qemu/qboot.rom
while (($#)); do
    case $1 in
    --socket) sock=${2:?--socket needs a path}; shift 2 ;;
    --image-file) image=${2:?--image-file needs a path}; shift 2 ;;
    --job) job=${2:?--job needs a name}; shift 2 ;;
    --timeout) tmo=${2:?--timeout needs seconds}; shift 2 ;;
    --log) logf=${2:?--log needs a path}; shift 2 ;;
    --seed) seed=${2:?--seed needs a number}; shift 2 ;;
    --fiosize) fiosize=${2:?--fiosize needs MiB}; shift 2 ;;
    --iodepth) iodepth=${2:?--iodepth needs a number}; shift 2 ;;
    --reconnect) reconnect=1000; shift ;;
    --reconnect-ms) reconnect=${2:?--reconnect-ms needs milliseconds}; shift 2 ;;
    --guest-dir) guest=${2:?--guest-dir needs a directory}; shift 2 ;;
    --bzimage) kernel=vmlinuz; shift ;;
    --seabios) bios=''; shift ;;
    --smp) smp=${2:?--smp needs a number}; shift 2 ;;
    --mem) mem=${2:?--mem needs MiB}; shift 2 ;;
    --num-queues) nq=${2:?--num-queues needs a number}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -n $sock ]] || die "--socket SOCK is required (see --help)"
case $job in fio-verify | verify-only | write-pattern | shell-exit) ;; *) die "unknown --job '$job' (fio-verify, verify-only, write-pattern, shell-exit)" ;; esac
[[ -z $seed ]] && seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
for v in tmo seed fiosize iodepth smp mem nq; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v='${!v}' is not a number"
done
[[ -z $reconnect || $reconnect =~ ^[0-9]+$ ]] || die "reconnect-ms '$reconnect' is not a number"
qemu=${E2E_QEMU:-qemu-system-x86_64}
command -v "$qemu" >/dev/null || die "$qemu not found: run ci/install-e2e-deps.sh (as root)"
[[ -z $bios || -f $bios ]] || bios=''
if [[ -n $image ]]; then
    [[ -f $image ]] || die "--image-file $image does not exist"
    command -v fio >/dev/null || die "fio not found on the host (needed for the image check): run ci/install-e2e-deps.sh"
fi

# Guest kernel + initramfs (cached; a no-op when up to date).
timeout 900 "$here/build-guest.sh" "$guest" || die "building the guest failed (see above)"
[[ -s $guest/$kernel && -s $guest/initramfs.cpio ]] || die "guest files missing in $guest"

# The backend may still be starting: wait for its socket, bounded.
for ((i = 0; i < 100; i++)); do [[ -S $sock ]] && break; sleep 0.1; done
[[ -S $sock ]] || die "$sock is not a unix socket (after 10s): start the vhost-user-blk backend first"

tmplog=0
if [[ -z $logf ]]; then
    logf=$(mktemp /tmp/qemu-blk-fio.XXXXXX.log)
    tmplog=1 # removed on success, kept on failure
else
    mkdir -p "$(dirname "$logf")"
    : >"$logf"
fi
qpidf=$(mktemp /tmp/qemu-blk-fio.XXXXXX.pid)
qpid=''
qemu_pid() { # QEMU's own pid: the child of our timeout(1) wrapper $qpid
    local p
    p=$(cat "$qpidf" 2>/dev/null || true)
    # Only a QEMU started with our pidfile (guards against a reused pid).
    [[ -n $p ]] && grep -qF -- "$qpidf" "/proc/$p/cmdline" 2>/dev/null && { echo "$p"; return 0; }
    pgrep -P "$qpid" | head -1 || true
}
stop_qemu() { # SIGTERM to QEMU, SIGKILL after 5s (a stuck backend can block its exit)
    local p i
    p=$(qemu_pid)
    kill -TERM "${p:-$qpid}" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$qpid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$qpid" 2>/dev/null; then
        log "QEMU ignored SIGTERM for 5s (blocked on the vhost-user backend?): SIGKILL"
        p=$(qemu_pid)
        kill -KILL ${p:+"$p"} "$qpid" 2>/dev/null || true
    fi
}
cleanup() {
    in_cleanup=1
    set +e # best effort from here on; never stop half-way
    if [[ -n $qpid ]] && kill -0 "$qpid" 2>/dev/null; then
        stop_qemu
        wait "$qpid" 2>/dev/null || true
    fi
    rm -f "$qpidf"
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
    log "interrupted by a signal: stopping QEMU${logf:+ (console log kept: $logf)}"
    exit 130
}
trap on_signal INT TERM

# The guest's own fio bound leaves time to report and power off.
fiotimeout=$((tmo > 120 ? tmo - 60 : tmo / 2))
chardev="socket,id=c0,path=$sock"
[[ -n $reconnect ]] && chardev+=",reconnect-ms=$reconnect"
args=(
    -nodefaults -no-user-config -display none -no-reboot -monitor none
    -accel "${E2E_ACCEL:-tcg,thread=multi}" -cpu "${E2E_CPU:-max}" -smp "$smp" -m "${mem}M"
    -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -numa node,memdev=mem
    ${bios:+-bios "$bios"} -kernel "$guest/$kernel" -initrd "$guest/initramfs.cpio"
    -append "console=ttyS0 quiet panic=-1 job=$job seed=$seed fiosize=$fiosize iodepth=$iodepth fiotimeout=$fiotimeout"
    -chardev "$chardev" -device "vhost-user-blk-pci,chardev=c0,num-queues=$nq"
    -serial "file:$logf" -pidfile "$qpidf"
)
# shellcheck disable=SC2206
[[ -n ${E2E_QEMU_EXTRA:-} ]] && args+=($E2E_QEMU_EXTRA)
log "job=$job seed=$seed socket=$sock${reconnect:+ reconnect-ms=$reconnect} timeout=${tmo}s log=$logf"
t_start=$EPOCHREALTIME
# timeout(1) is a second bound should this script be killed.
timeout -k 10 $((tmo + 30)) "$qemu" "${args[@]}" &
qpid=$!

t_init='' t_result='' status=''
deadline=$(awk -v s="$t_start" -v t="$tmo" 'BEGIN { printf "%d", s + t }')
while kill -0 "$qpid" 2>/dev/null; do
    if [[ -z $t_init ]] && grep -q '^E2E-INIT:' "$logf" 2>/dev/null; then
        t_init=$EPOCHREALTIME
        log "guest /init reached after $(dt "$t_start" "$t_init")s"
    fi
    if [[ -z $t_result ]] && grep -q '^E2E-RESULT:' "$logf" 2>/dev/null; then
        t_result=$EPOCHREALTIME
        # The guest powers off right after; give it a bounded grace period.
        deadline=$((EPOCHSECONDS + 30))
    fi
    if ((EPOCHSECONDS >= deadline)); then
        if [[ -z $t_result ]]; then
            log "TIMEOUT: no result after ${tmo}s: stopping QEMU"
            status=timeout
        else
            log "QEMU did not exit 30s after the result: stopping it"
        fi
        stop_qemu
        break
    fi
    sleep 0.2
done
qrc=0
wait "$qpid" 2>/dev/null || qrc=$? # (2>/dev/null: no "Killed" notice from bash)
qpid=''
t_end=$EPOCHREALTIME

# Polling can miss a marker when QEMU exits within one poll interval.
[[ -z $t_init ]] && grep -q '^E2E-INIT:' "$logf" && t_init=$t_end
[[ -z $t_result ]] && grep -q '^E2E-RESULT:' "$logf" && t_result=$t_end

# ---- report --------------------------------------------------------------------
result=$(grep -a '^E2E-RESULT:' "$logf" | tail -1 | tr -d '\r' || true)
grep -a -E '^E2E-(INIT|JOB|DEV|TIME|FIO|STAMP|DMESG):' "$logf" | tr -d '\r' | sed 's/^/  guest: /' >&2 || true
log "timings: QEMU start to /init $([[ -n $t_init ]] && dt "$t_start" "$t_init" || echo '?')s," \
    "to result $([[ -n $t_result ]] && dt "$t_start" "$t_result" || echo '?')s, QEMU exit $(dt "$t_start" "$t_end")s (status $qrc)"

fail() {
    log "FAIL: $*"
    log "last lines of the console log $logf:"
    tail -n 25 "$logf" | tr -d '\r' | sed 's/^/  | /' >&2
    printf 'E2E-SUMMARY: result=fail job=%s seed=%s reason="%s" log=%s\n' "$job" "$seed" "$*" "$logf"
    exit 1
}
if [[ $status == timeout ]]; then
    if ! grep -q '^E2E-INIT:' "$logf"; then
        where="the guest never reached /init (QEMU blocked in the vhost-user handshake with the backend, or the kernel hung)"
    elif ! grep -q '^E2E-DEV:' "$logf"; then
        where="the guest reached /init but /dev/vda never appeared"
    elif grep -q '^E2E-TIME: fio start' "$logf" && ! grep -q '^E2E-TIME: fio end' "$logf"; then
        where="fio in the guest did not finish (I/O hang: backend stuck or not completing requests?)"
    else
        where="the guest did not report a result"
    fi
    fail "timeout after ${tmo}s: $where; QEMU was killed"
fi
[[ -n $result ]] || fail "QEMU exited (status $qrc) without an E2E-RESULT line: kernel panic, QEMU error (is the socket a vhost-user-blk backend?) or wrong guest files"
[[ $result == 'E2E-RESULT: pass' ]] || fail "guest reported: ${result#E2E-RESULT: }"

# ---- host-side data check ----------------------------------------------------------
if [[ -n $image && $job != shell-exit ]]; then
    "$here/check-image.sh" --image-file "$image" --seed "$seed" --fiosize "$fiosize" --job "$job" ||
        fail "host check: $image does not hold what the guest wrote (see check-image above)"
fi
t_done=$EPOCHREALTIME
log "PASS: job=$job seed=$seed total $(dt "$t_start" "$t_done")s"
# One machine-readable line on stdout.
fio_field() { # fio_field write|read IOPS|BW
    grep -a "^E2E-FIO: $1" "$logf" | sed -n "s/.*$2=\([^,) ]*\).*/\1/p" | head -1 || true
}
printf 'E2E-SUMMARY: result=pass job=%s seed=%s boot_to_init_s=%s result_s=%s total_s=%s write_iops=%s write_bw=%s verify_iops=%s verify_bw=%s log=%s\n' \
    "$job" "$seed" "$(dt "$t_start" "$t_init")" "$(dt "$t_start" "$t_result")" "$(dt "$t_start" "$t_done")" \
    "$(fio_field write IOPS)" "$(fio_field write BW)" "$(fio_field read IOPS)" "$(fio_field read BW)" \
    "$( ((tmplog)) && echo - || echo "$logf")"
((tmplog)) && rm -f "$logf"
exit 0
