#!/usr/bin/env bash
# Builds the Linux guest for the end-to-end tests:
#   OUTDIR/vmlinuz          Debian's linux-image-*-cloud-amd64 6.12 (bookworm-backports)
#   OUTDIR/vmlinux          the same kernel uncompressed (ELF, PVH entry; boots faster)
#   OUTDIR/initramfs.cpio   busybox-static + fio + its libraries + virtio_blk +
#                           virtio_net (+ net_failover, failover) + /init
#   OUTDIR/kernel-release   the kernel release string
# The kernel .deb is fetched with `apt-get download` into OUTDIR/cache and
# unpacked with dpkg-deb (nothing is installed on the host).
# Cached: when the outputs exist and are newer than this script, e2e-common.sh,
# fio and busybox, nothing is done.
#
# Usage: ci/build-guest.sh OUTDIR
# Env:   E2E_KERNEL_DEB=PATH   use this kernel .deb instead of downloading one
#        E2E_GUEST_MODULES="virtio_blk virtio_net"  modules to load in /init (the
#                              default; dependencies are added)
#        E2E_REBUILD=1         rebuild even when the outputs are up to date
#
# The guest's /init reads its job from the kernel command line (keys without
# dots, see qemu-blk-fio.sh): job=fio-verify|write-pattern|verify-only|shell-exit
# seed=N fiosize=MiB iodepth=N fiotimeout=SEC devwait=SEC, and prints markers on
# the serial console: "E2E-INIT:", "E2E-FIO:", "E2E-DMESG:", "E2E-RESULT: pass"
# or "E2E-RESULT: fail <reason>", then powers off.
# Network jobs (see qemu-net-pair.sh; no /dev/vda needed), on eth0 (virtio-net):
#   job=net-server ip=A peer=B mib=N port=P netwait=SEC xfertimeout=SEC
#       static address A/24, wait for carrier, receive one TCP connection with
#       `nc -l` into /tmp/recv: "E2E-NET: received bytes=.. sha256=..".
#   job=net-client ip=B peer=A mib=N seed=N pings=N port=P netwait=SEC xfertimeout=SEC
#       ping the peer until it answers ("E2E-PING: first-answer ..."), then
#       `ping -c PINGS -i 0.2` ("E2E-PING: phase=idle loss=..% rtt_avg_ms=.."),
#       then N MiB from /dev/urandom sent with nc ("E2E-NET: transfer-start",
#       "E2E-NET: transfer-end seconds=..", "E2E-NET: sent bytes=.. sha256=..")
#       while a ping runs ("E2E-PING: phase=during-transfer ...") and eth0's
#       carrier is sampled every 0.1 s ("E2E-LINK: down_samples=N samples=M").
#       mib=0: only the ping phases, then an empty connection ends the server.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { printf 'build-guest: ERROR: %s\n' "$*" >&2; exit 1; }

