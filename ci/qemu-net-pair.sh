#!/usr/bin/env bash
# Boots TWO QEMU guests (TCG) with a virtio-net-pci device each on a
# vhost-user-net socket served by any backend that connects the two ports
# (the reflector's learning switch, or dpdk-testpmd forwarding port 0 <-> 1),
# and has them talk: the server (socket A, 10.0.0.1) listens with nc, the
# client (socket B, 10.0.0.2) pings it until it answers, measures ping RTT,
# then sends N MiB of random data with nc while a ping runs and eth0's
# carrier is sampled. The host compares the sha256 of what was sent with what
# was received. Exits 0 only when both guests report "E2E-RESULT: pass" and
# the checksums match.
#
# Usage: ci/qemu-net-pair.sh --sock-a PATH --sock-b PATH [options]
#   --sock-a PATH      vhost-user-net socket of the server guest (the backend listens)
#   --sock-b PATH      vhost-user-net socket of the client guest
#   --mib N            payload size in MiB (default 32)
#   --timeout SEC      bound for everything, guest build included (default 900)
#   --during CMD       host command (bash -c CMD) started in the background when
#                      the client reports the transfer started, stopped (SIGTERM to
#                      its pid and its process group, SIGKILL after 5 s) when the
#                      transfer ends; its output goes to LOGDIR/during.log
#   --ping-only        only the ping phases (RTT benchmark): no payload
#   --pings N          pings of the idle ping phase, 0.2 s apart (default 20)
#   --seed N           recorded in the logs (default: random)
#   --mac-a MAC        server MAC (default 52:54:00:00:00:01)
#   --mac-b MAC        client MAC (default 52:54:00:00:00:02)
#   --log-dir DIR      console logs (server.log, client.log, during.log); default a
#                      new /tmp/qemu-net-pair.XXXXXX, removed on success
#   --keep-logs        keep the logs on success too
#   --guest-dir DIR    guest built by ci/build-guest.sh (default target/e2e-guest;
#                      built on demand)
#   --mem MIB          RAM per guest (default 512)
# Env: E2E_ACCEL (default "tcg,thread=multi"), E2E_CPU (default "max"),
#      E2E_QEMU (default qemu-system-x86_64), E2E_QEMU_EXTRA (more QEMU
#      arguments for both guests, split on spaces).
#
# Progress and the guests' markers go to stderr; stdout gets one line:
#   E2E-NET-SUMMARY: result=pass mib=.. seconds=.. MiB/s=.. ping_loss=..%
#   ping_rtt_avg_ms=.. transfer_ping_loss=..% link_down_samples=.. ...
# (seconds: the client's nc, connect to the server's close, i.e. all data
# received; host_seconds: the same seen from the host's console polling).
# Logs are kept on failure (path in the summary line).
set -euo pipefail
export LC_ALL=C # also makes $EPOCHREALTIME use a decimal point

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)

log() { printf 'qemu-net-pair: %s\n' "$*" >&2; }
die() { printf 'qemu-net-pair: ERROR: %s\n' "$*" >&2; exit 1; }
dt() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

sock_a='' sock_b='' mib=32 tmo=900 during='' ping_only=0 pings=20 seed='' keep=0 logdir=''
mac_a=52:54:00:00:00:01 mac_b=52:54:00:00:00:02 guest=$repo/target/e2e-guest mem=512
ip_a=10.0.0.1 ip_b=10.0.0.2 port=5001
bios=/usr/share/qemu/qboot.rom # starts the kernel sooner than SeaBIOS
while (($#)); do
    case $1 in
    --sock-a) sock_a=${2:?--sock-a needs a path}; shift 2 ;;
    --sock-b) sock_b=${2:?--sock-b needs a path}; shift 2 ;;
    --mib) mib=${2:?--mib needs a number}; shift 2 ;;
    --timeout) tmo=${2:?--timeout needs seconds}; shift 2 ;;
    --during) during=${2:?--during needs a command}; shift 2 ;;
    --ping-only) ping_only=1; shift ;;
    --pings) pings=${2:?--pings needs a number}; shift 2 ;;
    --seed) seed=${2:?--seed needs a number}; shift 2 ;;
    --mac-a) mac_a=${2:?--mac-a needs a MAC}; shift 2 ;;
    --mac-b) mac_b=${2:?--mac-b needs a MAC}; shift 2 ;;
    --log-dir) logdir=${2:?--log-dir needs a directory}; shift 2 ;;
    --keep-logs) keep=1; shift ;;
    --guest-dir) guest=${2:?--guest-dir needs a directory}; shift 2 ;;
    --mem) mem=${2:?--mem needs MiB}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -n $sock_a && -n $sock_b ]] || die "--sock-a PATH and --sock-b PATH are required (see --help)"
