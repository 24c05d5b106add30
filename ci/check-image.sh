#!/usr/bin/env bash
# Host-side data check: confirms that a raw image holds what an end-to-end
# guest job (ci/qemu-blk-fio.sh) wrote to its /dev/vda. Run it after the guest
# has shut down; the backend may still be running or may have exited.
#
# Usage: ci/check-image.sh --image-file IMG --seed N [--fiosize MIB] [--job JOB]
#   --job fio-verify (default) or verify-only: stamp + fio region;
#         write-pattern: stamp only.
# Checks (offsets and data are defined in ci/e2e-common.sh):
#   1. the 1 MiB at offset max(64, fiosize) MiB equals `e2e_stamp SEED`, byte
#      for byte (unique to the seed, so stale data of an earlier run fails);
#   2. fio jobs: `fio <e2e_fio_args FIOSIZE SEED> --verify_only=1` on the image
#      checks the crc32c verify header (offset, checksum) of every block fio
#      wrote in [0, fiosize) MiB; it reads only.
# Exit status 0 when every check passes, 1 otherwise (with the reason).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
. "$here/e2e-common.sh"
log() { printf 'check-image: %s\n' "$*" >&2; }
die() { printf 'check-image: FAIL: %s\n' "$*" >&2; exit 1; }

image='' seed='' fiosize=$E2E_FIO_DEFAULT_MIB job=fio-verify
while (($#)); do
    case $1 in
    --image-file) image=${2:?--image-file needs a path}; shift 2 ;;
    --seed) seed=${2:?--seed needs a number}; shift 2 ;;
    --fiosize) fiosize=${2:?--fiosize needs MiB}; shift 2 ;;
    --job) job=${2:?--job needs a name}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -n $image && -n $seed ]] || die "usage: $0 --image-file IMG --seed N [--fiosize MIB] [--job JOB]"
[[ -f $image || -b $image ]] || die "$image does not exist"
image=$(realpath "$image")
[[ $seed =~ ^[0-9]+$ && $fiosize =~ ^[0-9]+$ ]] || die "--seed and --fiosize must be numbers"
case $job in fio-verify | verify-only | write-pattern) ;; *) die "nothing to check for job '$job'" ;; esac

if command -v qemu-img >/dev/null; then
    fmt=$(timeout 30 qemu-img info -U "$image" 2>/dev/null | sed -n 's/^file format: *//p' | head -1 || true)
    [[ -z $fmt || $fmt == raw ]] || die "$image is $fmt, not raw: the check reads the guest's offsets directly from the file"
fi

t0=$(date +%s.%N)
stamp_mib=$(e2e_stamp_offset_mib "$fiosize")
if ! cmp -s <(timeout 60 dd if="$image" bs=1M skip="$stamp_mib" count=1 status=none) <(e2e_stamp "$seed"); then
    die "the 1 MiB at offset ${stamp_mib}MiB of $image is not the stamp of seed $seed that the guest wrote (data lost, or written elsewhere)"
fi
log "stamp of seed $seed found at ${stamp_mib}MiB"

if [[ $job != write-pattern ]]; then
    command -v fio >/dev/null || die "fio not found on the host: run ci/install-e2e-deps.sh"
    fout=$(mktemp /tmp/check-image.XXXXXX.fio)
    trap 'rm -f "$fout" "$fout.err"' EXIT
    # shellcheck disable=SC2046
    # (From /tmp and with verify_state_save=0: fio would otherwise leave a
    # local-*-verify.state file in the current directory.)
    if ! (cd /tmp && timeout 300 fio $(e2e_fio_args "$fiosize" "$seed") --filename="$image" --ioengine=psync \
        --verify_only=1 --verify_state_save=0 --eta=never --output="$fout" >/dev/null 2>"$fout.err"); then
        cat "$fout.err" "$fout" | grep -E 'verify failed|bad magic|Expected CRC|Received CRC|fio: ' | head -5 | sed 's/^/  fio: /' >&2 || true
        die "fio --verify_only found blocks in [0, ${fiosize}MiB) of $image that are not what the guest wrote"
    fi
    reads=$(sed -n 's/.*issued rwts: total=\([0-9]*\),.*/\1/p' "$fout" | head -1)
    [[ ${reads:-0} -gt 0 ]] || die "fio --verify_only read nothing from $image"
    log "fio --verify_only checked $reads blocks in [0, ${fiosize}MiB)"
fi
log "pass: $image holds the data of seed $seed ($(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')s)"