(($# == 1)) || die "usage: $0 OUTDIR"
out=$1
mkdir -p "$out/cache"
out=$(cd "$out" && pwd)
cache=$out/cache
modules=${E2E_GUEST_MODULES:-virtio_blk virtio_net}

# One build at a time per OUTDIR (parallel test runs share it); a waiter then
# finds the outputs up to date. Outputs are replaced by rename, so a QEMU
# already running keeps the files it opened.
exec 9>"$out/.lock"
if ! flock -n 9; then
    log "waiting for another build of $out to finish"
    flock -w 900 9 || die "another build of $out held its lock for 900s: is a build-guest.sh stuck?"
fi

# --- up to date? -----------------------------------------------------------
up_to_date() {
    local f d
    for f in vmlinuz vmlinux initramfs.cpio kernel-release; do
        [[ -s $out/$f ]] || return 1
        for d in "$here/build-guest.sh" "$here/e2e-common.sh" /usr/bin/fio /bin/busybox; do
            [[ $out/$f -nt $d ]] || return 1
        done
    done
    [[ -f $out/modules && $(cat "$out/modules") == "$modules" ]] || return 1
}
if [[ ${E2E_REBUILD:-0} != 1 ]] && up_to_date; then
    log "up to date: $out (kernel $(cat "$out/kernel-release")); E2E_REBUILD=1 forces a rebuild"
    exit 0
fi

t0=$(date +%s.%N)
for tool in dpkg-deb fio cpio xz zstd ldd flock; do
    command -v "$tool" >/dev/null || die "'$tool' not found: run ci/install-e2e-deps.sh (as root) first"
done
[[ -x /bin/busybox ]] && dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' ||
    die "busybox-static is not installed: run ci/install-e2e-deps.sh (as root) first"

# --- kernel package ----------------------------------------------------------
deb=${E2E_KERNEL_DEB:-}
if [[ -z $deb ]]; then
    deb=$(ls -t "$cache"/linux-image-6.12*-cloud-amd64_*.deb 2>/dev/null | grep -v -- '-dbg_' | head -1 || true)
fi
if [[ -z $deb ]]; then
    # The backports metapackage names the current concrete kernel package.
    pkg=$(timeout 60 apt-cache depends linux-image-cloud-amd64/bookworm-backports 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-6\.12[^ ]*-cloud-amd64\)$/\1/p' | head -1 || true)
    [[ -n $pkg ]] || die "cannot resolve linux-image-cloud-amd64 in bookworm-backports: run ci/install-e2e-deps.sh (it adds bookworm-backports and runs apt-get update), or set E2E_KERNEL_DEB=/path/to/linux-image-...-cloud-amd64.deb"
    log "downloading $pkg (apt-get download) into $cache"
    (cd "$cache" && timeout 600 apt-get -q -o APT::Sandbox::User=root -o Acquire::Retries=3 download "$pkg" >&2) ||
        die "apt-get download $pkg failed or timed out: check that Debian's mirror is reachable"
    deb=$(ls -t "$cache"/"$pkg"_*.deb | head -1)
fi
[[ -f $deb ]] || die "kernel package $deb does not exist"
log "kernel package: $(basename "$deb")"

kdir=$cache/kernel-$(basename "$deb" .deb)
if [[ ! -f $kdir/.unpacked ]]; then
    rm -rf "$kdir"
    timeout 300 dpkg-deb -x "$deb" "$kdir" || die "dpkg-deb -x $deb failed: is the file a complete .deb? delete it and retry"
    touch "$kdir/.unpacked"
fi
kver=$(ls "$kdir/lib/modules" | head -1)
[[ -n $kver && -f $kdir/boot/vmlinuz-$kver ]] || die "$deb has no /boot/vmlinuz-*: not a kernel image package?"
moddir=$kdir/lib/modules/$kver

# --- staging tree ---------------------------------------------------------------
stage=$(mktemp -d "$out/.staging.XXXXXX")
new=$(mktemp -d "$out/.new.XXXXXX")
trap 'rm -rf "$stage" "$new"' EXIT
cd "$stage"
mkdir -p usr/bin usr/sbin usr/lib/modules/e2e usr/lib64 proc sys dev tmp etc root
ln -s usr/bin bin
ln -s usr/sbin sbin
ln -s usr/lib lib
ln -s usr/lib64 lib64
if [[ $(id -u) == 0 ]]; then
    mknod -m 600 dev/console c 5 1
    mknod -m 666 dev/null c 1 3
fi

# busybox-static and its applets.
cp /bin/busybox usr/bin/busybox
for a in $(/bin/busybox --list); do
    [[ $a == busybox || -e usr/bin/$a ]] || ln -s busybox "usr/bin/$a"
done

# fio and the closure of its shared libraries, each at the path ldd names
# (the tree has the host's merged-/usr layout, so those paths resolve).
cp /usr/bin/fio usr/bin/fio
libs=$(ldd /usr/bin/fio | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
[[ -n $libs ]] || die "ldd /usr/bin/fio listed no libraries"
for l in $libs; do
    d=$(realpath -m "$(dirname "$l")")
    mkdir -p "$stage$d"
    cp -L "$l" "$stage$d/$(basename "$l")"
done
# Sanity check (needs root for chroot): fio and busybox run inside the tree.
if [[ $(id -u) == 0 ]]; then
    timeout 30 chroot "$stage" /usr/bin/fio --version >/dev/null ||
        die "fio does not run inside the staged initramfs tree (missing library?): check 'ldd /usr/bin/fio'"
fi

# Kernel modules (decompressed) and their dependencies, in load order.
find_module() {
    local name=${1//-/_} f
    while IFS= read -r f; do
        local b=${f##*/}
        b=${b%%.ko*}
        [[ ${b//-/_} == "$name" ]] && { echo "$f"; return 0; }
    done < <(find "$moddir/kernel" -name '*.ko*')
    return 1
}
declare -A loaded=()
order=()
add_module() {
    local name=${1//-/_} f tmp deps d
    [[ -n ${loaded[$name]:-} ]] && return 0
    loaded[$name]=1
    if grep -qx "kernel/.*/${name}.ko" <(sed 's/-/_/g' "$moddir/modules.builtin" 2>/dev/null); then
        return 0 # built in: nothing to load
    fi
    f=$(find_module "$name") || die "kernel module $name not found in $(basename "$deb")"
    tmp=$stage/lib/modules/e2e/$name.ko
    case $f in
    *.ko.xz) xz -dc "$f" >"$tmp" ;;
    *.ko.zst) zstd -qdc "$f" >"$tmp" ;;
    *.ko.gz) gzip -dc "$f" >"$tmp" ;;
    *.ko) cp "$f" "$tmp" ;;
    esac
    deps=$(tr '\0' '\n' <"$tmp" | sed -n 's/^depends=//p' | head -1 | tr ',' ' ')
    for d in $deps; do add_module "$d"; done
    order+=("$name")
}
for m in $modules; do add_module "$m"; done
printf '%s\n' "${order[@]}" >lib/modules/e2e/order
log "modules to load in /init: ${order[*]:-none}"

cp "$here/e2e-common.sh" e2e-common.sh

cat >init <<'INIT'
#!/bin/sh
# /init of the end-to-end guest (generated by ci/build-guest.sh).
export PATH=/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
read -r up _ </proc/uptime
echo "E2E-INIT: uptime=${up}s kernel=$(uname -r)"
. /e2e-common.sh

finish() { # finish pass | finish fail REASON...
    # Kernel lines about I/O errors (minus three harmless boot messages).
    dmesg | grep -i -E 'error|blk_update_request|I/O' |
        grep -v -E 'symmetric I/O mode|ttyS0 at I/O|Correctable Errors collector' | sed 's/^/E2E-DMESG: /'
    read -r up _ </proc/uptime
    echo "E2E-TIME: end uptime=${up}s"
    echo "E2E-RESULT: $*"
    sync
    poweroff -f
    sleep 10
    echo o >/proc/sysrq-trigger
}

job=fio-verify seed=1 fiosize=$E2E_FIO_DEFAULT_MIB iodepth=32 fiotimeout=900 devwait=30
ip=10.0.0.1 peer=10.0.0.2 mib=32 port=5001 pings=20 netwait=120 xfertimeout=600
for w in $(cat /proc/cmdline); do
    case "$w" in
    job=*) job=${w#*=} ;;
    seed=*) seed=${w#*=} ;;
    fiosize=*) fiosize=${w#*=} ;;
    iodepth=*) iodepth=${w#*=} ;;
    fiotimeout=*) fiotimeout=${w#*=} ;;
    devwait=*) devwait=${w#*=} ;;
    ip=*) ip=${w#*=} ;;
    peer=*) peer=${w#*=} ;;
    mib=*) mib=${w#*=} ;;
    port=*) port=${w#*=} ;;
    pings=*) pings=${w#*=} ;;
    netwait=*) netwait=${w#*=} ;;
    xfertimeout=*) xfertimeout=${w#*=} ;;
    esac
done
for v in seed fiosize iodepth fiotimeout devwait mib port pings netwait xfertimeout; do
    eval "x=\$$v"
    case "$x" in '' | *[!0-9]*) finish fail "kernel command line: $v=$x is not a number" ;; esac
done
for v in ip peer; do
    eval "x=\$$v"
    case "$x" in '' | *[!0-9.]* | *..* | .* | *.) finish fail "kernel command line: $v=$x is not an IPv4 address" ;; esac
done
case "$job" in
net-*) echo "E2E-JOB: job=$job ip=$ip peer=$peer mib=$mib seed=$seed port=$port pings=$pings" ;;
*) echo "E2E-JOB: job=$job seed=$seed fiosize=${fiosize}MiB iodepth=$iodepth" ;;
esac

for m in $(cat /lib/modules/e2e/order); do
    insmod "/lib/modules/e2e/$m.ko" || finish fail "insmod $m failed (kernel/module mismatch?)"
done

# ---- network jobs (no block device) ----------------------------------------------
now() { read -r up _ </proc/uptime && echo "$up"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
net_up() { # eth0 up with $ip/24, carrier waited for (bounded by netwait)
    t0=$(now)
    i=0
    while [ ! -e /sys/class/net/eth0 ]; do
        i=$((i + 1))
        [ "$i" -gt $((devwait * 10)) ] && finish fail "no eth0 after ${devwait}s: the virtio-net device did not appear"
        usleep 100000
    done
    ip link set lo up
    ip addr add "$ip/24" dev eth0 || finish fail "ip addr add $ip/24 dev eth0 failed"
    ip link set eth0 up || finish fail "ip link set eth0 up failed"
    i=0
    while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ]; do
        i=$((i + 1))
        [ "$i" -gt $((netwait * 10)) ] && finish fail "eth0 has no carrier after ${netwait}s (vhost-user-net backend not ready?)"
        usleep 100000
    done
    echo "E2E-NET: eth0 up ip=$ip mac=$(cat /sys/class/net/eth0/address) mtu=$(cat /sys/class/net/eth0/mtu) carrier_after=$(since "$t0")s uptime=$(now)s"
}
ping_report() { # ping_report PHASE FILE: "E2E-PING: phase=.. loss=..% rtt_*_ms=.." from busybox ping's summary
    tx=$(sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p' "$2" | tail -1)
    rx=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' "$2" | tail -1)
    loss=$(sed -n 's/.* \([0-9.]*\)% packet loss.*/\1/p' "$2" | tail -1)
    rtt=$(sed -n 's#.*min/avg/max = \([0-9.]*\)/\([0-9.]*\)/\([0-9.]*\) ms.*#rtt_min_ms=\1 rtt_avg_ms=\2 rtt_max_ms=\3#p' "$2" | tail -1)
    # Percentiles of the replies' times (TCG has outliers the average hides).
    pct=$(sed -n 's/.* time=\([0-9.]*\) ms.*/\1/p' "$2" | sort -n | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "rtt_p50_ms=- rtt_p90_ms=-"; exit }
        a = int((NR + 1) / 2); b = int((NR * 9 + 9) / 10); if (b > NR) b = NR
        printf "rtt_p50_ms=%s rtt_p90_ms=%s\n", v[a], v[b] }')
    echo "E2E-PING: phase=$1 sent=${tx:-?} received=${rx:-?} loss=${loss:-?}% ${rtt:-rtt_min_ms=- rtt_avg_ms=- rtt_max_ms=-} $pct"
}
net_send() { # net_send FILE: one nc connection to the peer, retried while the server is not listening
    n=0
    while :; do
        n=$((n + 1))
        timeout "$xfertimeout" nc -w 5 "$peer" "$port" <"$1" >/dev/null 2>/tmp/nc.err
        rc=$?
        [ "$rc" = 0 ] && return 0
        # busybox timeout: 124 or 143 (SIGTERM) when nc had to be stopped.
        [ "$rc" = 124 ] || [ "$rc" = 143 ] &&
            finish fail "nc to $peer:$port did not complete the transfer within ${xfertimeout}s (attempt $n): stalled?"
        # Retry only when nothing was sent: the connection was refused or timed out.
        grep -q "can't connect" /tmp/nc.err ||
            finish fail "nc to $peer:$port failed (status $rc, attempt $n): $(cat /tmp/nc.err)"
        [ "$n" -ge $((netwait * 2)) ] &&
            finish fail "the server $peer:$port did not accept a connection in $n attempts: $(cat /tmp/nc.err)"
        usleep 500000
    done
}
case "$job" in
net-server)
    net_up
    # nc copies its stdin to the connection and ends on the first EOF of
    # either side: a FIFO opened read-write never has EOF.
    mkfifo /tmp/nc.in || finish fail "mkfifo failed"
    echo "E2E-NET: listening port=$port uptime=$(now)s"
    timeout "$xfertimeout" nc -l -p "$port" <>/tmp/nc.in >/tmp/recv 2>/tmp/nc.err
    rc=$?
    echo "E2E-NET: recv-end status=$rc uptime=$(now)s"
    [ "$rc" = 0 ] || finish fail "nc -l -p $port: no complete transfer within ${xfertimeout}s (status $rc, $(wc -c </tmp/recv) bytes received): $(cat /tmp/nc.err)"
    bytes=$(wc -c </tmp/recv)
    echo "E2E-NET: received bytes=$bytes sha256=$(sha256sum </tmp/recv | cut -d' ' -f1)"
    [ "$bytes" = $((mib * 1048576)) ] || finish fail "received $bytes bytes, expected $((mib * 1048576))"
    finish pass
    ;;
