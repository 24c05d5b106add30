#!/usr/bin/env bash
# Network benchmark (not a test): in one invocation, drives with the project's
# vhost-user-net frontend (net-load), from port 0 to port 1,
#   - dpdk-testpmd, the peer: two vhost-user ports, io forwarding on one
#     core (lcore 1; lcore 0 only waits on its input), and
#   - the reflector: two --net devices (driver VMs) on one switch,
# and prints Mpps, Gbit/s and loss for 64-byte and 1514-byte frames, the
# ping-pong round-trip time p50/p99 (64-byte frames, one at a time), the CPU
# time per frame of each process involved (the backend's tree by role, from
# /proc, ci/cpu-tree.py; net-load's own), and the reflector/testpmd ratios. Each peer runs ROUNDS times, alternating, and
# the median is reported: this machine's 2 cores are shared, so single runs
# vary (another spinning testpmd halves the figures: one is warned about).
# net-load is pinned to CPU 0 (testpmd's forwarding core is CPU 1).
# If `reflector serve --help` does not mention --net, only testpmd runs.
#
# Binaries: $CARGO_TARGET_DIR/release (default target/release): net-load and
# reflector (cargo build --release); override with NET_LOAD=, REFLECTOR=.
# DPDK drivers: the newest /usr/lib/*/dpdk/pmds-*, or DPDK_PMDS=DIR.
#
# Usage: ci/bench-net.sh [--seconds S] [--rounds N] [--guests]
#   --seconds S   seconds per throughput run (default 5)
#   --rounds N    runs per peer, alternating; medians are reported (default 1)
#   --guests      also the ping RTT between two QEMU guests (TCG) through each
#                 peer (ci/qemu-net-pair.sh --ping-only, 50 pings), ROUNDS times
#                 each, alternating; the median p50 and the ratio are reported
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=ci/peers.sh
source "$here/peers.sh"
repo=$(cd "$here/.." && pwd)
log() { printf 'bench-net: %s\n' "$*" >&2; }
die() { printf 'bench-net: FAIL: %s\n' "$*" >&2; exit 1; }

seconds=5 rounds=1 guests=0
while (($#)); do
    case $1 in
    --guests) guests=1; shift ;;
    --seconds) seconds=${2:?}; shift 2 ;;
    --rounds) rounds=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ $seconds =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--seconds wants a number, not '$seconds'"
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "--rounds wants a positive integer, not '$rounds'"

bin=${CARGO_TARGET_DIR:-$repo/target}/release
net_load=${NET_LOAD:-$bin/net-load}
reflector=${REFLECTOR:-$bin/reflector}
[[ -x $net_load ]] || die "$net_load missing: cargo build --release -p loadgen"
testpmd=$(command -v dpdk-testpmd) || die "dpdk-testpmd missing (apt-get install dpdk)"
pmds=$(dpdk_pmds) || die "DPDK's vhost driver not found (set DPDK_PMDS=DIR)"
pin=()
command -v taskset >/dev/null && pin=(taskset -c 0)

with_reflector=1
if [[ ! -x $reflector ]]; then
    log "$reflector missing: skipping the reflector (cargo build --release)"
    with_reflector=0
elif ! timeout 10 "$reflector" serve --help 2>&1 | grep -q -- '--net'; then
    log "reflector has no --net yet: skipping"
    with_reflector=0
fi

tmp=$(mktemp -d /tmp/bench-net.XXXXXX)
sock0=$tmp/port0.sock sock1=$tmp/port1.sock
prefix=benchnet$$
backend_pid='' input_fd=''
stop_backend() {
    if [[ -n $input_fd ]]; then
        exec {input_fd}>&- # testpmd ends at the end of its input
        input_fd=''
    fi
    if [[ -n $backend_pid ]]; then
        kill "$backend_pid" 2>/dev/null || true
        wait "$backend_pid" 2>/dev/null || true
        backend_pid=''
    fi
}
trap 'stop_backend; rm -rf "$tmp" "/var/run/dpdk/$prefix"' EXIT

