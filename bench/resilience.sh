#!/usr/bin/env bash
# Resilience cost and benefit (issue 12), one sidecar in front of nginx, all on loopback.
#  1. Added latency at a constant RATE of one route under three policy sets, interleaved over
#     ROUNDS: "none" (retries, budget, outlier detection and timeouts all off), "default" (no
#     BackendPolicy: Trellis's defaults, i.e. connect-failure/reset retries with a budget and
#     outlier detection), and "all" (route timeouts, per-try timeout, retries on 5xx with a
#     budget, outlier detection with the latency rule, and a circuit breaker with every limit).
#  2. Instance kill under load: three nginx instances behind the sidecar at RATE; KILL_AT
#     seconds in, one instance (master and worker) is SIGKILLed; client-visible errors (oha
#     errors and non-200 answers) for each policy set, KILL_ROUNDS times each.
#   RATE=1000 DURATION=20s ROUNDS=3 KILL_ROUNDS=2 bash bench/resilience.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-1000}
DURATION=${DURATION:-20s}
WARMUP=${WARMUP:-3s}
ROUNDS=${ROUNDS:-3}
KILL_ROUNDS=${KILL_ROUNDS:-2}
KILL_DURATION=${KILL_DURATION:-15}
KILL_AT=${KILL_AT:-5}
CONNS=${CONNS:-50}
SETS=${SETS:-"none default all"}
PROFILE=${PROFILE:-quick-release}
OHA=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}
T=${TRELLIS_BIN:-}

source "bench/lib/policies.sh"
source "bench/lib/load.sh"
log() { printf '[resilience %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
load_prepare resilience nginx

# sidecar SET PORT ADMIN ENDPOINT_PORT...: a standalone sidecar, one worker thread.
sidecar() {
    local set=$1 p=$2 admin=$3 cfg=$TMP/sidecar-$1-$2.yaml
    shift 3
    { sidecar_config "$p" "$admin" "$@"; policy "$set"; } >"$cfg"
    sidecar_start "$cfg" "$p"
    ok "http://127.0.0.1:$p/1k"
}

echo "== $(date -u +%FT%TZ) $(nproc) cores; $("$T" --version 2>/dev/null || echo trellis); RATE=$RATE DURATION=$DURATION ROUNDS=$ROUNDS CONNS=$CONNS"

# ---- 1. added latency per policy set
UP=$(port)
nginx_up upstream "$UP"
declare -A URL=()
for set in $SETS; do
    p=$(port); a=$(port)
    sidecar "$set" "$p" "$a" "$UP"
    URL[$set]=http://127.0.0.1:$p/1k
done
URL[direct]=http://127.0.0.1:$UP/1k
added_latency $SETS
for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
PIDS=()

# ---- 2. instance kill under load
echo
echo "Instance kill: three nginx instances, $RATE rps for ${KILL_DURATION}s, one instance SIGKILLed (master and worker) ${KILL_AT}s in; client-visible errors = oha errors + non-200 answers, per round:"
echo
echo "| policy set | round | requests | errors | error % |"
echo "|---|--:|--:|--:|--:|"
for ((r = 1; r <= KILL_ROUNDS; r++)); do
    for set in $SETS; do
        e1=$(port); e2=$(port); e3=$(port)
        nginx_up "kill-$set-$r-1" "$e1"
        nginx_up "kill-$set-$r-2" "$e2"
        nginx_up "kill-$set-$r-3" "$e3"
        victim=$NGINX_PID
        p=$(port); a=$(port)
        sidecar "$set" "$p" "$a" "$e1" "$e2" "$e3"
        oha_run "$TMP/w.json" "$WARMUP" "http://127.0.0.1:$p/1k"
        oha_run "$TMP/kill.json" "${KILL_DURATION}s" "http://127.0.0.1:$p/1k" &
        load=$!
        sleep "$KILL_AT"
        kill -KILL $(pgrep -P "$victim") "$victim" 2>/dev/null || true
        wait "$load"
        n=$(jq '[.statusCodeDistribution[]] | add // 0' "$TMP/kill.json")
        e=$(errors "$TMP/kill.json")
        echo "| $set | $r | $n | $e | $(awk -v e="$e" -v n="$n" 'BEGIN { printf "%.3f", n ? 100 * e / n : 0 }') |"
        for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
        wait 2>/dev/null || true
        PIDS=()
    done
done