net-client)
    net_up
    t0=$(now)
    n=0
    until ping -c 1 -W 1 "$peer" >/dev/null 2>&1; do
        n=$((n + 1))
        s=$(since "$t0")
        [ "${s%.*}" -ge "$netwait" ] && finish fail "the peer $peer did not answer a ping within ${netwait}s ($n pings)"
        usleep 100000 # (ping fails at once while ARP has no answer)
    done
    echo "E2E-PING: first-answer after=$(since "$t0")s failed_attempts=$n uptime=$(now)s"
    ping -c "$pings" -i 0.2 -W 2 "$peer" >/tmp/ping.idle 2>&1
    ping_report idle /tmp/ping.idle
    [ "${rx:-0}" = 0 ] && finish fail "no answer to $pings pings after the first answer"
    if [ "$mib" = 0 ]; then
        # Ping only: an empty connection lets the server finish.
        : >/tmp/payload
        net_send /tmp/payload
        echo "E2E-NET: sent bytes=0 sha256=$(sha256sum </tmp/payload | cut -d' ' -f1)"
        finish pass
    fi
    t0=$(now)
    dd if=/dev/urandom of=/tmp/payload bs=1048576 count="$mib" 2>/tmp/dd.err ||
        finish fail "creating the payload failed: $(cat /tmp/dd.err)"
    bytes=$(wc -c </tmp/payload)
    sum=$(sha256sum </tmp/payload | cut -d' ' -f1)
    echo "E2E-NET: payload bytes=$bytes sha256=$sum made_in=$(since "$t0")s"
    ping -i 0.2 "$peer" >/tmp/ping.xfer 2>&1 &
    ping_pid=$!
    (while :; do
        read -r c 2>/dev/null </sys/class/net/eth0/carrier || c=0 # (no fork but usleep's)
        echo "$c"
        usleep 100000
    done) >/tmp/carrier &
    carrier_pid=$!
    t0=$(now)
    echo "E2E-NET: transfer-start uptime=${t0}s"
    net_send /tmp/payload
    secs=$(since "$t0")
    echo "E2E-NET: transfer-end seconds=$secs attempts=$n MiB/s=$(awk -v m="$mib" -v s="$secs" 'BEGIN { printf "%.2f", (s > 0 ? m / s : 0) }') uptime=$(now)s"
    kill "$carrier_pid"
    kill -INT "$ping_pid" # busybox ping prints its summary on SIGINT
    wait "$ping_pid" "$carrier_pid"
    ping_report during-transfer /tmp/ping.xfer
    echo "E2E-LINK: down_samples=$(grep -c -v '^1$' /tmp/carrier) samples=$(wc -l </tmp/carrier)"
    echo "E2E-NET: sent bytes=$bytes sha256=$sum seconds=$secs"
    finish pass
    ;;
