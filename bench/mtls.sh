#!/usr/bin/env bash
# mTLS cost: two sidecar hops with mutual TLS against two hops in plaintext and the direct
# path, at a constant RATE (keep-alive), measured in one run; then new mutual TLS connections
# per second per core against one inbound sidecar. See bench/README.md.
#   RATE=1000 DURATION=20s ROUNDS=3 bash bench/mtls.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-1000}
DURATION=${DURATION:-20s}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-50}
HS_SECONDS=${HS_SECONDS:-10}
HS_CONCURRENCY=${HS_CONCURRENCY:-16}
PROFILE=${PROFILE:-quick-release}
OHA=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}

log() { printf '[mtls %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
command -v nginx >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; }
command -v jq >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq >/dev/null; }
[ -x "$OHA" ] || cargo install oha --locked
# `--example` alone would select only the example: build the binary separately.
# dist: the static, laid-out binary releases ship (scripts/build-dist), at target/dist/trellis.
if [[ $PROFILE == dist ]]; then scripts/build-dist; else cargo build --profile "$PROFILE" -p trellis-cli; fi
cargo build --profile "$PROFILE" -p trellis-proxy --example handshakes
T=target/$PROFILE/trellis
HS=target/$PROFILE/examples/handshakes

TMP=$(mktemp -d /tmp/trellis-mtls.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; log "port $1 never opened"; exit 1; }

UP=$(port); CP=$(port); OUT=$(port); IN=$(port); ADM1=$(port); ADM2=$(port)
# Upstream: nginx answering 1 KiB.
BODY=$(head -c 1024 /dev/zero | tr '\0' 'x')
cat >"$TMP/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $TMP/nginx.pid; error_log $TMP/nginx.err;
events { worker_connections 4096; }
http { access_log off; default_type text/plain;
  server { listen 127.0.0.1:$UP; location / { return 200 "$BODY"; } } }
NGINX
nginx -c "$TMP/nginx.conf" & PIDS+=($!)
wait_port "$UP"

# Plaintext control channel: the handshakes example certifies over plain gRPC.
export TRELLIS_CONTROL=http://127.0.0.1:$CP TRELLIS_ADMIN_TOKEN_FILE=$TMP/store/admin-token TRELLIS_INSECURE=true
"$T" --log warn control --insecure --listen 127.0.0.1:$CP --store "$TMP/store" & PIDS+=($!)
wait_port "$CP"
TOK_IN=$("$T" token create --service upstream 2>/dev/null)
TOK_OUT=$("$T" token create --service client 2>/dev/null)
TOK_HS=$("$T" token create --service bench-client --ttl 1h 2>/dev/null)

cat >"$TMP/in.yaml" <<YAML
apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {name: inbound}
spec:
  admin: {address: 127.0.0.1:$ADM1}
  inbound: [{name: inbound, address: 127.0.0.1:$IN, forwardTo: 127.0.0.1:$UP, service: upstream}]
YAML
cat >"$TMP/out.yaml" <<YAML
apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {name: outbound}
spec:
  admin: {address: 127.0.0.1:$ADM2}
  outbound: [{name: out, address: 127.0.0.1:$OUT, service: {name: upstream}}]
YAML
svc() { # svc [IDENTITY]
  local id=""; [ -n "${1:-}" ] && id=", identity: $1"
  cat >"$TMP/svc.yaml" <<YAML
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: upstream}
spec:
  ports: [{port: 80}]
  endpoints: [{address: "127.0.0.1:$IN"$id}]
YAML
  "$T" apply -f "$TMP/svc.yaml" >/dev/null
  sleep 1
}
svc ""
"$T" --log warn proxy --threads 1 --control "$TRELLIS_CONTROL" --config "$TMP/in.yaml" --state-dir "$TMP/s-in" --token "$TOK_IN" & PIDS+=($!); PIN=$!
"$T" --log warn proxy --threads 1 --control "$TRELLIS_CONTROL" --config "$TMP/out.yaml" --state-dir "$TMP/s-out" --token "$TOK_OUT" & PIDS+=($!); POUT=$!
wait_port "$IN"; wait_port "$OUT"
ID="spiffe://trellis.local/ns/default/sa/upstream"

