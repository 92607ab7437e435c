#!/usr/bin/env bash
# Throughput per proxy core, Trellis against HAProxy, as paired interleaved runs: on a
# shared VM a single maximum-throughput run moves by ±10%, more than the difference being
# measured, so this runs short wrk loads against each proxy in turn, many times, and compares
# each Trellis run with the HAProxy run right after it.
#
#   bash bench/percore.sh                    # builds trellis (dist profile) if needed
#   RUNS=20 TRELLIS_BIN=path/to/trellis bash bench/percore.sh
#
# Each proxy runs with one thread in front of an nginx upstream serving 1 KiB. A run is
# `wrk -t1 -c50 -d5s`; requests per proxy core = requests served / the proxy's utime+stime
# in that run (from /proc). Reported: medians per proxy, with user and system CPU per 1,000
# requests apart, and the median of the paired ratios (Trellis / HAProxy) with how many
# pairs Trellis won.
set -euo pipefail
source "$(dirname "$0")/lib/one-hop.sh"
source "$(dirname "$0")/lib/paired.sh"
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

wrk -t1 -c50 -d2s "http://127.0.0.1:$TRELLIS/1k" >/dev/null   # warm-up: pools, lazy init
wrk -t1 -c50 -d2s "http://127.0.0.1:$HAPROXY/1k" >/dev/null
echo "$RUNS pairs of ${RUN_SECS} s wrk -t1 -c50 runs, trellis then haproxy; $(nproc) CPUs; $(date -u +%FT%TZ)" >&2
paired_runs "$RUNS" "$RUN_SECS" trellis "$TRELLIS_PID" "http://127.0.0.1:$TRELLIS/1k" \
    haproxy "$HAPROXY_PID" "http://127.0.0.1:$HAPROXY/1k"
