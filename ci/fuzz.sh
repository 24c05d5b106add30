#!/usr/bin/env bash
# Fuzzing (cargo fuzz / libFuzzer) of every parser fed by a client, a driver
# or an operator: the targets in fuzz/fuzz_targets/.
#
#   ci/fuzz.sh --smoke            each target briefly, with AddressSanitizer (the test command runs this)
#   ci/fuzz.sh --runs 10000000    a long run: that many executions per target, without a sanitizer
#                                 (about 3x faster); prints executions, coverage and crashes per target
#   ci/fuzz.sh --runs N TARGET... only these targets
#
# cargo fuzz passes nightly compiler flags (-Zsanitizer); the machine has one
# stable toolchain, which accepts them with RUSTC_BOOTSTRAP=1. Targets are
# built optimized with debug assertions (`-a`), so an arithmetic overflow
# is a crash here as in a debug build, not a silent wrap: the ELF parser
# had one that only `cargo test` in debug found. Crashes are saved in
# fuzz/artifacts/TARGET/ and make the script fail.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1

mode=smoke runs=0
if [[ ${1:-} == --smoke ]]; then shift
elif [[ ${1:-} == --runs ]]; then mode=long runs=${2:?--runs needs a number}; shift 2
else echo "usage: ci/fuzz.sh --smoke | --runs N [TARGET...]" >&2; exit 2
fi
command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2; exit 1; }

targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo fuzz list)
fi
sanitizer=(-s address)
[[ $mode == long ]] && sanitizer=(-s none)

echo "fuzz: building ${#targets[@]} targets (${sanitizer[*]})"
timeout 2400 cargo fuzz build -O -a "${sanitizer[@]}"

# Seeds where a random start would rarely get past the first check: real
# driver VM images for the ELF loader, real lines for the config and the
# control protocol.
seed() {
    local target=$1 dir=corpus/$1
    [[ -z $(ls -A "$dir" 2>/dev/null) ]] || return 0
    case $target in
        elf_image)
            for image in ../target/guest/x86_64-unknown-linux-gnu/release/{hello,blk,net,faulty,pingpong,mirror}; do
                [[ -f $image ]] && cp "$image" "$dir/$(basename "$image")"
            done ;;
        config)
            printf '[[blk]]\nname = "d0"\nsocket = "/tmp/d0.sock"\nimage = "/tmp/d0.img"\nsize = "1G"\nchecksums = true\n\n[[net]]\nsocket = "/tmp/n.sock"\nmac = "52:54:00:00:00:01"\nswitch = "lan"\n\n[[tap]]\nname = "tap0"\n' >"$dir/toml"
            echo 'socket=/tmp/d.sock,image=/tmp/d.img,size=64M,readonly=on,spare=on,hang_ms=200' >"$dir/blk"
            echo 'socket=/tmp/n.sock,mac=52:54:00:12:34:56,switch=lan,fault_budget=5' >"$dir/net" ;;
        blk_chain | net_chain)
            # A queue of 16 with one chain published (fuzz/src/lib.rs has the
            # layout): header, data, status (blk: a 4 KiB read); a 1514-byte
            # frame chain (net). Buffers at 0x400 and up.
            python3 - "$dir/one-chain" "$target" <<'PY'
import struct, sys
path, target = sys.argv[1], sys.argv[2]
memory = bytearray(0x1600)
def desc(i, addr, length, flags, nxt):
    struct.pack_into("<QIHH", memory, i * 16, addr, length, flags, nxt)
if target == "blk_chain":
    desc(0, 0x400, 16, 1, 1); desc(1, 0x500, 4096, 3, 2); desc(2, 0x1500, 1, 2, 0)
    struct.pack_into("<IIQ", memory, 0x400, 0, 0, 8)
    prefix = bytes([4, 34, 0])
else:
    desc(0, 0x400, 12, 1, 1); desc(1, 0x500, 1514, 0, 0)
    prefix = bytes([4, 0, 0])
struct.pack_into("<HHH", memory, 0x100, 0, 1, 0)
open(path, "wb").write(prefix + bytes(memory))
PY
            ;;
        crash_report)
            cp ../target/guest/x86_64-unknown-linux-gnu/release/faulty "$dir/faulty" 2>/dev/null || true
            printf '%s' '{"vm":"d0","outcome":"stopped","location":{"function":"run","file":"/src/channel.rs","line":239},"build_id":"ab12"}' >"$dir/report" ;;
        qtest_answers)
            # The first byte picks each command's kind (a bit each: readl or
            # writel); then what QEMU sends: notices and answers.
            printf '\xffIRQ raise 16\nOK 0x2a\nIRQ lower 16\nOK 0xffffffff\nFAIL\nOK\n' >"$dir/conversation" ;;
        control)
            local n=0
            for line in '{"request":"status"}' '{"request":"metrics"}' \
                '{"request":"inject","device":"d0","fault":"panic","after":3}' \
                '{"request":"inject","device":"n0","fault":"corrupt-reads"}' \
                '{"request":"kill","device":"d0"}' '{"request":"recover","device":"n0"}'; do
                n=$((n + 1))
                echo "$line" >"$dir/request-$n"
            done ;;
    esac
}

failed=0
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    seed "$target"
    if [[ $mode == smoke ]]; then
        limits=(-max_total_time=8)
    else
        limits=(-runs="$runs")
    fi
    log=$(mktemp)
    start=$SECONDS
    if timeout 7200 cargo fuzz run -O -a "${sanitizer[@]}" "$target" -- "${limits[@]}" -print_final_stats=1 \
        >"$log" 2>&1; then
        result=ok
    else
        result=CRASH failed=1
        grep -E "panicked|ERROR|SUMMARY|Test unit written" "$log" | head -8 >&2 || true
    fi
    executions=$(grep -oP 'stat::number_of_executed_units: \K[0-9]+' "$log" | tail -1)
    coverage=$(grep -oP '#[0-9]+\s+\w+\s+cov: \K[0-9]+' "$log" | tail -1)
    printf 'fuzz: %-16s %-5s executions %-10s coverage %-6s %ss\n' \
        "$target" "$result" "${executions:-?}" "${coverage:-?}" "$((SECONDS - start))"
    rm -f "$log"
done
exit "$failed"