[[ -z $seed ]] && seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
((ping_only)) && mib=0
for v in mib tmo pings seed mem; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v='${!v}' is not a number"
done
((ping_only || mib > 0)) || die "--mib must be > 0 (--ping-only for no payload)"
((pings > 0)) || die "--pings must be > 0"
((mib * 2 + 200 < mem)) || die "--mib $mib does not fit in the guest's ${mem} MiB of RAM (the payload is in tmpfs; raise --mem)"
for m in "$mac_a" "$mac_b"; do
    [[ $m =~ ^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$ ]] || die "'$m' is not a MAC address"
done
qemu=${E2E_QEMU:-qemu-system-x86_64}
command -v "$qemu" >/dev/null || die "$qemu not found: run ci/install-e2e-deps.sh (as root)"
[[ -f $bios ]] || bios=''

t_start=$EPOCHREALTIME
deadline=$((EPOCHSECONDS + tmo))
left() { echo $((deadline - EPOCHSECONDS)); }

# Guest kernel + initramfs (cached; a no-op when up to date).
timeout "$(left)" "$here/build-guest.sh" "$guest" || die "building the guest failed or timed out (see above)"
[[ -s $guest/vmlinux && -s $guest/initramfs.cpio ]] || die "guest files missing in $guest"
grep -qw virtio_net "$guest/modules" 2>/dev/null ||
    die "the guest in $guest has no virtio_net (E2E_GUEST_MODULES='$(cat "$guest/modules" 2>/dev/null)'): rebuild it with the default module list"

# The backend may still be starting: wait for its sockets, bounded.
for ((i = 0; i < 100; i++)); do [[ -S $sock_a && -S $sock_b ]] && break; sleep 0.1; done
for s in "$sock_a" "$sock_b"; do
    [[ -S $s ]] || die "$s is not a unix socket (after 10s): start the vhost-user-net backend first"
done

if [[ -z $logdir ]]; then
    logdir=$(mktemp -d /tmp/qemu-net-pair.XXXXXX)
else
    mkdir -p "$logdir"
fi
logdir=$(cd "$logdir" && pwd)
: >"$logdir/server.log"
: >"$logdir/client.log"
declare -A wrapper=() pidfile=() qlog=()
during_pid='' ok=0

qemu_pid() { # qemu_pid NAME: QEMU's own pid (the child of its timeout(1) wrapper)
    local p
    p=$(cat "${pidfile[$1]}" 2>/dev/null || true)
    # Only a QEMU started with our pidfile (guards against a reused pid).
    [[ -n $p ]] && grep -qF -- "${pidfile[$1]}" "/proc/$p/cmdline" 2>/dev/null && { echo "$p"; return 0; }
    pgrep -P "${wrapper[$1]}" | head -1 || true
}
running() { [[ -n ${wrapper[$1]:-} ]] && kill -0 "${wrapper[$1]}" 2>/dev/null; }
stop_guest() { # stop_guest NAME: SIGTERM to QEMU, SIGKILL after 5 s
    local p i
    running "$1" || return 0
    p=$(qemu_pid "$1")
    kill -TERM "${p:-${wrapper[$1]}}" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        running "$1" || break
        sleep 0.1
    done
    if running "$1"; then
        log "QEMU ($1) ignored SIGTERM for 5s (blocked on the vhost-user backend?): SIGKILL"
        p=$(qemu_pid "$1")
        kill -KILL ${p:+"$p"} "${wrapper[$1]}" 2>/dev/null || true
    fi
}
reap_guest() { # reap_guest NAME: wait for the wrapper
    [[ -n ${wrapper[$1]:-} ]] || return 0
    wait "${wrapper[$1]}" 2>/dev/null || true # (2>/dev/null: no "Killed" notice from bash)
    wrapper[$1]=''
}
stop_during() {
    local i
    [[ -n $during_pid ]] || return 0
    # timeout(1) passes the signal to its whole process group: the command's children too.
    kill -TERM "$during_pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$during_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$during_pid" 2>/dev/null || true
    wait "$during_pid" 2>/dev/null || true
    during_pid=''
}
cleanup() {
    in_cleanup=1
    set +e # best effort from here on; never stop half-way
    stop_during
    for n in server client; do
        stop_guest "$n"
        reap_guest "$n"
        rm -f "${pidfile[$n]:-}"
    done
    if ((ok && !keep)); then
        rm -rf "$logdir"
    elif ((!ok)); then
        log "logs kept in $logdir (server.log, client.log${during:+, during.log})"
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
    log "interrupted by a signal: stopping both guests"
    exit 130
}
trap on_signal INT TERM

