#!/usr/bin/env python3
"""CPU time of a process tree, by role, for the benchmarks.

  ci/cpu-tree.py ROOT_PID            one JSON object {pid: [role, microseconds]}:
                                     user+system time so far of ROOT and all its
                                     descendants (threads included)
  ci/cpu-tree.py --delta BEFORE AFTER  {role: microseconds} spent between two
                                     snapshots: a process gone by AFTER (a driver
                                     VM replaced) counts for nothing, one new by
                                     AFTER for all its time

Roles by process name: reflector, driver_vm (vmm), device (QEMU's device
models), peer (qemu-storage-daemon, dpdk-testpmd), other."""
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


def delta(before, after):
    totals = {}
    for pid, (role_name, cpu) in after.items():
        spent = cpu - before.get(pid, [role_name, 0.0])[1]
        totals[role_name] = totals.get(role_name, 0.0) + max(spent, 0.0)
    return totals


def main():
    if sys.argv[1] == "--delta":
        print(json.dumps(delta(json.loads(sys.argv[2]), json.loads(sys.argv[3]))))
        return
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
    tree, stack = {}, [root]
    while stack:
        pid = stack.pop()
        if pid not in procs:
            continue
        name, _, cpu = procs[pid]
        tree[str(pid)] = [role(name), cpu]
        stack.extend(children.get(pid, []))
    print(json.dumps(tree))


if __name__ == "__main__":
    main()
