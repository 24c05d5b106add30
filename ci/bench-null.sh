#!/usr/bin/env bash
# The Proxy Driver paper's Figure 3, here (benchmark, not a test): the
# throughput of the null driver as a function of request size (512 B to
# 128 KiB, QD1 and QD32 (QD30 at 128 KiB, which fills the queue)), in one
# invocation, served
#   (a) in a driver VM (driver=null, jailed, as in production),
#   (b) hosted: the same driver source as a plain process (hosted=on), and
#   (c) by the reflector with no driver at all: driver=inline-null, a thread
#       of the reflector completing each request on the channel,
# then prints MB/s and IOPS per mode, the isolation overhead a/b and the
# cost of any driver process a/c, with blk-load as the client. Each round
# runs every mode once per job, interleaved; the median of the rounds is
# reported. This machine's 2 cores are shared: figures vary between runs.
#
# The client sleeps on its call eventfd between completions, as a guest's
# driver waits for its interrupt; --client-spin US has it poll the used
# ring for up to US first (blk-load's own default is 50), as ci/bench-blk.sh.
#
# Usage: ci/bench-null.sh [--seconds S] [--rounds N] [--client-spin US] [--json FILE]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
log() { printf 'bench-null: %s\n' "$*" >&2; }
die() { printf 'bench-null: FAIL: %s\n' "$*" >&2; exit 1; }

seconds=2 rounds=2 client_spin=0 json=''
while (($#)); do
    case $1 in
    --seconds) seconds=${2:?}; shift 2 ;;
    --rounds) rounds=${2:?}; shift 2 ;;
    --client-spin) client_spin=${2:?}; shift 2 ;;
    --json) json=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
bin=$repo/target/release
for tool in "$bin/reflector" "$bin/vmm" "$bin/blk-load"; do
    [[ -x $tool ]] || die "$tool missing: cargo build --release"
done

log "building the hosted null driver (the same source as the driver VM's)"
(cd "$repo/driver-vm" && timeout 900 cargo build --release --locked --bin null --target-dir "$repo/target/hosted" 2>&1 | tail -1 >&2)
hosted=$repo/target/hosted/release/null

tmp=$(mktemp -d /tmp/bench-null.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT

serve() { # log-name ready-pattern reflector-args...
    local name=$1 ready=$2
    shift 2
    timeout 3600 "$bin/reflector" serve "$@" >"$tmp/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 300); do
        grep -q "$ready" "$tmp/$name.log" && return 0
        kill -0 "${pids[-1]}" 2>/dev/null || die "$name: the reflector exited: $(tail -3 "$tmp/$name.log")"
        sleep 0.1
    done
    die "$name: not served"
}

log "starting (a) a driver VM, (b) the hosted driver, (c) no driver"
serve vm "null: serving channel" --blk "socket=$tmp/a.sock,image=$tmp/a.img,size=64M,name=vm,driver=null"
serve dev "null: serving channel" --no-jail \
    --blk "socket=$tmp/b.sock,image=$tmp/b.img,size=64M,name=hosted,driver=$hosted,hosted=on" \
    --blk "socket=$tmp/c.sock,image=$tmp/c.img,size=64M,name=inline,driver=inline-null"

sizes=(512 4k 16k 64k 128k)
for round in $(seq "$rounds"); do
    for bs in "${sizes[@]}"; do
        # 128 KiB requests take 34 descriptors each (size_max 4 KiB): 30 of
        # them fill the 1024-entry queue.
        deep=32
        [[ $bs == 128k ]] && deep=30
        for mode in a b c; do
            log "round $round/$rounds: $bs ($mode)"
            timeout 600 "$bin/blk-load" --socket "$tmp/$mode.sock" --json --queue-size 1024 --seconds "$seconds" \
                --spin-us "$client_spin" --job read --bs "$bs" --qd "1,$deep" --size 32M 2>>"$tmp/blk-load.log" \
                | sed "s/^{/{\"mode\":\"$mode\",/" >>"$tmp/results.json" || die "$mode: blk-load failed"
        done
    done
done

python3 - "$tmp/results.json" "$rounds" "${json:-}" "$client_spin" <<'PY'
import json, sys, statistics
path, rounds, out, client_spin = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
runs = {}
for line in open(path):
    j = json.loads(line)
    runs.setdefault((j["bs"], j["qd"], j["mode"]), []).append(j)
med = {k: {f: statistics.median(x[f] for x in v) for f in ("iops", "mb_s", "lat_p50_us", "errors")} for k, v in runs.items()}
print(f"\nnull driver (the Proxy Driver's Figure 3), sequential reads, client poll {client_spin} us, median of {rounds} round(s):")
print("  a = driver VM (jailed), b = hosted process (same source), c = no driver (inline-null)")
print(f"{'bs':>7}{'qd':>4} | {'a MB/s':>8}{'IOPS':>8} | {'b MB/s':>8}{'IOPS':>8} | {'c MB/s':>8}{'IOPS':>8} | {'a/b':>6}{'a/c':>6}")
table = []
for bs, qd in sorted({(b, q) for b, q, _ in med}):
    a, b, c = (med.get((bs, qd, m)) for m in "abc")
    if not (a and b and c):
        continue
    size = f"{bs // 1024}k" if bs >= 1024 else f"{bs}"
    print(f"{size:>7}{qd:>4} | {a['mb_s']:>8.1f}{a['iops']:>8.0f} | {b['mb_s']:>8.1f}{b['iops']:>8.0f} | "
          f"{c['mb_s']:>8.1f}{c['iops']:>8.0f} | {a['iops'] / max(b['iops'], 1):>5.2f}x{a['iops'] / max(c['iops'], 1):>5.2f}x")
    table.append({"bs": bs, "qd": qd, "vm": a, "hosted": b, "inline": c})
errors = sum(v["errors"] for v in med.values())
print(f"\nerrors: {errors:.0f}")
if out:
    json.dump({"rounds": rounds, "results": table}, open(out, "w"), indent=1)
    print(f"results: {out}")
PY