# The guests' own bounds leave time to report and power off.
budget=$(left)
((budget > 60)) || die "--timeout $tmo leaves ${budget}s after the guest build: too little"
# The client gives up first (its diagnosis is the more precise one): the
# server waits 30 s longer for the connection than the client for the transfer.
xfertimeout=$((budget > 180 ? budget - 90 : budget / 2))
netwait=$((xfertimeout / 2 < 120 ? xfertimeout / 2 : 120))
start_guest() { # start_guest NAME SOCK MAC KERNEL-ARGS
    local name=$1 sock=$2 mac=$3 append=$4 args
    qlog[$name]=$logdir/$name.log
    pidfile[$name]=$(mktemp /tmp/qemu-net-pair.XXXXXX.pid)
    args=(
        -nodefaults -no-user-config -display none -no-reboot -monitor none
        -accel "${E2E_ACCEL:-tcg,thread=multi}" -cpu "${E2E_CPU:-max}" -smp 1 -m "${mem}M"
        -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -numa node,memdev=mem
        ${bios:+-bios "$bios"} -kernel "$guest/vmlinux" -initrd "$guest/initramfs.cpio"
        -append "console=ttyS0 quiet panic=-1 $append"
        -chardev "socket,id=c1,path=$sock" -netdev vhost-user,id=n0,chardev=c1
        -device "virtio-net-pci,netdev=n0,mac=$mac,romfile="
        -serial "file:${qlog[$name]}" -pidfile "${pidfile[$name]}"
    )
    # shellcheck disable=SC2206
    [[ -n ${E2E_QEMU_EXTRA:-} ]] && args+=($E2E_QEMU_EXTRA)
    # timeout(1) is a second bound should this script be killed.
    timeout -k 10 $(($(left) + 30)) "$qemu" "${args[@]}" &
    wrapper[$name]=$!
}
common="mib=$mib seed=$seed port=$port netwait=$netwait"
log "mib=$mib seed=$seed ${during:+during=\"$during\" }sockets A=$sock_a B=$sock_b timeout=${tmo}s logs=$logdir"
t_boot=$EPOCHREALTIME
start_guest server "$sock_a" "$mac_a" "job=net-server ip=$ip_a peer=$ip_b xfertimeout=$((xfertimeout + 30)) $common"
start_guest client "$sock_b" "$mac_b" "job=net-client ip=$ip_b peer=$ip_a xfertimeout=$xfertimeout pings=$pings $common"

