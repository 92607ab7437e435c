#!/usr/bin/env bash
# Observability cost (issue 14), one sidecar in front of nginx, all on loopback.
#  1. Added latency at a constant RATE of one route under telemetry sets, interleaved over
#     ROUNDS: "metrics" (no Telemetry: Prometheus metrics only, always on), "trace1" and
#     "trace100" (tracing at 1% and 100% of new traces, exported over OTLP/HTTP to a sink that
#     answers 200 at once), "logs" (access logs to a file) and "trace1-logs" (both; the
#     issue's target: under 10% more added p99 than "metrics").
#  2. Memory: RSS of a sidecar with ROUTES routes after its config loads, and after PATHS
#     distinct request paths (each matching one of the routes) went through it.
#   RATE=1000 DURATION=20s ROUNDS=3 bash bench/observability.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-1000}
DURATION=${DURATION:-20s}
WARMUP=${WARMUP:-3s}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-50}
SETS=${SETS:-"metrics trace1 trace100 logs trace1-logs"}
ROUTES=${ROUTES:-1000}
PATHS=${PATHS:-10000}
PROFILE=${PROFILE:-quick-release}
OHA=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}
T=${TRELLIS_BIN:-}

log() { printf '[observability %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
source "bench/lib/load.sh"
source "bench/lib/telemetry.sh"
load_prepare observability nginx


# sidecar SET PORT ADMIN UPSTREAM [ROUTES]: a standalone sidecar, one worker thread; with
# ROUTES, that many HTTPRoutes on prefixes /r0 .. /rN-1 (each to the upstream).
sidecar() {
    local set=$1 p=$2 admin=$3 up=$4 routes=${5:-0} cfg=$TMP/sidecar-$1-$2.yaml i
    {
        sidecar_config "$p" "$admin" "$up"
        for ((i = 0; i < routes; i++)); do
            printf -- '---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r%d}\nspec:\n  parentRefs: [{kind: Service, name: up, port: 80}]\n  rules:\n    - matches: [{path: {type: PathPrefix, value: /r%d/}}]\n      backendRefs: [{name: up, port: 80}]\n' "$i" "$i"
        done
        telemetry "$set"
    } >"$cfg"
    sidecar_start "$cfg" "$p"
}
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }

echo "== $(date -u +%FT%TZ) $(nproc) cores; $("$T" --version 2>/dev/null || echo trellis); RATE=$RATE DURATION=$DURATION ROUNDS=$ROUNDS CONNS=$CONNS"

# ---- 1. added latency per telemetry set
SINK=$(port)
sink "$SINK"
UP=$(port)
nginx_up upstream "$UP"
declare -A URL=()
for set in $SETS; do
    p=$(port); a=$(port)
    sidecar "$set" "$p" "$a" "$UP"
    URL[$set]=http://127.0.0.1:$p/1k
    ok "${URL[$set]}"
done
URL[direct]=http://127.0.0.1:$UP/1k
added_latency $SETS
echo
for set in $SETS; do
    [[ ! -f $TMP/access-$set.log ]] || echo "Access log of $set: $(wc -l <"$TMP/access-$set.log") lines."
done
for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
PIDS=()

# ---- 2. memory with many routes and distinct paths
UP=$(port)
nginx_up upstream-rss "$UP"
p=$(port); a=$(port)
sidecar metrics "$p" "$a" "$UP" "$ROUTES"
ok "http://127.0.0.1:$p/r0/1k"
before=$(rss_kib "$SIDECAR_PID")
series_before=$(curl -s "http://127.0.0.1:$a/metrics" | grep -vc '^#')
"$OHA" -n "$PATHS" -c 10 --no-tui --output-format json \
    --rand-regex-url "http://127.0.0.1:$p/r([1-9][0-9]{0,2}|0)/[a-z0-9]{16}" >"$TMP/paths.json"
after=$(rss_kib "$SIDECAR_PID")
series_after=$(curl -s "http://127.0.0.1:$a/metrics" | grep -vc '^#')
echo
echo "Memory: one sidecar with $ROUTES routes; RSS after the config loaded and one request: $((before / 1024)) MiB;"
echo "after $PATHS requests on distinct random paths (oha --rand-regex-url, $(jq '[.statusCodeDistribution[]] | add // 0' "$TMP/paths.json") answered, $(errors "$TMP/paths.json") errors): $((after / 1024)) MiB."
echo "Metric sample lines on /metrics: $series_before before, $series_after after (routes that saw traffic add their series; paths never do)."