wait_for_sockets() { # name
    for _ in $(seq 300); do
        [[ -S $sock0 && -S $sock1 ]] && return 0
        kill -0 "$backend_pid" 2>/dev/null || die "$1 exited: $(tail -5 "$tmp/backend.log")"
        sleep 0.1
    done
    die "$1 did not create $sock0 and $sock1 within 30 s: $(tail -5 "$tmp/backend.log")"
}

contended=0
check_quiet() { # a spinning poller of someone else's skews every figure on 2 cores
    if pgrep -x dpdk-testpmd >/dev/null; then
        log "WARNING: another dpdk-testpmd is running and spinning a core: figures will be low"
        contended=1
    fi
}

start_testpmd() {
    rm -f "$sock0" "$sock1" "$tmp/testpmd.in"
    # Non-interactive testpmd forwards until a line or the end of its input: a fifo only this
    # script writes, so testpmd also ends if the script dies.
    mkfifo -m 600 "$tmp/testpmd.in"
    testpmd_command "$testpmd" "$pmds" "$prefix" "$sock0" "$sock1"
    timeout -k 5 3600 "${testpmd_args[@]}" <"$tmp/testpmd.in" >"$tmp/backend.log" 2>&1 &
    backend_pid=$!
    exec {input_fd}>"$tmp/testpmd.in"
    wait_for_sockets testpmd
}

start_reflector() {
    rm -f "$sock0" "$sock1"
    timeout -k 5 3600 "$reflector" serve \
        --net "socket=$sock0,mac=52:54:00:00:00:01,switch=bench" \
        --net "socket=$sock1,mac=52:54:00:00:00:02,switch=bench" >"$tmp/backend.log" 2>&1 &
    backend_pid=$!
    wait_for_sockets reflector
}

# net-load waits (bounded by --timeout) for the backend to answer and for a warm-up frame to
# come through before it measures. One net-load per size and mode, so that each run's CPU
# time is its own: the backend's process tree by role (ci/cpu-tree.py) and net-load's own.
run_one() { # out_file net-load-args...
    local out=$1 limit before after
    shift
    limit=$(awk -v s="$seconds" 'BEGIN { printf "%d", s * 3 + 60 }')
    before=$("$here/cpu-tree.py" "$backend_pid")
    python3 -c '
import json, resource, subprocess, sys
run = subprocess.run(sys.argv[2:], stdout=subprocess.PIPE)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    f.write(json.dumps({"netload_us": (usage.ru_utime + usage.ru_stime) * 1e6, "lines": run.stdout.decode()}))
sys.exit(run.returncode)' "$tmp/run.json" timeout -k 5 "$limit" "${pin[@]}" "$net_load" --tx "$sock0" --rx "$sock1" --json --quiet \
        --seconds "$seconds" "$@" || return 1
    after=$("$here/cpu-tree.py" "$backend_pid")
    python3 -c '
import json, sys
run = json.load(open(sys.argv[1]))
cpu = json.loads(sys.argv[2])
cpu["net_load"] = run["netload_us"]
for line in run["lines"].splitlines():
    j = json.loads(line)
    j["cpu_us"] = cpu
    print(json.dumps(j))' "$tmp/run.json" "$("$here/cpu-tree.py" --delta "$before" "$after")" >>"$out"
}
run_net_load() { # backend round
    local out=$tmp/$1.$2.json
    run_one "$out" --size 64 || return 1
    run_one "$out" --size 1514 || return 1
    run_one "$out" --pingpong --size 64 || return 1
}

backends=(testpmd)
((with_reflector)) && backends=(reflector testpmd)
failed=()
for round in $(seq "$rounds"); do
    for backend in "${backends[@]}"; do
        log "round $round/$rounds: $backend"
        check_quiet
        "start_$backend"
        if ! run_net_load "$backend" "$round"; then
            [[ $backend == testpmd ]] && die "net-load failed against testpmd: $(tail -5 "$tmp/backend.log")"
            log "WARNING: net-load failed against the reflector (round $round): $(tail -3 "$tmp/backend.log")"
            failed+=("$round")
        fi
        stop_backend
    done
