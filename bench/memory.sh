#!/usr/bin/env bash
# Memory with a realistic config (issue 16): a real control plane holding SERVICES Services
# and ROUTES HTTPRoutes, one sidecar whose HTTP proxy listener sees all of them (a mesh-wide
# outbound view), and:
#  1. the sidecar's RSS (VmRSS, VmHWM) idle once the config arrived, and at RATE rps for
#     DURATION through it to nginx (requests spread over LOADED services and their routes);
#  2. the control plane's RSS with just the config, then with 1, and PROXIES more sidecars
#     connected (each its own process, one thread), and the cost per connected proxy.
#   bash bench/memory.sh
#   SERVICES=1000 ROUTES=2000 RATE=1000 DURATION=20s PROXIES="20 50" THREADS=1 bash bench/memory.sh
# With HEAPTRACK=DIR, the control plane and the first sidecar run under heaptrack (build
# without mimalloc: `cargo build -p trellis-cli --no-default-features`), each is killed
# (SIGKILL) once measured so its profile's "leaked" bytes are its live heap at that moment,
# and the profiles land in DIR (RSS figures of such a run include heaptrack's own).
# With CALLGRIND=DIR, the first sidecar runs under callgrind and its profile lands in DIR when
# it stops after the load: what scripts/layout/order.py records the dist binary's function
# order from (scripts/layout/README.md; the figures of such a run are valgrind's).
set -euo pipefail
cd "$(dirname "$0")/.."
SERVICES=${SERVICES:-1000}
ROUTES=${ROUTES:-2000}
NAMESPACES=${NAMESPACES:-10}
LOADED=${LOADED:-10}
RATE=${RATE:-1000}
DURATION=${DURATION:-20s}
CONNS=${CONNS:-50}
THREADS=${THREADS:-1}
PROXIES=${PROXIES:-"20 50"}
PROFILE=${PROFILE:-profiling}
OHA=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}
T=${TRELLIS_BIN:-}
HEAPTRACK=${HEAPTRACK:-}
CALLGRIND=${CALLGRIND:-}

log() { printf '[memory %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
source "bench/lib/load.sh"
load_prepare memory nginx

# traced NAME CMD...: CMD, under heaptrack when HEAPTRACK is set.
traced() {
    local name=$1
    shift
    if [[ -n $HEAPTRACK ]]; then
        heaptrack -o "$HEAPTRACK/$name" "$@" >"$TMP/heaptrack-$name.log" &
    else
        "$@" &
    fi
}
# real_pid PID: the trellis process itself (heaptrack's child when traced).
real_pid() {
    [[ -z $HEAPTRACK ]] && { echo "$1"; return; }
    local child exe
    exe=$(readlink -f "$(command -v "$T")")
    for _ in $(seq 100); do
        # By its executable: heaptrack's script also runs short-lived helpers whose command
        # lines name the binary.
        for child in $(pgrep -P "$1" || true); do
            [[ $(readlink "/proc/$child/exe" 2>/dev/null) == "$exe" ]] && { echo "$child"; return; }
        done
        sleep 0.1
    done
    log "no child of $1 runs $exe: measuring $1 itself (heaptrack's figures, not the sidecar's)"
    echo "$1"
}
# heap_done PID LEADER: stop a traced process where it is (its live heap is what the
# profile then shows as leaked) and wait until heaptrack wrote the profile.
heap_done() {
    [[ -z $HEAPTRACK ]] && return
    kill -9 "$1" 2>/dev/null || true
    wait "$2" 2>/dev/null || true
}
# file_rss PID: the file-backed RSS by file (KiB, largest first), from /proc/PID/smaps.
file_rss() {
    awk '/^[0-9a-f]+-[0-9a-f]+ / { f = ($6 ~ /^\//) ? $6 : "" } /^Rss:/ && f != "" { k[f] += $2 }
        END { for (f in k) printf "%d %s\n", k[f], f }' "/proc/$1/smaps" | sort -rn |
        awk '{ n = split($2, p, "/"); printf "%s%s %.1f MiB", (NR > 1 ? ", " : ""), p[n], $1 / 1024 }'
}
# anon_rss PID: the largest anonymous mappings' resident KiB (mapping size in parentheses),
# from /proc/PID/smaps: the allocator's arenas, thread stacks and the rest.
anon_rss() {
    awk '/^[0-9a-f]+-[0-9a-f]+ / { anon = ($6 == "" || $6 ~ /^\[(heap|stack)/); name = ($6 == "" ? "anon" : $6) }
        /^Size:/ { size = $2 }
        /^Rss:/ && anon && $2 > 0 { printf "%d %s %d\n", $2, name, size }' "/proc/$1/smaps" | sort -rn |
        awk 'NR <= 8 { printf "%s%.2f MiB (%s of %.1f MiB)", (NR > 1 ? ", " : ""), $1 / 1024, $2, $3 / 1024 }'
}
kib() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
# until_ok SECONDS CMD...: retries CMD every 0.2 s for at most SECONDS.
until_ok() {
    local end=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || return 1
        sleep 0.2
    done
}

# ---- the config: NAMESPACES namespaces, SERVICES services with three endpoints each and
# ROUTES routes spread over them (path prefixes and exact paths; every third route adds a
# header match, every other one splits its traffic 90/10 with the next service).
# Endpoints are distinct loopback addresses (127.N.N.N:UP); nginx listens on those of the
# LOADED services (and their weighted neighbours) that the load goes to.
UP=$(port)
python3 - "$SERVICES" "$ROUTES" "$NAMESPACES" "$UP" "$TMP" "$LOADED" <<'PY'
import sys
services, routes, namespaces, up, tmp, loaded = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6])
per_ns = services // namespaces
def ns(i): return f"ns{i // per_ns}"
def name(i): return f"svc{i}"
def addr(i, e):
    n = i * 3 + e + 1
    return f"127.{1 + n // 62500}.{(n // 250) % 250 + 1}.{n % 250 + 1}"
