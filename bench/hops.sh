#!/usr/bin/env bash
# Per-request cost of each hop of the two-hop mutual TLS path (client → outbound sidecar →
# inbound sidecar → upstream), in counts that hold on a busy machine, unlike wall-clock
# latency: user-space instructions (callgrind), system calls (strace -c) and context
# switches (perf stat), per hop, with one client connection sending requests one after
# another (the shape of a request at 1,000 rps over 50 connections: alone on the path) and
# with CONC connections at once (requests share frames, records and system calls).
#
#   TRELLIS_BIN=target/profiling/trellis bash bench/hops.sh
#   MODES="syscalls" CONC="1" bash bench/hops.sh
#   MODES=timeline TRELLIS_BIN=... bash bench/hops.sh   # strace -tt -T of both sidecars, 20
#                                                         sequential requests, kept in OUT
#   MODES=busy CONC=50 TRELLIS_BIN=... bash bench/hops.sh   # at maximum throughput: each
#       process's CPU, and (perf sched) how often each runs, for how long, and side by side
#   MODES=profile CONC=50 TRELLIS_BIN=... bash bench/hops.sh   # perf record of both hops
#       at maximum throughput: each hop's hottest symbols, kernel included
#       (PERF_CALLGRAPH="--call-graph dwarf" for callers on a build without frame pointers)
#   MODES=profile RATE=1000 CONC=50 ...   # the same at a constant rate (oha, open loop): where
#       a request alone on the path spends its time, each hop's user/kernel split first
#   TRELLIS_EXTRA_SPEC='  upstreamHttp2MaxStreams: 10' ...  # lines added to both sidecars' spec
#   TRELLIS_PROXY_ARGS="--io-batch 16" ...   # extra flags for both sidecars' `trellis proxy`
#
# Identities come from a real control plane (as in bench/twohop.sh); the upstream is nginx
# answering 3 bytes. The sidecars run with one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
MODES=${MODES:-instructions syscalls}
CONC=${CONC:-1 10}
SECS=${SECS:-6}
T=${TRELLIS_BIN:-target/profiling/trellis}
OUT=${OUT:-}
[[ -x $T ]] || { echo "no trellis binary at $T (set TRELLIS_BIN)" >&2; exit 1; }
for tool in valgrind strace wrk nginx curl python3; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
OHA=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}
[[ -z ${RATE:-} || -x $OHA ]] || { echo "RATE needs oha (cargo install oha --locked)" >&2; exit 1; }
TMP=$(mktemp -d /tmp/trellis-hops.XXXXXX)
chmod 755 "$TMP"
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.5; for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$TMP"' EXIT
log() { printf '[hops %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; log "port $1 never opened"; exit 1; }

UP=$(port) CP=$(port) IN=$(port) OUTP=$(port) A_IN=$(port) A_OUT=$(port)
mkdir -p "$TMP/up"
cat >"$TMP/up/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $TMP/up/nginx.pid; error_log $TMP/up/error.log;
events { worker_connections 1024; }
http { access_log off; default_type text/plain; keepalive_requests 10000000; keepalive_timeout 120s;
  client_body_temp_path $TMP/up; proxy_temp_path $TMP/up; fastcgi_temp_path $TMP/up; uwsgi_temp_path $TMP/up; scgi_temp_path $TMP/up;
  server { listen 127.0.0.1:$UP; location / { return 200 "abc"; } } }
NGINX
nginx -p "$TMP/up" -c "$TMP/up/nginx.conf" -e "$TMP/up/error.log" >/dev/null 2>&1 &
NGINX_PID=$!
PIDS+=($!)

export TRELLIS_CONTROL=http://127.0.0.1:$CP TRELLIS_ADMIN_TOKEN_FILE=$TMP/store/admin-token TRELLIS_INSECURE=true
"$T" --log warn control --insecure --listen "127.0.0.1:$CP" --store "$TMP/store" >"$TMP/control.log" 2>&1 &
PIDS+=($!)
wait_port "$CP"
for _ in $(seq 100); do [[ -s $TMP/store/admin-token ]] && break; sleep 0.1; done
cat >"$TMP/services.yaml" <<YAML
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: up}
spec:
  ports: [{port: 80, appProtocol: http}]
  endpoints: [{address: "127.0.0.1:$IN", identity: "spiffe://trellis.local/ns/default/sa/up"}]
YAML
"$T" apply -f "$TMP/services.yaml" >/dev/null
for hop in in out; do
    cat >"$TMP/$hop.yaml" <<YAML
apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {name: hops-$hop}
spec:
  admin: {address: 127.0.0.1:$([[ $hop == in ]] && echo "$A_IN" || echo "$A_OUT")}
