#!/usr/bin/env bash
# Recovery benchmark (not a test): the distribution of recovery stalls over
# many SIGKILLs of a driver VM while verified load (blk-load) runs, measured
# by the reflector from the fault (or the first request after it) to the next
# completion, and each failover split into its phases (detection, retire,
# replacement, device reset, replay, then drain: to the last request the
# fault caught; reflector::failover), and the client's own slowest request
# in each of the load's 2-second jobs, against the same with no fault (two
# load runs, 8 jobs, before the first kill).
# For scale: QEMU with qemu-storage-daemon and reconnect-ms=1000 stalls
# seconds when its backend is killed (ci/e2e-qsd.sh measures it).
#
# By default the device keeps what the reflector keeps by default: a standby
# (a jailed vmm with its VM built, waiting before the guest's first
# instruction), so a restart skips starting and jailing a vmm but still boots
# the driver. With --cold, it keeps nothing (spare=off: a fresh vmm each
# time); with --spare (or --warm), a warm spare (a booted driver VM waiting),
# so a restart skips the boot too.
#
# With --no-jail, driver VMs are not jailed (to measure what the jail costs:
# each cold restart builds a new one).
#
# With --device nvme, the disk is QEMU's NVMe controller (its own QEMU
# process, needs qemu-system-x86_64) instead of the simulated one: the
# failover of a driver of hardware nobody here wrote, its quiesce included;
# --aio io_uring has that QEMU reach the image through io_uring.
#
# The binaries are target/release's; BIN=DIR takes them from DIR instead
# (to compare two builds), and VMM=PATH the vmm alone (the reflector's
# --vmm: the README's static production vmm, say).
#
# Usage: ci/bench-recovery.sh [--kills N] [--seed S] [--cold | --standby | --spare] [--no-jail]
#                             [--device sim|nvme] [--aio threads|io_uring]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
kills=1000 seed=1 spare=standby jail= device=sim aio=
while (($#)); do
    case $1 in
    --spare | --warm) spare=warm; shift ;;
    --standby) spare=standby; shift ;;
    --cold) spare=off; shift ;;
    --no-jail) jail=--no-jail; shift ;;
    --kills) kills=${2:?}; shift 2 ;;
    --seed) seed=${2:?}; shift 2 ;;
    --device) device=${2:?}; shift 2 ;;
    --aio) aio=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-recovery: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
case $device in
sim | nvme) ;;
*) echo "bench-recovery: --device wants sim or nvme, not '$device'" >&2; exit 2 ;;
esac
case $device/$aio in
*/ | nvme/threads | nvme/io_uring) ;;
*) echo "bench-recovery: --aio wants threads or io_uring, with --device nvme" >&2; exit 2 ;;
esac
bin=${BIN:-$repo/target/release}
tmp=$(mktemp -d /tmp/bench-recovery.XXXXXX)
pid=''
trap '[[ -n $pid ]] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"' EXIT
"$bin/reflector" serve $jail ${VMM:+--vmm "$VMM"} --control "$tmp/ctl" \
    --blk "socket=$tmp/d.sock,image=$tmp/d.img,size=256M,name=bench,fault_budget=1000000,spare=$spare,device=$device${aio:+,aio=$aio}" 2>"$tmp/log" &
pid=$!
for _ in $(seq 300); do [[ -S $tmp/ctl ]] && break; sleep 0.1; done
echo "bench-recovery: $kills SIGKILLs under verified load, spare=$spare, device=$device${aio:+, aio=$aio}" >&2
# Gaps above 100 ms: a driver VM that served that long is not in a crash
# loop, so every restart is immediate (no backoff), which is what we measure.
"$bin/reflector" chaos --control "$tmp/ctl" --device bench --socket "$tmp/d.sock" --kinds kill \
    --faults "$kills" --seed "$seed" --min-gap-ms 110 --max-gap-ms 130 --quiet-runs 2
