#!/usr/bin/env bash
# The project's test command (see README.md): formatting, lints, build and
# every test, for the host workspace and the driver VM images.
# KVM tests skip loudly without /dev/kvm, and fail instead when CI is set.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check (host workspace, then driver VM images)"
cargo fmt --all -- --check
(cd driver-vm && cargo fmt --all -- --check)
(cd guest-kernel && cargo fmt --all -- --check)
(cd fuzz && cargo fmt --all -- --check)

step "cargo clippy -D warnings (host workspace: builds the images too)"
timeout 1500 cargo clippy --release --all-targets --locked -- -D warnings

step "cargo clippy -D warnings (driver VM images and guest-kernel, isolated and hosted)"
(cd driver-vm && timeout 600 cargo clippy --release --locked --config isolated.toml --features fault-injection --target-dir ../target/guest -- -D warnings)
(cd driver-vm && timeout 600 cargo clippy --all-targets --locked --target-dir ../target/hosted -- -D warnings)
(cd guest-kernel && timeout 600 cargo clippy --release --config ../driver-vm/isolated.toml --target-dir ../target/guest-lint -- -D warnings)
(cd guest-kernel && timeout 600 cargo clippy --all-targets --target-dir ../target/hosted -- -D warnings)

step "driver unit tests without KVM (cargo test in driver-vm and guest-kernel: fake devices and channel)"
(cd driver-vm && timeout 600 cargo test --locked --target-dir ../target/hosted)
(cd guest-kernel && timeout 600 cargo test --target-dir ../target/hosted)

step "cargo build --release"
timeout 1500 cargo build --release --locked

step "a production vmm (--no-default-features: no test images, drivers without fault injection; static, on musl) embeds only blk, e1000e, net, null, nvme and vmdisk"
# The README's production build: static on musl, which starts without
# glibc's 68 CPUID instructions (each a trap to the hypervisor).
production_vmm=target/production/x86_64-unknown-linux-musl/release/vmm
timeout 1500 cargo build --release --locked -p vmm --no-default-features \
    --target x86_64-unknown-linux-musl --target-dir target/production
production=$($production_vmm images | tr '\n' ' ')
[[ $production == "blk e1000e net null nvme vmdisk " ]] || { echo "the production vmm embeds: $production" >&2; exit 1; }
# Static: no program interpreter, so its jail binds no shared library.
if LC_ALL=C readelf -lW "$production_vmm" | grep -q INTERP; then
    echo "the production vmm is dynamically linked: $(readelf -lW "$production_vmm" | grep -A1 INTERP)" >&2; exit 1
fi
if [[ -e /dev/kvm ]]; then
    prod=$(mktemp -d)
    target/release/reflector serve --vmm "$production_vmm" --control "$prod/ctl" \
        --blk "socket=$prod/d.sock,image=$prod/d.img,size=4M,name=d0" 2>"$prod/log" &
    reflector_pid=$!
    for _ in $(seq 300); do [[ -S $prod/ctl ]] && grep -q "serving channel generation" "$prod/log" && break; sleep 0.1; done
    if target/release/reflector inject d0 panic --control "$prod/ctl" 2>"$prod/inject"; then
        echo "a production driver accepted an injected fault" >&2; kill "$reflector_pid"; exit 1
    fi
    grep -q "cannot commit" "$prod/inject" || { cat "$prod/inject" "$prod/log" >&2; kill "$reflector_pid"; exit 1; }
    kill "$reflector_pid"; wait "$reflector_pid" || true
    rm -rf "$prod"
    echo "production: blk e1000e net null nvme vmdisk; inject refused"
fi

step "end-to-end: a QEMU guest runs fio --verify on a disk served through a driver VM"
timeout 1500 ci/e2e-reflector.sh

step "end-to-end: the same with per-request DMA windows (dma=direct): the controller reaches the guest's own buffers"
timeout 1500 ci/e2e-reflector.sh --dma direct

step "end-to-end: the same on QEMU's NVMe controller model through the nvme driver, also across kills and injected faults"
timeout 1500 ci/e2e-reflector.sh --device nvme

step "end-to-end: the same with QEMU reaching the image through io_uring (aio=io_uring)"
timeout 1500 ci/e2e-reflector.sh --device nvme --aio io_uring

step "end-to-end: two QEMU guests ping and send a checksummed TCP transfer through net driver VMs, also while they are killed"
timeout 1500 ci/e2e-net.sh

step "end-to-end: the same on QEMU's e1000e models through the e1000e driver, also while they are killed"
timeout 1500 ci/e2e-net.sh --device e1000e

step "the VFIO door: a TCG guest with an emulated IOMMU binds an NVMe controller to vfio-pci; vfio-check drives it through hardware::vfio"
timeout 900 ci/e2e-vfio.sh

step "cgroup v2: a TCG guest with only the unified hierarchy runs the jail's limit tests from a systemd-style service cgroup"
timeout 1500 ci/e2e-cgroup2.sh --timeout 600
# The end-to-end steps above (each skips loudly without QEMU, outside CI).
e2e_steps=7
e2e_passed=$([[ -n $(command -v qemu-system-x86_64) ]] && echo "$e2e_steps" || echo 0)

step "fuzz smoke: every fuzz target for a few seconds with AddressSanitizer (ci/fuzz.sh)"
fuzz_log=$(mktemp)
trap 'rm -f "$fuzz_log"' EXIT
timeout 2400 ci/fuzz.sh --smoke | tee "$fuzz_log"
fuzz_passed=$(grep -c '^fuzz: .* ok ' "$fuzz_log" || true)

step "the tests that end driver VMs every way, again with the vmm built as in production (static, musl)"
static_log=$(mktemp)
trap 'rm -f "$static_log" "$fuzz_log"' EXIT
timeout 1800 ci/static-vmm-tests.sh | tee "$static_log"
static_passed=$(sed -n 's/^static vmm: \([0-9]*\) tests passed.*/\1/p' "$static_log")

step "cargo test --release"
log=$(mktemp)
trap 'rm -f "$log" "$fuzz_log" "$static_log"' EXIT
timeout 1800 cargo test --release --locked 2>&1 | tee "$log"
# One closing line with the totals over every test binary.
awk -v e2e="$e2e_passed" -v steps="$e2e_steps" -v fuzz="$fuzz_passed" -v static="${static_passed:-0}" '/^test result:/ { passed += $4; failed += $6; ignored += $8 }
     END { printf "\ntests: %d passed, %d failed, %d skipped\n", passed + e2e + fuzz + static, failed, ignored + steps - e2e }' "$log"
