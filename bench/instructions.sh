#!/usr/bin/env bash
# User-space instructions per request for trellis and HAProxy, counted by valgrind's
# callgrind: deterministic, unlike CPU seconds on a shared or virtual machine, so small
# per-request costs can be compared between builds and against HAProxy.
#
#   bash bench/instructions.sh                 # builds trellis (release) if needed
#   TRELLIS_BIN=path/to/trellis bash bench/instructions.sh
#
# Each proxy runs under callgrind with one thread in front of an nginx upstream serving
# 1 KiB; wrk warms it up for 2 s, the counters are zeroed, and the instructions of the next
# 6 s of wrk load are divided by the requests served in them.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
for tool in valgrind nginx haproxy wrk curl; do
    command -v "$tool" >/dev/null || { apt-get update -q && apt-get install -y -q valgrind nginx haproxy wrk curl >/dev/null; break; }
done
BIN=${TRELLIS_BIN:-$REPO/target/release/trellis}
[[ -x $BIN ]] || (cd "$REPO" && cargo build --release -p trellis-cli)
TMP=$(mktemp -d /tmp/trellis-instr.XXXXXX)
chmod 755 "$TMP"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT

UP=28080 PROXY=28001 ADMIN=28990
# Fixed ports: refuse to run against something else already listening there (it would be
# measured, or serve as the upstream, without a word).
for port in $UP $PROXY $ADMIN; do
    if ss -ltnH "sport = :$port" 2>/dev/null | grep -q .; then
        echo "port $port is in use; stop what listens there first" >&2
        exit 1
    fi
done
mkdir -p "$TMP/www"
head -c 1024 /dev/zero | tr '\0' x >"$TMP/www/1k"
chmod -R a+rX "$TMP/www"
cat >"$TMP/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $TMP/nginx.pid;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000; server { listen 127.0.0.1:$UP; root $TMP/www; } }
NGINX
nginx -p "$TMP" -c "$TMP/nginx.conf" -e "$TMP/nginx.err" &
PIDS+=($!)
cat >"$TMP/trellis.yaml" <<YAML
apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {name: instr}
spec:
  admin: {address: 127.0.0.1:$ADMIN}
  outbound: [{name: up, address: 127.0.0.1:$PROXY, service: {name: up}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: up}
spec:
  ports: [{port: 80, appProtocol: http}]
  endpoints: [{address: "127.0.0.1:$UP"}]
YAML
sed -e "s/@@PORT@@/$PROXY/; s/@@UPSTREAM_PORT@@/$UP/" "$REPO/bench/templates/haproxy.cfg.tmpl" >"$TMP/haproxy.cfg"

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
count trellis "$BIN" proxy --config "$TMP/trellis.yaml" --threads 1 --log warn
count haproxy haproxy -f "$TMP/haproxy.cfg" -db