# ---- wait on the console markers (bounded polling) --------------------------------
has() { grep -q -a "$2" "${qlog[$1]}" 2>/dev/null; }
line() { grep -a "$2" "${qlog[$1]}" 2>/dev/null | tail -1 | tr -d '\r' || true; }
field() { # field LINE KEY: the value of KEY=VALUE in LINE
    sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<"$1" | head -1
}
declare -A t_init=() t_result=() exited=()
t_xs='' t_xe='' t_re='' status='' why=''
while :; do
    for n in server client; do
        if [[ -z ${t_init[$n]:-} ]] && has "$n" '^E2E-INIT:'; then
            t_init[$n]=$EPOCHREALTIME
            log "$n: /init reached after $(dt "$t_boot" "${t_init[$n]}")s"
        fi
        if [[ -z ${t_result[$n]:-} ]] && has "$n" '^E2E-RESULT:'; then
            t_result[$n]=$EPOCHREALTIME
            log "$n: $(line "$n" '^E2E-RESULT:') after $(dt "$t_boot" "${t_result[$n]}")s"
        fi
        if [[ -z ${exited[$n]:-} ]] && ! running "$n"; then
            exited[$n]=1
            [[ -n ${t_result[$n]:-} ]] || has "$n" '^E2E-RESULT:' || {
                status=fail why="QEMU ($n) exited without an E2E-RESULT line: kernel panic, QEMU error (see its log; is the socket a vhost-user-net backend?)"
            }
        fi
    done
    if [[ -z $t_xs ]] && has client '^E2E-NET: transfer-start'; then
        t_xs=$EPOCHREALTIME
        log "client: transfer of $mib MiB started"
        if [[ -n $during ]]; then
            log "starting --during command: $during (output: $logdir/during.log)"
            timeout -k 5 "$(left)" bash -c "$during" >"$logdir/during.log" 2>&1 </dev/null &
            during_pid=$!
        fi
    fi
    if [[ -n $t_xs && -z $t_re ]] && has server '^E2E-NET: recv-end'; then
        t_re=$EPOCHREALTIME
    fi
    if [[ -n $t_xs && -z $t_xe ]] && { has client '^E2E-NET: transfer-end' || [[ -n ${t_result[client]:-} ]]; }; then
        t_xe=$EPOCHREALTIME
        if has client '^E2E-NET: transfer-end'; then
            log "client: $(line client '^E2E-NET: transfer-end')"
        else
            log "client: transfer ended without a transfer-end marker (client result in)"
        fi
        stop_during
    fi
    [[ -n $status ]] && break
    # A guest that failed ends the run: the other one may wait for it until its own bound.
    for n in server client; do
        if [[ -n ${t_result[$n]:-} ]] && ! has "$n" '^E2E-RESULT: pass'; then
            status=fail why="$n reported: $(line "$n" '^E2E-RESULT:' | sed 's/^E2E-RESULT: //')"
        fi
    done
    [[ -n $status ]] && break
    [[ -n ${exited[server]:-} && -n ${exited[client]:-} ]] && break
    [[ -n ${t_result[server]:-} && -n ${t_result[client]:-} ]] && break # both passed
    if ((EPOCHSECONDS >= deadline)); then
        status=timeout
        break
    fi
    sleep 0.1
done
stop_during
# Both passed: the guests power off by themselves; give them a bounded grace.
# Otherwise stop them now.
for n in server client; do
    if [[ -z $status ]]; then
        for ((i = 0; i < 300; i++)); do running "$n" || break; sleep 0.1; done
        running "$n" && log "QEMU ($n) did not power off 30s after its result: stopping it"
    fi
    stop_guest "$n"
    reap_guest "$n"
done
t_end=$EPOCHREALTIME

# ---- report ------------------------------------------------------------------------
for n in server client; do
    grep -a -E '^E2E-(INIT|JOB|NET|PING|LINK|TIME|DMESG|RESULT):' "${qlog[$n]}" | tr -d '\r' | sed "s/^/  $n: /" >&2 || true
done
fail() {
    log "FAIL: $*"
    for n in server client; do
        log "last lines of the $n console log ${qlog[$n]}:"
        tail -n 15 "${qlog[$n]}" | tr -d '\r' | sed 's/^/  | /' >&2
    done
    printf 'E2E-NET-SUMMARY: result=fail mib=%s seed=%s reason="%s" logs=%s\n' "$mib" "$seed" "$*" "$logdir"
    exit 1
}
where() { # how far the pair got
    if ! has server '^E2E-INIT:' || ! has client '^E2E-INIT:'; then
        echo "a guest never reached /init (QEMU blocked in the vhost-user handshake, or the kernel hung)"
    elif ! has server '^E2E-NET: eth0 up' || ! has client '^E2E-NET: eth0 up'; then
        echo "eth0 did not come up in a guest"
    elif ! has client '^E2E-PING: first-answer'; then
        echo "the client never got a ping answer from the server (backend not forwarding?)"
    elif has client '^E2E-NET: transfer-start' && ! has client '^E2E-NET: transfer-end'; then
        echo "the transfer did not finish (backend stuck or dropping everything?)"
    elif [[ $status == timeout ]]; then
        echo "a guest did not report a result"
    fi
}
[[ $status == timeout ]] && fail "timeout after ${tmo}s: $(where); QEMU was killed"
w=$(where)
[[ -z $status ]] || fail "$why${w:+ ($w)}"
for n in server client; do
    has "$n" '^E2E-RESULT: pass' || fail "$n did not report a result (QEMU exited)"