out = []
for i in range(services):
    eps = "\n".join(f"    - {{address: \"{addr(i, e)}:{up}\", zone: z{e}}}" for e in range(3))
    out.append(f"""apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: {name(i)}, namespace: {ns(i)}, labels: {{app: {name(i)}, team: t{i % 17}}}}}
spec:
  ports: [{{port: 80, name: http, appProtocol: http}}]
  endpoints:
{eps}
""")
for r in range(routes):
    i = r % services
    # A weighted split stays inside the namespace: the next service, or the first one.
    j = i + 1 if (i + 1) % per_ns else i + 1 - per_ns
    header = r % 3 == 0
    weighted = r % 2 == 0
    backends = (f"[{{name: {name(i)}, port: 80, weight: 90}}, {{name: {name(j)}, port: 80, weight: 10}}]"
                if weighted else f"[{{name: {name(i)}, port: 80}}]")
    hdr = "\n          headers: [{name: x-version, value: v2}]" if header else ""
    out.append(f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name(i)}-r{r}, namespace: {ns(i)}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: {name(i)}, port: 80}}]
  rules:
    - name: api
      matches:
        - path: {{type: PathPrefix, value: /api/r{r}/v1}}
        - path: {{type: PathPrefix, value: /api/r{r}/v2}}{hdr}
      backendRefs: {backends}
      timeouts: {{request: 5s}}
    - name: health
      matches:
        - path: {{type: Exact, value: /r{r}/healthz}}
          method: GET
      backendRefs: [{{name: {name(i)}, port: 80}}]