$(if [[ $hop == in ]]; then
        echo "  inbound: [{name: in, address: 127.0.0.1:$IN, forwardTo: 127.0.0.1:$UP, service: up}]"
    else
        echo "  outbound: [{name: out, address: 127.0.0.1:$OUTP, service: {name: up}}]"
    fi)
${TRELLIS_EXTRA_SPEC:-}
YAML
done
URL=http://127.0.0.1:$OUTP/

# start WRAPPER...: both sidecars, each under WRAPPER (which gets the hop's name in $HOP);
# their PIDs (the wrapper's) in HOP_PID[in], HOP_PID[out].
declare -A HOP_PID=() SPID=() IR=()
# cg: a sidecar under callgrind (exec: its PID is the wrapper's, for callgrind_control).
# CALLGRIND_ARGS adds options (scripts/layout/record: --demangle=no).
cg() { exec valgrind --tool=callgrind ${CALLGRIND_ARGS:-} --callgrind-out-file="$TMP/cg.$HOP" "$@"; }
start() {
    local hop tok
    for hop in in out; do
        tok=$("$T" token create --service "$([[ $hop == in ]] && echo up || echo client)" 2>/dev/null)
        HOP=$hop "$@" "$T" --log warn proxy --threads 1 ${TRELLIS_PROXY_ARGS:-} --control "$TRELLIS_CONTROL" \
            --config "$TMP/$hop.yaml" --state-dir "$TMP/state-$hop-$RANDOM" --token "$tok" \
            >"$TMP/$hop.log" 2>&1 &
        HOP_PID[$hop]=$!
        PIDS+=($!)
    done
    local got=""
    for _ in $(seq 600); do
        got=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' "$URL") || true
        [[ $got == "200 3" ]] && break
        sleep 0.2
    done
    [[ $got == "200 3" ]] || { log "the path answered '$got'"; tail -5 "$TMP"/*.log >&2; exit 1; }
    # Proof that the hops spoke mutual TLS.
    curl -s "127.0.0.1:$A_IN/metrics" | grep -q 'trellis_inbound_connections_total{.*security="mtls".* [1-9]' \
        || { log "the inbound sidecar saw no mutual TLS connection"; exit 1; }
}
stop() {
    local hop p
    for hop in in out; do kill -INT "${HOP_PID[$hop]}" 2>/dev/null || true; done
    for hop in in out; do
        p=${HOP_PID[$hop]}
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
        kill -TERM "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
}
# load C SECS: wrk with C connections for SECS; prints the requests completed.
load() { wrk -t1 -c"$1" -d"$2s" "$URL" | awk '/ requests in / { print $1 }'; }

echo "== hops $(date -u +%FT%TZ); $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "trellis: $T"

for mode in $MODES; do
    case $mode in
    instructions)
        echo
        echo "User-space instructions per request (callgrind; wrk -t1 -cC for ${SECS}s after a 2 s warm-up):"
        echo
        echo "| connections | requests | hop 1 (outbound) | hop 2 (inbound) | both |"
        echo "|--:|--:|--:|--:|--:|"
        for c in $CONC; do
            log "instructions, $c connection(s)"
            start cg
            wrk -t1 -c"$c" -d2s "$URL" >/dev/null
            # Part 1: start-up and warm-up (dumping zeroes the counts); part 2: the window.
            for hop in in out; do callgrind_control -d "${HOP_PID[$hop]}" >/dev/null 2>&1; done
            n=$(load "$c" "$SECS")
            for hop in in out; do callgrind_control -d "${HOP_PID[$hop]}" >/dev/null 2>&1; done
            stop
            for hop in in out; do
                # The dump right after the measured window (part 2) holds it alone.
                IR[$hop]=$(awk '/^summary:/ { print $2 }' "$TMP/cg.$hop.2")
            done
            printf '| %d | %d | %d | %d | %d |\n' "$c" "$n" $((IR[out] / n)) $((IR[in] / n)) $(((IR[out] + IR[in]) / n))
            # OUT keeps the window (callgrind.HOP.cC) and the rest of the run (.rest.N: start-up
            # and warm-up, then the stop).
            [[ -n $OUT ]] && mkdir -p "$OUT" && for hop in in out; do
                cp "$TMP/cg.$hop.2" "$OUT/callgrind.$hop.c$c"
                for f in "$TMP/cg.$hop" "$TMP/cg.$hop".*; do
                    if [[ -f $f && $f != *.2 ]]; then cp "$f" "$OUT/callgrind.$hop.c$c.rest${f#"$TMP/cg.$hop"}"; fi
                done
            done
            rm -f "$TMP"/cg.*
        done
        ;;
    syscalls)
        echo
        echo "System calls and context switches per request (strace -f -c and perf stat -e context-switches, attached after a 2 s warm-up; wrk -t1 -cC for ${SECS}s; strace slows the hops, so these are counts, not times):"
        echo
        echo "| connections | hop | requests | syscalls / req | top calls / req | context switches / req |"
        echo "|--:|---|--:|--:|---|--:|"
        for c in $CONC; do
            log "syscalls, $c connection(s)"
            start env
            wrk -t1 -c"$c" -d2s "$URL" >/dev/null
            # Context switches without strace (which adds its own), then syscalls.
            for hop in in out; do
                perf stat -e context-switches -x, -o "$TMP/cs.$hop" -p "${HOP_PID[$hop]}" -- sleep "$SECS" &
                SPID[$hop]=$!
            done
            sleep 0.2
            n_cs=$(load "$c" $((SECS - 1)))
            wait "${SPID[in]}" "${SPID[out]}" 2>/dev/null || true
            for hop in in out; do
                strace -f -c -o "$TMP/st.$hop" -p "${HOP_PID[$hop]}" 2>/dev/null &
                SPID[$hop]=$!
            done
            sleep 1
            n=$(load "$c" "$SECS")
            for hop in in out; do kill -INT "${SPID[$hop]}"; done
            wait "${SPID[in]}" "${SPID[out]}" 2>/dev/null || true
            stop
            for hop in out in; do
                total=$(awk '$NF != "total" && $1 ~ /^[0-9.]+$/ && $4 ~ /^[0-9]+$/ { t += $4 } END { print t + 0 }' "$TMP/st.$hop")
                top=$(awk -v n="$n" '$NF != "total" && $1 ~ /^[0-9.]+$/ && $4 ~ /^[0-9]+$/ { printf "%s %.2f\n", $NF, $4 / n }' "$TMP/st.$hop" | sort -k2 -gr | head -5 | awk '{ printf "%s%s %s", sep, $1, $2; sep = ", " }')
                cs=$(awk -F, '/context-switches/ { print $1 }' "$TMP/cs.$hop")
                printf '| %d | %s | %d | %.2f | %s | %.2f |\n' "$c" "$([[ $hop == out ]] && echo "1 (outbound)" || echo "2 (inbound)")" "$n" \
                    "$(awk -v t="$total" -v n="$n" 'BEGIN { print t / n }')" "$top" "$(awk -v t="$cs" -v n="$n_cs" 'BEGIN { print t / n }')"
            done
            [[ -n $OUT ]] && mkdir -p "$OUT" && for hop in in out; do cp "$TMP/st.$hop" "$OUT/strace-c.$hop.c$c"; done
        done
        ;;
    timeline)
        [[ -n $OUT ]] || { echo "timeline needs OUT=dir" >&2; exit 1; }
        mkdir -p "$OUT"
        log "timeline: 20 sequential requests on one connection"
        start env
        wrk -t1 -c1 -d1s "$URL" >/dev/null
        for hop in in out; do
            strace -f -tt -T -o "$OUT/timeline.$hop" -p "${HOP_PID[$hop]}" 2>/dev/null &
            SPID[$hop]=$!
        done
        sleep 1
        python3 - "$OUTP" <<'PY'
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for i in range(20):
    s.sendall(b"GET / HTTP/1.1\r\nHost: up\r\n\r\n")
    got = b""
    while not got.endswith(b"abc"):
        got += s.recv(4096)
    time.sleep(0.05)
PY
        sleep 0.5
        for hop in in out; do kill -INT "${SPID[$hop]}"; done
        wait "${SPID[in]}" "${SPID[out]}" 2>/dev/null || true
        stop
        echo
        echo "Timelines of 20 sequential requests in $OUT/timeline.{out,in} (strace -f -tt -T)."
        ;;
    busy)
        # Is a hop saturated at maximum throughput, or do the stages take turns (a batch of
        # requests crossing one process while the next waits)? Each process's CPU over the
        # middle of a wrk run, then 1 s of perf sched on the whole machine.
        ticks() { awk '{ sub(/.*\) /, ""); print $12, $13 }' "/proc/$1/stat"; }
        for c in $CONC; do
            log "busy, $c connection(s)"
            start env
            wrk -t1 -c"$c" -d2s "$URL" >/dev/null
            up_worker=$(pgrep -P "$NGINX_PID" | head -1)
            wrk -t1 -c"$c" -d"$((SECS + 4))s" "$URL" >"$TMP/busy.wrk" &
            wrk_pid=$!
            sleep 1
            declare -A U0=() S0=() PROC=([out]=${HOP_PID[out]} [in]=${HOP_PID[in]} [upstream]=$up_worker [wrk]=$wrk_pid)
            for k in "${!PROC[@]}"; do read -r U0[$k] S0[$k] < <(ticks "${PROC[$k]}"); done
            a0=$(curl -s "127.0.0.1:$A_IN/metrics" | awk '/^trellis_http_requests_total/ { n += $NF } END { print n + 0 }')
            m0=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $5 + $6 }' /proc/stat)
            t0=$(date +%s.%N)
            sleep "$SECS"
            t1=$(date +%s.%N)
            m1=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $5 + $6 }' /proc/stat)
            a1=$(curl -s "127.0.0.1:$A_IN/metrics" | awk '/^trellis_http_requests_total/ { n += $NF } END { print n + 0 }')
            echo
            echo "Machine: $(awk -v a="$m0" -v b="$m1" 'BEGIN { split(a, x, " "); split(b, y, " "); busy = y[1] - x[1]; idle = y[2] - x[2]; printf "%.2f of %d CPUs busy", (busy / (busy + idle)) * '"$(nproc)"', '"$(nproc)"' }') (every process, these included)."
            echo
            rate=$(awk -v a="$a0" -v b="$a1" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.0f", (b - a) / (t1 - t0) }')
            echo "At maximum throughput (wrk -t1 -c$c), ${SECS} s in the middle of the run: $rate req/s at the inbound sidecar; CPU of each process (cores):"
            echo
            echo "| process | user | system | both | CPU ms / 1k req |"
            echo "|---|--:|--:|--:|--:|"
            for k in out in upstream wrk; do
                read -r u1 s1 < <(ticks "${PROC[$k]}")
                awk -v k="$k" -v u="$((u1 - U0[$k]))" -v s="$((s1 - S0[$k]))" -v hz="$(getconf CLK_TCK)" -v t="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" -v n="$((a1 - a0))" \
                    'BEGIN { printf "| %s | %.2f | %.2f | %.2f | %.1f |\n", k, u / hz / t, s / hz / t, (u + s) / hz / t, (u + s) / hz * 1e6 / n }'
            done
            if [[ ${BUSY_SCHED:-1} == 0 ]]; then
                wait "$wrk_pid" || true
                stop
                continue
            fi
            # Requests in the recording: the rate just measured (counting around perf would
            # include its start and stop, over a second more at these rates).
            perf sched record -o "$TMP/sched.data" -- sleep 1 >/dev/null 2>&1
            wait "$wrk_pid" || true
            echo
            perf sched timehist -i "$TMP/sched.data" 2>/dev/null \
                | python3 bench/lib/schedbusy.py "$rate" out="${PROC[out]}" in="${PROC[in]}" upstream="$up_worker" wrk="$wrk_pid"
            [[ -n $OUT ]] && mkdir -p "$OUT" && cp "$TMP/sched.data" "$OUT/sched.c$c.data"
            stop
        done
        ;;
    profile)
        # Where each hop's cycles go at maximum throughput: perf record of both sidecars
        # (kernel included) over the middle of a wrk run, then each hop's hottest symbols.
        for c in $CONC; do
            log "profile, $c connection(s)"
            start env
            wrk -t1 -c"$c" -d2s "$URL" >/dev/null
            if [[ -n ${RATE:-} ]]; then
                load_desc="oha -q $RATE -c $c"
                "$OHA" -z "$((SECS + 4))s" -q "$RATE" -c "$c" --no-tui "$URL" >"$TMP/profile.wrk" &
            else
                load_desc="wrk -t1 -c$c"
                wrk -t1 -c"$c" -d"$((SECS + 4))s" "$URL" >"$TMP/profile.wrk" &
            fi
            wrk_pid=$!
            sleep 1
            perf record -q -F 1999 ${PERF_CALLGRAPH:--g} -p "${HOP_PID[out]},${HOP_PID[in]}" -o "$TMP/perf.data" -- sleep "$SECS" >/dev/null 2>&1
            wait "$wrk_pid" || true
            stop
            echo
            echo "Both hops, $load_desc, share of the samples by process (outbound ${HOP_PID[out]}, inbound ${HOP_PID[in]}) and object:"
            echo
            echo '```'
            perf report -i "$TMP/perf.data" --no-children --sort pid,dso --percent-limit 0 --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$'
            echo '```'
            for hop in out in; do
                echo
                echo "Hop $hop, $load_desc, self time by symbol (perf record -F 1999, ${SECS} s; [k] is the kernel):"
                echo
                echo '```'
                perf report -i "$TMP/perf.data" --pid "${HOP_PID[$hop]}" --no-children --sort dso,sym --percent-limit "${PERCENT_LIMIT:-0.7}" --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$'
                echo '```'
            done
            [[ -n $OUT ]] && mkdir -p "$OUT" && cp "$TMP/perf.data" "$OUT/perf.c$c.data"
        done
        ;;
    *) echo "unknown mode $mode" >&2; exit 1 ;;
    esac
done
