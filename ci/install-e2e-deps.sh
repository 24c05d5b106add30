#!/usr/bin/env bash
# Installs what the end-to-end tests need (QEMU 10.x from bookworm-backports,
# qemu-storage-daemon, busybox-static, fio, cpio, xz) and the net peer
# (dpdk-testpmd with its vhost PMD: packages dpdk-dev, librte-net-vhost23). Idempotent: when every
# tool is already present at the right version it only checks and returns.
# Must run as root (apt-get). Every apt step is time-bounded.
#
# Usage: ci/install-e2e-deps.sh
set -euo pipefail

log() { printf 'install-e2e-deps: %s\n' "$*" >&2; }
die() { printf 'install-e2e-deps: ERROR: %s\n' "$*" >&2; exit 1; }

# Wait for a concurrent apt/dpkg run instead of failing on the lock.
APT_OPTS=(-o DPkg::Lock::Timeout=300 -o Acquire::Retries=3 -o Acquire::http::Timeout=60)
export DEBIAN_FRONTEND=noninteractive

qemu_major() {
    # Prints the major version of qemu-system-x86_64, or 0 when absent.
    local v
    v=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')
    echo "${v:-0}"
}

have_all() {
    [[ $(qemu_major) -ge 10 ]] || return 1
    command -v qemu-storage-daemon >/dev/null || return 1
    qemu-storage-daemon --version 2>/dev/null | grep -q '^qemu-storage-daemon version \(1[0-9]\|[2-9][0-9]\)\.' || return 1
    command -v qemu-img >/dev/null || return 1
    [[ -x /bin/busybox ]] || return 1
    # busybox-static, not the dynamic busybox: it must run inside the initramfs.
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' || return 1
    command -v fio >/dev/null || return 1
    command -v cpio >/dev/null || return 1
    command -v xz >/dev/null || return 1
    command -v zstd >/dev/null || return 1
    command -v dpkg-deb >/dev/null || return 1
    command -v ldd >/dev/null || return 1
    command -v dpdk-testpmd >/dev/null || return 1
    dpkg-query -W -f='${Status}' librte-net-vhost23 2>/dev/null | grep -q 'install ok installed' || return 1
    return 0
}

if have_all; then
    log "everything present: $(qemu-system-x86_64 --version | head -1), fio $(fio --version), busybox-static"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "not root: run this script as root (it calls apt-get install)"

# 1. bookworm-backports: reuse the mirror of the configured Debian source.
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$( (cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null || true) |
        grep -E '^(URIs:|deb )' | grep -oE 'https?://[^ ]*/debian/?( |$)' | grep -v security | head -1 | tr -d ' ' || true)
    mirror=${mirror%/}
    [[ -n $mirror ]] || mirror=http://deb.debian.org/debian
    log "adding bookworm-backports from $mirror"
    echo "deb $mirror bookworm-backports main" >/etc/apt/sources.list.d/bookworm-backports.list
fi

# 2. apt-get update once (this run), only when needed.
log "apt-get update"
timeout 600 apt-get "${APT_OPTS[@]}" update -q >&2 ||
    die "apt-get update failed or timed out: check that Debian's mirror is reachable and no other apt run is stuck"

# 3. Install. QEMU and its utilities from backports (10.x); the rest from bookworm.
log "installing qemu-system-x86 qemu-utils (bookworm-backports) busybox-static fio cpio xz-utils"
timeout 1200 apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends \
    -t bookworm-backports qemu-system-x86 qemu-utils qemu-system-data >&2 ||
    die "apt-get install of QEMU from bookworm-backports failed or timed out (see apt's output above)"
timeout 600 apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends \
    busybox-static fio cpio xz-utils zstd dpdk-dev librte-net-vhost23 >&2 ||
    die "apt-get install of busybox-static fio cpio xz-utils zstd dpdk-dev librte-net-vhost23 failed or timed out (see apt's output above)"

have_all || die "installation finished but a tool is still missing or QEMU is older than 10 ($(qemu-system-x86_64 --version 2>&1 | head -1))"
log "done: $(qemu-system-x86_64 --version | head -1), fio $(fio --version)"
