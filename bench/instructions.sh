#!/usr/bin/env bash
# User-space instructions per request for trellis and HAProxy, counted by valgrind's
# callgrind: deterministic, unlike CPU seconds on a shared or virtual machine, so small
# per-request costs can be compared between builds and against HAProxy.
#
#   bash bench/instructions.sh                 # builds trellis (dist profile) if needed
#   TRELLIS_BIN=path/to/trellis bash bench/instructions.sh
#   POLICY_SETS="none default all" bash bench/instructions.sh   # trellis only, per policy set
#                                  (bench/lib/policies.sh: the resilience layer's cost)
#   TELEMETRY_SETS="metrics trace1 trace100 logs trace1-logs" bash bench/instructions.sh
#                                  (bench/lib/telemetry.sh: tracing's and access logs' cost)
#
# Each proxy runs under callgrind with one thread in front of an nginx upstream serving
# 1 KiB; wrk warms it up for 2 s, the counters are zeroed, and the instructions of the next
# 6 s of wrk load are divided by the requests served in them.
set -euo pipefail
source "$(dirname "$0")/lib/one-hop.sh"
source "$(dirname "$0")/lib/policies.sh"
source "$(dirname "$0")/lib/telemetry.sh"
one_hop_prepare instr valgrind nginx haproxy wrk curl
UP=28080 PROXY=28001 ADMIN=28990
one_hop_configs $UP $PROXY $PROXY $ADMIN
nginx -p "$TMP" -c "$TMP/nginx.conf" -e "$TMP/nginx.err" &
PIDS+=($!)

count() {
    local label=$1 n=0 r ir vpid
    shift
    valgrind --tool=callgrind --callgrind-out-file="$TMP/cg.$label.%p" "$@" >"$TMP/$label.log" 2>&1 &
    vpid=$!
    PIDS+=("$vpid")
    for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$PROXY/1k" && break; sleep 0.2; done
    # Warm up (connections, pools, lazy init), then count only the measured window.
    wrk -t1 -c10 -d2s "http://127.0.0.1:$PROXY/1k" >/dev/null
    callgrind_control -z "$vpid" >/dev/null 2>&1
    n=$(wrk -t1 -c10 -d6s "http://127.0.0.1:$PROXY/1k" | awk '/requests in/ { print $1 }')
    # SIGINT stops trellis cleanly; HAProxy under valgrind needs SIGTERM.
    kill -INT "$vpid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$vpid" 2>/dev/null || break; sleep 0.2; done
    kill -TERM "$vpid" 2>/dev/null || true
    wait "$vpid" 2>/dev/null || true
    # One `summary:` line per dump file (each file also repeats it as `totals:`).
    ir=$(grep -h '^summary:' "$TMP"/cg."$label".* | awk '{ s += $2 } END { printf "%d", s }')
    printf '| %s | %d | %d |\n' "$label" "$n" $((ir / n))
    rm -f "$TMP"/cg."$label".*
}

echo "| proxy | requests | user-space instructions / request |"
echo "|---|--:|--:|"
if [[ -n ${POLICY_SETS:-} ]]; then
    for set in $POLICY_SETS; do
        { cat "$TMP/trellis.yaml"; policy "$set"; } >"$TMP/trellis-$set.yaml"
        "$BIN" validate -f "$TMP/trellis-$set.yaml" >/dev/null
        count "trellis-$set" "$BIN" proxy --config "$TMP/trellis-$set.yaml" --threads 1 --log warn
    done
    exit 0
fi
if [[ -n ${TELEMETRY_SETS:-} ]]; then
    SINK=28431
    sink "$SINK"
    for set in $TELEMETRY_SETS; do
        { cat "$TMP/trellis.yaml"; telemetry "$set"; } >"$TMP/trellis-$set.yaml"
        "$BIN" validate -f "$TMP/trellis-$set.yaml" >/dev/null
        count "trellis-$set" "$BIN" proxy --config "$TMP/trellis-$set.yaml" --threads 1 --log warn
    done
    exit 0
fi
count trellis "$BIN" proxy --config "$TMP/trellis.yaml" --threads 1 --log warn
count haproxy haproxy -f "$TMP/haproxy.cfg" -db