net-*)
    finish fail "unknown job '$job' (net-server, net-client)"
    ;;
esac

i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -gt $((devwait * 10)) ] && finish fail "no /dev/vda after ${devwait}s: the vhost-user-blk device did not appear (backend not answering?)"
    usleep 100000
done
read -r up _ </proc/uptime
devbytes=$(blockdev --getsize64 /dev/vda)
echo "E2E-DEV: /dev/vda bytes=$devbytes uptime=${up}s"

stamp_mib=$(e2e_stamp_offset_mib "$fiosize")
[ "$devbytes" -ge $(((stamp_mib + E2E_STAMP_MIB) * 1048576)) ] ||
    finish fail "/dev/vda has $devbytes bytes; the job needs $((stamp_mib + E2E_STAMP_MIB)) MiB"

write_stamp() {
    e2e_stamp "$seed" >/tmp/stamp
    dd if=/tmp/stamp of=/dev/vda bs=1048576 seek="$stamp_mib" count=1 conv=notrunc,fsync 2>/tmp/dd.err ||
        finish fail "writing the stamp at ${stamp_mib}MiB failed: $(cat /tmp/dd.err)"
    check_stamp || finish fail "stamp read back from /dev/vda differs from what was written"
    echo "E2E-STAMP: written offset_mib=$stamp_mib seed=$seed sha256=$(sha256sum </tmp/stamp | cut -d' ' -f1)"
}
check_stamp() {
    [ -f /tmp/stamp ] || e2e_stamp "$seed" >/tmp/stamp
    echo 3 >/proc/sys/vm/drop_caches
    dd if=/dev/vda bs=1048576 skip="$stamp_mib" count=1 2>/dev/null | cmp -s - /tmp/stamp
}

