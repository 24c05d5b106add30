#!/usr/bin/env bash
# Where the time goes (not a test): runs one backend under one load, samples
# every CPU with perf (`perf record -a -g`, software clock, 999 Hz) over the
# steady part of the run, and prints how much of the machine each thread
# took (in cores, its thread name as perf saw it) and the functions that
# took the most, by thread. perf.data and the full report stay in --out.
#
# Targets (the backends of ci/bench-blk.sh, ci/bench-net.sh and
# ci/bench-recovery.sh, started the same way):
#   sim | direct | nvme | uring | qsd | qsd-u   a block backend under blk-load
#       (--job, --bs, --qd: default a 128k sequential read at QD16; the
#       client sleeps on its call eventfd, as in ci/bench-blk.sh)
#   net | e1000e | testpmd   64-byte frames (--size) through two ports,
#       net-load pinned to CPU 0 as in ci/bench-net.sh; net and e1000e are
#       two net driver VMs on one switch (the simulated card or QEMU's
#       e1000e), testpmd the peer; --pingpong keeps one frame in flight
#   failover   SIGKILLs of a block driver VM with a warm spare (--kills,
#       one every 110-130 ms) under verified load: what the machine does
#       around each failover (ci/bench-recovery.sh times its phases)
#
# With --sched, perf records the scheduler's switches and wake-ups instead
# (`perf sched record`) and prints how long each thread waited for a CPU
# once woken (`perf sched latency`): where a latency tail comes from.
#
# How to read it: each thread's CPU comes from the kernel's account over the
# sampling window (ci/cpu-tree.py --threads), a vCPU's guest time shown
# apart: perf files the samples it takes in a kvm-pvm guest under the guest
# (`perf kvm --guest --host report -i DIR/perf.data` shows them as the
# vCPU's ":TID", with bare guest addresses), so its host report, where the
# functions come from, leaves them out. A thread's `[k]` symbols are its
# system calls and wake-ups, `[.]` its own code; a vCPU's `[k]` its exits
# and kvm-pvm's world switches. The guests' samples come last, named by
# source location from the image each vCPU ran (ci/guest-profile.py, `vmm
# locate`); a world switch is filed under the guest instruction that caused
# it (a doorbell's write, the sleep's `in`).
#
# The binaries are target/release's (cargo build --release); BIN=DIR takes
# them from DIR instead. EXTRA=",KEY=VALUE..." adds options to the devices
# of sim, direct and net (EXTRA=",driver_args=poll-us=0": a driver that
# sleeps as soon as it is idle).
#
# Usage: ci/profile.sh TARGET [--seconds S] [--job J --bs B --qd Q] [--size BYTES] [--pingpong]
#                             [--kills N] [--sched] [--top N] [--out DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=ci/peers.sh
source "$here/peers.sh"
log() { printf 'profile: %s\n' "$*" >&2; }
die() { printf 'profile: FAIL: %s\n' "$*" >&2; exit 1; }

target=${1:-}
[[ -n $target && $target != -* ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
shift
seconds=3 job=read bs=128k qd=16 size=64 kills=100 top=25 out='' sched=0 pingpong=()
while (($#)); do
    case $1 in
    --seconds) seconds=${2:?}; shift 2 ;;
    --job) job=${2:?}; shift 2 ;;
    --bs) bs=${2:?}; shift 2 ;;
    --qd) qd=${2:?}; shift 2 ;;
    --size) size=${2:?}; shift 2 ;;
    --kills) kills=${2:?}; shift 2 ;;
    --top) top=${2:?}; shift 2 ;;
    --sched) sched=1; shift ;;
    --pingpong) pingpong=(--pingpong); shift ;;
    --out) out=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case $target in
sim | direct | nvme | uring | qsd | qsd-u | net | e1000e | testpmd | failover) ;;
*) die "unknown target '$target' (see --help)" ;;
esac
[[ $seconds =~ ^[1-9][0-9]*$ ]] || die "--seconds wants a whole number of seconds, not '$seconds'"
[[ $kills =~ ^[1-9][0-9]*$ ]] || die "--kills wants a positive integer, not '$kills'"
[[ $top =~ ^[1-9][0-9]*$ ]] || die "--top wants a positive integer, not '$top'"
[[ $size =~ ^[1-9][0-9]*$ ]] || die "--size wants a frame size in bytes, not '$size'"
command -v perf >/dev/null || die "perf missing (apt-get install linux-perf)"
bin=${BIN:-$repo/target/release}
for tool in reflector vmm blk-load net-load; do
    [[ -x $bin/$tool ]] || die "$bin/$tool missing: cargo build --release"
done

tmp=$(mktemp -d /tmp/profile.XXXXXX)
out=${out:-$tmp/out}
mkdir -p "$out"
pids=() load_pid=''
cleanup() {
    for pid in "${pids[@]}" ${load_pid:-}; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ $out == "$tmp/out" ]] && log "perf.data and report: not kept (give --out DIR to keep them)"
    rm -rf "$tmp"
}
trap cleanup EXIT

