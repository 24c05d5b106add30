#!/usr/bin/env python3
"""CPU time of a process tree, by role, for the benchmarks: prints one JSON
object {role: microseconds} of user+system time so far of ROOT and all its
descendants (threads included), each process classified by its name:
reflector, driver_vm (vmm), device (QEMU's device models), peer
(qemu-storage-daemon, dpdk-testpmd), other (a jail's keeper, ...).

Usage: ci/cpu-tree.py ROOT_PID"""
import json
import os
import sys

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split around the last ')'.
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    ppid, utime, stime = int(fields[1]), int(fields[11]), int(fields[12])
    return name, ppid, (utime + stime) * TICK_US


def role(name):
    if name.startswith("vmm"):
        return "driver_vm"
    if name.startswith("qemu-storage"):
        return "peer"
    if name.startswith("dpdk-testpmd"):
        return "peer"
    if name.startswith("qemu-system"):
        return "device"
    # A jail's keeper is a fork of the reflector, idle while its vmm runs.
    if name.startswith("reflector"):
        return "reflector"
    return "other"


def main():
    root = int(sys.argv[1])
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = stat(int(entry))
            if info:
                procs[int(entry)] = info
    children = {}
    for pid, (_, ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    totals, stack = {}, [root]
    while stack:
        pid = stack.pop()
        if pid not in procs:
            continue
        name, _, cpu = procs[pid]
        key = role(name)
        totals[key] = totals.get(key, 0.0) + cpu
        stack.extend(children.get(pid, []))
    print(json.dumps(totals))


if __name__ == "__main__":
    main()