run_fio() { # run_fio EXTRA-ARGS...: runs fio, checks it, prints E2E-FIO lines
    read -r up _ </proc/uptime
    echo "E2E-TIME: fio start uptime=${up}s"
    # shellcheck disable=SC2046
    timeout "$fiotimeout" fio $(e2e_fio_args "$fiosize" "$seed") --filename=/dev/vda \
        --ioengine=libaio --direct=1 --iodepth="$iodepth" --eta=never --verify_state_save=0 "$@" --output=/tmp/fio.out
    rc=$?
    read -r up _ </proc/uptime
    echo "E2E-TIME: fio end uptime=${up}s"
    cat /tmp/fio.out
    # Under fio-verify the reads are the verify phase.
    grep -E '^ *(read|write): IOPS=' /tmp/fio.out | sed 's/^ */E2E-FIO: /; s/E2E-FIO: read:/E2E-FIO: read (verify):/'
    # busybox timeout: 124 or 143 (SIGTERM) when fio had to be stopped.
    [ "$rc" = 124 ] || [ "$rc" = 143 ] && finish fail "fio did not finish within ${fiotimeout}s (I/O hang?)"
    [ "$rc" = 0 ] || finish fail "fio exited with status $rc"
    grep -q -E 'verify failed|bad magic' /tmp/fio.out && finish fail "fio reported a verify error"
    # "issued rwts: total=R,W,...": the verify phase reads back every write.
    reads=$(sed -n 's/.*issued rwts: total=\([0-9]*\),\([0-9]*\),.*/\1/p' /tmp/fio.out | head -1)
    writes=$(sed -n 's/.*issued rwts: total=\([0-9]*\),\([0-9]*\),.*/\2/p' /tmp/fio.out | head -1)
    echo "E2E-FIO: issued reads=${reads:-?} writes=${writes:-?}"
}

