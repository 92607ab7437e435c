#!/usr/bin/env bash
# Overload (issue 15): a fixed-capacity app (`trellis capacity-app`: CAPACITY requests at once,
# SERVICE_TIME each, the rest queue) behind one sidecar, offered open-loop load at FACTOR times
# its capacity, with and without an OverloadPolicy (adaptive concurrency). Goodput (200
# answers per second) and latency percentiles of every answer, per round.
#   CAPACITY=16 SERVICE_TIME=20ms FACTOR=3 DURATION=20s ROUNDS=3 bash bench/overload.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CAPACITY=${CAPACITY:-16}
SERVICE_TIME=${SERVICE_TIME:-20ms}
FACTOR=${FACTOR:-3}
DURATION=${DURATION:-20s}
WARMUP=${WARMUP:-3s}
ROUNDS=${ROUNDS:-3}
PROFILE=${PROFILE:-quick-release}
OHA=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}
T=${TRELLIS_BIN:-}

source "bench/lib/load.sh"
log() { printf '[overload %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
load_prepare overload

MS=${SERVICE_TIME%ms}
[[ $MS =~ ^[0-9]+$ ]] || { log "SERVICE_TIME must be in ms, for example 20ms"; exit 1; }
CAP_RPS=$((CAPACITY * 1000 / MS))
# Open loop: enough connections that the client never waits for one (the queue without the
# policy holds FACTOR-1 times the capacity per second of the run).
RATE=$((CAP_RPS * FACTOR))
CONNS=${CONNS:-$((RATE * 2))}

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# sidecar WITH PORT ADMIN APP_PORT: a standalone sidecar with an inbound listener on PORT for
# service `app` at APP_PORT, with (WITH=with) or without an OverloadPolicy.
sidecar() {
    local with=$1 p=$2 admin=$3 app=$4 cfg=$TMP/sidecar-$1.yaml
    cat >"$cfg" <<YAML
apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {name: bench}
spec:
  admin: {address: 127.0.0.1:$admin}
  requestTimeout: 60s
  inbound: [{name: in, address: 127.0.0.1:$p, forwardTo: 127.0.0.1:$app, service: app, protocol: http}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: app}
spec:
  ports: [{port: 80, appProtocol: http}]
YAML
    if [[ $with == with ]]; then
        cat >>"$cfg" <<YAML
---
apiVersion: trellis.dev/v1alpha1
kind: OverloadPolicy
metadata: {name: app}
spec:
  targetRef: {kind: Service, name: app}
YAML
    fi
    sidecar_start "$cfg" "$p"
}

run() { # WITH ROUND: fresh app and sidecar, warm-up at capacity, then FACTOR x capacity
    local with=$1 r=$2 a p admin json
    a=$(port); p=$(port); admin=$(port)
    "$T" capacity-app --listen "127.0.0.1:$a" --capacity "$CAPACITY" --service-time "$SERVICE_TIME" &
    PIDS+=("$!")
    wait_port "$a"
    sidecar "$with" "$p" "$admin" "$a"
    log "round $r, $with the policy: unloaded at $((CAP_RPS / 10)) rps, warm-up at $CAP_RPS rps, then $RATE rps for $DURATION"
    # Unloaded: a tenth of the capacity, the latency the policy measures itself against.
    "$OHA" -z "$WARMUP" -q "$((CAP_RPS / 10))" --latency-correction -c 50 --no-tui --output-format json "http://127.0.0.1:$p/" >"$TMP/u.json"
    "$OHA" -z "$WARMUP" -q "$CAP_RPS" --latency-correction -c "$CONNS" --no-tui --output-format json "http://127.0.0.1:$p/" >"$TMP/w.json"
    json=$TMP/$with.$r.json
    "$OHA" -z "$DURATION" -q "$RATE" --latency-correction -c "$CONNS" --stats-success-breakdown --no-tui --output-format json "http://127.0.0.1:$p/" >"$json"
    local ok shed secs limit
    ok=$(jq '.statusCodeDistribution["200"] // 0' "$json")
    shed=$(jq '.statusCodeDistribution["503"] // 0' "$json")
    secs=$(jq '.summary.total' "$json")
    limit=$(curl -s "http://127.0.0.1:$admin/metrics" | awk '/^trellis_concurrency_limit\{/ { print $2 }')
    echo "| $with | $r | $(jq -n "$ok / $secs | round") | $ok | $shed | $(errors "$json") | $(us "$json" '.latencyPercentiles.p50') | $(us "$json" '.latencyPercentiles.p99') | $(us "$json" '.latencyPercentilesSuccessful.p50') | $(us "$json" '.latencyPercentilesSuccessful.p99') | $(us "$TMP/u.json" '.latencyPercentiles.p99') | ${limit:--} |"
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    PIDS=()
}

echo "== $(date -u +%FT%TZ) $(nproc) cores; $("$T" --version 2>/dev/null || echo trellis); CAPACITY=$CAPACITY SERVICE_TIME=$SERVICE_TIME (capacity $CAP_RPS rps) FACTOR=$FACTOR DURATION=$DURATION ROUNDS=$ROUNDS CONNS=$CONNS"
echo
echo "Open loop at $RATE rps ($FACTOR x capacity; oha -q $RATE --latency-correction -c $CONNS) for $DURATION after a $WARMUP warm-up at capacity; latency of every answer (shed ones included) and of the admitted ones (200), µs; the unloaded p99 (a tenth of the capacity, before the warm-up); the learned limit at the end:"
echo
echo "| policy | round | goodput (200/s) | 200 | 503 (shed) | errors + non-200 | p50 | p99 | admitted p50 | admitted p99 | unloaded p99 | limit |"
echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
for ((r = 1; r <= ROUNDS; r++)); do
    for with in with without; do
        run "$with" "$r"
    done
done
