#!/usr/bin/env python3
"""Reads `perf sched timehist` output (stdin) and says, per named process, how often it ran
and for how long, and how the named processes overlapped on the CPUs: whether a stage of a
pipeline sits idle while another works (convoys) or they run side by side.

    perf sched timehist -i perf.data | python3 bench/lib/schedbusy.py RATE name=PID...

RATE: requests per second completed around the recording (0: unknown). Prints Markdown.
"""
import re
import sys

rate = float(sys.argv[1])
names = {}  # pid -> name
for arg in sys.argv[2:]:
    name, pid = arg.split("=")
    names[int(pid)] = name

line_re = re.compile(r"^\s*(\d+\.\d+)\s+\[(\d+)\]\s+(.*?)\[(\d+)(?:/(\d+))?\]\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)")
slices = {n: [] for n in names.values()}  # name -> [(start, end)]
waits = {n: [] for n in names.values()}  # name -> [(woken, start)]: runnable, not running
idle = []  # (start, end) of each CPU's idle task
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
    if pid == 0:
        run = float(m.group(8)) / 1000
        if run > 0:
            idle.append((t - run, t))
        continue
    name = names.get(pid)
    if name is None:
        others += float(m.group(8)) / 1000
        continue
    run = float(m.group(8)) / 1000
    delay = float(m.group(7)) / 1000
    if run > 0:
        slices[name].append((t - run, t))
        if delay > 0:
            waits[name].append((t - run - delay, t - run))

if first is None or last <= first:
    sys.exit("no scheduling events")
span = last - first
requests = round(rate * span)

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
alone = {}  # name -> time it was the only one of these processes on a CPU
prev = first
for t, d, name in events:
    on = [k for k, v in running.items() if v > 0]
    at[len(on)] = at.get(len(on), 0.0) + max(0.0, t - prev)
    if len(on) == 1:
        alone[on[0]] = alone.get(on[0], 0.0) + max(0.0, t - prev)
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
print("Of the time with one on a CPU, which: " + ", ".join(
    f"{n} {alone.get(n, 0) / span:.2f}" for n in slices))

# Runnable but not running (scheduling delay after a wake-up), and how much of that a CPU
# sat idle: time the scheduler left a woken stage queued behind another (for example on
# the CPU of the task that woke it) while the other CPU had nothing to do.
idle_u = busy_union(idle)


def overlap(iv, union):
    total = 0.0
    for b, e in iv:
        for lo, hi in union:
            if hi <= b:
                continue
            if lo >= e:
                break
            total += min(e, hi) - max(b, lo)
    return total


print()
print("| process | runnable, not running (share of the time) | of it with a CPU idle | waits / s | median wait µs |")
print("|---|--:|--:|--:|--:|")
for name, w in waits.items():
    if not w:
        print(f"| {name} | 0 | 0 | 0 | - |")
        continue
    total = sum(e - b for b, e in w)
    lens = sorted(e - b for b, e in w)
    print(f"| {name} | {total / span:.3f} | {overlap(sorted(w), idle_u) / span:.3f} | {len(w) / span:.0f} | {lens[len(lens) // 2] * 1e6:.0f} |")