done

guest_rtt() { # backend round: ping RTT between two QEMU guests through it
    "start_$1"
    if ! timeout 700 "$here/qemu-net-pair.sh" --sock-a "$sock0" --sock-b "$sock1" --ping-only --pings 50 \
        --timeout 600 >"$tmp/$1.$2.guests"; then
        log "WARNING: the guest ping run through $1 failed (round $2)"
    fi
    stop_backend
}
if ((guests)); then
    # As the throughput runs: each round runs every backend in turn, so
    # that a noisy minute weighs on both.
    for round in $(seq "$rounds"); do
        for backend in "${backends[@]}"; do
            log "round $round/$rounds: guest ping RTT through $backend (two QEMU guests)"
            guest_rtt "$backend" "$round"
        done
    done
fi

python3 - "$tmp" "$rounds" "$with_reflector" "${#failed[@]}" "$contended" <<'PY'
import json, sys, statistics, pathlib
tmp, rounds, with_reflector, failed = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
contended = sys.argv[5] == "1"
FIELDS = ("mpps", "gbps", "loss_pct", "lat_p50_us", "lat_p99_us", "rate", "rtt_p50_us", "rtt_p99_us", "corrupted", "duplicates")
ROLES = ("reflector", "driver_vm", "peer", "net_load")
def per_frame(j, role):
    # CPU time per frame received (per round trip for pingpong), microseconds.
    return j.get("cpu_us", {}).get(role, 0.0) / max(j.get("received", 0), 1)
def load(backend):
    runs = {}
    for r in range(1, rounds + 1):
        f = tmp / f"{backend}.{r}.json"
        if f.exists():
            for line in f.read_text().splitlines():
                j = json.loads(line)
                runs.setdefault((j["mode"], j["size"]), []).append(j)
    out = {}
    for k, v in runs.items():
        out[k] = {f: statistics.median(x.get(f, 0) for x in v) for f in FIELDS}
        out[k]["cpu"] = {role: statistics.median(per_frame(x, role) for x in v) for role in ROLES}
    return out
peer = load("testpmd")
ours = load("reflector") if with_reflector else {}
def cells(mode, m):
    if m is None:
        return f"{'-':>8}{'-':>8}{'-':>8}{'-':>9}{'-':>9}"
    if mode == "pingpong":
        return f"{m['rate'] / 1e6:>8.3f}{'-':>8}{m['loss_pct']:>8.3f}{m['rtt_p50_us']:>9.1f}{m['rtt_p99_us']:>9.1f}"
    return f"{m['mpps']:>8.3f}{m['gbps']:>8.2f}{m['loss_pct']:>8.3f}{m['lat_p50_us']:>9.1f}{m['lat_p99_us']:>9.1f}"
hdr = f"{'Mpps':>8}{'Gbit/s':>8}{'loss%':>8}{'p50us':>9}{'p99us':>9}"
print(f"\nnet benchmark: net-load from port 0 to port 1, median of {rounds} round(s)")
print("reflector = two --net devices (driver VMs) on one switch; testpmd = dpdk-testpmd, io forwarding on one core")
print("throughput: p50/p99 = one-way latency under load; pingpong: Mpps = round trips/s, p50/p99 = round-trip time")
print(f"{'':<18}| {'reflector':<{len(hdr)}} | {'testpmd':<{len(hdr)}} |")
print(f"{'run':<18}| {hdr} | {hdr} | reflector/testpmd")
for mode, size in [("throughput", 64), ("throughput", 1514), ("pingpong", 64)]:
    a, b = ours.get((mode, size)), peer.get((mode, size))
    ratio = "-"
    if a and b and mode == "throughput":
        ratio = f"{a['mpps'] / max(b['mpps'], 1e-9):.2f}x Mpps"
    elif a and b:
        ratio = f"{a['rtt_p50_us'] / max(b['rtt_p50_us'], 1e-9):.2f}x RTT p50, {a['rtt_p99_us'] / max(b['rtt_p99_us'], 1e-9):.2f}x p99"
    print(f"{mode + ' ' + str(size) + ' B':<18}| {cells(mode, a)} | {cells(mode, b)} | {ratio}")