""")
open(f"{tmp}/config.yaml", "w").write("---\n".join(out))
# The load: LOADED services of the first namespace, each through its routes' first rule.
urls = []
for r in range(routes):
    i = r % services
    if i < loaded:
        urls += [f"http://{name(i)}.{ns(i)}/api/r{r}/v1/items/{k}" for k in range(5)]
open(f"{tmp}/urls.txt", "w").write("\n".join(urls) + "\n")
# nginx listens on every endpoint of the loaded services and their neighbours.
listen = sorted({addr(i, e) for i in list(range(loaded + 1)) + [per_ns - 1] for e in range(3)})
open(f"{tmp}/listen.txt", "w").write("\n".join(listen) + "\n")
PY
mkdir -p "$TMP/upstream"
{
    echo "worker_processes 1; daemon off; pid $TMP/upstream/nginx.pid; error_log $TMP/upstream/error.log;"
    echo "events { worker_connections 4096; }"
    echo "http { access_log off; default_type text/plain; keepalive_requests 10000000; keepalive_timeout 120s;"
    echo "  client_body_temp_path $TMP/upstream; proxy_temp_path $TMP/upstream; fastcgi_temp_path $TMP/upstream; uwsgi_temp_path $TMP/upstream; scgi_temp_path $TMP/upstream;"
    echo "  server {"
    while read -r a; do echo "    listen $a:$UP;"; done <"$TMP/listen.txt"
    echo "    location / { return 200 \"hello\"; } } }"
} >"$TMP/upstream/nginx.conf"
nginx -p "$TMP/upstream" -c "$TMP/upstream/nginx.conf" -e "$TMP/upstream/error.log" &
PIDS+=($!)
until_ok 10 bash -c "exec 3<>/dev/tcp/$(head -1 "$TMP/listen.txt")/$UP" || { log "nginx did not start: $(cat "$TMP/upstream/error.log")"; exit 1; }

# ---- the control plane, plaintext (the bench measures memory, not the channel's TLS).
CP=$(port)
export TRELLIS_CONTROL=http://127.0.0.1:$CP TRELLIS_ADMIN_TOKEN_FILE=$TMP/store/admin-token TRELLIS_INSECURE=true
traced control "$T" --log warn control --insecure --listen "127.0.0.1:$CP" --store "$TMP/store" 2>"$TMP/control.log"
CONTROL_LEADER=$!
PIDS+=("$CONTROL_LEADER")
CONTROL_PID=$(real_pid "$CONTROL_LEADER")
wait_port "$CP"
cp_empty=$(kib "$CONTROL_PID" VmRSS)
# One join token for every sidecar of the bench (service `client`).
TRELLIS_TOKEN=$("$T" token create --service client --uses 1000 2>/dev/null)
export TRELLIS_TOKEN
log "applying $SERVICES services and $ROUTES routes ($(du -k "$TMP/config.yaml" | cut -f1) KiB of YAML)"
"$T" validate -f "$TMP/config.yaml" >/dev/null || { log "trellis validate refused the generated config"; exit 1; }
"$T" apply -f "$TMP/config.yaml" >/dev/null
sleep 2
cp_config=$(kib "$CONTROL_PID" VmRSS)

# sidecar NAME: a sidecar following the control plane with one HTTP proxy listener (every
# service in its view); its PID in SIDECAR_PID, listener port in SIDECAR_PORT, admin in
# SIDECAR_ADMIN. Waits until its /config holds every service and route.
sidecar() {
    local name=$1 threads=${2:-1}
    SIDECAR_PORT=$(port)
    SIDECAR_ADMIN=$(port)
    cat >"$TMP/$name.yaml" <<YAML
apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {name: $name}
spec:
  admin: {address: 127.0.0.1:$SIDECAR_ADMIN}
  outbound: [{name: mesh, address: 127.0.0.1:$SIDECAR_PORT, httpProxy: true}]
YAML
    if [[ $name == main && -n $CALLGRIND ]]; then
        valgrind --tool=callgrind --demangle=no --callgrind-out-file="$CALLGRIND/$name.%p" \
            "$T" --log info --log-format json proxy --threads "$threads" --control "$TRELLIS_CONTROL" \
            --config "$TMP/$name.yaml" --state-dir "$TMP/state-$name" 2>"$TMP/$name.log" &
    elif [[ $name == main ]]; then
        traced "$name" "$T" --log info --log-format json proxy --threads "$threads" --control "$TRELLIS_CONTROL" \
            --config "$TMP/$name.yaml" --state-dir "$TMP/state-$name" 2>"$TMP/$name.log"
    else
        "$T" --log info --log-format json proxy --threads "$threads" --control "$TRELLIS_CONTROL" \
            --config "$TMP/$name.yaml" --state-dir "$TMP/state-$name" 2>"$TMP/$name.log" &
    fi
    SIDECAR_LEADER=$!
    PIDS+=("$SIDECAR_LEADER")
    SIDECAR_PID=$SIDECAR_LEADER
    if [[ $name == main ]]; then SIDECAR_PID=$(real_pid "$SIDECAR_LEADER"); fi
}
# applied NAME: the sidecar logged that it applied a view of every service and route. (Its
# /config says so too, but rendering 1.5 MB of JSON would show in the RSS being measured:
# holds_all checks that once the figures are taken.)
applied() { grep -q "\"resources\":$((SERVICES + ROUTES))[,}]" "$TMP/$1.log"; }
# holds_all ADMIN: the sidecar's /config lists every service and route.
holds_all() {
    curl -sf "http://127.0.0.1:$1/config" -o "$TMP/config.json" || return 1
    [[ $(jq '[.resources[] | select(.kind == "Service")] | length' "$TMP/config.json") == "$SERVICES" ]] &&
        [[ $(jq '[.resources[] | select(.kind == "HTTPRoute")] | length' "$TMP/config.json") == "$ROUTES" ]]
}

echo "== $(date -u +%FT%TZ) $(nproc) cores; $("$T" --version 2>/dev/null || echo trellis) ($T); SERVICES=$SERVICES ROUTES=$ROUTES RATE=$RATE DURATION=$DURATION THREADS=$THREADS"

# ---- 1. one sidecar: idle, then at RATE rps.
sidecar main "$THREADS"
MAIN_PID=$SIDECAR_PID MAIN_LEADER=$SIDECAR_LEADER MAIN_PORT=$SIDECAR_PORT MAIN_ADMIN=$SIDECAR_ADMIN
wait_port "$MAIN_PORT"
until_ok "$([[ -n $CALLGRIND ]] && echo 900 || echo 120)" applied main || { log "the sidecar never applied all $SERVICES services and $ROUTES routes"; exit 1; }
first=$(head -1 "$TMP/urls.txt")
got=$(curl -s -o /dev/null -w '%{http_code}' -x "http://127.0.0.1:$MAIN_PORT" "$first")
[[ $got == 200 ]] || { log "$first through the sidecar answered $got"; exit 1; }
sleep 5
idle_rss=$(kib "$MAIN_PID" VmRSS)
idle_hwm=$(kib "$MAIN_PID" VmHWM)
idle_anon=$(kib "$MAIN_PID" RssAnon)
idle_file=$(kib "$MAIN_PID" RssFile)
threads=$(awk '/^Threads:/ { print $2 }' "/proc/$MAIN_PID/status")
idle_maps=$(file_rss "$MAIN_PID")
idle_anon_maps=$(anon_rss "$MAIN_PID")
# Which code of the binary is mapped, by crate (needs its symbol table; after the figures).
python3 bench/lib/resident.py "$MAIN_PID" 15 >"$TMP/resident.txt" 2>&1 || true
# oha resolves the URLs' hosts itself: point every loaded service's name at the sidecar,
# whose HTTP proxy listener routes by the Host header.
CONNECT_TO=()
for h in $(sed -E 's|http://([^/]+)/.*|\1|' "$TMP/urls.txt" | sort -u); do
    CONNECT_TO+=(--connect-to "$h:80:127.0.0.1:$MAIN_PORT")
done
log "idle: RSS $(mib "$idle_rss") MiB, HWM $(mib "$idle_hwm") MiB; load at $RATE rps for $DURATION"
"$OHA" -z "$DURATION" -q "$RATE" --latency-correction -c "$CONNS" --no-tui --output-format json \
    "${CONNECT_TO[@]}" --urls-from-file "$TMP/urls.txt" >"$TMP/load.json" &
OHA_PID=$!
load_rss=0 load_anon=0 load_file=0 load_anon_maps=
while kill -0 "$OHA_PID" 2>/dev/null; do
    r=$(kib "$MAIN_PID" VmRSS)
    ((r > load_rss)) && { load_rss=$r; load_anon=$(kib "$MAIN_PID" RssAnon); load_file=$(kib "$MAIN_PID" RssFile); load_anon_maps=$(anon_rss "$MAIN_PID"); }
    sleep 0.5
done
wait "$OHA_PID"
load_hwm=$(kib "$MAIN_PID" VmHWM)
after_rss=$(kib "$MAIN_PID" VmRSS)
answered=$(jq '[.statusCodeDistribution[]] | add // 0' "$TMP/load.json")
errs=$(errors "$TMP/load.json")
series=$(curl -s "http://127.0.0.1:$MAIN_ADMIN/metrics" | grep -vc '^#')
holds_all "$MAIN_ADMIN" || { log "the sidecar's /config does not hold all $SERVICES services and $ROUTES routes"; exit 1; }
echo
echo "Sidecar (--threads $THREADS, $threads threads in all) holding $SERVICES services and $ROUTES routes (checked on its /config after the figures were taken):"
echo
echo "| when | VmRSS MiB | of it anonymous | of it file-backed | VmHWM MiB |"
echo "|---|--:|--:|--:|--:|"
echo "| idle, config applied | $(mib "$idle_rss") | $(mib "$idle_anon") | $(mib "$idle_file") | $(mib "$idle_hwm") |"
echo "| at $RATE rps for $DURATION (highest RSS sampled every 0.5 s) | $(mib "$load_rss") | $(mib "$load_anon") | $(mib "$load_file") | $(mib "$load_hwm") |"
echo "| after the load | $(mib "$after_rss") | | | |"
echo
echo "File-backed pages when idle, by file: $idle_maps."
echo
echo "Largest anonymous mappings, resident: idle $idle_anon_maps; at the load's highest sample $load_anon_maps."
echo
echo '```'
cat "$TMP/resident.txt"
echo '```'
echo
echo "Load: oha -q $RATE -c $CONNS through the HTTP proxy listener to $LOADED services ($(wc -l <"$TMP/urls.txt") URLs), $answered answered, $errs errors; p50 $(us "$TMP/load.json" .latencyPercentiles.p50) µs, p99 $(us "$TMP/load.json" .latencyPercentiles.p99) µs. $series metric sample lines after it."

# ---- 2. the control plane per connected proxy (the one above counts as the first).
echo
echo "Control plane:"
echo
echo "| proxies connected | VmRSS MiB |"
echo "|--:|--:|"
echo "| none, empty store | $(mib "$cp_empty") |"
echo "| none, config applied | $(mib "$cp_config") |"
if [[ -n $HEAPTRACK ]]; then
    heap_done "$MAIN_PID" "$MAIN_LEADER"
else
    kill "$MAIN_PID"
    wait "$MAIN_PID" 2>/dev/null || true
fi
sleep 2
cp_none=$(kib "$CONTROL_PID" VmRSS)
echo "| none, after the first sidecar left | $(mib "$cp_none") |"
declare -A CP_RSS=()
n=0
for want in 1 $PROXIES; do
    while ((n < want)); do
        n=$((n + 1))
        sidecar "p$n" 1
    done
    for ((i = 1; i <= n; i++)); do
        until_ok 300 applied "p$i" || { log "sidecar p$i never applied the whole view"; exit 1; }
    done
    sleep 3
    CP_RSS[$want]=$(kib "$CONTROL_PID" VmRSS)
    echo "| $want | $(mib "${CP_RSS[$want]}") |"
done
echo
for want in $PROXIES; do
    echo "Per connected proxy, (RSS($want) − RSS(1)) / $((want - 1)): $(awk -v a="${CP_RSS[$want]}" -v b="${CP_RSS[1]}" -v n="$want" 'BEGIN { printf "%.0f", (a - b) / (n - 1) }') KiB"
done
if [[ -n $HEAPTRACK ]]; then
    heap_done "$CONTROL_PID" "$CONTROL_LEADER"
    for f in "$HEAPTRACK"/main.* "$HEAPTRACK"/control.*; do
        echo
        echo "heaptrack_print $f (peak and live heap by call site):"
        heaptrack_print -f "$f" --print-peaks 1 --print-leaks 1 --print-allocators 0 \
            --print-temporary 0 --print-histogram /dev/null --peak-limit 15 --sub-peak-limit 5 | tail -n 400 >"$f.txt" || true
        grep -E "^(peak heap memory consumption|total memory leaked|calls to allocation functions)" "$f.txt" || true
    done
fi