wait_for() { # pid file [pattern]
    for _ in $(seq 600); do
        [[ -S $2 ]] && { [[ -z ${3:-} ]] || grep -q "$3" "$tmp/backend.log"; } && return 0
        kill -0 "$1" 2>/dev/null || die "the backend exited: $(tail -3 "$tmp/backend.log")"
        sleep 0.1
    done
    die "the backend did not serve $2"
}
serve() { # reflector serve arguments...
    timeout 3600 "$bin/reflector" serve "$@" >"$tmp/backend.log" 2>&1 &
    pids+=($!)
}

# Starts the target's backend and load in the background; sets `load_pid`
# and `what`.
sock=$tmp/blk.sock img=$tmp/disk.img
start_blk() { # reflector --blk extras, or qsd AIO
    timeout 120 dd if=/dev/urandom of="$img" bs=1M count=256 status=none
    case $target in
    qsd | qsd-u)
        command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon missing: ci/install-e2e-deps.sh"
        qsd_command "$img" "$sock" "$1"
        timeout 3600 "${qsd[@]}" >"$tmp/backend.log" 2>&1 &
        pids+=($!)
        wait_for "$!" "$sock"
        ;;
    *)
        serve --blk "socket=$sock,image=$img,name=bench$1"
        wait_for "${pids[-1]}" "$sock" "${2:-controller ready}"
        ;;
    esac
    timeout $((seconds + 120)) "$bin/blk-load" --socket "$sock" --queue-size 1024 --seconds $((seconds + 2)) \
        --spin-us 0 --job "$job" --bs "$bs" --qd "$qd" >"$tmp/load.out" 2>&1 &
    load_pid=$!
    what="$job $bs QD$qd (blk-load)"
}
start_net() { # reflector --net extras
    local s0=$tmp/n0.sock s1=$tmp/n1.sock pin=()
    command -v taskset >/dev/null && pin=(taskset -c 0)
    if [[ $target == testpmd ]]; then
        local pmds testpmd
        testpmd=$(command -v dpdk-testpmd) || die "dpdk-testpmd missing (apt-get install dpdk)"
        pmds=$(dpdk_pmds) || die "DPDK's vhost driver not found (set DPDK_PMDS=DIR)"
        mkfifo -m 600 "$tmp/testpmd.in"
        testpmd_command "$testpmd" "$pmds" "profile$$" "$s0" "$s1"
        timeout -k 5 3600 "${testpmd_args[@]}" <"$tmp/testpmd.in" >"$tmp/backend.log" 2>&1 &
        pids+=($!)
        exec {testpmd_input}>"$tmp/testpmd.in"
    else
        serve --net "socket=$s0,mac=52:54:00:00:00:01,switch=bench$1" \
            --net "socket=$s1,mac=52:54:00:00:00:02,switch=bench$1"
    fi
    wait_for "${pids[-1]}" "$s0"
    wait_for "${pids[-1]}" "$s1"
    timeout $((seconds + 120)) "${pin[@]}" "$bin/net-load" --tx "$s0" --rx "$s1" --seconds $((seconds + 2)) \
        --size "$size" "${pingpong[@]}" >"$tmp/load.out" 2>&1 &
    load_pid=$!
    what="$size-byte frames through two ports (net-load${pingpong:+ --pingpong: one frame in flight})"
}
start_failover() {
    serve --control "$tmp/ctl" --blk "socket=$sock,image=$img,size=256M,name=bench,fault_budget=1000000,spare=warm"
    wait_for "${pids[-1]}" "$tmp/ctl"
    timeout $((kills + 120)) "$bin/reflector" chaos --control "$tmp/ctl" --device bench --socket "$sock" \
        --kinds kill --faults "$kills" --seed 1 --min-gap-ms 110 --max-gap-ms 130 >"$tmp/load.out" 2>&1 &
    load_pid=$!
    # Sample the whole run: about 120 ms a kill.
    seconds=$(((kills * 125 + 999) / 1000))
    what="$kills SIGKILLs of a driver VM with a warm spare under verified load (reflector chaos)"
}

case $target in
sim) start_blk "${EXTRA:-}" ;;
direct) start_blk ",dma=direct${EXTRA:-}" ;;
nvme) start_blk ",device=nvme" "nvme: serving channel generation" ;;
uring) start_blk ",device=nvme,aio=io_uring" "nvme: serving channel generation" ;;
qsd) start_blk threads ;;
qsd-u) start_blk io_uring ;;
net) start_net "${EXTRA:-}" ;;
e1000e) start_net ",device=e1000e" ;;
testpmd) start_net "" ;;
failover) start_failover ;;
esac