run_oha() { # name port -> json file
  "$OHA" -q "$RATE" -z "$DURATION" -c "$CONNS" --latency-correction --no-tui --output-format json "http://127.0.0.1:$2/" >"$TMP/$1.$r.json"
}
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
for r in $(seq "$ROUNDS"); do
  log "round $r: direct"; run_oha direct "$UP"
  svc ""; curl -s -o /dev/null "http://127.0.0.1:$OUT/"
  log "round $r: two hops, plaintext"; run_oha plain "$OUT"
  svc "$ID"; curl -s -o /dev/null "http://127.0.0.1:$OUT/"
  log "round $r: two hops, mutual TLS"
  a=$(ticks $PIN); b=$(ticks $POUT); run_oha mtls "$OUT"
  echo "$(( $(ticks $PIN) - a + $(ticks $POUT) - b ))" >"$TMP/mtls.$r.ticks"
done
mtls_conns=$(curl -s "127.0.0.1:$ADM1/metrics" | awk '/inbound_connections_total.*security="mtls"/ {print $2}')

pct() { jq -r ".latencyPercentiles[\"$2\"] * 1000000 | round" "$1"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
echo "== $(date -u +%FT%TZ) $(nproc) cores; RATE=$RATE DURATION=$DURATION ROUNDS=$ROUNDS CONNS=$CONNS PROFILE=$PROFILE"
printf '%-22s %8s %8s %8s %8s %10s %8s\n' path p50_us p90_us p99_us p99.9_us added_p99 errors
for name in direct plain mtls; do
  for q in p50 p90 p99 p99.9; do
    eval "m_$(echo $q | tr . _)=$(for r in $(seq "$ROUNDS"); do pct "$TMP/$name.$r.json" "$q"; done | median)"
  done
  [ "$name" = direct ] && d99=$m_p99
  errs=$(for r in $(seq "$ROUNDS"); do jq -r '[.statusCodeDistribution | to_entries[] | select(.key != "200") | .value] | add // 0' "$TMP/$name.$r.json"; done | paste -sd+ | bc)
  printf '%-22s %8s %8s %8s %8s %10s %8s\n' "$name" "$m_p50" "$m_p90" "$m_p99" "$m_p99_9" "+$((m_p99 - d99))" "$errs"
  [ "$name" = plain ] && plain_added=$((m_p99 - d99))
  [ "$name" = mtls ] && mtls_added=$((m_p99 - d99))
done
echo "mTLS adds $(awk -v a="$mtls_added" -v b="$plain_added" 'BEGIN { if (b > 0) printf "%+.0f%%", (a - b) * 100 / b; else print "n/a" }') to the plaintext two-hop added p99 (target: at most +15%); mTLS connections accepted by the inbound sidecar: $mtls_conns"
cpu=$(for r in $(seq "$ROUNDS"); do cat "$TMP/mtls.$r.ticks"; done | median)
echo "both sidecars, mTLS run: $(awk -v t="$cpu" -v rate="$RATE" -v d="${DURATION%s}" 'BEGIN { printf "%.3f", t / 100 / (rate * d / 1000) }') CPU s per 1,000 requests"

log "new mutual TLS connections per second: $HS_CONCURRENCY concurrent, ${HS_SECONDS}s, inbound sidecar on one thread"
a=$(ticks $PIN)
res=$("$HS" "$TRELLIS_CONTROL" "$TOK_HS" "127.0.0.1:$IN" "$ID" "$HS_SECONDS" "$HS_CONCURRENCY")
t=$(( $(ticks $PIN) - a ))
echo "$res"
n=$(echo "$res" | awk '{print $2}')
echo "inbound sidecar CPU: $(awk -v t="$t" 'BEGIN { printf "%.2f", t / 100 }') s for $n handshakes (each with a request to the app): $(awk -v t="$t" -v n="$n" 'BEGIN { if (t > 0) printf "%.0f", n / (t / 100); else print "n/a" }') new mTLS connections per CPU-second of the sidecar"
