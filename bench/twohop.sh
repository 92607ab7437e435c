#!/usr/bin/env bash
# Two hops against two hops, in one run: client → outbound proxy → inbound proxy → upstream
# for Trellis sidecars, HAProxy and nginx, each with mutual TLS 1.3 between the hops and in
# plaintext, next to the direct path, over interleaved rounds; then a connection storm
# against each mutual TLS pair. See bench/README.md.
#   ROUNDS=3 RUN_SECS=10 DURATION=20s bash bench/twohop.sh
#   ROUNDS=1 RUN_SECS=3 DURATION=5s TRELLIS_BIN=target/quick-release/trellis bash bench/twohop.sh
#   TRELLIS_EXTRA_SPEC='  upstreamHttp2MaxStreams: 10'   # lines added to every sidecar's Proxy spec
#   TRELLIS_PROXY_ARGS="--io-batch 32"   # extra flags for every sidecar's `trellis proxy`
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib/load.sh
ROUNDS=${ROUNDS:-3}
RUN_SECS=${RUN_SECS:-10}
RATE=${RATE:-1000}
DURATION=${DURATION:-20s}
CONNS=${CONNS:-50}
WARMUP_SECS=${WARMUP_SECS:-2}
STORM=${STORM:-1}
STORM_CONNS=${STORM_CONNS:-1000}
STORM_REQS=${STORM_REQS:-5}
PATHS=${PATHS:-trellis-mtls trellis-plain haproxy-mtls haproxy-plain nginx-mtls nginx-plain}
PROFILE=${PROFILE:-dist}
OHA=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}
T=${TRELLIS_BIN:-}
HZ=$(getconf CLK_TCK)
# A proxy's connection caps, high enough that the storm is never refused at a cap.
MAX_CONNS=$((4 * STORM_CONNS + 1024))

log() { printf '[twohop %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
for tool in haproxy wrk openssl curl; do
    command -v "$tool" >/dev/null || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy wrk openssl curl >/dev/null
        break
    }
done
load_prepare twohop nginx
if [[ -n ${TRELLIS_BIN:-} ]]; then
    BUILD="TRELLIS_BIN=$T (profile: $(basename "$(dirname "$T")"), from its path)"
else
    BUILD="$T ($([[ $PROFILE == dist ]] && echo scripts/build-dist || echo "cargo build --profile $PROFILE"))"
fi
for p in $PATHS; do
    case $p in trellis-mtls | trellis-plain | haproxy-mtls | haproxy-plain | nginx-mtls | nginx-plain) ;;
    *) log "PATHS: unknown path '$p'"; exit 1 ;;
    esac
done
on() { [[ " $PATHS " == *" $1 "* ]]; }

# The storm opens STORM_CONNS client connections at once, and a pooling first hop as many
# upstream ones: every process here needs the descriptors.
hard=$(ulimit -Hn)
[[ $hard == unlimited ]] && hard=1048576
ulimit -n "$hard"
if ((STORM)) && (($(ulimit -n) < 2 * MAX_CONNS)); then
    log "open-file limit $(ulimit -n) is below $((2 * MAX_CONNS)), what a $STORM_CONNS-connection storm needs; raise the hard limit or lower STORM_CONNS"
    exit 1
fi

