#!/usr/bin/env bash
# The demo from README.md, on built-in defaults:
#   1. build the host binaries and the driver VM images;
#   2. the reflector serves a disk whose driver runs isolated in a driver VM;
#   3. a QEMU guest attaches it (vhost-user-blk) and runs fio with crc32c
#      verification, while the driver VM is SIGKILLed every half second: fio
#      passes, and `reflector status` shows the restarts and the stalls
#      (QEMU, fio and a guest kernel are installed first when missing and
#      this runs as root);
#   4. chaos: every kind of driver fault under verified load from the
#      project's own vhost-user frontend;
#   5. how every kind of driver failure is reported, and the boot time.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }

say "building host binaries and driver VM images (cargo build --release)"
cargo build --release
bin=target/release

have_qemu() { command -v qemu-system-x86_64 >/dev/null && command -v fio >/dev/null; }
if ! have_qemu && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    say "installing QEMU, fio and busybox for the guest (ci/install-e2e-deps.sh)"
    timeout 1200 ci/install-e2e-deps.sh
fi

demo=$(mktemp -d /tmp/driver-vm-demo.XXXXXX)
reflector_pid=''
cleanup() {
    [[ -n $reflector_pid ]] && kill "$reflector_pid" 2>/dev/null && wait "$reflector_pid" 2>/dev/null
    rm -rf "$demo"
}
trap cleanup EXIT

say "the reflector serves $demo/disk.img; its driver runs in a driver VM (a separate, jailed vmm process)"
jail=()
if [[ $(id -u) != 0 ]]; then
    say "not root: driver VMs cannot be jailed (namespaces, uids, cgroups need root); running with --no-jail"
    jail=(--no-jail)
fi
"$bin/reflector" serve "${jail[@]}" --control "$demo/ctl" \
    --blk "socket=$demo/disk.sock,image=$demo/disk.img,size=256M,name=disk0,hang_ms=100,fault_budget=1000" \
    2>"$demo/reflector.log" &
reflector_pid=$!
for _ in $(seq 300); do
    [[ -S $demo/disk.sock ]] && grep -q "controller ready" "$demo/reflector.log" && break
    sleep 0.1
done
cat "$demo/reflector.log"

if have_qemu; then
    say "a QEMU guest runs fio --verify=crc32c on the disk while its driver VM is SIGKILLed every 0.5 s"
    ci/qemu-blk-fio.sh --socket "$demo/disk.sock" --image-file "$demo/disk.img" --fiosize 96 --timeout 300 &
    guest=$!
    kills=0
    while kill -0 "$guest" 2>/dev/null; do
        sleep 0.5
        "$bin/reflector" kill --control "$demo/ctl" disk0 >/dev/null 2>&1 && kills=$((kills + 1))
    done
    wait "$guest"
    say "fio verified every block across $kills driver VM kills; what the reflector saw:"
    "$bin/reflector" status --control "$demo/ctl"
else
    say "QEMU or fio is missing (run ci/install-e2e-deps.sh as root): skipping the QEMU guest"
fi

say "chaos: 70 faults of every kind (kill, panic, page fault, illegal, hang, lie, stop) under verified load"
"$bin/reflector" chaos --control "$demo/ctl" --device disk0 --socket "$demo/disk.sock" --faults 70 --seed 1 \
    --min-gap-ms 110 --max-gap-ms 150

kill "$reflector_pid"
wait "$reflector_pid" 2>/dev/null || true
reflector_pid=''

say "every way a driver can fail is reported precisely by vmm (one JSON line each)"
for failure in panic page-fault illegal write-idt stack-overflow; do
    "$bin/vmm" run --image faulty --cmdline "$failure" --json --console none || true
done
"$bin/vmm" run --image faulty --cmdline hang --timeout 500ms --json --console none || true

say "boot time (process spawn -> guest ready, and in-process re-create)"
"$bin/vmm" bench --iterations 50
