#!/usr/bin/env python3
"""Draws ci/bench-blk.sh's results (its --json file) as one SVG: per job, the
latency CDF of every backend side by side with the peer's (qemu-storage-
daemon), and the CPU time per request of each process involved, stacked.

  ci/chart.py RESULTS.json OUT.svg

No plotting library: plain SVG, so the chart can be regenerated anywhere the
benchmark runs."""
import json
import math
import sys
from xml.sax.saxutils import escape

BACKENDS = (("sim", "driver VM + simulated controller", "#1f77b4"),
            ("direct", "simulated controller, dma=direct", "#9467bd"),
            ("nvme", "driver VM + QEMU NVMe model", "#ff7f0e"),
            ("uring", "QEMU NVMe model, aio=io_uring", "#d62728"),
            ("qsd", "qemu-storage-daemon (peer)", "#2ca02c"),
            ("qsd-u", "qemu-storage-daemon, aio=io_uring", "#17becf"))
ROLES = (("reflector", "#4c72b0"), ("driver_vm", "#dd8452"), ("device", "#937860"), ("peer", "#55a868"))
PANEL_W, PANEL_H, GAP = 300, 210, 26
CDF_W = 190


def text(x, y, s, size=11, anchor="start", weight="normal"):
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" font-family="sans-serif">{escape(str(s))}</text>')


def panel(job, x0, y0):
    out = []
    title = f"{job['job']} {job['bs'] // 1024}k QD{job['qd']}"
    out.append(text(x0, y0 + 12, title, 12, weight="bold"))
    # Latency CDF on a log axis.
    lats = [lat for key, _, _ in BACKENDS if key in job for _, lat in job[key].get("lat_cdf_us", []) if lat > 0]
    if lats:
        lo = 10 ** math.floor(math.log10(min(lats)))
        hi = 10 ** math.ceil(math.log10(max(lats)))
        left, top, w, h = x0 + 28, y0 + 22, CDF_W - 34, PANEL_H - 88
        out.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>')
        decade = lo
        while decade <= hi:
            x = left + w * (math.log10(decade) - math.log10(lo)) / max(math.log10(hi) - math.log10(lo), 1e-9)
            out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + h}" stroke="#eee"/>')
            label = f"{decade / 1000:g}ms" if decade >= 1000 else f"{decade:g}us"
            out.append(text(x, top + h + 12, label, 9, "middle"))
            decade *= 10
        for q in (0, 0.5, 1):
            y = top + h - h * q
            out.append(text(left - 3, y + 3, f"{q:g}", 9, "end"))
        for key, _, colour in BACKENDS:
            points = [(lat, q) for q, lat in job.get(key, {}).get("lat_cdf_us", []) if lat > 0]
            if not points:
                continue
            path = " ".join(
                f"{left + w * (math.log10(lat) - math.log10(lo)) / max(math.log10(hi) - math.log10(lo), 1e-9):.1f},"
                f"{top + h - h * q:.1f}" for lat, q in points)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
        out.append(text(left + w / 2, top + h + 24, "latency (CDF)", 9, "middle"))
    # CPU per request, stacked by role, one bar per backend.
    bars = [(key, colour, job[key]["cpu_us_per_request"]) for key, _, colour in BACKENDS if key in job]
    if bars:
        top_cpu = max(sum(c.values()) for _, _, c in bars) or 1.0
        left, top, w, h = x0 + CDF_W + 8, y0 + 22, PANEL_W - CDF_W - 12, PANEL_H - 88
        bar_w = w / len(bars) - 6
        for i, (key, colour, cpu) in enumerate(bars):
            x = left + i * (bar_w + 6)
            y = top + h
            for role, role_colour in ROLES:
                value = cpu.get(role, 0.0)
                height = h * value / top_cpu
                y -= height
                out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{height:.1f}" fill="{role_colour}"/>')
            # Alternate rows, so that neighbouring names never overlap.
            out.append(text(x + bar_w / 2, top + h + 11 + (i % 2) * 9, key, 8, "middle"))
            out.append(text(x + bar_w / 2, y - 3, f"{sum(cpu.values()):.0f}", 9, "middle"))
        out.append(text(left + w / 2, top + h + 32, "CPU us/request", 9, "middle"))
    ratios = [f"{k}/qsd {job[k + '_over_qsd']['median']:.2f}x" for k in ("sim", "direct", "nvme", "uring") if k + "_over_qsd" in job]
    if "uring_over_qsd_u" in job:
        ratios.append(f"uring/qsd-u {job['uring_over_qsd_u']['median']:.2f}x")
    # Two lines: a panel is too narrow for more than three ratios on one.
    for line, at in ((ratios[:3], PANEL_H - 16), (ratios[3:], PANEL_H - 4)):
        out.append(text(x0, y0 + at, "  ".join(line), 9, weight="bold"))
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    results = json.load(open(sys.argv[1]))
    jobs = results["jobs"]
    columns = 4
    rows = math.ceil(len(jobs) / columns)
    width = columns * (PANEL_W + GAP) + GAP
    height = rows * (PANEL_H + GAP) + 84
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           text(GAP, 20, f"ci/bench-blk.sh: latency CDF and CPU per request against qemu-storage-daemon "
                f"(median of {results.get('rounds', '?')} rounds)", 13, weight="bold")]
    # The backends in rows of three, then the roles.
    for i, (key, label, colour) in enumerate(BACKENDS):
        x, y = GAP + (i % 3) * 230, 30 + (i // 3) * 14
        out.append(f'<rect x="{x}" y="{y}" width="12" height="4" fill="{colour}"/>')
        out.append(text(x + 16, y + 5, label, 10))
    x = GAP + 3 * 230
    for role, colour in ROLES:
        out.append(f'<rect x="{x}" y="28" width="10" height="8" fill="{colour}"/>')
        out.append(text(x + 13, 35, role.replace("_", " "), 10))
        x += 80
    for i, job in enumerate(jobs):
        out += panel(job, GAP + (i % columns) * (PANEL_W + GAP), 64 + (i // columns) * (PANEL_H + GAP))
    out.append("</svg>")
    with open(sys.argv[2], "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"chart: {sys.argv[2]}")


if __name__ == "__main__":
    main()