# One ECDSA P-256 PKI for both C pairs: a CA, the inbound hop's server certificate
# (localhost, 127.0.0.1) and the outbound hop's client certificate.
PKI=$TMP/pki
mkdir -p "$PKI"
ec() { openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$PKI/$1.key" "${@:2}" 2>/dev/null; }
ec ca -x509 -days 2 -subj /CN=twohop-bench-ca -out "$PKI/ca.crt" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
for n in server client; do
    ec "$n" -subj "/CN=twohop-$n" -out "$PKI/$n.csr"
    if [[ $n == server ]]; then ext="subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"
    else ext="extendedKeyUsage=clientAuth"; fi
    openssl x509 -req -in "$PKI/$n.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial -days 2 \
        -out "$PKI/$n.crt" -extfile <(printf "keyUsage=critical,digitalSignature\n$ext\n") 2>/dev/null
    cat "$PKI/$n.crt" "$PKI/$n.key" >"$PKI/$n.pem"   # HAProxy's crt: certificate and key in one file
done
chmod -R a+rX "$PKI"

declare -A URL=() CPU=() HOP1=() HOP2=() ACCEPTED=() TLS_PORT=()
URL[direct]=http://127.0.0.1:$(port)/
port_of() { local u=${URL[$1]##*:}; echo "${u%/}"; }

# nginx_conf DIR EVENTS_AND_HTTP_BODY: one worker, its files under DIR; prints nothing.
nginx_conf() {
    mkdir -p "$1"
    cat >"$1/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $1/nginx.pid; error_log $1/error.log; worker_rlimit_nofile $((2 * MAX_CONNS));
events { worker_connections $((2 * MAX_CONNS)); }
http { access_log off; default_type text/plain; keepalive_requests 10000000; keepalive_timeout 120s;
  client_body_temp_path $1; proxy_temp_path $1; fastcgi_temp_path $1; uwsgi_temp_path $1; scgi_temp_path $1;
$2
}
NGINX
}
# nginx_start DIR: its master's PID in STARTED.
nginx_start() {
    nginx -p "$1" -c "$1/nginx.conf" -e "$1/error.log" >"$1/stderr" 2>&1 &
    STARTED=$!
    PIDS+=("$STARTED")
}
# nginx_workers MASTER: the worker PIDs (the ones serving, so the ones whose CPU counts).
nginx_workers() {
    local w
    for _ in $(seq 50); do
        w=$(pgrep -P "$1" | paste -sd' ') && [[ -n $w ]] && { echo "$w"; return; }
        sleep 0.1
    done
    log "nginx $1 has no worker"
    exit 1
}

# Upstream: nginx answering a 3-byte body, keep-alive without a request limit.
UP=$(port_of direct)
nginx_conf "$TMP/upstream" "  server { listen 127.0.0.1:$UP backlog=4096; location / { return 200 \"abc\"; } }"
nginx_start "$TMP/upstream"

# The pools between the hops and to the upstream: HTTP/1.1 keep-alive, idle connections kept.
POOL="keepalive 1024; keepalive_requests 10000000; keepalive_timeout 120s;"
PASS="proxy_http_version 1.1; proxy_set_header Connection \"\";"
nginx_pair() { # PATH TLS(0|1)
    local path=$1 tls=$2 out in status scheme=http listen_tls="" client_tls=""
    out=$(port); in=$(port); status=$(port)
    if ((tls)); then
        scheme=https
        listen_tls="ssl; ssl_certificate $PKI/server.crt; ssl_certificate_key $PKI/server.key;
    ssl_client_certificate $PKI/ca.crt; ssl_verify_client on; ssl_protocols TLSv1.3"
        client_tls="proxy_ssl_certificate $PKI/client.crt; proxy_ssl_certificate_key $PKI/client.key;
    proxy_ssl_trusted_certificate $PKI/ca.crt; proxy_ssl_verify on; proxy_ssl_name localhost;
    proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on;"
    fi
    nginx_conf "$TMP/$path-in" "  upstream app { server 127.0.0.1:$UP; $POOL }
  server { listen 127.0.0.1:$in backlog=4096 $listen_tls;
    location / { proxy_pass http://app; $PASS } }
  server { listen 127.0.0.1:$status; location / { stub_status; } }"
    nginx_conf "$TMP/$path-out" "  upstream hop2 { server 127.0.0.1:$in; $POOL }
  server { listen 127.0.0.1:$out backlog=4096;
    location / { proxy_pass $scheme://hop2; $PASS
    $client_tls } }"
    nginx_start "$TMP/$path-in"; HOP2[$path]=$STARTED
    nginx_start "$TMP/$path-out"; HOP1[$path]=$STARTED
    URL[$path]=http://127.0.0.1:$out/
    ACCEPTED[$path]="nginx $status"
    TLS_PORT[$path]=$in
}

haproxy_pair() { # PATH TLS(0|1)
    local path=$1 tls=$2 out in bind_tls="" server_tls="" d=$TMP/$1
    out=$(port); in=$(port)
    mkdir -p "$d"
    if ((tls)); then
        bind_tls="ssl crt $PKI/server.pem ca-file $PKI/ca.crt verify required ssl-min-ver TLSv1.3"
        server_tls="ssl crt $PKI/client.pem ca-file $PKI/ca.crt verify required verifyhost localhost ssl-min-ver TLSv1.3"
    fi
    for hop in in out; do
        cat >"$d/$hop.cfg" <<CFG
global
    nbthread 1
    maxconn $MAX_CONNS
    stats socket $d/$hop.sock mode 600 level admin
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
frontend fe
$(if [[ $hop == in ]]; then echo "    bind 127.0.0.1:$in $bind_tls"; else echo "    bind 127.0.0.1:$out"; fi)
    default_backend be
backend be
$(if [[ $hop == in ]]; then echo "    server app 127.0.0.1:$UP"; else echo "    server hop2 127.0.0.1:$in $server_tls"; fi)
CFG
        haproxy -c -q -f "$d/$hop.cfg" || { log "haproxy refused $d/$hop.cfg"; exit 1; }
        haproxy -db -f "$d/$hop.cfg" >"$d/$hop.log" 2>&1 &
        PIDS+=($!)
        if [[ $hop == in ]]; then HOP2[$path]=$!; else HOP1[$path]=$!; fi
    done
    URL[$path]=http://127.0.0.1:$out/
    ACCEPTED[$path]="haproxy $d/in.sock"
    TLS_PORT[$path]=$in
}

# Trellis: a real control plane issues every sidecar's identity; each pair is an outbound
# sidecar for Service SVC and an inbound one in front of the upstream serving SVC. The
# Service's endpoint names the inbound's identity for mutual TLS, or none for plaintext.
CP=$(port)
export TRELLIS_CONTROL=http://127.0.0.1:$CP TRELLIS_ADMIN_TOKEN_FILE=$TMP/store/admin-token TRELLIS_INSECURE=true
declare -A TADMIN=()
trellis_pair() { # PATH TLS(0|1)
    local path=$1 tls=$2 svc=up-${1#trellis-} out in a_in a_out id="" hop
    out=$(port); in=$(port); a_in=$(port); a_out=$(port)
    ((tls)) && id=", identity: spiffe://trellis.local/ns/default/sa/$svc"
    cat >>"$TMP/services.yaml" <<YAML
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: $svc}
spec:
  ports: [{port: 80, appProtocol: http}]
  endpoints: [{address: "127.0.0.1:$in"$id}]
YAML
    for hop in in out; do
        cat >"$TMP/$path-$hop.yaml" <<YAML
apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {name: $path-$hop}
spec:
  admin: {address: 127.0.0.1:$([[ $hop == in ]] && echo "$a_in" || echo "$a_out")}
  maxConnections: $MAX_CONNS
  maxConnectionsPerListener: $MAX_CONNS
$(if [[ $hop == in ]]; then
            echo "  inbound: [{name: in, address: 127.0.0.1:$in, forwardTo: 127.0.0.1:$UP, service: $svc}]"
        else
            echo "  outbound: [{name: out, address: 127.0.0.1:$out, service: {name: $svc}}]"
        fi)
${TRELLIS_EXTRA_SPEC:-}
YAML
    done
    URL[$path]=http://127.0.0.1:$out/
    TADMIN[$path]=$a_in
    ACCEPTED[$path]="trellis $a_in"
}
trellis_start() { # PATH
    local path=$1 svc=up-${1#trellis-} hop tok
    for hop in in out; do
        tok=$("$T" token create --service "$([[ $hop == in ]] && echo "$svc" || echo "client-${path#trellis-}")" 2>/dev/null)
        "$T" --log warn proxy --threads 1 ${TRELLIS_PROXY_ARGS:-} --control "$TRELLIS_CONTROL" --config "$TMP/$path-$hop.yaml" \
            --state-dir "$TMP/state-$path-$hop" --token "$tok" >"$TMP/$path-$hop.log" 2>&1 &
        PIDS+=($!)
        if [[ $hop == in ]]; then HOP2[$path]=$!; else HOP1[$path]=$!; fi
    done
}

log "starting the proxies ($PATHS)"
on haproxy-mtls && haproxy_pair haproxy-mtls 1
on haproxy-plain && haproxy_pair haproxy-plain 0
on nginx-mtls && nginx_pair nginx-mtls 1
on nginx-plain && nginx_pair nginx-plain 0
if on trellis-mtls || on trellis-plain; then
    "$T" --log warn control --insecure --listen "127.0.0.1:$CP" --store "$TMP/store" >"$TMP/control.log" 2>&1 &
    PIDS+=($!)
    wait_port "$CP"
    for _ in $(seq 100); do [[ -s $TMP/store/admin-token ]] && break; sleep 0.1; done
    on trellis-mtls && trellis_pair trellis-mtls 1
    on trellis-plain && trellis_pair trellis-plain 0
    "$T" apply -f "$TMP/services.yaml" >/dev/null
    on trellis-mtls && trellis_start trellis-mtls
    on trellis-plain && trellis_start trellis-plain
fi

# Every path answers 200 with the 3-byte body before anything is measured.
check() { # PATH
    local got=""
    for _ in $(seq 200); do
        got=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' "${URL[$1]}") || true
        [[ $got == "200 3" ]] && return 0
        sleep 0.1
    done
    log "$1 (${URL[$1]}) answered '$got', not 200 with 3 bytes; its logs:"
    tail -n 5 "$TMP/$1"*.log "$TMP/$1"*/*.log "$TMP/control.log" >&2 2>/dev/null || true
    exit 1
}
# A C pair's second hop must take TLS 1.3 with the client certificate and refuse a client
# without one, or one that offers at most TLS 1.2: otherwise the pair measures something else.
check_mtls() { # PATH
    local in=${TLS_PORT[$1]} c=(curl -s -o /dev/null -w '%{http_code}' --cacert "$PKI/ca.crt" --resolve "localhost:${TLS_PORT[$1]}:127.0.0.1")
    [[ $("${c[@]}" --tlsv1.3 --cert "$PKI/client.crt" --key "$PKI/client.key" "https://localhost:$in/") == 200 ]] \
        || { log "$1: hop 2 (port $in) refused TLS 1.3 with the client certificate"; exit 1; }
    [[ $("${c[@]}" "https://localhost:$in/" || true) != 200 ]] \
        || { log "$1: hop 2 (port $in) answered a client without a certificate"; exit 1; }
    [[ $("${c[@]}" --tls-max 1.2 --cert "$PKI/client.crt" --key "$PKI/client.key" "https://localhost:$in/" || true) != 200 ]] \
        || { log "$1: hop 2 (port $in) accepted TLS 1.2"; exit 1; }
}
ALL="direct $PATHS"
for p in $ALL; do
    check "$p"
    [[ $p == direct ]] && continue
    [[ -n ${TLS_PORT[$p]:-} && $p == *-mtls ]] && check_mtls "$p"
    if [[ $p == nginx-* ]]; then
        CPU[$p]="$(nginx_workers "${HOP1[$p]}") $(nginx_workers "${HOP2[$p]}")"
    else
        CPU[$p]="${HOP1[$p]} ${HOP2[$p]}"
    fi
done

ticks() { # PID...: utime+stime of them all, in clock ticks
    local p t=0
    for p in "$@"; do t=$((t + $(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$p/stat"))); done
    echo "$t"
}
rss_kib() { # PID... (and, for an nginx master, its workers): VmRSS summed
    local p k=0
    for p in "$@" $(for p in "$@"; do pgrep -P "$p" || true; done); do
        k=$((k + $(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status")))
    done
    echo "$k"
}
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# accepted PATH: connections its second hop has accepted so far (with mutual TLS: TLS
# handshakes between the hops).
accepted() {
    local kind arg
    read -r kind arg <<<"${ACCEPTED[$1]}"
    case $kind in
    trellis) curl -s "127.0.0.1:$arg/metrics" | awk '/^trellis_inbound_connections_total\{.*security="(mtls|plaintext)"/ { n += $NF } END { print n + 0 }' ;;
    haproxy) python3 -c 'import csv, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"show stat\n")
out = b""
while (b := s.recv(65536)): out += b
rows = csv.DictReader(out.decode().lstrip("# ").splitlines())
print(next(r["conn_tot"] for r in rows if r["pxname"] == "fe" and r["svname"] == "FRONTEND"))' "$arg" ;;
    # stub_status counts its own request's connection: one less.
    nginx) curl -s "127.0.0.1:$arg/" | awk 'NR == 3 { print $1 - 1 }' ;;
    esac
}
declare -A CONN0=()
for p in $PATHS; do CONN0[$p]=$(accepted "$p"); done
log "warm-up: ${WARMUP_SECS}s of wrk per path (pools, lazy initialisation)"
for p in $ALL; do timeout $((WARMUP_SECS + 30)) wrk -t1 -c"$CONNS" -d"${WARMUP_SECS}s" "${URL[$p]}" >/dev/null; done

declare -A RPS=() CPK=() WERR=() P50=() P90=() P99=() P999=() OERR=()
for ((r = 1; r <= ROUNDS; r++)); do
    for p in $ALL; do
        log "round $r/$ROUNDS: $p, $RATE rps for $DURATION, then wrk for ${RUN_SECS}s"
        oha_run "$TMP/$p.$r.json" "$DURATION" "${URL[$p]}"
        P50[$p.$r]=$(us "$TMP/$p.$r.json" '.latencyPercentiles.p50')
        P90[$p.$r]=$(us "$TMP/$p.$r.json" '.latencyPercentiles.p90')
        P99[$p.$r]=$(us "$TMP/$p.$r.json" '.latencyPercentiles.p99')
        P999[$p.$r]=$(us "$TMP/$p.$r.json" '.latencyPercentiles["p99.9"]')
        OERR[$p.$r]=$(errors "$TMP/$p.$r.json")
        # shellcheck disable=SC2086
        t0=$(ticks ${CPU[$p]:-})
        timeout $((RUN_SECS + 60)) wrk -t1 -c"$CONNS" -d"${RUN_SECS}s" "${URL[$p]}" >"$TMP/$p.$r.wrk"
        # shellcheck disable=SC2086
        t1=$(ticks ${CPU[$p]:-})
        n=$(awk '/ requests in / { print $1 }' "$TMP/$p.$r.wrk")
        RPS[$p.$r]=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$TMP/$p.$r.wrk")
        WERR[$p.$r]=$(awk '/Non-2xx/ { e += $NF } /Socket errors/ { gsub(/,/, ""); e += $4 + $6 + $8 + $10 } END { print e + 0 }' "$TMP/$p.$r.wrk")
        CPK[$p.$r]=$(awk -v t="$((t1 - t0))" -v hz="$HZ" -v n="$n" 'BEGIN { printf "%.4f", t / hz / (n / 1000) }')
    done
done

rounds() { local p=$1 a=$2 r out=""; local -n arr=$a; for ((r = 1; r <= ROUNDS; r++)); do out+="${arr[$p.$r]} "; done; echo "${out% }"; }
fmed() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.4f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
declare -A M=()
for p in $ALL; do
    M[$p.rps]=$(med "$(rounds "$p" RPS)")
    M[$p.cpu]=$(fmed "$(rounds "$p" CPK)")
    for q in P50 P90 P99 P999; do M[$p.$q]=$(med "$(rounds "$p" "$q")"); done
    M[$p.err]=$(( $(rounds "$p" OERR | tr ' ' '+') + $(rounds "$p" WERR | tr ' ' '+') ))
    if [[ $p != direct ]]; then
        M[$p.conns]=$(( $(accepted "$p") - CONN0[$p] ))
        M[$p.rss1]=$(rss_kib "${HOP1[$p]}")
        M[$p.rss2]=$(rss_kib "${HOP2[$p]}")
    fi
done
# Inbound sidecars' transport, as they counted it: proof that the mTLS path was mutual TLS.
tsec() { curl -s "127.0.0.1:${TADMIN[$1]}/metrics" | awk -v s="$2" '$0 ~ "^trellis_inbound_connections_total\\{.*security=\"" s "\"" { n += $NF } END { print n + 0 }'; }

echo
echo "== twohop $(date -u +%FT%TZ); $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "trellis: $BUILD"
echo "$(haproxy -v | head -1 | cut -d' ' -f1-3); $(nginx -v 2>&1 | cut -d' ' -f3); $(openssl version | cut -d' ' -f1-2); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); $("$OHA" --version)"
echo "ROUNDS=$ROUNDS RUN_SECS=$RUN_SECS RATE=$RATE DURATION=$DURATION CONNS=$CONNS; one thread per proxy; upstream nginx answers 3 bytes${TRELLIS_PROXY_ARGS:+; sidecars: trellis proxy $TRELLIS_PROXY_ARGS}"
echo
echo "Medians over $ROUNDS interleaved rounds. Max req/s: wrk -t1 -c$CONNS -d${RUN_SECS}s. Added latency: oha -q $RATE --latency-correction -c $CONNS -z $DURATION, path − direct (µs). CPU: utime+stime of both hops during the wrk run (nginx: workers), s per 1,000 requests. RSS: VmRSS after the rounds (nginx: master + worker). Conns to hop 2: connections the second hop accepted over the warm-up and all rounds (pooling keeps it near $CONNS per path)."
echo
echo "| path | max req/s | p50 µs | added p50 | added p90 | added p99 | added p99.9 | CPU s / 1k req | RSS hop 1 MiB | RSS hop 2 MiB | errors | conns to hop 2 |"
echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
for p in $ALL; do
    if [[ $p == direct ]]; then
        echo "| direct | ${M[direct.rps]} | ${M[direct.P50]} | | | | | | | | ${M[direct.err]} | |"
        continue
    fi
    printf '| %s | %s | %s | %+d | %+d | %+d | %+d | %s | %s | %s | %s | %s |\n' "$p" "${M[$p.rps]}" "${M[$p.P50]}" \
        $((M[$p.P50] - M[direct.P50])) $((M[$p.P90] - M[direct.P90])) $((M[$p.P99] - M[direct.P99])) \
        $((M[$p.P999] - M[direct.P999])) "${M[$p.cpu]}" "$(mib "${M[$p.rss1]}")" "$(mib "${M[$p.rss2]}")" "${M[$p.err]}" "${M[$p.conns]}"
done
echo
echo "Per round (added = the path's percentile − direct's in the same round):"
echo
echo "| round | path | req/s | CPU s / 1k req | p50 µs | p99 µs | added p50 | added p99 |"
echo "|--:|---|--:|--:|--:|--:|--:|--:|"
for ((r = 1; r <= ROUNDS; r++)); do
    for p in $ALL; do
        printf '| %d | %s | %s | %s | %s | %s | %+d | %+d |\n' "$r" "$p" "${RPS[$p.$r]}" \
            "$([[ $p == direct ]] && echo - || echo "${CPK[$p.$r]}")" "${P50[$p.$r]}" "${P99[$p.$r]}" \
            $((P50[$p.$r] - P50[direct.$r])) $((P99[$p.$r] - P99[direct.$r]))
    done
done
if on trellis-mtls; then
    echo
    echo "Trellis inbound sidecars' connections by transport: trellis-mtls $(tsec trellis-mtls mtls) mtls / $(tsec trellis-mtls plaintext) plaintext${TADMIN[trellis-plain]:+; trellis-plain $(tsec trellis-plain mtls) mtls / $(tsec trellis-plain plaintext) plaintext}"
fi

# Verdict: Trellis mTLS against the better C mTLS pair, metric by metric.
C=()
on haproxy-mtls && C+=(haproxy-mtls)
on nginx-mtls && C+=(nginx-mtls)
if on trellis-mtls && ((${#C[@]})); then
    best() { # KEY max|min: the C pair with the best median of KEY
        local c b="" v=""
        for c in "${C[@]}"; do
            if [[ -z $b ]] || awk -v x="${M[$c.$1]}" -v y="$v" -v d="$2" 'BEGIN { exit !((d == "max") ? x > y : x < y) }'; then
                b=$c; v=${M[$c.$1]}
            fi
        done
        echo "$b"
    }
    met() { awk "BEGIN { exit !($1) }" && echo met || echo MISSED; }
    t=trellis-mtls
    b=$(best rps max)
    ratio=$(awk -v x="${M[$t.rps]}" -v y="${M[$b.rps]}" 'BEGIN { printf "%.3f", x / y }')
    echo
    echo "Verdict: trellis-mtls against the better C mutual TLS pair ($(printf '%s\n' "${C[@]}" | paste -sd/), the better one per figure):"
    echo "- max req/s: ${M[$t.rps]} against ${M[$b.rps]} ($b): ratio $ratio (target ≥ 1.15): $(met "$ratio >= 1.15")"
    b=$(best cpu min)
    ratio=$(awk -v x="${M[$t.cpu]}" -v y="${M[$b.cpu]}" 'BEGIN { printf "%.3f", (y > 0) ? x / y : 0 }')
    echo "- CPU s per 1,000 requests, both hops: ${M[$t.cpu]} against ${M[$b.cpu]} ($b): ratio $ratio (target ≤ 0.8): $(met "$ratio <= 0.8")"
    for q in P50 P99; do
        all=1
        line=""
        for ((r = 1; r <= ROUNDS; r++)); do
            tv=$((${q}[$t.$r] - ${q}[direct.$r]))
            bv="" bn=""
            for c in "${C[@]}"; do
                cv=$((${q}[$c.$r] - ${q}[direct.$r]))
                if [[ -z $bv ]] || ((cv < bv)); then bv=$cv; bn=$c; fi
            done
            ((tv <= bv)) || all=0
            line+="; round $r: $(printf '%+d' "$tv") against $(printf '%+d' "$bv") ($bn)"
        done
        echo "- added ${q,,} µs at or below in every round: $( ((all)) && echo met || echo MISSED)${line}"
    done
fi

# Connection storm: STORM_CONNS connections opened at once on each mutual TLS pair, each
# sending STORM_REQS requests, then closing. New connections the second hop accepted during
# it are the TLS handshakes between the hops.
if ((STORM)); then
    echo
    echo "Connection storm: $STORM_CONNS client connections opened at once (bench/lib/storm.py), then $STORM_REQS requests on each, one after another, then closed. New connections = connections the second hop accepted during the storm (Trellis: trellis_inbound_connections_total; HAProxy: the frontend's conn_tot; nginx: stub_status accepts), i.e. TLS handshakes between the hops."
    echo
    echo "| path | new connections between hops | requests ok | errors | p50 ms | p99 ms | max ms | connect p99 ms | wall s | CPU s, both hops | RSS hop 1 + hop 2 MiB after |"
    echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    for p in $PATHS; do
        [[ $p == *-mtls ]] || continue
        log "storm: $p, $STORM_CONNS connections × $STORM_REQS requests"
        a=$(accepted "$p")
        # shellcheck disable=SC2086
        t0=$(ticks ${CPU[$p]})
        timeout 120 python3 bench/lib/storm.py 127.0.0.1 "$(port_of "$p")" "$STORM_CONNS" "$STORM_REQS" 30 >"$TMP/$p.storm.json" \
            || { log "storm client failed on $p"; echo '{"errors": 1, "error_kinds": {"storm client failed": 1}}' >"$TMP/$p.storm.json"; }
        # shellcheck disable=SC2086
        t1=$(ticks ${CPU[$p]})
        sleep 0.5
        b=$(accepted "$p")
        errs=$(jq -r 'if .errors == 0 then "0" else "\(.errors) (\(.error_kinds | to_entries | map("\(.key): \(.value)") | join(", ")))" end' "$TMP/$p.storm.json")
        printf '| %s | %s | %s/%s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$p" $((b - a)) \
            "$(jq -r .ok "$TMP/$p.storm.json")" $((STORM_CONNS * STORM_REQS)) "$errs" \
            "$(jq -r .p50_ms "$TMP/$p.storm.json")" "$(jq -r .p99_ms "$TMP/$p.storm.json")" \
            "$(jq -r .max_ms "$TMP/$p.storm.json")" "$(jq -r .connect_p99_ms "$TMP/$p.storm.json")" \
            "$(jq -r .wall_s "$TMP/$p.storm.json")" "$(awk -v t="$((t1 - t0))" -v hz="$HZ" 'BEGIN { printf "%.2f", t / hz }')" \
            "$(mib "$(rss_kib "${HOP1[$p]}")") + $(mib "$(rss_kib "${HOP2[$p]}")")"
        sleep 1
    done
fi