case "$job" in
fio-verify)
    run_fio --do_verify=1 --end_fsync=1
    [ "${writes:-0}" -gt 0 ] && [ "$reads" = "$writes" ] ||
        finish fail "fio verify did not run: issued reads=${reads:-?} writes=${writes:-?} (expected equal and > 0)"
    write_stamp
    finish pass
    ;;
verify-only)
    # Checks data written by an earlier fio-verify run with the same seed/fiosize.
    run_fio --verify_only=1
    [ "${reads:-0}" -gt 0 ] || finish fail "fio verify_only read nothing"
    check_stamp || finish fail "stamp at ${stamp_mib}MiB does not match seed $seed"
    finish pass
    ;;
write-pattern)
    write_stamp
    finish pass
    ;;
shell-exit)
    # Boot-time probe: device present, nothing written.
    finish pass
    ;;
*)
    finish fail "unknown job '$job' (fio-verify, verify-only, write-pattern, shell-exit, net-server, net-client)"
    ;;
esac
INIT
chmod 755 init
/bin/busybox sh -n init || die "generated /init has a syntax error"

# --- outputs -------------------------------------------------------------------
log "writing initramfs.cpio ($(du -sh "$stage" | cut -f1) uncompressed)"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | timeout 300 cpio --quiet -o -H newc -R 0:0 >"$new/initramfs.cpio") ||
    die "cpio failed writing $out/initramfs.cpio"

