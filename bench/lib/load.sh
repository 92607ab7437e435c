# Sourced by bench/resilience.sh and bench/observability.sh: nginx upstreams on loopback,
# constant-rate load with oha, and the figures taken from its JSON. Callers set TMP, PIDS,
# RATE, CONNS, OHA, DURATION, WARMUP and ROUNDS, and define log().

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; log "port $1 never opened"; exit 1; }

# nginx NAME PORT: one worker answering 1 KiB on every path; its master's PID in NGINX_PID.
BODY=$(head -c 1024 /dev/zero | tr '\0' 'x')
nginx_up() {
    local name=$1 p=$2 d=$TMP/$1
    mkdir -p "$d"
    cat >"$d/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $d/nginx.pid; error_log $d/error.log;
events { worker_connections 4096; }
http { access_log off; default_type text/plain; keepalive_requests 10000000; keepalive_timeout 120s;
  client_body_temp_path $d; proxy_temp_path $d; fastcgi_temp_path $d; uwsgi_temp_path $d; scgi_temp_path $d;
  server { listen 127.0.0.1:$p backlog=4096; location / { return 200 "$BODY"; } } }
NGINX
    nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
    wait_port "$p"
    ok "http://127.0.0.1:$p/1k"
}
# ok URL: the URL answers 200 with the 1 KiB body, or the run stops (a broken path measures nothing).
ok() {
    local got
    got=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' "$1") || true
    [[ $got == "200 1024" ]] || { log "$1 answered '$got', not 200 with 1024 bytes"; exit 1; }
}

oha_run() { # JSON DURATION URL
    "$OHA" -z "$2" -q "$RATE" --latency-correction -c "$CONNS" --no-tui --output-format json "$3" >"$1"
}
us() { jq -r "$2 | . * 1000000 | round" "$1"; }
errors() { # oha errors (not the end-of-run deadline) plus non-200 answers
    jq '([.errorDistribution | to_entries[] | select(.key | test("deadline") | not) | .value] | add // 0)
        + ([.statusCodeDistribution | to_entries[] | select(.key != "200") | .value] | add // 0)' "$1"
}
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : int((a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
med() { tr ' ' '\n' <<<"$1" | grep . | median; }

# added_latency PATH...: every path of the global URL map (plus `direct`) at RATE for DURATION
# after a WARMUP, interleaved over ROUNDS; prints the medians and what each path adds to direct.
added_latency() {
    local path r m50 m99 m999 d50 d99 d999
    local -A P50=() P99=() P999=() ERR=()
    for ((r = 1; r <= ROUNDS; r++)); do
        for path in direct "$@"; do
            log "round $r: $path at $RATE rps for $DURATION"
            oha_run "$TMP/w.json" "$WARMUP" "${URL[$path]}"
            oha_run "$TMP/$path.$r.json" "$DURATION" "${URL[$path]}"
            P50[$path]+="$(us "$TMP/$path.$r.json" '.latencyPercentiles.p50') "
            P99[$path]+="$(us "$TMP/$path.$r.json" '.latencyPercentiles.p99') "
            P999[$path]+="$(us "$TMP/$path.$r.json" '.latencyPercentiles["p99.9"]') "
            ERR[$path]=$(( ${ERR[$path]:-0} + $(errors "$TMP/$path.$r.json") ))
        done
    done
    d50=$(med "${P50[direct]}"); d99=$(med "${P99[direct]}"); d999=$(med "${P999[direct]}")
    echo
    echo "Added latency at $RATE rps (oha -q $RATE --latency-correction -c $CONNS, $DURATION after a $WARMUP warm-up; medians over $ROUNDS interleaved rounds; µs):"
    echo
    echo "| path | p50 | p99 | p99.9 | added p50 | added p99 | added p99.9 | errors | rounds' p99 |"
    echo "|---|--:|--:|--:|--:|--:|--:|--:|---|"
    for path in direct "$@"; do
        m50=$(med "${P50[$path]}"); m99=$(med "${P99[$path]}"); m999=$(med "${P999[$path]}")
        echo "| $path | $m50 | $m99 | $m999 | $((m50 - d50)) | $((m99 - d99)) | $((m999 - d999)) | ${ERR[$path]} | ${P99[$path]% } |"
    done
}

# sidecar_config PORT ADMIN ENDPOINT_PORT...: a standalone sidecar's Proxy (outbound on PORT,
# admin on ADMIN) and its Service `up` (port 80) with these endpoints.
sidecar_config() {
    local p=$1 admin=$2 e
    shift 2
    cat <<YAML
apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {name: bench}
spec:
  admin: {address: 127.0.0.1:$admin}
  outbound: [{name: up, address: 127.0.0.1:$p, service: {name: up}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: up}
spec:
  ports: [{port: 80, appProtocol: http}]
  endpoints:
YAML
    for e in "$@"; do echo "    - address: 127.0.0.1:$e"; done
}

# sidecar_start CFG PORT: validates CFG with $T, runs it with one thread and waits for PORT;
# its PID in SIDECAR_PID.
sidecar_start() {
    "$T" validate -f "$1" >/dev/null || { log "trellis validate refused $1"; exit 1; }
    "$T" proxy --config "$1" --threads 1 --log warn >"$1.log" 2>&1 &
    SIDECAR_PID=$!
    PIDS+=("$SIDECAR_PID")
    wait_port "$2"
}

# load_prepare NAME [nginx]: what every load script needs first: jq, oha (and nginx), the
# trellis binary ($TRELLIS_BIN, else a $PROFILE build) in T, a scratch directory TMP, and
# PIDS, the processes the script starts, stopped on exit.
load_prepare() {
    local name=$1 pkg
    for pkg in jq ${2:+nginx}; do
        command -v "$pkg" >/dev/null || {
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$([[ $pkg == nginx ]] && echo nginx-light || echo "$pkg")" >/dev/null
        }
    done
    [ -x "$OHA" ] || cargo install oha --locked
    if [[ -z $T ]]; then
        if [[ $PROFILE == dist ]]; then
            scripts/build-dist # with the sidecar's code laid out together
        else
            cargo build --profile "$PROFILE" -p trellis-cli
        fi
        T=${CARGO_TARGET_DIR:-target}/$PROFILE/trellis
    fi
    TMP=$(mktemp -d "/tmp/trellis-$name.XXXXXX")
    chmod 755 "$TMP"
    PIDS=()
    trap load_cleanup EXIT
}
load_cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
