#!/usr/bin/env bash
# Block benchmark (not a test): in one invocation, on the same image, drives
#   - the reflector (its driver in a driver VM, the simulated controller),
#   - the same with dma=direct (per-request DMA windows: the controller
#     reaches each request's client buffers, no bounce copy),
#   - the reflector on QEMU's NVMe controller model (device=nvme: the nvme
#     driver in a driver VM, BAR0 a trapped window),
#   - the same with QEMU reaching the image through io_uring (aio=io_uring)
#     instead of its thread pool, and
#   - qemu-storage-daemon (--export type=vhost-user-blk), the peer, with
#     its default aio=threads and with aio=io_uring,
# with the project's vhost-user frontend (blk-load), and prints per backend
# and job: IOPS, MB/s, p50/p99/p99.9 latency, and the CPU time per request
# of each process involved (reflector, driver VM, device model, peer: user +
# system time of its process tree over the job, ci/cpu-tree.py), then the
# ratios against the peer with their spread across rounds.
# Jobs: 4k random read and write at QD1 and QD32; 128k sequential read and
# write at QD1 and QD16 (QD16 x 34 descriptors fills a 1024-entry queue).
# Each round runs every backend in turn (interleaved, nothing pinned); the
# median of the rounds is reported with the spread (min-max, % of the
# median), and a figure whose spread exceeds 15% is marked noisy: this
# machine's 2 cores are shared, so single runs vary.
#
# With --chart FILE, the results are also drawn as an SVG (ci/chart.py):
# per job, the latency CDFs side by side and the CPU per request by process.
#
# The client sleeps on its call eventfd between completions (blk-load
# --spin-us 0), as a QEMU guest's virtio-blk driver waits for its
# interrupt; --client-spin US has it poll the used ring for up to US
# first (blk-load's own default is 50). A polling client takes a core the
# backend's threads may need on this 2-core machine: the reflector's 4k QD1
# reads gave 20k IOPS against a client polling 50 us, 85-95k against one
# that sleeps; qemu-storage-daemon 15-19k either way. The client's own CPU
# per request is printed too.
#
# The binaries are target/release's (cargo build --release); BIN=DIR takes
# reflector, vmm and blk-load from DIR instead (to compare two builds).
#
# Usage: ci/bench-blk.sh [--seconds S] [--rounds N] [--size MIB] [--client-spin US] [--json FILE]
#                        [--chart FILE.svg]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=ci/peers.sh
source "$here/peers.sh"
log() { printf 'bench-blk: %s\n' "$*" >&2; }
die() { printf 'bench-blk: FAIL: %s\n' "$*" >&2; exit 1; }

seconds=3 rounds=2 size_mib=256 client_spin=0 json='' chart=''
while (($#)); do
    case $1 in
    --seconds) seconds=${2:?}; shift 2 ;;
    --rounds) rounds=${2:?}; shift 2 ;;
    --size) size_mib=${2:?}; shift 2 ;;
    --client-spin) client_spin=${2:?}; shift 2 ;;
    --json) json=${2:?}; shift 2 ;;
    --chart) chart=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -z $chart || -n $json ]] || die "--chart needs --json FILE (the chart is drawn from it)"
bin=${BIN:-$repo/target/release}
for tool in "$bin/reflector" "$bin/vmm" "$bin/blk-load"; do
    [[ -x $tool ]] || die "$tool missing: cargo build --release"
done
command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon missing: ci/install-e2e-deps.sh"

tmp=$(mktemp -d /tmp/bench-blk.XXXXXX)
img=$tmp/disk.img sock=$tmp/blk.sock backend_pid=''
stop_backend() {
    if [[ -n $backend_pid ]]; then
        kill "$backend_pid" 2>/dev/null || true
        wait "$backend_pid" 2>/dev/null || true
        backend_pid=''
    fi
}
trap 'stop_backend; rm -rf "$tmp"' EXIT

log "preparing a ${size_mib} MiB image filled with data"
timeout 120 dd if=/dev/urandom of="$img" bs=1M count="$size_mib" status=none

wait_for_socket() {
    for _ in $(seq 300); do
        [[ -S $sock ]] && { [[ -z ${1:-} ]] || grep -q "$1" "$tmp/backend.log"; } && return 0
        kill -0 "$backend_pid" 2>/dev/null || die "the backend exited: $(tail -3 "$tmp/backend.log")"
        sleep 0.1
    done
    die "the backend did not serve $sock"
}