# The load's first second is its warm-up (connections, the first requests):
# sample after it. Not a synchronisation: a measurement window.
[[ $target == failover ]] || sleep 1
if ((sched)); then
    log "$target: $what; recording the scheduler's switches and wake-ups for $seconds s"
    perf sched record -o "$out/perf.data" -- sleep "$seconds" 2>"$tmp/perf.log" >/dev/null &
    pids+=($!)
    wait "${pids[-1]}" || die "perf sched record failed: $(tail -3 "$tmp/perf.log")"
    wait "$load_pid" || die "the load failed: $(tail -5 "$tmp/load.out")"
    grep -v '^$' "$tmp/load.out" | tail -12
    perf sched latency -i "$out/perf.data" --sort max >"$out/report.txt" 2>/dev/null
    echo
    echo "how long threads waited for a CPU once woken (perf sched latency; the $top longest waits):"
    grep -E '^ +(Task|-----)|\|' "$out/report.txt" | head -n $((top + 2))
    [[ $out == "$tmp/out" ]] || log "perf.data and the full report (report.txt) are in $out"
    exit 0
fi
log "$target: $what; sampling every CPU for $seconds s"
# Each thread's CPU over the same window, from the kernel's account
# (ci/cpu-tree.py): perf files a sample taken while a kvm-pvm vCPU runs its
# guest under the guest (`perf kvm --guest --host report` shows it as the
# vmm's ":PID"), and its host report leaves it out, so a vCPU's guest time
# (1.3 of the 1.9 busy cores under 64-byte net load) is counted here.
roots=("${pids[@]}" "$load_pid")
threads_before=$("$here/cpu-tree.py" --threads "${roots[@]}")
# Which image each vCPU ran, to name its guest samples' addresses
# (ci/guest-profile.py): at both ends, as driver VMs come and go.
"$here/guest-profile.py" --images "${roots[@]}" >"$tmp/images.before"
started=$(date +%s.%N)
perf record -a -g -F 999 -o "$out/perf.data" -- sleep "$seconds" 2>"$tmp/perf.log" >/dev/null &
pids+=($!)
# The second snapshot when the sampling ends, not when perf does (it then
# writes its build-ids, and the load may have ended by then).
{
    sleep "$seconds"
    "$here/cpu-tree.py" --threads "${roots[@]}" >"$tmp/threads.after"
    "$here/guest-profile.py" --images "${roots[@]}" >"$tmp/images.after"
    date +%s.%N >"$tmp/threads.ended"
} &
snapshot_pid=$!
wait "${pids[-1]}" || die "perf record failed: $(tail -3 "$tmp/perf.log")"
wait "$snapshot_pid" || die "the second CPU snapshot failed"
window=$(awk -v a="$started" -v b="$(cat "$tmp/threads.ended")" 'BEGIN { printf "%.3f", b - a }')
wait "$load_pid" || die "the load failed: $(tail -5 "$tmp/load.out")"
grep -v '^$' "$tmp/load.out" | tail -12
echo
"$here/cpu-tree.py" --threads-delta "$threads_before" "$(cat "$tmp/threads.after")" "$window"

# perf's software clock samples a CPU only while it runs something (an idle
# CPU with its tick stopped goes unsampled), so shares of the samples
# would overstate the busy threads: each sample carries the CPU time it
# stands for (its period, in ns), which is what is summed here.
perf report -i "$out/perf.data" --no-children -F period,comm,dso,sym -g none --stdio >"$out/report.txt" 2>/dev/null
perf report -i "$out/perf.data" --no-children -F period,comm -g none --stdio 2>/dev/null |
    python3 -c '
import os, re, sys
cores, top, report, seconds = os.cpu_count(), int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
def rows(lines):
    for line in lines:
        m = re.match(r"\s*(\d+)\s+(.*\S)", line)
        if m and not line.lstrip().startswith("#"):
            yield int(m.group(1)) / 1e9 / seconds, re.sub(r"  +", "  ", m.group(2))
threads = list(rows(sys.stdin))
sampled = sum(share for share, name in threads if name != "swapper")
with open(report) as f:
    counted = [int(m.group(1)) / 1e9 / seconds for m in re.finditer(r"# Event count \(approx\.\): (\d+)", f.read())]
missing = max(counted[0] - sum(share for share, _ in threads), 0.0) if counted else 0.0
print(f"\nthe {top} functions that took the most CPU, in cores ([k] kernel, [.] user). perf\x27s host report "
      f"holds {sampled:.2f} busy cores; {missing:.2f} more were samples it took in a guest (a kvm-pvm vCPU in "
      f"ring 3), which it files under the guest (perf kvm --guest --host report): the table above has each "
      f"vCPU\x27s guest time")
with open(report) as f:
    for share, rest in list(rows(f))[:top]:
        print(f"  {share:5.2f}  {rest}")
' "$top" "$out/report.txt" "$seconds"
# The guests' samples, named from the images' line tables (`vmm locate`).
"$here/guest-profile.py" --report "$out/perf.data" "$seconds" "$top" "$bin/vmm" \
    "$tmp/images.before" "$tmp/images.after" --names "$tmp/threads.after"
[[ $out == "$tmp/out" ]] || log "perf.data and the full report (report.txt) are in $out"
