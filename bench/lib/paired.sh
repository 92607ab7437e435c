# Paired per-core throughput, shared by percore.sh and run.sh. On a shared VM one
# maximum-throughput run moves by ±10%, more than the difference being measured, so this
# runs short wrk loads against two proxies in turn, many times, and compares each run of
# the first with the run of the second right after it.
#
# Requests per proxy core = requests served / the proxy's utime+stime in that run (from
# /proc). Set PAIRED_PREFIX (an array, e.g. a taskset command) to run wrk under it.

PAIRED_PREFIX=("${PAIRED_PREFIX[@]+"${PAIRED_PREFIX[@]}"}")

# paired_one NAME PID URL SECS: one `wrk -t1 -c50` run; prints "NAME requests user system"
# (CPU in clock ticks).
paired_one() {
    local u0 s0 u1 s1 n
    read -r u0 s0 < <(awk '{ sub(/.*\) /, ""); print $12, $13 }' "/proc/$2/stat")
    n=$("${PAIRED_PREFIX[@]}" wrk -t1 -c50 -d"$4s" "$3" | awk '/requests in/ { print $1 }')
    read -r u1 s1 < <(awk '{ sub(/.*\) /, ""); print $12, $13 }' "/proc/$2/stat")
    echo "$1 $n $((u1 - u0)) $((s1 - s0))"
}

# paired_runs RUNS SECS NAME_A PID_A URL_A NAME_B PID_B URL_B: RUNS pairs of SECS-second
# runs, A then B; prints a markdown summary: medians per proxy (user and system CPU per
# 1,000 requests apart) and the median of the paired ratios A / B with how many pairs A won.
paired_runs() {
    local runs=$1 secs=$2 i
    shift 2
    for i in $(seq "$runs"); do
        paired_one "$1" "$2" "$3" "$secs"
        paired_one "$4" "$5" "$6" "$secs"
        echo "pair $i of $runs done" >&2
    done | python3 -c '
import statistics as st, sys
hz, a, b = int(sys.argv[1]), sys.argv[2], sys.argv[3]
per = {a: [], b: []}
cpu = {a: [], b: []}   # (user, system) ms of CPU per 1,000 requests
for line in sys.stdin:
    if not line.strip():
        continue
    name, n, user, system = line.split()
    n, user, system = int(n), int(user), int(system)
    per[name].append(n / max(user + system, 1) * hz)
    cpu[name].append((user * 1e6 / hz / n, system * 1e6 / hz / n))
ratios = [x / y for x, y in zip(per[a], per[b])]
print("| proxy | median rps per proxy core | min | max | user ms / 1k requests | system ms / 1k requests |")
print("|---|--:|--:|--:|--:|--:|")
for name, v in per.items():
    user = st.median(u for u, _ in cpu[name])
    system = st.median(s for _, s in cpu[name])
    print(f"| {name} | {st.median(v):,.0f} | {min(v):,.0f} | {max(v):,.0f} | {user:.2f} | {system:.2f} |")
print()
listed = ", ".join("%.3f" % r for r in sorted(ratios))
print(f"Paired ratio {a} / {b}: median {st.median(ratios):.3f}, "
      f"{a} ahead in {sum(r > 1 for r in ratios)} of {len(ratios)} pairs "
      f"(sorted: {listed}).")
' "$(getconf CLK_TCK)" "$1" "$4"
}