start_reflector() {
    rm -f "$sock"
    timeout 3600 "$bin/reflector" serve --blk "socket=$sock,image=$img,name=bench" >"$tmp/backend.log" 2>&1 &
    backend_pid=$!
    wait_for_socket "controller ready"
}

start_direct() {
    rm -f "$sock"
    timeout 3600 "$bin/reflector" serve --blk "socket=$sock,image=$img,name=bench,dma=direct" >"$tmp/backend.log" 2>&1 &
    backend_pid=$!
    wait_for_socket "controller ready"
}

start_nvme() {
    rm -f "$sock"
    timeout 3600 "$bin/reflector" serve --blk "socket=$sock,image=$img,name=bench,device=nvme" >"$tmp/backend.log" 2>&1 &
    backend_pid=$!
    wait_for_socket "nvme: serving channel generation"
}

start_uring() {
    rm -f "$sock"
    timeout 3600 "$bin/reflector" serve --blk "socket=$sock,image=$img,name=bench,device=nvme,aio=io_uring" >"$tmp/backend.log" 2>&1 &
    backend_pid=$!
    wait_for_socket "nvme: serving channel generation"
}

start_qsd() { start_qsd_with threads; }
start_qsdu() { start_qsd_with io_uring; }

start_qsd_with() { # aio
    rm -f "$sock"
    qsd_command "$img" "$sock" "$1"
    timeout 3600 "${qsd[@]}" >"$tmp/backend.log" 2>&1 &
    backend_pid=$!
    wait_for_socket
}

# One blk-load per job, so that each job's CPU time is its own.
jobs=("randread 4k 1" "randread 4k 32" "randwrite 4k 1" "randwrite 4k 32"
    "read 128k 1" "read 128k 16" "write 128k 1" "write 128k 16")
run_jobs() { # backend round
    local out=$tmp/$1.$2.json spec job bs qd before after
    for spec in "${jobs[@]}"; do
        read -r job bs qd <<<"$spec"
        before=$("$here/cpu-tree.py" "$backend_pid")
        timeout 600 "$bin/blk-load" --socket "$sock" --json --queue-size 1024 --seconds "$seconds" \
            --spin-us "$client_spin" --job "$job" --bs "$bs" --qd "$qd" 2>>"$tmp/blk-load.log" >"$tmp/job.json" || die "$1: blk-load failed"
        after=$("$here/cpu-tree.py" "$backend_pid")
        python3 -c 'import json,sys; j=json.loads(open(sys.argv[1]).read()); j["cpu_us"]=json.loads(sys.argv[2]); print(json.dumps(j))' \
            "$tmp/job.json" "$("$here/cpu-tree.py" --delta "$before" "$after")" >>"$out"
    done
}

for round in $(seq "$rounds"); do
    for backend in reflector direct nvme uring qsd qsdu; do
        log "round $round/$rounds: $backend"
        "start_$backend"
        run_jobs "$backend" "$round"
        stop_backend
    done
done

python3 - "$tmp" "$rounds" "$json" "$client_spin" <<'PY'
import json, sys, statistics, pathlib
tmp, rounds, out, client_spin = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
BACKENDS = ("reflector", "direct", "nvme", "uring", "qsd", "qsdu")
LABELS = ("sim", "direct", "nvme", "uring", "qsd", "qsd-u")
OURS = (("reflector", "sim"), ("direct", "direct"), ("nvme", "nvme"), ("uring", "uring"))
ROLES = ("reflector", "driver_vm", "device", "peer", "client")
runs = {}
for backend in BACKENDS:
    for r in range(1, rounds + 1):
        for line in (tmp / f"{backend}.{r}.json").read_text().splitlines():
            j = json.loads(line)
            runs.setdefault((j["job"], j["bs"], j["qd"]), {}).setdefault(backend, []).append(j)
def med(values):
    return statistics.median(values) if values else 0.0
def spread(values):
    m = med(values)
    return (max(values) - min(values)) / m * 100 if m and len(values) > 1 else 0.0
