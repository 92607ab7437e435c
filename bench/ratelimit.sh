#!/usr/bin/env bash
# Rate limit cost (issue 15), one sidecar in front of nginx, all on loopback: added latency at a
# constant RATE with no limit ("none") and with a local limit that admits everything ("local":
# an Outbound RateLimitPolicy on the upstream service at LOCAL_RATE per second), interleaved
# over ROUNDS. Every request of "local" passes the bucket check; none is refused. "global"
# (in the default SETS) is the same limit with `scope: Global`, its sidecar following a
# `trellis control` (plaintext) that leases it the whole limit as its share: the request path
# is the same bucket check, the quota stream runs beside it.
#   RATE=1000 DURATION=20s ROUNDS=3 bash bench/ratelimit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-1000}
DURATION=${DURATION:-20s}
WARMUP=${WARMUP:-3s}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-50}
LOCAL_RATE=${LOCAL_RATE:-100000}
# Sets to measure; each is a case of limits() below.
SETS=${SETS:-"none local global"}
PROFILE=${PROFILE:-quick-release}
OHA=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}
T=${TRELLIS_BIN:-}

log() { printf '[ratelimit %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
source "bench/lib/load.sh"
load_prepare ratelimit nginx


# limits SET: the RateLimitPolicy documents of a set (none for "none").
limits() {
    case $1 in
    none) ;;
    local)
        cat <<YAML
---
apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: bench-local}
spec:
  targetRef: {kind: Service, name: up}
  direction: Outbound
  limits: [{name: all, rate: $LOCAL_RATE, burst: $LOCAL_RATE}]
YAML
        ;;
    global)
        cat <<YAML
---
apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: bench-global}
spec:
  targetRef: {kind: Service, name: up}
  direction: Outbound
  limits: [{name: all, rate: $LOCAL_RATE, burst: $LOCAL_RATE, scope: Global}]
YAML
        ;;
    *) log "unknown set $1"; exit 1 ;;
    esac
}

# global_sidecar PORT ADMIN UPSTREAM: a control plane with the Service and the Global limit,
# and a sidecar (one worker thread) that follows it; waits until it holds the whole limit.
global_sidecar() {
    local p=$1 admin=$2 up=$3 cp cfg=$TMP/sidecar-global.yaml
    cp=$(port)
    export TRELLIS_CONTROL=http://127.0.0.1:$cp TRELLIS_ADMIN_TOKEN_FILE=$TMP/store/admin-token TRELLIS_INSECURE=true
    "$T" --log warn control --insecure --listen "127.0.0.1:$cp" --store "$TMP/store" >"$TMP/control.log" 2>&1 &
    PIDS+=($!)
    wait_port "$cp"
    sidecar_config "$p" "$admin" "$up" | awk '/^---$/ { exit } { print }' >"$cfg"
    { sidecar_config "$p" "$admin" "$up" | awk 'f { print } /^---$/ { f = 1 }'; limits global; } >"$TMP/mesh.yaml"
    "$T" apply -f "$TMP/mesh.yaml" >/dev/null
    "$T" --log warn proxy --threads 1 --control "$TRELLIS_CONTROL" --config "$cfg" --state-dir "$TMP/s-global" \
        --token "$("$T" token create --service bench 2>/dev/null)" >"$cfg.log" 2>&1 &
    PIDS+=($!)
    wait_port "$p"
    for _ in $(seq 100); do
        curl -s "http://127.0.0.1:$admin/metrics" | grep -q "^trellis_rate_limit_global_share{.*} $LOCAL_RATE" && return 0
        sleep 0.1
    done
    log "the global sidecar never got its share"; exit 1
}

# sidecar SET PORT ADMIN UPSTREAM: a standalone sidecar, one worker thread, with SET's limits.
sidecar() {
    local set=$1 p=$2 admin=$3 up=$4 cfg=$TMP/sidecar-$1.yaml
    [[ $set == global ]] && { global_sidecar "$p" "$admin" "$up"; return; }
    {
        sidecar_config "$p" "$admin" "$up"
        limits "$set"
    } >"$cfg"
    sidecar_start "$cfg" "$p"
}

echo "== $(date -u +%FT%TZ) $(nproc) cores; $("$T" --version 2>/dev/null || echo trellis); RATE=$RATE DURATION=$DURATION ROUNDS=$ROUNDS CONNS=$CONNS LOCAL_RATE=$LOCAL_RATE"

UP=$(port)
nginx_up upstream "$UP"
declare -A URL=() ADMIN=()
for set in $SETS; do
    p=$(port); a=$(port)
    sidecar "$set" "$p" "$a" "$UP"
    URL[$set]=http://127.0.0.1:$p/1k
    ADMIN[$set]=$a
    ok "${URL[$set]}"
done
URL[direct]=http://127.0.0.1:$UP/1k
added_latency $SETS
echo
# Proof that "local" checked every request and refused none.
for set in $SETS; do
    [[ $set == none ]] && continue
    echo "$set: $(curl -s "http://127.0.0.1:${ADMIN[$set]}/metrics" | grep '^trellis_rate_limit_decisions_total' | sed 's/^trellis_rate_limit_decisions_total//' | tr '\n' ' ')"
done
