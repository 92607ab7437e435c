#!/usr/bin/env bash
# Throughput per proxy core, Trellis against HAProxy, as paired interleaved runs: on a
# shared VM a single maximum-throughput run moves by ±10%, more than the difference being
# measured, so this runs short wrk loads against each proxy in turn, many times, and compares
# each Trellis run with the HAProxy run right after it.
#
#   bash bench/percore.sh                    # builds trellis (release) if needed
#   RUNS=20 TRELLIS_BIN=path/to/trellis bash bench/percore.sh
#
# Each proxy runs with one thread in front of an nginx upstream serving 1 KiB. A run is
# `wrk -t1 -c50 -d5s`; requests per proxy core = requests served / the proxy's utime+stime
# in that run (from /proc). Reported: medians per proxy, with user and system CPU per 1,000
# requests apart, and the median of the paired ratios (Trellis / HAProxy) with how many
# pairs Trellis won.
set -euo pipefail
source "$(dirname "$0")/lib/one-hop.sh"
RUNS=${RUNS:-12}
RUN_SECS=${RUN_SECS:-5}
one_hop_prepare percore nginx haproxy wrk curl python3
UP=28180 TRELLIS=28101 HAPROXY=28102 ADMIN=28190
one_hop_configs $UP $TRELLIS $HAPROXY $ADMIN

nginx -p "$TMP" -c "$TMP/nginx.conf" -e "$TMP/nginx.err" &
PIDS+=($!)
"$BIN" proxy --config "$TMP/trellis.yaml" --threads 1 --log warn >"$TMP/trellis.log" 2>&1 &
TRELLIS_PID=$!
PIDS+=("$TRELLIS_PID")
haproxy -db -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 &
HAPROXY_PID=$!
PIDS+=("$HAPROXY_PID")
for port in $UP $TRELLIS $HAPROXY; do
    for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$port/1k" && break; sleep 0.2; done
    curl -sf -o /dev/null "http://127.0.0.1:$port/1k" || { echo "port $port does not answer" >&2; exit 1; }
done

# cpu_ticks PID: "utime stime" in clock ticks.
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12, $13 }' "/proc/$1/stat"; }
# one NAME PID PORT: one wrk run; prints "NAME requests user-ticks system-ticks".
one() {
    local u0 s0 u1 s1 n
    read -r u0 s0 < <(cpu_ticks "$2")
    n=$(wrk -t1 -c50 -d"${RUN_SECS}s" "http://127.0.0.1:$3/1k" | awk '/requests in/ { print $1 }')
    read -r u1 s1 < <(cpu_ticks "$2")
    echo "$1 $n $((u1 - u0)) $((s1 - s0))"
}

wrk -t1 -c50 -d2s "http://127.0.0.1:$TRELLIS/1k" >/dev/null   # warm-up: pools, lazy init
wrk -t1 -c50 -d2s "http://127.0.0.1:$HAPROXY/1k" >/dev/null
echo "$RUNS pairs of ${RUN_SECS} s wrk -t1 -c50 runs, trellis then haproxy; $(nproc) CPUs; $(date -u +%FT%TZ)" >&2
for i in $(seq "$RUNS"); do
    one trellis "$TRELLIS_PID" "$TRELLIS"
    one haproxy "$HAPROXY_PID" "$HAPROXY"
    echo "pair $i done" >&2
done | python3 -c '
import statistics as st, sys
hz = int(sys.argv[1])
rows = [l.split() for l in sys.stdin if l.strip()]
per = {"trellis": [], "haproxy": []}
cpu = {"trellis": [], "haproxy": []}   # (user, system) ms of CPU per 1,000 requests
for name, n, user, system in rows:
    n, user, system = int(n), int(user), int(system)
    per[name].append(n / max(user + system, 1) * hz)
    cpu[name].append((user * 1e6 / hz / n, system * 1e6 / hz / n))
pairs = list(zip(per["trellis"], per["haproxy"]))
ratios = [t / h for t, h in pairs]
print("| proxy | median rps per proxy core | min | max | user ms / 1k requests | system ms / 1k requests |")
print("|---|--:|--:|--:|--:|--:|")
for name, v in per.items():
    user = st.median(u for u, _ in cpu[name])
    system = st.median(s for _, s in cpu[name])
    print(f"| {name} | {st.median(v):,.0f} | {min(v):,.0f} | {max(v):,.0f} | {user:.2f} | {system:.2f} |")
print()
listed = ", ".join("%.3f" % r for r in sorted(ratios))
print(f"Paired ratio trellis / haproxy: median {st.median(ratios):.3f}, "
      f"Trellis ahead in {sum(r > 1 for r in ratios)} of {len(ratios)} pairs "
      f"(sorted: {listed}).")
' "$(getconf CLK_TCK)"
