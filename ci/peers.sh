# How the peers are started: sourced by ci/bench-blk.sh, ci/bench-net.sh and
# ci/profile.sh, so that a profile is of the same peer, set up the same
# way, as the benchmark that compares against it. Not run on its own.

# qemu-storage-daemon serving IMAGE as a vhost-user-blk export on SOCKET
# with AIO (threads or io_uring), through the page cache: the array `qsd`.
qsd_command() { # image socket aio
    qsd=(qemu-storage-daemon
        --blockdev "driver=file,node-name=f0,filename=$1,aio=$3,cache.direct=off"
        --blockdev driver=raw,node-name=d0,file=f0
        --export "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=$2,writable=on,num-queues=1")
}

# DPDK's driver directory: DPDK_PMDS, else the newest /usr/lib/*/dpdk/pmds-*
# with the vhost and ring drivers; fails if there is none.
dpdk_pmds() {
    local pmds=${DPDK_PMDS:-} d
    if [[ -z $pmds ]]; then
        for d in /usr/lib/*/dpdk/pmds-*; do
            [[ -e $d/librte_net_vhost.so && -e $d/librte_mempool_ring.so ]] && pmds=$d
        done
    fi
    [[ -n $pmds && -e $pmds/librte_net_vhost.so ]] || return 1
    printf '%s\n' "$pmds"
}

# dpdk-testpmd (TESTPMD) forwarding between two vhost-user ports, SOCKET0
# and SOCKET1, on one polling core, with no hugepages (drivers from PMDS,
# files under PREFIX): the array `testpmd_args`. It runs until its input
# ends.
testpmd_command() { # testpmd pmds prefix socket0 socket1
    testpmd_args=("$1" -l 0-1 --no-huge -m 1024 --no-pci --file-prefix="$3"
        -d "$2/librte_mempool_ring.so" -d "$2/librte_net_vhost.so"
        --vdev "net_vhost0,iface=$4" --vdev "net_vhost1,iface=$5"
        -- --forward-mode=io --nb-cores=1 --total-num-mbufs=16384 --no-mlockall --auto-start)
}
