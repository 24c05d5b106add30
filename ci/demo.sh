#!/usr/bin/env bash
# The demo from README.md: builds everything, boots a driver VM, shows how
# each kind of driver failure is reported, and measures boot time.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> building host binaries and driver VM images (cargo build --release)"
cargo build --release
vmm=target/release/vmm

echo
echo "==> a driver VM boots in guest ring 3, prints and exits"
"$vmm" run --image hello --cmdline "from the demo"

echo
echo "==> every way a driver can fail is reported precisely (one JSON line each)"
for failure in panic page-fault illegal triple-fault; do
    "$vmm" run --image faulty --cmdline "$failure" --json --console none || true
done
"$vmm" run --image faulty --cmdline hang --timeout 500ms --json --console none || true

echo
echo "==> boot time (process spawn -> guest ready, and in-process re-create)"
"$vmm" bench --iterations 100
