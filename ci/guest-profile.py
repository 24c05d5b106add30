#!/usr/bin/env python3
"""Where a driver VM's guest time goes, for ci/profile.sh.

  ci/guest-profile.py --images ROOT_PID...
        one JSON object {tid: image}: the image (`--image`) of every thread
        of every vmm process in the trees, as its command line gives it
  ci/guest-profile.py --report PERF_DATA SECONDS TOP VMM IMAGES_JSON... [--names THREADS_JSON]
        the TOP source locations that took the most guest time, in cores:
        perf's samples of each vCPU's guest (`perf kvm --guest --host
        report`, which files them under ":TID" with bare guest addresses),
        named by `VMM locate` from the image that thread ran; several
        IMAGES_JSON (snapshots) are merged; THREADS_JSON (a
        `ci/cpu-tree.py --threads` snapshot) names the threads

perf's software clock stops sampling while a vCPU is out of its guest, but
a kvm-pvm world switch is filed under the guest instruction that caused it:
the samples on the instruction of a doorbell (an MMIO write that KVM's
ioeventfd catches) or of the sleep (`port::WAIT_LINES`) are mostly the exit,
not the instruction."""
import collections
import json
import os
import re
import subprocess
import sys

# Source paths are shown from the repository's root.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vmm_images(roots):
    """{tid: image} of every thread of the vmm processes under `roots`."""
    children = collections.defaultdict(list)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        children[text[text.rindex(")") + 2:].split()[1]].append(pid)
    found, todo = {}, [str(root) for root in roots]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        if len(argv) < 3 or os.path.basename(argv[0]) != "vmm" or "--image" not in argv[:-1]:
            continue
        image = argv[argv.index("--image") + 1]
        found.update({tid: image for tid in tids})
    return found


def without_generics(frame):
    """`serve<net::Net, ...> (file:line)` as `serve (file:line)`."""
    while True:
        shorter = re.sub(r"<[^<>]*>", "", frame)
        if shorter == frame:
            return frame
        frame = shorter


def report(perf_data, seconds, top, vmm, snapshots, names):
    images = {}
    for path in snapshots:
        with open(path) as f:
            images.update(json.load(f))
    perf = subprocess.run(
        ["perf", "kvm", "--guest", "--host", "report", "-i", perf_data, "--no-children",
         "-F", "period,comm,sym", "-g", "none", "--stdio"],
        capture_output=True, text=True, check=False)
    samples = collections.defaultdict(lambda: collections.Counter())  # tid -> address -> ns
    for line in perf.stdout.splitlines():
        m = re.match(r"\s*(\d+)\s+:(\d+)\s+\[[uk]\]\s+0x([0-9a-f]+)\s*$", line)
        if m:
            samples[m.group(2)][int(m.group(3), 16)] += int(m.group(1))
    if not samples:
        print("\nno guest samples (no vCPU ran its guest while perf sampled)")
        return
    by_place = collections.Counter()
    total = 0
    for tid, addresses in samples.items():
        thread = names.get(tid, [f"vCPU {tid}"])[0]
        image = images.get(tid)
        located = {}
        if image is not None and not image.startswith("fd="):
            out = subprocess.run([vmm, "locate", "--inlined", "--image", image],
                                 input="\n".join(map(hex, addresses)),
                                 capture_output=True, text=True, check=False)
            for line in out.stdout.splitlines():
                address, _, place = line.partition("\t")
                located[int(address, 16)] = place
        for address, ns in addresses.items():
            # The place and the function it was inlined into: a doorbell's
            # write is then told apart by its caller.
            place = " < ".join(map(without_generics, located.get(address, "?").split(" < ")[:2]))
            if place == "?":
                place = f"{address:#x} (not in {image})" if image else f"{address:#x} (image not known)"
            # The function and file:line, shortened to the repository's path.
            place = place.replace(f"({REPO}/", "(")
            place = re.sub(r"\(/rustc/[0-9a-f]+/library/", "(library/", place)
            by_place[(thread, place)] += ns
            total += ns
    print(f"\nthe {top} places in the driver VMs' guests that took the most CPU, in cores (perf kvm --guest; "
          f"{total / 1e9 / seconds:.2f} cores sampled in guests; an exit's world switch is filed under the "
          f"instruction that caused it: a doorbell's write, the sleep's `in`):")
    for (thread, place), ns in by_place.most_common(top):
        print(f"  {ns / 1e9 / seconds:5.2f}  {thread}  {place}")


def main(argv):
    if argv[:1] == ["--images"] and len(argv) > 1:
        print(json.dumps(vmm_images(argv[1:])))
    elif argv[:1] == ["--report"] and len(argv) >= 6:
        rest, names = argv[1:], {}
        if "--names" in rest:
            at = rest.index("--names")
            with open(rest[at + 1]) as f:
                names = json.load(f)
            rest = rest[:at] + rest[at + 2:]
        perf_data, seconds, top, vmm, *snapshots = rest
        report(perf_data, float(seconds), int(top), vmm, snapshots, names)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