print("\nCPU time per frame (pingpong: per round trip), us, user + system, by process:")
print(f"{'run':<18}| {'reflector':>9} {'drv VMs':>8} {'net-load':>8} {'total':>8} | {'testpmd':>8} {'net-load':>8} {'total':>8} | ratio")
for mode, size in [("throughput", 64), ("throughput", 1514), ("pingpong", 64)]:
    a, b = ours.get((mode, size)), peer.get((mode, size))
    left = right = f"{'-':>8}"
    if a:
        c = a["cpu"]
        total_a = c["reflector"] + c["driver_vm"] + c["net_load"]
        left = f"{c['reflector']:>9.2f} {c['driver_vm']:>8.2f} {c['net_load']:>8.2f} {total_a:>8.2f}"
    else:
        left = f"{'-':>9} {'-':>8} {'-':>8} {'-':>8}"
    if b:
        c = b["cpu"]
        total_b = c["peer"] + c["net_load"]
        right = f"{c['peer']:>8.2f} {c['net_load']:>8.2f} {total_b:>8.2f}"
    else:
        right = f"{'-':>8} {'-':>8} {'-':>8}"
    ratio = f"{total_a / max(total_b, 1e-9):.1f}x" if a and b else "-"
    print(f"{mode + ' ' + str(size) + ' B':<18}| {left} | {right} | {ratio}")
if not with_reflector:
    print("\nreflector: skipped (see above); testpmd figures only")
if failed:
    print(f"\nreflector: net-load failed in {failed} round(s) (see the warnings above)")
if contended:
    print("\nWARNING: another dpdk-testpmd was spinning during the benchmark: these figures are not representative")
bad = sum(m["corrupted"] + m["duplicates"] for d in (ours, peer) for m in d.values())
print(f"\ncorrupted + duplicated frames (medians): {bad:.0f}")
PY
if ((guests)); then
    python3 - "$tmp" "$rounds" "${backends[@]}" <<'PY'
import pathlib, re, statistics, sys
tmp, rounds, backends = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
def runs(backend):
    for round in range(1, rounds + 1):
        run = tmp / f"{backend}.{round}.guests"
        fields = dict(re.findall(r"(\w+)=([^ \n]+)", run.read_text() if run.exists() else ""))
        if "ping_rtt_p50_ms" in fields:
            yield fields
print(f"\nping between two QEMU guests (TCG, 50 pings a run, ms; median of {rounds} round(s), each round both peers in turn):")
print(f"  {'peer':<10} {'p50':>8} {'avg':>8} {'max':>8} {'loss':>6}   p50 of each round")
medians = {}
for backend in backends:
    done = list(runs(backend))
    if not done:
        print(f"  {backend:<10} failed (see the warnings above)")
        continue
    p50s = [float(f["ping_rtt_p50_ms"]) for f in done]
    medians[backend] = (statistics.median(p50s), min(p50s), max(p50s))
    avg = statistics.median(float(f["ping_rtt_avg_ms"]) for f in done)
    worst = max(float(f["ping_rtt_max_ms"]) for f in done)
    loss = max((float(f["ping_loss"].rstrip("%")) for f in done if "ping_loss" in f), default=float("nan"))
    print(f"  {backend:<10} {medians[backend][0]:8.3f} {avg:8.3f} {worst:8.3f} {loss:5.0f}%   {' '.join(f'{p:.3f}' for p in p50s)}")
if "reflector" in medians and "testpmd" in medians:
    ours, peer = medians["reflector"], medians["testpmd"]
    print(f"  reflector/testpmd p50: {ours[0] / peer[0]:.2f}x (rounds' extremes {ours[1] / peer[2]:.2f}-{ours[2] / peer[1]:.2f}x; the goal is 1.2x)")
PY
fi
