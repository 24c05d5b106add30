#!/usr/bin/env bash
# Block benchmark (not a test): in one invocation, on the same image, drives
#   - the reflector (its driver in a driver VM, the simulated controller),
#   - the reflector on QEMU's NVMe controller model (device=nvme: the nvme
#     driver in a driver VM, BAR0 a trapped window), and
#   - qemu-storage-daemon (--export type=vhost-user-blk), the peer,
# with the project's vhost-user frontend (blk-load), and prints IOPS, MB/s,
# p50/p99 latency and the reflector/peer ratios.
# Jobs: 4k random read and write at QD1 and QD32; 128k sequential read and
# write at QD1 and QD16 (QD16 x 34 descriptors fills a 1024-entry queue).
# Each backend runs the jobs ROUNDS times, alternating with the peer, and the
# median is reported: this machine's 2 cores are shared, so single runs vary.
#
# Usage: ci/bench-blk.sh [--seconds S] [--rounds N] [--size MIB]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
log() { printf 'bench-blk: %s\n' "$*" >&2; }
die() { printf 'bench-blk: FAIL: %s\n' "$*" >&2; exit 1; }

seconds=3 rounds=2 size_mib=256
while (($#)); do
    case $1 in
    --seconds) seconds=${2:?}; shift 2 ;;
    --rounds) rounds=${2:?}; shift 2 ;;
    --size) size_mib=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
bin=$repo/target/release
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

start_nvme() {
    rm -f "$sock"
    timeout 3600 "$bin/reflector" serve --blk "socket=$sock,image=$img,name=bench,device=nvme" >"$tmp/backend.log" 2>&1 &
    backend_pid=$!
    wait_for_socket "nvme: serving channel generation"
}

start_qsd() {
    rm -f "$sock"
    timeout 3600 qemu-storage-daemon \
        --blockdev "driver=file,node-name=f0,filename=$img,aio=threads,cache.direct=off" \
        --blockdev driver=raw,node-name=d0,file=f0 \
        --export "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=$sock,writable=on,num-queues=1" \
        >"$tmp/backend.log" 2>&1 &
    backend_pid=$!
    wait_for_socket
}

run_jobs() { # backend round
    local out=$tmp/$1.$2.json
    timeout 600 "$bin/blk-load" --socket "$sock" --json --queue-size 1024 --seconds "$seconds" \
        --job randread,randwrite --bs 4k --qd 1,32 >>"$out" || die "$1: blk-load failed"
    timeout 600 "$bin/blk-load" --socket "$sock" --json --queue-size 1024 --seconds "$seconds" \
        --job read,write --bs 128k --qd 1,16 >>"$out" || die "$1: blk-load failed"
}

for round in $(seq "$rounds"); do
    for backend in reflector nvme qsd; do
        log "round $round/$rounds: $backend"
        "start_$backend"
        run_jobs "$backend" "$round"
        stop_backend
    done
done

python3 - "$tmp" "$rounds" <<'PY'
import json, sys, statistics, pathlib
tmp, rounds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
def load(backend):
    runs = {}
    for r in range(1, rounds + 1):
        for line in (tmp / f"{backend}.{r}.json").read_text().splitlines():
            j = json.loads(line)
            runs.setdefault((j["job"], j["bs"], j["qd"]), []).append(j)
    return {k: {f: statistics.median(x[f] for x in v) for f in ("iops", "mb_s", "lat_p50_us", "lat_p99_us", "errors")}
            for k, v in runs.items()}
ours, nvme, peer = load("reflector"), load("nvme"), load("qsd")
print(f"\nblock benchmark: blk-load, median of {rounds} round(s); sim = driver VM + simulated controller, "
      f"nvme = driver VM + QEMU's NVMe model (device=nvme), peer = qemu-storage-daemon")
print(f"{'job':<10}{'bs':>6}{'qd':>4} | {'sim IOPS':>9}{'p50us':>8}{'p99us':>9} | {'nvme IOPS':>9}{'p50us':>8}{'p99us':>9} | "
      f"{'qsd IOPS':>9}{'p50us':>8}{'p99us':>9} | {'sim/qsd':>8}{'nvme/qsd':>9}")
for key in ours:
    a, n, b = ours[key], nvme.get(key), peer.get(key)
    if not b or not n:
        continue
    job, bs, qd = key
    print(f"{job:<10}{bs // 1024:>5}k{qd:>4} | {a['iops']:>9.0f}{a['lat_p50_us']:>8.0f}{a['lat_p99_us']:>9.0f} | "
          f"{n['iops']:>9.0f}{n['lat_p50_us']:>8.0f}{n['lat_p99_us']:>9.0f} | "
          f"{b['iops']:>9.0f}{b['lat_p50_us']:>8.0f}{b['lat_p99_us']:>9.0f} | "
          f"{a['iops'] / max(b['iops'], 1):>7.2f}x{n['iops'] / max(b['iops'], 1):>8.2f}x")
errors = sum(v["errors"] for d in (ours, nvme, peer) for v in d.values())
print(f"\nerrors: {errors:.0f}")
PY