cp "$kdir/boot/vmlinuz-$kver" "$new/vmlinuz"

# vmlinux: the bzImage payload, decompressed (bzImage header: setup_sects at
# 0x1f1, payload_offset/payload_length at 0x248/0x24c from the protected-mode
# code). QEMU boots the ELF through its PVH entry, skipping the decompressor.
extract_vmlinux() {
    local bz=$1 dst=$2 ss po pl start magic
    ss=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
    ((ss == 0)) && ss=4
    po=$(od -An -tu4 -j $((0x248)) -N4 "$bz" | tr -d ' ')
    pl=$(od -An -tu4 -j $((0x24c)) -N4 "$bz" | tr -d ' ')
    start=$(((ss + 1) * 512 + po))
    magic=$(od -An -tx1 -j "$start" -N4 "$bz" | tr -d ' ')
    case $magic in
    28b52ffd) tail -c +$((start + 1)) "$bz" | head -c "$pl" | zstd -qdc 2>/dev/null >"$dst" || true ;;
    fd377a58) tail -c +$((start + 1)) "$bz" | head -c "$pl" | xz -qdc 2>/dev/null >"$dst" || true ;;
    1f8b08*) tail -c +$((start + 1)) "$bz" | head -c "$pl" | gzip -qdc 2>/dev/null >"$dst" || true ;;
    *) return 1 ;;
    esac
    [[ $(od -An -tx1 -N4 "$dst" | tr -d ' ') == 7f454c46 ]]
}
if extract_vmlinux "$new/vmlinuz" "$new/vmlinux"; then
    log "vmlinux extracted ($(du -h "$new/vmlinux" | cut -f1))"
else
    die "could not extract vmlinux from the bzImage (compression tool missing? needs zstd): run ci/install-e2e-deps.sh"
fi

echo "$kver" >"$new/kernel-release"
echo "$modules" >"$new/modules"
touch "$new"/*
for f in modules kernel-release vmlinuz vmlinux initramfs.cpio; do
    mv -f "$new/$f" "$out/$f"
done
t1=$(date +%s.%N)
log "built $out: kernel $kver, initramfs $(du -h "$out/initramfs.cpio" | cut -f1), in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')s"