def cpu_per_request(rs, role):
    if role == "client":  # blk-load's own CPU, as a share of one core over the job
        return med([r["cpu_pct"] / 100 * r["seconds"] * 1e6 / max(r["ios"], 1) for r in rs])
    return med([r["cpu_us"].get(role, 0.0) / max(r["ios"], 1) for r in rs])
report = []
print(f"\nblock benchmark: blk-load (client poll {client_spin} us), median of {rounds} round(s), spread = (max - min) / median across rounds")
print("  sim = driver VM + simulated controller (bounce slots), direct = the same with dma=direct (per-request DMA windows),")
print("  nvme = driver VM + QEMU's NVMe model, uring = the same with aio=io_uring,")
print("  qsd = qemu-storage-daemon (the peer, aio=threads), qsd-u = the same with aio=io_uring")
print("  CPU us/req: reflector / driver VM / device model (sim: in the reflector) | peer; then the client's (blk-load)")
print(f"{'job':<10}{'bs':>5}{'qd':>4} {'backend':<7}{'IOPS':>9}{'spread':>8}{'p50us':>8}{'p99us':>8}{'p99.9us':>9}   CPU us/req")
for key, by_backend in runs.items():
    job, bs, qd = key
    row = {"job": job, "bs": bs, "qd": qd}
    for backend, label in zip(BACKENDS, LABELS):
        rs = by_backend.get(backend, [])
        if not rs:
            continue
        iops = [r["iops"] for r in rs]
        cpu = {role: cpu_per_request(rs, role) for role in ROLES}
        noisy = spread(iops) > 15
        row[label] = {"iops": med(iops), "iops_spread_pct": round(spread(iops), 1), "noisy": noisy,
                      "mb_s": med([r["mb_s"] for r in rs]), "lat_p50_us": med([r["lat_p50_us"] for r in rs]),
                      "lat_p99_us": med([r["lat_p99_us"] for r in rs]), "lat_p999_us": med([r.get("lat_p999_us", 0) for r in rs]),
                      "lat_cdf_us": [[q, med([r["lat_cdf_us"][i][1] for r in rs])] for i, (q, _) in enumerate(rs[0].get("lat_cdf_us", []))],
                      "cpu_us_per_request": cpu, "errors": sum(r["errors"] for r in rs)}
        b = row[label]
        cpus = f"{cpu['peer']:.1f}" if backend.startswith("qsd") else f"{cpu['reflector']:.1f} / {cpu['driver_vm']:.1f} / {cpu['device']:.1f}"
        cpus += f"  client {cpu['client']:.1f}"
        print(f"{job:<10}{bs // 1024:>4}k{qd:>4} {label:<7}{b['iops']:>9.0f}{b['iops_spread_pct']:>7.1f}%{b['lat_p50_us']:>8.0f}"
              f"{b['lat_p99_us']:>8.0f}{b['lat_p999_us']:>9.0f}   {cpus}{'  NOISY' if noisy else ''}")
    # Each of ours against the peer, and io_uring against io_uring.
    pairs = [(backend, label, "qsd", "qsd") for backend, label in OURS] + [("uring", "uring", "qsdu", "qsd_u")]
    shown = []
    for backend, label, peer_backend, peer_label in pairs:
        ours, peer = by_backend.get(backend, []), by_backend.get(peer_backend, [])
        if ours and peer:
            ratios = [a["iops"] / max(b["iops"], 1) for a, b in zip(ours, peer)]
            key = f"{label}_over_{peer_label}"
            row[key] = {"median": round(med(ratios), 2), "min": round(min(ratios), 2), "max": round(max(ratios), 2)}
            shown.append(f"{label}/{peer_label.replace('_', '-')} {row[key]['median']:.2f}x ({row[key]['min']:.2f}-{row[key]['max']:.2f})")
    print(" " * 19 + "ratio " + "   ".join(shown))
    report.append(row)
errors = sum(row[l]["errors"] for row in report for l in LABELS if l in row)
print(f"\nerrors: {errors:.0f}")
if out:
    json.dump({"rounds": rounds, "client_spin_us": client_spin, "jobs": report}, open(out, "w"), indent=1)
    print(f"results: {out}")
PY
if [[ -n $chart ]]; then
    python3 "$here/chart.py" "$json" "$chart"
fi
