#!/usr/bin/env bash
# Fleet benchmark (not a test): N block devices (default 100), each with its
# own jailed driver VM, served by one reflector on this machine. It prints:
#   - how long after the reflector's start every driver VM had attached
#     (`status`: the driver serves), with the reflector's own start time;
#   - verified I/O on every device (blk-load --verify, a short run each);
#   - the CPU the idle fleet uses (reflector and driver VMs, from /proc over
#     --idle-seconds, via ci/cpu-tree.py), in percent of one core;
#   - memory: each driver VM's resident set and the part of it that is its
#     own (min/median/max; the rest is shared code), the reflector's
#     against its budget (10 MiB + 256 KiB per device), the fleet as a whole
#     (`reflector status`'s fleet line), and the per-device cap.
# Goals (issue 14): all ready within 2 s, idle under 1 % CPU, each driver VM
# under 4 MiB, the reflector within its budget.
#
# With --spare KIND, every device keeps a spare of that kind (off, standby,
# warm): what it costs the fleet.
#
# The binaries are target/release's; VMM=PATH serves with that vmm instead
# (the reflector's --vmm: the README's static production vmm, say).
#
# Usage: ci/bench-fleet.sh [--devices N] [--idle-seconds S] [--spare KIND] [--no-jail]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
devices=100 idle=5 jail= spare=
while (($#)); do
    case $1 in
    --devices) devices=${2:?}; shift 2 ;;
    --idle-seconds) idle=${2:?}; shift 2 ;;
    --no-jail) jail=--no-jail; shift ;;
    --spare) spare=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-fleet: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
bin=$repo/target/release
for tool in reflector vmm blk-load; do
    [[ -x $bin/$tool ]] || { echo "bench-fleet: $bin/$tool missing: run cargo build --release" >&2; exit 1; }
done
tmp=$(mktemp -d /tmp/bench-fleet.XXXXXX)
pid=''
trap '[[ -n $pid ]] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"' EXIT
config=$tmp/fleet.toml
for i in $(seq 0 $((devices - 1))); do
    printf '[[blk]]\nname = "d%d"\nsocket = "%s/d%d.sock"\nimage = "%s/d%d.img"\nsize = "16M"\n' \
        "$i" "$tmp" "$i" "$tmp" "$i" >>"$config"
    [[ -z $spare ]] || printf 'spare = "%s"\n' "$spare" >>"$config"
    echo >>"$config"
done
status() { timeout 20 "$bin/reflector" status --json --control "$tmp/ctl"; }
echo "bench-fleet: starting $devices block devices${jail:+ (not jailed)}${spare:+, spare=$spare}" >&2
start=$(date +%s%N)
"$bin/reflector" serve $jail ${VMM:+--vmm "$VMM"} --control "$tmp/ctl" --config "$config" 2>"$tmp/log" &
pid=$!
for _ in $(seq 600); do [[ -S $tmp/ctl ]] && break; kill -0 "$pid" 2>/dev/null || break; sleep 0.01; done
[[ -S $tmp/ctl ]] || { echo "bench-fleet: the reflector did not start:" >&2; tail -20 "$tmp/log" >&2; exit 1; }
serving=$(date +%s%N)
attached=0
for _ in $(seq 3000); do
    attached=$(status | python3 -c 'import json,sys; print(sum(d["attached"] for d in json.load(sys.stdin)))')
    ((attached == devices)) && break
    sleep 0.01
done
ready=$(date +%s%N)
((attached == devices)) || { echo "bench-fleet: only $attached of $devices attached after 30 s" >&2; exit 1; }
echo "ready: control socket after $(((serving - start) / 1000000)) ms, all $devices driver VMs attached after $(((ready - start) / 1000000)) ms (goal: 2000 ms)"

echo "bench-fleet: verified I/O on each device" >&2
failed=0
for i in $(seq 0 $((devices - 1))); do
    if ! timeout 60 "$bin/blk-load" --socket "$tmp/d$i.sock" --job randwrite --bs 4k --qd 4 --ios 64 \
        --verify >"$tmp/load$i" 2>&1; then
        failed=$((failed + 1))
        echo "bench-fleet: d$i failed:" >&2
        tail -3 "$tmp/load$i" >&2
    fi
    (((i + 1) % 20 == 0)) && echo "bench-fleet: $((i + 1)) devices verified" >&2
done
echo "verified I/O: $((devices - failed)) of $devices devices passed"

# Idle: let the fleet settle (driver VMs sleep after their poll window; an
# idle device releases its bounce slots and slows its watch after 5 s).
sleep 6
before=$(python3 "$here/cpu-tree.py" "$pid")
sleep "$idle"
after=$(python3 "$here/cpu-tree.py" "$pid")
python3 "$here/cpu-tree.py" --delta "$before" "$after" >"$tmp/cpu1"
python3 - "$tmp/cpu1" "$idle" <<'EOF'
import json, sys
delta = json.load(open(sys.argv[1]))
seconds = float(sys.argv[2])
def share(us): return 100 * us / 1e6 / seconds
total = sum(delta.values())
print(f"idle CPU over {seconds:.0f} s: {share(total):.2f} % of one core (goal: under 1 %); "
      + ", ".join(f"{role} {share(us):.2f} %" for role, us in sorted(delta.items())))
EOF

status >"$tmp/status.json"
"$bin/reflector" status --control "$tmp/ctl" | tail -1
python3 - "$tmp/status.json" "$pid" "$devices" <<'EOF'
import json, sys
devices = json.load(open(sys.argv[1]))
rss = sorted(d["driver_rss_kib"] for d in devices)
def mib(kib): return f"{kib / 1024:.2f} MiB"
print(f"driver VM RSS: min {mib(rss[0])}, median {mib(rss[len(rss) // 2])}, max {mib(rss[-1])} "
      f"(goal: each under 4 MiB; {sum(r >= 4096 for r in rss)} over)")
own = sorted(d.get("driver_own_kib", 0) for d in devices)
print(f"driver VM own memory (anonymous; the rest is the vmm's code and libraries, shared): min {mib(own[0])}, "
      f"median {mib(own[len(own) // 2])}, max {mib(own[-1])}; the fleet's own {mib(sum(own))}")
fields = {l.split(":")[0]: (l.split()[1:] or ["0"])[0] for l in open(f"/proc/{sys.argv[2]}/status") if ":" in l}
reflector = int(fields["VmRSS"])
budget = 10 * 1024 + 256 * int(sys.argv[3])
print(f"reflector RSS: {mib(reflector)} (budget {mib(budget)}: 10 MiB + 256 KiB per device): "
      f"anonymous {mib(int(fields['RssAnon']))}, files {mib(int(fields['RssFile']))}, "
      f"shared memory {mib(int(fields['RssShmem']))}; {fields['Threads']} threads")
caps = {d["memory_cap_bytes"] for d in devices}
print("memory cap per driver VM (current and spare, each its own): " + ", ".join(f"{c >> 20} MiB" if c else "none" for c in sorted(caps)))
EOF
((failed == 0))
