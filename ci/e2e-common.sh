# Shared definitions of the end-to-end guest jobs. Sourced by the host scripts
# (bash) and copied into the guest initramfs, where /init (busybox ash) sources
# it too: keep it POSIX sh. The guest and the host-side data check must agree
# on every number here, which is why both read this one file.
#
# Disk layout the jobs use on the block device (offsets in MiB):
#   [0, FIOSIZE)              fio random writes with crc32c verify headers
#   [STAMP, STAMP + 1)        the "stamp": 1 MiB of text derived from the run's
#                             seed, where STAMP = max(64, FIOSIZE)
# A device must therefore hold at least STAMP + 1 MiB (65 MiB by default).

E2E_FIO_DEFAULT_MIB=48
E2E_STAMP_MIB=1

# e2e_stamp_offset_mib FIOSIZE_MIB: where the stamp starts, in MiB.
e2e_stamp_offset_mib() {
    if [ "$1" -lt 64 ]; then echo 64; else echo "$1"; fi
}

# e2e_fio_args FIOSIZE_MIB SEED: the fio options that define what is written
# (layout, block sizes, data). The guest adds the engine, depth and
# do_verify; the host adds verify_only. Same options => same blocks.
e2e_fio_args() {
    echo "--name=e2e-verify --rw=randwrite --bssplit=4k/80:64k/20 --verify=crc32c --verify_fatal=1 --offset=0 --size=${1}M --randseed=$2"
}

# e2e_stamp SEED: writes the 1 MiB stamp for SEED to stdout: 16384 lines of
# 64 ASCII bytes ("E2E-STAMP run=SEED blk=B line=L", padded), so any awk
# (busybox in the guest, mawk/gawk on the host) produces the same bytes.
e2e_stamp() {
    awk -v run="$1" 'BEGIN {
        for (b = 0; b < 256; b++)
            for (l = 0; l < 64; l++)
                printf "%-63s\n", sprintf("E2E-STAMP run=%-20s blk=%05d line=%02d", run, b, l)
    }'
}
