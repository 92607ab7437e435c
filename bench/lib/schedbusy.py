#!/usr/bin/env python3
"""Reads `perf sched timehist` output (stdin) and says, per named process, how often it ran
and for how long, and how the named processes overlapped on the CPUs: whether a stage of a
pipeline sits idle while another works (convoys) or they run side by side.

    perf sched timehist -i perf.data | python3 bench/lib/schedbusy.py REQUESTS name=PID...

REQUESTS: requests completed during the recording (0: unknown). Prints Markdown.
"""
import re
import sys

requests = int(sys.argv[1])
names = {}  # pid -> name
for arg in sys.argv[2:]:
    name, pid = arg.split("=")
    names[int(pid)] = name

line_re = re.compile(r"^\s*(\d+\.\d+)\s+\[(\d+)\]\s+(.*?)\[(\d+)(?:/(\d+))?\]\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)")
slices = {n: [] for n in names.values()}  # name -> [(start, end)]
first = last = None
others = 0.0  # CPU seconds of every other task (other builds on a shared machine)
for line in sys.stdin:
    m = line_re.match(line)
    if not m:
        continue
    t = float(m.group(1))
    first = t if first is None else first
    last = t
    tid = int(m.group(4))
    pid = int(m.group(5) or tid)
    name = names.get(pid)
    if name is None:
        others += float(m.group(8)) / 1000
        continue
    run = float(m.group(8)) / 1000
    if run > 0:
        slices[name].append((t - run, t))

if first is None or last <= first:
    sys.exit("no scheduling events")
span = last - first

print(f"Recorded {span:.3f} s; {requests} requests in it" if requests else f"Recorded {span:.3f} s")
print()
print("| process | CPU share | runs / s | median run µs | p90 run µs | requests per run |")
print("|---|--:|--:|--:|--:|--:|")
for name, s in slices.items():
    if not s:
        print(f"| {name} | 0 | 0 | - | - | - |")
        continue
    lens = sorted(e - b for b, e in s)
    busy = sum(lens)
    med = lens[len(lens) // 2] * 1e6
    p90 = lens[int(len(lens) * 0.9)] * 1e6
    per = f"{requests / len(s):.1f}" if requests else "-"
    print(f"| {name} | {busy / span:.2f} | {len(s) / span:.0f} | {med:.0f} | {p90:.0f} | {per} |")

# How many of the named processes run at once, over time.
events = []
for name, s in slices.items():
    for b, e in s:
        events.append((b, 1, name))
        events.append((e, -1, name))
events.sort()
running = {}
at = {}
prev = first
for t, d, name in events:
    n = sum(1 for v in running.values() if v > 0)
    at[n] = at.get(n, 0.0) + max(0.0, t - prev)
    prev = t
    running[name] = running.get(name, 0) + d

# The first two processes (the two hops): how much of the time they run side by side.
def busy_union(s):
    out = []
    for b, e in sorted(s):
        if out and b <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((b, e))
    return out


hops = list(slices)[:2]
if len(hops) == 2:
    a, b = (busy_union(slices[h]) for h in hops)
    both, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        both += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    ua, ub = sum(e - s for s, e in a), sum(e - s for s, e in b)
    print()
    print(f"{hops[0]} and {hops[1]} on CPUs at once: {both / span:.2f} of the time "
          f"({both / min(ua, ub):.2f} of the less busy one's running time)")
print()
print(f"Every other task: {others / span:.2f} CPUs on average.")
print()
print("Share of the time with N of these processes on a CPU: " + ", ".join(
    f"{n}: {at.get(n, 0) / span:.2f}" for n in range(0, len(slices) + 1)))
