#!/usr/bin/env bash
# The reflector's tests that end driver VMs in every way (crash, hang,
# poison, kill, stop, jail escapes), run again with the vmm built as the
# production one is: static, on musl (README "Build"). Its C library makes
# some system calls differently from glibc's (pthread_kill is tkill; an
# ioctl's request arrives sign-extended), and the vmm's seccomp filters
# must allow what it does and nothing more.
#
# The test binaries find the vmm beside the reflector, so this puts a musl
# vmm with the test images there for the run and puts the glibc one back
# afterwards. Run after `cargo build --release` (ci/test.sh does).
#
# Usage: ci/static-vmm-tests.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
log() { printf 'static-vmm-tests: %s\n' "$*" >&2; }

tests=(chaos hostile_drivers jail net no_request_waits_forever)
release=target/release
[[ -x $release/reflector && -x $release/vmm ]] || { log "build first: cargo build --release"; exit 1; }

log "building the vmm with the test images for x86_64-unknown-linux-musl"
timeout 1500 cargo build --release --locked -p vmm --target x86_64-unknown-linux-musl --target-dir target/static
static_vmm=target/static/x86_64-unknown-linux-musl/release/vmm
if LC_ALL=C readelf -lW "$static_vmm" | grep -q INTERP; then
    log "$static_vmm is dynamically linked"; exit 1
fi

log "building the test binaries"
binaries=$(timeout 1500 cargo test --release --locked -p reflector --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
wanted = set(sys.argv[1:])
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") \
            and message["profile"]["test"] and message["target"]["name"] in wanted:
        print(message["target"]["name"], message["executable"])' "${tests[@]}")
(($(wc -l <<<"$binaries") == ${#tests[@]})) || { log "found $(wc -l <<<"$binaries") of ${#tests[@]} test binaries"; exit 1; }

# cargo test --no-run put the glibc vmm back beside the reflector: keep it
# aside, and restore it however this ends.
cp "$release/vmm" "$release/vmm.glibc"
trap 'mv -f "$release/vmm.glibc" "$release/vmm"' EXIT
cp "$static_vmm" "$release/vmm.static"
mv -f "$release/vmm.static" "$release/vmm"

passed=0 failed=0
while read -r name binary; do
    log "$name, with the static vmm"
    output=$(cd reflector && timeout 900 "$binary" 2>&1) && status=0 || status=$?
    result=$(grep '^test result:' <<<"$output" || true)
    printf '%s: %s\n' "$name" "${result:-no result (exit $status)}"
    if ((status != 0)); then
        printf '%s\n' "$output" | tail -60 >&2
        failed=$((failed + 1))
    fi
    passed=$((passed + $(awk '{ print $4 }' <<<"${result:-x x x 0}")))
done <<<"$binaries"
echo "static vmm: $passed tests passed in ${#tests[@]} binaries, $failed binaries failed"
((failed == 0))