done
sent=$(line client '^E2E-NET: sent ') recv=$(line server '^E2E-NET: received ')
s_sum=$(field "$sent" sha256) r_sum=$(field "$recv" sha256)
s_bytes=$(field "$sent" bytes) r_bytes=$(field "$recv" bytes)
[[ -n $s_sum && -n $r_sum ]] || fail "missing sha256 lines (client: '$sent', server: '$recv')"
[[ $s_bytes == "$((mib * 1048576))" ]] || fail "the client sent $s_bytes bytes, expected $((mib * 1048576))"
[[ $s_sum == "$r_sum" && $s_bytes == "$r_bytes" ]] ||
    fail "data corrupted: sent bytes=$s_bytes sha256=$s_sum, received bytes=$r_bytes sha256=$r_sum"

idle=$(line client '^E2E-PING: phase=idle')
first=$(line client '^E2E-PING: first-answer')
boot_s=$(dt "$t_boot" "$(printf '%s\n' "${t_init[server]}" "${t_init[client]}" | sort -n | tail -1)")
total_s=$(dt "$t_start" "$t_end")
if ((ping_only)); then
    log "PASS: ping only, $pings pings: ${idle#E2E-PING: }; total ${total_s}s"
    printf 'E2E-NET-SUMMARY: result=pass mode=ping-only pings=%s ping_loss=%s%% ping_rtt_min_ms=%s ping_rtt_avg_ms=%s ping_rtt_max_ms=%s ping_rtt_p50_ms=%s ping_rtt_p90_ms=%s first_answer_s=%s boot_to_init_s=%s total_s=%s logs=%s\n' \
        "$pings" "$(field "$idle" loss | tr -d %)" "$(field "$idle" rtt_min_ms)" "$(field "$idle" rtt_avg_ms)" "$(field "$idle" rtt_max_ms)" \
        "$(field "$idle" rtt_p50_ms)" "$(field "$idle" rtt_p90_ms)" \
        "$(field "$first" after | tr -d s)" "$boot_s" "$total_s" "$( ((keep)) && echo "$logdir" || echo -)"
    ok=1
    exit 0
fi
xend=$(line client '^E2E-NET: transfer-end')
xping=$(line client '^E2E-PING: phase=during-transfer')
link=$(line client '^E2E-LINK:')
secs=$(field "$xend" seconds)
rate=$(awk -v m="$mib" -v s="$secs" 'BEGIN { printf "%.2f", (s > 0 ? m / s : 0) }')
host_secs=$([[ -n $t_re ]] && dt "$t_xs" "$t_re" || echo -)
log "PASS: $mib MiB in ${secs}s (${rate} MiB/s; host saw ${host_secs}s), sha256 match; total ${total_s}s"
printf 'E2E-NET-SUMMARY: result=pass mib=%s seconds=%s MiB/s=%s ping_loss=%s%% ping_rtt_avg_ms=%s transfer_ping_loss=%s%% link_down_samples=%s link_samples=%s ping_rtt_min_ms=%s ping_rtt_max_ms=%s ping_rtt_p50_ms=%s transfer_ping_rtt_avg_ms=%s transfer_ping_rtt_max_ms=%s host_seconds=%s first_answer_s=%s boot_to_init_s=%s total_s=%s seed=%s logs=%s\n' \
    "$mib" "$secs" "$rate" "$(field "$idle" loss | tr -d %)" "$(field "$idle" rtt_avg_ms)" \
    "$(field "$xping" loss | tr -d %)" "$(field "$link" down_samples)" "$(field "$link" samples)" \
    "$(field "$idle" rtt_min_ms)" "$(field "$idle" rtt_max_ms)" "$(field "$idle" rtt_p50_ms)" "$(field "$xping" rtt_avg_ms)" "$(field "$xping" rtt_max_ms)" \
    "$host_secs" "$(field "$first" after | tr -d s)" "$boot_s" "$total_s" "$seed" "$( ((keep)) && echo "$logdir" || echo -)"
ok=1
exit 0
