#!/usr/bin/env python3
"""CPU time of a process tree, by role, for the benchmarks.

  ci/cpu-tree.py ROOT_PID            one JSON object {pid: [role, microseconds]}:
                                     user+system time so far of ROOT and all its
                                     descendants (threads included)
  ci/cpu-tree.py --delta BEFORE AFTER  {role: microseconds} spent between two
                                     snapshots: a process gone by AFTER (a driver
                                     VM replaced) counts for nothing, one new by
                                     AFTER for all its time
  ci/cpu-tree.py --threads ROOT_PID...  one JSON object {tid: [thread name,
                                     process name, microseconds, guest
                                     microseconds]}: every thread of the trees
  ci/cpu-tree.py --threads-delta BEFORE AFTER SECONDS [CORES]
                                     a table of each thread's CPU between two
                                     such snapshots, in cores, busiest first
                                     (gone by AFTER: not counted; new: all of
                                     its time)

A thread's time here is the kernel's account (user+system, which includes
the time a vCPU thread ran its guest, shown apart): perf files the samples
it takes in a kvm-pvm guest under the guest, and its host report leaves
them out (README, Performance).

Roles by process name: reflector, driver_vm (vmm), device (QEMU's device
models), peer (qemu-storage-daemon, dpdk-testpmd), other."""
import json
import os
import sys

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def read_stat(path):
    """A stat(5) file's name and the fields after it; None if it is gone."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split around the last ')'.
    return text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()


def cpu_us(fields):
    """User plus system time of a stat(5) line's fields, in microseconds."""
    return (int(fields[11]) + int(fields[12])) * TICK_US


def stat(pid):
    found = read_stat(f"/proc/{pid}/stat")
    if found is None:
        return None
    name, fields = found
    return name, int(fields[1]), cpu_us(fields)


def threads_of(pid, process):
    """{tid: [thread name, process name, us, guest us]} of process `pid`."""
    found = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        thread = read_stat(f"/proc/{pid}/task/{tid}/stat")
        if thread is None:
            continue
        name, fields = thread
        # guest_time (field 43 of stat(5), the 41st after the name).
        guest = int(fields[40]) * TICK_US if len(fields) > 40 else 0.0
        found[tid] = [name, process, cpu_us(fields), guest]
    return found


def threads_delta(before, after, seconds, cores):
    rows = []
    for tid, (name, process, cpu, guest) in after.items():
        _, _, cpu0, guest0 = before.get(tid, [name, process, 0.0, 0.0])
        rows.append((max(cpu - cpu0, 0.0) / 1e6 / seconds, max(guest - guest0, 0.0) / 1e6 / seconds, name, process))
    rows.sort(reverse=True)
    busy = sum(row[0] for row in rows)
    lines = [f"by thread, in cores (the kernel's account of user+system time, a vCPU's guest time included and "
             f"shown apart); the machine has {cores}, {busy:.2f} of them were busy in these processes:"]
    for cpu, guest, name, process in rows:
        if cpu >= 0.01:
            inside = f" (guest {guest:.2f})" if guest >= 0.01 else ""
            lines.append(f"  {cpu:5.2f}{inside:<13}  {name}  [{process}]")
    return "\n".join(lines)


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


def all_stats():
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = stat(int(entry))
            if info:
                procs[int(entry)] = info
    return procs


def descendants(procs, roots):
    children = {}
    for pid, (_, ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = [], list(roots)
    while stack:
        pid = stack.pop()
        if pid in procs:
            found.append(pid)
            stack.extend(children.get(pid, []))
    return found


def main():
    if sys.argv[1] == "--threads":
        procs, snapshot = all_stats(), {}
        for pid in descendants(procs, [int(arg) for arg in sys.argv[2:]]):
            snapshot.update(threads_of(pid, procs[pid][0]))
        print(json.dumps(snapshot))
        return
    if sys.argv[1] == "--threads-delta":
        cores = int(sys.argv[5]) if len(sys.argv) > 5 else os.cpu_count()
        print(threads_delta(json.loads(sys.argv[2]), json.loads(sys.argv[3]), float(sys.argv[4]), cores))
        return
    if sys.argv[1] == "--delta":
        print(json.dumps(delta(json.loads(sys.argv[2]), json.loads(sys.argv[3]))))
        return
    procs = all_stats()
    tree = {}
    for pid in descendants(procs, [int(sys.argv[1])]):
        name, _, cpu = procs[pid]
        tree[str(pid)] = [role(name), cpu]
    print(json.dumps(tree))


if __name__ == "__main__":
    main()
